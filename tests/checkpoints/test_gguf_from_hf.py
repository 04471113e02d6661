"""GGUF files written from HF checkpoints (a pruned export): transformers' GGUF loading reads
them back with dpjax's kept-block logits and the same tokenizer, for every family the writer
takes; every other family and setting is refused by name before anything is written."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import transformers

import dpjax
from dpjax.checkpoints.export import export
from dpjax.checkpoints.gguf_from_hf import check_writable, write_gguf_from_hf
from dpjax.variants.export import PROBE_TEXTS, _same_tokenization
from tests.support import reference


def _bpe_tokenizer():
  """A byte-level BPE (GGUF's gpt2 model) trained on a little text, specials 0-2."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=["<pad>", "<s>", "</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(list(PROBE_TEXTS) * 20 + ["the plants take in the air"] * 50,
                          trainer=trainer)
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                              eos_token="</s>", pad_token="<pad>")


CASES = {  # case: (variant, config overrides, embedding rows beyond the tokenizer's)
    "llama_gqa_tied_sharded": ("llama_gqa_tied_sharded", {}, 0),
    "llama_bf16": ("llama_bf16", {}, 0),
    "mistral_head_dim_no_window": ("mistral_window_head_dim", {"sliding_window": None}, 0),
    "qwen2_bias_padded_vocab": ("qwen2_bias_window_sharded", {"use_sliding_window": False}, 7),
    "qwen3_qk_norm": ("qwen3_qk_norm", {"head_dim": 128}, 0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_gguf_file_reloads_with_the_kept_blocks_logits_and_tokenizer(case, tmp_path):
  name, overrides, extra_rows = CASES[case]
  variant = reference.VARIANTS[name]
  tokenizer = _bpe_tokenizer()
  config = dict(variant.config, vocab_size=len(tokenizer) + extra_rows, **overrides)
  hf = reference.build_hf_model(variant.family, config, seed=3)
  if variant.dtype == "bfloat16":
    hf = hf.to(torch.bfloat16)
  source = str(tmp_path / "source")
  hf.save_pretrained(source, **({"max_shard_size": variant.max_shard_size}
                                if variant.max_shard_size else {}))
  tokenizer.save_pretrained(source)
  kept = [0, 2, 3]
  export(source, str(tmp_path / "hf"), kept_blocks=kept)
  out = tmp_path / "gguf"
  out.mkdir()
  write_gguf_from_hf(str(tmp_path / "hf"), str(out / "model.gguf"))
  assert os.listdir(out) == ["model.gguf"]  # nothing else left beside it
  from gguf import GGUFReader
  tokens = GGUFReader(str(out / "model.gguf")).fields["tokenizer.ggml.tokens"]
  assert len(tokens.data) == config["vocab_size"]  # one token per embedding row
  loaded = reference.load_hf_gguf(str(out / "model.gguf"), torch.float32)
  assert loaded.config.num_hidden_layers == 3
  assert loaded.config.tie_word_embeddings == config["tie_word_embeddings"]
  model = dpjax.load_model(source, dtype="float32")
  ids = np.random.default_rng(1).integers(3, len(tokenizer), size=(2, 16))
  want = np.asarray(model.logits(ids, keep=dpjax.keep_mask(kept, 4)), np.float64)
  with torch.no_grad():
    got = loaded(input_ids=torch.as_tensor(ids)).logits.double().numpy()
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
  assert _same_tokenization(str(tmp_path / "hf"), str(out), "model.gguf")["same_ids"]
  words = transformers.AutoTokenizer.from_pretrained(str(out), gguf_file="model.gguf")
  assert words.bos_token_id == 1 and words.eos_token_id == 2 and words.pad_token_id == 0


@pytest.mark.parametrize("name, message", [
    ("gemma2_softcap_window", "HF 'gemma2' checkpoint is not built"),
    ("phi3_fused_window", "HF 'phi3' checkpoint is not built"),
    ("llama3_rope", "rope scaling 'llama3'"),
    ("llama_bias", "attention or MLP biases"),
    ("mistral_window_head_dim", "sliding window of 5 tokens"),
    ("qwen3_qk_norm", "head size is 32, and transformers. GGUF loading of qwen3"),
    ("llama_mha", "a WordLevel tokenizer"),
])
def test_what_a_gguf_file_cannot_state_is_refused_by_name(hf_checkpoint_dir, tmp_path, name,
                                                         message):
  directory = hf_checkpoint_dir(name)
  with pytest.raises(ValueError, match=message):
    check_writable(directory)
  with pytest.raises(ValueError, match=message):
    write_gguf_from_hf(directory, str(tmp_path / "model.gguf"))
  assert not os.listdir(tmp_path)
