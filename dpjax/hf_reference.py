"""The Hugging Face PyTorch reference that every dpjax number is checked against.

Tiny random HF checkpoints written to disk with `save_pretrained`, exactly as a
download looks, one per variant dpjax supports (`VARIANTS`), and HF's own
forward pass over them. The weights are random but not timid: norms and biases
are perturbed away from their 1/0 initial values so that a mistake in any of
them shows in the logits. Needs torch (the `test` extra); used by the tests and
the benchmarks, never by the pipeline itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
import transformers

_BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
             rms_norm_eps=1e-5, initializer_range=0.08, tie_word_embeddings=False,
             bos_token_id=1, eos_token_id=2, pad_token_id=0)


@dataclasses.dataclass(frozen=True)
class Variant:
  family: str
  config: dict[str, Any]
  dtype: str = "float32"
  max_shard_size: str | None = None


VARIANTS = {
    "llama_mha": Variant("llama", dict(_BASE)),
    "llama_gqa_tied_sharded": Variant(
        "llama", dict(_BASE, num_key_value_heads=2, tie_word_embeddings=True),
        max_shard_size="40KB"),
    "llama_kv1": Variant("llama", dict(_BASE, num_key_value_heads=1)),
    "llama_bias": Variant("llama", dict(_BASE, num_key_value_heads=2, attention_bias=True,
                                        mlp_bias=True)),
    "llama3_rope": Variant("llama", dict(
        _BASE, num_key_value_heads=2,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=16))),
    "llama_linear_rope": Variant("llama", dict(
        _BASE, rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "mistral_window_head_dim": Variant("mistral", dict(
        _BASE, num_key_value_heads=2, head_dim=24, sliding_window=5)),
    "qwen2_bias_window_sharded": Variant("qwen2", dict(
        _BASE, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
        max_window_layers=2, tie_word_embeddings=True), max_shard_size="40KB"),
    "qwen3_qk_norm": Variant("qwen3", dict(_BASE, num_key_value_heads=2, head_dim=32,
                                           tie_word_embeddings=True)),
    "llama_bf16": Variant("llama", dict(_BASE, num_key_value_heads=2), dtype="bfloat16"),
}

_CONFIG_CLASSES = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
}


def build_hf_model(family: str, config: dict[str, Any], seed: int = 0):
  """A random HF causal LM in float32 with perturbed norms and biases."""
  torch.manual_seed(seed)
  hf_config = _CONFIG_CLASSES[family](**config)
  hf_config._attn_implementation = "eager"
  model = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
  model = model.float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.2 * torch.randn_like(p))
  return model


def tiny_tokenizer(vocab_size: int) -> transformers.PreTrainedTokenizerFast:
  """A word-level tokenizer over `vocab_size` made-up words (ids 0-2 special)."""
  from tokenizers import Tokenizer, models, pre_tokenizers
  vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
  vocab.update({f"w{i}": i for i in range(3, vocab_size)})
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                              bos_token="<s>", eos_token="</s>")


def save_variant(name: str, directory: str, seed: int = 0) -> str:
  """Writes variant `name` and a tokenizer with `save_pretrained`; returns the directory."""
  variant = VARIANTS[name]
  model = build_hf_model(variant.family, variant.config, seed)
  if variant.dtype == "bfloat16":
    model = model.to(torch.bfloat16)
  kwargs = {}
  if variant.max_shard_size:
    kwargs["max_shard_size"] = variant.max_shard_size
  model.save_pretrained(directory, **kwargs)
  tiny_tokenizer(variant.config["vocab_size"]).save_pretrained(directory)
  return directory


def load_hf(directory: str, dtype=torch.float32):
  """The reference: HF's own loader, eager attention, eval mode."""
  model = transformers.AutoModelForCausalLM.from_pretrained(
      directory, dtype=dtype, attn_implementation="eager")
  return model.eval()


def delete_blocks(model, keep: np.ndarray):
  """HF model with the removed blocks deleted from `model.model.layers`."""
  kept = [int(i) for i in np.flatnonzero(keep)]
  model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in kept])
  model.config.num_hidden_layers = len(kept)
  if getattr(model.config, "layer_types", None) is not None:
    model.config.layer_types = [model.config.layer_types[i] for i in kept]
  for new, layer in enumerate(model.model.layers):
    layer.self_attn.layer_idx = new
  return model


def hf_forward(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None):
  """HF logits `[B, T, V]` and hidden states `[L+1, B, T, d]` (numpy, float32).

  Position ids count real tokens only (as dpjax does), so padded rows match
  their unpadded selves.
  """
  ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long)
  if attention_mask is None:
    attention_mask = np.ones_like(input_ids)
  mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long)
  positions = torch.clamp(mask.cumsum(-1) - 1, min=0)
  with torch.no_grad():
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                output_hidden_states=True, use_cache=False)
  logits = out.logits.float().numpy()
  hidden = torch.stack(out.hidden_states).float().numpy()
  return logits, hidden


def random_batch(vocab: int, batch: int, length: int, seed: int = 0,
                 padding: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and an attention mask; padded rows lose 1..length//2 tokens."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(3, vocab, size=(batch, length)).astype(np.int32)
  mask = np.ones((batch, length), dtype=np.int32)
  if padding:
    for row in range(1, batch):
      pad = int(rng.integers(1, length // 2 + 1))
      if padding == "left":
        mask[row, :pad] = 0
      else:
        mask[row, length - pad:] = 0
    ids = np.where(mask == 1, ids, 0).astype(np.int32)
  return ids, mask
