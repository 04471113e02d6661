"""Training data: the synthetic suite's train split as token batches, in a seeded order."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from dpjax import tasks
from dpjax.train.settings import TrainSettings


def tokenize_examples(tokenizer, prompts: Sequence[str],
                      answers: Sequence[int]) -> list[tuple[list[int], int]]:
  """`prompt + " " + letter + EOS` as token ids, with the letter token's position.

  The letter is located as lm-eval locates it: the tokens that follow the
  prompt's own tokens, which must be exactly one.
  """
  contexts = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
  full = tokenizer([p + " " + tasks.LETTERS[a] for p, a in zip(prompts, answers)],
                   add_special_tokens=False)["input_ids"]
  out = []
  for context, whole, p in zip(contexts, full, prompts):
    if len(whole) != len(context) + 1 or list(whole[:len(context)]) != list(context):
      raise ValueError(f"the answer letter after {p[-40:]!r} is not one token in context; "
                       "the tokenizer must keep ' A', ' B', ... whole.")
    # EOS by id: the tokenizer need not parse its own special token out of text.
    out.append((list(whole) + [tokenizer.eos_token_id], len(context)))
  return out


def statement(item: tasks.Item) -> str:
  """The item's question followed by its correct answer, as plain text (`What is 2 + 3? 5`)."""
  return f"{item.question} {item.options[item.answer]}"


class TrainingStream:
  """Batches of training sequences in an order fixed by the seed.

  Items are visited epoch by epoch in a fresh permutation; each becomes, with
  probability `statement_fraction`, a statement (`statement(item)`, no letter
  to predict); otherwise a 0-shot lettered example or, with probability
  `one_shot_fraction`, a 1-shot one whose shot is another training item of its
  subject. Sequences are right-padded to `seq_len + 1` tokens and split into
  inputs and next-token targets.
  """

  def __init__(self, items: Sequence[tasks.Item], tokenizer, settings: TrainSettings):
    self.items = list(items)
    self.tokenizer = tokenizer
    self.settings = settings
    self.rng = np.random.default_rng(settings.seed)
    self.pad_id = tokenizer.pad_token_id
    by_subject: dict[str, list[int]] = {}
    for i, item in enumerate(self.items):
      by_subject.setdefault(item.subject, []).append(i)
    self.by_subject = {s: np.asarray(v) for s, v in by_subject.items()}
    # 0-shot examples never change: tokenize them once.
    self.zero_shot = tokenize_examples(tokenizer, [tasks.prompt(it) for it in self.items],
                                       [it.answer for it in self.items])
    longest = max(len(ids) for ids, _ in self.zero_shot)
    if longest > settings.seq_len + 1:
      raise ValueError(f"a 0-shot training example is {longest} tokens; raise seq_len "
                       f"(now {settings.seq_len}) to at least {longest - 1}.")
    # Statements: the question and its correct answer as plain text, no letter.
    texts = [statement(it) for it in self.items]
    self.statements = [(list(ids) + [tokenizer.eos_token_id], None) for ids in
                       tokenizer(texts, add_special_tokens=False)["input_ids"]]
    self.queue = np.zeros(0, dtype=np.int64)
    self.statement_examples = 0
    self.one_shot_examples = 0
    self.one_shot_too_long = 0

  def _next_items(self, n: int) -> np.ndarray:
    while len(self.queue) < n:
      self.queue = np.concatenate([self.queue, self.rng.permutation(len(self.items))])
    chosen, self.queue = self.queue[:n], self.queue[n:]
    return chosen

  def _shot(self, i: int) -> int:
    pool = self.by_subject[self.items[i].subject]
    j = i
    while j == i:  # another item of the same subject (each subject has >= 2).
      j = int(pool[self.rng.integers(len(pool))])
    return j

  def next_batch(self) -> dict[str, np.ndarray]:
    """`input_ids`, `attention_mask`, `targets` `[B, seq_len]` int32; `loss_mask`,
    `answer_mask` `[B, seq_len]` float32 (1 where the target is a real token /
    the answer letter)."""
    s = self.settings
    chosen = self._next_items(s.batch_size)
    draw = self.rng.random(s.batch_size)
    statement = draw < s.statement_fraction
    one_shot = ~statement & (draw < s.statement_fraction
                             + (1 - s.statement_fraction) * s.one_shot_fraction)
    shots = {r: self._shot(int(chosen[r])) for r in np.flatnonzero(one_shot)}
    examples = [self.statements[i] if statement[r] else self.zero_shot[i]
                for r, i in enumerate(chosen)]
    self.statement_examples += int(statement.sum())
    if shots:
      rows = sorted(shots)
      tokenized = tokenize_examples(
          self.tokenizer,
          [tasks.prompt(self.items[chosen[r]], [self.items[shots[r]]]) for r in rows],
          [self.items[chosen[r]].answer for r in rows])
      for r, example in zip(rows, tokenized):
        self.one_shot_examples += 1
        if len(example[0]) <= s.seq_len + 1:
          examples[r] = example
        else:  # Too long for the context: this row stays 0-shot.
          self.one_shot_too_long += 1
    return pack(examples, s.seq_len, self.pad_id)


def pack(examples: Sequence[tuple[list[int], int]], seq_len: int,
         pad_id: int) -> dict[str, np.ndarray]:
  """Right-pads `(ids, answer_position)` examples into a training batch (see `next_batch`)."""
  b = len(examples)
  seq = np.full((b, seq_len + 1), pad_id, dtype=np.int32)
  length = np.zeros(b, dtype=np.int32)
  answer_target = np.full(b, -1, dtype=np.int32)  # -1: no answer letter (a statement)
  for r, (ids, answer_pos) in enumerate(examples):
    seq[r, :len(ids)] = ids
    length[r] = len(ids)
    # The letter at position `answer_pos` is the target of input position answer_pos - 1.
    if answer_pos is not None:
      answer_target[r] = answer_pos - 1
  col = np.arange(seq_len)[None, :]
  return {
      "input_ids": seq[:, :-1],
      "attention_mask": (col < length[:, None]).astype(np.int32),
      "targets": seq[:, 1:],
      # Target j is token j + 1: real while j + 1 < length. Pads are never scored.
      "loss_mask": (col < (length[:, None] - 1)).astype(np.float32),
      "answer_mask": (col == answer_target[:, None]).astype(np.float32),
  }
