"""Iterative Pruning to the end, compilation included, against the HF-PyTorch reference.

    python -m benchmarks.end_to_end      # the bundled model, 128 synthetic items

What a user sees is the time with compilation: this runs `benchmarks.run`'s
measurement 1 on the bundled model alone, in a fresh process with the persistent
compilation cache off, so dpjax's first run compiles every program it needs.
dpjax runs first (cold, then compiled), then the reference; both must remove the
same blocks with the same accuracy and Decision Margin at every step before a
time is reported. Writes `benchmarks/results/end_to_end.json`, which
`python -m benchmarks.run --report_only` adds to RESULTS.md.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags

_ITEMS = flags.DEFINE_integer("items", 128, "Synthetic suite items (batches of 16).")
_NOTE = flags.DEFINE_string("note", "", "What else ran on the machine, for the report.")
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results", "end_to_end.json"), "Output file.")


def main(argv):
  del argv
  import transformers

  from benchmarks import run
  from benchmarks.common import machine
  from dpjax.bundled import BUNDLED_MODEL
  from dpjax.fileio import atomic_write_text

  case = run.Case("bundled model", BUNDLED_MODEL,
                  transformers.AutoTokenizer.from_pretrained(BUNDLED_MODEL),
                  num_items=_ITEMS.value, batch_size=16, min_layers=1, hf_repeats=1,
                  dpjax_repeats=1)
  result = run.iterative(case)
  out = {"machine": machine(), "note": _NOTE.value, "cases": [result]}
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  atomic_write_text(_OUT.value, json.dumps(out, indent=2))
  print(f"{case.name}: dpjax {result['dpjax_seconds_with_compilation']:.1f} s with compilation "
        f"({result['compiled_programs']} programs, {result['compile_seconds']:.1f} s compiling), "
        f"{result['dpjax_seconds']:.1f} s compiled; reference {result['hf_seconds']:.1f} s: "
        f"{result['speedup_with_compilation']:.2f}x with compilation; wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
