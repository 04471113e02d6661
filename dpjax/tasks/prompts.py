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


def first_per_subject(items: Sequence[Item], k: int) -> list[Item]:
  """The first `k` items of each subject, in order (the shots of a task whose split is
  both the few-shot pool and the evaluated set)."""
  counts: dict[str, int] = {}
  chosen = []
  for item in items:
    if counts.get(item.subject, 0) < k:
      counts[item.subject] = counts.get(item.subject, 0) + 1
      chosen.append(item)
  return chosen


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
# The cloze and open formats (lm-eval's multiple-choice and generation templates).


def cloze_parts(item: Item) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """The item's cloze context(s) and each option's continuation (the default template
  `Question: {question}\\nAnswer:` + `" " + option` when its reader set none)."""
  if item.cloze_continuations:
    return item.cloze_contexts, item.cloze_continuations
  return (f"Question: {item.question.strip()}\nAnswer:",), tuple(" " + o for o in item.options)


def cloze_requests(item: Item, shots: Sequence[Item] = ()) -> list[tuple[str, str]]:
  """`(context, continuation)` of each option: the description, each shot as its
  correct option's context and continuation, then the item's context."""
  examples = ""
  for shot in shots:
    contexts, continuations = cloze_parts(shot)
    context = contexts[shot.answer] if len(contexts) > 1 else contexts[0]
    examples += context + continuations[shot.answer] + shot.fewshot_delimiter
  contexts, continuations = cloze_parts(item)
  head = item.description + examples
  if len(contexts) == 1:
    return [(head + contexts[0], c) for c in continuations]
  return [(head + ctx, c) for ctx, c in zip(contexts, continuations)]


def open_prompt(item: Item, shots: Sequence[Item] = ()) -> str:
  """The description, each shot's query and first gold answer, then the item's query."""
  if not item.is_open:
    raise TaskDataError(f"item {item.id!r} has options; the open format needs an open-ended "
                        "task (its gold answers), such as nq_open or triviaqa.")
  examples = "".join(f"{s.cloze_contexts[0]} {s.golds[0]}{s.fewshot_delimiter}" for s in shots)
  return item.description + examples + item.cloze_contexts[0]
