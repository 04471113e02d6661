"""The Llama-family decoder as a Flax NNX module whose block stack is one scan.

Every block's weights are stacked on a leading layer axis (`[layers, ...]`), and
the stack runs as a single `jax.lax.scan`. Which blocks run is an *input*:

* mask form: scan over all blocks, a removed block is the identity on the
  residual stream (`where(keep[l], block(h), h)`). One compilation serves every
  mask, but every block is computed.
* gather form: the kept blocks' weights are gathered by index and only they
  run, in a loop whose trip count is the number kept (data, not shape), so a
  variant that keeps 10 of 32 blocks costs 10 blocks and one compiled program
  serves every mask.

Both give the same numbers; `DecoderModel` wraps them behind `logits` and
`hidden_states`. Either form also takes Gaussian noise added to the residual stream
after chosen blocks as an optional input (`ResidualNoise`, the noise probe). The
arithmetic mirrors Hugging Face's Llama, Mistral, Qwen2 and Qwen3 modelling code
(norms and softmax in float32, rotary tables in float32), so float32 logits agree
with HF to float32 precision.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from dpjax.model.config import ModelConfig
from dpjax.model.plan import KeepPlan

Array = jax.Array

from dpjax.model.block import AttentionContext, Block
from dpjax.model.layers import (CPU_DOT_CHUNK, _param, rms_norm, rope_inv_freq, rope_tables,
                                soft_cap)


class ResidualNoise(NamedTuple):
  """Gaussian noise added to the residual stream after chosen blocks (the noise probe).

  After block `l` (1-based) runs, the residual `h` of a row at each position becomes
  `h + scale[l - 1] * sigma(h) * z`: `sigma(h)` the standard deviation of that
  position's residual over the hidden dimension (float32, population), `z ~ N(0, I)`
  `[d]` drawn by `noise_draw(row_keys[b], l, positions[b, t], d)`. A block whose scale
  is 0 leaves the stream exactly as it is (bit for bit). The draw depends only on the
  row's key (a seed and an item: `noise_row_keys`), the block and the position, never
  on the batch or the other rows, so it is the same in any batch and any padding.

  scale: `[L]` float32 `eps` per block (the level `eps^2` is the noise's variance
    relative to the row's).
  row_keys: `[B]` typed PRNG keys, one per row (`noise_row_keys`).
  positions: `[B, T]` int: the position each column's draw is keyed by (a row's real
    tokens count from 0, as `Transformer.attention_context` counts them).
  """
  scale: Array
  row_keys: Array
  positions: Array


def noise_row_keys(seed, items) -> Array:
  """`[B]` keys of the rows holding `items` `[B]` (item indices; a negative index, a
  filler row, is keyed as item 0) under noise seed `seed`:
  `fold_in(jax.random.key(seed), item)`."""
  base = jax.random.key(seed)
  return jax.vmap(lambda item: jax.random.fold_in(base, item))(jnp.maximum(items, 0))


def noise_draw(row_key: Array, block, positions: Array, size: int) -> Array:
  """`z` `[T, size]` float32 of one row after `block` (1-based): position `p`'s draw is
  `jax.random.normal(fold_in(fold_in(row_key, block), p), (size,))`."""
  key = jax.random.fold_in(row_key, block)
  return jax.vmap(lambda p: jax.random.normal(jax.random.fold_in(key, p), (size,),
                                              jnp.float32))(positions)


def add_residual_noise(h: Array, block, noise: ResidualNoise) -> Array:
  """`h` `[B, T, d]` after `block` (1-based, may be traced) with `noise` added (see
  `ResidualNoise`); exactly `h` where the block's scale is 0."""
  eps = noise.scale[block - 1]
  z = jax.vmap(noise_draw, in_axes=(0, None, 0, None))(noise.row_keys, block, noise.positions,
                                                      h.shape[-1])
  x = h.astype(jnp.float32)
  noised = (x + eps * jnp.std(x, axis=-1, keepdims=True) * z).astype(h.dtype)
  return jnp.where(eps > 0, noised, h)


class Transformer(nnx.Module):
  """Embedding, the stacked blocks (leading axis = layer), final norm, unembedding."""

  def __init__(self, cfg: ModelConfig, *, compute_dtype=None, dot_chunk: int | None | str = "auto",
               rngs: nnx.Rngs):
    """`dot_chunk`: see `CPU_DOT_CHUNK`; "auto" chunks float32 blocks on the CPU backend."""
    self.cfg = cfg
    self.compute_dtype = jnp.dtype(compute_dtype or cfg.param_dtype)
    self.precision = (jax.lax.Precision.HIGHEST if self.compute_dtype == jnp.float32
                      else jax.lax.Precision.DEFAULT)
    if dot_chunk == "auto":
      dot_chunk = (CPU_DOT_CHUNK if self.compute_dtype == jnp.float32
                   and jax.default_backend() == "cpu" else None)
    pd = jnp.dtype(cfg.param_dtype)
    self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), pd, "normal")

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs: nnx.Rngs) -> Block:
      return Block(cfg, precision=self.precision, dot_chunk=dot_chunk, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = _param(rngs, (cfg.hidden_size,), pd,
                             "zeros" if cfg.norm_kind == "gemma" else "ones")
    self.lm_head = (None if cfg.tie_word_embeddings else
                    _param(rngs, (cfg.hidden_size, cfg.vocab_size), pd, "normal"))

  def embed_tokens(self, input_ids: Array) -> Array:
    embed = self.embed[...]
    x = jnp.take(embed, input_ids, axis=0)
    if self.cfg.embed_scale:  # HF casts sqrt(hidden) to the embedding's dtype first.
      x = x * jnp.asarray(math.sqrt(self.cfg.hidden_size), jnp.float32).astype(embed.dtype)
    return x.astype(self.compute_dtype)

  def final_norm_of(self, h: Array) -> Array:
    """The final norm, in `h`'s dtype."""
    return rms_norm(h, self.final_norm[...], self.cfg.rms_norm_eps, self.cfg.norm_kind)

  def unembed(self, h: Array) -> Array:
    """Final norm, unembedding and any final soft-capping: `[..., d]` -> `[..., V]` logits."""
    x = self.final_norm_of(h.astype(self.compute_dtype))
    if self.lm_head is None:
      w = self.embed[...].astype(x.dtype)
      logits = jnp.einsum("...d,vd->...v", x, w, precision=self.precision)
    else:
      w = self.lm_head[...].astype(x.dtype)
      logits = jnp.einsum("...d,dv->...v", x, w, precision=self.precision)
    return soft_cap(logits, self.cfg.final_logit_softcap)

  def attention_context(self, attention_mask: Array, positions: Array | None = None,
                        segments: Array | None = None,
                        prefix_mask: Array | None = None) -> "AttentionContext":
    """Rotary tables and attention masks for a `[B, T]` padding mask (1 = token).

    `positions` `[B, T]` default to counting real tokens only, so a left-padded
    row sees the same positions as the same prompt unpadded. `segments` `[B, T]`
    (packed cloze sequences): a token attends to earlier tokens of segment 0
    and of its own segment only. Sliding windows count positions, which for a
    left-padded row is the same as counting columns.

    `prefix_mask` `[P]` (1 = token; left-padded): every row continues one shared
    prefix of that many tokens, run once as its own row (`ctx.prefix`); a row's
    positions start after it, and its masks `[B, T, P + T]` let every token
    attend to the whole prefix first (within a sliding window, by position).
    """
    cfg = self.cfg
    attention_mask = attention_mask.astype(bool)
    if prefix_mask is not None:
      if segments is not None or positions is not None:
        raise ValueError("a shared prefix sets the rows' positions itself; it cannot be "
                         "combined with given positions or packed segments.")
      prefix_mask = prefix_mask.astype(bool)
      prefix = self.attention_context(prefix_mask[None])
      shared = jnp.sum(prefix_mask.astype(jnp.int32))
      positions = shared + jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
      own = self.attention_context(attention_mask, positions)
      b = attention_mask.shape[0]
      prefix_positions = jnp.maximum(jnp.cumsum(prefix_mask) - 1, 0)
      to_prefix = jnp.broadcast_to(prefix_mask[None, None, :], (b, *own.full_mask.shape[1:2],
                                                                prefix_mask.shape[0]))
      full = jnp.concatenate([to_prefix, own.full_mask], axis=-1)
      sliding = full
      if cfg.sliding_window is not None:
        keys = jnp.concatenate([jnp.broadcast_to(prefix_positions, (b, prefix_mask.shape[0])),
                                positions], axis=-1)
        sliding = full & ((positions[:, :, None] - keys[:, None, :]) < cfg.sliding_window)
      return own._replace(full_mask=full, sliding_mask=sliding, prefix=prefix)
    if positions is None:
      positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
    cos, sin = rope_tables(positions, jnp.asarray(rope_inv_freq(cfg)))
    cos_local, sin_local = cos, sin
    if cfg.local_rope_theta is not None:
      cos_local, sin_local = rope_tables(positions, jnp.asarray(rope_inv_freq(cfg, local=True)))
    t = attention_mask.shape[1]
    idx = jnp.arange(t)
    causal = idx[None, :] <= idx[:, None]
    full_mask = causal[None] & attention_mask[:, None, :]
    if segments is not None:
      key = segments[:, None, :]
      full_mask = full_mask & ((key == 0) | (key == segments[:, :, None]))
    if cfg.sliding_window is not None:
      window = (positions[:, :, None] - positions[:, None, :]) < cfg.sliding_window
      sliding_mask = full_mask & window
    else:
      sliding_mask = full_mask
    return AttentionContext(cos, sin, full_mask, sliding_mask, cos_local, sin_local)

  def scan_blocks(self, h: Array, ctx: "AttentionContext", block_index: Array | None,
                  block_valid: Array, readout: Callable[[Array], Any] | None = None,
                  rows: Array | None = None, noise: ResidualNoise | None = None):
    """Runs blocks on the residual stream `h` `[B, T, d]` as one loop.

    Args:
      h: the residual stream the first step reads; with a shared prefix
        (`ctx.prefix`, gather form only), the pair (rows `[B, T, d]`, prefix
        `[1, P, d]`), which every step and readout sees and the loop returns.
      ctx: from `attention_context`.
      block_index: `[n]` int indices of the blocks to run, in order (gather
        form: step `s` slices block `block_index[s]` out of the stacked
        weights, so no copy of the kept weights is made and a batch of masks
        can be vmapped over it), or None to scan every block in order (mask
        form).
      block_valid: `[n]` bool. Gather form: the valid steps come first, and
        the loop runs exactly as many steps as there are valid ones (a trip
        count that is data, so one compiled program serves every kept count).
        Mask form: a False step is the identity.
      readout: optional function `readout(h, layer)` of the residual stream
        `[B, T, d]` after every step and of its layer (`1 + block index`, a
        traced int); its results come back stacked.
      rows: optional `[B, R]` positions, the only ones read after the last step
        (gather form, no readout): the last block computes keys and values at
        every position (the prefix's too) but its attention output and MLP only
        at these, and the final residual comes back as `[B, R, d]` (exactly
        those rows of the whole computation).
      noise: optional `ResidualNoise` added to the stream after every block that runs
        (before the readout sees it; with `rows`, after the last block at those rows
        only). Not with a shared prefix: the prefix's stream is shared by every row,
        a row's noise is its own.

    Returns:
      The final residual `[B, T, d]` (`[B, R, d]` with `rows`) and the stacked
      readouts `[n, ...]` (None without a readout; gather form: entries past the
      valid steps are zeros).
    """
    graphdef, block_state = nnx.split(self.blocks)
    is_sliding = jnp.asarray(self.cfg.layer_is_sliding)
    local_rope = self.cfg.local_rope_theta is not None

    def run(h, state, sliding):
      block = nnx.merge(graphdef, state)
      mask, cos, sin = ctx.for_block(sliding, local_rope)
      if ctx.prefix is None:
        return block(h, cos, sin, mask)
      h, hp = h  # the rows, and the shared prefix `[1, P, d]` they continue
      kp, vp, hp = prefix_step(block, hp, sliding, True)
      q, k, v = block.project(h, cos, sin)
      return block.attend_and_mlp(h, q, *with_prefix(kp, vp, k, v), mask), hp

    def prefix_step(block, hp, sliding, whole):
      """The prefix's keys and values in `block`, and (`whole`) its output."""
      mask, cos, sin = ctx.prefix.for_block(sliding, local_rope)
      q, k, v = block.project(hp, cos, sin)
      return k, v, (block.attend_and_mlp(hp, q, k, v, mask) if whole else hp)

    def with_prefix(kp, vp, k, v):  # the prefix's keys first, for every row
      grow = lambda p, x: jnp.concatenate([jnp.broadcast_to(p, (x.shape[0], *p.shape[1:])), x], 1)
      return grow(kp, k), grow(vp, v)

    if ctx.prefix is not None and block_index is None:
      raise ValueError("a shared prefix runs in the gather form only (give block_index).")
    if ctx.prefix is not None and noise is not None:
      raise ValueError("residual noise is drawn per row; run the batch without a shared "
                       "prefix (Batch.unshared()).")

    def perturbed(h, layer):  # after block `layer` (1-based) ran
      return h if noise is None else add_residual_noise(h, layer, noise)

    if block_index is None:
      def body(h, x):
        state, valid, sliding, layer = x
        h = jnp.where(valid, perturbed(run(h, state, sliding), layer), h)
        return h, (None if readout is None else readout(h, layer))
      layers = jnp.arange(1, self.cfg.num_layers + 1, dtype=jnp.int32)
      return jax.lax.scan(body, h, (block_state, block_valid, is_sliding, layers))

    steps = block_index.shape[0]
    outs = None
    if readout is not None:
      outs = jax.tree.map(lambda v: jnp.zeros((steps, *v.shape), v.dtype),
                          jax.eval_shape(readout, h, jnp.int32(0)))

    def loop(s, carry):
      h, outs = carry
      index = block_index[s]
      h = perturbed(run(h, jax.tree.map(lambda w: w[index], block_state), is_sliding[index]),
                    index + 1)
      if readout is not None:
        outs = jax.tree.map(lambda buf, v: buf.at[s].set(v), outs, readout(h, index + 1))
      return h, outs

    count = jnp.sum(block_valid.astype(jnp.int32))
    if rows is None:
      return jax.lax.fori_loop(0, count, loop, (h, outs))
    if readout is not None:
      raise ValueError("rows= reads the last step only; it takes no per-step readout.")
    h, _ = jax.lax.fori_loop(0, jnp.maximum(count - 1, 0), loop, (h, outs))

    def take(x):  # rows of `x` [B, T, ...] -> [B, R, ...]
      return jnp.take_along_axis(x, rows.reshape(rows.shape + (1,) * (x.ndim - 2)), axis=1)

    def last_block(h):
      index = block_index[count - 1]
      block = nnx.merge(graphdef, jax.tree.map(lambda w: w[index], block_state))
      mask, cos, sin = ctx.for_block(is_sliding[index], local_rope)
      if ctx.prefix is not None:  # the prefix gives its keys and values only
        h, hp = h
        kp, vp, _ = prefix_step(block, hp, is_sliding[index], False)
      q, k, v = block.project(h, cos, sin)
      if ctx.prefix is not None:
        k, v = with_prefix(kp, vp, k, v)
      out = block.attend_and_mlp(take(h), take(q), k, v, take(mask))
      if noise is None:
        return out
      return add_residual_noise(out, index + 1, noise._replace(positions=take(noise.positions)))

    def rows_only(h):
      return take(h if ctx.prefix is None else h[0])

    # A drop-one candidate may have no step left (it dropped the last block).
    return jax.lax.cond(count > 0, last_block, rows_only, h), None

  def run_blocks(self, input_ids: Array, attention_mask: Array, block_index: Array | None,
                 block_valid: Array, readout: Callable[[Array], Any] | None = None,
                 positions: Array | None = None, segments: Array | None = None,
                 rows: Array | None = None, prefix: tuple[Array, Array] | None = None,
                 noise: ResidualNoise | None = None):
    """Embeds `input_ids` `[B, T]` and runs the blocks (see `scan_blocks`, also for
    `rows` and `noise`; `positions`, `segments`: see `attention_context`). `prefix`:
    (ids, mask) `[P]` of a prefix every row continues, computed once (the readout then
    sees the pair (rows, prefix), see `scan_blocks`).

    Returns the final residual of the rows `[B, T, d]`, `readout(h_0, 0)`, and the
    stacked readouts after each step `[n, ...]` (both None without a readout).
    """
    h0 = self.embed_tokens(input_ids)
    if prefix is not None:
      ctx = self.attention_context(attention_mask, positions, segments, prefix_mask=prefix[1])
      h0 = (h0, self.embed_tokens(prefix[0][None]))
    else:
      ctx = self.attention_context(attention_mask, positions, segments)
    h, per_step = self.scan_blocks(h0, ctx, block_index, block_valid, readout, rows=rows,
                                   noise=noise)
    if prefix is not None and rows is None:
      h = h[0]
    return h, (None if readout is None else readout(h0, jnp.int32(0))), per_step


# ----------------------------------------------------------------------------
# Pure forward functions (jit-compiled by DecoderModel).


def _forward(graphdef, state, input_ids, attention_mask, block_index, block_valid,
             hidden_source, *, want: str):
  model = nnx.merge(graphdef, state)
  if want == "logits":
    h, _, _ = model.run_blocks(input_ids, attention_mask, block_index, block_valid)
    return model.unembed(h)
  _, h0, per_block = model.run_blocks(input_ids, attention_mask, block_index, block_valid,
                                      readout=lambda h, layer: h)
  # Residual stream after every original block: [h_0, outputs of the steps...]
  # re-indexed so that a removed block repeats its input.
  stream = jnp.concatenate([h0[None], per_block], axis=0)
  return jnp.take(stream, hidden_source, axis=0)


class DecoderModel:
  """A converted checkpoint ready to run: the public Python API of dpjax.

  `logits(input_ids, keep=None)` -> `[B, T, V]` and
  `hidden_states(input_ids, keep=None)` -> `[L+1, B, T, d]` (the residual stream
  before the final norm; HF's last `hidden_states` entry is after it). `keep`
  is a boolean vector over blocks; None keeps all.
  """

  def __init__(self, config: ModelConfig, params: dict[str, Any], *, compute_dtype=None,
               source: str | None = None):
    self.config = config
    self.source = source  # where it was loaded from (a directory or a GGUF file)
    abstract = nnx.eval_shape(
        lambda: Transformer(config, compute_dtype=compute_dtype, rngs=nnx.Rngs(0)))
    self.graphdef, state = nnx.split(abstract)
    _check_params(nnx.to_pure_dict(state), params)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    self.state = state
    self.compute_dtype = abstract.compute_dtype
    self._jitted = {
        want: jax.jit(functools.partial(_forward, self.graphdef, want=want))
        for want in ("logits", "hidden_states")
    }

  @classmethod
  def from_module(cls, module: Transformer) -> "DecoderModel":
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module)))
    return cls(module.cfg, params, compute_dtype=module.compute_dtype)

  @property
  def num_layers(self) -> int:
    return self.config.num_layers

  def place(self, placement) -> "DecoderModel":
    """Moves the weights onto `placement`'s mesh (a `dpjax.engine.devices.Placement`)."""
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(self.state))
    nnx.replace_by_pure_dict(self.state, placement.params(params))
    return self

  def params(self) -> dict[str, Any]:
    """The weights as a nested dict of arrays (dpjax names, stacked blocks)."""
    return nnx.to_pure_dict(self.state)

  def module(self) -> Transformer:
    """The NNX module, for code that wants to call its methods directly."""
    return nnx.merge(self.graphdef, self.state)

  def logits(self, input_ids, keep=None, attention_mask=None, *, gather: bool = True) -> Array:
    """`[B, T, V]` logits with only the blocks in `keep` (`[layers]` bool) run."""
    return self._run("logits", input_ids, keep, attention_mask, gather)

  def hidden_states(self, input_ids, keep=None, attention_mask=None, *,
                    gather: bool = True) -> Array:
    """`[L+1, B, T, d]`: `h_0` and the residual after every block (removed = identity)."""
    return self._run("hidden_states", input_ids, keep, attention_mask, gather)

  def _run(self, want, input_ids, keep, attention_mask, gather):
    # Host arrays go into the jitted function as they are: under a multi-process
    # mesh a single-device array could not be resharded, a numpy one can.
    input_ids = np.asarray(input_ids)
    chex.assert_rank(input_ids, 2)
    if not np.issubdtype(input_ids.dtype, np.integer):
      raise TypeError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}.")
    if attention_mask is None:
      attention_mask = np.ones(input_ids.shape, np.int32)
    attention_mask = np.asarray(attention_mask)
    chex.assert_equal_shape([input_ids, attention_mask])
    plan = KeepPlan.from_mask(keep, self.num_layers)
    if gather and not plan.is_full:
      (index, valid), source = plan.steps(), plan.hidden_source
    else:  # Mask form (also when every block is kept: there is nothing to skip).
      index, valid, source = None, plan.mask, np.arange(self.num_layers + 1, dtype=np.int32)
    return self._jitted[want](self.state, input_ids, attention_mask, index, valid, source)


def _check_params(expected: dict, given: dict, prefix: str = "") -> None:
  """Refuses a parameter tree that does not match the model's (names and shapes)."""
  missing = sorted(set(expected) - set(given))
  extra = sorted(set(given) - set(expected))
  if missing or extra:
    raise ValueError(f"parameter tree mismatch at '{prefix or '/'}': missing {missing}, "
                     f"unexpected {extra}.")
  for key, value in expected.items():
    path = f"{prefix}/{key}"
    if isinstance(value, dict):
      _check_params(value, given[key], path)
    elif tuple(value.shape) != tuple(np.shape(given[key])):
      raise ValueError(f"parameter {path} has shape {tuple(np.shape(given[key]))}, "
                       f"expected {tuple(value.shape)}.")
