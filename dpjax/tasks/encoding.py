"""Items as tokens in one of the three answer formats, and left-padded batches.

* letter (`encode`): each option is read through the token of its letter
  continuation `" A"`, tokenized in context as lm-eval does; the answer
  position is the prompt's last token.
* open (`encode_open`): the set of gold first tokens (each gold answer
  tokenized in context as `" " + answer`) is read at the last token.
* cloze (`encode_cloze`): option `k`'s continuation is scored token by token
  after its context. An item becomes one *packed* sequence: the tokens its K
  requests share (the context, for most tasks) once, then each option's own
  tokens, each in a segment of its own with positions that restart where the
  shared part ends. A token attends to the shared part and to its own
  segment, so the cost is one context plus K short continuations, and every
  option scores as it would alone. The positions read are those whose next
  token is a continuation token.

`batches` pads items on the left, so the letter and open formats read the last
column and the cloze format reads the positions it lists.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from dpjax.tasks.schema import LETTERS, Item, TaskDataError

FORMATS = ("letter", "cloze", "open")  # how the answer is read at every layer
# The answer formats a study takes: the read ones, and `generate` (open-ended answers
# judged by greedy generation, exact match and token F1; read at every layer as `open`).
ANSWER_FORMATS = FORMATS + ("generate",)
CLOZE_NORMS = ("none", "bytes")


def read_format(answer_format: str) -> str:
  """How an answer format is read at every layer: `generate` as `open` (its gold answers'
  first tokens), every other as itself."""
  return "open" if answer_format == "generate" else answer_format


@dataclasses.dataclass
class ClozeLayout:
  """One item's packed cloze sequence (see the module docstring)."""
  segments: list[int]   # per token: 0 shared, k + 1 option k's own
  positions: list[int]  # per token: its position in its option's sequence
  reads: list[tuple[int, int, int]]  # (packed index, target token, option)


@dataclasses.dataclass
class EncodedTask:
  """Items as tokens.

  `letter_ids` `[N, K]`: the letter format's option tokens (-1 past an item's
  options); the open format's gold first tokens `[N, G]` (-1 padded); unused
  (-1) by the cloze format, whose `layouts` and `option_bytes` `[N, K]` (each
  option text's length in UTF-8 bytes) say what is read.
  """
  items: list[Item]
  prompts: list[str]
  tokens: list[list[int]]
  letter_ids: np.ndarray
  truncated: np.ndarray  # [N] bool: the prompt was left-truncated
  format: str = "letter"
  layouts: list[ClozeLayout] | None = None
  option_bytes: np.ndarray | None = None  # [N, K] float32

  @property
  def answer(self) -> np.ndarray:
    """The correct option; in the open format, 0 (the gold set is option 0)."""
    if self.format == "open":
      return np.zeros(len(self.items), dtype=np.int32)
    return np.array([item.answer for item in self.items], dtype=np.int32)

  @property
  def num_options(self) -> np.ndarray:
    """Options per item; in the open format 2 (the gold set and its best rival)."""
    if self.format == "open":
      return np.full(len(self.items), 2, dtype=np.int32)
    return np.array([item.num_options for item in self.items], dtype=np.int32)

  @property
  def chance(self) -> float | None:
    """The accuracy of the best constant guess where it is not the uniform one's.

    In the open format the two "options" are the gold set and everything else, so a
    uniform guess means nothing; the baseline is the one token that is a gold first
    token for the most items (on NQ-open a bare space, which begins every number in
    SmolLM2's vocabulary, is one for 16% of items). Other formats: None (the uniform
    guess, `metrics.chance_accuracy`).
    """
    if self.format != "open":
      return None
    return self.constant_guess[1]

  @property
  def constant_guess(self) -> tuple[int, float]:
    """The open format's best constant guess: `(token, share of items it answers)`
    (`(-1, 0.0)` without items)."""
    ids = self.letter_ids[self.letter_ids >= 0]  # an item's gold first tokens are distinct
    if not ids.size:
      return -1, 0.0
    tokens, counts = np.unique(ids, return_counts=True)
    return int(tokens[counts.argmax()]), float(counts.max() / len(self.items))

  @property
  def num_option_columns(self) -> int:
    return 2 if self.format == "open" else int(self.num_options.max())

  def subset(self, index: Sequence[int]) -> "EncodedTask":
    index = list(index)
    return EncodedTask(
        [self.items[i] for i in index], [self.prompts[i] for i in index],
        [self.tokens[i] for i in index], self.letter_ids[index], self.truncated[index],
        self.format, None if self.layouts is None else [self.layouts[i] for i in index],
        None if self.option_bytes is None else self.option_bytes[index])


def _check_truncation(truncation: str) -> None:
  if truncation not in ("refuse", "left"):
    raise ValueError(f"truncation={truncation!r}; use 'refuse' or 'left'.")


def _too_long(item: Item, length: int, max_length: int) -> TaskDataError:
  return TaskDataError(
      f"item {item.id!r}: its prompt is {length} tokens, longer than the model's "
      f"{max_length}. Lower --k_shot, or pass --truncation=left to drop its earliest tokens.")


def encode(tokenizer, items: Sequence[Item], prompts: Sequence[str], *,
           max_length: int | None = None, truncation: str = "refuse",
           add_special_tokens: bool = False) -> EncodedTask:
  """The letter format: token ids of each prompt and, in context, of each letter.

  As lm-eval does: encode `prompt` and `prompt + " A"`; the letter's token is
  what follows the prompt's tokens. It must be exactly one token, and the
  letters of one item must differ. `truncation` is `refuse` (an error naming the
  item) or `left` (keep the last `max_length` tokens: the question stays whole
  and the earliest shots lose their start).
  """
  _check_truncation(truncation)
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
        raise _too_long(item, len(context), max_length)
      context = context[-max_length:]
      truncated[i] = True
    tokens.append(context)
  return EncodedTask(list(items), list(prompts), tokens, letter_ids, truncated)


def encode_open(tokenizer, items: Sequence[Item], prompts: Sequence[str], *,
                max_length: int | None = None, truncation: str = "refuse",
                add_special_tokens: bool = False) -> EncodedTask:
  """The open format: each prompt's tokens and the set of its gold answers' first tokens,
  each gold tokenized in context as `" " + answer` (the first token after the prompt's)."""
  _check_truncation(truncation)
  contexts = tokenizer(list(prompts), add_special_tokens=add_special_tokens)["input_ids"]
  firsts: list[list[int]] = []
  for i, item in enumerate(items):
    if not item.is_open or not item.golds:
      raise TaskDataError(f"item {item.id!r} has no gold answers; the open format needs an "
                          "open-ended task (nq_open, triviaqa).")
    if any(not gold.strip() for gold in item.golds):
      raise TaskDataError(f"item {item.id!r} has an empty gold answer in {list(item.golds)}.")
    wholes = tokenizer([prompts[i] + " " + gold for gold in item.golds],
                       add_special_tokens=add_special_tokens)["input_ids"]
    context = list(contexts[i])
    first = []
    for gold, whole in zip(item.golds, wholes):
      if list(whole[:len(context)]) != context or len(whole) == len(context):
        raise TaskDataError(f"item {item.id!r}: the gold answer {gold!r} tokenizes to nothing "
                            "after the prompt.")
      first.append(int(whole[len(context)]))
    firsts.append(sorted(set(first)))
  width = max(len(f) for f in firsts)
  gold_ids = np.full((len(items), width), -1, dtype=np.int32)
  tokens, truncated = [], np.zeros(len(items), dtype=bool)
  for i, (item, first) in enumerate(zip(items, firsts)):
    gold_ids[i, :len(first)] = first
    context = list(contexts[i])
    if max_length is not None and len(context) > max_length:
      if truncation == "refuse":
        raise _too_long(item, len(context), max_length)
      context = context[-max_length:]
      truncated[i] = True
    tokens.append(context)
  return EncodedTask(list(items), list(prompts), tokens, gold_ids, truncated, format="open")


def encode_cloze(tokenizer, items: Sequence[Item], requests: Sequence[Sequence[tuple[str, str]]],
                 *, max_length: int | None = None, truncation: str = "refuse",
                 add_special_tokens: bool = False) -> EncodedTask:
  """The cloze format: each item's requests `[(context, continuation), ...]` (one per
  option) as one packed sequence (see the module docstring).

  Each request is tokenized as lm-eval does: encode the context, encode context +
  continuation, and the continuation is the tokens past the context's.
  """
  _check_truncation(truncation)
  kmax = max(item.num_options for item in items)
  option_bytes = np.ones((len(items), kmax), dtype=np.float32)
  tokens, layouts, prompts = [], [], []
  truncated = np.zeros(len(items), dtype=bool)
  for i, (item, reqs) in enumerate(zip(items, requests)):
    if len(reqs) != item.num_options:
      raise TaskDataError(f"item {item.id!r}: {len(reqs)} cloze requests for "
                          f"{item.num_options} options.")
    contexts = tokenizer([c for c, _ in reqs], add_special_tokens=add_special_tokens)["input_ids"]
    wholes = tokenizer([c + x for c, x in reqs], add_special_tokens=add_special_tokens)["input_ids"]
    seqs, starts = [], []
    for k, (context, whole) in enumerate(zip(contexts, wholes)):
      context, whole = list(context), list(whole)
      if len(whole) <= len(context) or whole[:len(context)] != context:
        raise TaskDataError(f"item {item.id!r}: option {LETTERS[k]}'s continuation "
                            f"{reqs[k][1]!r} tokenizes to nothing after its context.")
      seqs.append(whole)
      starts.append(len(context))  # the first continuation token's index
      # The continuation without its delimiter space (lm-eval's acc_norm divides by the
      # length of the choice text; for WinoGrande both options share one continuation).
      text = reqs[k][1][1:] if reqs[k][1].startswith(" ") else reqs[k][1]
      option_bytes[i, k] = max(len(text.encode("utf-8")), 1)
    # The longest prefix every option's sequence shares (never past a sequence's end).
    shared = min(len(s) for s in seqs) - 1
    for j in range(shared):
      if len({s[j] for s in seqs}) > 1:
        shared = j
        break
    longest = max(len(s) for s in seqs)
    drop = 0
    if max_length is not None and longest > max_length:
      if truncation == "refuse" or longest - max_length > min(starts) - 1:
        raise _too_long(item, longest, max_length)
      drop = longest - max_length  # the shared prefix loses its earliest tokens
      truncated[i] = True
    packed = seqs[0][drop:shared]
    segments = [0] * len(packed)
    positions = list(range(len(packed)))
    reads: list[tuple[int, int, int]] = []
    for k, seq in enumerate(seqs):
      offset = len(packed) - shared  # packed index of sequence position `shared`
      packed += seq[shared:]
      segments += [k + 1] * (len(seq) - shared)
      positions += list(range(shared - drop, len(seq) - drop))
      for p in range(starts[k] - 1, len(seq) - 1):  # position p predicts token p + 1
        index = p - drop if p < shared else offset + p
        reads.append((index, seq[p + 1], k))
    tokens.append(packed)
    layouts.append(ClozeLayout(segments, positions, reads))
    prompts.append(reqs[0][0])
  letter_ids = np.full((len(items), kmax), -1, dtype=np.int32)
  return EncodedTask(list(items), prompts, tokens, letter_ids, truncated, format="cloze",
                     layouts=layouts, option_bytes=option_bytes)


@dataclasses.dataclass
class Batch:
  """Left-padded token batch: the letter and open formats read the last column.

  `index` `[B]` says which item each row is (-1 for filler rows in the last
  batch, whose `attention_mask` still holds one token so nothing divides by
  zero). The cloze format adds the packed layout: `positions` and `segments`
  `[B, T]`, and the reads `read_index`, `read_target`, `read_option` `[B, R]`
  (option -1: padding) with `option_bytes` `[B, K]`.
  """
  input_ids: np.ndarray       # [B, T] int32
  attention_mask: np.ndarray  # [B, T] int32
  letter_ids: np.ndarray      # [B, K] int32, -1 past an item's options
  answer: np.ndarray          # [B] int32
  index: np.ndarray           # [B] int32
  positions: np.ndarray | None = None
  segments: np.ndarray | None = None
  read_index: np.ndarray | None = None
  read_target: np.ndarray | None = None
  read_option: np.ndarray | None = None
  option_bytes: np.ndarray | None = None
  # A prefix every row continues (`[P]`, left-padded; mask 1 = token), run once for the
  # whole batch: the rows then hold only what follows it.
  prefix_ids: np.ndarray | None = None
  prefix_mask: np.ndarray | None = None

  def unshared(self) -> "Batch":
    """The same rows with the shared prefix written into each (left-padded), for code
    that runs whole prompts (generation, block influence); itself when there is none."""
    if self.prefix_ids is None:
      return self
    prefix = self.prefix_ids[self.prefix_mask.astype(bool)]
    rows = [np.concatenate([prefix, ids[m.astype(bool)]])
            for ids, m in zip(self.input_ids, self.attention_mask)]
    length = _round_up(max(len(row) for row in rows), 32)  # no wider than it must be
    ids = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    pad = self.input_ids[self.attention_mask == 0]
    ids[:] = pad[0] if len(pad) else 0
    for r, row in enumerate(rows):
      ids[r, length - len(row):] = row
      mask[r, length - len(row):] = 1
    return dataclasses.replace(self, input_ids=ids, attention_mask=mask, prefix_ids=None,
                               prefix_mask=None)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _common(values: list[int], multiple: int) -> int | None:
  """One size for every batch when the largest is at most 1.5x the median."""
  if values and max(values) <= 1.5 * float(np.median(values)):
    return _round_up(max(values), multiple)
  return None


# Items whose prompts start with at least this many equal tokens (few-shot prompts of one
# subject) share them as a batch prefix.
MIN_SHARED_PREFIX = 64


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  n = min(len(a), len(b))
  differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
  return int(differ[0]) if len(differ) else n


def prefix_groups(tokens: Sequence[Sequence[int]], min_shared: int = MIN_SHARED_PREFIX
                  ) -> tuple[list[list[int]], list[int]]:
  """Items whose token sequences share their first `min_shared` tokens or more, in groups
  (each in token order, so that any run of a group shares a prefix at least that long),
  and the items that share with none."""
  order = sorted(range(len(tokens)), key=lambda i: list(tokens[i]))
  groups, alone, current = [], [], order[:1]
  for prev, i in zip(order, order[1:]):
    if _common_prefix(tokens[prev], tokens[i]) >= min_shared:
      current.append(i)
      continue
    (groups.append(current) if len(current) > 1 else alone.extend(current))
    current = [i]
  (groups.append(current) if len(current) > 1 else alone.extend(current))
  return groups, sorted(alone)


def batches(encoded: EncodedTask, batch_size: int, pad_id: int = 0,
            length_multiple: int = 32, reads_multiple: int = 16,
            share_prefix: bool = False) -> list[Batch]:
  """Left-padded batches of items of similar length (sorted by length).

  Lengths are rounded up to a multiple of `length_multiple` (and the cloze
  format's read counts to one of `reads_multiple`) so that a long run compiles
  for a few shapes only; every batch has exactly `batch_size` rows. When the
  longest is at most 1.5 times the median, every batch gets the same size:
  one shape to compile, at a small padding cost.

  With `share_prefix` (letter and open formats), items whose prompts begin with
  the same `MIN_SHARED_PREFIX` tokens or more (few-shot prompts of one subject)
  are batched together, and the tokens every item of the group begins with go to
  `Batch.prefix_ids` (padded to a multiple of `PREFIX_MULTIPLE`, so that many
  subjects compile few shapes), computed once per batch instead of once per row;
  each row keeps at least its last token. The computation is the same up to float
  rounding. Code that runs the rows itself must then run `Batch.unshared()` (the
  sweep engine, `dpjax.engine.sweep.Sweep`, shares by default).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
  if share_prefix and encoded.format != "cloze":
    groups, alone = prefix_groups(encoded.tokens)
    if groups:
      out = _prefix_batches(encoded, groups, batch_size, pad_id, length_multiple)
      if alone:
        out += batches(encoded.subset(alone), batch_size, pad_id, length_multiple,
                       reads_multiple, share_prefix=False)
        for batch in out[len(out) - _count_batches(len(alone), batch_size):]:
          batch.index = np.where(batch.index >= 0, np.asarray(alone)[batch.index], -1)
      return out
  order = sorted(range(len(encoded.tokens)), key=lambda i: len(encoded.tokens[i]))
  common = _common([len(t) for t in encoded.tokens], length_multiple)
  cloze = encoded.format == "cloze"
  common_reads = _common([len(lay.reads) for lay in encoded.layouts], reads_multiple) \
      if cloze else None
  out = []
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    longest = max(len(encoded.tokens[i]) for i in rows)
    length = common or _round_up(longest, length_multiple)
    batch = _rows_batch(encoded, rows, batch_size, length, pad_id)
    if cloze:
      reads = common_reads or _round_up(max(len(encoded.layouts[i].reads) for i in rows),
                                        reads_multiple)
      batch.positions = np.zeros((batch_size, length), dtype=np.int32)
      batch.segments = np.zeros((batch_size, length), dtype=np.int32)
      batch.read_index = np.full((batch_size, reads), length - 1, dtype=np.int32)
      batch.read_target = np.zeros((batch_size, reads), dtype=np.int32)
      batch.read_option = np.full((batch_size, reads), -1, dtype=np.int32)
      batch.option_bytes = np.ones((batch_size, encoded.option_bytes.shape[1]), np.float32)
      for r, i in enumerate(rows):
        layout, pad = encoded.layouts[i], length - len(encoded.tokens[i])
        batch.positions[r, pad:] = layout.positions
        batch.segments[r, pad:] = layout.segments
        for j, (at, target, option) in enumerate(layout.reads):
          batch.read_index[r, j] = pad + at
          batch.read_target[r, j] = target
          batch.read_option[r, j] = option
        batch.option_bytes[r] = encoded.option_bytes[i]
    out.append(batch)
  return out


def _count_batches(items: int, batch_size: int) -> int:
  return -(-items // batch_size)


# Shared prefixes are padded to a multiple of this: a prefix is one row, so coarse sizes
# cost little and keep the number of compiled shapes small across many subjects.
PREFIX_MULTIPLE = 128


def _prefix_batches(encoded: EncodedTask, groups: list[list[int]], batch_size: int, pad_id: int,
                    length_multiple: int) -> list[Batch]:
  """Batches of prefix groups (each in its token order). A batch's prefix is what its
  whole group begins with (the shots and header: one size per group, whichever batch),
  leaving every row its last token at least; the rest is left-padded as rows, one length
  for every batch when the longest is at most 1.5 times the median."""
  tokens = encoded.tokens
  planned = []  # (rows, shared)
  for group in groups:
    common = min(_common_prefix(tokens[group[0]], tokens[i]) for i in group)
    for start in range(0, len(group), batch_size):
      rows = group[start:start + batch_size]
      planned.append((rows, min(common, min(len(tokens[i]) for i in rows) - 1)))
  rest = _common([len(tokens[i]) - shared for rows, shared in planned for i in rows],
                 length_multiple)
  out = []
  for rows, shared in planned:
    size = _round_up(max(shared, 1), PREFIX_MULTIPLE)
    prefix_ids = np.full(size, pad_id, np.int32)
    prefix_mask = np.zeros(size, np.int32)
    prefix_ids[size - shared:] = tokens[rows[0]][:shared]
    prefix_mask[size - shared:] = 1
    length = rest or _round_up(max(len(tokens[i]) - shared for i in rows), length_multiple)
    batch = _rows_batch(encoded, rows, batch_size, length, pad_id, skip=shared)
    batch.prefix_ids, batch.prefix_mask = prefix_ids, prefix_mask
    out.append(batch)
  return out


def _rows_batch(encoded: EncodedTask, rows: Sequence[int], batch_size: int, length: int,
                pad_id: int, skip: int = 0) -> Batch:
  """A left-padded batch of items `rows` (their tokens after the first `skip`), filled up
  to `batch_size` rows with filler rows (index -1)."""
  ids = np.full((batch_size, length), pad_id, dtype=np.int32)
  mask = np.zeros((batch_size, length), dtype=np.int32)
  letters = np.full((batch_size, encoded.letter_ids.shape[1]), -1, dtype=np.int32)
  answers = np.zeros(batch_size, dtype=np.int32)
  index = np.full(batch_size, -1, dtype=np.int32)
  mask[:, -1] = 1  # filler rows: one token, never read
  for r, i in enumerate(rows):
    toks = encoded.tokens[i][skip:]
    ids[r, length - len(toks):] = toks
    mask[r, length - len(toks):] = 1
    letters[r] = encoded.letter_ids[i]
    answers[r] = encoded.answer[i]
    index[r] = i
  return Batch(ids, mask, letters, answers, index)
