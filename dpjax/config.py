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


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A Llama-family decoder: pre-norm blocks of GQA attention and a SwiGLU MLP."""

  architecture: str  # HF `model_type`: llama, mistral, qwen2, qwen3.
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
