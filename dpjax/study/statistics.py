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

Each returns its statistic, interval and p-value together (`Comparison`), as
statsmodels and scipy.stats do, and the name says which test.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

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


def two_stage_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int = RESAMPLES,
                        seed: int = 0) -> tuple[float, tuple[float, float]]:
  """`mean(a) - mean(b)` of seed-by-item outcomes `a`, `b` `[S, N]` (a random rule's seeds,
  the same items) and its 95% interval from a two-stage bootstrap: seeds resampled first
  (the same seed indices for both: seed `s` draws both arms), then items (the same items
  for both), each resample's difference of means."""
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
  low, high = np.quantile(means, [0.025, 0.975])
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


@dataclasses.dataclass
class Comparison:
  """Silent arm against Decisive arm at one (rule, k), on the same evaluation items."""
  rule: str
  k: int
  silent_accuracy: float
  decisive_accuracy: float
  difference: float                 # silent minus decisive
  ci95: tuple[float, float]         # paired bootstrap (two-stage for a random rule)
  mcnemar_p: float                  # exact, two-sided
  seeds: int
  test: str                         # what ci95 and mcnemar_p are
  holm_p: float | None = None       # Holm over every comparison of the study
  k_silent: int | None = None       # when the arms are sized as fractions of their phase
  k_decisive: int | None = None

  def to_json(self) -> dict:
    out = dataclasses.asdict(self)
    out["ci95"] = list(self.ci95)
    return out


def compare_arms(rule: str, k: int, silent: np.ndarray, decisive: np.ndarray,
                 seed: int = 0, **sizes) -> Comparison:
  """The paired comparison of two arms' per-item correctness `[seeds, N]` (one row: a
  deterministic rule)."""
  silent, decisive = np.atleast_2d(silent).astype(np.float64), np.atleast_2d(decisive).astype(
      np.float64)
  seeds = silent.shape[0]
  if seeds == 1:
    diff, ci = paired_bootstrap(silent[0], decisive[0], seed=seed)
    _, _, p = mcnemar_exact(silent[0].astype(int), decisive[0].astype(int))
    test = "paired bootstrap over items; exact McNemar"
  else:
    diff, ci = two_stage_bootstrap(silent, decisive, seed=seed)
    _, _, p = mcnemar_exact(majority(silent), majority(decisive))
    test = (f"two-stage bootstrap over {seeds} seeds and items; exact McNemar on each item's "
            "majority outcome over the seeds")
  return Comparison(rule=rule, k=k, silent_accuracy=float(silent.mean()),
                    decisive_accuracy=float(decisive.mean()), difference=diff, ci95=ci,
                    mcnemar_p=p, seeds=seeds, test=test, **sizes)


def with_holm(comparisons: list[Comparison]) -> list[Comparison]:
  """The comparisons with `holm_p` set, Holm's adjustment over all of them."""
  for c, p in zip(comparisons, holm([c.mcnemar_p for c in comparisons])):
    c.holm_p = p
  return comparisons


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


VERDICTS = ("holds", "reversed", "cannot tell")


def verdict(comparisons: Sequence[Comparison], alpha: float = 0.05) -> tuple[str, str]:
  """The paper's claim (pruning the Silent Phase costs more than pruning the Decisive Phase)
  judged from paired comparisons. A difference counts when it survives Holm's correction
  (`holm_p < alpha`) and its paired 95% interval leaves out 0 (for a random rule the
  McNemar test sees the items only, the two-stage interval the seeds too: both must
  agree). `holds` when every difference that counts has the Silent arm below the
  Decisive arm, `reversed` when every one has it above, `cannot tell` when none counts or
  they point both ways. Returns the class and the comparisons it rests on, in words."""
  significant = [c for c in comparisons if c.holm_p is not None and c.holm_p < alpha
                 and (c.ci95[0] > 0 or c.ci95[1] < 0)]
  name = lambda c: f"{c.rule} k={c.k}"
  lower = [name(c) for c in significant if c.difference < 0]
  higher = [name(c) for c in significant if c.difference > 0]
  if lower and not higher:
    return "holds", f"Silent arm lower at {', '.join(lower)}"
  if higher and not lower:
    return "reversed", f"Silent arm higher at {', '.join(higher)}"
  if lower and higher:
    return "cannot tell", (f"both ways: Silent arm lower at {', '.join(lower)}, higher at "
                           f"{', '.join(higher)}")
  return "cannot tell", (f"no difference survives Holm's correction at {alpha} with an "
                         f"interval apart from 0 ({len(comparisons)} comparisons)")
