"""The statistics that test the claim (sign-flip test over seeds, Tango's score interval, the
exact drop bound, TOST, the detectable difference, random-effects pooling, the fixed
sequence), pinned against scipy, independent inversions, published examples and hand
values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import optimize as scipy_optimize
from scipy import stats as scipy_stats

from dpjax.study import statistics


def _vectors(n11, n10, n01, n00):
  """Paired binary outcome vectors with the given 2x2 counts (first right, second right)."""
  a = np.array([1] * n11 + [1] * n10 + [0] * n01 + [0] * n00)
  b = np.array([1] * n11 + [0] * n10 + [1] * n01 + [0] * n00)
  return a, b


# --- sign-flip test over seeds ---------------------------------------------------------


def _scipy_sign_flip(d):
  return scipy_stats.permutation_test(
      (d,), lambda x, axis: np.abs(np.mean(x, axis=axis)), permutation_type="samples",
      n_resamples=np.inf, alternative="greater").pvalue


def _brute_force_sign_flip(counts):
  """Exact p over every sign assignment of integer per-seed differences (item counts)."""
  counts = np.asarray(counts, np.int64)
  observed = abs(int(counts.sum()))
  hits = sum(abs(int(np.dot(s, counts))) >= observed
             for s in itertools.product((-1, 1), repeat=len(counts)))
  return hits / 2 ** len(counts)


def test_sign_flip_is_scipys_exact_permutation_test():
  rng = np.random.default_rng(5)
  for seeds, items, shift in [(3, 40, 0.0), (7, 50, 0.1), (10, 30, 0.05), (12, 25, 0.0),
                              (9, 200, 0.2)]:
    a = (rng.random((seeds, items)) < 0.6 + shift).astype(float)
    b = (rng.random((seeds, items)) < 0.6).astype(float)
    d = a.mean(1) - b.mean(1)
    p = statistics.sign_flip_test(a, b)
    assert p == pytest.approx(_scipy_sign_flip(d), rel=1e-12)
    assert p == pytest.approx(_brute_force_sign_flip(a.sum(1) - b.sum(1)), rel=1e-12)


def test_sign_flip_on_a_consistent_difference_is_the_smallest_exact_p():
  """Every seed's Silent arm below the Decisive arm: only the identity and its mirror reach
  the observed mean, p = 2 / 2^S."""
  decisive = np.ones((10, 20))
  silent = decisive.copy()
  for s in range(10):
    silent[s, : 1 + s % 3] = 0  # different sizes, same sign
  assert statistics.sign_flip_test(silent, decisive) == pytest.approx(2 / 2 ** 10)


def _audit_case():
  """Ten seeds of a random rule on 400 items: seeds 0-4 draw a Silent arm right on 274
  (0.685), seeds 5-9 another right on 299 (0.7475), their wrong items disjoint; the
  Decisive arm is deterministic (0.7175, right on items 0-286)."""
  items = 400
  first = np.zeros(items, int)
  first[126:] = 1                   # wrong on items 0-125
  second = np.zeros(items, int)
  second[:299] = 1                  # wrong on items 299-399
  decisive = np.zeros(items, int)
  decisive[:287] = 1
  silent = np.array([first] * 5 + [second] * 5)
  return silent, np.tile(decisive, (10, 1))


def test_the_audit_case_mcnemar_on_majority_is_tiny_but_the_seed_test_is_not():
  silent, decisive = _audit_case()
  assert silent[:5].mean(1) == pytest.approx([0.685] * 5)
  assert silent[5:].mean(1) == pytest.approx([0.7475] * 5)
  assert decisive.mean() == pytest.approx(0.7175)
  # The majority over seeds is right only where both variants are (a tie is not a
  # majority): 173 items, 0.4325, far below either variant.
  assert statistics.majority(silent).sum() == 173
  only_silent, only_decisive, p_mcnemar = statistics.mcnemar_exact(
      statistics.majority(silent), statistics.majority(decisive))
  assert (only_silent, only_decisive) == (12, 126)
  assert p_mcnemar < 1e-10
  # The seeds tell another story: five at -13 items, five at +12.
  counts = silent.sum(1) - decisive.sum(1)
  assert counts.tolist() == [-13] * 5 + [12] * 5
  p = statistics.sign_flip_test(silent, decisive)
  assert p == _brute_force_sign_flip(counts)
  assert p == 774 / 1024
  assert p > 0.05
  assert p == pytest.approx(_scipy_sign_flip(silent.mean(1) - decisive.mean(1)), rel=1e-12)


def _exact_sign_flip_by_convolution(counts):
  """The exact p of integer per-seed differences, by the distribution of the signed sum
  (for more seeds than enumeration allows)."""
  distribution = {0: 1}
  for c in counts:
    nxt = {}
    for total, ways in distribution.items():
      for signed in (c, -c):
        nxt[total + signed] = nxt.get(total + signed, 0) + ways
    distribution = nxt
  observed = abs(int(np.sum(counts)))
  return sum(w for t, w in distribution.items() if abs(t) >= observed) / 2 ** len(counts)


def test_sign_flip_above_twenty_seeds_is_a_seeded_monte_carlo():
  rng = np.random.default_rng(11)
  seeds, items = 24, 30
  a = (rng.random((seeds, items)) < 0.62).astype(float)
  b = (rng.random((seeds, items)) < 0.55).astype(float)
  exact = _exact_sign_flip_by_convolution((a.sum(1) - b.sum(1)).astype(int))
  p = statistics.sign_flip_test(a, b)
  draws = statistics.SIGN_FLIP_DRAWS
  assert abs(p - exact) < 5 * math.sqrt(exact * (1 - exact) / draws) + 1 / draws
  assert statistics.sign_flip_test(a, b) == p  # seeded
  assert statistics.sign_flip_test(a, b, seed=1) != p
  # Hits + 1 over draws + 1: never 0.
  ones = np.ones((seeds, items))
  worse = ones.copy()
  worse[:, 0] = 0
  assert 1 / (draws + 1) <= statistics.sign_flip_test(worse, ones) <= 4 / (draws + 1)


def test_sign_flip_without_any_difference_is_one_and_checks_shapes():
  a = np.random.default_rng(0).integers(0, 2, (6, 30)).astype(float)
  assert statistics.sign_flip_test(a, a) == 1.0
  with pytest.raises(ValueError, match=r"\(6, 30\) and \(30,\)"):
    statistics.sign_flip_test(a, a[0])


# --- normal quantile ------------------------------------------------------------------


def test_the_normal_quantile_is_scipys():
  ps = np.concatenate([np.logspace(-300, -1, 120), np.linspace(0.01, 0.99, 197),
                       1 - np.logspace(-15, -1, 40)])
  for p in ps:
    want = scipy_stats.norm.ppf(p)
    assert statistics._normal_quantile(float(p)) == pytest.approx(want, rel=1e-13, abs=1e-15)
  assert statistics._normal_quantile(0.975) == pytest.approx(1.959963984540054, rel=1e-15)
  for bad in (0.0, 1.0, -0.1):
    with pytest.raises(ValueError, match=str(bad)):
      statistics._normal_quantile(bad)


# --- Clopper-Pearson drop bound --------------------------------------------------------


def test_the_exact_drop_bound_is_scipys_clopper_pearson():
  assert statistics.exact_drop_upper(1, 60) == pytest.approx(0.0894, abs=5e-5)
  for n in (1, 7, 60, 400):
    for k in sorted({0, 1, 2, n // 3, n // 2, n - 1} - {n, n + 1}):
      want = scipy_stats.binomtest(k, n).proportion_ci(0.95, method="exact").high
      assert statistics.exact_drop_upper(k, n) == pytest.approx(want, rel=1e-9)
      want90 = scipy_stats.binomtest(k, n).proportion_ci(0.90, method="exact").high
      assert statistics.exact_drop_upper(k, n, confidence=0.90) == pytest.approx(want90,
                                                                                 rel=1e-9)
  # 0 of n: 1 - (alpha/2)^(1/n).
  assert statistics.exact_drop_upper(0, 60) == pytest.approx(1 - 0.025 ** (1 / 60), rel=1e-12)
  assert statistics.exact_drop_upper(5, 5) == 1.0
  with pytest.raises(ValueError, match="b10=61, n=60"):
    statistics.exact_drop_upper(61, 60)
  with pytest.raises(ValueError, match="b10=1.5"):
    statistics.exact_drop_upper(1.5, 60)


# --- Tango's score interval -------------------------------------------------------------


def _tango_by_brentq(n10, n01, n, confidence=0.95):
  """Tango's interval written out from the paper: the score statistic with the restricted
  MLE of p01 (the positive root of 2n p^2 + B p + C), inverted with scipy's brentq."""
  z = scipy_stats.norm.ppf(1 - (1 - confidence) / 2)

  def score(delta):
    big_b = -n10 - n01 + (2 * n - n10 + n01) * delta
    big_c = -n01 * delta * (1 - delta)
    p01 = (math.sqrt(big_b ** 2 - 8 * n * big_c) - big_b) / (4 * n)
    if n10 - n01 - n * delta == 0:
      return 0.0
    return (n10 - n01 - n * delta) / math.sqrt(n * (2 * p01 + delta * (1 - delta)))

  estimate = (n10 - n01) / n
  eps = 1e-13
  low = scipy_optimize.brentq(lambda t: score(t) - z, -1 + eps, estimate, xtol=1e-15,
                              rtol=1e-15)
  high = scipy_optimize.brentq(lambda t: score(t) + z, estimate, 1 - eps, xtol=1e-15,
                               rtol=1e-15)
  return low, high


@pytest.mark.parametrize("n10, n01, n", [(0, 0, 60), (1, 0, 60), (0, 1, 60), (3, 2, 60),
                                         (12, 2, 50), (40, 20, 160), (7, 0, 21),
                                         (0.4, 0.0, 400), (2.6, 1.3, 400), (30, 1, 31)])
def test_tango_matches_an_independent_inversion(n10, n01, n):
  got = statistics._tango_interval(n10, n01, n, 0.95)
  assert got == pytest.approx(_tango_by_brentq(n10, n01, n), abs=1e-9)
  got90 = statistics._tango_interval(n10, n01, n, 0.90)
  assert got90 == pytest.approx(_tango_by_brentq(n10, n01, n, 0.90), abs=1e-9)
  assert got[0] < got90[0] <= (n10 - n01) / n <= got90[1] < got[1]
  if float(n10).is_integer() and float(n01).is_integer():
    a, b = _vectors(0, int(n10), int(n01), n - int(n10) - int(n01))
    diff, interval = statistics.paired_interval(a, b)
    assert diff == pytest.approx((n10 - n01) / n)
    assert interval == got


def test_tango_reproduces_a_published_example():
  """Cavo et al. (2012), complete response before and after consolidation therapy,
  [[59, 6], [16, 80]]: Tango's 95% interval -0.1240 to -0.0054 around -0.0621 (Fagerland,
  Lydersen and Laake, Statistical Analysis of Contingency Tables, 2017, chapter 8; the
  same in their Statistics in Medicine 33:2850-2875, 2014)."""
  a, b = _vectors(59, 6, 16, 80)
  diff, (low, high) = statistics.paired_interval(a, b)
  assert round(diff, 4) == -0.0621
  assert (round(low, 4), round(high, 4)) == (-0.1240, -0.0054)


def test_tango_keeps_a_width_without_discordant_pairs():
  z = scipy_stats.norm.ppf(0.975)
  # 0 of 60: the score equation reduces to n delta / (1 - delta) = z^2.
  diff, (low, high) = statistics.paired_interval(*_vectors(40, 0, 0, 20))
  assert diff == 0.0
  assert high == pytest.approx(z ** 2 / (60 + z ** 2), rel=1e-12)
  assert high == pytest.approx(0.0602, abs=1e-4) and low == pytest.approx(-high, rel=1e-12)
  assert statistics.paired_bootstrap(*_vectors(40, 0, 0, 20))[1] == (0.0, 0.0)
  # 1 of 60.
  diff, (low, high) = statistics.paired_interval(*_vectors(40, 1, 0, 19))
  assert diff == pytest.approx(1 / 60)
  assert high == pytest.approx(0.0886, abs=1e-4) and low == pytest.approx(-0.0445, abs=1e-4)
  # All discordant one way: the interval reaches the boundary.
  assert statistics.paired_interval(*_vectors(0, 5, 0, 0))[1][1] == 1.0
  with pytest.raises(ValueError, match="binary"):
    statistics.paired_interval(np.array([0.5, 1]), np.array([0, 1]))


def test_tango_covers_the_true_difference():
  rng = np.random.default_rng(2024)
  n, p10, p01 = 60, 0.05, 0.01
  counts = rng.multinomial(n, [p10, p01, 1 - p10 - p01], size=2000)
  covered = 0
  for n10, n01, rest in counts:
    _, (low, high) = statistics.paired_interval(*_vectors(rest, n10, n01, 0))
    covered += low <= p10 - p01 <= high
  assert covered / len(counts) >= 0.93


# --- two-stage interval -----------------------------------------------------------------


def _old_two_stage_bootstrap(a, b, resamples=2000, seed=0):
  """The two-stage bootstrap as it was before it took a confidence."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  seeds, items = a.shape
  rng = np.random.default_rng([seed, 9595])
  s_idx = rng.integers(seeds, size=(resamples, seeds))
  i_idx = rng.integers(items, size=(resamples, items))
  d = a - b
  means = np.array([d[s][:, i].mean() for s, i in zip(s_idx, i_idx)])
  low, high = np.quantile(means, [0.025, 0.975])
  return float(d.mean()), (float(low), float(high))


def _random_rule(seed=3, seeds=8, items=120):
  rng = np.random.default_rng(seed)
  rates = np.linspace(0.4, 0.7, seeds)
  silent = (rng.random((seeds, items)) < rates[:, None]).astype(float)
  decisive = np.tile((rng.random(items) < 0.6).astype(float), (seeds, 1))
  return silent, decisive


def test_the_two_stage_bootstrap_default_is_unchanged():
  silent, decisive = _random_rule()
  assert statistics.two_stage_bootstrap(silent, decisive) == _old_two_stage_bootstrap(
      silent, decisive)
  assert statistics.two_stage_bootstrap(silent, decisive, resamples=300, seed=4) == (
      _old_two_stage_bootstrap(silent, decisive, resamples=300, seed=4))
  diff, (low90, high90) = statistics.two_stage_bootstrap(silent, decisive, confidence=0.9)
  _, (low, high) = statistics.two_stage_bootstrap(silent, decisive)
  assert low <= low90 <= diff <= high90 <= high
  with pytest.raises(ValueError, match="1.5"):
    statistics.two_stage_bootstrap(silent, decisive, confidence=1.5)


def test_the_two_stage_interval_is_the_union_with_tango_on_averaged_counts():
  silent, decisive = _random_rule()
  diff, (low, high) = statistics.two_stage_interval(silent, decisive)
  boot_diff, (b_low, b_high) = statistics.two_stage_bootstrap(silent, decisive)
  n10 = np.mean(((silent == 1) & (decisive == 0)).sum(1))
  n01 = np.mean(((silent == 0) & (decisive == 1)).sum(1))
  t_low, t_high = _tango_by_brentq(n10, n01, silent.shape[1])
  assert diff == boot_diff == pytest.approx((n10 - n01) / silent.shape[1])
  assert low == pytest.approx(min(b_low, t_low), abs=1e-9)
  assert high == pytest.approx(max(b_high, t_high), abs=1e-9)
  assert low <= min(b_low, t_low) + 1e-9 and high >= max(b_high, t_high) - 1e-9


def test_a_random_rule_never_discordant_keeps_a_width():
  rng = np.random.default_rng(8)
  arm = (rng.random((10, 60)) < 0.7).astype(float)  # seeds differ, arms agree per seed
  assert statistics.two_stage_bootstrap(arm, arm)[1] == (0.0, 0.0)
  diff, (low, high) = statistics.two_stage_interval(arm, arm)
  z = scipy_stats.norm.ppf(0.975)
  assert diff == 0.0
  assert high == pytest.approx(z ** 2 / (60 + z ** 2), rel=1e-12) and low == pytest.approx(
      -high, rel=1e-12)
  with pytest.raises(ValueError, match="binary"):
    statistics.two_stage_interval(arm * 0.5, arm)


# --- TOST and the detectable difference ------------------------------------------------


def test_equivalence_is_the_90_interval_inside_the_margin():
  assert statistics.equivalent((-0.02, 0.03), 0.05)
  assert not statistics.equivalent((-0.02, 0.05), 0.05)  # the bound on the margin fails
  assert not statistics.equivalent((-0.06, 0.01), 0.05)
  assert not statistics.equivalent((0.051, 0.08), 0.05)
  assert statistics.equivalent((0.0, 0.0), 0.01)
  with pytest.raises(ValueError, match="-0.05"):
    statistics.equivalent((-0.01, 0.01), -0.05)
  with pytest.raises(ValueError, match=r"\(0.02, 0.01\)"):
    statistics.equivalent((0.02, 0.01), 0.05)


def _connor_n(delta, psi, power=0.8, alpha=0.05):
  z_a, z_b = scipy_stats.norm.ppf(1 - alpha / 2), scipy_stats.norm.ppf(power)
  return (z_a * math.sqrt(psi) + z_b * math.sqrt(psi - delta ** 2)) ** 2 / delta ** 2


@pytest.mark.parametrize("psi, n, power, alpha", [(0.1, 400, 0.8, 0.05), (0.3, 60, 0.8, 0.05),
                                                  (0.05, 1000, 0.9, 0.01),
                                                  (0.2, 150, 0.5, 0.05)])
def test_the_detectable_difference_solves_connors_formula(psi, n, power, alpha):
  delta = statistics.minimum_detectable_difference(psi, n, power=power, alpha=alpha)
  assert 0 < delta <= math.sqrt(psi)
  assert _connor_n(delta, psi, power, alpha) == pytest.approx(n, rel=1e-9)
  # More pairs detect less; more power needs more.
  assert statistics.minimum_detectable_difference(psi, 2 * n, power, alpha) < delta
  if power < 0.95:
    assert statistics.minimum_detectable_difference(psi, n, power + 0.05, alpha) > delta


def test_the_detectable_difference_with_no_discordant_pair_is_finite():
  zero = statistics.minimum_detectable_difference(0.0, 60)
  assert zero == statistics.minimum_detectable_difference(1 / 60, 60)
  assert _connor_n(zero, 1 / 60) == pytest.approx(60, rel=1e-9)
  assert 0 < zero < 0.1
  assert statistics.minimum_detectable_difference(0.0, 3) == math.inf  # n < z^2
  with pytest.raises(ValueError, match="1.2"):
    statistics.minimum_detectable_difference(1.2, 60)
  with pytest.raises(ValueError, match="0.3"):
    statistics.minimum_detectable_difference(0.1, 60, power=0.3)


# --- random-effects meta-analysis -------------------------------------------------------


def test_the_chi_square_tail_is_scipys():
  for df in (1, 2, 3, 4, 9, 12, 30, 101):
    for x in (1e-3, 0.5, 1.0, 3.0, 9.0, 14.764, 30.0, 152.233, 400.0):
      assert statistics._chi2_sf(x, df) == pytest.approx(scipy_stats.chi2.sf(x, df),
                                                         rel=1e-10, abs=1e-300)
  assert statistics._chi2_sf(0.0, 4) == 1.0


def test_random_effects_by_hand():
  y = np.array([0.02, -0.01, 0.05, 0.00, 0.08])
  se = np.array([0.010, 0.020, 0.015, 0.030, 0.025])
  w = 1 / se ** 2
  fixed = np.sum(w * y) / np.sum(w)
  q = np.sum(w * (y - fixed) ** 2)
  tau2 = max(0.0, (q - 4) / (w.sum() - (w ** 2).sum() / w.sum()))
  w_star = 1 / (se ** 2 + tau2)
  estimate = np.sum(w_star * y) / w_star.sum()
  error = math.sqrt(1 / w_star.sum())
  got = statistics.random_effects_meta(y, se)
  assert tau2 > 0
  assert got["k"] == 5
  assert got["q"] == pytest.approx(q, rel=1e-12)
  assert got["tau2"] == pytest.approx(tau2, rel=1e-12)
  assert got["estimate"] == pytest.approx(estimate, rel=1e-12)
  assert got["standard_error"] == pytest.approx(error, rel=1e-12)
  assert got["ci95"] == pytest.approx((estimate - 1.959963984540054 * error,
                                       estimate + 1.959963984540054 * error), rel=1e-12)
  assert got["q_p"] == pytest.approx(scipy_stats.chi2.sf(q, 4), rel=1e-10)
  assert got["i2"] == pytest.approx((q - 4) / q, rel=1e-12)
  # Homogeneous runs: tau^2 and I^2 are 0 and the pooled estimate is the fixed one.
  same = statistics.random_effects_meta([0.03, 0.031, 0.029], [0.01, 0.01, 0.01])
  assert same["tau2"] == 0.0 and same["i2"] == 0.0
  assert same["estimate"] == pytest.approx(0.03)


def test_random_effects_reproduce_published_examples():
  # Lipsey and Wilson (2001), Practical Meta-Analysis, exhibit 7.3 (p. 133): ten studies.
  y = [-0.33, 0.32, 0.39, 0.31, 0.17, 0.64, -0.33, 0.15, -0.02, 0.00]
  v = [0.084, 0.035, 0.017, 0.034, 0.072, 0.117, 0.102, 0.093, 0.012, 0.067]
  got = statistics.random_effects_meta(y, np.sqrt(v))
  assert round(got["estimate"], 4) == 0.1534
  assert round(got["standard_error"], 4) == 0.0858
  assert [round(x, 4) for x in got["ci95"]] == [-0.0146, 0.3215]
  assert round(got["tau2"], 6) == 0.025955
  assert round(got["q"], 4) == 14.7640 and round(got["q_p"], 4) == 0.0976
  # The BCG vaccine trials (Colditz et al. 1994; metafor's dat.bcg), log risk ratios,
  # DerSimonian-Laird: -0.7141 (-1.0644, -0.3638), tau^2 0.3088, I^2 92.1%, Q 152.23.
  tpos = np.array([4, 6, 3, 62, 33, 180, 8, 505, 29, 17, 186, 5, 27])
  tneg = np.array([119, 300, 228, 13536, 5036, 1361, 2537, 87886, 7470, 1699, 50448, 2493,
                   16886])
  cpos = np.array([11, 29, 11, 248, 47, 372, 10, 499, 45, 65, 141, 3, 29])
  cneg = np.array([128, 274, 209, 12619, 5761, 1079, 619, 87892, 7232, 1600, 27197, 2338,
                   17825])
  yi = np.log(tpos / (tpos + tneg)) - np.log(cpos / (cpos + cneg))
  vi = 1 / tpos - 1 / (tpos + tneg) + 1 / cpos - 1 / (cpos + cneg)
  got = statistics.random_effects_meta(yi, np.sqrt(vi))
  assert round(got["estimate"], 4) == -0.7141
  assert [round(x, 4) for x in got["ci95"]] == [-1.0644, -0.3638]
  assert round(got["tau2"], 4) == 0.3088
  assert round(100 * got["i2"], 1) == 92.1
  assert round(got["q"], 2) == 152.23 and got["q_p"] < 1e-20


def test_random_effects_with_one_run_and_bad_errors():
  one = statistics.random_effects_meta([0.04], [0.01])
  assert one["estimate"] == 0.04 and one["standard_error"] == pytest.approx(0.01)
  assert one["tau2"] == 0.0 and one["q"] == 0.0
  assert one["i2"] is None and one["q_p"] is None and one["k"] == 1
  with pytest.raises(ValueError, match="run 2"):
    statistics.random_effects_meta([0.01, 0.02, 0.03], [0.01, 0.02, 0.0])
  with pytest.raises(ValueError, match="at least"):
    statistics.random_effects_meta([], [])


# --- fixed sequence ---------------------------------------------------------------------


def test_the_fixed_sequence_stops_at_the_first_failure():
  # Bounds from the fewest blocks removed to the most; the fourth passes again after the
  # third failed, and does not count.
  bounds = [0.01, 0.03, 0.07, 0.02, 0.09]
  assert statistics.fixed_sequence(bounds, 0.05) == 2
  assert statistics.fixed_sequence(bounds, 0.1) == 5
  assert statistics.fixed_sequence(bounds, 0.005) == 0
  assert statistics.fixed_sequence([0.05, 0.05], 0.05) == 2  # at the margin passes
  assert statistics.fixed_sequence([0.01, None, 0.01], 0.05) == 1
  assert statistics.fixed_sequence([0.01, float("nan"), 0.01], 0.05) == 1
  assert statistics.fixed_sequence([], 0.05) == 0


def test_the_item_level_sign_flip_test_approximates_the_exact_one():
  """With ten items the exact test enumerates 2^10 assignments (scipy); the Monte Carlo
  one over 2^15 draws is within its sampling error, and a clear difference over 200 items
  reaches the smallest p the draws allow."""
  rng = np.random.default_rng(3)
  a = (rng.random((3, 10)) < 0.7).astype(int)
  b = (rng.random((3, 10)) < 0.4).astype(int)
  d = a.mean(0) - b.mean(0)
  exact = scipy_stats.permutation_test((d,), np.mean, permutation_type="samples",
                                 n_resamples=np.inf).pvalue
  p = statistics.item_sign_flip_test(a, b)
  assert abs(p - exact) < 4 * np.sqrt(exact * (1 - exact) / statistics.ITEM_FLIP_DRAWS) + 1e-4
  many = np.ones((2, 200), int)
  assert statistics.item_sign_flip_test(many, np.zeros_like(many)) == pytest.approx(
      1 / (statistics.ITEM_FLIP_DRAWS + 1))
  assert statistics.item_sign_flip_test(many, many) == 1.0
  c = statistics.compare_arms("noise 0.1", 0, many, np.zeros_like(many), unit="item")
  assert "items' seed-averaged" in c.test and c.p < 1e-4
