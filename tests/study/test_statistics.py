"""Paired statistics, pinned against scipy and hand values, on data where the paired and the
unpaired answers differ."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from dpjax.study import statistics
from dpjax.study.results import bootstrap_ci


def _correlated(n=300, seed=0):
  """Two variants right on the same 60% of items, except that the second gets 12 of them
  wrong: a clear paired difference (0.04) between two per-arm intervals that overlap."""
  rng = np.random.default_rng(seed)
  a = (rng.random(n) < 0.6).astype(int)
  b = a.copy()
  b[np.flatnonzero(a)[:12]] = 0
  return a, b


def test_the_paired_interval_sees_a_difference_the_per_arm_intervals_hide():
  a, b = _correlated()
  diff, (low, high) = statistics.paired_bootstrap(a, b)
  assert diff == pytest.approx(12 / 300)
  assert 0 < low <= diff <= high  # the paired interval leaves 0 out
  # Unpaired, each arm's own interval overlaps the other's.
  a_low, a_high = bootstrap_ci(a)
  b_low, b_high = bootstrap_ci(b)
  assert a_low < b_high and b_low < a_high
  # The bootstrap interval of a mean of 0/1 differences is close to the normal one.
  d = a - b
  half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
  assert low == pytest.approx(diff - half, abs=0.01) and high == pytest.approx(diff + half,
                                                                               abs=0.01)


def test_mcnemar_is_scipys_exact_binomial_test_of_the_discordant_pairs():
  a, b = _correlated()
  only_a, only_b, p = statistics.mcnemar_exact(a, b)
  assert (only_a, only_b) == (12, 0)
  assert p == pytest.approx(scipy_stats.binomtest(0, 12, 0.5).pvalue, rel=1e-12)
  assert p == pytest.approx(2 * 0.5 ** 12)
  rng = np.random.default_rng(3)
  for _ in range(20):
    x, y = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
    n10, n01, p = statistics.mcnemar_exact(x, y)
    want = 1.0 if n10 + n01 == 0 else scipy_stats.binomtest(n10, n10 + n01, 0.5).pvalue
    assert p == pytest.approx(want, rel=1e-9)
  assert statistics.mcnemar_exact(a, a)[2] == 1.0
  with pytest.raises(ValueError, match="binary"):
    statistics.mcnemar_exact(np.array([0.5, 1]), np.array([0, 1]))


def test_holm_by_hand():
  # Sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 -> 0.06 (monotone).
  assert statistics.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
  assert statistics.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
  assert statistics.holm([0.2]) == [0.2]


def test_the_two_stage_interval_holds_the_seed_to_seed_spread():
  """Seeds that differ a lot: the item-only interval of the seed-averaged outcomes is narrow
  and misses what a new set of seeds would give; the two-stage interval is wide. With
  identical seeds the two agree."""
  rng = np.random.default_rng(1)
  n, seeds = 300, 10
  rates = np.linspace(0.3, 0.9, seeds)  # each seed's Silent arm: its own accuracy
  silent = (rng.random((seeds, n)) < rates[:, None]).astype(float)
  decisive = np.tile((rng.random(n) < 0.6).astype(float), (seeds, 1))
  diff, (low, high) = statistics.two_stage_bootstrap(silent, decisive)
  assert diff == pytest.approx(silent.mean() - decisive.mean())
  item_only = statistics.paired_bootstrap(silent.mean(0), decisive.mean(0))[1]
  assert (high - low) > 2 * (item_only[1] - item_only[0])
  # The seed spread alone: the standard error of the mean of ten rates 0.3..0.9.
  seed_se = rates.std(ddof=1) / np.sqrt(seeds)
  assert (high - low) == pytest.approx(2 * 1.96 * seed_se, rel=0.35)
  same = np.tile(silent[4], (seeds, 1))
  two = statistics.two_stage_bootstrap(same, decisive)[1]
  one = statistics.paired_bootstrap(same[0], decisive[0])[1]
  assert two == pytest.approx(one, abs=0.02)


def test_a_comparison_and_the_verdict_it_gives():
  a, b = _correlated()
  n = len(a)
  threshold = 0.25 + 0.5 * (a.mean() - 0.25)
  # The Silent arm (b) 12 items below a Decisive arm that equals the unpruned model (a).
  c = statistics.compare_arms("adjacent", 2, b, a, unpruned=a, threshold=threshold,
                              variants=("b", "a"))
  assert c.difference == pytest.approx(-0.04) and c.ci95[1] < 0 and c.seeds == 1
  assert c.p == pytest.approx(2 * 0.5 ** 12) and "McNemar" in c.test
  assert c.decisive_drop.drop == 0 and 0 < c.decisive_drop.drop_ci95[1] < 0.05
  assert c.decisive_drop.non_inferior and not c.silent_drop.collapsed
  same = statistics.compare_arms("adjacent_keep_last", 2, b, a, unpruned=a,
                                 threshold=threshold, variants=("b", "a"))
  other = statistics.compare_arms("redundant", 2, a, a, unpruned=a, threshold=threshold,
                                  variants=("a", "a"))
  statistics.with_holm([c, same, other])
  assert same.same_as == "adjacent k=2" and same.holm_p == c.holm_p
  assert c.holm_p == pytest.approx(2 * c.p) and other.holm_p == 1.0  # two distinct, not three
  assert c.verdict == "holds" and other.verdict == "equivalent"
  assert statistics.verdict([c, same, other])[0] == "holds"
  assert statistics.verdict([other]) == ("equivalent", "the arms equivalent within +-0.05 at "
                                         "every comparison")
  # The Decisive arm significantly lower: reversed.
  flipped = statistics.compare_arms("adjacent", 1, a, b, unpruned=a, threshold=threshold)
  statistics.with_holm([flipped])
  assert flipped.verdict == "reversed"
  assert statistics.verdict([c, flipped])[0] == "cannot tell"  # both ways
  # Silent lower, but the Decisive arm itself far below the unpruned model: not "little".
  costly = statistics.compare_arms("adjacent", 3, b, a, unpruned=np.ones(n, int),
                                   threshold=threshold)
  statistics.with_holm([costly])
  assert not costly.decisive_drop.non_inferior and costly.verdict == "cannot tell"
  assert "costs more than little" in costly.reason
  # Twenty items, one discordant: nothing shown; the reason says what could have been.
  x = a[-20:].copy()
  y = x.copy()
  y[np.flatnonzero(x)[0]] = 0
  small = statistics.compare_arms("adjacent", 1, y, x)
  statistics.with_holm([small])
  assert small.verdict == "cannot tell" and small.detectable > 0.05
  assert f"{small.detectable:.3f}" in small.reason
  # A random rule over three seeds that agree: the sign-flip test's smallest p, 2 / 2^3.
  seeds = statistics.compare_arms("random", 1, np.tile(b, (3, 1)), np.tile(a, (3, 1)))
  assert seeds.seeds == 3 and "sign-flip" in seeds.test and seeds.p == pytest.approx(0.25)



def test_the_transition_interval_over_items():
  """A margin that turns positive at layer 3 for most items: the interval covers 3; items
  drawn so that some resamples lose the transition report that share."""
  rng = np.random.default_rng(0)
  layers, n = 6, 200
  margin = np.where(np.arange(layers)[:, None] >= 3, 0.3, -0.3) + rng.normal(0, 0.5, (layers, n))
  rule = lambda mean: next((l for l in range(1, layers) if (mean[l:] > 0).all()), None)
  block, (low, high), none = statistics.bootstrap_block(margin, rule)
  assert block == 3 and low <= 3 <= high and none == 0.0
  weak = np.where(np.arange(layers)[:, None] >= 3, 0.02, -0.3) + rng.normal(0, 0.5, (layers, n))
  block, (low, high), none = statistics.bootstrap_block(weak, rule)
  assert 0 < none < 1 and (high is None or high >= 3)
