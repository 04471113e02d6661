"""Lens readouts against HF PyTorch hidden states, norm and lm_head, and lm-eval scoring."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import transformers

import dpjax
from tests.support import reference
from dpjax.tasks import synthetic
from dpjax import tasks
from dpjax.study import metrics
from dpjax.lens.readout import DecisionReader, Lens, Reads, decision_readout, packing

ATOL = 1e-4


@pytest.fixture(scope="module")
def setup(synthetic_model_dir):
  tokenizer = transformers.AutoTokenizer.from_pretrained(synthetic_model_dir)
  items = synthetic.generate("test", 24)
  shots = tasks.shots_for(items, synthetic.generate("dev", 20), 1)
  prompts = [tasks.prompt(it, s) for it, s in zip(items, shots)]
  # Mix in items with fewer options to exercise the padding of K.
  items[3] = tasks.Item("short", "Pick one?", ("x", "y"), 1, "alphabet")
  prompts[3] = tasks.prompt(items[3])
  encoded = tasks.encode(tokenizer, items, prompts)
  model = dpjax.load_model(synthetic_model_dir)
  return model, encoded, synthetic_model_dir


def _hf_lens(model_dir, encoded, keep=None):
  """Independent readout: HF hidden states at the answer position, HF's own final
  norm and lm_head, numpy softmax. Returns vocab probabilities `[L1, N, K]` at
  the present layers (layer index -> array)."""
  hf = reference.load_hf(model_dir)
  if keep is not None:
    hf = reference.delete_blocks(hf, keep)
  kept = list(range(len(hf.model.layers))) if keep is None else list(np.flatnonzero(keep))
  out = {}
  for i, tokens in enumerate(encoded.tokens):
    with torch.no_grad():
      res = hf(input_ids=torch.tensor([tokens]), output_hidden_states=True, use_cache=False)
      hidden = [h[0, -1] for h in res.hidden_states]
      layers = {0: hidden[0]}
      for position, block in enumerate(kept[:-1]):
        layers[block + 1] = hidden[position + 1]
      for layer, h in layers.items():
        layers[layer] = hf.lm_head(hf.model.norm(h)).numpy().astype(np.float64)
      layers[kept[-1] + 1] = res.logits[0, -1].numpy().astype(np.float64)  # already normed
    letters = encoded.letter_ids[i]
    for layer, logits in layers.items():
      p = np.exp(logits - logits.max())
      p /= p.sum()
      probs = np.where(letters >= 0, p[np.maximum(letters, 0)], 0.0)
      out.setdefault(layer, np.zeros(encoded.letter_ids.shape))[i] = probs
  return out


@pytest.mark.parametrize("kept", [None, (0, 2, 3), (1,)])
def test_readout_matches_hf_hidden_states_through_hf_norm_and_lm_head(setup, kept):
  model, encoded, model_dir = setup
  keep = None if kept is None else dpjax.keep_mask(kept, model.num_layers)
  masks = None if keep is None else keep[None]
  out = DecisionReader(model).run(encoded, masks, batch_size=8, progress=False)
  p = np.asarray(metrics.option_probabilities(out.option_logits[0], out.log_normalizer[0]))
  want = _hf_lens(model_dir, encoded, keep)
  present = sorted(want)
  assert present == [0] + [b + 1 for b in (kept or range(model.num_layers))]
  for layer in range(model.num_layers + 1):
    if layer in want:
      assert np.abs(p[layer] - want[layer]).max() <= ATOL, layer
    else:
      assert np.isnan(out.option_logits[0, layer]).all()
  # Options beyond an item's own count are never probabilities.
  assert np.isneginf(out.option_logits[0, 0, 3, 2:]).all()


def test_final_accuracy_equals_lm_eval_loglikelihood_scoring(setup):
  model, encoded, model_dir = setup
  out = DecisionReader(model).run(encoded, batch_size=8, progress=False)
  top = np.asarray(metrics.top_option(out.option_logits[0]))[-1]
  # lm-eval: log-likelihood of each " A".." D" continuation after the prompt.
  hf = reference.load_hf(model_dir)
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  chosen = []
  for item, prompt in zip(encoded.items, encoded.prompts):
    scores = []
    for k in range(item.num_options):
      context = tokenizer(prompt, add_special_tokens=False)["input_ids"]
      whole = tokenizer(prompt + " " + tasks.LETTERS[k], add_special_tokens=False)["input_ids"]
      continuation = whole[len(context):]
      with torch.no_grad():
        logits = hf(input_ids=torch.tensor([whole]), use_cache=False).logits[0]
      logprobs = torch.log_softmax(logits.double(), -1)
      scores.append(sum(float(logprobs[len(context) - 1 + j, t]) for j, t in enumerate(continuation)))
    chosen.append(int(np.argmax(scores)))
  assert top.tolist() == chosen
  accuracy = float(metrics.layer_accuracy(top, encoded.answer))
  assert accuracy == pytest.approx(np.mean(np.array(chosen) == encoded.answer), abs=1e-6)


def test_batch_of_masks_equals_single_mask_runs(setup):
  model, encoded, _ = setup
  reader = DecisionReader(model)
  masks = np.array([[1, 1, 1, 1], [1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 0, 0]], bool)
  together = reader.run(encoded, masks, batch_size=8, progress=False)
  assert together.option_logits.shape == (4, 5, 24, 4)
  assert together.log_normalizer.shape == (4, 5, 24)
  for m, mask in enumerate(masks):
    alone = reader.run(encoded, mask[None], batch_size=8, progress=False)
    np.testing.assert_allclose(together.option_logits[m], alone.option_logits[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(together.log_normalizer[m], alone.log_normalizer[0], atol=1e-5, rtol=0)
    assert (np.isnan(together.option_logits[m, 1:, 0, 0]) == ~mask).all()


@pytest.mark.parametrize("fmt", ["letter", "cloze"])
def test_readout_never_builds_full_vocab_logits_over_tokens(setup, fmt):
  """No intermediate of shape [B, T, V] (nor [L, B, T, d]) anywhere in the program; the
  cloze lens reads the continuation positions only ([B * R, V], R reads per row)."""
  model, encoded, _ = setup
  if fmt == "cloze":
    requests = [tasks.cloze_requests(item) for item in encoded.items]
    encoded = tasks.encode_cloze(transformers.AutoTokenizer.from_pretrained(setup[2]),
                                 encoded.items, requests)
  batch = tasks.batches(encoded, 8)[0]
  b, t = batch.input_ids.shape
  v, d, n = model.config.vocab_size, model.config.hidden_size, model.num_layers
  module = model.module()
  lens = Lens(fmt)
  jaxpr = jax.make_jaxpr(lambda ids, mask, reads, packed, idx, valid: decision_readout(
      module, lens, ids, mask, reads, packed, None, idx, valid))(
          batch.input_ids, batch.attention_mask, Reads.of(batch), packing(batch),
          np.arange(n, dtype=np.int32), np.ones(n, bool))
  shapes = set()

  def walk(jp):
    for eqn in jp.eqns:
      for var in eqn.outvars:
        shapes.add(tuple(getattr(var.aval, "shape", ())))
      for param in eqn.params.values():
        for sub in (param if isinstance(param, (list, tuple)) else [param]):
          if hasattr(sub, "jaxpr"):
            walk(sub.jaxpr if hasattr(sub.jaxpr, "eqns") else sub.jaxpr.jaxpr)
          elif hasattr(sub, "eqns"):
            walk(sub)

  walk(jaxpr.jaxpr)
  read = b if fmt == "letter" else b * batch.read_index.shape[1]
  assert read < b * t and (read, v) in shapes  # the lens does run, at the read positions
  assert not any(len(s) >= 3 and s[-1] == v for s in shapes)
  assert not any(len(s) == 4 and s[0] >= n and s[-1] == d for s in shapes)


def test_readout_is_float32_for_a_bfloat16_model(setup):
  _, encoded, model_dir = setup
  model16 = dpjax.load_model(model_dir, dtype="bfloat16")
  out16 = DecisionReader(model16).run(encoded, batch_size=8, progress=False)
  assert out16.option_logits.dtype == np.float32
  out32 = DecisionReader(dpjax.load_model(model_dir)).run(encoded, batch_size=8, progress=False)
  # bfloat16 weights and activations move the numbers, but not far.
  assert np.nanmax(np.abs(out16.log_normalizer - out32.log_normalizer)) < 0.1
