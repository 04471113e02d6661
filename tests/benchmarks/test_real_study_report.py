"""The real-model report's relation of l* to Iterative Pruning's collapse."""

import numpy as np
from scipy import stats

from benchmarks.real_study import report as real_study_report
from benchmarks.real_study.study import Run


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
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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

  from benchmarks.real_study import study as real_study
  os.makedirs(tmp_path / "runs" / "r")
  assert not real_study._finished(str(tmp_path), os.path.join("runs", "r"), ("phase",))
  with open(tmp_path / "runs" / "r" / "results.json", "w") as f:
    json.dump({"settings": {"methods": ["phase"]}}, f)
  assert real_study._finished(str(tmp_path), os.path.join("runs", "r"), ("phase",))
  assert not real_study._finished(str(tmp_path), os.path.join("runs", "r"),
                                  ("phase", "iterative"))


def _phase_results(comparisons, num_layers=10, l_star=8):
  return {"model": {"num_layers": num_layers}, "task": {"num_items": 300,
                                                        "num_calibration_items": 64},
          "settings": {"normalization": "options", "methods": ["phase"]},
          "full_model": {"transition_block": l_star},
          "calibration_transition": {"items": 128, "used": "margin_options",
                                     "margin_options": {"block": l_star, "ci95": [7, 9]}},
          "methods": {}, "phase_experiment": {"comparisons": comparisons}}


def _c(rule, k, difference, p, low, high):
  return {"rule": rule, "k": k, "silent_accuracy": 0.5 + difference, "decisive_accuracy": 0.5,
          "difference": difference, "ci95": [low, high], "mcnemar_p": p, "seeds": 1,
          "test": "paired", "holm_p": p}


def test_runs_and_the_study_are_classed_from_holm_over_every_comparison():
  """Holm runs over the whole study, not a run: a p of 0.02 that stands alone in its run
  does not survive beside four others; the study holds when a run holds and none is
  reversed."""
  found = [
      (Run("a", "smollm2", "sciq", "cloze"), _phase_results(
          [_c("adjacent", 2, -0.2, 1e-6, -0.25, -0.15), _c("random", 2, -0.05, 0.3, -0.1, 0.01)])),
      (Run("b", "gemma3", "sciq", "cloze"), _phase_results(
          [_c("adjacent", 2, +0.03, 0.02, 0.01, 0.05)])),
      (Run("c", "qwen25", "sciq", "cloze"), _phase_results(
          [_c("adjacent", 2, +0.10, 0.001, 0.05, 0.15), _c("redundant", 2, +0.1, 0.4, -0.01, 0.2)])),
  ]
  per_run = real_study_report.study_comparisons(found)
  # Holm over 5: 1e-6 x 5, 0.001 x 4, 0.02 x 3 = 0.06, 0.3 x 2 = 0.6, 0.4 x 1 -> 0.6.
  approx = lambda xs: __import__("pytest").approx(xs, rel=1e-12)
  assert [c.holm_p for c in per_run["a"]] == approx([5e-6, 0.6])
  assert [c.holm_p for c in per_run["b"]] == approx([0.06])
  assert [c.holm_p for c in per_run["c"]] == approx([0.004, 0.6])
  classes, overall, counts = real_study_report.classify(found)
  assert classes["a"][0] == "holds" and classes["b"][0] == "cannot tell"
  assert classes["c"][0] == "reversed" and overall == "cannot tell"
  assert counts == {"holds": 1, "reversed": 1, "cannot tell": 1}
  text = real_study_report.verdict_markdown(found, [run for run, _ in found])
  assert "on these models: cannot tell.** Of the 3 runs" in text
  assert "| a | 8 [7, 9] (128) | 8/10 = 0.80 | **holds** |" in text
  assert "4-bit GGUF file" in text
  # Without the third run, Holm over three comparisons lets b's 0.02 through (x 2 = 0.04):
  # then b is reversed too.
  classes, overall, _ = real_study_report.classify(found[:2])
  assert classes["b"][0] == "reversed" and overall == "cannot tell"
  assert real_study_report.classify(found[:1])[1] == "holds"


def test_the_committed_report_and_verdict_regenerate_from_the_committed_runs(tmp_path):
  """REPORT.md and VERDICT.md are computed, never edited: written again from the committed
  runs' results.json and variants.jsonl they come out the same, byte for byte."""
  import os
  import shutil
  from benchmarks.real_study import report
  from benchmarks.real_study.study import PLAN, TUNED_RUNS
  here = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))), "benchmarks", "real_study")
  shutil.copytree(os.path.join(here, "runs"), tmp_path / "runs")
  if os.path.isdir(os.path.join(here, "lenses")):
    shutil.copytree(os.path.join(here, "lenses"), tmp_path / "lenses")
  report.write_report(str(tmp_path), PLAN + TUNED_RUNS)
  for name in ("REPORT.md", "VERDICT.md"):
    with open(os.path.join(here, name)) as f, open(tmp_path / name) as g:
      assert g.read() == f.read(), name
