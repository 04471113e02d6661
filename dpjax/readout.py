"""Per-layer decision readouts: the logit lens at the answer position, for many masks.

One forward pass gives, for every item and for `h_0` and every kept block, the
lens logits of the answer options and the full-vocabulary log-normalizer:

    z_l = W_U · norm_f(h_l)      (the model's own final norm and unembedding, and its
                                  final soft-capping when it has one)

The lens is applied inside the block scan to the answer-position residual only
(`h[:, -1]`, the batches are left-padded), so neither `[B, T, V]` logits nor
`[L, B, T, d]` residuals are ever materialized. It runs in float32 even when the
model runs in bfloat16. Vmapped over a batch of masks, the outputs are
`[masks, layers+1, items, ...]`; a removed block's layer is NaN (missing).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from dpjax.distributed import fetch
from dpjax.model import DecoderModel, Transformer, rms_norm, soft_cap
from dpjax.plan import KeepPlan, bucket_size, layers_from_steps, stacked_steps
from dpjax.progress import Progress
from dpjax.tasks import Batch, EncodedTask, batches


class Readout(NamedTuple):
  """Lens readouts. Leading axes `[..., layers+1, items]`.

  option_logits: `[..., L+1, N, K]` float32 `z_l[c_k]`; NaN at removed layers,
    -inf past an item's own options.
  log_normalizer: `[..., L+1, N]` float32 `logsumexp_v z_l[v]`; NaN at removed
    layers.
  """
  option_logits: jax.Array | np.ndarray
  log_normalizer: jax.Array | np.ndarray


def unembedding_f32(module: Transformer) -> jax.Array:
  """`[V, d]` float32 unembedding (tied: the embedding)."""
  if module.lm_head is None:
    return module.embed[...].astype(jnp.float32)
  return module.lm_head[...].astype(jnp.float32).T


def lens(module: Transformer, unembed: jax.Array, h: jax.Array,
         letter_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Logit lens of residuals `h` `[B, d]`: option logits `[B, K]`, log-normalizer `[B]`."""
  cfg = module.cfg
  x = rms_norm(h.astype(jnp.float32), module.final_norm[...].astype(jnp.float32),
               cfg.rms_norm_eps, cfg.norm_kind)
  logits = jnp.einsum("bd,vd->bv", x, unembed, precision=jax.lax.Precision.HIGHEST)
  logits = soft_cap(logits, cfg.final_logit_softcap)  # as the model's own logits
  log_normalizer = jax.nn.logsumexp(logits, axis=-1)
  options = jnp.take_along_axis(logits, jnp.maximum(letter_ids, 0), axis=-1)
  options = jnp.where(letter_ids >= 0, options, -jnp.inf)
  return options, log_normalizer


def decision_readout(module: Transformer, input_ids, attention_mask, letter_ids, block_index,
                     block_valid) -> Readout:
  """Readouts `[L+1, B, K]` / `[L+1, B]` of one mask given as steps.

  `block_index` `[n]` and `block_valid` `[n]`: the blocks to run in order (see
  `Transformer.run_blocks`); layer `1 + block_index[s]` is filled for valid
  steps, every other block layer is NaN.
  """
  unembed = unembedding_f32(module)
  readout = lambda h: lens(module, unembed, h[:, -1], letter_ids)
  _, first, per_step = module.run_blocks(input_ids, attention_mask, block_index, block_valid,
                                         readout=readout)
  return Readout(*layers_from_steps(first, per_step, block_index, block_valid,
                                    module.cfg.num_layers))


def _readout_masks(graphdef, state, input_ids, attention_mask, letter_ids, block_index,
                   block_valid) -> Readout:
  module = nnx.merge(graphdef, state)
  one = functools.partial(decision_readout, module, input_ids, attention_mask, letter_ids)
  return jax.vmap(one)(block_index, block_valid)


def mask_steps(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`[M, L]` bool masks -> step indices and validity `[M, n]`, `n` the bucket of the
  largest kept count."""
  masks = np.asarray(masks, dtype=bool)
  plans = []
  for m, mask in enumerate(masks):
    if not mask.any():
      raise ValueError(f"mask {m} removes every block; keep at least one block.")
    plans.append(KeepPlan.from_mask(mask))
  size = bucket_size(max(p.num_kept for p in plans), masks.shape[1])
  return stacked_steps([p.kept for p in plans], size)


class DecisionReader:
  """Runs the readout of a task's items under a batch of masks, batch by batch."""

  def __init__(self, model: DecoderModel, placement=None):
    self.model = model
    self.placement = placement  # dpjax.distributed.Placement, or None for the default device
    self._fn = jax.jit(functools.partial(_readout_masks, model.graphdef))

  def readout_batch(self, batch: Batch, masks: np.ndarray) -> Readout:
    """Readouts `[M, L+1, B, K]` of one token batch under `masks` `[M, L]`."""
    masks = np.asarray(masks)
    chex.assert_shape(masks, (None, self.model.num_layers))
    index, valid = mask_steps(masks)
    put = (lambda x: x) if self.placement is None else self.placement.items
    return self._fn(self.model.state, put(batch.input_ids), put(batch.attention_mask),
                    put(batch.letter_ids), index, valid)

  def run(self, encoded: EncodedTask, masks: np.ndarray | None = None, *, batch_size: int = 16,
          pad_id: int = 0, progress: bool = True, description: str = "readout",
          prepared: list[Batch] | None = None) -> Readout:
    """Readouts `[M, L+1, N, K]` in item order (masks None: the unpruned model).

    `prepared`: the token batches of `encoded`, when the caller already made them.
    """
    if masks is None:
      masks = np.ones((1, self.model.num_layers), dtype=bool)
    masks = np.asarray(masks, dtype=bool)
    n, k = len(encoded.items), encoded.letter_ids.shape[1]
    m, layers = len(masks), self.model.num_layers + 1
    options = np.full((m, layers, n, k), np.nan, np.float32)
    normalizer = np.full((m, layers, n), np.nan, np.float32)
    todo = prepared if prepared is not None else batches(encoded, batch_size, pad_id)
    bar = Progress(len(todo), description, enabled=progress)
    for batch in todo:
      out = self.readout_batch(batch, masks)
      rows = batch.index >= 0
      options[:, :, batch.index[rows]] = fetch(out.option_logits)[:, :, rows]
      normalizer[:, :, batch.index[rows]] = fetch(out.log_normalizer)[:, :, rows]
      bar.update()
    bar.close()
    return Readout(options, normalizer)
