"""A GGUF file written from an HF checkpoint directory (a pruned export, usually), for the
families whose GGUF form transformers' GGUF loading reads back without loss: Llama (no
biases), Mistral without a sliding window (written as the Llama it then is), Qwen2, and
Qwen3 with the head size 128 that its GGUF loading assumes (every released Qwen3).

What llama.cpp's converter does for these families, and no more: tensors renamed with the
`gguf` package's own name map (`blk.N.attn_q`...), Llama's q/k rows permuted for its rope
layout, every 2-D weight kept in the checkpoint's dtype (float32, float16 or bfloat16;
nothing is quantized), the metadata transformers maps back to the config, and the
byte-level BPE tokenizer (tokens, merges, token kinds, special ids). Anything these keys
cannot carry is refused before a byte is written, naming the setting: a rope scaling, a
sliding window, another tokenizer model, another family (Gemma's soft-capping, attention
scale and local rope base, Phi-3's window have no GGUF key transformers reads).
`dpjax-prune --gguf` then reloads the file and compares its logits and its tokenizer.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

# HF model_type -> llama.cpp's architecture name.
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def _refuse_unstated(config, model_type: str) -> None:
  rope = getattr(config, "rope_parameters", None) or {}
  rope_type = rope.get("rope_type", "default") if isinstance(rope, dict) else "default"
  if rope_type not in ("default", None):
    raise ValueError(f"this {model_type} checkpoint uses rope scaling {rope_type!r}, which "
                     "the GGUF keys transformers reads cannot carry; export it as an HF "
                     "checkpoint only.")
  if model_type in ("llama", "mistral") and (getattr(config, "attention_bias", False)
                                             or getattr(config, "mlp_bias", False)):
    raise ValueError(f"this {model_type} checkpoint has attention or MLP biases, which a "
                     "llama GGUF file does not declare (transformers would load it without "
                     "them); export it as an HF checkpoint only.")
  window = getattr(config, "sliding_window", None)
  if window and getattr(config, "use_sliding_window", model_type == "mistral"):
    raise ValueError(f"this {model_type} checkpoint attends in a sliding window of {window} "
                     "tokens, which its GGUF form does not state; export it as an HF "
                     "checkpoint only.")
  if model_type == "qwen3":
    import transformers
    assumed = transformers.Qwen3Config().head_dim  # what the GGUF loader's config keeps
    if config.head_dim != assumed:
      raise ValueError(f"this qwen3 checkpoint's head size is {config.head_dim}, and "
                       "transformers' GGUF loading of qwen3 reads no head size (it keeps "
                       f"Qwen3Config's {assumed}); export it as an HF checkpoint only.")


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
  """HF's q/k rows in llama.cpp's rope layout (its converter's `permute`)."""
  return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def check_writable(directory: str) -> None:
  """Refuses, before any work, an HF checkpoint this module cannot write faithfully."""
  _inspect(directory)


def _inspect(directory: str) -> tuple[Any, dict, str]:
  """(the config, tokenizer.json, the pre-tokenizer's GGUF name) of a checkpoint this
  module can write faithfully; anything else is refused by name."""
  import transformers
  config = transformers.AutoConfig.from_pretrained(directory)
  if config.model_type not in ARCHITECTURES:
    raise ValueError(f"writing GGUF from an HF {config.model_type!r} checkpoint is not built "
                     f"(its GGUF form would not load back the same): families "
                     f"{sorted(ARCHITECTURES)}. Export the HF checkpoint and convert it with "
                     "llama.cpp's convert_hf_to_gguf.py, or prune a GGUF source with --gguf.")
  _refuse_unstated(config, config.model_type)
  return config, _tokenizer_spec(directory), _pre_tokenizer(directory)


def _tokenizer_spec(directory: str) -> dict:
  path = os.path.join(directory, "tokenizer.json")
  if not os.path.isfile(path):
    raise ValueError(f"{directory} has no tokenizer.json: a GGUF file carries its tokenizer, "
                     "and only a byte-level BPE tokenizer.json can be written.")
  with open(path) as f:
    spec = json.load(f)
  model = spec.get("model", {})
  pre = spec.get("pre_tokenizer") or {}
  byte_level = pre.get("type") == "ByteLevel" or any(
      p.get("type") == "ByteLevel" for p in pre.get("pretokenizers", []))
  if model.get("type") != "BPE" or not byte_level:
    raise ValueError(f"{path}: a {model.get('type')} tokenizer with a {pre.get('type')} "
                     "pre-tokenizer; only byte-level BPE (GGUF's gpt2 model) is written. "
                     "Export an HF checkpoint only.")
  return spec


def _pre_tokenizer(directory: str) -> str:
  """The `tokenizer.ggml.pre` name under which transformers' GGUF loading splits text as
  the checkpoint's tokenizer does, read from the split transformers itself applies to the
  checkpoint (its Qwen2 tokenizer imposes Qwen2's split whatever tokenizer.json says): GPT-2's
  for a plain byte-level step, else the name of the same regex in transformers' own table.
  The reload check then compares the two on text."""
  import transformers
  backend = transformers.AutoTokenizer.from_pretrained(directory).backend_tokenizer
  pre = json.loads(backend.to_str()).get("pre_tokenizer") or {}
  steps = pre.get("pretokenizers", [pre])
  kinds = [step.get("type") for step in steps]
  if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
    return "default"
  if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    pattern = steps[0].get("pattern", {}).get("Regex")
    for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
      if split == pattern:
        return name
  raise ValueError(f"{directory}: its tokenizer splits text with {' + '.join(map(str, kinds))}"
                   ", which no GGUF pre-tokenizer name gives under transformers' GGUF loading; "
                   "export an HF checkpoint only.")


def _tokenizer(writer, directory: str, spec: dict, pre: str, vocab_size: int) -> None:
  """The tokenizer's keys; the token list padded to the embedding's rows (`[PADi]`, as
  llama.cpp's converter pads it: llama.cpp wants one token per row)."""
  import gguf
  model = spec["model"]
  vocab = dict(model["vocab"])
  special = set()
  for added in spec.get("added_tokens", []):
    vocab[added["content"]] = added["id"]
    if added.get("special"):
      special.add(added["id"])
  size = max(max(vocab.values()) + 1, vocab_size)
  tokens = [f"[PAD{i}]" for i in range(size)]
  for token, index in vocab.items():
    tokens[index] = token
  kinds = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL
           for i in range(size)]
  merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types(kinds)
  writer.add_token_merges(merges)
  with open(os.path.join(directory, "tokenizer_config.json")) as f:
    config = json.load(f)
  for name, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                    ("pad_token", writer.add_pad_token_id), ("unk_token", writer.add_unk_token_id)):
    value = config.get(name)
    value = value.get("content") if isinstance(value, dict) else value
    if value is not None and value in vocab:
      add(vocab[value])


def _tensors(directory: str) -> dict[str, np.ndarray]:
  """Every stored tensor, bfloat16 as ml_dtypes' bfloat16."""
  from safetensors.numpy import load_file
  out: dict[str, np.ndarray] = {}
  for name in sorted(os.listdir(directory)):
    if name.endswith(".safetensors"):
      out.update(load_file(os.path.join(directory, name)))
  if not out:
    raise ValueError(f"{directory} holds no .safetensors files.")
  return out


def write_gguf_from_hf(directory: str, output: str) -> str:
  """Writes `output` (atomically) from the HF checkpoint in `directory`; returns it."""
  import gguf
  import ml_dtypes
  config, spec, pre = _inspect(directory)
  model_type = config.model_type
  arch = ARCHITECTURES[model_type]
  enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
  names = gguf.get_tensor_name_map(enum, config.num_hidden_layers)
  tmp = output + ".tmp"
  writer = gguf.GGUFWriter(tmp, arch)
  try:
    # A Mistral without a window is a Llama, written and read back as one (transformers
    # would read a name saying "mistral" as MistralConfig, whose default window is set).
    writer.add_name(f"{ARCHITECTURES[model_type]}, pruned by dpjax")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_vocab_size(config.vocab_size)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    _tokenizer(writer, directory, spec, pre, config.vocab_size)
    for name, array in _tensors(directory).items():
      stem, _, suffix = name.rpartition(".")
      mapped = names.get_name(stem)
      if mapped is None:
        raise ValueError(f"{directory}: tensor {name!r} has no GGUF name for {arch}.")
      if arch == "llama" and stem.endswith("self_attn.q_proj"):
        array = _permute(array, config.num_attention_heads)
      elif arch == "llama" and stem.endswith("self_attn.k_proj"):
        array = _permute(array, config.num_key_value_heads)
      raw: dict[str, Any] = {}
      if array.dtype == ml_dtypes.bfloat16:  # handed over as its bytes, typed BF16
        array = np.ascontiguousarray(array).view(np.uint8)
        raw = {"raw_dtype": gguf.GGMLQuantizationType.BF16}
      elif array.ndim == 1:
        array = array.astype(np.float32)  # norms and biases: llama.cpp keeps them float32
      writer.add_tensor(f"{mapped}.{suffix}", np.ascontiguousarray(array), **raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, output)
  except BaseException:
    writer.close()
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return output
