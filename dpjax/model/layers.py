"""The layers a block is made of: rotary embeddings, norms, activations, the float32 dot
that sums like PyTorch's on the CPU, parameter initialization. Pure functions of arrays."""

from __future__ import annotations

import math
import os
from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from dpjax.model.config import ModelConfig

Array = jax.Array

# Float32 dots on the CPU sum each output in chunks of at most this many products,
# adding the chunk sums in order (`chunked_dot`). XLA:CPU hands float32 dots to
# YNNPACK, whose kernel sums each output in one FMA chain per block of 512 inputs
# (a 576-wide input: 512, then 64); oneDNN/MKL, which PyTorch uses on the CPU, sums
# chunks of 192. Rounding error grows with the chain's length, and a model with
# massive activations amplifies it (SmolLM2-135M builds |h| = 22,500 out of
# |h| = 100 in one block), which left dpjax's float32 logits 1.2-3.8x further from a
# float64 run than HF's own float32 run (the median over 192 one-token sequences,
# five kept sets). With chunks of 192 the float32 linear layers come out bit for bit
# as PyTorch's (AVX-512, >= 64 rows) and those medians within 3% of HF's or below,
# at about 12-17% more time on the CPU. The environment variable DPJAX_CPU_DOT_CHUNK
# sets the chunk (0: one dot, as the backend likes it); other backends are not
# chunked.
CPU_DOT_CHUNK = int(os.environ.get("DPJAX_CPU_DOT_CHUNK", "192")) or None


# ----------------------------------------------------------------------------
# Rotary position embedding.


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> np.ndarray:
  """`[head_dim // 2]` float32 inverse frequencies, as HF's rope init computes them.

  `local`: the sliding blocks' table of a model that gives them a rope base of
  their own (Gemma 3: the default rope type with `local_rope_theta`).
  """
  dim = cfg.head_dim
  exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
  theta = cfg.local_rope_theta if local else cfg.rope_theta
  # theta ** exponent rounded once to float32, as torch's pow gives it (numpy's
  # float32 power is off by an ulp for some exponents, which turns the angle at
  # position p by p ulps against HF's).
  powers = (np.float64(theta) ** exponents.astype(np.float64)).astype(np.float32)
  inv_freq = (np.float32(1.0) / powers).astype(np.float32)
  if local or cfg.rope_type == "default":
    return inv_freq
  if cfg.rope_type == "linear":
    return (inv_freq / np.float32(cfg.rope_factor)).astype(np.float32)
  if cfg.rope_type == "llama3":
    factor = cfg.rope_factor
    low, high = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old_len = cfg.rope_original_max_position_embeddings
    low_freq_wavelen = old_len / low
    high_freq_wavelen = old_len / high
    wavelen = (2 * math.pi / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(factor), inv_freq)
    smooth = ((old_len / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)
  raise ValueError(f"rope_type={cfg.rope_type!r} is not implemented")


def rope_tables(positions: Array, inv_freq: Array) -> tuple[Array, Array]:
  """cos, sin `[B, T, head_dim]` in float32 for integer `positions` `[B, T]`."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotates `x` `[B, T, heads, head_dim]` (HF's rotate-half convention)."""
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos + rotated * sin


# ----------------------------------------------------------------------------
# Layers.


def rms_norm(x: Array, weight: Array, eps: float, kind: str = "llama") -> Array:
  """HF's RMSNorm, statistics in float32.

  `llama`: the normalized `x` cast back to its dtype, times the weight in that
  dtype. `gemma`: times `(1 + weight)` in float32, then cast back.
  """
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  if kind == "gemma":
    return (x32 * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)
  return weight.astype(x.dtype) * x32.astype(x.dtype)


def soft_cap(x: Array, cap: float | None) -> Array:
  """`cap * tanh(x / cap)` (Gemma's soft-capping), or `x` when `cap` is None."""
  return x if cap is None else jnp.tanh(x / cap) * cap


def mlp_activation(x: Array, kind: str) -> Array:
  if kind == "gelu_tanh":
    # 0.5 x (1 + tanh(z)) written as x / (1 + exp(-2z)): XLA:CPU's float32 tanh is up
    # to ~4.5 ulp off (torch's <= 1), its exp ~1 ulp, and Gemma 3's massive activations
    # carried that to 4x HF float32's distance from float64; this form is within 1.4x.
    # exp(-2z) is capped at e^40 (x below about -7, where the value is under 5e-18 |x|):
    # uncapped it overflows to inf for x below about -11, and the gradient there, inf/inf,
    # is NaN (Gemma 3's gate pre-activations reach it, and healing trains through them).
    z = math.sqrt(2.0 / math.pi) * (x + 0.044715 * (x * x * x))
    return x / (1.0 + jnp.exp(jnp.minimum(-2.0 * z, 40.0)))
  return jax.nn.silu(x)


def chunked_dot(x: Array, w: Array, precision, chunk: int | None) -> Array:
  """`x @ w` over the last axis of `x` (`w` `[in, out]`); with `chunk`, the sum of the
  products over consecutive slices of at most `chunk` inputs, added in order."""
  k = x.shape[-1]
  if chunk is None or k <= chunk:
    return jnp.einsum("...i,io->...o", x, w, precision=precision)
  y = None
  for start in range(0, k, chunk):
    part = jnp.einsum("...i,io->...o", x[..., start:start + chunk], w[start:start + chunk],
                      precision=precision)
    y = part if y is None else y + part
  return y


def _param(rngs: nnx.Rngs | None, shape: Sequence[int], dtype, init: str) -> nnx.Param:
  if init == "ones":
    return nnx.Param(jnp.ones(shape, dtype))
  if init == "zeros":
    return nnx.Param(jnp.zeros(shape, dtype))
  return nnx.Param(0.02 * jax.random.normal(rngs.params(), shape, dtype))
