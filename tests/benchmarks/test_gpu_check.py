"""The prepared GPU check runs here, on the CPU, at tiny shapes, so it cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_gpu_check_runs_every_step_and_writes_one_json(tmp_path):
  out = tmp_path / "gpu_check.json"
  result = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"),
                           "--small", "--noinstall", f"--out={out}"],
                          capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out.read_text())
  steps = report["steps"]
  assert list(steps) == ["build", "parity", "iterative", "throughput", "bundled_study", "plan"]
  assert not [name for name, s in steps.items() if "error" in s], {
      name: s.get("error") for name, s in steps.items()}
  for variant in ("unpruned", "quarter_removed"):
    parity = steps["parity"]["result"][variant]
    assert parity["max_abs_logit_diff"] < 1e-4 and parity["max_kl"] < 1e-8
    assert parity["top1_agree"] == 1.0
  iterative = steps["iterative"]["result"]
  assert iterative["same_choices"] and len(iterative["removed"]) == 2
  assert iterative["reference_seconds"] > 0 and iterative["dpjax_seconds_with_compilation"] > 0
  rows = steps["throughput"]["result"]["rows"]
  assert len(rows) == 2 and all(r["hf_decode_tokens_per_second"] > 0 for r in rows)
  assert steps["bundled_study"]["result"]["final_accuracy"] > 0.5
  plan = steps["plan"]["result"]["programs"]
  assert set(plan) == {"readout", "readout_final", "stream", "tails", "tails_layers",
                       "stream_layers"}
  assert all(p["measured_s"] > 0 and p["predicted_s"] > 0 for p in plan.values())
