"""What a study finds, as small typed records, and their one serialization to results.json.

* `FullProfile`: the unpruned model per layer (Decision Margin summaries,
  accuracy, Option Frequency, transition, phases, sharpness, per subject).
* `CurvePoint`: one pruned variant on the evaluation items.
* `MethodResult`: a pruning method's curve, its order of removal and its
  collapse point (or why it was skipped).
* `PhaseExperiment`: Silent arm against Decisive arm per selection rule.
* `NoiseProbe`: the same two phases perturbed by residual noise instead of pruned,
  per noise level, and the one-block-at-a-time profile.
* `StudyResults`: all of it, with the model, task, settings, engine counters
  and timings; `to_json()` is the content of results.json.

Blocks are numbered 1..L here (as in the report); layer 0 is `h_0`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from dpjax.study import metrics


def to_plain(value: Any) -> Any:
  """JSON-ready: arrays to lists, NaN and infinities to None, numpy scalars to Python."""
  if isinstance(value, dict):
    return {str(k): to_plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_plain(v) for v in value]
  if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
    return to_plain(np.asarray(value).tolist())
  if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
    return None
  return value


def _block_or_none(value) -> int | None:
  value = int(value)
  return None if value == metrics.NO_TRANSITION else value


@dataclasses.dataclass
class MarginSummary:
  """Mean, median and 10/90% quantiles of the Decision Margin over items, per layer."""
  mean: np.ndarray
  median: np.ndarray
  q10: np.ndarray
  q90: np.ndarray

  def to_json(self) -> dict[str, Any]:
    return {"mean": self.mean, "median": self.median, "q10": self.q10, "q90": self.q90}


@dataclasses.dataclass
class SubjectProfile:
  num_items: int
  accuracy: float
  transition_block: int | None
  transition_fraction: float | None
  mean_decision_margin: list[float]

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class FullProfile:
  """The unpruned model's per-layer profile (layers 0..L)."""
  num_layers: int
  decision_margin: dict[str, MarginSummary]
  accuracy: np.ndarray
  chance: float
  option_frequency: np.ndarray
  transition_block: int | None
  accuracy_transition_block: int | None
  sharpness_rise: float
  sharpness_block: int
  by_subject: dict[str, SubjectProfile] = dataclasses.field(default_factory=dict)
  final_accuracy_ci95: tuple[float, float] | None = None  # bootstrap over items
  exact_match: float | None = None  # open format: greedy generation against the golds
  answered: dict | None = None  # open format: `metrics.answered_profile`, and what it excludes
  # The generate format: every variant is judged by its greedy answers, not by the final
  # readout: the unpruned model's token F1 and the best constant answer's exact match.
  token_f1: float | None = None
  generation_chance: float | None = None

  @classmethod
  def from_metrics(cls, prof: metrics.Profile, num_layers: int) -> "FullProfile":
    return cls(
        num_layers=num_layers,
        decision_margin={norm: MarginSummary(*(np.asarray(x) for x in s))
                          for norm, s in prof.margin_summary.items()},
        accuracy=np.asarray(prof.accuracy), chance=float(prof.chance),
        option_frequency=np.asarray(prof.option_frequency),
        transition_block=_block_or_none(prof.transition),
        accuracy_transition_block=_block_or_none(prof.accuracy_transition),
        sharpness_rise=float(prof.sharpness.rise), sharpness_block=int(prof.sharpness.block))

  @property
  def layers(self) -> list[int]:
    return list(range(self.num_layers + 1))

  @property
  def final_accuracy(self) -> float:
    return float(self.accuracy[-1])

  @property
  def silent_phase(self) -> list[int]:
    l_star = self.transition_block
    return list(range(1, self.num_layers + 1)) if l_star is None else list(range(1, l_star))

  @property
  def decisive_phase(self) -> list[int]:
    l_star = self.transition_block
    return [] if l_star is None else list(range(l_star, self.num_layers + 1))

  @property
  def judged_by_generation(self) -> bool:
    return self.generation_chance is not None

  @property
  def outcome_name(self) -> str:
    """What a variant is judged by: the final readout's accuracy, or (the generate format)
    the exact match of its greedy answers."""
    return "exact match" if self.judged_by_generation else "accuracy"

  @property
  def outcome_accuracy(self) -> float:
    """The unpruned model's outcome on the measure variants are judged by."""
    return float(self.exact_match) if self.judged_by_generation else self.final_accuracy

  @property
  def outcome_chance(self) -> float:
    return float(self.generation_chance) if self.judged_by_generation else self.chance

  def collapse_threshold(self) -> float:
    return self.outcome_chance + 0.5 * (self.outcome_accuracy - self.outcome_chance)

  def to_json(self) -> dict[str, Any]:
    out = {
        "layers": self.layers,
        "decision_margin": {norm: s.to_json() for norm, s in self.decision_margin.items()},
        "accuracy": self.accuracy,
        "chance": self.chance,
        "option_frequency": self.option_frequency,
        "transition_block": self.transition_block,
        "accuracy_transition_block": self.accuracy_transition_block,
        "silent_phase": self.silent_phase,
        "decisive_phase": self.decisive_phase,
        "sharpness": {"rise": self.sharpness_rise, "block": self.sharpness_block},
    }
    out["by_subject"] = {name: sub.to_json() for name, sub in self.by_subject.items()}
    if self.final_accuracy_ci95 is not None:
      out["final_accuracy_ci95"] = list(self.final_accuracy_ci95)
    if self.exact_match is not None:
      out["exact_match"] = self.exact_match
    if self.answered is not None:
      out["answered"] = self.answered
    if self.judged_by_generation:
      out["generation"] = {"exact_match": self.exact_match, "token_f1": self.token_f1,
                           "chance": self.generation_chance,
                           "judged_by": "exact match of greedy generation"}
    return out


@dataclasses.dataclass
class Spread:
  """Accuracy over seeds at one curve point (the random baseline)."""
  std: float
  min: float
  max: float


@dataclasses.dataclass
class CurvePoint:
  """One variant on the evaluation items. `kept` is 1-based; an aggregate over
  seeds (the random baseline's mean curve) has no kept set, only a `spread`."""
  removed: int
  accuracy: float
  mean_final_dm: dict[str, float]
  kept: tuple[int, ...] | None = None
  nll: float | None = None
  transition_block: int | None = None
  layer_mean_dm: np.ndarray | None = None
  layer_accuracy: np.ndarray | None = None
  spread: Spread | None = None
  exact_match: float | None = None  # open format: greedy generation against the golds
  item_correct: np.ndarray | None = None  # [N] bool, per evaluation item (variants.jsonl)
  item_final_dm: np.ndarray | None = None  # [N] final Decision Margin (the study's normalization)
  token_f1: float | None = None  # generate format: the mean token F1 of its greedy answers
  item_f1: np.ndarray | None = None  # generate format: [N] each item's token F1
  answers: list[str] | None = None  # generate format, the unpruned model: its generations

  @property
  def export_keep(self) -> str:
    """0-based kept indices, as `dpjax-export --keep` takes them."""
    return ",".join(str(b - 1) for b in self.kept or ())

  def to_json(self) -> dict[str, Any]:
    if self.kept is None:
      out: dict[str, Any] = {"removed": self.removed, "accuracy": self.accuracy}
      if self.spread is not None:
        out.update(accuracy_std=self.spread.std, accuracy_min=self.spread.min,
                   accuracy_max=self.spread.max)
      out["mean_final_dm"] = dict(self.mean_final_dm)
      return out
    out = {"removed": self.removed, "kept": list(self.kept), "export_keep": self.export_keep,
           "accuracy": self.accuracy, "mean_final_dm": dict(self.mean_final_dm),
           "nll": self.nll, "transition_block": self.transition_block,
           "layer_mean_dm": self.layer_mean_dm, "layer_accuracy": self.layer_accuracy}
    if self.exact_match is not None:
      out["exact_match"] = self.exact_match
    if self.token_f1 is not None:
      out["token_f1"] = self.token_f1
    return out

  def to_state(self) -> dict[str, Any]:
    """Everything, per-item correctness included, for a run's saved state (JSON)."""
    def array(a):  # NaN as None (strict JSON); the dtype kept, so a restored point is equal
      if a is None:
        return None
      a = np.asarray(a)
      return {"dtype": a.dtype.name,
              "values": [None if math.isnan(v) else v for v in a.astype(float).tolist()]}
    return {"removed": self.removed, "accuracy": self.accuracy,
            "mean_final_dm": dict(self.mean_final_dm),
            "kept": None if self.kept is None else list(self.kept), "nll": self.nll,
            "transition_block": self.transition_block,
            "layer_mean_dm": array(self.layer_mean_dm),
            "layer_accuracy": array(self.layer_accuracy),
            "exact_match": self.exact_match,
            "item_correct": None if self.item_correct is None
                            else np.asarray(self.item_correct, int).tolist(),
            "item_final_dm": array(self.item_final_dm),
            "token_f1": self.token_f1, "item_f1": array(self.item_f1),
            **({} if self.answers is None else {"answers": list(self.answers)})}

  @classmethod
  def from_state(cls, saved: dict[str, Any]) -> "CurvePoint":
    """The inverse of `to_state` (a point with no spread)."""
    def array(saved_array):
      return None if saved_array is None else np.array(
          [np.nan if v is None else v for v in saved_array["values"]], saved_array["dtype"])
    return cls(removed=int(saved["removed"]), accuracy=float(saved["accuracy"]),
               mean_final_dm={k: float(v) for k, v in saved["mean_final_dm"].items()},
               kept=None if saved["kept"] is None else tuple(int(b) for b in saved["kept"]),
               nll=saved["nll"], transition_block=saved["transition_block"],
               layer_mean_dm=array(saved["layer_mean_dm"]),
               layer_accuracy=array(saved["layer_accuracy"]),
               exact_match=saved["exact_match"],
               item_correct=None if saved["item_correct"] is None
                            else np.asarray(saved["item_correct"], bool),
               item_final_dm=array(saved.get("item_final_dm")),
               token_f1=saved.get("token_f1"), item_f1=array(saved.get("item_f1")),
               answers=saved.get("answers"))


@dataclasses.dataclass
class MethodResult:
  """A pruning method's outcome.

  `kind`: `iterative`, `one_shot`, `phase_aware` or `decisive_only`. `order` holds what the
  method removes, as results.json names it (`criterion`, `removed_order`,
  `calibration`, `ranking`, `removed_sets`, `seeds`, `rankings`, ...).
  `per_seed_curves`: the random baseline's curve of every seed. A skipped
  method has only `skipped` and `details`.
  """
  kind: str
  curve: list[CurvePoint] = dataclasses.field(default_factory=list)
  order: dict[str, Any] = dataclasses.field(default_factory=dict)
  per_seed_curves: list[list[CurvePoint]] | None = None
  details: dict[str, Any] = dataclasses.field(default_factory=dict)
  collapse_point: int | None = None
  skipped: str | None = None

  @classmethod
  def skip(cls, kind: str, why: str, **details: Any) -> "MethodResult":
    return cls(kind=kind, skipped=why, details=details)

  def removal_order(self) -> list[int]:
    """The blocks (1-based) in the order the method removes them."""
    if "removed_order" in self.order:
      return list(self.order["removed_order"])
    if "ranking" in self.order:
      return list(self.order["ranking"][:-1])
    if "rankings" in self.order:
      return list(self.order["rankings"][0][:-1])
    order: list[int] = []
    for removed in self.order.get("removed_sets", []):  # angular: what each size adds
      order += [b for b in removed if b not in order]
    return order

  def accuracy_at(self, removed: int) -> float | None:
    for point in self.curve:
      if point.removed == removed:
        return point.accuracy
    return None

  def to_json(self) -> dict[str, Any]:
    if self.skipped is not None:
      return {"skipped": self.skipped, **self.details}
    out: dict[str, Any] = {"kind": self.kind, **self.order}
    if self.per_seed_curves is not None:
      out["per_seed_curves"] = [[p.to_json() for p in curve] for curve in self.per_seed_curves]
    out["curve"] = [p.to_json() for p in self.curve]
    out.update(self.details)
    out["collapse_point"] = self.collapse_point
    return out


def _without_points(record) -> dict[str, Any]:
  """A dataclass's fields as plain JSON, less its per-seed `points` (variants.jsonl has them)."""
  return to_plain({f.name: getattr(record, f.name) for f in dataclasses.fields(record)
                   if f.name != "points"})


@dataclasses.dataclass
class ArmPoint:
  """One arm of the phase experiment after removing `k` blocks (mean over seeds), with a
  95% bootstrap interval of the accuracy over evaluation items."""
  k: int
  removed_sets: list[list[int]]
  accuracy: float
  accuracy_std: float
  mean_final_dm: dict[str, float]
  accuracy_ci95: tuple[float, float] | None = None
  points: list[CurvePoint] = dataclasses.field(default_factory=list, repr=False)  # per seed

  def to_json(self) -> dict[str, Any]:
    return _without_points(self)


def bootstrap_ci(per_item: np.ndarray, resamples: int = 2000, seed: int = 0
                 ) -> tuple[float, float]:
  """95% percentile bootstrap interval of the mean of `per_item` `[N]` over items."""
  per_item = np.asarray(per_item, np.float64)
  rng = np.random.default_rng([seed, 95])
  means = per_item[rng.integers(len(per_item), size=(resamples, len(per_item)))].mean(1)
  low, high = np.quantile(means, [0.025, 0.975])
  return float(low), float(high)


@dataclasses.dataclass
class PhaseExperiment:
  """Silent arm against Decisive arm, per selection rule (`arms[rule][arm]`), and the
  paired comparison of the two arms at every (rule, k) (`comparisons`,
  `dpjax.study.statistics.Comparison`, Holm-adjusted over all of them)."""
  transition_block: int | None
  max_k: int = 0
  arms: dict[str, dict[str, list[ArmPoint]]] = dataclasses.field(default_factory=dict)
  num_layers: int = 0
  skipped: str | None = None
  comparisons: list = dataclasses.field(default_factory=list)
  sizing: str = "count"

  def to_json(self) -> dict[str, Any]:
    if self.skipped is not None:
      return {"skipped": self.skipped, "transition_block": self.transition_block}
    l_star = self.transition_block
    return {"transition_block": l_star, "silent_phase": list(range(1, l_star)),
            "decisive_phase": list(range(l_star, self.num_layers + 1)), "max_k": self.max_k,
            "sizing": self.sizing,
            "selections": {rule: {arm: [p.to_json() for p in points]
                                  for arm, points in arms.items()}
                           for rule, arms in self.arms.items()},
            "comparisons": [c.to_json() for c in self.comparisons]}


@dataclasses.dataclass
class NoiseArm:
  """One arm of the noise probe (noise after every block of one phase, every block kept)
  at one level `eps^2`: the mean accuracy over seeds, its spread over seeds, a 95%
  bootstrap interval over evaluation items of the per-item mean over seeds, and the mean
  final DM under both normalizations."""
  level: float
  accuracy: float
  accuracy_std: float
  seed_accuracies: list[float]
  mean_final_dm: dict[str, float]
  accuracy_ci95: tuple[float, float] | None = None
  points: list[CurvePoint] = dataclasses.field(default_factory=list, repr=False)  # per seed

  def to_json(self) -> dict[str, Any]:
    return _without_points(self)


@dataclasses.dataclass
class NoiseProbe:
  """The noise probe (the paper's Section 4.3.1): Gaussian noise
  `eps * sigma(h) * N(0, I)` added to the residual stream after every block of the
  Silent Phase (`arms["silent"]`) or of the Decisive Phase (`arms["decisive"]`), one
  `NoiseArm` per level `eps^2`, every block kept; the arms compared paired at every level
  (`comparisons`, `dpjax.study.statistics.Comparison`, Holm-adjusted over the levels);
  and the profile: noise after one block at a time, `profile_points[(block, level)]`
  (1-based block) one point per profile seed (empty when `profile_seeds` is 0).
  `transition_block` is `l*` on the calibration items; blocks are 1-based."""
  transition_block: int | None
  num_layers: int = 0
  levels: tuple[float, ...] = ()
  seeds: list[int] = dataclasses.field(default_factory=list)
  profile_seeds: list[int] = dataclasses.field(default_factory=list)
  arms: dict[str, list[NoiseArm]] = dataclasses.field(default_factory=dict)
  profile_points: dict[tuple[int, float], list[CurvePoint]] = dataclasses.field(
      default_factory=dict, repr=False)
  comparisons: list = dataclasses.field(default_factory=list)
  skipped: str | None = None

  @property
  def silent_phase(self) -> list[int]:
    return list(range(1, self.transition_block))

  @property
  def decisive_phase(self) -> list[int]:
    return list(range(self.transition_block, self.num_layers + 1))

  def profile_grid(self, normalization: str | None = None) -> np.ndarray:
    """`[L, levels]`: the profile's accuracy (or, given a `normalization`, its mean final
    DM) with noise after block `1 + row` at level `levels[column]`, the mean over the
    profile's seeds; NaN everywhere when there is no profile."""
    grid = np.full((self.num_layers, len(self.levels)), np.nan)
    for (block, level), points in self.profile_points.items():
      values = [p.accuracy if normalization is None else p.mean_final_dm[normalization]
                for p in points]
      grid[block - 1, list(self.levels).index(level)] = np.mean(values)
    return grid

  def to_json(self) -> dict[str, Any]:
    if self.skipped is not None:
      return {"skipped": self.skipped, "transition_block": self.transition_block}
    out: dict[str, Any] = {
        "transition_block": self.transition_block, "silent_phase": self.silent_phase,
        "decisive_phase": self.decisive_phase, "levels": list(self.levels),
        "seeds": self.seeds, "noise": "h + eps * sigma(h) * N(0, I) after a block; level = "
        "eps^2; sigma(h) the residual's standard deviation over the hidden dimension",
        "arms": {arm: [a.to_json() for a in arm_levels] for arm, arm_levels in self.arms.items()},
        "comparisons": [c.to_json() for c in self.comparisons]}
    if self.profile_points:
      out["profile"] = {"seeds": self.profile_seeds, "blocks": list(range(1, self.num_layers + 1)),
                        "levels": list(self.levels), "accuracy": self.profile_grid(),
                        "mean_final_dm_vocab": self.profile_grid("vocab")}
    return to_plain(out)


def variant_records(results: "StudyResults") -> list[dict[str, Any]]:
  """One record per evaluated variant, per-item outcomes included (variants.jsonl): the
  unpruned model, every curve point of every method (the random baseline's per seed),
  every phase arm at every k and seed, every noise-probe variant. `kept` is 0-based;
  `correct` holds one "0"/"1" per evaluation item in items.jsonl order; `final_dm` each
  item's final Decision Margin (the study's normalization), to 4 decimals. In the
  generate format `correct` is each item's exact match of the variant's greedy answer
  (the final Decision Margin is still the first answer token's) and `f1` its token F1,
  to 4 decimals. A noise-probe
  record (method "noise", k 0: every block kept) adds `level` (`eps^2`) and
  `noised_blocks` (0-based, as `kept`); its `phase` is "silent" or "decisive" for an
  arm, and the noised block's number (1-based, as results.json numbers blocks) for the
  profile; `seed` is the noise seed."""
  records: list[dict[str, Any]] = []

  def add(point: CurvePoint, method: str, rule=None, phase=None, k=None, seed=None,
          **extra) -> None:
    if point.kept is None or point.item_correct is None:
      return
    dm = point.item_final_dm
    records.append({
        "method": method, "rule": rule, "phase": phase, "k": k, "seed": seed, **extra,
        "kept": [b - 1 for b in point.kept],
        "correct": "".join("1" if c else "0" for c in np.asarray(point.item_correct, bool)),
        "final_dm": None if dm is None else [round(float(x), 4) for x in np.asarray(dm)],
        **({} if point.item_f1 is None
           else {"f1": [round(float(x), 4) for x in np.asarray(point.item_f1)]})})

  curves = results.curves()
  first = next((m.curve[0] for m in curves.values() if m.curve), results.unpruned_point)
  if first is not None:
    add(first, "unpruned", k=0)
  for name, method in curves.items():
    if method.per_seed_curves is not None:
      for seed, curve in zip(method.order.get("seeds", []), method.per_seed_curves):
        for point in curve[1:]:
          add(point, name, k=point.removed, seed=seed)
    else:
      for point in method.curve[1:]:
        add(point, name, k=point.removed)
  phase = results.phase_experiment
  if phase is not None and phase.skipped is None:
    for rule, arms in phase.arms.items():
      for arm, arm_points in arms.items():
        for arm_point in arm_points:
          for seed, point in enumerate(arm_point.points):
            add(point, "phase", rule=rule, phase=arm, k=arm_point.k,
                seed=seed if rule == "random" else None)
  noise = results.noise_probe
  if noise is not None and noise.skipped is None:
    zero_based = lambda blocks: [b - 1 for b in blocks]
    for arm, arm_levels in noise.arms.items():
      blocks = zero_based(noise.silent_phase if arm == "silent" else noise.decisive_phase)
      for arm_level in arm_levels:
        for seed, point in zip(noise.seeds, arm_level.points):
          add(point, "noise", phase=arm, k=0, seed=seed, level=arm_level.level,
              noised_blocks=blocks)
    for (block, level), points in noise.profile_points.items():
      for seed, point in zip(noise.profile_seeds, points):
        add(point, "noise", phase=block, k=0, seed=seed, level=level, noised_blocks=[block - 1])
  return records


@dataclasses.dataclass
class EngineCounters:
  """What the engine did: XLA compilations and persistent-cache hits (apart: a second
  identical run compiles nothing), and block evaluations."""
  xla_compilations: int
  cache_hits: int
  block_evaluations_executed: int
  block_evaluations_minimum: int
  block_evaluations_naive: int
  candidates_stopped_early: int
  fit: dict[str, Any] | None = None  # the chunking chosen and each program's memory

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass
class StudyResults:
  """Everything a study writes to results.json."""
  model: dict[str, Any]
  task: dict[str, Any]
  settings: dict[str, Any]
  full_model: FullProfile
  methods: dict[str, MethodResult] = dataclasses.field(default_factory=dict)
  timings: dict[str, float] = dataclasses.field(default_factory=dict)
  calibration_transition_block: int | None = None
  calibration_transition: dict[str, Any] | None = None  # l* with intervals, every rule
  block_influence: np.ndarray | None = None
  phase_experiment: PhaseExperiment | None = None
  noise_probe: NoiseProbe | None = None
  engine: EngineCounters | None = None
  ran_methods: bool = False
  lens: dict[str, Any] = dataclasses.field(default_factory=lambda: {"kind": "logit"})
  full_model_logit_lens: FullProfile | None = None  # beside a tuned-lens profile
  # The unpruned model's per-item outcomes, from the full-model readout (variants.jsonl's
  # unpruned record when no curve starts with it, e.g. a phase-only study).
  unpruned_point: CurvePoint | None = None

  @property
  def num_layers(self) -> int:
    return self.full_model.num_layers

  def curves(self) -> dict[str, MethodResult]:
    """The methods that produced a pruning curve (skipped ones left out)."""
    return {name: m for name, m in self.methods.items() if m.skipped is None}

  def to_json(self) -> dict[str, Any]:
    """The content of results.json (plain JSON types, NaN as null)."""
    out: dict[str, Any] = {
        "model": self.model, "task": self.task, "settings": self.settings,
        "lens": self.lens,
        "full_model": self.full_model.to_json(),
        "methods": {name: m.to_json() for name, m in self.methods.items()},
        "timings": self.timings,
    }
    if self.full_model_logit_lens is not None:
      out["full_model_logit_lens"] = self.full_model_logit_lens.to_json()
    if self.ran_methods:
      out["calibration_transition_block"] = self.calibration_transition_block
      if self.calibration_transition is not None:
        out["calibration_transition"] = self.calibration_transition
      if self.block_influence is not None:
        out["block_influence"] = self.block_influence
      if self.phase_experiment is not None:
        out["phase_experiment"] = self.phase_experiment.to_json()
      if self.noise_probe is not None:
        out["noise_probe"] = self.noise_probe.to_json()
      if self.engine is not None:
        out["engine"] = self.engine.to_json()
    return to_plain(out)
