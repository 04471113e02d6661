"""What resuming every mask from the unpruned model's stream saves, on a real model.

    python -m benchmarks.resume            # SmolLM2-135M, ARC-Easy cloze, 16 items
    python -m benchmarks.resume --model=bundled --items=4   # a smoke run (seconds)

`Sweep.readouts` computes the unpruned model's stream once per item batch and lets
each mask run only its kept blocks after its first removed one (per layer, the
layers before it are read once for all masks). This measures it against a fresh
forward per mask (`resume=False`) on the mask sets a study evaluates: the reverse
order's curve, a random order's curve and the phase experiment's arms (adjacent rule, k = 1, 2, 4, around a transition at 3/4 of the
depth), final readouts only and per layer. The two must agree (largest difference
checked before any time is reported); the block evaluations come from the engine's
counters, the times are the median of `--repeats` after a warm-up. `--model=bundled`
measures the bundled model on synthetic items instead. dpjax alone (no torch needed).
Writes `benchmarks/results/resume.json`.
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
_ITEMS = flags.DEFINE_integer("items", 16, "ARC-Easy validation items (one batch of 16).",
                              flag_values=FLAGS)
_REPEATS = flags.DEFINE_integer("repeats", 1, "Timed repeats of each measurement.",
                                flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results", "resume.json"), "Output file.",
                           flag_values=FLAGS)


def mask_sets(num_layers: int) -> dict[str, np.ndarray]:
  """The mask sets a study evaluates, for a model of `num_layers` blocks."""
  from dpjax.study import pruning
  L = num_layers
  l_star = (3 * L) // 4  # 1-based: the Decisive Phase is blocks l_star..L
  phase = []
  for k in (1, 2, 4):
    for removed in (range(l_star - 1 - k, l_star - 1), range(l_star - 1, l_star - 1 + k)):
      mask = np.ones(L, bool)
      mask[list(removed)] = False
      phase.append(mask)
  return {
      "reverse-order curve": pruning.masks_from_ranking(pruning.reverse_ranking(L), L),
      "random-order curve": pruning.masks_from_ranking(pruning.random_ranking(L, 0), L),
      "phase arms (adjacent; k = 1, 2, 4)": np.array(phase),
  }


def main(argv):
  del argv
  import jax

  import dpjax
  from benchmarks.common import machine
  from dpjax import tasks
  from dpjax.fileio import atomic_write_text
  from dpjax.engine.sweep import Sweep

  measured = common.measured(_MODEL.value)
  model = dpjax.load_model(measured.path)
  items = measured.items(_ITEMS.value)
  encoded = tasks.encode_cloze(measured.tokenizer, items,
                               [tasks.cloze_requests(i) for i in items])
  out = {"model": measured.label, "task": f"{measured.task}, cloze",
         "items": len(items), "machine": machine(), "rows": []}
  for name, masks in mask_sets(model.num_layers).items():
    for final_only in (True, False):
      sweeps = {resume: Sweep(model, encoded, batch_size=16) for resume in (False, True)}
      run = lambda resume: sweeps[resume].readouts(masks, final_only=final_only, resume=resume)
      results = {resume: run(resume) for resume in (False, True)}  # warm-up, and the check
      worst = 0.0
      for a, b in zip(results[True], results[False]):
        if b is None:
          continue
        if not np.array_equal(np.isnan(a), np.isnan(b)):
          raise SystemExit(f"{name}: the layers read differ.")
        worst = max(worst, float(np.nanmax(np.abs(np.where(np.isinf(b), 0, a - b)))))
      if worst > 1e-4:
        raise SystemExit(f"{name}: readouts differ by {worst}.")
      blocks = {resume: s.counters.minimum for resume, s in sweeps.items()}
      times = {False: [], True: []}
      for _ in range(_REPEATS.value):
        for resume in (False, True):
          start = time.perf_counter()
          jax.block_until_ready(run(resume))
          times[resume].append(time.perf_counter() - start)
      row = {"masks": name, "count": len(masks), "readout": "final" if final_only else "per layer",
             "fresh_s": float(np.median(times[False])), "resumed_s": float(np.median(times[True])),
             "fresh_block_rows": int(blocks[False]), "resumed_block_rows": int(blocks[True]),
             "max_difference": worst}
      row["speedup"] = row["fresh_s"] / row["resumed_s"]
      out["rows"].append(row)
      print(f"{name} ({row['readout']}): {row['fresh_s']:.2f} s -> {row['resumed_s']:.2f} s "
            f"({row['speedup']:.2f}x; block evaluations {blocks[False]} -> {blocks[True]}; "
            f"largest difference {worst:.1e})", flush=True)
      # After every measurement, so a run that is stopped keeps what it has.
      os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
      atomic_write_text(_OUT.value, json.dumps(out, indent=2))


if __name__ == "__main__":
  common.run_program(main, FLAGS)
