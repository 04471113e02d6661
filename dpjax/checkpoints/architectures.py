"""What dpjax knows about each Hugging Face architecture, as data.

Two things live here, one source of truth each:

* `tensor_rules(cfg)`: the name/shape table that maps every HF tensor name to
  its dpjax parameter (and back). The converter reads it one way, the exporter
  the other.
* `model_config_from_hf(hf_config)`: the HF config (parsed by transformers'
  own config classes) turned into a `dpjax.config.ModelConfig`. Any attribute
  that changes the computation in a way dpjax does not implement is refused
  with an error naming it, never silently ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from dpjax.config import ModelConfig

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")

# Tensors a checkpoint may carry that hold nothing dpjax needs (old Llama
# checkpoints saved the rotary buffer).
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


class UnsupportedModelError(ValueError):
  """The checkpoint asks for something dpjax does not implement."""


@dataclasses.dataclass(frozen=True)
class TensorRule:
  """One HF tensor <-> one dpjax parameter.

  `hf` holds `{i}` for per-block tensors, which dpjax stacks on a leading layer
  axis under `blocks/`. Linear weights are `[out, in]` in HF and `[in, out]` in
  dpjax (`transpose`). `shape` gives the dpjax shape of one block's tensor.
  """
  hf: str
  dpjax: str
  shape: Callable[[ModelConfig], tuple[int, ...]]
  transpose: bool = False
  present: Callable[[ModelConfig], bool] = lambda cfg: True

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf

  def hf_name(self, layer: int | None = None) -> str:
    return self.hf.format(i=layer) if self.per_layer else self.hf

  def hf_shape(self, cfg: ModelConfig) -> tuple[int, ...]:
    shape = self.shape(cfg)
    return tuple(reversed(shape)) if self.transpose else shape

  @property
  def path(self) -> tuple[str, ...]:
    return tuple(self.dpjax.split("/"))


def _d(c):
  return c.hidden_size


def _q(c):
  return c.num_heads * c.head_dim


def _kv(c):
  return c.num_kv_heads * c.head_dim


_ATTN = "model.layers.{i}.self_attn."
_MLP = "model.layers.{i}.mlp."

# The Llama family shares one layout; what differs (biases, q/k norms, sliding
# windows) is switched on by the ModelConfig, so one table serves all four.
_LLAMA_FAMILY_RULES = (
    TensorRule("model.embed_tokens.weight", "embed", lambda c: (c.vocab_size, _d(c))),
    TensorRule("model.norm.weight", "final_norm", lambda c: (_d(c),)),
    TensorRule("lm_head.weight", "lm_head", lambda c: (_d(c), c.vocab_size), transpose=True,
               present=lambda c: not c.tie_word_embeddings),
    TensorRule("model.layers.{i}.input_layernorm.weight", "blocks/attn_norm", lambda c: (_d(c),)),
    TensorRule(_ATTN + "q_proj.weight", "blocks/q", lambda c: (_d(c), _q(c)), transpose=True),
    TensorRule(_ATTN + "k_proj.weight", "blocks/k", lambda c: (_d(c), _kv(c)), transpose=True),
    TensorRule(_ATTN + "v_proj.weight", "blocks/v", lambda c: (_d(c), _kv(c)), transpose=True),
    TensorRule(_ATTN + "o_proj.weight", "blocks/o", lambda c: (_q(c), _d(c)), transpose=True),
    TensorRule(_ATTN + "q_proj.bias", "blocks/q_bias", lambda c: (_q(c),),
               present=lambda c: c.qkv_bias),
    TensorRule(_ATTN + "k_proj.bias", "blocks/k_bias", lambda c: (_kv(c),),
               present=lambda c: c.qkv_bias),
    TensorRule(_ATTN + "v_proj.bias", "blocks/v_bias", lambda c: (_kv(c),),
               present=lambda c: c.qkv_bias),
    TensorRule(_ATTN + "o_proj.bias", "blocks/o_bias", lambda c: (_d(c),),
               present=lambda c: c.o_bias),
    TensorRule(_ATTN + "q_norm.weight", "blocks/q_norm", lambda c: (c.head_dim,),
               present=lambda c: c.qk_norm),
    TensorRule(_ATTN + "k_norm.weight", "blocks/k_norm", lambda c: (c.head_dim,),
               present=lambda c: c.qk_norm),
    TensorRule("model.layers.{i}.post_attention_layernorm.weight", "blocks/mlp_norm",
               lambda c: (_d(c),)),
    TensorRule(_MLP + "gate_proj.weight", "blocks/gate", lambda c: (_d(c), c.intermediate_size),
               transpose=True),
    TensorRule(_MLP + "up_proj.weight", "blocks/up", lambda c: (_d(c), c.intermediate_size),
               transpose=True),
    TensorRule(_MLP + "down_proj.weight", "blocks/down", lambda c: (c.intermediate_size, _d(c)),
               transpose=True),
    TensorRule(_MLP + "gate_proj.bias", "blocks/gate_bias", lambda c: (c.intermediate_size,),
               present=lambda c: c.mlp_bias),
    TensorRule(_MLP + "up_proj.bias", "blocks/up_bias", lambda c: (c.intermediate_size,),
               present=lambda c: c.mlp_bias),
    TensorRule(_MLP + "down_proj.bias", "blocks/down_bias", lambda c: (_d(c),),
               present=lambda c: c.mlp_bias),
)


def tensor_rules(cfg: ModelConfig) -> tuple[TensorRule, ...]:
  """The tensors a checkpoint of this config holds, HF name <-> dpjax name."""
  if cfg.architecture not in SUPPORTED_ARCHITECTURES:
    raise UnsupportedModelError(_unsupported_architecture_message(cfg.architecture))
  return tuple(rule for rule in _LLAMA_FAMILY_RULES if rule.present(cfg))


def expected_hf_tensors(cfg: ModelConfig) -> dict[str, tuple[TensorRule, int | None]]:
  """Every HF tensor name the checkpoint must hold -> (rule, layer)."""
  names = {}
  for rule in tensor_rules(cfg):
    layers = range(cfg.num_layers) if rule.per_layer else [None]
    for layer in layers:
      names[rule.hf_name(layer)] = (rule, layer)
  return names


def _unsupported_architecture_message(model_type: Any) -> str:
  return (f"unsupported architecture model_type={model_type!r}; dpjax converts "
          f"{', '.join(SUPPORTED_ARCHITECTURES)} checkpoints.")


def check_model_type(raw_config: dict[str, Any]) -> str:
  """The config.json's `model_type`, refused unless dpjax implements it."""
  model_type = raw_config.get("model_type")
  if model_type not in SUPPORTED_ARCHITECTURES:
    raise UnsupportedModelError(_unsupported_architecture_message(model_type))
  return model_type


def _refuse(attribute: str, value: Any, why: str) -> UnsupportedModelError:
  return UnsupportedModelError(f"config attribute {attribute}={value!r} is not supported: {why}")


def _rope_parameters(hf: Any) -> dict[str, Any]:
  params = getattr(hf, "rope_parameters", None)
  if params is None:  # older transformers: rope_theta + rope_scaling.
    params = dict(getattr(hf, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
  params = dict(params)
  if "type" in params and "rope_type" not in params:
    params["rope_type"] = params["type"]
  params.setdefault("rope_type", "default")
  return params


def model_config_from_hf(hf: Any, param_dtype: str) -> ModelConfig:
  """A `ModelConfig` from a transformers config object, refusing what dpjax lacks."""
  model_type = getattr(hf, "model_type", None)
  if model_type not in SUPPORTED_ARCHITECTURES:
    raise UnsupportedModelError(_unsupported_architecture_message(model_type))
  if param_dtype not in SUPPORTED_DTYPES:
    raise ValueError(f"dtype {param_dtype!r} is not supported; use one of {SUPPORTED_DTYPES}.")

  hidden_act = getattr(hf, "hidden_act", "silu")
  if hidden_act != "silu":
    raise _refuse("hidden_act", hidden_act, "dpjax implements the SwiGLU MLP with silu only.")
  if getattr(hf, "quantization_config", None):
    raise _refuse("quantization_config", hf.quantization_config,
                  "convert the unquantized checkpoint instead.")

  rope = _rope_parameters(hf)
  rope_type = rope["rope_type"]
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise _refuse("rope_parameters.rope_type", rope_type,
                  f"dpjax implements the rope types {SUPPORTED_ROPE_TYPES}.")
  partial = rope.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0))
  if partial not in (None, 1, 1.0):
    raise _refuse("partial_rotary_factor", partial, "dpjax rotates the whole head dimension.")

  num_layers = hf.num_hidden_layers
  num_heads = hf.num_attention_heads
  head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads

  # Sliding windows: Mistral applies its window to every block; Qwen2 and Qwen3
  # say per block in `layer_types`.
  sliding_window = getattr(hf, "sliding_window", None)
  layer_types = getattr(hf, "layer_types", None)
  if model_type == "mistral":
    sliding_layers = (True,) * num_layers if sliding_window is not None else ()
  elif layer_types is not None and model_type in ("qwen2", "qwen3"):
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
      raise _refuse("layer_types", unknown, "dpjax implements full_attention and "
                    "sliding_attention blocks.")
    sliding_layers = tuple(t == "sliding_attention" for t in layer_types)
  else:
    sliding_layers = ()
  if not any(sliding_layers):
    sliding_window, sliding_layers = None, ()

  attention_bias = bool(getattr(hf, "attention_bias", False))
  rope_kwargs = {}
  if rope_type in ("linear", "llama3"):
    rope_kwargs["rope_factor"] = float(rope["factor"])
  if rope_type == "llama3":
    rope_kwargs.update(
        rope_low_freq_factor=float(rope["low_freq_factor"]),
        rope_high_freq_factor=float(rope["high_freq_factor"]),
        rope_original_max_position_embeddings=int(rope["original_max_position_embeddings"]))

  return ModelConfig(
      architecture=model_type,
      vocab_size=hf.vocab_size,
      hidden_size=hf.hidden_size,
      intermediate_size=hf.intermediate_size,
      num_layers=num_layers,
      num_heads=num_heads,
      num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
      head_dim=head_dim,
      rms_norm_eps=float(hf.rms_norm_eps),
      rope_theta=float(rope["rope_theta"]),
      rope_type=rope_type,
      max_position_embeddings=int(getattr(hf, "max_position_embeddings", 2048)),
      tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
      qkv_bias=(model_type == "qwen2") or attention_bias,
      o_bias=(model_type in ("llama", "qwen3")) and attention_bias,
      mlp_bias=(model_type == "llama") and bool(getattr(hf, "mlp_bias", False)),
      qk_norm=(model_type == "qwen3"),
      sliding_window=sliding_window,
      sliding_layers=sliding_layers,
      param_dtype=param_dtype,
      **rope_kwargs,
  )
