"""The answer formats on a real model: what each reads, and what the cloze packing saves.

    python -m benchmarks.formats [--items=500] [--out=benchmarks/results/formats.json]
    python -m benchmarks.formats --model=bundled --items=8     # a smoke run (seconds)

On SmolLM2-135M-Instruct (`tests.support.real_models`) and ARC-Easy validation
(`dpjax-data`):

1. Letter against cloze: final accuracy, chance, the transition block and its
   sharpness, for 0-shot items (and 5-shot letter items).
2. The cost of the cloze format against K full prompts: the same items read
   once with each item packed (its context once, then the K continuations)
   and once as K separate sequences (every option's full prompt): block-rows
   (tokens x blocks, padding included) and seconds of the full-model readout,
   compilation excluded.
3. The time of the full-model profile (every layer, every item) per format on
   `--items` items (NQ-open for the open format).

`--model=bundled`: the bundled model on the synthetic suite instead (its open format
asks each item's question with the correct option as the gold answer): offline. dpjax
alone (no torch needed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

from absl import app
from absl import flags

from benchmarks import common

FLAGS = flags.FlagValues()  # this program's own flags (see common.run_program)

_MODEL = flags.DEFINE_enum("model", "smollm2", list(common.MODELS), "The model measured: "
                           "SmolLM2-135M on ARC-Easy and NQ-open, or the bundled model on "
                           "synthetic items.", flag_values=FLAGS)
_ITEMS = flags.DEFINE_integer("items", 500, "Items per format in the timing (ARC-Easy has 570).",
                              flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results",
                                               "formats.json"), "Where the figures go.",
                           flag_values=FLAGS)


def _profile(model, encoded, lens, batch_size=16):
  """(accuracy, chance, transition, sharpness, seconds warm, block-rows) of one readout."""
  import jax
  from dpjax import tasks
  from dpjax.study import metrics
  from dpjax.lens.readout import DecisionReader
  reader = DecisionReader(model, lens=lens)
  prepared = tasks.batches(encoded, batch_size)
  reader.run(encoded, prepared=prepared[:1], progress=False)  # compile the first shape
  start = time.perf_counter()
  out = reader.run(encoded, prepared=prepared, progress=False)
  jax.block_until_ready(out.option_logits)
  seconds = time.perf_counter() - start
  prof = metrics.profile(out.option_logits[0], out.log_normalizer[0], encoded.answer,
                         encoded.num_options, option_logprob=None if out.option_logprob is None
                         else out.option_logprob[0],
                         chance=0.0 if encoded.format == "open" else None)
  l_star = int(prof.transition)
  rows = sum(b.input_ids.size for b in prepared) * model.num_layers
  return dict(accuracy=float(prof.accuracy[-1]), chance=float(prof.chance),
              transition_block=None if l_star < 0 else l_star,
              sharpness_rise=float(prof.sharpness.rise), sharpness_block=int(prof.sharpness.block),
              seconds=seconds, block_rows=int(rows), items=len(encoded.items))


def _open_items(items):
  """Multiple-choice items asked open-ended: the question, the correct option as the gold."""
  return [dataclasses.replace(item, options=(), answer=-1, golds=(item.options[item.answer],),
                              cloze_contexts=(f"Question: {item.question}\nAnswer:",))
          for item in items]


def main(argv):
  del argv
  import dpjax
  from dpjax import tasks
  from dpjax.lens.readout import Lens
  measured = common.measured(_MODEL.value)
  model = dpjax.load_model(measured.path)
  tokenizer = measured.tokenizer
  pool = measured.items(5 + _ITEMS.value)
  shots, items = pool[:5], pool[5:5 + _ITEMS.value]
  results = {"model": measured.label + ", float32", "task": measured.task, "items": len(items)}

  letter = tasks.encode(tokenizer, items, [tasks.prompt(item) for item in items])
  results["letter_0shot"] = _profile(model, letter, Lens("letter"))
  letter5 = tasks.encode(tokenizer, items, [tasks.prompt(item, shots) for item in items])
  results["letter_5shot"] = _profile(model, letter5, Lens("letter"))
  requests = [tasks.cloze_requests(item) for item in items]
  cloze = tasks.encode_cloze(tokenizer, items, requests)
  for norm in ("none", "bytes"):
    results[f"cloze_{norm}"] = _profile(model, cloze, Lens("cloze", norm))
  # The same requests as K separate sequences: one single-option "item" per option.
  singles, single_requests = [], []
  for item, reqs in zip(items, requests):
    for k, request in enumerate(reqs):
      singles.append(dataclasses.replace(item, id=f"{item.id}/{k}", options=(item.options[k],),
                                         answer=0))
      single_requests.append([request])
  separate = tasks.encode_cloze(tokenizer, singles, single_requests)
  results["cloze_as_k_full_prompts"] = _profile(model, separate, Lens("cloze"))
  packed, full = results["cloze_none"], results["cloze_as_k_full_prompts"]
  results["cloze_saving"] = dict(block_rows_ratio=full["block_rows"] / packed["block_rows"],
                                 seconds_ratio=full["seconds"] / packed["seconds"])
  if measured.key == "bundled":
    open_items, key = _open_items(items), "open_synthetic"
  else:
    from dpjax.tasks.benchmarks import default_data_dir
    from dpjax.tasks.fetch import fetch_benchmarks
    fetch_benchmarks(default_data_dir(), ["nq_open"])
    open_items = tasks.load_task("nq_open", "validation",
                                 data_dir=default_data_dir())[:_ITEMS.value]
    key = "open_nq_open"
  open_encoded = tasks.encode_open(tokenizer, open_items,
                                   [tasks.open_prompt(item) for item in open_items])
  results[key] = _profile(model, open_encoded, Lens("open"))
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  from dpjax.fileio import write_json
  from dpjax.study.results import to_plain
  write_json(_OUT.value, to_plain(results))
  print(json.dumps(results, indent=2))


if __name__ == "__main__":
  common.run_program(main, FLAGS)
