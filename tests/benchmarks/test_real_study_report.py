"""The real-model report's relation of l* to Iterative Pruning's collapse."""

import numpy as np
from scipy import stats

from benchmarks.real_study import report as real_study_report
from benchmarks.real_study.study import Run


def _results(num_layers, margin_l, accuracy_l, collapse, *, iterative=True, screened=None):
  methods = {}
  if iterative:
    methods["iterative_accuracy"] = {"curve": [{"removed": 0, "accuracy": 0.6}],
                                     "collapse_point": collapse}
  if screened is not None:
    methods["iterative_screened_accuracy"] = {"curve": [{"removed": 0, "accuracy": 0.6}],
                                              "collapse_point": screened}
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
      # The exact search's collapse where both ran; the screened one's where it ran alone.
      (Run("g", "m2", "sciq", "cloze", ()), _results(18, 12, 12, 6, screened=9)),
      (Run("h", "m2", "piqa", "cloze", ()), _results(18, 12, 12, 0, iterative=False,
                                                      screened=9)),
  ]
  rows = real_study_report.transition_collapse_rows(found)
  assert [r["label"].split(" / ")[0:2] for r in rows] == [
      ["m1", "arc_easy"], ["m1", "sciq"], ["m2", "arc_easy"], ["m3", "piqa"], ["m3", "sciq"],
      ["m2", "sciq"], ["m2", "piqa"]]
  assert [r["search"] for r in rows[-3:]] == ["exact", "exact", "screened"]
  assert rows[-2]["collapse"] == 6 / 18 and rows[-1]["collapse"] == 9 / 18
  assert rows[-1]["blocks_left"] == 9
  rows = rows[:5]
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


def test_relative_out_dir_is_the_callers(tmp_path):
  """A relative --out_dir names a folder under the caller's directory."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
  subprocess.run([sys.executable, "-m", "benchmarks.real_study", "--report_only",
                  "--out_dir=report"], cwd=tmp_path, env=env, check=True, capture_output=True)
  with open(tmp_path / "report" / "REPORT.md") as f:
    assert "No run has finished yet." in f.read()


N = 300


def _vector(right):
  out = np.zeros(N, int)
  out[list(right)] = 1
  return out


def _write_run(root, name, arms, *, skipped=None, l_star=8, num_layers=10, generation=None):
  """A run directory: results.json and variants.jsonl with the unpruned model right on
  the first 180 items and, per (rule, k), the two arms' outcome vectors (one per seed)."""
  import json
  import os
  unpruned = _vector(range(180))
  run_dir = os.path.join(root, "runs", name)
  os.makedirs(run_dir)
  records = [{"method": "unpruned", "k": 0, "kept": list(range(num_layers)),
              "correct": "".join(map(str, unpruned))}]
  for (rule, k), (silent, decisive) in arms.items():
    for arm, vectors in (("silent", silent), ("decisive", decisive)):
      for seed, vector in enumerate(vectors):
        removed = [l_star - 2 - j for j in range(k)] if arm == "silent" else [
            l_star - 1 + j for j in range(k)]
        records.append({"method": "phase", "rule": rule, "phase": arm, "k": k,
                        "seed": seed if rule == "random" else None,
                        "kept": [b for b in range(num_layers) if b not in removed],
                        "correct": "".join(map(str, vector))})
  with open(os.path.join(run_dir, "variants.jsonl"), "w") as f:
    f.write("\n".join(json.dumps(r) for r in records) + "\n")
  results = {"model": {"num_layers": num_layers},
             "task": {"num_items": N, "num_calibration_items": 64},
             "settings": {"normalization": "options", "methods": ["phase"]},
             "full_model": {"transition_block": l_star, "accuracy": [0.25, 0.6],
                            "chance": 0.25},
             "calibration_transition": {"items": 128, "used": "margin_options",
                                        "margin_options": {"block": l_star, "ci95": [7, 9]}},
             "methods": {},
             "phase_experiment": ({"skipped": skipped} if skipped else {"comparisons": []})}
  if generation is not None:
    results["full_model"]["generation"] = generation
  with open(os.path.join(run_dir, "results.json"), "w") as f:
    json.dump(results, f)
  return results


def test_runs_are_classed_from_their_variants_with_holm_over_the_study(tmp_path):
  """Every comparison is recomputed from variants.jsonl: a run whose Decisive arm equals
  the unpruned model and whose Silent arm is far below holds; one whose arms differ by
  three items of 300 is equivalent; one whose Decisive arm is far below is reversed; a run
  skipped for want of a transition is counted as such; a control removing the same blocks
  is counted once in Holm; and the meta-analysis pools the runs."""
  import pytest
  from dpjax.study import statistics
  unpruned = _vector(range(180))
  low = _vector(range(100))
  found = [
      (Run("a", "smollm2", "sciq", "cloze"), _write_run(tmp_path, "a", {
          ("adjacent", 1): ([low], [unpruned]),
          ("adjacent_keep_last", 1): ([low], [unpruned])})),
      (Run("b", "gemma3", "sciq", "cloze"), _write_run(tmp_path, "b", {
          ("adjacent", 1): ([_vector(range(183))], [unpruned])})),
      (Run("c", "qwen25", "sciq", "cloze"), _write_run(tmp_path, "c", {
          ("adjacent", 1): ([unpruned], [low]),
          ("random", 1): ([unpruned] * 3, [low, _vector(range(120)), low])})),
      (Run("d", "qwen25", "piqa", "cloze"), _write_run(
          tmp_path, "d", {}, skipped="the unpruned model has no transition on the "
          "calibration items (margin rule)")),
  ]
  out = str(tmp_path)
  per_run = real_study_report.study_comparisons(out, found)
  assert per_run["a"][1].same_as == "adjacent k=1"
  distinct = [c for name in "abc" for c in per_run[name] if c.same_as is None]
  assert len(distinct) == 4
  assert [c.holm_p for c in distinct] == pytest.approx(statistics.holm([c.p for c in distinct]))
  assert per_run["c"][1].p == pytest.approx(0.25)  # three seeds that agree: 2 / 2^3
  classes, counts, without = real_study_report.classify(out, found)
  assert {name: cls for name, (cls, _) in classes.items()} == {
      "a": "holds", "b": "equivalent", "c": "reversed"}
  assert counts == {"holds": 1, "reversed": 1, "equivalent": 1, "cannot tell": 0}
  assert without == {"no transition": ["d"]}
  text = real_study_report.verdict_markdown(out, found, [run for run, _ in found])
  assert "the claim holds in 1, is reversed in 1, the arms are equivalent in 1" in text
  assert "No transition: 1 run(s) (d)." in text
  assert "| a | 8 [7, 9] (128) | 8/10 = 0.80 | **holds** |" in text
  assert "| adjacent | 1 | 3 |" in text  # the meta-analysis row: three runs pooled
  assert "4-bit GGUF file" in text


def test_generation_runs_are_judged_apart_and_against_the_choice_runs(tmp_path):
  """A generation run is left out of the claim's classes (stated for multiple choice) and
  has its own section: its Silent-minus-Decisive difference as a share of its margin over
  chance against the same comparison of its model's multiple-choice runs, pooled."""
  import math
  import pytest
  from dpjax.report import claim
  from dpjax.study import statistics
  unpruned = _vector(range(180))
  found = [
      (Run("mc1", "qwen25", "sciq", "cloze"), _write_run(tmp_path, "mc1", {
          ("adjacent", 1): ([_vector(range(170))], [unpruned])})),
      (Run("mc2", "qwen25", "arc_easy", "cloze"), _write_run(tmp_path, "mc2", {
          ("adjacent", 1): ([_vector(range(175))], [unpruned])})),
      (Run("gen", "qwen25", "sciq_open", "generate"), _write_run(tmp_path, "gen", {
          ("adjacent", 1): ([_vector(range(60))], [unpruned])},
          generation={"exact_match": 0.6, "chance": 0.02, "token_f1": 0.7})),
  ]
  out = str(tmp_path)
  rows = real_study_report.generation_against_choice(out, found)
  assert len(rows) == 1 and rows[0]["choice_runs"] == ["mc1", "mc2"]
  per_run = real_study_report.study_comparisons(out, found)
  c = {name: cs[0] for name, cs in per_run.items()}
  share = lambda name, gap: (c[name].difference / gap, claim.standard_error(c[name]) / gap)
  gen, gen_se = share("gen", 0.6 - 0.02)
  assert gen == pytest.approx((60 - 180) / 300 / 0.58)
  pooled = statistics.random_effects_meta(*zip(*[share(n, 0.35) for n in ("mc1", "mc2")]))
  assert rows[0]["generation"] == pytest.approx(gen)
  assert rows[0]["choice"] == pytest.approx(pooled["estimate"])
  se = math.hypot(gen_se, pooled["standard_error"])
  assert rows[0]["delta"] == pytest.approx(gen - pooled["estimate"])
  assert rows[0]["ci95"][1] == pytest.approx(gen - pooled["estimate"] + 1.959964 * se, rel=1e-5)
  assert rows[0]["holm_p"] == pytest.approx(math.erfc(abs(rows[0]["delta"]) / se / math.sqrt(2)))
  assert rows[0]["holm_p"] < 0.05 and rows[0]["delta"] < 0
  text = real_study_report.verdict_markdown(out, found, [run for run, _ in found])
  assert "Of the 2 runs with a phase experiment" in text  # the generation run apart
  assert "## Generation: the phases for open-ended answers" in text
  assert "| gen | 300 | 0.600 (0.700) | 0.020 |" in text
  assert ("the Silent Phase costs relatively more for generation in 1 comparisons and less "
          "in 0: the Silent Phase costs relatively more, against the Decisive Phase, for "
          "generation (the claim's direction stronger).") in text
  # One comparison, larger for generation: a sign test cannot tell from one.
  assert abs(rows[0]["generation"]) > abs(rows[0]["choice"])
  assert "larger for generation in 1 of them (exact sign test p = 1)" in text
  assert "the phases matter no detectably more or less for generation" in text
  assert real_study_report.sign_test(7, 7) == pytest.approx(2 / 2 ** 7)
  assert real_study_report.sign_test(5, 7) == pytest.approx(2 * (1 + 7 + 21) / 128)


def test_the_committed_report_and_verdict_regenerate_from_the_committed_runs(tmp_path):
  """REPORT.md and VERDICT.md are computed, never edited: written again from the committed
  runs' results.json and variants.jsonl they come out the same, byte for byte."""
  import os
  import shutil
  from benchmarks.real_study import campaign, report
  here = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))), "benchmarks", "real_study")
  if os.path.isdir(os.path.join(here, "runs")):
    shutil.copytree(os.path.join(here, "runs"), tmp_path / "runs")
  for name in ("lenses", campaign.LEDGER_FILE):
    path = os.path.join(here, name)
    if os.path.isdir(path):
      shutil.copytree(path, tmp_path / name)
    elif os.path.isfile(path):
      shutil.copy2(path, tmp_path / name)
  report.write_report(str(tmp_path), campaign.runs(campaign.LOCAL))
  for name in ("REPORT.md", "VERDICT.md"):
    with open(os.path.join(here, name)) as f, open(tmp_path / name) as g:
      assert g.read() == f.read(), name


def test_the_screened_search_is_compared_with_the_exact_one_in_order_and_as_sets(tmp_path):
  """Where a run holds both searches, the report counts the steps after which both have
  removed the same set of blocks (a swapped pair agrees again once both are gone), the
  first step whose removal differs and the largest accuracy gap along the two curves."""
  curve = lambda accuracies: [{"removed": i, "accuracy": a} for i, a in enumerate(accuracies)]
  exact = {"removed_order": [7, 3, 5, 1], "curve": curve([0.6, 0.6, 0.55, 0.5, 0.3]),
           "collapse_point": 4}
  screened = {"removed_order": [7, 5, 3, 2], "curve": curve([0.6, 0.6, 0.45, 0.5, 0.35]),
              "collapse_point": 4, "screen_items": 16, "screen_keep": 4}
  same = {"removed_order": [7, 3], "curve": curve([0.6, 0.6, 0.55]), "collapse_point": None}
  found = [
      (Run("a", "smollm2", "arc_easy", "cloze"), {"methods": {
          "iterative_accuracy": exact, "iterative_screened_accuracy": screened}}),
      (Run("b", "gemma3", "arc_easy", "cloze"), {"methods": {
          "iterative_accuracy": same,
          "iterative_screened_accuracy": dict(same, screen_items=16, screen_keep=4)}}),
      (Run("c", "qwen25", "arc_easy", "cloze"), {"methods": {
          "iterative_screened_accuracy": screened}}),
  ]
  rows = real_study_report.screened_against_exact(found)
  assert [r["run"] for r in rows] == ["a", "b"]
  a, b = rows
  assert a["steps"] == 4 and a["first_difference"] == 2
  assert a["same_set_steps"] == 2  # after step 1 ({7}) and step 3 ({7, 3, 5})
  assert abs(a["largest_accuracy_difference"] - 0.10) < 1e-12
  assert a["collapse"] == (4, 4) and (a["screen_items"], a["screen_keep"]) == (16, 4)
  assert b["first_difference"] is None and b["same_set_steps"] == 2
  assert b["largest_accuracy_difference"] == 0.0
