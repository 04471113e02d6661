"""One pre-norm decoder block (`Block`) and what every block shares per batch
(`AttentionContext`)."""

from __future__ import annotations

from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp

from dpjax.model.config import ModelConfig

Array = jax.Array

from dpjax.model.layers import (_param, apply_rope, chunked_dot, mlp_activation, rms_norm,
                                soft_cap)


class Block(nnx.Module):
  """One pre-norm decoder block: GQA self-attention, then a gated MLP (SwiGLU or GeGLU),
  with Gemma's norms after each when the config asks.

  Parameter names are dpjax's names in the architecture tables
  (`checkpoints_convert.architectures`). Linear weights are stored `[in, out]`.
  """

  def __init__(self, cfg: ModelConfig, *, precision, dot_chunk: int | None = None,
               rngs: nnx.Rngs):
    self.cfg = cfg
    self.precision = precision
    self.dot_chunk = dot_chunk
    d, hd, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q_out, kv_out = cfg.num_heads * hd, cfg.num_kv_heads * hd
    pd = jnp.dtype(cfg.param_dtype)
    norm_init = "zeros" if cfg.norm_kind == "gemma" else "ones"  # gemma stores w of (1 + w)
    self.attn_norm = _param(rngs, (d,), pd, norm_init)
    self.q = _param(rngs, (d, q_out), pd, "normal")
    self.k = _param(rngs, (d, kv_out), pd, "normal")
    self.v = _param(rngs, (d, kv_out), pd, "normal")
    self.o = _param(rngs, (q_out, d), pd, "normal")
    self.q_bias = _param(rngs, (q_out,), pd, "zeros") if cfg.qkv_bias else None
    self.k_bias = _param(rngs, (kv_out,), pd, "zeros") if cfg.qkv_bias else None
    self.v_bias = _param(rngs, (kv_out,), pd, "zeros") if cfg.qkv_bias else None
    self.o_bias = _param(rngs, (d,), pd, "zeros") if cfg.o_bias else None
    self.q_norm = _param(rngs, (hd,), pd, norm_init) if cfg.qk_norm else None
    self.k_norm = _param(rngs, (hd,), pd, norm_init) if cfg.qk_norm else None
    self.post_attn_norm = _param(rngs, (d,), pd, norm_init) if cfg.post_norms else None
    self.mlp_norm = _param(rngs, (d,), pd, norm_init)
    self.post_mlp_norm = _param(rngs, (d,), pd, norm_init) if cfg.post_norms else None
    self.gate = _param(rngs, (d, f), pd, "normal")
    self.up = _param(rngs, (d, f), pd, "normal")
    self.down = _param(rngs, (f, d), pd, "normal")
    self.gate_bias = _param(rngs, (f,), pd, "zeros") if cfg.mlp_bias else None
    self.up_bias = _param(rngs, (f,), pd, "zeros") if cfg.mlp_bias else None
    self.down_bias = _param(rngs, (d,), pd, "zeros") if cfg.mlp_bias else None

  def _norm(self, x: Array, w: nnx.Param) -> Array:
    return rms_norm(x, w[...], self.cfg.rms_norm_eps, self.cfg.norm_kind)

  def _dense(self, x: Array, w: nnx.Param, b: nnx.Param | None) -> Array:
    y = chunked_dot(x, w[...].astype(x.dtype), self.precision, self.dot_chunk)
    return y if b is None else y + b[...].astype(x.dtype)

  def __call__(self, h: Array, cos: Array, sin: Array, mask: Array) -> Array:
    """`h` `[B, T, d]` -> `[B, T, d]`; `mask` `[B, T, S]` is True where a query may attend."""
    q, k, v = self.project(h, cos, sin)
    return self.attend_and_mlp(h, q, k, v, mask)

  def project(self, h: Array, cos: Array, sin: Array) -> tuple[Array, Array, Array]:
    """Rotated queries `[B, T, heads, hd]`, keys and values `[B, T, kv_heads, hd]` of `h`."""
    cfg = self.cfg
    b, t, _ = h.shape
    hd, kv = cfg.head_dim, cfg.num_kv_heads
    x = self._norm(h, self.attn_norm)
    q = self._dense(x, self.q, self.q_bias).reshape(b, t, cfg.num_heads, hd)
    k = self._dense(x, self.k, self.k_bias).reshape(b, t, kv, hd)
    v = self._dense(x, self.v, self.v_bias).reshape(b, t, kv, hd)
    if cfg.qk_norm:
      q = self._norm(q, self.q_norm)
      k = self._norm(k, self.k_norm)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

  def attend_and_mlp(self, h: Array, q: Array, k: Array, v: Array, mask: Array) -> Array:
    """The rest of the block: `q` `[B, T, heads, hd]` attends over `k`, `v` `[B, S, kv, hd]`
    where `mask` `[B, T, S]` allows; then the output projection and the MLP."""
    cfg = self.cfg
    b, t, _ = h.shape
    hd, kv, groups = cfg.head_dim, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads
    q = q.reshape(b, t, kv, groups, hd)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k, precision=self.precision) * cfg.attention_scale
    scores = soft_cap(scores, cfg.attn_logit_softcap)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
    attn = jnp.einsum("bkgts,bskh->btkgh", probs, v, precision=self.precision)
    out = self._dense(attn.reshape(b, t, cfg.num_heads * hd), self.o, self.o_bias)
    h = h + (out if self.post_attn_norm is None else self._norm(out, self.post_attn_norm))

    x = self._norm(h, self.mlp_norm)
    gate = mlp_activation(self._dense(x, self.gate, self.gate_bias), cfg.mlp_activation)
    mlp = self._dense(gate * self._dense(x, self.up, self.up_bias), self.down, self.down_bias)
    return h + (mlp if self.post_mlp_norm is None else self._norm(mlp, self.post_mlp_norm))


class AttentionContext(NamedTuple):
  """What every block needs besides the residual stream, computed once per batch."""
  cos: Array          # [B, T, head_dim] float32
  sin: Array          # [B, T, head_dim] float32
  full_mask: Array    # [B, T, T] bool, True where a query may attend
  sliding_mask: Array  # [B, T, T] bool, the same within the sliding window
  cos_local: Array    # [B, T, head_dim] the sliding blocks' rope (Gemma 3), else = cos
  sin_local: Array
  # A shared prefix's own context ([1, P, ...]); the masks above are then [B, T, P + T].
  prefix: "AttentionContext | None" = None

  def for_block(self, sliding, local_rope: bool):
    """The mask and rope tables of a block (`sliding`: a traced bool)."""
    mask = jnp.where(sliding, self.sliding_mask, self.full_mask)
    if not local_rope:
      return mask, self.cos, self.sin
    return (mask, jnp.where(sliding, self.cos_local, self.cos),
            jnp.where(sliding, self.sin_local, self.sin))
