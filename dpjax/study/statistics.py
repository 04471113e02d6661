"""Comparing two variants scored on the same items: paired intervals, exact tests, Holm.

Every comparison the study reports is paired, because both variants are scored on the
same evaluation items:

* `paired_bootstrap`: the difference of two per-item outcome vectors' means with a 95%
  percentile interval from resampling items (the same items for both variants).
* `two_stage_bootstrap`: the same when each variant is drawn by a random rule over
  seeds (`[seeds, items]` outcomes): seeds are resampled, then items, so the interval
  holds the seed-to-seed spread as well as the items'.
* `mcnemar_exact`: the exact two-sided McNemar test of two paired binary outcome vectors
  (the discordant pairs against a fair coin).
* `holm`: Holm's step-down adjustment of many p-values (family-wise error).

Testing the claim (non-inferiority, equivalence, a random rule's seeds, runs pooled):

* `sign_flip_test`: the exact sign-flip permutation test of a random rule's per-seed paired
  differences (the seed is the unit of randomness, not the item).
* `paired_interval`: the difference of two paired binary outcome vectors with Tango's
  score interval, which keeps a width when no item is discordant.
* `exact_drop_upper`: the Clopper-Pearson upper bound of the share of items only the first
  variant got right (a conservative upper bound on the drop).
* `two_stage_interval`: the two-stage bootstrap interval widened to hold Tango's interval
  on the seed-averaged discordant counts.
* `equivalent`: two one-sided tests (TOST) from a 90% interval and a margin.
* `minimum_detectable_difference`: the smallest paired difference McNemar's test detects
  with a given power (Connor's sample-size formula solved for the difference).
* `random_effects_meta`: DerSimonian-Laird pooling of per-run differences, with Cochran's
  Q, its p, I^2 and tau^2.
* `fixed_sequence`: how many points of an ordered curve pass a bound, stopping at the first
  failure (the fixed-sequence rule, no multiplicity correction needed).

None of them needs scipy: normal and binomial quantiles, the chi-square tail and the
interval roots are computed here.

Each returns its statistic, interval and p-value together (`Comparison`), as
statsmodels and scipy.stats do, and the name says which test.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

RESAMPLES = 2000


def _rng(seed: int) -> np.random.Generator:
  return np.random.default_rng([seed, 9595])


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = RESAMPLES,
                     seed: int = 0) -> tuple[float, tuple[float, float]]:
  """`mean(a) - mean(b)` of per-item outcomes `a`, `b` `[N]` and its 95% percentile
  interval over resampled items (each resample takes the same items for both)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1 or not len(a):
    raise ValueError(f"paired outcomes need two equal, non-empty [N] vectors; got {a.shape} "
                     f"and {b.shape}.")
  d = a - b
  idx = _rng(seed).integers(len(d), size=(resamples, len(d)))
  means = d[idx].mean(1)
  low, high = np.quantile(means, [0.025, 0.975])
  return float(d.mean()), (float(low), float(high))


def _tails(confidence: float) -> tuple[float, float]:
  """The two percentile levels of a two-sided `confidence` interval (0.025 and 0.975 at
  0.95, exactly)."""
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must lie in (0, 1); got {confidence}.")
  tail = round((1 - confidence) / 2, 12)
  return tail, 1 - tail


def two_stage_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = RESAMPLES,
                        seed: int = 0, confidence: float = 0.95
                        ) -> tuple[float, tuple[float, float]]:
  """`mean(a) - mean(b)` of seed-by-item outcomes `a`, `b` `[S, N]` (a random rule's seeds,
  the same items) and its two-sided `confidence` (default 95%) percentile interval from a
  two-stage bootstrap: seeds resampled first (the same seed indices for both: seed `s`
  draws both arms), then items (the same items for both), each resample's difference of
  means."""
  tails = _tails(confidence)
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 2 or 0 in a.shape:
    raise ValueError(f"two-stage outcomes need two equal [seeds, items] arrays; got {a.shape} "
                     f"and {b.shape}.")
  seeds, items = a.shape
  rng = _rng(seed)
  s_idx = rng.integers(seeds, size=(resamples, seeds))
  i_idx = rng.integers(items, size=(resamples, items))
  d = a - b
  # Mean over the resampled seeds and items of each resample: d[s_idx][:, :, i_idx] per row.
  means = np.array([d[s][:, i].mean() for s, i in zip(s_idx, i_idx)])
  low, high = np.quantile(means, tails)
  return float(d.mean()), (float(low), float(high))


def _binom_cdf(k: int, n: int) -> float:
  """P(X <= k) for X ~ Binomial(n, 1/2), exactly (integer arithmetic)."""
  return sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
  """The exact two-sided McNemar test of paired binary outcomes `a`, `b` `[N]`: the counts
  of items only `a` got right and only `b` got right, and the p-value
  `min(1, 2 P(X <= min))` for X ~ Binomial(discordant, 1/2) (1 with no discordant pair)."""
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"McNemar needs two equal [N] outcome vectors; got {a.shape}, {b.shape}.")
  if not (np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all()):
    raise ValueError("McNemar's test takes binary outcomes (0/1 per item).")
  only_a = int(np.sum((a == 1) & (b == 0)))
  only_b = int(np.sum((a == 0) & (b == 1)))
  n = only_a + only_b
  p = 1.0 if n == 0 else min(1.0, 2.0 * _binom_cdf(min(only_a, only_b), n))
  return only_a, only_b, p


def holm(p_values: Sequence[float]) -> list[float]:
  """Holm's step-down adjusted p-values, in the order given: the i-th smallest p times
  `(m - i)` (i from 0), made monotone, capped at 1."""
  p = np.asarray(p_values, np.float64)
  m = len(p)
  order = np.argsort(p, kind="stable")
  adjusted = np.empty(m)
  running = 0.0
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (m - rank) * p[i]))
    adjusted[i] = running
  return adjusted.tolist()


def majority(outcomes: np.ndarray) -> np.ndarray:
  """Per item `[N]`, 1 where the item is right in more than half of the seeds `[S, N]` (the
  binary outcome McNemar's test takes for a random rule)."""
  outcomes = np.asarray(outcomes, np.float64)
  return (outcomes.mean(0) > 0.5).astype(int)


MARGIN = 0.05  # --margin: the non-inferiority / equivalence margin, in accuracy
ALPHA = 0.05


@dataclasses.dataclass
class ArmDrop:
  """One arm against the unpruned model on the same items: its accuracy with a score
  interval, the paired drop `acc(unpruned) - acc(arm)` with its interval, whether the arm
  is non-inferior (the drop's upper bound at most the margin) and whether it collapsed
  (its accuracy's upper bound below the collapse threshold)."""
  accuracy: float
  accuracy_ci95: tuple[float, float]
  drop: float
  drop_ci95: tuple[float, float]
  non_inferior: bool
  collapsed: bool

  def to_json(self) -> dict:
    out = dataclasses.asdict(self)
    out["accuracy_ci95"], out["drop_ci95"] = list(self.accuracy_ci95), list(self.drop_ci95)
    return out


def arm_drop(unpruned: np.ndarray, arm: np.ndarray, margin: float, threshold: float
             ) -> ArmDrop:
  """`ArmDrop` of an arm's binary outcomes `[seeds, N]` (one row: a deterministic rule)
  against the unpruned model's `[N]`: Tango's interval for one row, the two-stage
  interval (widened by Tango) over seeds and items for several; the arm's accuracy
  interval is the same interval against an all-wrong vector (Tango's, then, is a score
  interval for one proportion)."""
  arm = np.atleast_2d(np.asarray(arm, np.float64))
  unpruned = np.asarray(unpruned, np.float64)
  zeros = np.zeros_like(arm)
  if arm.shape[0] == 1:
    accuracy, accuracy_ci = paired_interval(arm[0], zeros[0])
    drop, drop_ci = paired_interval(unpruned, arm[0])
  else:
    accuracy, accuracy_ci = two_stage_interval(arm, zeros)
    drop, drop_ci = two_stage_interval(np.tile(unpruned, (arm.shape[0], 1)), arm)
  return ArmDrop(accuracy=accuracy, accuracy_ci95=accuracy_ci, drop=drop, drop_ci95=drop_ci,
                 non_inferior=bool(drop_ci[1] <= margin),
                 collapsed=bool(accuracy_ci[1] < threshold))


@dataclasses.dataclass
class Comparison:
  """Silent arm against Decisive arm at one (rule, k), on the same evaluation items."""
  rule: str
  k: int
  silent_accuracy: float
  decisive_accuracy: float
  difference: float                 # silent minus decisive
  ci95: tuple[float, float]         # Tango's score interval (two-stage for a random rule)
  p: float                          # exact McNemar, or the sign-flip test over seeds
  seeds: int
  test: str                         # which interval and which test
  holm_p: float | None = None       # Holm over the distinct comparisons of the family
  k_silent: int | None = None       # when the arms are sized as fractions of their phase
  k_decisive: int | None = None
  ci90: tuple[float, float] | None = None  # for equivalence (two one-sided tests)
  detectable: float | None = None   # the difference detectable at 80% power (McNemar)
  silent_drop: ArmDrop | None = None    # each arm against the unpruned model
  decisive_drop: ArmDrop | None = None
  same_as: str | None = None        # an earlier comparison of exactly these variants
  verdict: str | None = None        # holds / reversed / equivalent / cannot tell
  reason: str | None = None
  variants: Any = dataclasses.field(default=None, repr=False)  # the kept sets compared

  @property
  def name(self) -> str:
    return f"{self.rule} k={self.k}"

  def to_json(self) -> dict:
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
           if f.name not in ("variants", "silent_drop", "decisive_drop")}
    out["ci95"] = list(self.ci95)
    out["ci90"] = None if self.ci90 is None else list(self.ci90)
    for arm in ("silent_drop", "decisive_drop"):
      value = getattr(self, arm)
      out[arm] = None if value is None else value.to_json()
    return out


def compare_arms(rule: str, k: int, silent: np.ndarray, decisive: np.ndarray,
                 seed: int = 0, unpruned: np.ndarray | None = None, margin: float = MARGIN,
                 threshold: float | None = None, variants: Any = None,
                 unit: str = "seed", **sizes) -> Comparison:
  """The paired comparison of two arms' per-item correctness `[seeds, N]` (one row: a
  deterministic rule). A deterministic rule: Tango's score interval and the exact McNemar
  test. A random rule (several seeds, seed `s` drawing both arms): the two-stage interval
  over seeds and items (widened by Tango on the seed-averaged counts) and the exact
  sign-flip test over seeds on the per-seed paired differences: the seed is the unit of
  randomness, so McNemar on items (or on majority outcomes) is not a valid test here.
  With `unit="item"` (randomness drawn independently per item, as the noise probe's), the
  items are the units: the sign-flip test over the items' seed-averaged differences.
  With `unpruned` (`[N]`), each arm's drop from it (`arm_drop`, non-inferiority at
  `margin`, collapse below `threshold`). `variants` identifies the kept sets compared
  (two comparisons with equal `variants` are one)."""
  silent = np.atleast_2d(silent).astype(np.float64)
  decisive = np.atleast_2d(decisive).astype(np.float64)
  seeds, n = silent.shape
  if seeds == 1:
    diff, ci = paired_interval(silent[0], decisive[0])
    _, ci90 = paired_interval(silent[0], decisive[0], confidence=0.90)
    _, _, p = mcnemar_exact(silent[0].astype(int), decisive[0].astype(int))
    discordant = float(np.mean(silent[0] != decisive[0]))
    test = "Tango's score interval; exact McNemar test"
  elif unit == "item":
    diff, ci = two_stage_interval(silent, decisive, seed=seed)
    _, ci90 = two_stage_interval(silent, decisive, confidence=0.90, seed=seed)
    p = item_sign_flip_test(silent, decisive, seed=seed)
    discordant = float(np.mean(silent != decisive))
    test = (f"two-stage bootstrap over {seeds} seeds and items, widened by Tango's score "
            "interval; sign-flip test over the items' seed-averaged paired differences "
            f"({ITEM_FLIP_DRAWS} random assignments: each item's draw is its own)")
  elif unit == "seed":
    diff, ci = two_stage_interval(silent, decisive, seed=seed)
    _, ci90 = two_stage_interval(silent, decisive, confidence=0.90, seed=seed)
    p = sign_flip_test(silent, decisive)
    discordant = float(np.mean(silent != decisive))
    test = (f"two-stage bootstrap over {seeds} seeds and items, widened by Tango's score "
            f"interval; exact sign-flip test over the {seeds} seeds' paired differences")
  else:
    raise ValueError(f"unit={unit!r}: the unit of randomness is 'seed' (a random rule: a "
                     "seed draws the kept set of every item) or 'item' (a draw per item).")
  out = Comparison(rule=rule, k=k, silent_accuracy=float(silent.mean()),
                   decisive_accuracy=float(decisive.mean()), difference=diff, ci95=ci, p=p,
                   seeds=seeds, test=test, ci90=ci90,
                   detectable=minimum_detectable_difference(discordant, n),
                   variants=variants, **sizes)
  if unpruned is not None:
    if threshold is None:
      raise ValueError("an arm's collapse needs the collapse threshold (chance plus half "
                       "the unpruned model's gap above it).")
    out.silent_drop = arm_drop(unpruned, silent, margin, threshold)
    out.decisive_drop = arm_drop(unpruned, decisive, margin, threshold)
  return out


def with_holm(comparisons: list[Comparison], alpha: float = ALPHA,
              margin: float = MARGIN) -> list[Comparison]:
  """The comparisons with `holm_p`, `same_as` and their class set: a comparison of the
  same kept sets as an earlier one (a control rule that removes what `adjacent` removes
  where a phase is small) is marked `same_as` that one and shares its adjusted p; Holm's
  adjustment runs over the distinct ones only."""
  first: dict[Any, Comparison] = {}
  distinct = []
  for c in comparisons:
    key = None if c.variants is None else repr(c.variants)
    if key is not None and key in first:
      c.same_as = first[key].name
    else:
      if key is not None:
        first[key] = c
      distinct.append(c)
  for c, p in zip(distinct, holm([c.p for c in distinct])):
    c.holm_p = p
  for c in comparisons:
    if c.same_as is not None:
      c.holm_p = next(d.holm_p for d in distinct if d.name == c.same_as)
    c.verdict, c.reason = classify(c, alpha, margin)
  return comparisons


VERDICTS = ("holds", "reversed", "equivalent", "cannot tell")


def classify(c: Comparison, alpha: float = ALPHA, margin: float = MARGIN) -> tuple[str, str]:
  """One comparison's class. `holds`: the Decisive arm non-inferior to the unpruned model
  (its drop's upper 95% bound at most `margin`) and the Silent arm significantly below the
  Decisive arm (Holm p < alpha and the interval below 0); `reversed`: the Decisive arm
  significantly below the Silent arm; `equivalent`: the 90% interval of the difference
  inside +-margin (two one-sided tests at 0.05); else `cannot tell`, with the difference
  this many items could have detected at 80% power."""
  significant = c.holm_p is not None and c.holm_p < alpha and (c.ci95[0] > 0 or c.ci95[1] < 0)
  decisive = c.decisive_drop
  if significant and c.difference > 0:
    return "reversed", (f"Decisive arm below the Silent arm by {c.difference:.3f} "
                        f"[{-c.ci95[1]:.3f}, {-c.ci95[0]:.3f}], Holm p {c.holm_p:.2g}")
  if significant and c.difference < 0:
    if decisive is not None and decisive.non_inferior:
      return "holds", (f"Silent arm below the Decisive arm by {-c.difference:.3f}, Holm p "
                       f"{c.holm_p:.2g}; the Decisive arm's drop at most "
                       f"{decisive.drop_ci95[1]:.3f} <= margin {margin}")
    bound = "not measured" if decisive is None else f"up to {decisive.drop_ci95[1]:.3f}"
    return "cannot tell", (f"Silent arm below the Decisive arm (Holm p {c.holm_p:.2g}), but "
                           f"the Decisive arm's drop is {bound}, above margin {margin}: it "
                           "costs more than little")
  if c.ci90 is not None and equivalent(c.ci90, margin):
    return "equivalent", (f"90% interval [{c.ci90[0]:+.3f}, {c.ci90[1]:+.3f}] inside "
                          f"+-{margin}")
  return "cannot tell", (f"no significant difference and no equivalence within +-{margin}; "
                         f"{c.detectable:.3f} is the smallest difference detectable at 80% "
                         "power here")


def verdict(comparisons: Sequence[Comparison], alpha: float = ALPHA,
            margin: float = MARGIN) -> tuple[str, str]:
  """A run's class from its comparisons' classes (`classify`; each distinct pair of
  variants once): `holds` when some comparison holds and none is reversed, `reversed`
  when some is reversed and none holds, `equivalent` when every one is, else `cannot
  tell` (none counts either way, or they point both ways). Returns the class and the
  comparisons it rests on, in words."""
  distinct = [c for c in comparisons if c.same_as is None]
  classes = {c.name: c.verdict or classify(c, alpha, margin)[0] for c in distinct}
  holds = [n for n, v in classes.items() if v == "holds"]
  reversed_ = [n for n, v in classes.items() if v == "reversed"]
  if holds and not reversed_:
    return "holds", f"holds at {', '.join(holds)}"
  if reversed_ and not holds:
    return "reversed", f"Decisive arm significantly lower at {', '.join(reversed_)}"
  if holds and reversed_:
    return "cannot tell", (f"both ways: holds at {', '.join(holds)}, reversed at "
                           f"{', '.join(reversed_)}")
  if classes and all(v == "equivalent" for v in classes.values()):
    return "equivalent", f"the arms equivalent within +-{margin} at every comparison"
  return "cannot tell", (f"no comparison holds or is reversed ({len(classes)} distinct "
                         f"comparisons; {sum(v == 'equivalent' for v in classes.values())} "
                         "equivalent)")


def bootstrap_block(per_item: np.ndarray, rule, resamples: int = RESAMPLES, seed: int = 0
                    ) -> tuple[int | None, tuple[int | None, int | None], float]:
  """A transition block computed from per-item values `[L+1, N]` by `rule` (a function of
  their mean over items `[L+1]` returning a block or None), with a 95% percentile interval
  over resampled items and the share of resamples with no transition. An interval end is
  None when more than 2.5% of the resamples on that side have none."""
  per_item = np.asarray(per_item, np.float64)
  point = rule(per_item.mean(1))
  idx = _rng(seed).integers(per_item.shape[1], size=(resamples, per_item.shape[1]))
  blocks = [rule(per_item[:, i].mean(1)) for i in idx]
  none = sum(b is None for b in blocks) / resamples
  # No transition sorts above every block (the transition is "later than the last one").
  ordered = np.array([np.inf if b is None else b for b in blocks])
  low, high = np.quantile(ordered, [0.025, 0.975], method="inverted_cdf")
  as_block = lambda v: None if np.isinf(v) else int(v)
  return point, (as_block(low), as_block(high)), float(none)


SIGN_FLIP_EXACT_SEEDS = 20   # up to this many seeds every sign assignment is enumerated
SIGN_FLIP_DRAWS = 2 ** 20    # random sign assignments drawn above it
_TIE = 1e-12                 # relative tolerance: a permuted statistic this close ties


def _normal_cdf(x: float) -> float:
  """The standard normal distribution function, `erfc(-x / sqrt 2) / 2`."""
  return 0.5 * math.erfc(-x / math.sqrt(2.0))


_ACKLAM_A = (-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02,
             1.383577518672690e+02, -3.066479806614716e+01, 2.506628277459239e+00)
_ACKLAM_B = (-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02,
             6.680131188771972e+01, -1.328068155288572e+01)
_ACKLAM_C = (-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00,
             -2.549732539343734e+00, 4.374664141464968e+00, 2.938163982698783e+00)
_ACKLAM_D = (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00,
             3.754408661907416e+00)


def _normal_quantile(p: float) -> float:
  """The standard normal quantile `Phi^-1(p)`: Acklam's rational approximation (relative
  error below 1.2e-9) refined by one Halley step on `erfc`, to about machine precision.
  Computed on the lower half and mirrored (`-Phi^-1(1 - p)` for p > 1/2), where `1 - p` is
  exact, so the upper tail keeps its precision."""
  if not 0 < p < 1:
    raise ValueError(f"a normal quantile needs a probability in (0, 1); got {p}.")
  if p > 0.5:
    return -_normal_quantile(1.0 - p)
  a, b, c, d = _ACKLAM_A, _ACKLAM_B, _ACKLAM_C, _ACKLAM_D
  if p < 0.02425:
    q = math.sqrt(-2.0 * math.log(p))
    x = ((((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5])
         / ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1.0))
  else:
    q = p - 0.5
    r = q * q
    x = ((((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q
         / (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1.0))
  if x * x / 2.0 > 700:  # beyond double range for the step (p below about 1e-305)
    return x
  # Halley's step on Phi(x) - p.
  e = _normal_cdf(x) - p
  u = e * math.sqrt(2.0 * math.pi) * math.exp(x * x / 2.0)
  return x - u / (1.0 + x * u / 2.0)


def _bisect(f, low: float, high: float) -> float:
  """A root of `f`, decreasing on `[low, high]` with `f(low) >= 0 >= f(high)`, by bisection
  until the bracket cannot shrink in floating point."""
  for _ in range(2000):
    mid = 0.5 * (low + high)
    if not low < mid < high:
      break
    if f(mid) >= 0:
      low = mid
    else:
      high = mid
  return 0.5 * (low + high)


def _seed_item_pair(a, b, what: str) -> tuple[np.ndarray, np.ndarray]:
  """`a`, `b` as float arrays, checked to be two equal, non-empty `[seeds, items]`."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 2 or 0 in a.shape:
    raise ValueError(f"{what} needs two equal [seeds, items] arrays; got {a.shape} and "
                     f"{b.shape}.")
  return a, b


def _binary_pair(a, b, what: str) -> tuple[np.ndarray, np.ndarray]:
  """`a`, `b` as integer arrays, checked to be equal in shape, non-empty and 0/1."""
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape or not a.size:
    raise ValueError(f"{what} needs two equal, non-empty outcome arrays; got {a.shape} and "
                     f"{b.shape}.")
  if not (np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all()):
    raise ValueError(f"{what} takes binary outcomes (0/1 per item).")
  return a.astype(np.int64), b.astype(np.int64)


def sign_flip_test(a: np.ndarray, b: np.ndarray, seed: int = 0) -> float:
  """The two-sided sign-flip permutation p-value of two arms drawn by a random rule over
  seeds. `a`, `b` `[S, N]` are per-seed, per-item outcomes (seed `s` draws both arms, on
  the same items); the seed is the unit of randomness, so the test takes the per-seed
  paired differences `d_s = mean_i a[s] - mean_i b[s]` and, under the null that each
  `d_s` is symmetric about 0, flips their signs: p is the share of sign assignments `e`
  (+1/-1 per seed) with `|mean_s e_s d_s| >= |mean_s d_s|` (a relative tolerance of 1e-12
  counts ties; the identity assignment is one of them).

  With S <= 20 seeds every one of the 2^S assignments is enumerated (exact). With more,
  2^20 assignments are drawn at random (seeded by `seed`) and the Monte Carlo p-value is
  `(hits + 1) / (draws + 1)`. p is 1 when every `d_s` is 0. The smallest exact p is
  `2 / 2^S` (1/512 with ten seeds)."""
  a, b = _seed_item_pair(a, b, "a sign-flip test")
  d = a.mean(1) - b.mean(1)
  seeds = len(d)
  if not np.any(d):
    return 1.0
  observed = abs(d.mean())
  threshold = observed * (1.0 - _TIE)
  hits = 0
  chunk = 1 << 16
  if seeds <= SIGN_FLIP_EXACT_SEEDS:
    total = 1 << seeds
    bits = np.arange(seeds, dtype=np.int64)
    for start in range(0, total, chunk):
      idx = np.arange(start, min(start + chunk, total), dtype=np.int64)
      signs = 1.0 - 2.0 * ((idx[:, None] >> bits) & 1)
      hits += int(np.sum(np.abs(signs @ d) / seeds >= threshold))
    return hits / total
  rng = _rng(seed)
  for start in range(0, SIGN_FLIP_DRAWS, chunk):
    rows = min(chunk, SIGN_FLIP_DRAWS - start)
    signs = 2.0 * rng.integers(0, 2, size=(rows, seeds)) - 1.0
    hits += int(np.sum(np.abs(signs @ d) / seeds >= threshold))
  return (hits + 1) / (SIGN_FLIP_DRAWS + 1)


ITEM_FLIP_DRAWS = 2 ** 15  # random sign assignments of the item-level test


def item_sign_flip_test(a: np.ndarray, b: np.ndarray, draws: int = ITEM_FLIP_DRAWS,
                        seed: int = 0) -> float:
  """A paired permutation test whose unit is the item, for arms whose randomness is drawn
  independently per item (the noise probe: every item's noise is its own draw, and a
  seed repeats the draw): the per-item differences of the seed-averaged outcomes
  `d_i = mean_s a[s, i] - mean_s b[s, i]` of `a`, `b` `[S, N]`, and the two-sided Monte
  Carlo sign-flip p `(1 + #{|mean(signs * d)| >= |mean(d)|}) / (1 + draws)` over `draws`
  seeded random sign assignments (1 when every `d_i` is 0)."""
  a, b = _seed_item_pair(a, b, "the item-level sign-flip test")
  d = a.mean(0) - b.mean(0)
  observed = abs(float(d.mean()))
  if observed == 0.0:
    return 1.0
  threshold = observed * (1.0 - _TIE)
  rng = _rng(seed)
  hits, chunk = 0, max(1, (1 << 22) // len(d))
  for start in range(0, draws, chunk):
    rows = min(chunk, draws - start)
    signs = 2.0 * rng.integers(0, 2, size=(rows, len(d))) - 1.0
    hits += int(np.sum(np.abs(signs @ d) / len(d) >= threshold))
  return (hits + 1) / (draws + 1)


def _tango_statistic(delta: float, n10: float, n01: float, n: float) -> float:
  """Tango's (1998) score statistic for H0: p10 - p01 = delta,
  `(n10 - n01 - n delta) / sqrt(n (2 p01~ + delta (1 - delta)))`, with p01~ the maximum
  likelihood estimate of p01 under H0: the root `(sqrt(B^2 - 4AC) - B) / 2A` of
  `A p^2 + B p + C` with `A = 2n`, `B = -n10 - n01 + (2n - n10 + n01) delta`,
  `C = -n01 delta (1 - delta)`. +-inf where the variance vanishes."""
  big_a = 2.0 * n
  big_b = -n10 - n01 + (2.0 * n - n10 + n01) * delta
  big_c = -n01 * delta * (1.0 - delta)
  root = math.sqrt(max(big_b * big_b - 4.0 * big_a * big_c, 0.0))
  # The same root, written without cancellation when B > 0.
  p01 = (root - big_b) / (2.0 * big_a) if big_b <= 0 else -2.0 * big_c / (root + big_b)
  numerator = n10 - n01 - n * delta
  variance = n * (2.0 * p01 + delta * (1.0 - delta))
  if variance <= 0:
    return 0.0 if numerator == 0 else math.copysign(math.inf, numerator)
  return numerator / math.sqrt(variance)


def _tango_interval(n10: float, n01: float, n: float, confidence: float
                    ) -> tuple[float, float]:
  """Tango's (1998) score interval for p10 - p01 from `n10`, `n01` discordant pairs of `n`
  (non-integer counts allowed): the `delta` in [-1, 1] where
  `|_tango_statistic(delta)| <= z_{1 - (1 - confidence)/2}`, each end found by bisection
  (the statistic decreases in delta)."""
  if not (n > 0 and 0 <= n10 and 0 <= n01 and n10 + n01 <= n * (1 + 1e-12)):
    raise ValueError(f"Tango's interval needs 0 <= n10, n01 and n10 + n01 <= n > 0; got "
                     f"n10={n10}, n01={n01}, n={n}.")
  z = _normal_quantile(_tails(confidence)[1])
  estimate = (n10 - n01) / n
  stat = lambda delta: _tango_statistic(delta, n10, n01, n)
  low = -1.0 if estimate <= -1 else _bisect(lambda t: stat(t) - z, -1.0, estimate)
  high = 1.0 if estimate >= 1 else _bisect(lambda t: stat(t) + z, estimate, 1.0)
  return low, high


def paired_interval(a: np.ndarray, b: np.ndarray, confidence: float = 0.95
                    ) -> tuple[float, tuple[float, float]]:
  """`mean(a) - mean(b)` of paired binary outcomes `a`, `b` `[N]` and Tango's (1998) score
  confidence interval (two-sided `confidence`) for the difference of paired proportions
  `p10 - p01` (p10: the share of items only `a` got right, p01: only `b`): the asymptotic
  score test of `p10 - p01 = delta`, with p01 estimated under that null, inverted; each end
  is found by bisection on the score statistic. Unlike the Wald or bootstrap interval it
  keeps a width when no pair is discordant (0 of 60: about [-0.060, 0.060]).

  T. Tango, Equivalence test and confidence interval for the difference in proportions for
  the paired-sample design, Statistics in Medicine 17:891-908 (1998)."""
  a, b = _binary_pair(a, b, "a paired interval")
  if a.ndim != 1:
    raise ValueError(f"a paired interval needs two [N] outcome vectors; got {a.shape}.")
  n10 = int(np.sum((a == 1) & (b == 0)))
  n01 = int(np.sum((a == 0) & (b == 1)))
  return float(a.mean() - b.mean()), _tango_interval(n10, n01, len(a), confidence)


def _binomial_cdf(k: int, n: int, p: float) -> float:
  """P(X <= k) for X ~ Binomial(n, p), summed term by term in log space."""
  if p <= 0:
    return 1.0
  if p >= 1:
    return 1.0 if k >= n else 0.0
  log_p, log_q = math.log(p), math.log1p(-p)
  log_n = math.lgamma(n + 1)
  return min(1.0, sum(math.exp(log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1)
                               + i * log_p + (n - i) * log_q) for i in range(k + 1)))


def exact_drop_upper(b10: int, n: int, confidence: float = 0.95) -> float:
  """The Clopper-Pearson (exact) upper limit of a two-sided `confidence` interval for the
  proportion `b10 / n`: the p with `P(X <= b10) = (1 - confidence) / 2` for
  X ~ Binomial(n, p) (1 when `b10 == n`), found by bisection. With `b10` the items only the
  first variant (the unpruned model) got right, the drop
  `acc(first) - acc(second) = p10 - p01 <= p10`, so this bounds the drop from above,
  conservatively and never at 0 (1 of 60: 0.0894; 0 of 60: 0.0596)."""
  if isinstance(b10, (bool, np.bool_)) or int(b10) != b10 or int(n) != n:
    raise ValueError(f"the exact bound takes integer counts; got b10={b10}, n={n}.")
  b10, n = int(b10), int(n)
  if not 0 <= b10 <= n or n < 1:
    raise ValueError(f"the exact bound needs 0 <= b10 <= n, n >= 1; got b10={b10}, n={n}.")
  tail = _tails(confidence)[0]
  if b10 == n:
    return 1.0
  return _bisect(lambda p: _binomial_cdf(b10, n, p) - tail, b10 / n, 1.0)


def two_stage_interval(a: np.ndarray, b: np.ndarray, confidence: float = 0.95,
                       resamples: int = RESAMPLES, seed: int = 0
                       ) -> tuple[float, tuple[float, float]]:
  """`mean(a) - mean(b)` of binary seed-by-item outcomes `a`, `b` `[S, N]` (a random rule's
  seeds, the same items) and the union of two two-sided `confidence` intervals: the
  two-stage bootstrap's (`two_stage_bootstrap`: seeds, then items) and Tango's score
  interval (`paired_interval`) on the seed-averaged discordant counts
  `mean_s #(a[s] = 1, b[s] = 0)` and `mean_s #(a[s] = 0, b[s] = 1)` of the N items (the
  score statistic takes non-integer counts). So seeds that are never discordant (every
  resample's difference 0) still give an interval as wide as one item-level sample
  allows, not [0, 0]."""
  a, b = _seed_item_pair(a, b, "a two-stage interval")
  _binary_pair(a, b, "a two-stage interval")
  diff, (low, high) = two_stage_bootstrap(a, b, resamples=resamples, seed=seed,
                                          confidence=confidence)
  n10 = float(np.mean(np.sum((a == 1) & (b == 0), axis=1)))
  n01 = float(np.mean(np.sum((a == 0) & (b == 1), axis=1)))
  t_low, t_high = _tango_interval(n10, n01, a.shape[1], confidence)
  return diff, (min(low, t_low), max(high, t_high))


def equivalent(interval90: tuple[float, float], margin: float) -> bool:
  """Two one-sided tests (TOST) of equivalence at alpha 0.05: True when the two-sided 90%
  interval of a difference lies strictly inside (-margin, +margin), i.e. both
  `difference <= -margin` and `difference >= margin` are rejected at 5%
  (Schuirmann 1987)."""
  low, high = (float(v) for v in interval90)
  if not margin > 0:
    raise ValueError(f"an equivalence margin must be positive; got {margin}.")
  if not low <= high:
    raise ValueError(f"an interval needs low <= high; got ({low}, {high}).")
  return -margin < low and high < margin


def minimum_detectable_difference(discordant_share: float, n: int, power: float = 0.8,
                                  alpha: float = 0.05) -> float:
  """The smallest |p10 - p01| that the two-sided McNemar test at level `alpha` detects with
  probability `power` on `n` pairs whose discordant share is psi: Connor's (1987)
  sample-size formula `n = (z_{1-alpha/2} sqrt(psi) + z_power sqrt(psi - delta^2))^2 /
  delta^2` solved for delta in (0, sqrt(psi)] by bisection (the required n falls as delta
  grows). psi is `max(discordant_share, 1/n)`: with no discordant pair observed the
  answer is the one for a single discordant pair, finite rather than 0. The formula's
  delta may exceed psi (an observed difference that large would need more discordant
  pairs than psi gives). `math.inf` when even delta = sqrt(psi) needs more than n pairs
  (n < z_{1-alpha/2}^2, about 4 at alpha 0.05). Power must be in [0.5, 1).

  R. J. Connor, Sample size for testing differences in proportions for the paired-sample
  design, Biometrics 43:207-211 (1987)."""
  if not 0 <= discordant_share <= 1:
    raise ValueError(f"a discordant share lies in [0, 1]; got {discordant_share}.")
  if not n >= 1:
    raise ValueError(f"the number of pairs must be at least 1; got {n}.")
  if not 0.5 <= power < 1:
    raise ValueError(f"power must lie in [0.5, 1); got {power}.")
  if not 0 < alpha < 1:
    raise ValueError(f"alpha must lie in (0, 1); got {alpha}.")
  psi = max(float(discordant_share), 1.0 / n)
  z_alpha, z_power = _normal_quantile(1 - alpha / 2), _normal_quantile(power)
  required = lambda delta: ((z_alpha * math.sqrt(psi)
                             + z_power * math.sqrt(max(psi - delta * delta, 0.0))) ** 2
                            / (delta * delta))
  top = math.sqrt(psi)
  if required(top) > n:
    return math.inf
  return _bisect(lambda delta: required(delta) - n, top * 1e-12, top)


def _chi2_sf(x: float, df: float) -> float:
  """P(X >= x) for X ~ chi-square with `df` degrees of freedom: the regularized upper
  incomplete gamma Q(df/2, x/2), by its series (1 - P) below `df/2 + 1` and by its
  continued fraction (modified Lentz) above (Numerical Recipes, section 6.2)."""
  s, x = df / 2.0, x / 2.0
  if x <= 0:
    return 1.0
  log_front = -x + s * math.log(x) - math.lgamma(s)
  if x < s + 1:
    term = total = 1.0 / s
    a = s
    for _ in range(100000):
      a += 1.0
      term *= x / a
      total += term
      if abs(term) < abs(total) * 1e-17:
        break
    return max(0.0, 1.0 - total * math.exp(log_front))
  tiny = 1e-300
  b = x + 1.0 - s
  c, d = 1.0 / tiny, 1.0 / b
  h = d
  for i in range(1, 100000):
    an = -i * (i - s)
    b += 2.0
    d = an * d + b
    d = tiny if abs(d) < tiny else d
    c = b + an / c
    c = tiny if abs(c) < tiny else c
    d = 1.0 / d
    step = d * c
    h *= step
    if abs(step - 1.0) < 1e-16:
      break
  return math.exp(log_front) * h


def random_effects_meta(estimates: Sequence[float], standard_errors: Sequence[float]
                        ) -> dict:
  """DerSimonian-Laird random-effects pooling of k per-run estimates with their standard
  errors: fixed-effect weights `w = 1/se^2`, Cochran's `Q = sum w (y - y_w)^2`,
  `tau^2 = max(0, (Q - (k-1)) / (sum w - sum w^2 / sum w))`, random-effects weights
  `1 / (se^2 + tau^2)`, the pooled estimate and its standard error `sqrt(1 / sum w*)` with
  the normal 95% interval. Returns `estimate`, `standard_error`, `ci95`, `tau2`, `q`,
  `q_p` (chi-square with k-1 degrees of freedom, upper tail), `i2`
  (`max(0, (Q - (k-1)) / Q)`, 0 when Q is 0) and `k`. With k = 1: the run itself,
  tau^2 = 0, Q = 0, and `q_p`, `i2` None.

  R. DerSimonian and N. Laird, Meta-analysis in clinical trials, Controlled Clinical Trials
  7:177-188 (1986); J. Higgins and S. Thompson, Statistics in Medicine 21:1539-1558 (2002)
  for I^2."""
  y = np.asarray(estimates, np.float64)
  se = np.asarray(standard_errors, np.float64)
  if y.ndim != 1 or y.shape != se.shape or not len(y):
    raise ValueError(f"a meta-analysis needs as many estimates as standard errors, at least "
                     f"one; got {y.shape} and {se.shape}.")
  for i, (value, error) in enumerate(zip(y, se)):
    if not math.isfinite(value):
      raise ValueError(f"the estimate of run {i} is {value}.")
    if not (math.isfinite(error) and error > 0):
      raise ValueError(f"the standard error of run {i} is {error}; it must be positive.")
  k = len(y)
  w = 1.0 / se ** 2
  fixed = float(np.sum(w * y) / np.sum(w))
  q = float(np.sum(w * (y - fixed) ** 2)) if k > 1 else 0.0
  scale = float(np.sum(w) - np.sum(w ** 2) / np.sum(w))
  tau2 = max(0.0, (q - (k - 1)) / scale) if k > 1 else 0.0
  w_star = 1.0 / (se ** 2 + tau2)
  estimate = float(np.sum(w_star * y) / np.sum(w_star))
  error = float(math.sqrt(1.0 / np.sum(w_star)))
  z = _normal_quantile(0.975)
  return {
      "estimate": estimate,
      "standard_error": error,
      "ci95": (estimate - z * error, estimate + z * error),
      "tau2": tau2,
      "q": q,
      "q_p": _chi2_sf(q, k - 1) if k > 1 else None,
      "i2": (max(0.0, (q - (k - 1)) / q) if q > 0 else 0.0) if k > 1 else None,
      "k": k,
  }


def fixed_sequence(bounds: Sequence[float | None], margin: float) -> int:
  """The fixed-sequence rule: with upper bounds ordered from the fewest blocks removed to
  the most, the number of leading points whose bound is at most `margin`, walking from
  the first and stopping at the first that fails (a None or NaN bound fails). Each point
  is tested at the full level only because every point before it passed, so the family
  needs no multiplicity correction (Maurer, Hothorn and Lehmacher 1995)."""
  passed = 0
  for bound in bounds:
    if bound is None or not float(bound) <= margin:
      break
    passed += 1
  return passed
