"""Serving a pruned variant: prefill and greedy decoding with a KV cache.

    from dpjax.serve import server as serve
    server = serve.Server(model, keep=dpjax.keep_mask(kept, model.num_layers))
    tokens = server.generate(input_ids, attention_mask, max_new_tokens=32)

The kept blocks are *gathered* (the scan steps slice them out of the stacked
weights), so a variant that keeps 12 of 16 blocks runs 12 blocks per token and
holds a KV cache for 12 blocks only. This is what "physically pruned" means in
the benchmarks: the same work as a checkpoint exported with the blocks deleted.

Prompts may be left-padded (`attention_mask` 0 on pads): positions count real
tokens only and pad slots of the cache are never attended to, so each row
generates what it would generate alone. Decoding is greedy (argmax), the whole
loop one compiled program (`jax.lax.fori_loop`); the cache is a carried
`[kept, B, S, kv_heads, head_dim]` pair updated in place.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from dpjax.model.transformer import (DecoderModel, ResidualNoise, add_residual_noise,
                                     noise_row_keys)

from dpjax.model.block import AttentionContext

from dpjax.model.layers import rope_inv_freq, rope_tables
from dpjax.model.plan import KeepPlan

Array = jax.Array


class KVCache(NamedTuple):
  """Keys and values of every kept block for `S` slots; which slots hold real tokens."""
  k: Array         # [n, B, S, kv_heads, head_dim]
  v: Array         # [n, B, S, kv_heads, head_dim]
  valid: Array     # [B, S] bool
  next_slot: Array  # [] int32: the slot the next token is written to
  position: Array  # [B] int32: the next token's rotary position (real tokens so far)


def _attention_masks(valid: Array, query_slots: Array, window: int | None) -> tuple[Array, Array]:
  """`[B, T, S]` full and sliding masks: query slot `t` may see key slot `s <= t` that
  holds a real token (and, sliding, `t - s < window`, on slots as HF counts positions in
  a padded batch)."""
  s = jnp.arange(valid.shape[1])
  causal = s[None, :] <= query_slots[:, None]
  full = causal[None] & valid[:, None, :]
  if window is None:
    return full, full
  return full, full & ((query_slots[:, None] - s[None, :]) < window)[None]


def _run_cached(module, h: Array, positions: Array, cache: KVCache, block_index: Array,
                block_valid: Array, noise: tuple[Array, Array] | None = None
                ) -> tuple[Array, KVCache]:
  """Runs the kept blocks on `h` `[B, T, d]` (the tokens of slots `next_slot..+T`),
  writing their keys and values into the cache. An invalid step (padding of a
  bucketed plan) leaves `h` as it is. `noise` (`[L]` scales, `[B]` row keys): the noise
  probe's residual noise after each block that runs (`ResidualNoise`), keyed by the
  tokens' `positions`, as the sweep keys it."""
  cfg = module.cfg
  t = h.shape[1]
  cos, sin = rope_tables(positions, jnp.asarray(rope_inv_freq(cfg)))
  cos_local, sin_local = cos, sin
  local_rope = cfg.local_rope_theta is not None
  if local_rope:
    cos_local, sin_local = rope_tables(positions, jnp.asarray(rope_inv_freq(cfg, local=True)))
  query_slots = cache.next_slot + jnp.arange(t)
  full, sliding = _attention_masks(cache.valid, query_slots, cfg.sliding_window)
  ctx = AttentionContext(cos, sin, full, sliding, cos_local, sin_local)
  is_sliding = jnp.asarray(cfg.layer_is_sliding)
  graphdef, block_state = nnx.split(module.blocks)

  def body(step, carry):
    h, k_all, v_all = carry
    state = jax.tree.map(lambda w: w[block_index[step]], block_state)
    block = nnx.merge(graphdef, state)
    mask, cos, sin = ctx.for_block(is_sliding[block_index[step]], local_rope)
    q, k, v = block.project(h, cos, sin)
    start = (step, 0, cache.next_slot, 0, 0)
    k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), start)
    v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), start)
    out = block.attend_and_mlp(h, q, k_all[step], v_all[step], mask)
    if noise is not None:
      out = add_residual_noise(out, block_index[step] + 1, ResidualNoise(*noise, positions))
    h = jnp.where(block_valid[step], out, h)
    return h, k_all, v_all

  h, k_all, v_all = jax.lax.fori_loop(0, block_index.shape[0], body, (h, cache.k, cache.v))
  return h, cache._replace(k=k_all, v=v_all, next_slot=cache.next_slot + t)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "with_logits"))
def _generate(state, input_ids, attention_mask, block_index, block_valid, noise=None, *,
              graphdef, max_new_tokens: int, with_logits: bool = True):
  """Prefill then `max_new_tokens` greedy steps; returns tokens `[B, new]` and (with
  `with_logits`) the logits `[B, new, V]` each token was chosen from. `noise`: None, or
  (`[L]` scales, seed, `[B]` item indices) for the noise probe's residual noise.

  Jitted once for every server of a model (the graph is static), per shape.
  """
  module = nnx.merge(graphdef, state)
  if noise is not None:
    scale, seed, items = noise
    noise = (scale.astype(jnp.float32), noise_row_keys(seed, items))
  cfg = module.cfg
  b, t = input_ids.shape
  slots = t + max_new_tokens
  shape = (block_index.shape[0], b, slots, cfg.num_kv_heads, cfg.head_dim)
  real = attention_mask.astype(bool)
  cache = KVCache(
      k=jnp.zeros(shape, module.compute_dtype), v=jnp.zeros(shape, module.compute_dtype),
      valid=jnp.concatenate([real, jnp.ones((b, max_new_tokens), bool)], axis=1),
      next_slot=jnp.int32(0), position=jnp.sum(real, axis=1).astype(jnp.int32))
  positions = jnp.maximum(jnp.cumsum(real, axis=1) - 1, 0)
  h, cache = _run_cached(module, module.embed_tokens(input_ids), positions, cache, block_index,
                         block_valid, noise)
  logits = module.unembed(h[:, -1]).astype(jnp.float32)  # [B, V]

  tokens = jnp.zeros((b, max_new_tokens), jnp.int32)
  all_logits = jnp.zeros((b, max_new_tokens if with_logits else 1, cfg.vocab_size), jnp.float32)

  def step(i, carry):
    logits, cache, tokens, all_logits = carry
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B]
    tokens = tokens.at[:, i].set(token)
    if with_logits:
      all_logits = all_logits.at[:, i].set(logits)
    h, cache = _run_cached(module, module.embed_tokens(token[:, None]),
                           cache.position[:, None], cache, block_index, block_valid, noise)
    cache = cache._replace(position=cache.position + 1)
    return module.unembed(h[:, -1]).astype(jnp.float32), cache, tokens, all_logits

  # The last step's forward is not needed: its token is chosen from the logits in hand.
  logits, cache, tokens, all_logits = jax.lax.fori_loop(
      0, max_new_tokens - 1, step, (logits, cache, tokens, all_logits))
  last = max_new_tokens - 1
  tokens = tokens.at[:, last].set(jnp.argmax(logits, axis=-1).astype(jnp.int32))
  return tokens, (all_logits.at[:, last].set(logits) if with_logits else None)


class Server:
  """Greedy generation from `model` with only the blocks in `keep` run (gathered).

  With `bucketed`, the kept blocks are padded to the plan's shape bucket (the
  padding steps are identity), so servers of many pruned variants share a few
  compiled programs; without it (the default, what throughput is measured on)
  exactly the kept blocks run.
  """

  def __init__(self, model: DecoderModel, keep=None, *, bucketed: bool = False):
    self.plan = KeepPlan.from_mask(keep, model.num_layers)
    self.model = model
    if bucketed:
      self.block_index, self.block_valid = self.plan.steps()
    else:
      self.block_index = np.asarray(self.plan.kept, np.int32)
      self.block_valid = np.ones(len(self.block_index), bool)

  def _inputs(self, input_ids, attention_mask):
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2 or not np.issubdtype(input_ids.dtype, np.integer):
      raise ValueError(f"input_ids must be [batch, tokens] integer ids, got shape "
                       f"{input_ids.shape} and dtype {input_ids.dtype}.")
    if attention_mask is None:
      attention_mask = np.ones(input_ids.shape, np.int32)
    attention_mask = np.asarray(attention_mask)
    if attention_mask.shape != input_ids.shape:
      raise ValueError(f"attention_mask has shape {attention_mask.shape}, input_ids "
                       f"{input_ids.shape}; they must match.")
    if not attention_mask[:, -1].all():
      raise ValueError("prompts must be left-padded: the last column of attention_mask "
                       "must be 1 in every row.")
    return input_ids, attention_mask

  def prefill(self, input_ids, attention_mask=None) -> Array:
    """Next-token logits `[B, V]` after the prompts (a prefill with a KV cache)."""
    input_ids, attention_mask = self._inputs(input_ids, attention_mask)
    _, logits = _generate(self.model.state, input_ids, attention_mask, self.block_index,
                          self.block_valid, graphdef=self.model.graphdef, max_new_tokens=1)
    return logits[:, 0]

  def generate(self, input_ids, attention_mask=None, *, max_new_tokens: int = 16,
               return_logits: bool = False, noise_scale=None, noise_seed: int = 0,
               items=None):
    """Greedy continuation `[B, max_new_tokens]` of left-padded prompts (and, with
    `return_logits`, the `[B, max_new_tokens, V]` float32 logits each token came from).

    `noise_scale` `[L]` (`eps` after each block, 0 for none): the noise probe's residual
    noise (`dpjax.model.transformer.ResidualNoise`) after every kept block at every
    token, prompt and generated alike, drawn as the sweep draws it: keyed by
    `noise_seed`, the row's item index (`items` `[B]`, default the row number), the block
    and the token's position. A noised variant's first token is then chosen from the
    same logits as the noise probe's final readout of it."""
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={max_new_tokens}; generate at least 1 token.")
    input_ids, attention_mask = self._inputs(input_ids, attention_mask)
    limit = self.model.config.max_position_embeddings
    if input_ids.shape[1] + max_new_tokens > limit:
      raise ValueError(f"{input_ids.shape[1]} prompt tokens + max_new_tokens={max_new_tokens} "
                       f"exceed the model's max_position_embeddings={limit}.")
    noise = None
    if noise_scale is not None:
      noise_scale = np.asarray(noise_scale, np.float32)
      if noise_scale.shape != (self.model.num_layers,) or not np.all(np.isfinite(noise_scale)) \
          or (noise_scale < 0).any():
        raise ValueError(f"noise_scale must be [{self.model.num_layers}] finite values >= 0; "
                         f"got shape {noise_scale.shape}.")
      items = np.arange(len(input_ids)) if items is None else np.asarray(items)
      if items.shape != (len(input_ids),):
        raise ValueError(f"items must give one item index per row ({len(input_ids)}); got "
                         f"shape {items.shape}.")
      noise = (noise_scale, np.int32(noise_seed), items.astype(np.int32))
    tokens, logits = _generate(self.model.state, input_ids, attention_mask, self.block_index,
                               self.block_valid, noise, graphdef=self.model.graphdef,
                               max_new_tokens=max_new_tokens, with_logits=return_logits)
    return (tokens, logits) if return_logits else tokens
