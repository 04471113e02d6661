"""Per-layer decision readouts through the logit lens, for many masks, in three answer formats.

One forward pass gives, for every item and for `h_0` and every kept block,
what the lens reads at the positions the format names:

    z_l = W_U · norm_f(h_l)      (the model's own final norm and unembedding, and its
                                  final soft-capping when it has one)

or, through the tuned lens, `W_U · norm_f(h_l + A_l h_l + b_l)` with trained
translators (`dpjax.lens.tuned`).

* letter: at the answer position (the last column: batches are left-padded),
  the option letters' logits `z_l[c_k]` and the log-normalizer
  `logsumexp_v z_l[v]`.
* open: at the answer position, the best gold first token's logit and the best
  other token's logit (the "rival"), as options 0 and 1, and the normalizer.
* cloze: at every position whose next token belongs to an option's
  continuation, that token's log-probability; option `k`'s score is their sum
  (`cloze_norm=none`) or that sum over the option's length in bytes (`bytes`).
  The option scores stand in the option logits and the normalizer is 0, so
  `softmax_k` of them is the `options` probability, and the summed
  log-probabilities come back apart (`option_logprob`): `exp` of them is the
  `vocab` probability.

The lens runs inside the block scan on the read positions only, in float32
even when the model runs in bfloat16, so neither `[B, T, V]` logits nor
`[L, B, T, d]` residuals are ever materialized (the vocabulary is reduced in
chunks where it is read at many positions). Vmapped over a batch of masks, the
outputs are `[masks, layers+1, items, ...]`; a removed block's layer is NaN.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from dpjax.engine.devices import fetch
from dpjax.model.transformer import DecoderModel, Transformer
from dpjax.model.layers import rms_norm, soft_cap
from dpjax.model.plan import KeepPlan, layers_from_steps, stacked_steps
from dpjax.engine.progress import Progress
from dpjax.tasks import Batch, EncodedTask, batches
from dpjax.tasks.encoding import CLOZE_NORMS, FORMATS
from dpjax.lens.tuned import Translators, translate

# Vocabulary rows reduced at a time when many positions are read (bounds the
# `[positions, chunk]` logits block).
VOCAB_CHUNK = 16384


class Readout(NamedTuple):
  """Lens readouts. Leading axes `[..., layers+1, items]`.

  option_logits: `[..., L+1, N, K]` float32: letter `z_l[c_k]`, open
    (gold, rival) logits, cloze option scores; NaN at removed layers, -inf past
    an item's own options.
  log_normalizer: `[..., L+1, N]` float32 `logsumexp_v z_l[v]` (cloze: 0); NaN
    at removed layers.
  option_logprob: cloze only, `[..., L+1, N, K]` the options' summed
    log-probabilities (`exp` of them: the `vocab` probabilities); else None.
  """
  option_logits: jax.Array | np.ndarray
  log_normalizer: jax.Array | np.ndarray
  option_logprob: jax.Array | np.ndarray | None = None


class Reads(NamedTuple):
  """What one batch reads, as device inputs (see `Batch`)."""
  ids: jax.Array                       # [B, K] letters / [B, G] gold first tokens
  read_index: jax.Array | None = None  # cloze [B, R]
  read_target: jax.Array | None = None
  read_option: jax.Array | None = None
  option_bytes: jax.Array | None = None  # cloze [B, K]

  @classmethod
  def of(cls, batch: Batch, put=lambda x: x) -> "Reads":
    if batch.read_index is None:
      return cls(put(batch.letter_ids))
    return cls(put(batch.letter_ids), put(batch.read_index), put(batch.read_target),
               put(batch.read_option), put(batch.option_bytes))


def packing(batch: Batch, put=lambda x: x) -> tuple:
  """The batch's (positions, segments) for `Transformer.attention_context` (None, None
  unless it holds packed cloze sequences)."""
  if batch.segments is None:
    return None, None
  return put(batch.positions), put(batch.segments)


def unembedding_f32(module: Transformer) -> jax.Array:
  """`[V, d]` float32 unembedding (tied: the embedding). A copy when the weights are not
  float32: the sweep's lenses read through `Unembedding` instead, which never makes one."""
  if module.lm_head is None:
    return module.embed[...].astype(jnp.float32)
  return module.lm_head[...].astype(jnp.float32).T


def vocab_chunk(hidden_size: int, dtype) -> int:
  """Vocabulary rows reduced at a time: `VOCAB_CHUNK`, fewer for wide models whose
  float32 copy of a chunk would pass 64 MB (bf16 weights are upcast a chunk at a time)."""
  return int(min(VOCAB_CHUNK, max(1024, (64 << 20) // (4 * hidden_size))))


class LensLogits(NamedTuple):
  """What a lens reads of `N` normed residuals in one pass over the vocabulary."""
  at_ids: jax.Array            # [N, K] the logits of the asked ids
  log_normalizer: jax.Array    # [N] logsumexp over the vocabulary
  rival: jax.Array | None      # [N] the largest logit outside the asked ids (open format)


@dataclasses.dataclass(frozen=True)
class Unembedding:
  """The unembedding as the lens reads it: one pass over the vocabulary, a chunk of rows
  at a time, gives the logits of the ids asked for, the log-normalizer and (open format)
  the best logit outside the ids, so neither a float32 copy of `[V, d]` nor `[N, V]`
  logits exist when `V` is large (a vocabulary that fits one chunk is one matmul, as
  `x @ W.T`). With the vocabulary split over `shards` devices (the mesh's model axis),
  each device reduces its own rows and only `[shards, N]` partials are combined. Built
  under jit: `weight` is the stored `[V, d]` embedding (tied) or `[d, V]` head.
  """
  weight: jax.Array
  vocab_axis: int  # 0: [V, d], 1: [d, V]
  softcap: float | None
  shards: int = 1

  @classmethod
  def of(cls, module: Transformer, shards: int = 1) -> "Unembedding":
    if module.lm_head is None:
      weight, axis = module.embed[...], 0
    else:
      weight, axis = module.lm_head[...], 1
    if weight.shape[axis] % shards:
      shards = 1
    return cls(weight, axis, module.cfg.final_logit_softcap, shards)

  @property
  def vocab_size(self) -> int:
    return self.weight.shape[self.vocab_axis]

  def read(self, x: jax.Array, ids: jax.Array, rival: bool = False) -> LensLogits:
    """Normed residuals `x` `[N, d]` (float32) and token `ids` `[N, K]` (-1: none) ->
    `LensLogits`."""
    w = self.weight
    split = self.shards > 1
    if self.vocab_axis == 1:
      d, v = w.shape
      w = w.reshape(d, self.shards, v // self.shards) if split else w
      spec, axis = ("nd,dsc->snc", 2) if split else ("nd,dc->nc", 1)
    else:
      v, d = w.shape
      w = w.reshape(self.shards, v // self.shards, d) if split else w
      spec, axis = ("nd,scd->snc", 1) if split else ("nd,cd->nc", 0)
    per_shard = v // self.shards
    chunk = min(per_shard, vocab_chunk(d, w.dtype))
    # The last chunk is moved back to end at the shard's last row; the rows it repeats
    # are left out of the sums (they were counted by the chunk before).
    starts = np.minimum(np.arange(0, per_shard, chunk), per_shard - chunk).astype(np.int32)
    fresh = np.maximum(np.arange(0, per_shard, chunk), starts) - starts
    lead = (self.shards,) if split else ()
    base = (jnp.arange(self.shards, dtype=jnp.int32) * per_shard).reshape(
        (self.shards, 1, 1)) if split else jnp.int32(0)
    n, k = ids.shape

    def body(carry, start_fresh):
      top, total, found, best_other = carry
      start, first_new = start_fresh
      rows = jax.lax.dynamic_slice_in_dim(w, start, chunk, axis=axis).astype(jnp.float32)
      z = soft_cap(jnp.einsum(spec, x, rows, precision=jax.lax.Precision.HIGHEST), self.softcap)
      z = jnp.where(jnp.arange(chunk) >= first_new, z, -jnp.inf)  # [..., N, C]
      new_top = jnp.maximum(top, z.max(-1))
      total = total * jnp.exp(top - new_top) + jnp.exp(z - new_top[..., None]).sum(-1)
      local = ids - (base + start)  # [..., N, K]: where each id falls in this chunk
      inside = (local >= 0) & (local < chunk) & (ids >= 0)
      value = jnp.take_along_axis(z, jnp.clip(local, 0, chunk - 1), axis=-1)
      found = jnp.maximum(found, jnp.where(inside, value, -jnp.inf))
      if rival:
        asked = (jnp.arange(chunk)[None, :, None] == local[..., :, None, :]).any(-1)
        best_other = jnp.maximum(best_other, jnp.where(asked, -jnp.inf, z).max(-1))
      return (new_top, total, found, best_other), None

    init = (jnp.full((*lead, n), -jnp.inf, jnp.float32), jnp.zeros((*lead, n), jnp.float32),
            jnp.full((*lead, n, k), -jnp.inf, jnp.float32),
            jnp.full((*lead, n), -jnp.inf, jnp.float32))
    (top, total, found, best_other), _ = jax.lax.scan(
        body, init, (jnp.asarray(starts), jnp.asarray(fresh)))
    if not split:
      return LensLogits(found, top + jnp.log(total), best_other if rival else None)
    best = top.max(0)  # the shards' partial sums, combined
    lse = best + jnp.log(jnp.sum(total * jnp.exp(top - best), axis=0))
    return LensLogits(found.max(0), lse, best_other.max(0) if rival else None)


def _normed(module: Transformer, h: jax.Array, layer=None, translators=None) -> jax.Array:
  """The final norm of `h` in float32 (after the layer's translator, for the tuned lens)."""
  cfg = module.cfg
  return rms_norm(translate(translators, h, layer), module.final_norm[...].astype(jnp.float32),
                  cfg.rms_norm_eps, cfg.norm_kind)


def letter_lens(module, unembed: Unembedding, h, reads: Reads, layer=None,
                translators=None) -> Readout:
  """Option letters' logits `[B, K]` and the normalizer `[B]` at the last column."""
  out = unembed.read(_normed(module, h[:, -1], layer, translators), reads.ids)
  return Readout(jnp.where(reads.ids >= 0, out.at_ids, -jnp.inf), out.log_normalizer)


def open_lens(module, unembed: Unembedding, h, reads: Reads, layer=None,
              translators=None) -> Readout:
  """The best gold first token's logit and the best other token's, `[B, 2]`, at the
  last column, and the normalizer `[B]`."""
  out = unembed.read(_normed(module, h[:, -1], layer, translators), reads.ids, rival=True)
  gold = jnp.max(out.at_ids, axis=-1)  # -inf at the -1 padding
  return Readout(jnp.stack([gold, out.rival], axis=-1), out.log_normalizer)


def cloze_lens(module, unembed: Unembedding, h, reads: Reads, cloze_norm: str, layer=None,
               translators=None) -> Readout:
  """Option scores `[B, K]` from the continuation tokens' log-probabilities."""
  b, r = reads.read_index.shape
  x = _normed(module, jnp.take_along_axis(h, reads.read_index[..., None], axis=1), layer,
              translators).reshape(b * r, -1)  # [B R, d]
  out = unembed.read(x, reads.read_target.reshape(b * r, 1))
  logprob = (out.at_ids[:, 0] - out.log_normalizer).reshape(b, r)
  k = reads.option_bytes.shape[-1]
  member = reads.read_option[:, None, :] == jnp.arange(k)[None, :, None]  # [B, K, R]
  total = jnp.sum(jnp.where(member, logprob[:, None, :], 0.0), axis=-1)
  total = jnp.where(member.any(-1), total, -jnp.inf)  # past an item's own options
  scores = total / reads.option_bytes if cloze_norm == "bytes" else total
  return Readout(scores, jnp.zeros((b,), jnp.float32), total)


@dataclasses.dataclass(frozen=True)
class Lens:
  """The lens of one answer format (static: part of the compiled program)."""
  format: str = "letter"
  cloze_norm: str = "none"
  vocab_shards: int = 1  # devices the unembedding's vocabulary is split over (`Unembedding`)

  def __post_init__(self):
    if self.format not in FORMATS:
      raise ValueError(f"format={self.format!r}; use one of {FORMATS}.")
    if self.cloze_norm not in CLOZE_NORMS:
      raise ValueError(f"cloze_norm={self.cloze_norm!r}; use one of {CLOZE_NORMS}.")

  def unembedding(self, module: Transformer) -> Unembedding:
    return Unembedding.of(module, self.vocab_shards)

  def __call__(self, module, unembed: Unembedding, h, reads: Reads, layer=None,
               translators=None) -> Readout:
    """The readout of residuals `h` `[B, T, d]` at `layer` (the tuned lens applies that
    layer's translator; `translators` None: the logit lens)."""
    if self.format == "cloze":
      return cloze_lens(module, unembed, h, reads, self.cloze_norm, layer, translators)
    if self.format == "open":
      return open_lens(module, unembed, h, reads, layer, translators)
    return letter_lens(module, unembed, h, reads, layer, translators)


def last_layer(block_index, block_valid):
  """The layer of a plan's last kept block (`1 + index`), traced."""
  count = jnp.sum(block_valid.astype(jnp.int32))
  return block_index[jnp.maximum(count - 1, 0)] + 1


def residual_rows(h):
  """The rows' residual of a scan's state (without the shared prefix, when there is one)."""
  return h[0] if isinstance(h, tuple) else h


def decision_readout(module: Transformer, lens: Lens, input_ids, attention_mask, reads: Reads,
                     packed, translators, block_index, block_valid, prefix=None) -> Readout:
  """Readouts `[L+1, B, K]` / `[L+1, B]` of one mask given as steps.

  `block_index` `[n]` and `block_valid` `[n]`: the blocks to run in order (see
  `Transformer.run_blocks`); layer `1 + block_index[s]` is filled for valid
  steps, every other block layer is NaN. `packed`: (positions, segments).
  `translators`: the tuned lens's (None: the logit lens). `prefix`: (ids, mask) `[P]`
  of the prefix every row continues (`Batch.prefix_ids`), or None.
  """
  unembed = lens.unembedding(module)
  # The variant's last layer is its own output: read through the model's head, never a
  # translator (row L of the translators is zero), whichever lens reads the others.
  last, own = last_layer(block_index, block_valid), module.cfg.num_layers
  readout = lambda h, layer: lens(module, unembed, residual_rows(h), reads,
                                  jnp.where(layer == last, own, layer), translators)
  _, first, per_step = module.run_blocks(input_ids, attention_mask, block_index, block_valid,
                                         readout=readout, positions=packed[0],
                                         segments=packed[1], prefix=prefix)
  return layers_from_steps(first, per_step, block_index, block_valid, module.cfg.num_layers)


def read_rows(lens: Lens, reads: Reads, input_ids) -> tuple[jax.Array, Reads]:
  """The positions `lens` reads, `[B, R]` (the last column in the letter and open formats,
  the continuation positions in the cloze format), and `reads` re-indexed into those rows,
  for a forward that returns only them (`Transformer.scan_blocks(rows=...)`)."""
  b, t = input_ids.shape
  if lens.format != "cloze":
    return jnp.full((b, 1), t - 1, jnp.int32), reads
  r = reads.read_index.shape[1]
  return reads.read_index, reads._replace(
      read_index=jnp.broadcast_to(jnp.arange(r, dtype=jnp.int32), (b, r)))


def final_readout(module: Transformer, lens: Lens, input_ids, attention_mask, reads: Reads,
                  packed, translators, block_index, block_valid, prefix=None,
                  last_at_reads: bool = True) -> Readout:
  """The last kept block's readout only (`[B, K]` / `[B]`): the lens runs once, and
  (`last_at_reads`) the last block's attention output and MLP run only at the positions
  the lens reads."""
  unembed = lens.unembedding(module)
  rows, reads_in_rows = read_rows(lens, reads, input_ids) if last_at_reads else (None, reads)
  h, _, _ = module.run_blocks(input_ids, attention_mask, block_index, block_valid,
                              positions=packed[0], segments=packed[1], rows=rows, prefix=prefix)
  # The variant's own output: the model's head, not a translator (row L is zero).
  return lens(module, unembed, h, reads_in_rows, module.cfg.num_layers, translators)


def default_in_flight() -> int | None:
  """Masks live at once by default: one on the CPU (a vmapped group is no faster there and
  holds every member's activations: 164 MB against 16 MB for 16 masks of a 16-block
  model, 16 items), every mask of a call on an accelerator (which needs the batch)."""
  return 1 if jax.default_backend() == "cpu" else None


def map_masks(fn, in_flight: int | None, *xs):
  """`fn` over the leading (mask) axis of `xs`: vmapped all at once (`in_flight` None), or
  `in_flight` masks at a time in a loop, so only that many masks' activations are live."""
  if in_flight is None or in_flight >= jax.tree.leaves(xs[0])[0].shape[0]:
    return jax.vmap(fn)(*xs)
  return jax.lax.map(lambda x: fn(*x), xs, batch_size=in_flight)


def _readout_masks(graphdef, lens, final_only, in_flight, last_at_reads, state, translators,
                   input_ids, attention_mask, reads, packed, prefix, block_index,
                   block_valid) -> Readout:
  module = nnx.merge(graphdef, state)
  fn = (functools.partial(final_readout, last_at_reads=last_at_reads) if final_only
        else decision_readout)
  one = lambda index, valid: fn(module, lens, input_ids, attention_mask, reads, packed,
                                translators, index, valid, prefix)
  return map_masks(one, in_flight, block_index, block_valid)


def shared_prefix(batch: Batch) -> tuple | None:
  """The batch's shared prefix as (ids, mask) `[P]`, or None (replicated on every device)."""
  if batch.prefix_ids is None:
    return None
  return batch.prefix_ids, batch.prefix_mask


def mask_steps(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`[M, L]` bool masks -> step indices and validity `[M, L]` (one shape for any masks)."""
  masks = np.asarray(masks, dtype=bool)
  plans = []
  for m, mask in enumerate(masks):
    if not mask.any():
      raise ValueError(f"mask {m} removes every block; keep at least one block.")
    plans.append(KeepPlan.from_mask(mask))
  return stacked_steps([p.kept for p in plans], masks.shape[1])


class DecisionReader:
  """Runs the readout of a task's items under a batch of masks, batch by batch."""

  def __init__(self, model: DecoderModel, placement=None, lens: Lens = Lens(),
               translators: Translators | None = None, in_flight: int | None = None,
               last_at_reads: bool = True):
    """`in_flight`: masks whose activations are live at once (None: every mask of a call,
    vmapped together); see `map_masks`. `last_at_reads`: final-only readouts run the last
    block's attention output and MLP only where the lens reads (see `final_readout`)."""
    self.model = model
    self.lens = lens
    self.translators = translators  # the tuned lens's, or None (the logit lens)
    self.placement = placement  # dpjax.engine.devices.Placement, or None for the default device
    self._fns = self.programs(model.graphdef, lens, in_flight, last_at_reads)

  @staticmethod
  @functools.lru_cache(maxsize=64)
  def programs(graphdef, lens: Lens, in_flight: int | None, last_at_reads: bool) -> dict:
    """The jitted readouts of a chunk of masks, per-layer (False) and final-only (True);
    the same programs for the same arguments (readers of one model share compilations)."""
    return {final_only: jax.jit(functools.partial(_readout_masks, graphdef, lens, final_only,
                                                  in_flight, last_at_reads))
            for final_only in (False, True)}

  def readout_batch(self, batch: Batch, masks: np.ndarray, final_only: bool = False) -> Readout:
    """Readouts `[M, L+1, B, K]` of one token batch under `masks` `[M, L]` (`final_only`:
    the last kept block's, `[M, B, K]`)."""
    masks = np.asarray(masks)
    chex.assert_shape(masks, (None, self.model.num_layers))
    index, valid = mask_steps(masks)
    put = (lambda x: x) if self.placement is None else self.placement.items
    return self._fns[final_only](self.model.state, self.translators, put(batch.input_ids),
                                 put(batch.attention_mask), Reads.of(batch, put),
                                 packing(batch, put), shared_prefix(batch), index, valid)

  def run(self, encoded: EncodedTask, masks: np.ndarray | None = None, *, batch_size: int = 16,
          pad_id: int = 0, progress: bool = True, description: str = "readout",
          prepared: list[Batch] | None = None, final_only: bool = False) -> Readout:
    """Readouts `[M, L+1, N, K]` in item order (masks None: the unpruned model).

    `prepared`: the token batches of `encoded`, when the caller already made them.
    `final_only`: only the last kept block's layer is read (the lens runs once per
    mask instead of once per layer); every other layer is NaN.
    """
    if encoded.format != self.lens.format:
      raise ValueError(f"the items are encoded in the {encoded.format} format, the lens reads "
                       f"the {self.lens.format} format.")
    if masks is None:
      masks = np.ones((1, self.model.num_layers), dtype=bool)
    masks = np.asarray(masks, dtype=bool)
    n, k = len(encoded.items), encoded.num_option_columns
    m, layers = len(masks), self.model.num_layers + 1
    options = np.full((m, layers, n, k), np.nan, np.float32)
    normalizer = np.full((m, layers, n), np.nan, np.float32)
    logprob = (np.full((m, layers, n, k), np.nan, np.float32) if encoded.format == "cloze"
               else None)
    todo = prepared if prepared is not None else batches(encoded, batch_size, pad_id)
    bar = Progress(len(todo), description, enabled=progress)
    # final_only: each mask's one readout goes to its last kept block's layer.
    last = np.array([int(np.flatnonzero(mask)[-1]) + 1 for mask in masks])[:, None]
    for batch in todo:
      out = self.readout_batch(batch, masks, final_only)
      rows = batch.index >= 0
      items = batch.index[rows]
      targets = [(options, out.option_logits), (normalizer, out.log_normalizer),
                 (logprob, out.option_logprob)]
      for target, value in targets:
        if target is None:
          continue
        value = fetch(value)
        if final_only:
          target[np.arange(m)[:, None], last, items[None, :]] = value[:, rows][..., :k] \
              if value.ndim == 3 else value[:, rows]
        else:
          target[:, :, items] = value[:, :, rows][..., :k] if value.ndim == 4 else value[:, :, rows]
      bar.update()
    bar.close()
    return Readout(options, normalizer, logprob)
