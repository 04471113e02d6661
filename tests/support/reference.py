"""The Hugging Face PyTorch reference that every dpjax number is checked against.

Used by the tests and the benchmarks, never by the installed package (it needs
torch, which the package does not depend on):

* Tiny random HF checkpoints written with `save_pretrained`, exactly as a
  download looks, one per variant dpjax supports (`VARIANTS`). The weights are
  random but not timid: norms and biases are perturbed away from their 1/0
  initial values so that a mistake in any of them shows in the logits.
* HF's own forward pass (`hf_forward`), with blocks deleted (`delete_blocks`).
* transformers' dense model of a GGUF file (`load_hf_gguf`), and the float64 oracle
  (`float64_oracle`): an HF model that computes in float64 throughout, checked
  with `LowPrecisionOps`.
* `HFIterativeReference`: the study the straightforward HF-PyTorch way, as a
  careful researcher writes it. Per candidate of every Iterative Pruning step:
  point `model.model.layers` at the kept blocks, run the model with
  `output_hidden_states=True`, `use_cache=False` under `torch.no_grad()`, and
  read every hidden state at the answer position through HF's own final norm
  and `lm_head` (the logit lens). The metrics are computed here in numpy,
  independently of `dpjax.study.metrics`. The benchmarks check that it picks the same
  sequence as dpjax, with the same numbers, before they report any time.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from types import MethodType
from typing import Any, Sequence

import numpy as np
import torch
from torch.overrides import TorchFunctionMode
import transformers

from dpjax.tasks import Batch

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
    # Gemma 2: head_dim 32 (q width 128 != hidden 64), a query scale that is not head_dim,
    # attention and final soft-capping, sliding and full blocks, GQA.
    "gemma2_softcap_window": Variant("gemma2", dict(
        _BASE, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0, sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "full_attention",
                     "sliding_attention"], tie_word_embeddings=True)),
    # Gemma 3: q/k norms, a rope base of its own on sliding blocks (linear x8 on full ones),
    # final soft-capping (its attention soft-capping is set, and ignored as HF does).
    "gemma3_qk_norm_local_rope": Variant("gemma3_text", dict(
        _BASE, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=20,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0, sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention",
                     "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                            "rope_theta": 1_000_000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
        tie_word_embeddings=True)),
    # Phi-3: fused qkv_proj and gate_up_proj, a sliding window on every block, GQA.
    "phi3_fused_window": Variant("phi3", dict(_BASE, num_key_value_heads=2, sliding_window=6)),
}

_CONFIG_CLASSES = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
    "gemma2": transformers.Gemma2Config,
    "gemma3_text": transformers.Gemma3TextConfig,
    "phi3": transformers.Phi3Config,
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


def load_hf_gguf(path: str, dtype=torch.float32, attn_implementation: str | None = None):
  """transformers' dense model of the GGUF file at `path`: every weight dequantized.

  This is what dpjax computes (it dequantizes on loading). transformers 5.2x otherwise
  keeps a GGUF file's quantized weights packed where it has kernels for them and
  computes through those float32 kernels (asked for float64 it warns that they still
  compute in float32); `GgufConfig(dequantize=True)` asks for the dense model. A model
  that comes back with a packed module or a parameter not in `dtype` is refused.
  `attn_implementation`: None for transformers' default.
  """
  from dpjax.checkpoints.gguf import transformers_dense_kwargs
  extra = transformers_dense_kwargs(path)
  if attn_implementation is not None:
    extra["attn_implementation"] = attn_implementation
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), dtype=dtype, **extra).eval()
  packed = sorted({type(m).__name__ for m in model.modules()
                   if type(m).__name__.lower().startswith("gguf")})
  dtypes = {p.dtype for p in model.parameters()}
  if packed or dtypes != {dtype}:
    raise RuntimeError(f"transformers loaded {os.path.basename(path)} with modules {packed} "
                       f"and parameters in {sorted(map(str, dtypes))}, not dense in {dtype}.")
  return model


def _rms_norm_float64(self, x):
  """A Llama-kind RMSNorm (`w * x / rms(x)`) computed in `x`'s dtype."""
  return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


def _default_rope_float64(self, x, position_ids):
  """The default rotary tables with the inverse frequencies and angles in float64."""
  dim = 2 * self.inv_freq.shape[-1]
  exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=x.device) / dim
  rope = getattr(self.config, "rope_parameters", None) or {"rope_theta": self.config.rope_theta}
  inv_freq = 1.0 / rope["rope_theta"] ** exponents
  angles = position_ids[..., None].to(torch.float64) * inv_freq
  emb = torch.cat((angles, angles), dim=-1)
  return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def float64_oracle(model):
  """A float64 copy of the dense HF model `model` that computes in float64 throughout.

  `model.double()` alone is not one: HF's modelling code casts to float32 for the
  RMSNorm statistics, the rotary angles (inverse frequencies and positions times them)
  and the eager softmax, so a float64 model still rounds there as its float32 run
  does (which makes the float32 run look closer to it than it is). The copy computes
  its norms and rotary tables in float64 and attends through SDPA, which keeps its
  input's dtype; run it under `LowPrecisionOps` to check that no operation returns a
  tensor below float64. Llama-kind norms and the default rope only (anything else is
  refused).
  """
  oracle = copy.deepcopy(model).double().eval()
  for module in oracle.modules():
    name = type(module).__name__
    if name.endswith("RMSNorm"):
      if not hasattr(module, "variance_epsilon"):
        raise ValueError(f"{name} is not a Llama-kind norm; the float64 oracle does not "
                         "implement it.")
      module.forward = MethodType(_rms_norm_float64, module)
    elif name.endswith("RotaryEmbedding"):
      if module.rope_type != "default" or module.attention_scaling != 1.0:
        raise ValueError(f"rope type {module.rope_type!r}: the float64 oracle implements "
                         "the default rope only.")
      module.forward = MethodType(_default_rope_float64, module)
  oracle.set_attn_implementation("sdpa")
  return oracle


class LowPrecisionOps(TorchFunctionMode):
  """Within it, `seen` collects every torch function that returned a floating tensor
  below float64 (float32, float16, bfloat16)."""

  LOW = (torch.float32, torch.float16, torch.bfloat16)

  def __init__(self):
    super().__init__()
    self.seen: set[str] = set()

  def __torch_function__(self, func, arg_types, args=(), kwargs=None):
    out = func(*args, **(kwargs or {}))
    for value in out if isinstance(out, (tuple, list)) else (out,):
      if isinstance(value, torch.Tensor) and value.dtype in self.LOW:
        self.seen.add(getattr(func, "__name__", str(func)))
    return out


def delete_blocks(model, keep: np.ndarray, *, all_layers=None, layer_types=None):
  """`model` with only the kept blocks left in `model.model.layers`.

  `keep` is a boolean vector over the unpruned model's blocks. `all_layers` and
  `layer_types` are the unpruned model's block list and per-block types, when
  `model` has been pruned before (the weights are shared, not copied).
  """
  layers = list(model.model.layers if all_layers is None else all_layers)
  types = getattr(model.config, "layer_types", None) if layer_types is None else layer_types
  kept = [int(i) for i in np.flatnonzero(keep)]
  model.model.layers = torch.nn.ModuleList([layers[i] for i in kept])
  model.config.num_hidden_layers = len(kept)
  if types is not None:
    model.config.layer_types = [types[i] for i in kept]
  for new, layer in enumerate(model.model.layers):
    layer.self_attn.layer_idx = new
  return model


def hf_forward(model, input_ids: np.ndarray, attention_mask: np.ndarray | None = None):
  """HF logits `[B, T, V]` and hidden states `[L+1, B, T, d]` (numpy, float32).

  Position ids count real tokens only (as dpjax does), so padded rows match
  their unpadded selves.
  """
  device = next(model.parameters()).device
  ids = torch.as_tensor(np.asarray(input_ids), dtype=torch.long, device=device)
  if attention_mask is None:
    attention_mask = np.ones_like(input_ids)
  mask = torch.as_tensor(np.asarray(attention_mask), dtype=torch.long, device=device)
  positions = torch.clamp(mask.cumsum(-1) - 1, min=0)
  with torch.no_grad():
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                output_hidden_states=True, use_cache=False)
  logits = out.logits.float().cpu().numpy()
  hidden = torch.stack(out.hidden_states).float().cpu().numpy()
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


class HFIterativeReference:
  """Iterative Pruning (accuracy criterion) of an HF model on prepared item batches."""

  def __init__(self, model, batches: Sequence[Batch]):
    self.model = model.eval()
    self.device = next(model.parameters()).device  # the GPU, when the model was moved there
    self.layers = list(model.model.layers)
    self.layer_types = getattr(model.config, "layer_types", None)
    self.batches = [b.unshared() for b in batches]  # whole prompts, shots included
    self.block_rows = 0
    # transformers 5 collects hidden states with hooks it installs on the blocks
    # present at the first call: make that call with every block (also a warm-up).
    self.readouts(list(range(len(self.layers))))
    self.block_rows = 0    # blocks run x item rows (filler rows included)

  def _use(self, kept: Sequence[int]) -> None:
    keep = np.zeros(len(self.layers), bool)
    keep[list(kept)] = True
    delete_blocks(self.model, keep, all_layers=self.layers, layer_types=self.layer_types)

  def readouts(self, kept: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lens readouts of the model keeping `kept`: option logits `[n+1, N, K]`, log
    normalizers `[n+1, N]` (layers h_0 and after each kept block) and answers `[N]`."""
    self._use(kept)
    norm, head = self.model.model.norm, self.model.lm_head
    options, normalizers, answers = [], [], []
    for batch in self.batches:
      ids = torch.as_tensor(batch.input_ids, dtype=torch.long, device=self.device)
      mask = torch.as_tensor(batch.attention_mask, dtype=torch.long, device=self.device)
      positions = torch.clamp(mask.cumsum(-1) - 1, min=0)
      with torch.no_grad():
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         output_hidden_states=True, use_cache=False)
        # HF's last hidden state is already normed; the others get the final norm.
        states = [norm(h[:, -1]) for h in out.hidden_states[:-1]] + [out.hidden_states[-1][:, -1]]
        logits = head(torch.stack(states)).double().cpu()  # [n+1, B, V]
      if len(out.hidden_states) != len(kept) + 1:
        raise RuntimeError(f"HF returned {len(out.hidden_states)} hidden states for {len(kept)} "
                           "blocks; transformers hooks the blocks present at the model's first "
                           "call, so make that call with every block.")
      self.block_rows += len(kept) * ids.shape[0]
      rows = batch.index >= 0
      letters = np.where(batch.letter_ids >= 0, batch.letter_ids, 0)
      z = np.take_along_axis(logits.numpy(), letters[None], axis=-1)
      z = np.where(batch.letter_ids[None] >= 0, z, -np.inf)
      lse = torch.logsumexp(logits, dim=-1).numpy()
      options.append(z[:, rows])
      normalizers.append(lse[:, rows])
      answers.append(batch.answer[rows])
    return (np.concatenate(options, 1), np.concatenate(normalizers, 1),
            np.concatenate(answers))

  @staticmethod
  def final_scores(option_logits: np.ndarray, log_normalizer: np.ndarray,
                   answer: np.ndarray) -> tuple[float, float]:
    """Accuracy and mean Decision Margin (vocab) of the last readout."""
    z, lse = option_logits[-1], log_normalizer[-1]
    top = np.argmax(z, axis=-1)  # ties to the lower index
    p = np.exp(z - lse[:, None])
    rows = np.arange(len(answer))
    rival = np.where(np.arange(z.shape[1]) == answer[:, None], -np.inf, p).max(-1)
    return float(np.mean(top == answer)), float(np.mean(p[rows, answer] - rival))

  def iterative_prune(self, num_layers: int, min_layers: int = 1, on_step=None,
                      follow: Sequence[int] | None = None) -> list[dict]:
    """Greedy removal by final accuracy (ties: higher mean DM, then the higher block).

    Returns one record per step: `removed` (0-based block), `accuracy`, `margin`, and
    `choice`, `choice_accuracy`, `choice_margin`: the block this reference picks itself.
    With `follow` (another implementation's order), every candidate is still evaluated
    and the reference's own pick recorded, but the step removes `follow`'s block: two
    candidates whose scores tie to float32 rounding cannot send the two runs apart.
    """
    kept = list(range(num_layers))
    steps = []
    while len(kept) > min_layers:
      scores = {}
      for block in kept:
        candidate = [b for b in kept if b != block]
        scores[block] = self.final_scores(*self.readouts(candidate))
      choice = max(kept, key=lambda b: (*scores[b], b))
      block = choice if follow is None else int(follow[len(steps)])
      kept.remove(block)
      steps.append({"removed": block, "accuracy": scores[block][0], "margin": scores[block][1],
                    "choice": choice, "choice_accuracy": scores[choice][0],
                    "choice_margin": scores[choice][1]})
      if on_step is not None:
        on_step(steps[-1])
    return steps


# ----------------------------------------------------------------------------
# Tiny GGUF files, written the way llama.cpp's converter writes them.

_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "post_feedforward_layernorm": "post_ffw_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf_name: str, arch: str) -> str:
  stem, suffix = hf_name.rsplit(".", 1)
  if stem == "model.embed_tokens":
    return f"token_embd.{suffix}"
  if stem == "model.norm":
    return f"output_norm.{suffix}"
  if stem == "lm_head":
    return f"output.{suffix}"
  _, _, layer, rest = stem.split(".", 3)
  if rest == "post_attention_layernorm":
    kind = "post_attention_norm" if arch == "gemma3" else "ffn_norm"
  elif rest == "pre_feedforward_layernorm":
    kind = "ffn_norm"
  else:
    kind = _GGUF_LAYER_NAMES[rest]
  return f"blk.{layer}.{kind}.{suffix}"


def write_gguf(variant: str, path: str, *, seed: int = 0, quantization: str = "Q8_0",
               architecture: str | None = None, raw_types: dict[str, str] | None = None,
               config_overrides: dict[str, Any] | None = None):
  """A GGUF file of variant `variant` (llama or gemma3_text) with random weights, as
  llama.cpp writes it: q/k rows permuted for its rope (llama), Gemma norms stored as
  `1 + w`, 2-D weights quantized (`quantization`), a byte-less word vocabulary.

  `architecture` overrides `general.architecture`; `raw_types` writes the named
  GGUF tensors' bytes under another GGML type (to make files dpjax must refuse);
  `config_overrides` changes the variant's HF config (the block count, say).
  Returns the HF model whose weights the file holds.
  """
  import gguf
  spec = VARIANTS[variant]
  model = build_hf_model(spec.family, dict(spec.config, **(config_overrides or {})), seed)
  cfg = model.config
  arch = {"llama": "llama", "gemma3_text": "gemma3"}[spec.family]
  writer = gguf.GGUFWriter(path, architecture or arch)
  writer.add_block_count(cfg.num_hidden_layers)
  writer.add_context_length(cfg.max_position_embeddings)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_attention_heads)
  writer.add_head_count_kv(cfg.num_key_value_heads)
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  if arch == "llama":
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
  else:
    writer.add_rope_freq_base(cfg.rope_parameters["full_attention"]["rope_theta"])
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_sliding_window(cfg.sliding_window)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("default")
  writer.add_token_list(["<pad>", "<s>", "</s>"] + [f"w{i}" for i in range(3, cfg.vocab_size)])
  writer.add_token_types([3, 3, 3] + [1] * (cfg.vocab_size - 3))
  writer.add_token_scores([0.0] * cfg.vocab_size)
  writer.add_bos_token_id(1)
  writer.add_eos_token_id(2)
  writer.add_pad_token_id(0)
  qtype = gguf.GGMLQuantizationType[quantization]
  block = gguf.GGML_QUANT_SIZES[qtype][0]
  for hf_name, tensor in model.state_dict().items():
    if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
      continue
    name = _gguf_name(hf_name, arch)
    value = tensor.detach().numpy().astype(np.float32)
    if arch == "llama" and (".attn_q." in name or ".attn_k." in name):
      heads = cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads
      value = value.reshape(heads, 2, value.shape[0] // heads // 2, *value.shape[1:])
      value = value.swapaxes(1, 2).reshape(tensor.shape)
    if arch == "gemma3" and name.endswith("norm.weight"):
      value = value + 1.0
    if raw_types and name in raw_types:
      raw_type = gguf.GGMLQuantizationType[raw_types[name]]
      size, type_bytes = gguf.GGML_QUANT_SIZES[raw_type]
      raw = np.zeros((value.shape[0], value.shape[1] // size * type_bytes), np.uint8)
      writer.add_tensor(name, raw, raw_dtype=raw_type)
    elif value.ndim == 2 and value.shape[1] % block == 0:
      writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    else:
      writer.add_tensor(name, value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return model


# ----------------------------------------------------------------------------
# lm-eval's log-likelihood scoring of multiple-choice continuations, the plain way.


def lm_eval_cloze_scores(model, tokenizer, requests, *, layers: bool = False):
  """Each request `(context, continuation)` scored as lm-eval scores it: encode the
  context and context + continuation, the continuation is the tokens past the
  context's; run the whole sequence alone (no padding, no packing) and sum the
  continuation tokens' log-probabilities.

  Returns `[R]` sums, or with `layers` `[L+1, R]`: the same through HF's final norm
  and lm_head at every hidden state (the logit lens; the last layer is the model's
  own logits). Also returns each continuation's token count.
  """
  sums, counts = [], []
  for context, continuation in requests:
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    cont = whole[len(ctx):]
    ids = torch.tensor([whole[:-1]])
    with torch.no_grad():
      out = model(input_ids=ids, output_hidden_states=layers, use_cache=False)
      if layers:
        states = list(out.hidden_states[:-1])
        logits = [model.lm_head(model.model.norm(h))[0] for h in states] + [out.logits[0]]
        logits = torch.stack(logits)
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:  # HF soft-caps its own logits; the lens applies it at every layer too
          logits[:-1] = torch.tanh(logits[:-1] / cap) * cap
      else:
        logits = out.logits[0][None]
    logp = torch.log_softmax(logits.double(), dim=-1)[:, -len(cont):]
    picked = logp.gather(-1, torch.tensor(cont)[None, :, None].expand(len(logp), -1, 1))
    sums.append(picked[..., 0].sum(-1).numpy())
    counts.append(len(cont))
  sums = np.stack(sums, axis=-1)
  return (sums if layers else sums[0]), np.array(counts)


def noise_tables(seed: int, item: int, num_layers: int, length: int, size: int) -> np.ndarray:
  """`[L, length, size]` the noise probe's draws `z` of one item (`dpjax.model.transformer.
  noise_draw`, keyed by the seed, the item, the block and the position 0..length-1)."""
  import jax.numpy as jnp
  from dpjax.model.transformer import noise_draw, noise_row_keys
  key = noise_row_keys(seed, jnp.array([item]))[0]
  return np.stack([np.asarray(noise_draw(key, block, jnp.arange(length), size))
                   for block in range(1, num_layers + 1)])


def hf_noised_greedy(model, prompt: Sequence[int], new_tokens: int, scale: np.ndarray | None,
                     seed: int = 0, item: int = 0, eos: int | None = None) -> list[int]:
  """Greedy tokens of one unpadded prompt from HF `model` (no cache: every step runs the
  whole sequence), with the noise probe's noise `scale[l] * std(h) * z` added after each
  block `l` whose scale is not 0 (population std over the hidden size, float32), by
  forward hooks on HF's decoder layers; stops after `eos`."""
  layers = list(model.model.layers)
  hooks = []
  if scale is not None and np.any(scale > 0):
    z = torch.as_tensor(noise_tables(seed, item, len(layers), len(prompt) + new_tokens,
                                     model.config.hidden_size))

    def hook_for(block):
      def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        x = h.float()
        noised = (x + float(scale[block]) * x.std(-1, unbiased=False, keepdim=True)
                  * z[block, :x.shape[1]]).to(h.dtype)
        return (noised,) + tuple(output[1:]) if isinstance(output, tuple) else noised
      return hook

    hooks = [layer.register_forward_hook(hook_for(b)) for b, layer in enumerate(layers)
             if scale[b] > 0]
  tokens = list(prompt)
  try:
    with torch.no_grad():
      for _ in range(new_tokens):
        logits = model(torch.as_tensor([tokens]), use_cache=False).logits[0, -1]
        tokens.append(int(logits.argmax()))
        if eos is not None and tokens[-1] == eos:
          break
  finally:
    for h in hooks:
      h.remove()
  return tokens[len(prompt):]


def cache_gguf_metadata() -> None:
  """transformers parses a GGUF file's whole header for its config and again for its
  tokenizer (`load_gguf_checkpoint(..., return_tensors=False)`: 16 s of CPU for Gemma 3's
  262k-token vocabulary, each time): within a test process the metadata of one version of
  a file is parsed once and handed out as a copy. The tensors (`return_tensors=True`) are
  read as before."""
  import functools
  from transformers import modeling_gguf_pytorch_utils as gguf_utils
  original = gguf_utils.load_gguf_checkpoint
  if getattr(original, "cached_metadata", False):
    return

  @functools.lru_cache(maxsize=8)
  def metadata(path: str, size: int, mtime_ns: int):
    del size, mtime_ns  # the key: another version of the file is parsed again
    return original(path, return_tensors=False)

  @functools.wraps(original)
  def load(gguf_checkpoint_path, return_tensors=False, *args, **kwargs):
    if return_tensors or args or kwargs:
      return original(gguf_checkpoint_path, return_tensors, *args, **kwargs)
    stat = os.stat(gguf_checkpoint_path)
    return copy.deepcopy(metadata(os.path.abspath(gguf_checkpoint_path), stat.st_size,
                                  stat.st_mtime_ns))

  load.cached_metadata = True
  gguf_utils.load_gguf_checkpoint = load
