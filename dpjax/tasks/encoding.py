"""Items as tokens: letter ids in context, and left-padded batches.

`encode` turns prompts into token ids and reads each option through the token
of its letter continuation `" A"`, tokenized in context as lm-eval does;
`batches` pads items on the left so the answer position is the last column.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from dpjax.tasks.schema import LETTERS, Item, TaskDataError


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
