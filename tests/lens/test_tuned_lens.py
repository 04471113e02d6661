"""The tuned lens: translators in the scan against numpy from HF hidden states, zero
translators against the logit lens, training against the logit lens's KL, and the
fingerprint that keeps a lens with its model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

import dpjax
from tests.support import reference
from dpjax import tasks
from dpjax.lens import tuned as tuned_lens
from dpjax.bundled import BUNDLED_MODEL
from dpjax.lens.readout import DecisionReader
from dpjax.engine.sweep import Sweep
from dpjax.tasks import synthetic
from dpjax.lens.training import LensSettings, train


@pytest.fixture(scope="module")
def letter_items(synthetic_model_dir):
  tokenizer = transformers.AutoTokenizer.from_pretrained(synthetic_model_dir)
  items = synthetic.generate("test", 12)
  return tasks.encode(tokenizer, items, [tasks.prompt(item) for item in items])


def _random_translators(num_layers, d, seed=0):
  rng = np.random.default_rng(seed)
  weight = (0.1 * rng.standard_normal((num_layers + 1, d, d))).astype(np.float32)
  bias = (0.1 * rng.standard_normal((num_layers + 1, d))).astype(np.float32)
  weight[-1] = 0.0  # the last layer reads the model's own logits
  bias[-1] = 0.0
  return tuned_lens.Translators(weight, bias)


def test_translators_in_the_scan_equal_numpy_from_hf_hidden_states(synthetic_model_dir,
                                                                   letter_items):
  model = dpjax.load_model(synthetic_model_dir)
  translators = _random_translators(model.num_layers, model.config.hidden_size)
  keep = dpjax.keep_mask([0, 2, 3], model.num_layers)
  out = DecisionReader(model, translators=translators).run(letter_items, keep[None],
                                                           batch_size=4, progress=False)
  hf = reference.delete_blocks(reference.load_hf(synthetic_model_dir), keep)
  layers = [0, 1, 3, 4]  # h_0 and the layers after blocks 1, 3, 4 (1-based)
  for i, ids in enumerate(letter_items.tokens):
    with torch.no_grad():
      res = hf(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    states = [h[0, -1].numpy().astype(np.float64) for h in res.hidden_states[:-1]]
    for position, layer in enumerate(layers[:-1]):
      h = states[position]
      x = h + h @ translators.weight[layer] + translators.bias[layer]
      with torch.no_grad():
        logits = hf.lm_head(hf.model.norm(torch.tensor(x, dtype=torch.float32))).numpy()
      letters = letter_items.letter_ids[i]
      np.testing.assert_allclose(out.option_logits[0, layer, i], logits[letters], atol=1e-4)
    # The last kept layer: its translator is zero, so the model's own logits.
    np.testing.assert_allclose(out.option_logits[0, 4, i],
                               res.logits[0, -1].numpy()[letter_items.letter_ids[i]], atol=1e-4)
  assert np.isnan(out.option_logits[0, 2]).all()  # block 2 removed


def test_a_pruned_variant_is_read_through_its_own_head_under_a_tuned_lens(synthetic_model_dir,
                                                                           letter_items):
  """With the last block removed, the variant's last layer is its output: the model's head
  alone (HF with the block deleted), not the unpruned model's translator for that layer;
  the layers before it are still translated. The same for final-only readouts and for
  the sweep's candidates (Iterative Pruning reads no translator)."""
  model = dpjax.load_model(synthetic_model_dir)
  translators = _random_translators(model.num_layers, model.config.hidden_size, seed=1)
  keep = dpjax.keep_mask([0, 1, 2], model.num_layers)  # block 4 (the last) removed
  tuned = DecisionReader(model, translators=translators).run(letter_items, keep[None],
                                                             batch_size=4, progress=False)
  logit = DecisionReader(model).run(letter_items, keep[None], batch_size=4, progress=False)
  hf = reference.delete_blocks(reference.load_hf(synthetic_model_dir), keep)
  for i, ids in enumerate(letter_items.tokens):
    with torch.no_grad():
      own = hf(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].numpy()
    np.testing.assert_allclose(tuned.option_logits[0, 3, i], own[letter_items.letter_ids[i]],
                               atol=1e-4)
  np.testing.assert_allclose(tuned.option_logits[0, 3], logit.option_logits[0, 3], atol=1e-5)
  assert np.abs(tuned.option_logits[0, 2] - logit.option_logits[0, 2]).max() > 1e-2
  final = DecisionReader(model, translators=translators).run(
      letter_items, keep[None], batch_size=4, progress=False, final_only=True)
  np.testing.assert_allclose(final.option_logits[0, 3], logit.option_logits[0, 3], atol=1e-5)
  stats = [Sweep(model, letter_items, batch_size=4, progress=False, translators=t)
           .drop_one(list(range(model.num_layers)), [3])[3] for t in (translators, None)]
  assert stats[0].correct == stats[1].correct
  np.testing.assert_allclose(stats[0].margin_sum, stats[1].margin_sum, atol=1e-5)


def test_zero_translators_are_the_logit_lens_exactly(synthetic_model_dir, letter_items):
  model = dpjax.load_model(synthetic_model_dir)
  zero = tuned_lens.zero_translators(model.num_layers, model.config.hidden_size)
  masks = np.array([[1, 1, 1, 1], [1, 0, 1, 0]], bool)
  tuned = DecisionReader(model, translators=zero).run(letter_items, masks, batch_size=4,
                                                      progress=False)
  logit = DecisionReader(model).run(letter_items, masks, batch_size=4, progress=False)
  np.testing.assert_array_equal(tuned.option_logits, logit.option_logits)
  np.testing.assert_array_equal(tuned.log_normalizer, logit.log_normalizer)


@pytest.fixture(scope="module")
def trained_lens(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("lens") / "bundled")
  record = train(LensSettings(model=BUNDLED_MODEL, output_dir=out, steps=80, eval_every=40,
                              heldout_positions=2048, progress=False))
  return out, record


def test_training_lowers_the_heldout_kl_at_every_layer(trained_lens):
  out, record = trained_lens
  logit = np.array(record["heldout_kl"]["logit"])
  tuned = np.array(record["heldout_kl"]["tuned"])
  assert len(logit) == 16 and (tuned < logit).all(), (logit, tuned)
  with open(os.path.join(out, tuned_lens.LENS_FILE)) as f:
    saved = json.load(f)
  assert saved["model"] == "bundled_model" and len(saved["fingerprint"]) == 64
  translators, _ = tuned_lens.load(out, dpjax.load_model(BUNDLED_MODEL))
  assert translators.weight.shape == (17, 64, 64) and not translators.weight[-1].any()
  assert np.abs(translators.weight[:-1]).max() > 0


def test_a_lens_is_refused_on_another_model(trained_lens, synthetic_model_dir):
  out, _ = trained_lens
  with pytest.raises(tuned_lens.TunedLensError, match="trained on 'bundled_model'"):
    tuned_lens.load(out, dpjax.load_model(synthetic_model_dir))
  with pytest.raises(ValueError, match="lens='tuned'"):
    tuned_lens.lens_spec("tuned")


def test_the_study_reads_through_the_tuned_lens_and_shows_both(trained_lens, tmp_path):
  out, _ = trained_lens
  result = subprocess.run(
      [sys.executable, "-m", "dpjax.cli.study", f"--lens=tuned:{out}", "--num_items=32",
       "--methods=", "--noprogress", f"--output_dir={tmp_path / 'study'}"],
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / "study" / "results.json") as f:
    results = json.load(f)
  assert results["lens"]["kind"] == "tuned" and results["lens"]["trained_on"] == "bundled_model"
  logit = results["full_model_logit_lens"]
  tuned = results["full_model"]
  # The last layer is the model's own output under both lenses.
  assert tuned["accuracy"][-1] == pytest.approx(logit["accuracy"][-1])
  assert tuned["accuracy"][1:-1] != logit["accuracy"][1:-1]
  assert os.path.getsize(tmp_path / "study" / "decision_margin_lenses.png") > 1000
  summary = (tmp_path / "study" / "summary.md").read_text()
  assert "read through the tuned lens" in summary and "The logit lens on the same items" in summary


def test_task_corpus_takes_a_split():
  """`task:SPEC@SPLIT` reads another split than the task's default: a lens can learn from
  items that the study does not evaluate."""
  from dpjax import tasks
  from dpjax.tasks import synthetic
  from dpjax.lens.training import corpus_texts
  default = corpus_texts("task:synthetic", limit=50)
  dev = corpus_texts("task:synthetic@dev", limit=50)
  assert len(default) == len(dev) == 50
  assert default != dev
  item = synthetic.generate("dev", 1)[0]
  context, continuation = tasks.cloze_requests(item)[item.answer]
  assert dev[0] == context + continuation


@pytest.mark.parametrize("final_only", [True, False])
def test_resumed_readouts_through_translators_equal_fresh_ones(synthetic_model_dir,
                                                               letter_items, final_only):
  """Every mask's readouts resumed from the unpruned stream equal fresh ones through a
  tuned lens too: the layers before a mask's first removed block through their
  translators, its last kept layer through the model's head even where that layer is
  read from the shared trunk."""
  model = dpjax.load_model(synthetic_model_dir)
  translators = _random_translators(model.num_layers, model.config.hidden_size, seed=2)
  masks = np.array([[(m >> b) & 1 for b in range(model.num_layers)]
                    for m in range(1, 2 ** model.num_layers)], bool)
  got, want = (Sweep(model, letter_items, batch_size=4, translators=translators)
               .readouts(masks, final_only=final_only, resume=resume) for resume in (True, False))
  np.testing.assert_array_equal(np.isnan(got.log_normalizer), np.isnan(want.log_normalizer))
  np.testing.assert_allclose(got.option_logits, want.option_logits, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got.log_normalizer, want.log_normalizer, atol=1e-5, rtol=1e-5)
