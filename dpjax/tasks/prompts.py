"""Prompts in lm-eval's MMLU layout: subject header, k shots, question, lettered options.

`prompt(item, shots)` gives `header + shots + question\nA. text\n...\nAnswer:`;
each shot is followed by `" " + letter + "\n\n"`. `shots_for` takes the first k
few-shot items of each item's subject, as lm-eval's `first_n` sampler does.
"""

from __future__ import annotations

from typing import Sequence

from dpjax.tasks.schema import LETTERS, Item, TaskDataError


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
