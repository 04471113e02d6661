"""`dpjax-throughput` on the bundled model: its rows, its figure's data against the study's
numbers, its token check, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dpjax.serve import throughput
from dpjax.bundled import BUNDLED_MODEL
from tests.support import default_install

FAST = ["--batch_size=2", "--prompt_len=8", "--new_tokens=3", "--repeats=1"]


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory):
  """`dpjax` on the bundled model as the default install runs it (no torch), at a small
  size."""
  out = tmp_path_factory.mktemp("study")
  result = default_install.run(
      ["-m", "dpjax.cli.study", "--num_items=24", "--calibration_items=8",
       "--methods=iterative", "--min_layers=13", "--noprogress", f"--output_dir={out}"],
      str(tmp_path_factory.mktemp("site")), timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"report: {os.path.join(out, 'summary.html')}" in result.stdout
  return str(out)


def test_study_variants_are_measured_and_the_figure_holds_the_study_numbers(study_dir):
  result = subprocess.run(
      [sys.executable, "-m", "dpjax.cli.throughput", f"--model={BUNDLED_MODEL}",
       f"--study={study_dir}", *FAST], capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(study_dir, throughput.RESULTS_FILE)) as f:
    report = json.load(f)
  with open(os.path.join(study_dir, "results.json")) as f:
    study = json.load(f)
  assert report["mesh"] == {"data": 1, "devices": 1}
  rows = report["rows"]
  points = {(name, tuple(p["kept"])): p["accuracy"] for name, m in study["methods"].items()
            for p in m["curve"] if p["removed"] > 0}
  assert len(rows) == 1 + len(points)  # the unpruned model, then every curve point
  for row in rows[1:]:
    assert row["accuracy"] == points[(row["method"], tuple(row["kept"]))]
    assert row["prefill_tokens_per_second"] > 0 and row["decode_tokens_per_second"] > 0
    assert row["ideal_speedup"] == pytest.approx(16 / (16 - row["removed"]))
    assert row["weights_mb"] < rows[0]["weights_mb"] and row["kv_cache_mb"] < rows[0]["kv_cache_mb"]
  assert rows[0]["accuracy"] == study["full_model"]["accuracy"][-1]
  assert os.path.getsize(os.path.join(study_dir, throughput.FIGURE_FILE)) > 1000
  with open(os.path.join(study_dir, "summary.md")) as f:
    assert throughput.FIGURE_FILE in f.read()  # the study's report links to it


def test_pareto_front():
  points = [(10.0, 0.9), (20.0, 0.8), (15.0, 0.7), (30.0, 0.3), (25.0, 0.2)]
  assert throughput.pareto_front(points) == [0, 1, 3]


def test_bad_input_is_refused_by_name(study_dir, synthetic_model_dir):
  def run(*flags):
    return subprocess.run([sys.executable, "-m", "dpjax.cli.throughput", *FAST, *flags],
                          capture_output=True, text=True, timeout=600)
  bad = run(f"--model={BUNDLED_MODEL}", "--keep=0,1,16", "--nocheck_tokens")
  assert bad.returncode != 0 and "indices [16] are out of range" in bad.stderr
  bad = run(f"--model={BUNDLED_MODEL}", "--keep=;", "--nocheck_tokens")
  assert bad.returncode != 0 and "give the variants" in bad.stderr
  bad = run(f"--model={synthetic_model_dir}", f"--study={study_dir}", "--nocheck_tokens")
  assert bad.returncode != 0 and "studied another model" in bad.stderr
  bad = run(f"--model={BUNDLED_MODEL}", "--keep=0,1", "--prompt_len=250", "--new_tokens=10",
            "--nocheck_tokens")
  assert bad.returncode != 0 and "exceed the model's context of 256" in bad.stderr


def test_the_token_check_runs_before_any_time(tmp_path):
  """With the check on (the default), the first variant's tokens are compared with HF
  generate; they agree on the bundled model, so times are reported."""
  result = subprocess.run(
      [sys.executable, "-m", "dpjax.cli.throughput", f"--model={BUNDLED_MODEL}", "--keep=0,2,4,15",
       f"--output_dir={tmp_path}", *FAST], capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / throughput.RESULTS_FILE) as f:
    rows = json.load(f)["rows"]
  assert [r["removed"] for r in rows] == [0, 12]
