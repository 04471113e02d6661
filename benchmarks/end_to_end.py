"""Iterative Pruning to the end, compilation included, against the HF-PyTorch reference.

    python -m benchmarks.end_to_end                  # the bundled model, 128 synthetic items
    python -m benchmarks.end_to_end --model=smollm2  # SmolLM2-135M, 64 ARC-Easy items

What a user sees is the time with compilation: this runs `benchmarks.run`'s
measurement 1 on one model alone, in a fresh process with the persistent
compilation cache off, so dpjax's first run compiles every program it needs.
dpjax runs first (cold, then compiled; for SmolLM2 cold only, its compiled time
taken as the cold time less the compile time), then the reference, which evaluates
every candidate itself and walks dpjax's sequence: at every step its own pick
must be dpjax's (or tie with it to float32 rounding) with the same accuracy and
Decision Margin, checked as it goes, before a time is reported.

`--model=smollm2`: SmolLM2-135M-Instruct (`tests.support.real_models`, 30 blocks)
on the 64 calibration items a study of ARC-Easy searches on (`--task=arc_easy`,
seed 0) in the letter format, 0-shot: the reference reads the letter after the
prompt, as the study's letter format does. (In the cloze format the reference
would score each option's whole prompt, lm-eval's way, against dpjax's packed
items: a larger ratio, and a reference several times slower.)

`--min_layers` stops the run earlier (a smoke run: `--items=16 --min_layers=15`, one
step). Without torch, dpjax's side alone (no reference, no ratio).

Writes (merges its case into) `benchmarks/results/end_to_end.json`, which
`python -m benchmarks.run --report_only` adds to RESULTS.md.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags

from benchmarks import common
from dpjax.checkpoints import gguf

FLAGS = flags.FlagValues()  # this program's own flags (see common.run_program)

_MODEL = flags.DEFINE_enum("model", "bundled", ["bundled", "smollm2"], "The model measured.",
                           flag_values=FLAGS)
_ITEMS = flags.DEFINE_integer("items", 0, "Items (batches of 16; 0: 128 synthetic items for "
                              "the bundled model, 64 calibration items for SmolLM2).",
                              flag_values=FLAGS)
_MIN_LAYERS = flags.DEFINE_integer("min_layers", 1, "Prune down to this many blocks (1: to the "
                                   "end).", flag_values=FLAGS)
_NOTE = flags.DEFINE_string("note", "", "What else ran on the machine, for the report.",
                            flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results", "end_to_end.json"), "Output file.",
                           flag_values=FLAGS)


# The goals: the ratio with compilation each case must reach.
GOALS = {"bundled": 2.0, "smollm2": 6.0}


def _case(key: str, items: int, min_layers: int = 1):
  import transformers

  from benchmarks import run
  if key == "bundled":
    from dpjax.bundled import BUNDLED_MODEL
    return run.Case("bundled model", BUNDLED_MODEL,
                    transformers.AutoTokenizer.from_pretrained(BUNDLED_MODEL),
                    num_items=items or 128, batch_size=16, min_layers=min_layers, hf_repeats=1,
                    dpjax_repeats=1)
  from tests.support import real_models
  from dpjax.study import run as study
  from dpjax.study.settings import Settings
  path = real_models.fetch(key)
  # The study's own item split and encoding (its model load is not timed).
  ctx = study.prepare(Settings(model=path, task="arc_easy", format="letter",
                               calibration_items=items or 64, num_items=1, progress=False))
  name = real_models.MODELS[key].filename.split(".")[0]
  return run.Case(f"{name}, ARC-Easy letter 0-shot",
                  os.path.dirname(path), ctx.tokenizer, num_items=len(ctx.calibration.items),
                  batch_size=16, min_layers=min_layers, hf_repeats=1, dpjax_repeats=0,
                  dpjax_path=path, hf_kwargs=gguf.transformers_dense_kwargs(path),
                  encoded=ctx.calibration)


def main(argv):
  del argv
  from benchmarks import run
  from benchmarks.common import machine
  from dpjax.fileio import atomic_write_text

  case = _case(_MODEL.value, _ITEMS.value, _MIN_LAYERS.value)
  result = dict(run.iterative(case), goal=GOALS[_MODEL.value], model_key=_MODEL.value)
  out = {"machine": machine(), "note": _NOTE.value, "cases": []}
  if os.path.exists(_OUT.value):  # other models' cases are kept
    with open(_OUT.value) as f:
      out = json.load(f)
    out["machine"] = machine()
    if _NOTE.value:
      out["note"] = _NOTE.value
  out["cases"] = [c for c in out["cases"] if c["case"] != case.name] + [result]
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  atomic_write_text(_OUT.value, json.dumps(out, indent=2))
  reference = ("no reference (torch is not installed)" if result["hf_seconds"] is None else
               f"reference {result['hf_seconds']:.1f} s: "
               f"{result['speedup_with_compilation']:.2f}x with compilation")
  print(f"{case.name}: dpjax {result['dpjax_seconds_with_compilation']:.1f} s with compilation "
        f"({result['compiled_programs']} programs, {result['compile_seconds']:.1f} s compiling), "
        f"{result['dpjax_seconds']:.1f} s compiled; {reference}; wrote {_OUT.value}")


if __name__ == "__main__":
  common.run_program(main, FLAGS)
