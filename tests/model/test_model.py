"""The scanned decoder against Hugging Face PyTorch, variant by variant."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dpjax
from dpjax.model.layers import rms_norm
from dpjax.engine.compilation import CompileCounter
from dpjax.model.plan import keep_buckets
from tests.support import reference

VARIANTS = sorted(reference.VARIANTS)
ATOL = 1e-4
MAX_KL = 1e-6


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
  """Largest KL(p || q) over positions, from logits, in float64."""
  p = p_logits.astype(np.float64)
  q = q_logits.astype(np.float64)
  logp = p - np.log(np.exp(p - p.max(-1, keepdims=True)).sum(-1, keepdims=True)) - p.max(-1, keepdims=True)
  logq = q - np.log(np.exp(q - q.max(-1, keepdims=True)).sum(-1, keepdims=True)) - q.max(-1, keepdims=True)
  return float((np.exp(logp) * (logp - logq)).sum(-1).max())


@pytest.fixture(scope="module")
def loaded(hf_checkpoint_dir):
  """variant -> (dpjax model in float32, HF reference model in float32)."""
  cache = {}

  def get(name):
    if name not in cache:
      directory = hf_checkpoint_dir(name)
      cache[name] = (dpjax.load_model(directory, dtype="float32"), reference.load_hf(directory))
    return cache[name]

  return get


@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_hf(loaded, variant, padding):
  model, ref = loaded(variant)
  ids, mask = reference.random_batch(model.config.vocab_size, 3, 11, seed=1, padding=padding)
  want, _ = reference.hf_forward(ref, ids, mask)
  got = np.asarray(model.logits(ids, attention_mask=mask))
  real = mask.astype(bool)
  assert np.abs(got - want)[real].max() <= ATOL
  assert _kl(want[real], got[real]) <= MAX_KL


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_hidden_state_matches_hf(loaded, variant):
  model, ref = loaded(variant)
  ids, mask = reference.random_batch(model.config.vocab_size, 2, 9, seed=2, padding="left")
  _, want = reference.hf_forward(ref, ids, mask)
  got = np.asarray(model.hidden_states(ids, attention_mask=mask))
  n = model.num_layers
  assert got.shape == (n + 1, 2, 9, model.config.hidden_size)
  real = mask.astype(bool)
  # HF's entries 0..L-1 are before the final norm, like ours ...
  np.testing.assert_allclose(got[:n][:, real], want[:n][:, real], atol=ATOL, rtol=0)
  # ... and its last entry is after it: apply HF's own final norm to ours.
  with torch.no_grad():
    normed = ref.model.norm(torch.from_numpy(got[n])).numpy()
  np.testing.assert_allclose(normed[real], want[n][real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", ["llama_gqa_tied_sharded", "qwen2_bias_window_sharded",
                                     "mistral_window_head_dim", "qwen3_qk_norm",
                                     "gemma2_softcap_window", "gemma3_qk_norm_local_rope",
                                     "phi3_fused_window"])
@pytest.mark.parametrize("kept", [(0, 2, 3), (3,), (1, 2)])
@pytest.mark.parametrize("gather", [True, False])
def test_masked_forward_matches_hf_with_blocks_deleted(hf_checkpoint_dir, loaded, variant, kept,
                                                        gather):
  model, _ = loaded(variant)
  keep = dpjax.keep_mask(kept, model.num_layers)
  ref = reference.delete_blocks(reference.load_hf(hf_checkpoint_dir(variant)), keep)
  ids, mask = reference.random_batch(model.config.vocab_size, 3, 10, seed=3, padding="left")
  want_logits, want_hidden = reference.hf_forward(ref, ids, mask)
  real = mask.astype(bool)
  got = np.asarray(model.logits(ids, keep=keep, attention_mask=mask, gather=gather))
  assert np.abs(got - want_logits)[real].max() <= ATOL
  # Hidden states: a kept block's output sits at its original index; a removed
  # block repeats its input.
  hidden = np.asarray(model.hidden_states(ids, keep=keep, attention_mask=mask, gather=gather))
  np.testing.assert_allclose(hidden[0][real], want_hidden[0][real], atol=ATOL, rtol=0)
  for position, block in enumerate(kept[:-1]):
    np.testing.assert_allclose(hidden[block + 1][real], want_hidden[position + 1][real],
                               atol=ATOL, rtol=0)
  for block in range(model.num_layers):
    if not keep[block]:
      np.testing.assert_array_equal(hidden[block + 1], hidden[block])


def test_padded_rows_equal_their_unpadded_selves(loaded):
  model, _ = loaded("qwen2_bias_window_sharded")
  ids, _ = reference.random_batch(model.config.vocab_size, 1, 8, seed=4)
  alone = np.asarray(model.logits(ids))[0]
  for side in ("left", "right"):
    padded = np.zeros((1, 12), np.int32)
    mask = np.zeros((1, 12), np.int32)
    where = slice(4, 12) if side == "left" else slice(0, 8)
    padded[0, where], mask[0, where] = ids[0], 1
    got = np.asarray(model.logits(padded, attention_mask=mask))[0, where]
    np.testing.assert_allclose(got, alone, atol=1e-5, rtol=0)


def test_the_fixtures_exercise_sliding_windows(loaded):
  """The window tests above would pass vacuously on prompts shorter than the window."""
  for variant in ("mistral_window_head_dim", "qwen2_bias_window_sharded"):
    cfg = loaded(variant)[0].config
    assert cfg.sliding_window is not None and cfg.sliding_window < 9
    assert any(cfg.sliding_layers)
  qwen2 = loaded("qwen2_bias_window_sharded")[0].config
  assert qwen2.sliding_layers == (False, False, True, True)
  model, _ = loaded("mistral_window_head_dim")
  ids, _ = reference.random_batch(model.config.vocab_size, 1, 10, seed=5)
  windowed = np.asarray(model.logits(ids))
  unwindowed = dpjax.DecoderModel(model.config.replace(sliding_window=None, sliding_layers=()),
                                  model.params())
  assert np.abs(windowed - np.asarray(unwindowed.logits(ids)))[0, 6:].max() > 1e-3


def test_bf16_weights_compute_in_float32_exactly(hf_checkpoint_dir):
  directory = hf_checkpoint_dir("llama_bf16")
  model = dpjax.load_model(directory)  # keeps the checkpoint's bfloat16 weights
  assert model.config.param_dtype == "bfloat16"
  assert model.params()["blocks"]["q"].dtype == np.dtype("bfloat16")
  fp32_compute = dpjax.load_model(directory, compute_dtype="float32")
  ids, mask = reference.random_batch(model.config.vocab_size, 2, 8, seed=6, padding="right")
  want, _ = reference.hf_forward(reference.load_hf(directory, torch.float32), ids, mask)
  real = mask.astype(bool)
  got32 = np.asarray(fp32_compute.logits(ids, attention_mask=mask))
  assert np.abs(got32 - want)[real].max() <= ATOL
  # bfloat16 compute: close to HF's own bfloat16 run, as bfloat16 allows.
  want16, _ = reference.hf_forward(reference.load_hf(directory, torch.bfloat16), ids, mask)
  got16 = np.asarray(model.logits(ids, attention_mask=mask)).astype(np.float32)
  assert got16.dtype == np.float32 and model.compute_dtype == np.dtype("bfloat16")
  assert np.abs(got16 - want16)[real].max() <= 0.1
  assert (got16.argmax(-1) == want16.argmax(-1))[real].mean() >= 0.9


def test_changing_the_mask_does_not_recompile(loaded):
  model, _ = loaded("llama_mha")
  ids, _ = reference.random_batch(model.config.vocab_size, 2, 6, seed=7)
  masks = [np.array(m, dtype=bool) for m in
           ([1, 1, 1, 1], [1, 0, 1, 1], [0, 0, 0, 1], [1, 1, 0, 0], [0, 1, 0, 0])]
  counter = CompileCounter()
  for keep in masks:
    model.logits(ids, keep=keep, gather=False)
  assert counter.programs == 1
  # Gather form: one program for every kept count (3, 1, 2 here: the loop's trip count
  # is data); keeping every block runs the mask-form program already compiled.
  counter = CompileCounter()
  for keep in masks:
    model.logits(ids, keep=keep, gather=True)
  assert len({int(k.sum()) for k in masks if not k.all()}) == 3
  assert counter.programs == 1


def test_gather_buckets_bound_compiles_for_deep_models():
  assert keep_buckets(32) == tuple(range(2, 33, 2))
  assert keep_buckets(16) == tuple(range(1, 17))
  assert keep_buckets(3) == (1, 2, 3)
  assert len(keep_buckets(80)) == 16


def test_keep_is_validated(loaded):
  model, _ = loaded("llama_mha")
  ids = np.ones((1, 4), np.int32)
  with pytest.raises(ValueError, match=r"boolean vector of length 4.*dtype int64"):
    model.logits(ids, keep=np.array([0, 1, 2, 3]))
  with pytest.raises(ValueError, match="removes every block"):
    model.logits(ids, keep=np.zeros(4, bool))
  with pytest.raises(ValueError, match=r"indices \[7\] are out of range.*0\.\.3"):
    dpjax.keep_mask([0, 7], 4)
  with pytest.raises(ValueError, match=r"indices \[1\] are repeated"):
    dpjax.keep_mask([1, 1, 2], 4)


def test_rms_norm_matches_hf_in_bfloat16():
  x = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
  w = np.random.default_rng(1).normal(size=(16,)).astype(np.float32)
  from transformers.models.llama.modeling_llama import LlamaRMSNorm
  norm = LlamaRMSNorm(16, eps=1e-6).to(torch.bfloat16)
  with torch.no_grad():
    norm.weight.copy_(torch.from_numpy(w))
    want = norm(torch.from_numpy(x).bfloat16()).float().numpy()
  import jax.numpy as jnp
  got = np.asarray(rms_norm(jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16), 1e-6))
  np.testing.assert_allclose(got.astype(np.float32), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("variant", ["llama_gqa_tied_sharded", "mistral_window_head_dim",
                                     "gemma2_softcap_window", "gemma3_qk_norm_local_rope"])
def test_last_block_at_some_rows_gives_those_rows_of_the_whole(loaded, variant):
  """`rows=`: the last block's attention output and MLP at those positions only equal the
  same rows of the whole forward (windows, local rope, padding included); with no step to
  run, the rows of the input."""
  import jax.numpy as jnp

  from dpjax.model.plan import stacked_steps
  model, _ = loaded(variant)
  module, L = model.module(), model.num_layers
  ids, mask = reference.random_batch(model.config.vocab_size, 3, 12, seed=6, padding="left")
  rows = np.array([[11, 5, 7], [11, 8, 9], [11, 10, 6]], np.int32)
  take = lambda h: np.take_along_axis(np.asarray(h), rows[..., None], axis=1)
  for kept in ([0, 1, 2, 3], [0, 2], [3], [1, 2]):
    index, valid = (jnp.asarray(a[0]) for a in stacked_steps([kept], L))
    whole, _, _ = module.run_blocks(ids, mask, index, valid)
    part, _, _ = module.run_blocks(ids, mask, index, valid, rows=rows)
    assert part.shape == (3, 3, model.config.hidden_size)
    np.testing.assert_allclose(part, take(whole), atol=1e-5, rtol=1e-5, err_msg=str(kept))
  h0 = module.embed_tokens(ids)
  ctx = module.attention_context(mask)
  none, _ = module.scan_blocks(h0, ctx, index, jnp.zeros_like(valid), rows=rows)
  np.testing.assert_array_equal(none, take(h0))


def test_gelu_tanh_equals_torch_and_its_gradient_is_finite_far_below_zero():
  """Gemma's GELU (tanh form) against torch's in float64, from -1000 to 30, and its
  gradient: finite everywhere (Gemma 3's gate pre-activations reach -20 and beyond), equal to
  torch's float64 gradient where that is representable."""
  import jax
  from dpjax.model.layers import mlp_activation
  x = np.concatenate([-np.logspace(3, -3, 400), np.linspace(0, 30, 200)]).astype(np.float32)
  want = torch.nn.functional.gelu(torch.tensor(x, dtype=torch.float64), approximate="tanh")
  got = np.asarray(mlp_activation(jax.numpy.asarray(x), "gelu_tanh"), np.float64)
  np.testing.assert_allclose(got, want.numpy(), rtol=2e-6, atol=1e-12)
  grad = np.asarray(jax.vmap(jax.grad(lambda v: mlp_activation(v, "gelu_tanh")))(x), np.float64)
  assert np.isfinite(grad).all()
  t = torch.tensor(x, dtype=torch.float64, requires_grad=True)
  torch.nn.functional.gelu(t, approximate="tanh").sum().backward()
  np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-5, atol=1e-6)
