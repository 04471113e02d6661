"""Metrics against hand-computed numbers on small fixed arrays."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dpjax.study import metrics

NEG = -np.inf


def _logits_from_probs(p, lse=0.0):
  """Option logits whose vocab-normalized probabilities are `p` (lse fixed)."""
  p = np.asarray(p, dtype=np.float64)
  with np.errstate(divide="ignore"):
    z = np.where(p > 0, np.log(p), NEG) + lse
  return z.astype(np.float32)


# One layer, two items: item 0 has three options (the fourth is padding).
P = [[0.5, 0.2, 0.1, 0.0], [0.1, 0.4, 0.4, 0.05]]
Z = _logits_from_probs(P)
Z[0, 3] = NEG
LSE = np.zeros(2, np.float32)


def test_decision_margin_vocab_and_options_normalizations():
  answer = np.array([0, 1])
  vocab = metrics.decision_margin(metrics.option_probabilities(Z, LSE, "vocab"), answer)
  np.testing.assert_allclose(vocab, [0.5 - 0.2, 0.4 - 0.4], atol=1e-6)
  options = metrics.decision_margin(metrics.option_probabilities(Z, LSE, "options"), answer)
  np.testing.assert_allclose(options, [(0.5 - 0.2) / 0.8, 0.0], atol=1e-6)
  # A wrong answer gives a negative margin; the padded fourth option never counts.
  wrong = metrics.decision_margin(metrics.option_probabilities(Z, LSE, "vocab"), np.array([2, 3]))
  np.testing.assert_allclose(wrong, [0.1 - 0.5, 0.05 - 0.4], atol=1e-6)


def test_vocab_probabilities_use_the_log_normalizer():
  p = metrics.option_probabilities(Z, np.full(2, np.log(2.0), np.float32), "vocab")
  np.testing.assert_allclose(p, np.asarray(P) / 2, atol=1e-6)


def test_top_option_ties_go_to_the_lower_index_and_accuracy():
  top = metrics.top_option(Z)
  assert top.tolist() == [0, 1]  # item 1: options B and C tie at 0.4
  assert float(metrics.layer_accuracy(top, np.array([0, 1]))) == 1.0
  assert float(metrics.layer_accuracy(top, np.array([0, 2]))) == 0.5


def test_option_frequency_counts_over_own_options():
  z = np.array([[[1, 0, NEG], [0, 2, 1], [0, 0, 3], [5, 1, 0]]], np.float32)  # [L1=1, N=4, K=3]
  top = metrics.top_option(z)
  assert top.tolist() == [[0, 1, 2, 0]]
  np.testing.assert_allclose(metrics.option_frequency(top, 3), [[0.5, 0.25, 0.25]])
  np.testing.assert_allclose(metrics.chance_accuracy(np.array([2, 3, 3, 3])), (1 / 2 + 1) / 4)


RISE_FALL_RISE = np.array([-0.1, -0.05, 0.1, 0.2, -0.02, 0.05, 0.3, 0.4], np.float32)


@pytest.mark.parametrize("tau,want", [(0.0, 5), (0.15, 6), (0.35, 7), (0.5, -1), (-0.2, 1)])
def test_transition_block_after_a_rise_a_fall_and_a_rise(tau, want):
  assert int(metrics.transition_block(RISE_FALL_RISE, tau)) == want


def test_sharpness_is_the_largest_one_block_rise():
  s = metrics.sharpness(RISE_FALL_RISE)
  np.testing.assert_allclose(float(s.rise), 0.3 - 0.05, atol=1e-6)
  assert int(s.block) == 6


def test_removed_layers_are_skipped():
  m = np.array([-0.1, np.nan, 0.1, np.nan, 0.2], np.float32)
  assert int(metrics.transition_block(m, 0.0)) == 2
  s = metrics.sharpness(m)
  np.testing.assert_allclose(float(s.rise), 0.2, atol=1e-6)  # block 2 measured from h_0
  assert int(s.block) == 2
  # The last present block failing means no transition, whatever came before.
  assert int(metrics.transition_block(np.array([0.5, 0.5, -0.1, np.nan], np.float32))) == -1


def test_accuracy_rule():
  acc = np.array([0.25, 0.3, 0.5, 0.34, 0.6, 0.9], np.float32)
  assert int(metrics.accuracy_transition_block(acc, 0.25, 0.1)) == 4
  assert int(metrics.accuracy_transition_block(acc, 0.25, 0.05)) == 2


def test_phases():
  silent, decisive = metrics.phases(3, 5)
  assert silent.tolist() == [True, True, False, False, False]
  assert decisive.tolist() == [False, False, True, True, True]
  silent, decisive = metrics.phases(metrics.NO_TRANSITION, 3)
  assert silent.tolist() == [True] * 3 and decisive.tolist() == [False] * 3


def test_summary_matches_numpy():
  values = np.random.default_rng(0).normal(size=(3, 17)).astype(np.float32)
  s = metrics.summary(values)
  np.testing.assert_allclose(s.mean, values.mean(-1), rtol=1e-6)
  np.testing.assert_allclose(s.median, np.median(values, -1), rtol=1e-6)
  np.testing.assert_allclose(s.q10, np.quantile(values, 0.1, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(s.q90, np.quantile(values, 0.9, axis=-1), rtol=1e-5)


def test_profile_is_jittable_and_batched_over_masks():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(2, 4, 6, 4)).astype(np.float32)  # [M, L1, N, K]
  z[1, 2] = np.nan  # mask 1 removed block 2
  lse = (np.log(np.exp(z).sum(-1)) + 1.0).astype(np.float32)
  answer = rng.integers(0, 4, size=6)
  fn = jax.jit(lambda z, lse: metrics.profile(z, lse, answer, np.full(6, 4)))
  prof = fn(z, lse)
  assert prof.accuracy.shape == (2, 4) and np.isnan(prof.accuracy[1, 2])
  assert prof.option_frequency.shape == (2, 4, 4)
  for m in range(2):
    one = metrics.profile(z[m], lse[m], answer, np.full(6, 4))
    np.testing.assert_allclose(prof.margin["vocab"][m], one.margin["vocab"], rtol=1e-6)
    assert int(prof.transition[m]) == int(one.transition)
  # vocab margins from independent numpy
  p = np.exp(z[0] - lse[0][..., None])
  want = p[..., np.arange(6), answer] - np.where(np.arange(4) == answer[:, None], -np.inf, p).max(-1)
  np.testing.assert_allclose(prof.margin["vocab"][0], want, atol=1e-6)


def test_answered_profile_on_the_items_the_model_answers():
  """Open answers: the mean DM of the chosen items and each one's decision layer, against
  a plain loop; layer 0 (the embeddings) never counts as decided."""
  rng = np.random.default_rng(3)
  top = (rng.random((7, 12)) < 0.3).astype(np.int32)  # 0: the top token is a gold one
  top[4:, :5] = 0   # five items decided from layer 4 on ...
  top[3, :5] = 1
  top[:, 5] = 0     # ... one from the embeddings on (decided at layer 1) ...
  top[-1, 6:] = 1   # ... and the rest not answered at the last layer
  margin = rng.normal(size=(7, 12)).astype(np.float32)
  margin[4:, :6] += 3.0
  chosen = top[-1] == 0
  got = metrics.answered_profile(top, margin, chosen)
  assert got["items"] == 6
  np.testing.assert_allclose(got["mean_margin"], margin[:, :6].mean(1), rtol=1e-6)
  mean = margin[:, :6].mean(1)
  want = next(l for l in range(1, 7) if (mean[l:] > 0).all())
  assert got["transition_block"] == want == int(metrics.transition_block(mean))
  layers = [next(l for l in range(1, 7) if (top[l:, i] == 0).all()) for i in range(6)]
  assert got["decision_layers"] == layers == [4, 4, 4, 4, 4, 1]
  assert got["median_decision_layer"] == 4.0
  assert metrics.answered_profile(top, margin, np.zeros(12, bool))["transition_block"] is None
