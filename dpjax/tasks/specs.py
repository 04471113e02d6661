"""Task specs as the command line names them: `arc_easy`, `synthetic`, `disk:DIR`, `mmlu:DIR`, ...

`resolve_task(spec)` says which splits a task has by default and which answer
formats it supports; `load_task(spec, split)` reads its items.
"""

from __future__ import annotations

import dataclasses
import os

from dpjax.tasks import benchmarks, disk, readers, synthetic
from dpjax.tasks.schema import Item, TaskDataError

TASK_FORMATS = ("synthetic", "mmlu", "arc", "csqa", "openbookqa", "jsonl", "csv", "hub", "disk")
MULTIPLE_CHOICE_FORMATS = ("letter", "cloze")


@dataclasses.dataclass(frozen=True)
class TaskInfo:
  """What a task spec offers: its default split, where its shots come from (None: the
  evaluated split itself) and the answer formats it supports."""
  split: str
  fewshot_split: str | None
  formats: tuple[str, ...]


def resolve_task(spec: str) -> TaskInfo:
  """The defaults of a task spec (refusing an unknown one with what is known)."""
  if spec in benchmarks.BENCHMARKS:
    bench = benchmarks.BENCHMARKS[spec]
    return TaskInfo(bench.default_split, bench.fewshot_split, bench.formats)
  kind = spec.partition(":")[0]
  if kind not in TASK_FORMATS:
    raise TaskDataError(
        f"task {spec!r}: unknown task or format {kind!r}; use a benchmark name "
        f"({', '.join(benchmarks.BENCHMARKS)}) or one of {TASK_FORMATS} (e.g. synthetic, "
        "mmlu:data/, arc:ARC-Challenge-Test.jsonl, disk:DIR).")
  if kind == "synthetic":
    return TaskInfo("test", "dev", MULTIPLE_CHOICE_FORMATS)
  if kind == "mmlu":
    return TaskInfo("test", "dev", MULTIPLE_CHOICE_FORMATS)
  return TaskInfo("test", None if kind == "disk" else "dev", MULTIPLE_CHOICE_FORMATS)


def load_task(spec: str, split: str, *, num_items: int = 0, seed: int = 0,
              data_dir: str = "") -> list[Item]:
  """Items of `split` for a task spec.

  Specs: a benchmark name (`arc_easy`, `mmlu`, `nq_open`, ...; see
  `dpjax.tasks.benchmarks`, read from `data_dir`); `synthetic`;
  `mmlu:DIR_OR_CSV` (original CSV layout); `arc:FILE`, `csqa:FILE`,
  `openbookqa:FILE` (JSONL, HF or original layout); `jsonl:FILE`, `csv:FILE`
  (generic, default column names); `disk:DIR` (an HF `save_to_disk`
  directory with the generic column names, DIR/SPLIT or DIR itself);
  `hub:NAME[:CONFIG]` (through `datasets`). `num_items` > 0 keeps the first
  that many (the synthetic suite generates exactly that many; default 400).
  """
  info = resolve_task(spec)
  split = split or info.split
  if spec in benchmarks.BENCHMARKS:
    items = benchmarks.load_benchmark(spec, split, data_dir or None)
    return items[:num_items] if num_items else items
  kind, _, rest = spec.partition(":")
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
  elif kind == "disk":
    directory = os.path.join(rest, split) if disk.is_dataset_dir(os.path.join(rest, split)) \
        else rest
    items = readers.generic_rows(disk.read_rows(directory), directory)
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
