"""The planner: the study's calls counted as the engine makes them, and dpjax-plan on this
machine's devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import transformers

import dpjax
from dpjax import tasks
from dpjax.engine import planner
from dpjax.study import pruning
from dpjax.engine.sweep import Sweep
from dpjax.tasks import synthetic


def test_the_schedule_counts_the_block_evaluations_iterative_pruning_runs(synthetic_model_dir):
  """Iterative Pruning to one block (the margin criterion: no early stop) runs exactly the
  block evaluations the planner counts for it, candidates one at a time or vmapped."""
  model = dpjax.load_model(synthetic_model_dir)
  tokenizer = transformers.AutoTokenizer.from_pretrained(synthetic_model_dir)
  items = synthetic.generate("test", 12)
  encoded = tasks.encode(tokenizer, items, [tasks.prompt(item) for item in items])
  for in_flight in (1, None):
    sweep = Sweep(model, encoded, batch_size=4, in_flight=in_flight, candidates=2)
    pruning.iterative_prune(sweep, criterion="margin")
    shape = planner.StudyShape(model.num_layers, 12, batch=4, candidates=2, in_flight=in_flight)
    work = {name: planner.Work() for name in planner.fit.PROGRAMS}
    planner.iterative_work(work, shape, batches=3)
    counted = sum(w.block + w.last for w in work.values()) * 4
    assert counted == sweep.counters.executed, in_flight
    assert work["stream"].calls == 3 * (model.num_layers - 1)


def test_dpjax_plan_on_the_local_devices_fits_the_bundled_model(tmp_path):
  out = tmp_path / "plan.json"
  result = subprocess.run([sys.executable, "-m", "dpjax.cli.plan", "--target=local",
                           "--num_items=100", "--tokens=96", f"--out={out}"],
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "predicted wall time of the whole study on 100 items" in result.stdout
  plan = json.loads(out.read_text())
  assert plan["fits"] and plan["target"] == "local" and plan["num_layers"] == 16
  assert set(plan["programs"]) == set(planner.fit.PROGRAMS)
  for name, p in plan["programs"].items():
    m = p["memory"]
    assert abs(m["peak_gb"] - (m["arguments_gb"] + m["outputs_gb"] + m["temporaries_gb"])) < 1e-9
    assert m["arguments_gb"] > 0 and p["fits"]
  # The parts' flops: one block of 16 rows x 96 tokens is at least its matmuls' work.
  block = plan["parts"]["block"]["flops"]
  d, f, rows, t = 64, 256, plan["chosen"]["rows_per_shard"], 96
  assert block >= 2 * rows * t * (d * (64 + 2 * 32) + 64 * d + 3 * d * f)
  assert plan["predicted_study_hours"] > 0


def test_dpjax_plan_exits_with_an_error_when_a_program_does_not_fit(tmp_path):
  result = subprocess.run([sys.executable, "-m", "dpjax.cli.plan", "--target=local",
                           "--num_items=100", "--tokens=96", "--fit_margin=0.9999",
                           "--batch_size=16", "--candidates_per_call=8"],
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 1
  assert "DOES NOT FIT" in result.stdout and "You fixed --batch_size=16" in result.stdout


def test_the_presets_and_the_mesh_they_get():
  with_devices = planner.Target("tiny", "cpu", 1, 1e9, 1e11, 1e11, 1e10)
  cfg = planner.model_config("llama3-70b")
  assert cfg.num_layers == 80 and cfg.vocab_size == 128256
  assert abs(planner.parameter_bytes(cfg) / 1e9 - 141.1) < 0.5
  assert planner.choose_model_axis(cfg, with_devices) == 1  # one device: nothing to split
  assert planner.choose_model_axis(cfg, planner.TARGETS["8xH100"]) == 8
  assert planner.choose_model_axis(planner.model_config("llama3-8b"),
                                   planner.TARGETS["v5p-8"]) == 1
