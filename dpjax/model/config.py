"""The model configuration dpjax runs on: what the forward pass needs, and nothing else.

It is derived from a Hugging Face config by `checkpoints_convert.architectures`
(which refuses anything it does not implement) and saved beside the converted
weights as JSON, so a converted checkpoint needs no transformers config class to
load.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np


NORM_KINDS = ("llama", "gemma")
MLP_ACTIVATIONS = ("silu", "gelu_tanh")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder of pre-norm blocks: GQA attention, then a gated MLP.

  The Llama family is the default; the fields after `param_dtype` switch on
  what Gemma 2 / Gemma 3 add (scaled embeddings, `(1 + w)` norms, norms after
  attention and after the MLP, a query scale, soft-capping, GeGLU, a rope base
  of their own for sliding blocks). Phi-3's fused projections are split on
  conversion, so it runs as a Llama.
  """

  architecture: str  # HF `model_type`: llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3.
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float
  rope_theta: float
  # Rotary scaling: "default", "linear" or "llama3", with that type's parameters.
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position_embeddings: int = 8192
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False
  # Sliding-window attention: the window, and which blocks use it.
  sliding_window: int | None = None
  sliding_layers: tuple[bool, ...] = ()
  # Storage dtype of the weights, as a numpy/jax dtype name.
  param_dtype: str = "float32"
  # Gemma: the embedding is multiplied by sqrt(hidden_size), in the embedding's dtype.
  embed_scale: bool = False
  # RMSNorm: "llama" (normalize in float32, cast, times w) or "gemma" (times (1 + w) in
  # float32, then cast; the stored weight is w).
  norm_kind: str = "llama"
  # Gemma: a norm on the attention output and on the MLP output, before each residual add.
  post_norms: bool = False
  # Attention scores are scaled by query_pre_attn_scalar ** -0.5 (None: head_dim ** -0.5).
  query_pre_attn_scalar: float | None = None
  # tanh soft-capping `cap * tanh(x / cap)` of the attention scores / the final logits.
  attn_logit_softcap: float | None = None
  final_logit_softcap: float | None = None
  # The gate's activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU).
  mlp_activation: str = "silu"
  # Gemma 3: sliding blocks use the default rope with this base (full blocks the main rope).
  local_rope_theta: float | None = None

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of "
          f"num_kv_heads={self.num_kv_heads}; grouped-query attention needs "
          "each key/value head to serve a whole number of query heads.")
    if self.sliding_layers and len(self.sliding_layers) != self.num_layers:
      raise ValueError(
          f"sliding_layers has {len(self.sliding_layers)} entries for "
          f"{self.num_layers} layers.")
    if self.norm_kind not in NORM_KINDS:
      raise ValueError(f"norm_kind={self.norm_kind!r}; use one of {NORM_KINDS}.")
    if self.mlp_activation not in MLP_ACTIVATIONS:
      raise ValueError(f"mlp_activation={self.mlp_activation!r}; use one of {MLP_ACTIVATIONS}.")

  @property
  def attention_scale(self) -> float:
    base = self.head_dim if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar
    return float(base) ** -0.5

  @property
  def layer_is_sliding(self) -> np.ndarray:
    """`[layers]` bool: which blocks attend within the sliding window."""
    if not self.sliding_layers:
      return np.zeros(self.num_layers, dtype=bool)
    return np.asarray(self.sliding_layers, dtype=bool)

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "ModelConfig":
    fields = json.loads(text)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
      raise ValueError(
          f"dpjax config has unknown fields {unknown}; it was written by a "
          "newer dpjax. Convert the checkpoint again with this version.")
    fields["sliding_layers"] = tuple(fields.get("sliding_layers", ()))
    return cls(**fields)
