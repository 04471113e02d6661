"""Multiple-choice tasks: one item schema, loaders, lm-eval prompts, token batches.

* `Item`: question, options (2 to 10), correct index, subject, id.
* Loaders for MMLU (HF `cais/mmlu` rows and the original headerless per-subject
  CSVs with `dev`/`val`/`test` splits), ARC, CommonsenseQA and OpenBookQA (HF
  rows or the original JSONL), and generic JSONL/CSV with named columns; from
  local files always, from the HF hub through `datasets` when it is installed.
  Bad data is an error naming the file, row and field.
* Prompts exactly as lm-eval's MMLU template: subject header, k shots from the
  dev split (the first k of the subject, as lm-eval's `first_n` sampler),
  `question\nA. text\n...\nAnswer:`; each option is read through the token of
  its letter continuation `" A"`, tokenized in context as lm-eval does.
* `encode` turns items into token ids, letter ids and answer positions;
  `batches` pads them on the left so the answer position is the last column.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

LETTERS = "ABCDEFGHIJ"
MIN_OPTIONS, MAX_OPTIONS = 2, len(LETTERS)


class TaskDataError(ValueError):
  """A task file or row is malformed; the message names file, row and field."""


@dataclasses.dataclass(frozen=True)
class Item:
  """One multiple-choice question."""
  id: str
  question: str
  options: tuple[str, ...]
  answer: int
  subject: str = ""

  @property
  def num_options(self) -> int:
    return len(self.options)


def make_item(source: str, row: int | str, *, id: Any, question: Any, options: Sequence[Any],
              answer: Any, subject: str = "", labels: Sequence[str] | None = None) -> Item:
  """Validates one row and builds its `Item`; errors name `source`, `row`, field.

  `answer` is a 0-based index, a letter `A`-`J`, or (with `labels`) one of the
  row's own option labels such as ARC's `1`-`5`.
  """
  where = f"{source}, row {row}"
  if question is None or not str(question).strip():
    raise TaskDataError(f"{where}: field 'question' is empty.")
  options = [None if o is None else str(o) for o in options]
  if not MIN_OPTIONS <= len(options) <= MAX_OPTIONS:
    raise TaskDataError(f"{where}: field 'options' has {len(options)} options; dpjax takes "
                        f"{MIN_OPTIONS} to {MAX_OPTIONS}.")
  empty = [LETTERS[i] for i, o in enumerate(options) if o is None or not o.strip()]
  if empty:
    raise TaskDataError(f"{where}: field 'options' has empty options {empty}.")
  if answer is None or (isinstance(answer, str) and not answer.strip()):
    raise TaskDataError(f"{where}: field 'answer' is missing.")
  index = _answer_index(answer, labels)
  if index is None or not 0 <= index < len(options):
    raise TaskDataError(f"{where}: field 'answer' is {answer!r}, which is not one of the "
                        f"{len(options)} options ({_option_names(len(options), labels)}).")
  return Item(id=str(id), question=str(question), options=tuple(options), answer=index,
              subject=str(subject or ""))


def _option_names(n: int, labels: Sequence[str] | None) -> str:
  names = list(labels) if labels else list(LETTERS[:n])
  return f"{', '.join(names)} or 0-{n - 1}" if not labels else ", ".join(names)


def _answer_index(answer: Any, labels: Sequence[str] | None) -> int | None:
  if isinstance(answer, (bool, np.bool_)):
    return None
  if isinstance(answer, (int, np.integer)):
    return int(answer)
  text = str(answer).strip()
  if labels is not None and text in labels:
    return list(labels).index(text)
  if len(text) == 1 and text in LETTERS:
    return LETTERS.index(text)
  if text.isdigit() and labels is None:
    return int(text)
  return None


def check_unique_ids(items: Sequence[Item], source: str) -> None:
  seen: dict[str, int] = {}
  for row, item in enumerate(items):
    if item.id in seen:
      raise TaskDataError(f"{source}: duplicate id {item.id!r} at items {seen[item.id]} and "
                          f"{row}; ids must be unique.")
    seen[item.id] = row


# ----------------------------------------------------------------------------
# Loaders.


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
  """JSONL or CSV (with a header) with named columns.

  `options` names one column holding a list (JSONL) or several columns, one
  per option (CSV; default for CSV: whichever of the columns `A`..`J` exist).
  `answer` holds a 0-based index or a letter. Missing `id` columns number the
  rows; a missing `subject` column leaves it empty.
  """
  if path.endswith(".jsonl") or path.endswith(".json"):
    rows = list(_read_jsonl(path))
  elif path.endswith(".csv"):
    with open(path, newline="") as f:
      rows = [(n, r) for n, r in enumerate(csv.DictReader(f), start=2)]
  else:
    raise TaskDataError(f"{path}: expected a .jsonl or .csv file.")
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


# ----------------------------------------------------------------------------
# Prompts (lm-eval's MMLU template).


def describe(subject: str) -> str:
  """lm-eval's MMLU header for a subject ('' when there is none)."""
  if not subject:
    return ""
  return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def question_text(item: Item) -> str:
  lines = [item.question.strip()]
  lines += [f"{LETTERS[k]}. {option}" for k, option in enumerate(item.options)]
  return "\n".join(lines) + "\nAnswer:"


def prompt(item: Item, shots: Sequence[Item] = ()) -> str:
  """Header, shots each followed by `" " + letter + "\\n\\n"`, then the question."""
  examples = "".join(f"{question_text(s)} {LETTERS[s.answer]}\n\n" for s in shots)
  return describe(item.subject) + examples + question_text(item)


def shots_for(items: Sequence[Item], dev: Sequence[Item], k: int) -> list[list[Item]]:
  """The first `k` dev items of each item's subject (lm-eval's first_n sampler)."""
  if k == 0:
    return [[] for _ in items]
  by_subject: dict[str, list[Item]] = {}
  for item in dev:
    by_subject.setdefault(item.subject, []).append(item)
  out = []
  for item in items:
    pool = by_subject.get(item.subject, [])
    if len(pool) < k:
      raise TaskDataError(f"k_shot={k} but the few-shot split has {len(pool)} items for "
                          f"subject {item.subject!r}; lower --k_shot or add dev items.")
    out.append(pool[:k])
  return out


# ----------------------------------------------------------------------------
# Tokenization.


@dataclasses.dataclass
class EncodedTask:
  """Items as tokens. `letter_ids` `[N, K]` (-1 past an item's options)."""
  items: list[Item]
  prompts: list[str]
  tokens: list[list[int]]
  letter_ids: np.ndarray
  truncated: np.ndarray  # [N] bool: the prompt was left-truncated

  @property
  def answer(self) -> np.ndarray:
    return np.array([item.answer for item in self.items], dtype=np.int32)

  @property
  def num_options(self) -> np.ndarray:
    return np.array([item.num_options for item in self.items], dtype=np.int32)

  @property
  def option_mask(self) -> np.ndarray:
    return self.letter_ids >= 0

  def subset(self, index: Sequence[int]) -> "EncodedTask":
    index = list(index)
    return EncodedTask([self.items[i] for i in index], [self.prompts[i] for i in index],
                       [self.tokens[i] for i in index], self.letter_ids[index],
                       self.truncated[index])


def encode(tokenizer, items: Sequence[Item], prompts: Sequence[str], *,
           max_length: int | None = None, truncation: str = "refuse",
           add_special_tokens: bool = False) -> EncodedTask:
  """Token ids of each prompt and, in context, of each letter continuation.

  As lm-eval does: encode `prompt` and `prompt + " A"`; the letter's token is
  what follows the prompt's tokens. It must be exactly one token, and the
  letters of one item must differ. `truncation` is `refuse` (an error naming the
  item) or `left` (keep the last `max_length` tokens: the question stays whole
  and the earliest shots lose their start).
  """
  if truncation not in ("refuse", "left"):
    raise ValueError(f"truncation={truncation!r}; use 'refuse' or 'left'.")
  kmax = max(item.num_options for item in items)
  contexts = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
  letters_needed = sorted({k for item in items for k in range(item.num_options)})
  continued = {
      k: tokenizer([p + " " + LETTERS[k] for p in prompts],
                   add_special_tokens=add_special_tokens)["input_ids"]
      for k in letters_needed
  }
  letter_ids = np.full((len(items), kmax), -1, dtype=np.int32)
  tokens, truncated = [], np.zeros(len(items), dtype=bool)
  for i, item in enumerate(items):
    context = list(contexts[i])
    pieces = {}
    for k in range(item.num_options):
      whole = continued[k][i]
      pieces[LETTERS[k]] = list(whole[len(context):])
    bad = {letter: ids for letter, ids in pieces.items() if len(ids) != 1}
    if bad:
      shown = {letter: tokenizer.convert_ids_to_tokens(ids) for letter, ids in bad.items()}
      raise TaskDataError(
          f"item {item.id!r}: the continuations {sorted(bad)} are not one token each in "
          f"context (they tokenized to {shown}); dpjax reads each option through a single "
          "letter token. Use a tokenizer with single-token ' A', ' B', ... .")
    ids = [pieces[LETTERS[k]][0] for k in range(item.num_options)]
    if len(set(ids)) != len(ids):
      shared = {LETTERS[k]: ids[k] for k in range(len(ids)) if ids.count(ids[k]) > 1}
      raise TaskDataError(f"item {item.id!r}: letters {sorted(shared)} share token ids {shared}; "
                          "each option needs a distinct letter token.")
    letter_ids[i, :item.num_options] = ids
    if max_length is not None and len(context) > max_length:
      if truncation == "refuse":
        raise TaskDataError(
            f"item {item.id!r}: its prompt is {len(context)} tokens, longer than the model's "
            f"{max_length}. Lower --k_shot, or pass --truncation=left to drop its earliest tokens.")
      context = context[-max_length:]
      truncated[i] = True
    tokens.append(context)
  return EncodedTask(list(items), list(prompts), tokens, letter_ids, truncated)


@dataclasses.dataclass
class Batch:
  """Left-padded token batch: the answer position is the last column.

  `index` `[B]` says which item each row is (-1 for filler rows in the last
  batch, whose `attention_mask` still holds one token so nothing divides by
  zero).
  """
  input_ids: np.ndarray       # [B, T] int32
  attention_mask: np.ndarray  # [B, T] int32
  letter_ids: np.ndarray      # [B, K] int32, -1 past an item's options
  answer: np.ndarray          # [B] int32
  index: np.ndarray           # [B] int32


def batches(encoded: EncodedTask, batch_size: int, pad_id: int = 0,
            length_multiple: int = 32) -> list[Batch]:
  """Left-padded batches of items of similar length (sorted by length).

  Lengths are rounded up to a multiple of `length_multiple` so that a long run
  compiles for a few shapes only; every batch has exactly `batch_size` rows.
  When the longest prompt is at most 1.5 times the median one, every batch
  gets the same length: one shape to compile, at a small padding cost.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
  order = sorted(range(len(encoded.tokens)), key=lambda i: len(encoded.tokens[i]))
  answer = encoded.answer
  lengths = [len(t) for t in encoded.tokens]
  common = None
  if lengths and max(lengths) <= 1.5 * float(np.median(lengths)):
    common = -(-max(lengths) // length_multiple) * length_multiple
  out = []
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    longest = max(len(encoded.tokens[i]) for i in rows)
    length = common or -(-longest // length_multiple) * length_multiple
    ids = np.full((batch_size, length), pad_id, dtype=np.int32)
    mask = np.zeros((batch_size, length), dtype=np.int32)
    letters = np.full((batch_size, encoded.letter_ids.shape[1]), -1, dtype=np.int32)
    answers = np.zeros(batch_size, dtype=np.int32)
    index = np.full(batch_size, -1, dtype=np.int32)
    mask[:, -1] = 1  # filler rows: one token, never read
    for r, i in enumerate(rows):
      toks = encoded.tokens[i]
      ids[r, length - len(toks):] = toks
      mask[r, length - len(toks):] = 1
      letters[r] = encoded.letter_ids[i]
      answers[r] = answer[i]
      index[r] = i
    out.append(Batch(ids, mask, letters, answers, index))
  return out


# ----------------------------------------------------------------------------
# Task specs, as the command line names them.

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
    from dpjax import synthetic
    return synthetic.generate(split, num_items or 400, seed=seed)
  if not rest:
    raise TaskDataError(f"task {spec!r}: give a path (or hub name) after '{kind}:'.")
  if kind == "mmlu":
    items = load_mmlu_csv(rest, split)
  elif kind in ("arc", "csqa", "openbookqa"):
    # ARC, CommonsenseQA and OpenBookQA prompts carry no subject header, as in lm-eval.
    items = load_choices_jsonl(_split_file(rest, split), "")
  elif kind in ("jsonl", "csv"):
    items = load_generic(_split_file(rest, split))
  else:
    name, _, config = rest.partition(":")
    items = load_from_hub(name, config or None, split)
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
