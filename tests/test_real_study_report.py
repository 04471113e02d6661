"""The real-model report's relation of l* to Iterative Pruning's collapse."""

import numpy as np
from scipy import stats

from benchmarks import real_study_report
from benchmarks.real_study import Run


def _results(num_layers, margin_l, accuracy_l, collapse, *, iterative=True):
  methods = {}
  if iterative:
    methods["iterative_accuracy"] = {"curve": [{"removed": 0, "accuracy": 0.6}],
                                     "collapse_point": collapse}
  return {"model": {"num_layers": num_layers},
          "full_model": {"transition_block": margin_l, "accuracy_transition_block": accuracy_l},
          "methods": methods, "task": {}, "settings": {"normalization": "options"}}


def test_transition_collapse_rows_and_correlations_match_scipy():
  found = [
      (Run("a", "m1", "arc_easy", "cloze", ()), _results(30, 30, 28, 14)),
      (Run("b", "m1", "sciq", "cloze", ()), _results(30, 28, 24, 17)),
      (Run("c", "m2", "arc_easy", "cloze", ()), _results(18, None, 18, 8)),
      (Run("d", "m3", "piqa", "cloze", ()), _results(24, 24, 18, None)),
      (Run("e", "m3", "sciq", "cloze", ()), _results(24, 20, 18, 12)),
      (Run("f", "m3", "arc_easy", "cloze", ()), _results(24, 24, 24, 0, iterative=False)),
  ]
  rows = real_study_report.transition_collapse_rows(found)
  assert [r["label"].split(" / ")[0:2] for r in rows] == [
      ["m1", "arc_easy"], ["m1", "sciq"], ["m2", "arc_easy"], ["m3", "piqa"], ["m3", "sciq"]]
  assert rows[0]["margin"] == 1.0 and abs(rows[0]["accuracy"] - 28 / 30) < 1e-12
  assert rows[0]["blocks_left"] == 16 and rows[2]["margin"] is None
  assert rows[3]["collapse"] is None and rows[3]["blocks_left"] == "-"

  # The accuracy rule's pairs (d has no collapse): two tied l* values (18/18 = 1.0 and
  # none other), so Spearman needs average ranks.
  x = [28 / 30, 24 / 30, 1.0, 18 / 24]
  y = [14 / 30, 17 / 30, 8 / 18, 12 / 24]
  x[1] = 1.0  # a tie with the third run
  pearson, spearman = real_study_report._correlation(x, y)
  assert abs(pearson - stats.pearsonr(x, y)[0]) < 1e-9
  assert abs(spearman - stats.spearmanr(x, y)[0]) < 1e-9
  assert real_study_report._correlation([1.0, 1.0, 1.0], [0.2, 0.3, 0.4]) is None
  assert real_study_report._correlation([0.5, 1.0], [0.2, 0.3]) is None
  # Not a constant: the statistics differ on these points.
  assert abs(pearson - spearman) > 1e-3


def test_relative_out_dir_is_the_callers_not_the_work_dirs(tmp_path):
  """real_study moves into its work directory; a relative --out_dir still means the caller's."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
  subprocess.run([sys.executable, "-m", "benchmarks.real_study", "--report_only",
                  "--out_dir=report", f"--work_dir={tmp_path / 'work'}"],
                 cwd=tmp_path, env=env, check=True, capture_output=True)
  with open(tmp_path / "report" / "REPORT.md") as f:
    assert "No run has finished yet." in f.read()
  assert not os.path.exists(tmp_path / "work" / "report")


def test_a_run_cut_by_methods_is_not_finished(tmp_path):
  """A first pass (`--methods=phase`) leaves the run's other methods for a later pass."""
  import json
  import os

  from benchmarks import real_study
  os.makedirs(tmp_path / "runs" / "r")
  assert not real_study._finished(str(tmp_path), os.path.join("runs", "r"), ("phase",))
  with open(tmp_path / "runs" / "r" / "results.json", "w") as f:
    json.dump({"settings": {"methods": ["phase"]}}, f)
  assert real_study._finished(str(tmp_path), os.path.join("runs", "r"), ("phase",))
  assert not real_study._finished(str(tmp_path), os.path.join("runs", "r"),
                                  ("phase", "iterative"))
