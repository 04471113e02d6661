"""The planner: the study's calls counted as the engine makes them, and dpjax-plan on this
machine's devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import transformers

import dpjax
from dpjax import tasks
from dpjax.engine import planner
from dpjax.study import pruning
from dpjax.engine.sweep import Sweep
from dpjax.tasks import synthetic
from tests.support import default_install


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


# A JAX plugin that fails to start as JAX's CUDA plugin does on a machine without CUDA: it
# writes to the standard error from below Python and raises (JAX logs the traceback).
NOISY_PLUGIN = """
import os

def initialize():
  os.write(2, b"I0000 cudart_stub.cc:31] Could not find cuda drivers on your machine\\n")
  raise RuntimeError("Unable to load CUDA. Is it installed?")
"""


@pytest.fixture(scope="module")
def no_flag_plan(tmp_path_factory):
  """`dpjax-plan` with no flags (but where to write the JSON), run as the default install
  has it (no torch) where an accelerator plugin fails to start: (everything it printed,
  stdout and stderr together; the plan)."""
  from tests.support import default_install
  where = tmp_path_factory.mktemp("no_flag_plan")
  plugin = where / "plugins" / "jax_plugins" / "noisy_probe"
  plugin.mkdir(parents=True)
  (plugin / "__init__.py").write_text(NOISY_PLUGIN)
  paths = [str(where / "plugins")] + [p for p in [os.environ.get("PYTHONPATH")] if p]
  env = default_install.environment(
      str(where), env=dict(os.environ, PYTHONPATH=os.pathsep.join(paths)))
  out = where / "plan.json"
  result = subprocess.run([sys.executable, "-m", "dpjax.cli.plan", f"--out={out}"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=env, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:]
  return result.stdout, json.loads(out.read_text())


def test_dpjax_plan_says_its_own_first_line_and_keeps_library_noise_out(no_flag_plan):
  """An accelerator plugin's failed probe (its C++ log line, JAX's logged traceback) stays
  out of the output: its first line is dpjax-plan's own."""
  output, _ = no_flag_plan
  assert output.splitlines()[0].startswith("dpjax-plan: the study of dpjax/bundled_model on "
                                           "local"), output[:2000]
  assert "Traceback" not in output and "CUDA" not in output and "cudart" not in output


def test_dpjax_plan_with_no_flags_plans_the_default_study_of_dpjax(no_flag_plan):
  """The study `dpjax` runs with no flags: its task, items (split as the study splits them),
  prompts (encoded with the bundled model's tokenizer: the widest batch) and methods; its
  predicted time within 2x of the committed default run's measured study time."""
  from dpjax.bundled import BUNDLED_MODEL, DEFAULT_RUN
  from dpjax.checkpoints.convert import load_tokenizer
  from dpjax.study.run import select_items
  from dpjax.study.settings import Settings
  _, plan = no_flag_plan
  defaults = Settings()
  _, _, _, calibration, evaluation = select_items(defaults)
  assert plan["task"] == defaults.task and plan["methods"] == list(defaults.methods)
  assert plan["num_items"] == len(evaluation) and plan["transition_items"] == len(calibration)
  assert plan["calibration_items"] == defaults.calibration_items
  assert plan["workload"]["format"] == defaults.format
  encoded = tasks.encode(load_tokenizer(BUNDLED_MODEL), evaluation,
                         [tasks.prompt(item) for item in evaluation])
  widest = max(b.input_ids.shape[1] for b in tasks.batches(encoded, 16))
  assert plan["workload"]["tokens"] == widest and plan["items_measured_by"] == \
      "the model's tokenizer"
  with open(os.path.join(DEFAULT_RUN, "results.json")) as f:
    timings = json.load(f)["timings"]
  measured = sum(timings[k] for k in ("prepare_seconds", "full_profile_seconds",
                                      "methods_seconds"))
  assert 0.5 <= plan["predicted_study_seconds"] / measured <= 2.0, (
      plan["predicted_study_seconds"], measured)
  # Each program compiled once: the first chunking tried fits.
  assert plan["compilations"] == len(planner.fit.PROGRAMS) and plan["chosen"]["tried"] == []


def test_dpjax_plan_on_the_local_devices_fits_the_bundled_model(no_flag_plan):
  output, plan = no_flag_plan
  assert f"predicted time of the whole study on {plan['num_items']} items" in output
  assert plan["fits"] and plan["target"] == "local" and plan["num_layers"] == 16
  assert set(plan["programs"]) == set(planner.fit.PROGRAMS)
  for name, p in plan["programs"].items():
    m = p["memory"]
    assert abs(m["peak_gb"] - (m["arguments_gb"] + m["outputs_gb"] + m["temporaries_gb"])) < 1e-9
    assert m["arguments_gb"] > 0 and p["fits"]
  # The parts' flops: one block of 16 rows is at least its matmuls' work.
  block = plan["parts"]["block"]["flops"]
  d, f, rows, t = 64, 256, plan["chosen"]["rows_per_shard"], plan["workload"]["tokens"]
  assert block >= 2 * rows * t * (d * (64 + 2 * 32) + 64 * d + 3 * d * f)
  assert plan["predicted_study_hours"] > 0 and plan["time_from"] == "measured"


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


def test_the_schedule_counts_the_block_evaluations_of_the_committed_default_run():
  """At the committed default run's chunking and l*, the schedule of `dpjax`'s default
  study counts the block evaluations its engine executed (the run's counters), up to the
  accuracy criterion's early stop, which the schedule does not count."""
  from dpjax.bundled import DEFAULT_RUN
  from dpjax.study.settings import Settings
  with open(os.path.join(DEFAULT_RUN, "results.json")) as f:
    results = json.load(f)
  task, chosen = results["task"], results["engine"]["fit"]
  L, rows = results["model"]["num_layers"], chosen["rows_per_shard"]
  shape = planner.StudyShape.of(Settings(), L, task["num_items"],
                                task["num_calibration_items"], task["num_transition_items"],
                                batch=rows, candidates=chosen["candidates_per_call"],
                                in_flight=chosen["masks_in_flight"],
                                transition_block=results["calibration_transition_block"])
  work = planner.schedule(shape)
  counted = sum(w.block + w.last for w in work.values()) * rows
  # The run's counters are its evaluation and calibration sweeps': not the transition's
  # profile, nor the hidden states block influence reads (one unpruned pass each).
  unpruned_passes = shape.batches(shape.transition_items) + shape.batches(
      shape.calibration_items)
  counted -= unpruned_passes * L * rows
  executed = results["engine"]["block_evaluations_executed"]
  assert executed <= counted <= 1.02 * executed


def test_held_stderr_keeps_what_libraries_write_there_unless_the_block_fails(capfd):
  from dpjax.cli import plan as plan_cli
  with plan_cli.held_stderr():
    os.write(2, b"a plugin's probe\n")
  assert "probe" not in capfd.readouterr().err
  with pytest.raises(RuntimeError):
    with plan_cli.held_stderr():
      os.write(2, b"why it failed\n")
      raise RuntimeError("a library failed")
  assert "why it failed" in capfd.readouterr().err
