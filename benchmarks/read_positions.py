"""What running the last block only at the read positions saves, on a real model.

    python -m benchmarks.read_positions            # SmolLM2-135M, ARC-Easy, 32 items
    python -m benchmarks.read_positions --model=bundled --items=8 --repeats=1  # smoke run

The first step of Iterative Pruning (every drop-one candidate of the whole
model, prefix-shared) and a one-shot curve's final readouts (every removal
count of the reverse order), with the last block's attention output and MLP
at every position (`last_at_reads=False`) and at the read positions only
(`True`), in the letter and cloze formats. The two must give the same
statistics (checked before any time is reported); the times are the median of
`--repeats` after a warm-up, interleaved. `--model=bundled` measures the bundled model
on synthetic items instead. dpjax alone (no torch needed). Writes
`benchmarks/results/read_positions.json`.
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
_ITEMS = flags.DEFINE_integer("items", 32, "ARC-Easy validation items.", flag_values=FLAGS)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats of each measurement.",
                                flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results", "read_positions.json"), "Output file.",
                           flag_values=FLAGS)


def main(argv):
  del argv
  import jax

  import dpjax
  from benchmarks.common import machine
  from dpjax import tasks
  from dpjax.study import pruning
  from dpjax.fileio import atomic_write_text
  from dpjax.engine.sweep import Sweep

  measured = common.measured(_MODEL.value)
  model = dpjax.load_model(measured.path)
  tokenizer = measured.tokenizer
  items = measured.items(_ITEMS.value)
  encoded = {
      "letter": tasks.encode(tokenizer, items, [tasks.prompt(i) for i in items]),
      "cloze": tasks.encode_cloze(tokenizer, items, [tasks.cloze_requests(i) for i in items]),
  }
  L = model.num_layers
  reverse = pruning.masks_from_ranking(pruning.reverse_ranking(L), L)
  out = {"model": measured.label, "task": measured.task, "items": len(items),
         "machine": machine(), "rows": []}
  for fmt, enc in encoded.items():
    sweeps = {at: Sweep(model, enc, batch_size=16, last_at_reads=at) for at in (False, True)}
    work = {
        "drop-one, all blocks": lambda s: s.drop_one(list(range(L))),
        "reverse-order curve, final readouts": lambda s: s.readouts(reverse, final_only=True),
    }
    for name, fn in work.items():
      results = {at: fn(s) for at, s in sweeps.items()}  # warm-up, and the check
      if name.startswith("drop-one"):
        for block, stats in results[False].items():
          if results[True][block].correct != stats.correct:
            raise SystemExit(f"{fmt}, {name}: block {block} differs.")
      else:
        a, b = results[True].option_logits, results[False].option_logits
        worst = float(np.nanmax(np.abs(a - b)))
        if worst > 1e-4:
          raise SystemExit(f"{fmt}, {name}: readouts differ by {worst}.")
      times = {False: [], True: []}
      for _ in range(_REPEATS.value):
        for at, s in sweeps.items():
          start = time.perf_counter()
          jax.block_until_ready(fn(s))
          times[at].append(time.perf_counter() - start)
      row = {"format": fmt, "work": name,
             "tokens": int(np.mean([b.input_ids.shape[1] for b in sweeps[True].batches])),
             "every_position_s": float(np.median(times[False])),
             "read_positions_s": float(np.median(times[True]))}
      row["speedup"] = row["every_position_s"] / row["read_positions_s"]
      out["rows"].append(row)
      print(f"{fmt} / {name}: {row['every_position_s']:.2f} s -> {row['read_positions_s']:.2f} s "
            f"({row['speedup']:.2f}x)", flush=True)
      # After every measurement, so a run that is stopped keeps what it has.
      os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
      atomic_write_text(_OUT.value, json.dumps(out, indent=2))


if __name__ == "__main__":
  common.run_program(main, FLAGS)
