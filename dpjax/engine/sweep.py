"""The sweep engine: many pruning masks evaluated on many items, paying only for what runs.

Every pruning method proposes masks and reads results; this module runs them.

* `Sweep.readouts(masks)`: full per-layer readouts `[M, L+1, N, K]` of any
  masks, streamed through the vmapped gather-form readout in chunks of masks
  and batches of items (memory bounded by the chunk, not by M or N). Masks
  that keep the same first blocks share them: per item batch the unpruned
  model's stream is computed once, and each mask resumes from it at its first
  removed block (a pruning curve, the phase experiment's arms, a baseline's
  ranking: most masks keep the model's first blocks).
* `Sweep.drop_one(kept, candidates)`: the final readouts of every "remove one
  more block" candidate of a kept set, with prefix sharing: the current
  model's residual stream is computed once per item batch, and the candidate
  that drops block `kept[p]` starts from the stream at `kept[p]`'s input and
  runs only `kept[p+1:]`. Every loop's trip count is data (see
  `Transformer.scan_blocks`), so one program serves every step of a run;
  candidates are grouped by how many blocks they still run (bucketed) and
  vmapped in groups of `CANDIDATE_GROUP` (the rest one by one), so no dummy
  candidate is computed and two programs serve every group.
  With `stop_early`, a candidate whose best possible accuracy (correct so far
  plus every item left) is already below the leader's guaranteed accuracy
  stops being evaluated; every candidate that could still tie is kept.

Items are split along the `data` axis of a device mesh (see `dpjax.engine.devices`)
when one is given; results are the same on any number of devices.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple, Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from dpjax.engine.devices import fetch
from dpjax.model.transformer import DecoderModel
from dpjax.model.plan import KeepPlan, bucket_size, stacked_steps
from dpjax.engine.progress import Progress
from dpjax.lens.readout import (DecisionReader, Lens, Readout, Reads, default_in_flight, last_layer,
                                map_masks, packing, read_rows, residual_rows, shared_prefix)
from dpjax.tasks import EncodedTask, batches


# Drop-one candidates evaluated together in one vmapped program (the rest one by one).
CANDIDATE_GROUP = 8


class FinalStats(NamedTuple):
  """Per-candidate totals over the items evaluated so far."""
  correct: np.ndarray        # [C] int
  margin_sum: np.ndarray     # [C] float64: sum of final Decision Margins (vocab)
  nll_sum: np.ndarray        # [C] float64: sum of -log p_vocab(correct letter)
  items: np.ndarray          # [C] int: items evaluated (less if stopped early)


@dataclasses.dataclass
class Counters:
  """Work done, in block evaluations of one row (filler rows included; a batch's shared
  prefix, run once as a row of its own, counts as one row in `executed` and `minimum`)."""
  executed: int = 0          # blocks actually run (a vmapped group runs its longest member's)
  minimum: int = 0           # blocks a prefix-shared evaluation without padding needs
  naive: int = 0             # blocks a fresh forward per candidate would run
  stopped_early: int = 0     # candidate evaluations skipped by the accuracy bound


def final_stats(option_logits: np.ndarray, log_normalizer: np.ndarray,
                answer: np.ndarray, option_logprob: np.ndarray | None = None) -> FinalStats:
  """Stats of final readouts `[C, B, K]`, `[C, B]` for rows with `answer` `[B]`.

  The vocab probability of option `k` is `exp(z_k - normalizer)`, or, when
  `option_logprob` `[C, B, K]` is given (cloze), `exp(option_logprob_k)`; the NLL
  is minus the correct option's log-probability.
  """
  z = option_logits.astype(np.float64)
  top = np.argmax(z, axis=-1)
  logp = (z - log_normalizer.astype(np.float64)[..., None] if option_logprob is None
          else option_logprob.astype(np.float64))
  p = np.where(np.isneginf(z), 0.0, np.exp(logp))
  is_answer = np.arange(z.shape[-1]) == answer[:, None]
  correct_p = np.sum(np.where(is_answer, p, 0.0), axis=-1)
  rival = np.max(np.where(is_answer, -np.inf, p), axis=-1)
  correct_logp = np.sum(np.where(is_answer, logp, 0.0), axis=-1)
  return FinalStats(
      correct=(top == answer).sum(-1), margin_sum=(correct_p - rival).sum(-1),
      nll_sum=(-correct_logp).sum(-1), items=np.full(len(z), len(answer)))


def _context(module, attention_mask, packed, prefix):
  return module.attention_context(attention_mask, *packed,
                                  prefix_mask=None if prefix is None else prefix[1])


def _stream(graphdef, constrain, state, input_ids, attention_mask, packed, prefix, block_index,
            block_valid):
  """The residual stream `[L+1, B, T, d]`: h_0 and the output of every step (with a
  shared prefix, the pair of it and the prefix's `[L+1, 1, P, d]`).

  Zero-padded to `L+1` entries whatever the number of steps, so the candidates'
  program that reads it has one shape for every pruning step. `constrain` places it
  (`Placement.residuals`: rows along the data axis, the hidden size along the model
  axis), so the memory it holds falls with every device added.
  """
  module = nnx.merge(graphdef, state)
  h0 = module.embed_tokens(input_ids)
  if prefix is not None:
    h0 = (h0, module.embed_tokens(prefix[0][None]))
  ctx = _context(module, attention_mask, packed, prefix)
  _, per_step = module.scan_blocks(h0, ctx, block_index, block_valid, readout=lambda h, layer: h)

  def stacked(first, steps):
    stream = jnp.concatenate([first[None], steps], axis=0)
    missing = module.cfg.num_layers + 1 - stream.shape[0]
    return jnp.pad(stream, [(0, missing)] + [(0, 0)] * (stream.ndim - 1))

  return jax.tree.map(lambda a, b: constrain(stacked(a, b)), h0, per_step)


def _tails(graphdef, lens, in_flight, last_at_reads, state, translators, stream, starts,
           attention_mask, packed, prefix, reads, block_index, block_valid):
  """Final lens readouts of candidates resuming from the current model's stream.

  Candidate `c` starts from `stream[starts[c]]` (`stream` `[n+1, B, T, d]`)
  and runs the steps `block_index[c]` `[C, n]`. Returns the `Readout` of each,
  `[C, B, K]` / `[C, B]`.
  """
  h_start = jax.tree.map(lambda s: jnp.take(s, starts, axis=0), stream)
  module = nnx.merge(graphdef, state)
  ctx = _context(module, attention_mask, packed, prefix)
  unembed = lens.unembedding(module)

  rows, reads_in_rows = (read_rows(lens, reads, attention_mask) if last_at_reads
                         else (None, reads))

  def one(h, index, valid):
    h, _ = module.scan_blocks(h, ctx, index, valid, rows=rows)
    h = residual_rows(h)
    # A candidate's final readout is its own output: the model's head (translator row L).
    return lens(module, unembed, h, reads_in_rows, module.cfg.num_layers, translators)

  return map_masks(one, in_flight, h_start, block_index, block_valid)


def _stream_layers(graphdef, lens, state, translators, stream, count, reads) -> Readout:
  """Per-layer readouts `[L+1, B, K]` of the stream's first `count` entries (layer `j` read
  through translator row `j`, as the unpruned model's profile reads it; entries from
  `count` on are zeros). `count` is data: one program serves every trunk."""
  module = nnx.merge(graphdef, state)
  unembed = lens.unembedding(module)
  one = lambda h, layer: lens(module, unembed, residual_rows(h), reads, layer, translators)
  size = jax.tree.leaves(stream)[0].shape[0]
  first = jax.tree.map(lambda s: s[0], stream)
  out = jax.tree.map(lambda v: jnp.zeros((size, *v.shape), v.dtype),
                     jax.eval_shape(one, first, jnp.int32(0)))

  def body(j, out):
    value = one(jax.tree.map(lambda s: s[j], stream), j)
    return jax.tree.map(lambda buf, v: buf.at[j].set(v), out, value)

  return jax.lax.fori_loop(0, count, body, out)


def _tails_layers(graphdef, lens, in_flight, state, translators, stream, starts,
                  attention_mask, packed, prefix, reads, block_index, block_valid):
  """As `_tails`, read at every step: `[C, n, B, K]`, step `s` being layer
  `1 + block_index[c, s]`, the last valid step read through the model's head. Every
  tail runs at least one block."""
  h_start = jax.tree.map(lambda s: jnp.take(s, starts, axis=0), stream)
  module = nnx.merge(graphdef, state)
  ctx = _context(module, attention_mask, packed, prefix)
  unembed = lens.unembedding(module)
  own = module.cfg.num_layers

  def one(h, index, valid):
    last = last_layer(index, valid)
    readout = lambda h, layer: lens(module, unembed, residual_rows(h), reads,
                                    jnp.where(layer == last, own, layer), translators)
    _, per_step = module.scan_blocks(h, ctx, index, valid, readout=readout)
    return per_step

  return map_masks(one, in_flight, h_start, block_index, block_valid)


def executed_steps(lengths: Sequence[int], in_flight: int | None) -> int:
  """Steps a program runs for members of these loop lengths: a vmapped set runs as long as
  its longest member, and `in_flight` members are vmapped at a time (None: all of them)."""
  lengths = list(lengths)
  size = len(lengths) if in_flight is None else in_flight
  return sum(max(lengths[i:i + size]) * len(lengths[i:i + size])
             for i in range(0, len(lengths), max(size, 1)))


def fixed_groups(members: Sequence[Any], size: int) -> list[list[Any]]:
  """`members` in groups of exactly `size`, then the rest one by one: two group shapes,
  so two compiled programs, however many members."""
  full = len(members) - len(members) % size
  return ([list(members[i:i + size]) for i in range(0, full, size)]
          + [[m] for m in members[full:]])


def step_groups(members: Sequence[Any], steps: Sequence[int], num_layers: int,
                size: int = CANDIDATE_GROUP, pad: bool = False
                ) -> list[tuple[int, list[Any]]]:
  """`members` in groups for one program call each. Vmapped (`pad` False): grouped by the
  bucketed number of blocks each still runs (`steps`), in `fixed_groups` per bucket,
  smallest bucket first, so a group's members run loops of similar length. Run one after
  another inside a call (`pad`): in groups of exactly `size` in order of their steps, the
  last filled with `None` (a member that runs nothing and is not read), so one program
  serves every group; members with no block left are grouped apart from the others.
  Returns (bucket, group) pairs (bucket 0: members with nothing left to run)."""
  if pad:
    order = sorted(range(len(members)), key=lambda i: steps[i])
    out = []
    for empty in (True, False):
      part = [members[i] for i in order if (steps[i] == 0) == empty]
      for start in range(0, len(part), size):
        group = part[start:start + size]
        out.append((0 if empty else num_layers, group + [None] * (size - len(group))))
    return out
  by_steps: dict[int, list[Any]] = {}
  for member, n in zip(members, steps):
    by_steps.setdefault(bucket_size(n, num_layers), []).append(member)
  return [(bucket, group) for bucket, part in sorted(by_steps.items())
          for group in fixed_groups(part, size)]


@dataclasses.dataclass(frozen=True)
class Programs:
  """The engine's compiled programs (jitted; the model's graph, the lens and how many
  masks are in flight are baked in), named as the planner and the fit step name them:

  * `readout`, `readout_final`: per-layer / final readouts of a chunk of masks
    (`readout.DecisionReader`);
  * `stream`: the current model's residual stream, kept for the tails;
  * `tails`, `tails_layers`: final / per-layer readouts of candidates resuming from it;
  * `stream_layers`: per-layer readouts of the stream's first entries (a trunk).

  `Programs.build` gives the same programs for the same arguments, so every sweep of a
  study (the evaluation and the calibration items) shares their compilations.
  """
  readout: Any
  readout_final: Any
  stream: Any
  tails: Any
  tails_layers: Any
  stream_layers: Any

  @classmethod
  def build(cls, graphdef, lens: Lens, in_flight: int | None, last_at_reads: bool = True,
            placement=None) -> "Programs":
    return _programs(graphdef, lens, in_flight, last_at_reads, placement)


@functools.lru_cache(maxsize=64)
def _programs(graphdef, lens, in_flight, last_at_reads, placement) -> Programs:
  constrain = (lambda x: x) if placement is None else placement.residuals
  readout_fns = DecisionReader.programs(graphdef, lens, in_flight, last_at_reads)
  return Programs(
      readout=readout_fns[False], readout_final=readout_fns[True],
      stream=jax.jit(functools.partial(_stream, graphdef, constrain)),
      tails=jax.jit(functools.partial(_tails, graphdef, lens, in_flight, last_at_reads)),
      tails_layers=jax.jit(functools.partial(_tails_layers, graphdef, lens, in_flight)),
      stream_layers=jax.jit(functools.partial(_stream_layers, graphdef, lens)))


class Sweep:
  """Evaluates masks of one model on one item set (its token batches prepared once)."""

  def __init__(self, model: DecoderModel, encoded: EncodedTask, *, batch_size: int = 16,
               pad_id: int = 0, mask_chunk: int = 16, progress: bool = False,
               placement=None, time_phases: bool = False, lens: Lens | None = None,
               translators=None, in_flight: int | None | str = "auto",
               last_at_reads: bool = True, share_prefix: bool = True,
               candidates: int = CANDIDATE_GROUP):
    """`in_flight`: masks (or drop-one candidates) whose activations are live at once in
    one program ("auto": `readout.default_in_flight`); see `readout.map_masks`.
    `last_at_reads`: final readouts run the last block's attention output and MLP only at
    the positions the lens reads (`Transformer.scan_blocks(rows=...)`). `share_prefix`:
    items whose prompts begin alike (few-shot shots) run that prefix once per batch
    (`tasks.batches`). `candidates`: drop-one candidates (or mask tails) per call."""
    if not encoded.items:
      raise ValueError("the item set is empty; give at least one item.")
    self.model = model
    self.encoded = encoded
    self.batch_size = batch_size
    self.pad_id = pad_id
    self.mask_chunk = mask_chunk
    self.candidates = candidates
    self.progress = progress
    self.placement = placement  # dpjax.engine.devices.Placement or None
    self.batches = batches(encoded, batch_size, pad_id, share_prefix=share_prefix)
    self.lens = lens or Lens(encoded.format)
    if placement is not None:  # the unembedding is split along the model axis
      self.lens = dataclasses.replace(self.lens, vocab_shards=placement.model_size)
    self.translators = translators  # the tuned lens's, or None (the logit lens)
    self.in_flight = default_in_flight() if in_flight == "auto" else in_flight
    self.reader = DecisionReader(model, placement=placement, lens=self.lens,
                                 translators=translators, in_flight=self.in_flight,
                                 last_at_reads=last_at_reads)
    self.programs = Programs.build(model.graphdef, self.lens, self.in_flight, last_at_reads,
                                   placement)
    self.counters = Counters()
    # With `time_phases`, every drop-one program is waited for and its wall time
    # added here ("stream": the current model, "candidates": the tails).
    self.time_phases = time_phases
    self.phase_seconds = {"stream": 0.0, "candidates": 0.0}

  @property
  def num_layers(self) -> int:
    return self.model.num_layers

  def _timed(self, phase: str, fn, *args):
    if not self.time_phases:
      return fn(*args)
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    self.phase_seconds[phase] += time.perf_counter() - start
    return out

  def _put(self, array):
    return array if self.placement is None else self.placement.items(array)

  # --------------------------------------------------------------------------
  # Plain evaluation of masks.

  def readouts(self, masks: np.ndarray, description: str = "sweep",
               final_only: bool = False, resume: bool = True) -> Readout:
    """Full per-layer readouts `[M, L+1, N, K]` of `masks` `[M, L]`, in chunks of masks
    (`final_only`: only each mask's last kept block is read, the other layers NaN).

    With `resume`, the masks share the blocks each runs before its first removed block
    (and, per layer, their readouts): see `_resumed_readouts`."""
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 2 or masks.shape[1] != self.num_layers:
      raise ValueError(f"masks must be [M, {self.num_layers}] booleans, got shape {masks.shape}.")
    counts = masks.sum(1)
    if (counts == 0).any():
      raise ValueError(f"mask {int(np.flatnonzero(counts == 0)[0])} removes every block; keep "
                       "at least one block.")
    if resume:
      first_removed = np.where(masks.all(1), self.num_layers, np.argmin(masks, axis=1))
      if first_removed.sum() > first_removed.max():  # the shared blocks outweigh the trunk
        return self._resumed_readouts(masks, first_removed, description, final_only)
    # Masks of similar kept counts (one bucket) run together: a vmapped loop runs
    # as long as its longest member.
    bucket_of = np.array([bucket_size(int(k), self.num_layers) for k in counts])
    order = np.argsort(bucket_of, kind="stable")
    n, k = len(self.encoded.items), self.encoded.num_option_columns
    options = np.empty((len(masks), self.num_layers + 1, n, k), np.float32)
    normalizers = np.empty((len(masks), self.num_layers + 1, n), np.float32)
    logprobs = options.copy() if self.encoded.format == "cloze" else None
    rows = len(self.batches) * self.batch_size
    run_rows = rows + sum(batch.prefix_ids is not None for batch in self.batches)
    for bucket in np.unique(bucket_of):
      members = order[bucket_of[order] == bucket]
      for chunk in map(np.array, fixed_groups(list(members), self.mask_chunk)):
        out = self.reader.run(self.encoded, masks[chunk], batch_size=self.batch_size,
                              pad_id=self.pad_id, progress=self.progress,
                              description=description, prepared=self.batches,
                              final_only=final_only)
        options[chunk] = out.option_logits
        normalizers[chunk] = out.log_normalizer
        if logprobs is not None:
          logprobs[chunk] = out.option_logprob
        self.counters.executed += executed_steps(counts[chunk].tolist(),
                                                 self.in_flight) * run_rows
        self.counters.minimum += int(counts[chunk].sum()) * run_rows
        self.counters.naive += int(counts[chunk].sum()) * rows
    return Readout(options, normalizers, logprobs)

  def _resumed_readouts(self, masks: np.ndarray, first_removed: np.ndarray, description: str,
                        final_only: bool) -> Readout:
    """Readouts of `masks` resuming from the unpruned model's stream.

    Up to its first removed block `d = first_removed[m]`, mask `m` runs the unpruned
    model's blocks. So per item batch the unpruned stream is computed once, through the
    last block any mask shares (the trunk), and each mask runs only its kept blocks
    after `d` (its tail), as drop-one candidates do. Per layer, layers 0..d are the
    trunk's readouts, read once for every mask, and the tail is read at every step.
    A mask's last kept layer is read through the model's head, as everywhere. Exact: the
    same blocks on the same inputs as a fresh forward per mask.
    """
    L = self.num_layers
    n, k = len(self.encoded.items), self.encoded.num_option_columns
    options = np.full((len(masks), L + 1, n, k), np.nan, np.float32)
    normalizers = np.full((len(masks), L + 1, n), np.nan, np.float32)
    logprobs = options.copy() if self.encoded.format == "cloze" else None
    targets = lambda: [(options, "option_logits"), (normalizers, "log_normalizer"),
                       (logprobs, "option_logprob")]
    # A field's values `[..., B(, K)]` at a batch's real rows and the task's option columns.
    real_rows = lambda value, field, rows: (value[..., rows] if field == "log_normalizer"
                                            else value[..., rows, :k])
    last = np.array([int(np.flatnonzero(mask)[-1]) + 1 for mask in masks])
    shared = int(first_removed.max())
    trunk = KeepPlan.from_kept(range(shared), L)
    stream_index, stream_valid = trunk.steps()
    # The trunk's layers read per layer: 0..shared.
    read_layers = shared + 1
    tails = [tuple(int(b) for b in np.flatnonzero(mask) if b > d)
             for mask, d in zip(masks, first_removed)]
    groups = step_groups(range(len(masks)), [len(t) for t in tails], L, self.candidates,
                         pad=self.in_flight is not None)
    tail_of = lambda m: () if m is None else tails[m]
    bar = Progress(len(self.batches), description, enabled=self.progress)
    for batch in self.batches:
      rows = batch.index >= 0
      items = batch.index[rows]
      run_rows = self.batch_size + (batch.prefix_ids is not None)
      mask = self._put(batch.attention_mask)
      packed, reads = packing(batch, self._put), Reads.of(batch, self._put)
      prefix = shared_prefix(batch)
      stream = self.programs.stream(self.model.state, self._put(batch.input_ids), mask, packed,
                               prefix, stream_index, stream_valid)
      self.counters.executed += trunk.num_kept * run_rows
      self.counters.minimum += trunk.num_kept * run_rows
      if not final_only:
        trunk_out = self.programs.stream_layers(self.model.state, self.translators, stream,
                                                np.int32(read_layers), reads)
        for target, field in targets():
          if target is not None:
            value = real_rows(fetch(getattr(trunk_out, field)), field, rows)
            for m, d in enumerate(first_removed):  # [layers, B(, K)] -> [B, layers(, K)]
              target[m, :d + 1, items] = np.swapaxes(value[:d + 1], 0, 1)
      for size, group in groups:
        index, valid = stacked_steps([tail_of(m) for m in group], L)
        starts = np.array([0 if m is None else first_removed[m] for m in group], np.int32)
        per_layer = not final_only and size > 0
        fn = self.programs.tails_layers if per_layer else self.programs.tails
        out = fn(self.model.state, self.translators, stream, starts, mask, packed, prefix,
                 reads, index, valid)
        real = [g for g, m in enumerate(group) if m is not None]  # not the filler members
        members = np.array([group[g] for g in real])
        self.counters.executed += executed_steps([len(tail_of(m)) for m in group],
                                                 self.in_flight) * run_rows
        self.counters.minimum += sum(len(tail_of(m)) for m in group) * run_rows
        self.counters.naive += int(masks[members].sum()) * self.batch_size
        for target, field in targets():
          if target is None:
            continue
          value = real_rows(fetch(getattr(out, field)), field, rows)[real]
          if per_layer:  # value [C, n, B(, K)]: step s of member g is layer 1 + index[g, s]
            for i, (g, m) in enumerate(zip(real, members)):
              layers = 1 + index[g][valid[g]]
              target[m, layers[:, None], items[None, :]] = value[i, :len(layers)]
          else:  # the member's final readout, at its last kept layer
            target[members[:, None], last[members][:, None], items[None, :]] = value
      bar.update()
    bar.close()
    return Readout(options, normalizers, logprobs)

  # --------------------------------------------------------------------------
  # Drop-one candidates with prefix sharing.

  def drop_one(self, kept: Sequence[int], candidates: Sequence[int] | None = None, *,
               stop_early: bool = False) -> dict[int, FinalStats]:
    """Final-readout stats of `kept` minus each block in `candidates` (default: all).

    Returns block -> stats. With `stop_early` (for the accuracy criterion),
    candidates that can no longer reach the leader's accuracy are dropped from
    the result; every candidate that could still tie or win is evaluated on all
    items.
    """
    plan = KeepPlan.from_kept(kept, self.num_layers)
    kept = list(plan.kept)
    if len(kept) < 2:
      raise ValueError(f"cannot drop a block from {kept}: at least one block must stay.")
    candidates = kept if candidates is None else [int(c) for c in candidates]
    unknown = sorted(set(candidates) - set(kept))
    if unknown:
      raise ValueError(f"candidates {unknown} are not in the kept set {kept}.")
    position = {b: p for p, b in enumerate(kept)}
    n_kept = plan.num_kept
    # One shape for every step of a pruning run: the loops' trip counts are data.
    stream_index, stream_valid = plan.steps()

    alive = list(candidates)
    totals = {c: FinalStats(0, 0.0, 0.0, 0) for c in candidates}
    items_left = len(self.encoded.items)
    bar = Progress(len(self.batches), f"drop-one of {n_kept}", enabled=self.progress)
    for batch in self.batches:
      rows = batch.index >= 0
      answer = batch.answer[rows]
      mask = self._put(batch.attention_mask)
      packed, reads = packing(batch, self._put), Reads.of(batch, self._put)
      prefix = shared_prefix(batch)
      run_rows = self.batch_size + (batch.prefix_ids is not None)
      stream = self._timed("stream", self.programs.stream, self.model.state,
                           self._put(batch.input_ids), mask, packed, prefix, stream_index,
                           stream_valid)
      self.counters.executed += n_kept * run_rows
      self.counters.minimum += n_kept * run_rows
      # Group the live candidates by the (bucketed) number of blocks they still run, so a
      # vmapped group's members run loops of similar length.
      remaining = [n_kept - 1 - position[c] for c in alive]
      self.counters.minimum += sum(remaining) * run_rows
      self.counters.naive += len(alive) * (n_kept - 1) * self.batch_size
      for _, group in step_groups(alive, remaining, self.num_layers, self.candidates,
                                  pad=self.in_flight is not None):
        tails = [() if c is None else plan.tail(position[c]) for c in group]
        index, valid = stacked_steps(tails, self.num_layers)
        starts = np.array([0 if c is None else position[c] for c in group], np.int32)
        out = self._timed("candidates", self.programs.tails, self.model.state, self.translators,
                          stream, starts, mask, packed, prefix, reads, index, valid)
        self.counters.executed += executed_steps(list(map(len, tails)),
                                                 self.in_flight) * run_rows
        logprob = None if out.option_logprob is None else fetch(out.option_logprob)[:, rows]
        stats = final_stats(fetch(out.option_logits)[:, rows], fetch(out.log_normalizer)[:, rows],
                            answer, logprob)
        for g, c in enumerate(group):
          if c is None:  # a filler member
            continue
          t = totals[c]
          totals[c] = FinalStats(t.correct + int(stats.correct[g]),
                                 t.margin_sum + float(stats.margin_sum[g]),
                                 t.nll_sum + float(stats.nll_sum[g]), t.items + int(rows.sum()))
      items_left -= int(rows.sum())
      bar.update()
      if stop_early and items_left > 0:
        leader = max(totals[c].correct for c in alive)
        still = [c for c in alive if totals[c].correct + items_left >= leader]
        self.counters.stopped_early += len(alive) - len(still)
        alive = still
    bar.close()
    return {c: totals[c] for c in alive}
