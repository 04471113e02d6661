"""Greedy decoding with a KV cache, pruned and unpruned, against HF `generate` and
against dpjax's own full forward passes."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import dpjax
from tests.support import reference
from dpjax.serve import server as serve

NEW = 6


def _prompts(vocab: int):
  ids, _ = reference.random_batch(vocab, 3, 9, seed=4)
  return ids


@pytest.mark.parametrize("variant", ["llama_gqa_tied_sharded", "qwen3_qk_norm",
                                     "gemma3_qk_norm_local_rope", "gemma2_softcap_window",
                                     "phi3_fused_window", "mistral_window_head_dim"])
@pytest.mark.parametrize("kept", [None, (0, 2)])
def test_greedy_tokens_equal_hf_generate(hf_checkpoint_dir, variant, kept):
  """Sliding windows (4-6 positions here) are crossed: 9 prompt tokens + 6 new ones."""
  directory = hf_checkpoint_dir(variant)
  model = dpjax.load_model(directory, dtype="float32")
  keep = None if kept is None else dpjax.keep_mask(kept, model.num_layers)
  ids = _prompts(model.config.vocab_size)
  got = np.asarray(serve.Server(model, keep).generate(ids, max_new_tokens=NEW))

  ref = reference.load_hf(directory)
  if keep is not None:
    ref = reference.delete_blocks(ref, keep)
  with torch.no_grad():
    out = ref.generate(torch.as_tensor(ids, dtype=torch.long), max_new_tokens=NEW,
                       do_sample=False, min_new_tokens=NEW, pad_token_id=0)
  want = out[:, ids.shape[1]:].numpy()
  np.testing.assert_array_equal(got, want)


def test_step_logits_equal_full_forward_and_padding_is_invisible(hf_checkpoint_dir):
  model = dpjax.load_model(hf_checkpoint_dir("llama_gqa_tied_sharded"), dtype="float32")
  keep = dpjax.keep_mask([1, 3], model.num_layers)
  ids = _prompts(model.config.vocab_size)
  server = serve.Server(model, keep)
  tokens, logits = server.generate(ids, max_new_tokens=NEW, return_logits=True)
  tokens, logits = np.asarray(tokens), np.asarray(logits)
  # Each step's logits are the full (uncached) forward pass's on the sequence so far.
  whole = np.concatenate([ids, tokens[:, :-1]], axis=1)
  full = np.asarray(model.logits(whole, keep=keep))
  np.testing.assert_allclose(logits, full[:, ids.shape[1] - 1:], atol=2e-5, rtol=0)
  # The prefill alone gives the first step's logits.
  np.testing.assert_allclose(np.asarray(server.prefill(ids)), logits[:, 0], atol=2e-5, rtol=0)

  # Row 1 left-padded by 4 pad tokens generates what it generates alone.
  padded = np.concatenate([np.zeros((3, 4), ids.dtype), ids], axis=1)
  mask = np.ones_like(padded)
  mask[1, :4] = 0
  padded[0, :4], padded[2, :4] = ids[0, :4], ids[2, :4]  # rows 0 and 2: 4 more real tokens
  got_tokens, got_logits = server.generate(padded, mask, max_new_tokens=NEW, return_logits=True)
  np.testing.assert_array_equal(np.asarray(got_tokens)[1], tokens[1])
  np.testing.assert_allclose(np.asarray(got_logits)[1], logits[1], atol=2e-5, rtol=0)


def test_noised_generation_equals_hf_with_the_same_noise(hf_checkpoint_dir):
  """The noise probe's noise in the KV-cache server (every kept block, prompt and
  generated tokens alike, keyed by seed, item, block and position) against HF greedy
  decoding with the same draws added by forward hooks, row by row, unpadded; a zero
  scale changes nothing."""
  directory = hf_checkpoint_dir("llama_gqa_tied_sharded")
  model = dpjax.load_model(directory, dtype="float32")
  ids = _prompts(model.config.vocab_size)
  padded = np.concatenate([np.zeros((3, 2), ids.dtype), ids], axis=1)
  mask = np.ones_like(padded)
  mask[1, :2] = 0
  padded[0, :2], padded[2, :2] = ids[0, :2], ids[2, :2]
  server = serve.Server(model)
  scale = np.zeros(model.num_layers, np.float32)
  scale[[0, 2]] = np.sqrt(0.5)  # eps^2 = 0.5: enough to change greedy tokens
  items = np.array([7, 3, 11])
  got = np.asarray(server.generate(padded, mask, max_new_tokens=NEW, noise_scale=scale,
                                   noise_seed=2, items=items))
  clean = np.asarray(server.generate(padded, mask, max_new_tokens=NEW))
  np.testing.assert_array_equal(
      np.asarray(server.generate(padded, mask, max_new_tokens=NEW, noise_scale=0 * scale,
                                 noise_seed=2, items=items)), clean)
  assert (got != clean).any()  # the noise is felt
  ref = reference.load_hf(directory)
  for row in range(3):
    prompt = padded[row][mask[row] == 1].tolist()
    want = reference.hf_noised_greedy(ref, prompt, NEW, scale, seed=2, item=int(items[row]))
    np.testing.assert_array_equal(got[row], want)
  with pytest.raises(ValueError, match=r"noise_scale must be \[4\]"):
    server.generate(padded, mask, noise_scale=np.ones(3))


def test_bad_input_is_refused_by_name(hf_checkpoint_dir):
  model = dpjax.load_model(hf_checkpoint_dir("llama_gqa_tied_sharded"), dtype="float32")
  server = serve.Server(model)
  ids = _prompts(model.config.vocab_size)
  with pytest.raises(ValueError, match="max_new_tokens=0"):
    server.generate(ids, max_new_tokens=0)
  right_padded = np.ones_like(ids)
  right_padded[0, -2:] = 0
  with pytest.raises(ValueError, match="left-padded"):
    server.generate(ids, right_padded)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    server.generate(ids, max_new_tokens=10_000)


def test_the_documented_serving_example_runs():
  """docs/checkpoints.md's serving example, as written, on the bundled model."""
  import re

  import dpjax
  from dpjax.bundled import BUNDLED_MODEL
  docs = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))), "docs", "checkpoints.md")
  with open(docs) as f:
    text = f.read()
  (example,) = [block for block in re.findall(r"```python\n(.*?)```", text, re.S)
                if "serve.Server" in block]
  model = dpjax.load_model(BUNDLED_MODEL)
  scope = {"model": model, "keep": dpjax.keep_mask([0, 1, 2, 5, 9, 15], model.num_layers),
           "ids": np.array([[1, 45, 99, 17, 3]])}
  exec(example, scope)  # pylint: disable=exec-used
  assert np.asarray(scope["tokens"]).shape == (1, 32)
  assert np.asarray(scope["next_logits"]).shape == (1, model.config.vocab_size)
