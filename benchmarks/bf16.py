"""bfloat16 against float32 compute on a real model: speed and agreement.

    python -m benchmarks.bf16            # SmolLM2-135M, ARC-Easy cloze, 64 items, 4 steps
    python -m benchmarks.bf16 --model=bundled --items=8 --steps=1 --repeats=1  # smoke run

The same GGUF loaded twice: float32 weights and activations (the default, at
HIGHEST matmul precision) and bfloat16 weights and activations
(`--dtype=bfloat16`, as a study would run on an accelerator). On the first
`--items` ARC-Easy validation items in the cloze format:

* the unpruned model's per-layer readout: its time (median of `--repeats` after
  a warm-up), the largest per-item Decision Margin difference at any layer
  under both normalizations, the largest difference of the per-layer mean DM,
  the final accuracy and the share of items whose top option agrees, and the
  transition block l* of each;
* the first `--steps` steps of Iterative Pruning (accuracy criterion) on the
  same items: the removal order of each, whether they agree, and the time.

`--model=bundled` measures the bundled model on synthetic items instead. dpjax alone (no
torch needed). Writes `benchmarks/results/bf16.json` after every measurement.
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
import numpy as np

from benchmarks import common

FLAGS = flags.FlagValues()  # this program's own flags (see common.run_program)

_MODEL = flags.DEFINE_enum("model", "smollm2", list(common.MODELS), "The model measured: "
                           "SmolLM2-135M on ARC-Easy, or the bundled model on synthetic items.",
                           flag_values=FLAGS)
_ITEMS = flags.DEFINE_integer("items", 64, "ARC-Easy validation items.", flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("steps", 4, "Iterative Pruning steps in each dtype.",
                              flag_values=FLAGS)
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed repeats of the unpruned readout.",
                                flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results", "bf16.json"), "Output file.",
                           flag_values=FLAGS)

DTYPES = ("float32", "bfloat16")


def main(argv):
  del argv
  import jax

  import dpjax
  from benchmarks.common import machine
  from dpjax import tasks
  from dpjax.study import metrics
  from dpjax.study import pruning
  from dpjax.fileio import atomic_write_text
  from dpjax.engine.sweep import Sweep

  measured = common.measured(_MODEL.value)
  path = measured.path
  items = measured.items(_ITEMS.value)
  encoded = tasks.encode_cloze(measured.tokenizer, items,
                               [tasks.cloze_requests(i) for i in items])
  out = {"model": measured.label, "task": f"{measured.task}, cloze",
         "items": len(items), "machine": machine(), "jax": jax.__version__}

  def save():
    os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
    atomic_write_text(_OUT.value, json.dumps(out, indent=2) + "\n")

  sweeps, profiles = {}, {}
  for dtype in DTYPES:
    model = dpjax.load_model(path, dtype=dtype)
    sweeps[dtype] = sweep = Sweep(model, encoded, batch_size=16)
    L = model.num_layers
    unpruned = np.ones((1, L), bool)
    readout = sweep.readouts(unpruned)  # warm-up (compiles)
    times = []
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      readout = jax.block_until_ready(sweep.readouts(unpruned))
      times.append(time.perf_counter() - start)
    profiles[dtype] = jax.device_get(metrics.profile_jit(
        readout.option_logits, readout.log_normalizer, encoded.answer, encoded.num_options,
        normalization="options", option_logprob=readout.option_logprob))
    out[f"readout_seconds_{dtype}"] = float(np.median(times))
    print(f"{dtype}: unpruned per-layer readout {np.median(times):.2f} s", flush=True)
  a, b = profiles["float32"], profiles["bfloat16"]
  for norm in metrics.NORMALIZATIONS:
    out[f"max_item_dm_difference_{norm}"] = float(np.nanmax(np.abs(a.margin[norm] - b.margin[norm])))
    out[f"max_mean_dm_difference_{norm}"] = float(np.nanmax(np.abs(
        a.margin_summary[norm].mean - b.margin_summary[norm].mean)))
    out[f"mean_dm_final_{norm}"] = {d: float(p.margin_summary[norm].mean[0, -1])
                                    for d, p in profiles.items()}
  out["final_accuracy"] = {d: float(p.accuracy[0, -1]) for d, p in profiles.items()}
  out["top_option_agreement_final"] = float(np.mean(a.top[0, -1] == b.top[0, -1]))
  out["top_option_agreement_all_layers"] = float(np.mean(a.top[0] == b.top[0]))
  out["transition_block_options"] = {d: int(p.transition[0]) for d, p in profiles.items()}
  out["readout_speed_ratio_bf16_over_f32"] = (out["readout_seconds_float32"]
                                              / out["readout_seconds_bfloat16"])
  save()

  orders = {}
  for dtype, sweep in sweeps.items():
    steps = []
    start = time.perf_counter()
    order = pruning.iterative_prune(
        sweep, min_layers=sweep.num_layers - _STEPS.value,
        on_step=lambda block, kept, stats: steps.append(stats.correct))
    out[f"iterative_seconds_{dtype}"] = time.perf_counter() - start
    orders[dtype] = [b + 1 for b in order]
    out[f"iterative_correct_{dtype}"] = [int(c) for c in steps]
    print(f"{dtype}: Iterative Pruning removes {orders[dtype]} "
          f"({out[f'iterative_seconds_{dtype}']:.1f} s)", flush=True)
    out["iterative_removed_order"] = orders
    save()
  out["iterative_orders_agree"] = orders["float32"] == orders["bfloat16"]
  out["iterative_speed_ratio_bf16_over_f32"] = (out["iterative_seconds_float32"]
                                                / out["iterative_seconds_bfloat16"])
  save()
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  common.run_program(main, FLAGS)
