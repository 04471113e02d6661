"""The whole study: every method's report, resume after SIGKILL, sharded and multi-process runs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from dpjax.report import figures

SMALL = ["--num_items=16", "--calibration_items=8", "--batch_size=8", "--random_seeds=2",
         "--noprogress"]


def _run(model_dir, out, *extra, env=None, check=True):
  result = subprocess.run(
      [sys.executable, "-m", "dpjax.cli.study", f"--model={model_dir}", f"--output_dir={out}",
       *SMALL, *extra], capture_output=True, text=True, timeout=900, env=env)
  if check:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


def _results(out):
  with open(os.path.join(out, "results.json")) as f:
    results = json.load(f)
  results.pop("timings")
  results["settings"].pop("output_dir")
  return results


def _comparable(results):
  """Results without the engine's bookkeeping (compile counts differ by device count)."""
  results = dict(results)
  results.pop("engine", None)
  return results


# The methods that need no transition (the random test model has none to speak of; the phase
# methods are exercised on the bundled model, in test_bundled_model.py).
CURVE_METHODS = "--methods=iterative,block_influence,angular,single_layer,reverse,random"


@pytest.fixture(scope="module")
def full_run(synthetic_model_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("study"))
  _run(synthetic_model_dir, out, CURVE_METHODS)
  return out


def test_every_method_reports_a_curve(full_run):
  results = _results(full_run)
  methods = results["methods"]
  assert sorted(methods) == sorted(["iterative_accuracy", "block_influence", "angular",
                                    "single_layer", "reverse", "random"])
  for name, result in methods.items():
    assert "skipped" not in result, name
    curve = result["curve"]
    assert [p["removed"] for p in curve] == list(range(len(curve)))
    assert curve[0]["accuracy"] == pytest.approx(results["full_model"]["accuracy"][-1], abs=1e-6)
    for point in curve[1:]:
      if "kept" in point:
        assert len(point["kept"]) == 4 - point["removed"]
        assert point["export_keep"] == ",".join(str(b - 1) for b in point["kept"])
  assert methods["reverse"]["ranking"] == [4, 3, 2, 1]
  assert [p["kept"] for p in methods["reverse"]["curve"][1:]] == [[1, 2, 3], [1, 2], [1]]
  order = methods["iterative_accuracy"]["removed_order"]
  assert sorted(order) == sorted(set(order)) and len(order) == 3
  # Curves in the CSV match results.json.
  import csv
  with open(os.path.join(full_run, "pruning_curves.csv")) as f:
    rows = [r for r in csv.DictReader(f) if r["method"] == "reverse"]
  assert [float(r["accuracy"]) for r in rows] == pytest.approx(
      [p["accuracy"] for p in methods["reverse"]["curve"]], abs=1e-9)
  for figure in (figures.CURVES_FIGURE, figures.HEATMAP_FIGURE, figures.REMOVED_FIGURE):
    assert os.path.getsize(os.path.join(full_run, figure)) > 1000
  assert "collapse point" in open(os.path.join(full_run, "summary.md")).read()
  engine = results["engine"]
  assert engine["block_evaluations_executed"] >= engine["block_evaluations_minimum"]
  assert engine["block_evaluations_minimum"] < engine["block_evaluations_naive"]


def test_a_point_equals_an_independent_masked_evaluation(full_run, synthetic_model_dir):
  """Recompute one iterative step's evaluation accuracy with the plain masked forward."""
  import transformers
  import dpjax
  results = _results(full_run)
  point = results["methods"]["iterative_accuracy"]["curve"][2]
  with open(os.path.join(full_run, "items.jsonl")) as f:
    items = [json.loads(line) for line in f]
  tokenizer = transformers.AutoTokenizer.from_pretrained(synthetic_model_dir)
  model = dpjax.load_model(synthetic_model_dir)
  keep = dpjax.keep_mask([b - 1 for b in point["kept"]], 4)
  correct = 0
  for item in items:
    ids = tokenizer(item["prompt"], add_special_tokens=False)["input_ids"]
    logits = np.asarray(model.logits(np.array([ids]), keep=keep, gather=False))[0, -1]
    correct += int(np.argmax(logits[item["letter_token_ids"]]) == item["answer"])
  assert point["accuracy"] == pytest.approx(correct / len(items), abs=1e-9)


def test_killed_run_resumes_to_identical_results(full_run, synthetic_model_dir, tmp_path):
  out = str(tmp_path / "killed")
  proc = subprocess.Popen(
      [sys.executable, "-m", "dpjax.cli.study", f"--model={synthetic_model_dir}",
       f"--output_dir={out}", *SMALL, "--methods=iterative"], stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL, text=True)
  for line in proc.stdout:
    if "iterative_accuracy: step 1:" in line:
      proc.send_signal(signal.SIGKILL)  # a real kill, in the middle of step 2
      break
  proc.wait(timeout=600)
  assert proc.returncode == -signal.SIGKILL
  assert not os.path.exists(os.path.join(out, "results.json"))
  steps = sorted(os.listdir(os.path.join(out, "state", "iterative_accuracy")))
  assert "1" in steps and "3" not in steps and "4" not in steps
  resumed = _run(synthetic_model_dir, out, "--methods=iterative")
  assert "iterative_accuracy: step 1:" not in resumed.stdout  # it did not start over
  assert "iterative_accuracy: step 2:" in resumed.stdout
  after, uninterrupted = _results(out), _results(full_run)
  assert after["full_model"] == uninterrupted["full_model"]
  assert after["methods"]["iterative_accuracy"] == uninterrupted["methods"]["iterative_accuracy"]


def test_a_rerun_restores_every_finished_curve(full_run, synthetic_model_dir, tmp_path):
  """A finished curve is saved with the run's state: rerunning a finished run (as after a
  kill between two methods) evaluates no pruned variant again and writes the same results."""
  import shutil
  out = str(tmp_path / "rerun")
  shutil.copytree(full_run, out)
  rerun = _run(synthetic_model_dir, out, CURVE_METHODS)
  for name in ("unpruned", "iterative_accuracy", "block_influence", "angular", "reverse",
               "random", "single_layer"):
    assert f"{name}: curve of " in rerun.stdout and "restored from the saved state" in rerun.stdout
  assert "iterative_accuracy: step" not in rerun.stdout
  before, after = _results(full_run), _results(out)
  assert _comparable(after) == _comparable(before)
  # Only the unpruned profiles (evaluation and calibration) and block influence ran again.
  assert after["engine"]["block_evaluations_executed"] < (
      before["engine"]["block_evaluations_executed"] / 2)


def test_resume_with_other_flags_is_refused(full_run, synthetic_model_dir):
  result = _run(synthetic_model_dir, full_run, "--criteria=margin", check=False)
  assert result.returncode != 0
  assert ("--criteria was ['accuracy'] (the default: the flag not given), now ['margin']"
          in result.stderr)
  assert "--restart" in result.stderr


def test_eight_devices_give_the_same_results(full_run, synthetic_model_dir, tmp_path):
  """Items over a data axis of 4 with the weights (the embedding and the head along the
  vocabulary) split over a model axis of 2, and every device holding an eighth of each
  (model axis 8): the single-device results."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  single = _results(full_run)
  for axis, methods in ((2, ("iterative", "single_layer", "reverse")), (8, ("iterative",))):
    split = str(tmp_path / f"model_axis_{axis}")
    _run(synthetic_model_dir, split, f"--methods={','.join(methods)}", f"--model_axis={axis}",
         env=env)
    sharded = _results(split)
    assert _close(sharded["full_model"], single["full_model"]), axis
    for name in [m if m != "iterative" else "iterative_accuracy" for m in methods]:
      assert _close(sharded["methods"][name], single["methods"][name]), (axis, name)


def _close(a, b, tol=1e-5):
  if isinstance(a, dict):
    return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
  if isinstance(a, list):
    return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
  if isinstance(a, float) or isinstance(b, float):
    return (a is None and b is None) or abs(a - b) <= tol
  return a == b


def test_two_processes_give_the_same_results(full_run, synthetic_model_dir, tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  out = str(tmp_path / "two")
  common = [sys.executable, "-m", "dpjax.cli.study", f"--model={synthetic_model_dir}",
            f"--output_dir={out}", *SMALL, "--methods=iterative,reverse",
            f"--coordinator_address=localhost:{port}", "--num_processes=2"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = [subprocess.Popen(common + [f"--process_id={i}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
  outputs = [p.communicate(timeout=900) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  two, single = _results(out), _results(full_run)
  assert _close(two["full_model"], single["full_model"])
  for name in ("iterative_accuracy", "reverse"):
    assert _close(two["methods"][name], single["methods"][name]), name


def test_bad_pruning_flags(synthetic_model_dir, tmp_path):
  result = _run(synthetic_model_dir, str(tmp_path / "a"), "--min_layers=9", "--methods=iterative",
                check=False)
  assert result.returncode != 0 and "min_layers=9 must be between 1 and the model's 4" in result.stderr
  assert not os.path.exists(tmp_path / "a")  # nothing half-written
  result = _run(synthetic_model_dir, str(tmp_path / "b"), "--methods=magic", check=False)
  assert result.returncode != 0 and "unknown methods ['magic']" in result.stderr
  result = _run(synthetic_model_dir, str(tmp_path / "c"), "--batch_size=6", check=False,
                env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4"))
  assert result.returncode != 0 and "batch_size=6 is not a multiple of the 4 devices" in result.stderr


def test_phase_experiment_doublings_are_the_same_points_as_all(monkeypatch):
  """--phase_ks=doublings runs k = 1, 2, 4, ... and the largest k, and each of its points is
  the point the full run gives for that k (same blocks removed, same accuracy)."""
  import types

  from dpjax.study import methods
  from dpjax.study.results import StudyResults
  from dpjax.study.settings import Settings

  assert methods.phase_ks(1, "doublings") == [1]
  assert methods.phase_ks(4, "doublings") == [1, 2, 4]
  assert methods.phase_ks(11, "doublings") == [1, 2, 4, 8, 11]
  assert methods.phase_ks(11, "all") == list(range(1, 12))
  with pytest.raises(ValueError, match="phase_ks='some'"):
    Settings(phase_ks="some")

  L, l_star, n_items = 24, 12, 5
  influence = np.random.default_rng(0).random(L)

  def fake_curve(ctx, masks, name):
    """A point per mask whose accuracy encodes which blocks the mask removes."""
    points = []
    for mask in masks:
      removed = np.flatnonzero(~mask)
      acc = float(np.sum(2.0 ** -(removed + 1)))
      points.append(types.SimpleNamespace(
          accuracy=acc, kept=[b + 1 for b in np.flatnonzero(mask)],
          item_correct=np.zeros(n_items, bool), mean_final_dm={"vocab": acc, "options": -acc}))
    return points

  monkeypatch.setattr(methods, "one_shot_curve", fake_curve)
  arms = {}
  for which in ("all", "doublings"):
    ctx = types.SimpleNamespace(settings=Settings(phase_ks=which, phase_seeds=2,
                                                  phase_selections=("adjacent", "redundant",
                                                                    "random")),
                                model=types.SimpleNamespace(num_layers=L),
                                num_layers=L, calibration_transition=l_star, influence=influence,
                                unpruned_point=types.SimpleNamespace(
                                    item_correct=np.ones(n_items, bool)))
    out = StudyResults.__new__(StudyResults)
    out.full_model = types.SimpleNamespace(final_accuracy=1.0, chance=0.25,
                                           collapse_threshold=lambda: 0.625)
    methods.run_phase(ctx, out)
    assert out.phase_experiment.max_k == l_star - 1
    arms[which] = out.phase_experiment.arms
  for rule, by_arm in arms["doublings"].items():
    for arm, points in by_arm.items():
      assert [p.k for p in points] == [1, 2, 4, 8, 11]
      every = {p.k: p for p in arms["all"][rule][arm]}
      for p in points:
        assert p.removed_sets == every[p.k].removed_sets and len(p.removed_sets[0]) == p.k
        assert p.accuracy == every[p.k].accuracy


def test_the_screened_search_on_every_calibration_item_is_the_exact_search(
    synthetic_model_dir, tmp_path):
  """Screening every candidate on all the calibration items and keeping the best one
  removes what the exact search removes, step for step; a screen of 4 items keeping 2
  candidates runs and records its settings."""
  out = str(tmp_path / "screened")
  ran = _run(synthetic_model_dir, out, "--methods=iterative,iterative_screened",
             "--screen_items=8", "--screen_keep=1")
  methods = _results(out)["methods"]
  exact, screened = methods["iterative_accuracy"], methods["iterative_screened_accuracy"]
  assert screened["removed_order"] == exact["removed_order"]
  assert [p["accuracy"] for p in screened["curve"]] == [p["accuracy"] for p in exact["curve"]]
  # The same removals: the screened curve's variants are the exact curve's, not run again.
  assert "3 of 3 variants taken from iterative_accuracy" in ran.stdout
  small = str(tmp_path / "small")
  _run(synthetic_model_dir, small, "--methods=iterative_screened", "--screen_items=4",
       "--screen_keep=2")
  record = _results(small)["methods"]["iterative_screened_accuracy"]
  assert record["screen_items"] == 4 and record["screen_keep"] == 2
  assert len(record["removed_order"]) == 3  # the synthetic model's 4 blocks to 1


def test_a_curve_takes_the_variants_another_curve_evaluated(monkeypatch):
  """`curve(reuse=...)` evaluates only the variants the named curves did not (same items,
  read the same way), and returns every point in its masks' order; a curve read another
  way (final block only) is not reused."""
  import types

  from dpjax.study import methods
  from dpjax.study.results import CurvePoint
  from dpjax.study.settings import Settings

  L = 6
  point = lambda kept, acc: CurvePoint(removed=L - len(kept), accuracy=acc,
                                       mean_final_dm={"options": acc}, kept=tuple(kept))
  saved = {}

  class State:
    def load(self, name):
      return saved.get(name)

    def save(self, name, step, record):
      saved[name] = record

  def mask(removed):
    m = np.ones(L, bool)
    m[list(removed)] = False
    return m

  exact = np.stack([mask([2]), mask([2, 4]), mask([2, 4, 0])])
  saved["curve_iterative_accuracy"] = {
      "key": methods._curve_key(exact, True, False), "step": 1,
      "points": [point(methods._kept(m), 0.5 + i / 10).to_state() for i, m in enumerate(exact)]}
  saved["curve_final_only"] = {  # read at the last block only: other numbers for a mask
      "key": methods._curve_key(exact[:1], False, False), "step": 1,
      "points": [point(methods._kept(mask([4])), 0.9).to_state()]}
  asked = []

  def evaluate(ctx, masks, description, with_exact_match, per_layer):
    asked.append(np.asarray(masks))
    return [point(methods._kept(m), 0.1) for m in masks]

  monkeypatch.setattr(methods, "_evaluate_curve", evaluate)
  ctx = types.SimpleNamespace(settings=Settings(), state=State())
  # Removes 4 first, then 2 (the same set as the exact curve's second point), then 1.
  screened = np.stack([mask([4]), mask([4, 2]), mask([4, 2, 1])])
  points = methods.curve(ctx, screened, "iterative_screened_accuracy_4x2",
                         reuse=("iterative_accuracy", "final_only"))
  assert len(asked) == 1 and [methods._kept(m) for m in asked[0]] == [
      methods._kept(screened[0]), methods._kept(screened[2])]
  assert [p.accuracy for p in points] == [0.1, 0.6, 0.1]
  assert [p.kept for p in points] == [methods._kept(m) for m in screened]
  # Saved under its own name, so a rerun restores it whole.
  assert len(saved["curve_iterative_screened_accuracy_4x2"]["points"]) == 3
