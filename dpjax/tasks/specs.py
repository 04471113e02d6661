"""Task specs as the command line names them: `synthetic`, `mmlu:DIR`, `arc:FILE`, ..."""

from __future__ import annotations

import os

from dpjax.tasks import readers, synthetic
from dpjax.tasks.schema import Item, TaskDataError


TASK_FORMATS = ("synthetic", "mmlu", "arc", "csqa", "openbookqa", "jsonl", "csv", "hub")


def load_task(spec: str, split: str, *, num_items: int = 0, seed: int = 0) -> list[Item]:
  """Items of `split` for a task spec.

  Specs: `synthetic`; `mmlu:DIR_OR_CSV` (original CSV layout); `arc:FILE`,
  `csqa:FILE`, `openbookqa:FILE` (JSONL, HF or original layout); `jsonl:FILE`,
  `csv:FILE` (generic, default column names); `hub:NAME[:CONFIG]` (through
  `datasets`). `num_items` > 0 keeps the first that many (the synthetic suite
  generates exactly that many; default 400).
  """
  kind, _, rest = spec.partition(":")
  if kind not in TASK_FORMATS:
    raise TaskDataError(f"task {spec!r}: unknown format {kind!r}; use one of {TASK_FORMATS} "
                        "(e.g. synthetic, mmlu:data/, arc:ARC-Challenge-Test.jsonl).")
  if kind == "synthetic":
    return synthetic.generate(split, num_items or 400, seed=seed)
  if not rest:
    raise TaskDataError(f"task {spec!r}: give a path (or hub name) after '{kind}:'.")
  if kind == "mmlu":
    items = readers.load_mmlu_csv(rest, split)
  elif kind in ("arc", "csqa", "openbookqa"):
    # ARC, CommonsenseQA and OpenBookQA prompts carry no subject header, as in lm-eval.
    items = readers.load_choices_jsonl(_split_file(rest, split), "")
  elif kind in ("jsonl", "csv"):
    items = readers.load_generic(_split_file(rest, split))
  else:
    name, _, config = rest.partition(":")
    items = readers.load_from_hub(name, config or None, split)
  return items[:num_items] if num_items else items


def _split_file(path: str, split: str) -> str:
  """A file as given, or, for a directory, the one file whose name holds `split`."""
  if not os.path.isdir(path):
    if not os.path.isfile(path):
      raise TaskDataError(f"task file {path} does not exist.")
    return path
  matches = sorted(f for f in os.listdir(path) if split.lower() in f.lower()
                   and f.endswith((".jsonl", ".json", ".csv")))
  if len(matches) != 1:
    raise TaskDataError(f"{path}: expected one file for split {split!r}, found {matches}; "
                        "pass the file itself.")
  return os.path.join(path, matches[0])
