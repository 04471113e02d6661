"""Readers of task files: MMLU CSVs, ARC / CommonsenseQA / OpenBookQA JSONL, generic
JSONL/CSV with named columns, and the HF hub through `datasets`.

Every reader returns `schema.Item`s; bad data is an error naming the file, row
and field.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from typing import Iterable, Iterator, Sequence

from dpjax.tasks.schema import LETTERS, Item, TaskDataError, check_unique_ids, make_item


def _read_jsonl(path: str) -> Iterator[tuple[int, dict]]:
  with open(path) as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        yield line_number, json.loads(line)
      except json.JSONDecodeError as e:
        raise TaskDataError(f"{path}, line {line_number}: not valid JSON ({e}).") from e


def mmlu_rows(rows: Iterable[dict], source: str) -> list[Item]:
  """Items from rows with `cais/mmlu`'s fields: question, subject, choices, answer."""
  items = []
  for row_number, row in enumerate(rows):
    for field in ("question", "choices", "answer"):
      if field not in row:
        raise TaskDataError(f"{source}, row {row_number}: field {field!r} is missing.")
    items.append(make_item(source, row_number, id=row.get("id", f"{row.get('subject', '')}/{row_number}"),
                           question=row["question"], options=row["choices"],
                           answer=row["answer"], subject=row.get("subject", "")))
  return items


def load_mmlu_csv(path: str, split: str = "test") -> list[Item]:
  """MMLU's original layout: headerless `question,A,B,C,D,answer` CSV per subject.

  `path` is one `{subject}_{split}.csv` file, a directory holding such files,
  or the data directory holding `dev/`, `val/` and `test/` subdirectories.
  """
  if os.path.isdir(os.path.join(path, split)):
    path = os.path.join(path, split)
  files = sorted(glob.glob(os.path.join(path, f"*_{split}.csv"))) if os.path.isdir(path) else [path]
  if not files or not all(os.path.isfile(f) for f in files):
    raise TaskDataError(f"no MMLU CSV files for split {split!r} at {path} (expected "
                        f"{{subject}}_{split}.csv files).")
  items = []
  for file in files:
    name = os.path.basename(file)
    subject = name[:-len(f"_{split}.csv")] if name.endswith(f"_{split}.csv") else name[:-4]
    with open(file, newline="") as f:
      for row_number, row in enumerate(csv.reader(f), start=1):
        if len(row) < 3:
          raise TaskDataError(f"{file}, row {row_number}: expected question, options and an "
                              f"answer letter, found {len(row)} fields.")
        items.append(make_item(file, row_number, id=f"{subject}/{split}/{row_number - 1}",
                               question=row[0], options=row[1:-1], answer=row[-1],
                               subject=subject))
  check_unique_ids(items, path)
  return items


def choices_rows(rows: Iterable[dict], source: str, subject: str) -> list[Item]:
  """ARC, CommonsenseQA and OpenBookQA rows, HF layout or the original JSONL.

  HF: `{id, question | question_stem, choices: {text: [...], label: [...]}, answerKey}`.
  Original: `{id, question: {stem, choices: [{text, label}, ...]}, answerKey}`.
  Labels are `A`-`E` or `1`-`5`; the answer key is one of the row's labels.
  """
  items = []
  for row_number, row in enumerate(rows):
    question = row.get("question", row.get("question_stem"))
    choices = row.get("choices")
    if isinstance(question, dict):  # the original JSONL layout
      choices = question.get("choices")
      question = question.get("stem")
    if isinstance(choices, list):
      texts = [c.get("text") for c in choices]
      labels = [str(c.get("label")) for c in choices]
    elif isinstance(choices, dict):
      texts, labels = list(choices.get("text", [])), [str(x) for x in choices.get("label", [])]
    else:
      raise TaskDataError(f"{source}, row {row_number}: field 'choices' is missing.")
    if len(texts) != len(labels):
      raise TaskDataError(f"{source}, row {row_number}: field 'choices' has {len(texts)} texts "
                          f"but {len(labels)} labels.")
    items.append(make_item(source, row_number, id=row.get("id", row_number), question=question,
                           options=texts, answer=row.get("answerKey"), subject=subject,
                           labels=labels))
  check_unique_ids(items, source)
  return items


def load_choices_jsonl(path: str, subject: str) -> list[Item]:
  rows = [row for _, row in _read_jsonl(path)]
  return choices_rows(rows, path, subject)


def load_generic(path: str, *, question: str = "question", options: str | Sequence[str] = "options",
                 answer: str = "answer", id: str = "id", subject: str = "subject") -> list[Item]:
  """JSONL or CSV (with a header) with named columns (see `generic_rows`)."""
  if path.endswith(".jsonl") or path.endswith(".json"):
    rows = list(_read_jsonl(path))
  elif path.endswith(".csv"):
    with open(path, newline="") as f:
      rows = [(n, r) for n, r in enumerate(csv.DictReader(f), start=2)]
  else:
    raise TaskDataError(f"{path}: expected a .jsonl or .csv file.")
  return generic_rows(rows, path, question=question, options=options, answer=answer, id=id,
                      subject=subject)


def generic_rows(rows, source: str, *, question: str = "question",
                 options: str | Sequence[str] = "options", answer: str = "answer",
                 id: str = "id", subject: str = "subject") -> list[Item]:
  """Items from rows with named columns (`rows`: dicts, or (row number, dict) pairs).

  `options` names one column holding a list (JSONL, saved datasets) or several
  columns, one per option (CSV; default for CSV: whichever of the columns
  `A`..`J` exist). `answer` holds a 0-based index or a letter. Missing `id`
  columns number the rows; a missing `subject` column leaves it empty.
  """
  rows = [r if isinstance(r, tuple) else (n, r) for n, r in enumerate(rows)]
  path = source
  items = []
  for row_number, row in rows:
    if isinstance(options, str) and options in row:
      values = row[options]
      if isinstance(values, str):
        try:
          values = json.loads(values)
        except json.JSONDecodeError as e:
          raise TaskDataError(f"{path}, row {row_number}: field {options!r} is not a list.") from e
    else:
      columns = [options] if isinstance(options, str) else list(options)
      if columns == ["options"]:
        columns = [c for c in LETTERS if c in row]
      missing = [c for c in columns if c not in row]
      if not columns or missing:
        raise TaskDataError(f"{path}, row {row_number}: option columns {missing or columns} "
                            "are missing.")
      values = [row[c] for c in columns]
    if question not in row:
      raise TaskDataError(f"{path}, row {row_number}: field {question!r} is missing.")
    raw_answer = row.get(answer)
    if isinstance(raw_answer, str) and raw_answer.strip().lstrip("-").isdigit():
      raw_answer = int(raw_answer)
    items.append(make_item(path, row_number, id=row.get(id, row_number), question=row[question],
                           options=values, answer=raw_answer, subject=row.get(subject, "")))
  check_unique_ids(items, path)
  return items


HUB_DATASETS = {
    # name: (default config, parser kind, subject)
    "cais/mmlu": ("all", "mmlu", None),
    "allenai/ai2_arc": ("ARC-Challenge", "choices", "arc"),
    "tau/commonsense_qa": (None, "choices", "commonsense_qa"),
    "allenai/openbookqa": ("main", "choices", "openbookqa"),
}


def load_from_hub(name: str, config: str | None, split: str) -> list[Item]:
  """A dataset from the HF hub through `datasets` (the optional `hub` extra)."""
  if name not in HUB_DATASETS:
    raise TaskDataError(f"hub dataset {name!r} has no loader; dpjax knows {sorted(HUB_DATASETS)}. "
                        "Download it and use the jsonl: or csv: loaders with named columns.")
  try:
    import datasets
  except ImportError as e:
    raise TaskDataError(
        f"loading {name} from the hub needs the `datasets` package (pip install "
        "'dpjax[hub]'), or download the files and pass their local path.") from e
  default_config, kind, subject = HUB_DATASETS[name]
  source = f"{name}[{config or default_config}/{split}]"
  try:
    rows = datasets.load_dataset(name, config or default_config, split=split)
  except Exception as e:
    raise TaskDataError(f"could not load {source} from the hub ({type(e).__name__}: {e}); "
                        "pass a local copy instead.") from e
  if kind == "mmlu":
    return mmlu_rows(rows, source)
  return choices_rows(rows, source, subject)
