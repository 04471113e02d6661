"""An Iterative Pruning step against the HF reference, in interleaved rounds, on an idle and
on a busy machine.

    python -m benchmarks.interleaved                     # SmolLM2, 32 ARC-Easy items, 4 rounds
    python -m benchmarks.interleaved --loads=0,1 --threads=default,per_core
    python -m benchmarks.interleaved --model=bundled --rounds=1 --items=4 --loads=0 \
        --threads=default                              # a smoke run (synthetic items)

SmolLM2-135M (`tests.support.real_models`), the first ARC-Easy validation items in the
letter format, batches of 16. One round times one Iterative Pruning step (every block's
drop-one candidate) through `Sweep` and the same step through
`tests.support.reference.HFIterativeReference`, in alternating order (ABBA), both compiled
or warmed up first; both pick the same block (checked). Each configuration runs in a
fresh process:

* `--loads`: busy processes started beside it, one spinning core each, for the whole
  run (a machine another job shares);
* `--threads`: how XLA runs on the CPU. `default`: one device, XLA's intra-op thread
  pool splits each op over the cores. `per_core`: as many CPU devices as cores, each
  running its share of the items on one thread (`--xla_cpu_multi_thread_eigen=false`),
  items along the data axis, so no op waits for a thread another job holds up.

Reported per configuration: each round's times, the ratio reference / dpjax per round,
and their median, minimum and maximum (never one pair of runs). It needs torch (the
reference is every round's other half). Writes `benchmarks/results/interleaved.json`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from absl import app
from absl import flags

from benchmarks import common

FLAGS = flags.FlagValues()  # this program's own flags (see common.run_program)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

_MODEL = flags.DEFINE_enum("model", "smollm2", list(common.MODELS), "The model measured: "
                           "SmolLM2-135M on ARC-Easy, or the bundled model on synthetic items.",
                           flag_values=FLAGS)
_ROUNDS = flags.DEFINE_integer("rounds", 4, "Interleaved rounds per configuration.",
                               flag_values=FLAGS)
_ITEMS = flags.DEFINE_integer("items", 32, "ARC-Easy validation items (the first ones).",
                              flag_values=FLAGS)
_LOADS = flags.DEFINE_list("loads", ["0", "1"], "Busy processes beside the run.", flag_values=FLAGS)
_THREADS = flags.DEFINE_list("threads", ["default", "per_core"], "XLA CPU threading.",
                             flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", os.path.join(HERE, "results", "interleaved.json"), "Output.",
                           flag_values=FLAGS)
_ONE = flags.DEFINE_string("one", "", "Internal: run one configuration (JSON) and print it.",
                           flag_values=FLAGS)

# XLA's CPU settings of each threading choice (environment of the measured process).
THREADING = {
    "default": {},
    "per_core": {"XLA_FLAGS": f"--xla_force_host_platform_device_count={os.cpu_count()} "
                              "--xla_cpu_multi_thread_eigen=false"},
}


def _setup(key: str, items: int):
  from dpjax import tasks
  measured = common.measured(key)
  chosen = measured.items(items)
  encoded = tasks.encode(measured.tokenizer, chosen, [tasks.prompt(item) for item in chosen])
  return measured, encoded


def measure_one(rounds: int, items: int, key: str = "smollm2") -> dict[str, Any]:
  """The rounds of one configuration, in this process."""
  import jax
  import numpy as np
  import torch
  import dpjax
  from tests.support.reference import HFIterativeReference
  from dpjax.study import pruning
  from dpjax.engine.devices import Placement
  from dpjax.engine.sweep import Sweep
  measured, encoded = _setup(key, items)
  tokenizer = measured.tokenizer
  placement = Placement.create() if len(jax.devices()) > 1 else None
  model = dpjax.load_model(measured.path, dtype="float32", placement=placement)
  L = model.num_layers
  sweep = Sweep(model, encoded, batch_size=16, pad_id=tokenizer.pad_token_id or 0,
                progress=False, placement=placement)
  reference = HFIterativeReference(measured.hf(), sweep.batches)

  def dpjax_step():
    stats = sweep.drop_one(list(range(L)), stop_early=True)
    return pruning.choose(stats, "accuracy")

  def reference_step():
    return reference.iterative_prune(L, min_layers=L - 1)[0]["choice"]

  first = dpjax_step()  # compiles
  times = {"dpjax": [], "reference": []}
  picks = set()
  for r in range(rounds):
    order = ("dpjax", "reference") if r % 2 == 0 else ("reference", "dpjax")
    for who in order:
      start = time.perf_counter()
      pick = dpjax_step() if who == "dpjax" else reference_step()
      times[who].append(time.perf_counter() - start)
      picks.add(int(pick))
  ratios = [h / d for h, d in zip(times["reference"], times["dpjax"])]
  return {"model": measured.label, "task": measured.task,
          "devices": len(jax.devices()), "torch_threads": torch.get_num_threads(),
          "items": items, "rounds": rounds, "times": times, "ratios": ratios,
          "ratio_median": float(np.median(ratios)), "ratio_min": float(min(ratios)),
          "ratio_max": float(max(ratios)), "picks": sorted(picks), "first_pick": int(first),
          "same_pick": len(picks) == 1}


def run_configuration(threads: str, load: int, rounds: int, items: int,
                      key: str = "smollm2") -> dict[str, Any]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", **THREADING[threads])
  spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
              for _ in range(load)]
  try:
    result = subprocess.run([sys.executable, "-m", "benchmarks.interleaved",
                             f"--one={json.dumps([rounds, items, key])}"],
                            capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=6 * 3600)
  finally:
    for p in spinners:
      p.kill()
  if result.returncode != 0:
    raise RuntimeError(result.stderr[-3000:])
  out = json.loads(result.stdout.strip().splitlines()[-1])
  out.update(threads=threads, load=load)
  return out


def main(argv):
  del argv
  if _ONE.value:
    print(json.dumps(measure_one(*json.loads(_ONE.value))))
    return
  if not common.has_torch():
    raise SystemExit("benchmarks.interleaved times dpjax against the HF-PyTorch reference round "
                     "by round, and torch is not installed: pip install torch")
  from benchmarks.common import machine
  from dpjax import fileio
  results = {"machine": machine(), "configurations": []}
  for threads in _THREADS.value:
    for load in map(int, _LOADS.value):
      started = time.perf_counter()
      row = run_configuration(threads, load, _ROUNDS.value, _ITEMS.value, _MODEL.value)
      row["wall_seconds"] = time.perf_counter() - started
      results["configurations"].append(row)
      fileio.write_json(_OUT.value, results)
      print(f"threads={threads} load={load}: reference/dpjax median {row['ratio_median']:.2f} "
            f"(range {row['ratio_min']:.2f}-{row['ratio_max']:.2f}); dpjax "
            f"{min(row['times']['dpjax']):.1f}-{max(row['times']['dpjax']):.1f} s, reference "
            f"{min(row['times']['reference']):.1f}-{max(row['times']['reference']):.1f} s",
            flush=True)


if __name__ == "__main__":
  common.run_program(main, FLAGS)
