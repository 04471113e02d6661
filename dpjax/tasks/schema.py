"""The item schema every task is read into: one question, multiple-choice or open-ended.

`Item` (question, 2-10 options, correct index, subject, id) and `make_item`,
which validates one row and names the source, row and field of anything wrong.
Benchmark readers also fill in how the item reads in the other answer formats
(`dpjax.tasks.formats`): its cloze context(s) and continuations, or its gold
answers when it is open-ended.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

LETTERS = "ABCDEFGHIJ"
MIN_OPTIONS, MAX_OPTIONS = 2, len(LETTERS)


class TaskDataError(ValueError):
  """A task file or row is malformed; the message names file, row and field."""


@dataclasses.dataclass(frozen=True)
class Item:
  """One question.

  Multiple-choice: `options` and the correct index `answer`. Open-ended: no
  options, `answer` -1, and the accepted answers in `golds`.

  The cloze format reads option `k` as `cloze_continuations[k]` after
  `cloze_contexts[0]` (or after `cloze_contexts[k]` when each option has a
  context of its own, as in WinoGrande's partial scoring); when a reader sets
  none, the default template `Question: {question}\nAnswer:` and `" " + option`
  apply. `description` precedes the shots in the cloze and open formats, and
  shots are joined by `fewshot_delimiter` (lm-eval's per-task settings).
  """
  id: str
  question: str
  options: tuple[str, ...]
  answer: int
  subject: str = ""
  cloze_contexts: tuple[str, ...] = ()
  cloze_continuations: tuple[str, ...] = ()
  golds: tuple[str, ...] = ()
  description: str = ""
  fewshot_delimiter: str = "\n\n"

  @property
  def num_options(self) -> int:
    return len(self.options)

  @property
  def is_open(self) -> bool:
    return not self.options


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
