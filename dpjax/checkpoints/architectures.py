"""What dpjax knows about each architecture, as data: the one place that says how each
family's tensors, norms and settings map.

* `tensor_rules(cfg)`: the name/shape table that maps every HF tensor name to
  its dpjax parameter (and back). The converter reads it one way, the exporter
  the other. A fused HF tensor (Phi-3's `qkv_proj`, `gate_up_proj`) is several
  rules, each a block of its rows.
* `GGUF_FAMILIES`: for GGUF files, the GGUF tensor names of each family and
  how llama.cpp stored them (Q/K rows permuted for its rope, Gemma's norms
  stored as `1 + w`), so a GGUF tensor becomes the HF tensor the table maps.
* `model_config_from_hf(hf_config)`: the HF config (parsed by transformers'
  own config classes) turned into a `dpjax.model.config.ModelConfig`. Any attribute
  that changes the computation in a way dpjax does not implement is refused
  with an error naming it, never silently ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from dpjax.model.config import ModelConfig

LLAMA_FAMILY = ("llama", "mistral", "qwen2", "qwen3")
GEMMA_FAMILY = ("gemma2", "gemma3_text")
SUPPORTED_ARCHITECTURES = LLAMA_FAMILY + GEMMA_FAMILY + ("phi3",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
# The HF class each architecture's exported checkpoint names in config.json.
HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
              "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
              "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
              "phi3": "Phi3ForCausalLM"}

# Tensors a checkpoint may carry that hold nothing dpjax needs (old Llama
# checkpoints saved the rotary buffer).
IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


class UnsupportedModelError(ValueError):
  """The checkpoint asks for something dpjax does not implement."""


Rows = Callable[[ModelConfig], tuple[int, int, int]]


@dataclasses.dataclass(frozen=True)
class TensorRule:
  """One HF tensor (or a block of its rows) <-> one dpjax parameter.

  `hf` holds `{i}` for per-block tensors, which dpjax stacks on a leading layer
  axis under `blocks/`. Linear weights are `[out, in]` in HF and `[in, out]` in
  dpjax (`transpose`). `shape` gives the dpjax shape of one block's tensor.
  `rows`, for a fused HF tensor, gives `(start, stop, total)`: this parameter is
  rows `start:stop` of an HF tensor of `total` rows.
  """
  hf: str
  dpjax: str
  shape: Callable[[ModelConfig], tuple[int, ...]]
  transpose: bool = False
  present: Callable[[ModelConfig], bool] = lambda cfg: True
  rows: Rows | None = None

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.hf

  def hf_name(self, layer: int | None = None) -> str:
    return self.hf.format(i=layer) if self.per_layer else self.hf

  def hf_shape(self, cfg: ModelConfig) -> tuple[int, ...]:
    """The shape of the whole HF tensor (all of a fused tensor's rows)."""
    shape = self.shape(cfg)
    shape = tuple(reversed(shape)) if self.transpose else shape
    if self.rows is not None:
      shape = (self.rows(cfg)[2], *shape[1:])
    return shape

  def from_hf(self, tensor: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """This parameter's part of an HF tensor, in dpjax's layout (a view when it can be)."""
    if self.rows is not None:
      start, stop, _ = self.rows(cfg)
      tensor = tensor[start:stop]
    return tensor.T if self.transpose else tensor

  @property
  def path(self) -> tuple[str, ...]:
    return tuple(self.dpjax.split("/"))


def _d(c):
  return c.hidden_size


def _q(c):
  return c.num_heads * c.head_dim


def _kv(c):
  return c.num_kv_heads * c.head_dim


def _f(c):
  return c.intermediate_size


_ATTN = "model.layers.{i}.self_attn."
_MLP = "model.layers.{i}.mlp."
_LAYER = "model.layers.{i}."

_EMBEDDINGS = (
    TensorRule("model.embed_tokens.weight", "embed", lambda c: (c.vocab_size, _d(c))),
    TensorRule("model.norm.weight", "final_norm", lambda c: (_d(c),)),
    TensorRule("lm_head.weight", "lm_head", lambda c: (_d(c), c.vocab_size), transpose=True,
               present=lambda c: not c.tie_word_embeddings),
)
_ATTENTION = (
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
)
_GATED_MLP = (
    TensorRule(_MLP + "gate_proj.weight", "blocks/gate", lambda c: (_d(c), _f(c)), transpose=True),
    TensorRule(_MLP + "up_proj.weight", "blocks/up", lambda c: (_d(c), _f(c)), transpose=True),
    TensorRule(_MLP + "down_proj.weight", "blocks/down", lambda c: (_f(c), _d(c)), transpose=True),
    TensorRule(_MLP + "gate_proj.bias", "blocks/gate_bias", lambda c: (_f(c),),
               present=lambda c: c.mlp_bias),
    TensorRule(_MLP + "up_proj.bias", "blocks/up_bias", lambda c: (_f(c),),
               present=lambda c: c.mlp_bias),
    TensorRule(_MLP + "down_proj.bias", "blocks/down_bias", lambda c: (_d(c),),
               present=lambda c: c.mlp_bias),
)

# Llama, Mistral, Qwen2 and Qwen3 share one layout; what differs (biases, q/k norms,
# sliding windows) is switched on by the ModelConfig, so one table serves all four.
_LLAMA_RULES = _EMBEDDINGS + _ATTENTION + _GATED_MLP + (
    TensorRule(_LAYER + "input_layernorm.weight", "blocks/attn_norm", lambda c: (_d(c),)),
    TensorRule(_LAYER + "post_attention_layernorm.weight", "blocks/mlp_norm", lambda c: (_d(c),)),
)

# Gemma 2 and 3: four norms a block. Gemma's `post_attention_layernorm` normalizes the
# attention output; the norm before the MLP is `pre_feedforward_layernorm`.
_GEMMA_RULES = _EMBEDDINGS + _ATTENTION + _GATED_MLP + (
    TensorRule(_LAYER + "input_layernorm.weight", "blocks/attn_norm", lambda c: (_d(c),)),
    TensorRule(_LAYER + "post_attention_layernorm.weight", "blocks/post_attn_norm",
               lambda c: (_d(c),)),
    TensorRule(_LAYER + "pre_feedforward_layernorm.weight", "blocks/mlp_norm", lambda c: (_d(c),)),
    TensorRule(_LAYER + "post_feedforward_layernorm.weight", "blocks/post_mlp_norm",
               lambda c: (_d(c),)),
)

# Phi-3 fuses q, k, v (in that order) into `qkv_proj` and gate, up into `gate_up_proj`;
# the rows are split on conversion and fused again on export.
_QKV = lambda c: _q(c) + 2 * _kv(c)
_PHI3_RULES = _EMBEDDINGS + (
    TensorRule(_LAYER + "input_layernorm.weight", "blocks/attn_norm", lambda c: (_d(c),)),
    TensorRule(_ATTN + "qkv_proj.weight", "blocks/q", lambda c: (_d(c), _q(c)), transpose=True,
               rows=lambda c: (0, _q(c), _QKV(c))),
    TensorRule(_ATTN + "qkv_proj.weight", "blocks/k", lambda c: (_d(c), _kv(c)), transpose=True,
               rows=lambda c: (_q(c), _q(c) + _kv(c), _QKV(c))),
    TensorRule(_ATTN + "qkv_proj.weight", "blocks/v", lambda c: (_d(c), _kv(c)), transpose=True,
               rows=lambda c: (_q(c) + _kv(c), _QKV(c), _QKV(c))),
    TensorRule(_ATTN + "o_proj.weight", "blocks/o", lambda c: (_q(c), _d(c)), transpose=True),
    TensorRule(_LAYER + "post_attention_layernorm.weight", "blocks/mlp_norm", lambda c: (_d(c),)),
    TensorRule(_MLP + "gate_up_proj.weight", "blocks/gate", lambda c: (_d(c), _f(c)),
               transpose=True, rows=lambda c: (0, _f(c), 2 * _f(c))),
    TensorRule(_MLP + "gate_up_proj.weight", "blocks/up", lambda c: (_d(c), _f(c)),
               transpose=True, rows=lambda c: (_f(c), 2 * _f(c), 2 * _f(c))),
    TensorRule(_MLP + "down_proj.weight", "blocks/down", lambda c: (_f(c), _d(c)), transpose=True),
)


def tensor_rules(cfg: ModelConfig) -> tuple[TensorRule, ...]:
  """The tensors a checkpoint of this config holds, HF name <-> dpjax name."""
  if cfg.architecture in LLAMA_FAMILY:
    rules = _LLAMA_RULES
  elif cfg.architecture in GEMMA_FAMILY:
    rules = _GEMMA_RULES
  elif cfg.architecture == "phi3":
    rules = _PHI3_RULES
  else:
    raise UnsupportedModelError(_unsupported_architecture_message(cfg.architecture))
  return tuple(rule for rule in rules if rule.present(cfg))


def expected_hf_tensors(cfg: ModelConfig) -> dict[str, list[tuple[TensorRule, int | None]]]:
  """Every HF tensor name the checkpoint must hold -> the (rule, layer) pairs it fills."""
  names: dict[str, list[tuple[TensorRule, int | None]]] = {}
  for rule in tensor_rules(cfg):
    layers = range(cfg.num_layers) if rule.per_layer else [None]
    for layer in layers:
      names.setdefault(rule.hf_name(layer), []).append((rule, layer))
  return names


# ----------------------------------------------------------------------------
# GGUF files (llama.cpp's names and storage conventions).


@dataclasses.dataclass(frozen=True)
class GGUFFamily:
  """How one GGUF `general.architecture` maps onto an HF architecture's tensors."""
  model_type: str                 # the HF model_type transformers gives its config
  ffn_norm: str                   # the HF norm llama.cpp calls `ffn_norm`
  permute_qk: bool = False        # llama.cpp interleaved q/k rows for its rope (llama only)
  norm_plus_one: bool = False     # llama.cpp stores Gemma norms as 1 + w


GGUF_FAMILIES = {
    "llama": GGUFFamily("llama", "post_attention_layernorm", permute_qk=True),
    "qwen2": GGUFFamily("qwen2", "post_attention_layernorm"),
    "qwen3": GGUFFamily("qwen3", "post_attention_layernorm"),
    "gemma2": GGUFFamily("gemma2", "pre_feedforward_layernorm", norm_plus_one=True),
    "gemma3": GGUFFamily("gemma3_text", "pre_feedforward_layernorm", norm_plus_one=True),
}

_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                      "output": "lm_head"}


def gguf_family(arch: str) -> GGUFFamily:
  if arch not in GGUF_FAMILIES:
    raise UnsupportedModelError(
        f"unsupported GGUF architecture general.architecture={arch!r}; dpjax reads GGUF files "
        f"of {', '.join(sorted(GGUF_FAMILIES))}.")
  return GGUF_FAMILIES[arch]


def hf_name_of_gguf(name: str, family: GGUFFamily) -> str | None:
  """The HF tensor name of a GGUF tensor name (`blk.3.attn_q.weight` ->
  `model.layers.3.self_attn.q_proj.weight`), or None when it has none."""
  stem, _, suffix = name.rpartition(".")
  if suffix not in ("weight", "bias"):
    return None
  if stem in _GGUF_GLOBAL_NAMES:
    return f"{_GGUF_GLOBAL_NAMES[stem]}.{suffix}"
  parts = stem.split(".")
  if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit():
    return None
  kind = parts[2]
  hf = family.ffn_norm if kind == "ffn_norm" else _GGUF_LAYER_NAMES.get(kind)
  return None if hf is None else f"model.layers.{parts[1]}.{hf}.{suffix}"


def gguf_to_hf_values(tensor: np.ndarray, gguf_name: str, family: GGUFFamily,
                      hf_config: Any) -> np.ndarray:
  """Undoes llama.cpp's storage conventions so the values equal the HF tensor's."""
  if family.permute_qk and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
    heads = (hf_config.num_attention_heads if ".attn_q." in gguf_name
             else hf_config.num_key_value_heads)
    # llama.cpp interleaved each head's two rotary halves; put them back (rotate-half).
    tensor = tensor.reshape(heads, tensor.shape[0] // heads // 2, 2, *tensor.shape[1:])
    tensor = tensor.swapaxes(1, 2).reshape(-1, *tensor.shape[3:])
  if family.norm_plus_one and gguf_name.endswith("norm.weight"):
    tensor = tensor - 1.0
  return tensor


# ----------------------------------------------------------------------------
# Configs.


def _unsupported_architecture_message(model_type: Any) -> str:
  extra = (" (multimodal Gemma 3: convert its text model, Gemma3ForCausalLM)"
           if model_type == "gemma3" else "")
  return (f"unsupported architecture model_type={model_type!r}{extra}; dpjax converts "
          f"{', '.join(SUPPORTED_ARCHITECTURES)} checkpoints.")


def check_model_type(raw_config: dict[str, Any]) -> str:
  """The config.json's `model_type`, refused unless dpjax implements it."""
  model_type = raw_config.get("model_type")
  if model_type not in SUPPORTED_ARCHITECTURES:
    raise UnsupportedModelError(_unsupported_architecture_message(model_type))
  return model_type


def _refuse(attribute: str, value: Any, why: str) -> UnsupportedModelError:
  return UnsupportedModelError(f"config attribute {attribute}={value!r} is not supported: {why}")


def _normalize_rope(params: dict[str, Any]) -> dict[str, Any]:
  params = dict(params)
  if "type" in params and "rope_type" not in params:
    params["rope_type"] = params["type"]
  params.setdefault("rope_type", "default")
  return params


def _rope_parameters(hf: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
  """The main rope parameters and, for Gemma 3, the sliding blocks' own."""
  params = getattr(hf, "rope_parameters", None)
  if params is None:  # older transformers: rope_theta + rope_scaling.
    params = dict(getattr(hf, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
  if "full_attention" in params:  # per layer type (Gemma 3)
    return (_normalize_rope(params["full_attention"]),
            _normalize_rope(params.get("sliding_attention", params["full_attention"])))
  return _normalize_rope(params), None


def _activation(hf: Any, model_type: str) -> str:
  if model_type in GEMMA_FAMILY:
    act = getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", None)
    if act != "gelu_pytorch_tanh":
      raise _refuse("hidden_activation", act, "dpjax implements Gemma's GeGLU with "
                    "gelu_pytorch_tanh only.")
    return "gelu_tanh"
  act = getattr(hf, "hidden_act", "silu")
  if act != "silu":
    raise _refuse("hidden_act", act, "dpjax implements the SwiGLU MLP with silu only.")
  return "silu"


def _sliding(hf: Any, model_type: str, num_layers: int) -> tuple[int | None, tuple[bool, ...]]:
  """The window and which blocks use it. Mistral and Phi-3 window every block; the
  others say per block in `layer_types`."""
  window = getattr(hf, "sliding_window", None)
  layer_types = getattr(hf, "layer_types", None)
  if model_type in ("mistral", "phi3"):
    layers = (True,) * num_layers if window is not None else ()
  elif layer_types is not None and model_type in ("qwen2", "qwen3") + GEMMA_FAMILY:
    unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
    if unknown:
      raise _refuse("layer_types", unknown, "dpjax implements full_attention and "
                    "sliding_attention blocks.")
    layers = tuple(t == "sliding_attention" for t in layer_types)
  else:
    layers = ()
  if not any(layers):
    return None, ()
  return window, layers


def model_config_from_hf(hf: Any, param_dtype: str) -> ModelConfig:
  """A `ModelConfig` from a transformers config object, refusing what dpjax lacks."""
  model_type = getattr(hf, "model_type", None)
  if model_type not in SUPPORTED_ARCHITECTURES:
    raise UnsupportedModelError(_unsupported_architecture_message(model_type))
  if param_dtype not in SUPPORTED_DTYPES:
    raise ValueError(f"dtype {param_dtype!r} is not supported; use one of {SUPPORTED_DTYPES}.")
  activation = _activation(hf, model_type)
  if getattr(hf, "quantization_config", None):
    raise _refuse("quantization_config", hf.quantization_config,
                  "convert the unquantized checkpoint instead.")
  if getattr(hf, "use_bidirectional_attention", False):
    raise _refuse("use_bidirectional_attention", hf.use_bidirectional_attention,
                  "dpjax implements causal decoders only.")

  rope, local_rope = _rope_parameters(hf)
  rope_type = rope["rope_type"]
  allowed = ("default",) if model_type == "phi3" else SUPPORTED_ROPE_TYPES
  if rope_type not in allowed:
    why = ("dpjax implements Phi-3 with the default rope only (longrope, the 128k-context "
           "variants' scaling, is not implemented)." if model_type == "phi3"
           else f"dpjax implements the rope types {SUPPORTED_ROPE_TYPES}.")
    raise _refuse("rope_parameters.rope_type", rope_type, why)
  if local_rope is not None and local_rope["rope_type"] != "default":
    raise _refuse("rope_parameters.sliding_attention.rope_type", local_rope["rope_type"],
                  "dpjax implements the default rope on Gemma 3's sliding blocks.")
  partial = rope.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0))
  if partial not in (None, 1, 1.0):
    raise _refuse("partial_rotary_factor", partial, "dpjax rotates the whole head dimension.")

  num_layers = hf.num_hidden_layers
  num_heads = hf.num_attention_heads
  head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
  sliding_window, sliding_layers = _sliding(hf, model_type, num_layers)

  attention_bias = bool(getattr(hf, "attention_bias", False))
  rope_kwargs = {}
  if rope_type in ("linear", "llama3"):
    rope_kwargs["rope_factor"] = float(rope["factor"])
  if rope_type == "llama3":
    rope_kwargs.update(
        rope_low_freq_factor=float(rope["low_freq_factor"]),
        rope_high_freq_factor=float(rope["high_freq_factor"]),
        rope_original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
  gemma = model_type in GEMMA_FAMILY
  if gemma:
    rope_kwargs.update(
        embed_scale=True, norm_kind="gemma", post_norms=True,
        query_pre_attn_scalar=float(hf.query_pre_attn_scalar),
        # Gemma 3 keeps attn_logit_softcapping in its config but never applies it (as HF).
        attn_logit_softcap=(getattr(hf, "attn_logit_softcapping", None)
                            if model_type == "gemma2" else None),
        final_logit_softcap=getattr(hf, "final_logit_softcapping", None),
        local_rope_theta=(float(local_rope["rope_theta"]) if local_rope is not None
                          and float(local_rope["rope_theta"]) != float(rope["rope_theta"])
                          else None))

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
      qkv_bias=(model_type == "qwen2") or (attention_bias and model_type != "phi3"),
      o_bias=(model_type in ("llama", "qwen3") + GEMMA_FAMILY) and attention_bias,
      mlp_bias=(model_type == "llama") and bool(getattr(hf, "mlp_bias", False)),
      qk_norm=model_type in ("qwen3", "gemma3_text"),
      sliding_window=sliding_window,
      sliding_layers=sliding_layers,
      param_dtype=param_dtype,
      mlp_activation=activation,
      **rope_kwargs,
  )
