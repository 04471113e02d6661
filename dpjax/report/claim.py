"""The claim's statistics recomputed from a run's files alone (variants.jsonl).

Every paired comparison a study reports is a function of per-item outcomes that
variants.jsonl keeps, so a change to the statistics is applied to finished runs
without running any model: `phase_comparisons` and `noise_comparisons` rebuild the
Silent-against-Decisive comparisons (each arm against the unpruned model too) exactly
as the study computes them (`dpjax.study.statistics.compare_arms`), and
`meta_analysis` pools one comparison's difference across runs
(DerSimonian-Laird random effects, `statistics.random_effects_meta`).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from dpjax.study import statistics

Z95 = 1.959963984540054


def read_variants(run_dir: str) -> list[dict[str, Any]]:
  with open(os.path.join(run_dir, "variants.jsonl")) as f:
    return [json.loads(line) for line in f]


def _outcome(record: dict) -> np.ndarray:
  return np.array([c == "1" for c in record["correct"]], np.float64)


def _unpruned(variants: Sequence[dict]) -> np.ndarray:
  (record,) = [v for v in variants if v["method"] == "unpruned"]
  return _outcome(record)


def threshold_of(results: dict) -> float:
  """The collapse threshold: chance plus half the unpruned model's gap above it."""
  accuracy, chance = outcome(results)
  return chance + 0.5 * (accuracy - chance)


def outcome(results: dict[str, Any]) -> tuple[float, float]:
  """The unpruned model's outcome and its chance on the measure a run judges variants by:
  the final readout's accuracy, or (the generate format) the exact match of its greedy
  answers against the best constant answer's."""
  full = results["full_model"]
  generation = full.get("generation")
  if generation:
    return float(generation["exact_match"]), float(generation["chance"])
  return float(full["accuracy"][-1]), float(full["chance"])


def phase_comparisons(variants: Sequence[dict], results: dict,
                      margin: float = statistics.MARGIN) -> list[statistics.Comparison]:
  """The phase experiment's comparisons, in the order the study makes them (rules as
  they first appear, k ascending), with Holm over the run's distinct comparisons."""
  unpruned = _unpruned(variants)
  phase = [v for v in variants if v["method"] == "phase"]
  rules = list(dict.fromkeys(v["rule"] for v in phase))
  out = []
  for rule in rules:
    for k in sorted({v["k"] for v in phase if v["rule"] == rule}):
      arms = {arm: sorted((v for v in phase if v["rule"] == rule and v["k"] == k
                           and v["phase"] == arm), key=lambda v: v["seed"] or 0)
              for arm in ("silent", "decisive")}
      variants_key = tuple(tuple(tuple(sorted(b + 1 for b in v["kept"])) for v in arms[arm])
                           for arm in ("silent", "decisive"))
      out.append(statistics.compare_arms(
          rule, k, np.stack([_outcome(v) for v in arms["silent"]]),
          np.stack([_outcome(v) for v in arms["decisive"]]), unpruned=unpruned,
          margin=margin, threshold=threshold_of(results), variants=variants_key))
  return statistics.with_holm(out, margin=margin)


def noise_comparisons(variants: Sequence[dict], results: dict,
                      margin: float = statistics.MARGIN) -> list[statistics.Comparison]:
  """The noise probe's Silent-against-Decisive comparison at every level (the arms' seeds
  paired), each arm against the unpruned model, Holm over the levels."""
  unpruned = _unpruned(variants)
  noise = [v for v in variants if v["method"] == "noise" and v["phase"] in ("silent",
                                                                           "decisive")]
  out = []
  for level in sorted({v["level"] for v in noise}):
    arms = {arm: sorted((v for v in noise if v["level"] == level and v["phase"] == arm),
                        key=lambda v: v["seed"])
            for arm in ("silent", "decisive")}
    out.append(statistics.compare_arms(
        f"noise {level:g}", 0, np.stack([_outcome(v) for v in arms["silent"]]),
        np.stack([_outcome(v) for v in arms["decisive"]]), unpruned=unpruned, margin=margin,
        threshold=threshold_of(results), unit="item"))
  return statistics.with_holm(out, margin=margin)


def standard_error(c: statistics.Comparison) -> float:
  """A comparison's standard error, from its 95% interval's width (`(high - low) / 2z`)."""
  return (c.ci95[1] - c.ci95[0]) / (2 * Z95)


def meta_analysis(per_run: dict[str, list[statistics.Comparison]], rule: str,
                  k: int | str) -> dict[str, Any] | None:
  """DerSimonian-Laird random-effects pooling of the Silent-minus-Decisive difference of
  `rule` at `k` (an int, or "largest": the largest k every run has) across the runs that
  have it as a distinct comparison (not `same_as` another of the run's); None when none
  has it."""
  chosen = {}
  if k == "largest":
    shared = None
    for comparisons in per_run.values():
      ks = {c.k for c in comparisons if c.rule == rule}
      if ks:
        shared = ks if shared is None else shared & ks
    if not shared:
      return None
    k = max(shared)
  for name, comparisons in per_run.items():
    # A comparison of the same kept sets as an earlier one of its run counts once.
    found = [c for c in comparisons if c.rule == rule and c.k == k and c.same_as is None]
    if found:
      chosen[name] = found[0]
  if not chosen:
    return None
  names = sorted(chosen)
  estimates = [chosen[n].difference for n in names]
  errors = [max(standard_error(chosen[n]), 1e-9) for n in names]
  pooled = statistics.random_effects_meta(estimates, errors)
  pooled["studies"] = pooled.pop("k")
  pooled.update(rule=rule, k=k, runs=names, estimates=estimates, standard_errors=errors)
  return pooled
