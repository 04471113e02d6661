"""The study on one model and task, from settings to the report on disk.

`run(settings)`:

1. loads the model and task and splits the items into calibration and
   evaluation sets (disjoint, by a seeded shuffle);
2. reads out every layer of the unpruned model (evaluation items: the reported
   profile; calibration items: the transition the phase methods use);
3. runs the pruning methods asked for: Iterative Pruning (per criterion), the
   one-shot baselines, the phase-targeted experiment and the phase-aware method,
   each method's masks evaluated on the evaluation items by the sweep;
4. writes the report (see `dpjax.report`).

Long methods save their state after every step (`dpjax.resume`); rerunning the
same command continues after a kill and ends with identical results.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from typing import Any, Sequence

import numpy as np

from dpjax import metrics, pruning, report, resume, tasks
from dpjax.distributed import Placement, is_main_process
from dpjax.load import load_model
from dpjax.readout import Readout
from dpjax.sweep import FinalStats, Sweep

METHODS = ("iterative", "block_influence", "angular", "single_layer", "reverse", "random",
           "phase", "phase_aware")
STATE_DIR = "state"


@dataclasses.dataclass(frozen=True)
class Settings:
  model: str
  task: str = "synthetic"
  split: str = "test"
  fewshot_split: str = "dev"
  k_shot: int = 0
  num_items: int = 0          # evaluation items (0: every item left after calibration)
  calibration_items: int = 0  # 0: no pruning methods need them
  calibration_seed: int = 0
  seed: int = 0
  batch_size: int = 16
  normalization: str = "vocab"
  transition_tau: float = 0.0
  transition_rule: str = "margin"
  accuracy_delta: float = 0.1
  truncation: str = "refuse"
  add_special_tokens: bool = False
  max_length: int = 0
  dtype: str | None = None
  compute_dtype: str | None = None
  methods: tuple[str, ...] = ()
  criteria: tuple[str, ...] = ("accuracy",)
  min_layers: int = 1
  random_seeds: int = 3
  phase_selections: tuple[str, ...] = pruning.PHASE_SELECTIONS
  phase_max_k: int = 0
  mask_chunk: int = 16
  output_dir: str = "dpjax_out"
  progress: bool = True
  model_axis: int = 1
  restart: bool = False

  def __post_init__(self):
    if self.normalization not in metrics.NORMALIZATIONS:
      raise ValueError(f"normalization={self.normalization!r}; use one of {metrics.NORMALIZATIONS}.")
    if self.transition_rule not in ("margin", "accuracy"):
      raise ValueError(f"transition_rule={self.transition_rule!r}; use 'margin' or 'accuracy'.")
    if self.k_shot < 0 or self.num_items < 0 or self.calibration_items < 0 or self.batch_size < 1:
      raise ValueError(f"k_shot={self.k_shot}, num_items={self.num_items}, calibration_items="
                       f"{self.calibration_items} must be >= 0 and batch_size={self.batch_size} "
                       ">= 1.")
    unknown = sorted(set(self.methods) - set(METHODS))
    if unknown:
      raise ValueError(f"unknown methods {unknown}; choose from {METHODS}.")
    bad = sorted(set(self.criteria) - set(pruning.CRITERIA))
    if bad or not self.criteria:
      raise ValueError(f"criteria {list(self.criteria)} must be some of {pruning.CRITERIA}.")
    bad = sorted(set(self.phase_selections) - set(pruning.PHASE_SELECTIONS))
    if bad:
      raise ValueError(f"phase selections {bad} must be some of {pruning.PHASE_SELECTIONS}.")
    if self.methods and self.calibration_items < 1:
      raise ValueError("the pruning methods need calibration items; set calibration_items >= 1.")
    if self.min_layers < 1:
      raise ValueError(f"min_layers={self.min_layers} must be at least 1.")
    if self.random_seeds < 1:
      raise ValueError(f"random_seeds={self.random_seeds} must be at least 1.")

  def fingerprint(self) -> dict[str, Any]:
    """The settings that can change a result (resuming requires them equal)."""
    ignore = {"output_dir", "progress", "model_axis", "restart", "methods", "mask_chunk"}
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in ignore}


@dataclasses.dataclass
class Context:
  """What every stage of the study shares."""
  settings: Settings
  model: Any
  tokenizer: Any
  evaluation: tasks.EncodedTask
  calibration: tasks.EncodedTask | None
  pad_id: int
  placement: Placement | None
  eval_sweep: Sweep
  cal_sweep: Sweep | None
  unpruned: dict[str, Any] | None = None  # the unpruned model's curve point, once computed

  @property
  def num_layers(self) -> int:
    return self.model.num_layers


def _tokenizer(model) -> Any:
  import transformers
  try:
    return transformers.AutoTokenizer.from_pretrained(model.source_dir)
  except Exception as e:
    raise ValueError(f"the model at {model.source_dir} has no usable tokenizer files ({e}); "
                     "dpjax needs the checkpoint's tokenizer to build prompts.") from e


def _split_items(items: list[tasks.Item], s: Settings) -> tuple[list, list]:
  """Disjoint (calibration, evaluation) item lists by a seeded shuffle."""
  if not s.calibration_items:
    return [], (items[:s.num_items] if s.num_items else items)
  order = np.random.default_rng([s.calibration_seed, 31337]).permutation(len(items))
  needed = s.calibration_items + s.num_items
  if len(items) < needed or len(items) <= s.calibration_items:
    raise ValueError(f"the task has {len(items)} items in split {s.split!r}, too few for "
                     f"{s.calibration_items} calibration items plus {s.num_items or 'some'} "
                     "evaluation items; lower --calibration_items or --num_items.")
  calibration = [items[i] for i in order[:s.calibration_items]]
  rest = [items[i] for i in order[s.calibration_items:]]
  return calibration, (rest[:s.num_items] if s.num_items else rest)


def prepare(settings: Settings, placement: Placement | None = None) -> Context:
  s = settings
  model = load_model(s.model, dtype=s.dtype, compute_dtype=s.compute_dtype)
  if placement is not None:
    placement.check_batch_size(s.batch_size)
    model.place(placement)
  tokenizer = _tokenizer(model)
  total = s.num_items + s.calibration_items if s.num_items else 0
  if s.task == "synthetic" and not total:
    total = 400 + s.calibration_items
  items = tasks.load_task(s.task, s.split, num_items=total, seed=s.seed)
  if not items:
    raise ValueError(f"task {s.task!r} split {s.split!r} has no items.")
  calibration, evaluation = _split_items(items, s)
  dev = []
  if s.k_shot:
    dev = tasks.load_task(s.task, s.fewshot_split, seed=s.seed,
                          num_items=200 if s.task == "synthetic" else 0)
  max_length = s.max_length or model.config.max_position_embeddings

  def encode(chosen):
    if not chosen:
      return None
    shots = tasks.shots_for(chosen, dev, s.k_shot)
    prompts = [tasks.prompt(item, sh) for item, sh in zip(chosen, shots)]
    return tasks.encode(tokenizer, chosen, prompts, max_length=max_length, truncation=s.truncation,
                        add_special_tokens=s.add_special_tokens)

  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  encoded_eval, encoded_cal = encode(evaluation), encode(calibration)
  sweep = lambda enc: Sweep(model, enc, batch_size=s.batch_size, pad_id=pad_id,
                            mask_chunk=s.mask_chunk, progress=s.progress, placement=placement)
  return Context(s, model, tokenizer, encoded_eval, encoded_cal, pad_id, placement,
                 sweep(encoded_eval), sweep(encoded_cal) if encoded_cal else None)


def _profile(readout: Readout, encoded: tasks.EncodedTask, s: Settings) -> metrics.Profile:
  prof = metrics.profile(readout.option_logits, readout.log_normalizer, encoded.answer,
                         encoded.num_options, normalization=s.normalization,
                         tau=s.transition_tau, delta=s.accuracy_delta)
  if s.transition_rule == "accuracy":
    prof = prof._replace(transition=prof.accuracy_transition)
  return prof


def subject_profiles(readout: Readout, encoded: tasks.EncodedTask,
                     s: Settings) -> dict[str, dict[str, Any]]:
  """Per subject (task family): items, final accuracy, transition block and its fraction of
  depth, from the same readouts as the whole profile."""
  subjects = np.array([item.subject for item in encoded.items])
  num_layers = readout.option_logits.shape[0] - 1
  out = {}
  for subject in sorted(set(subjects)):
    rows = np.flatnonzero(subjects == subject)
    part = Readout(readout.option_logits[:, rows], readout.log_normalizer[:, rows])
    prof = _profile(part, encoded.subset(rows), s)
    l_star = int(prof.transition)
    l_star = None if l_star == metrics.NO_TRANSITION else l_star
    out[str(subject)] = {
        "num_items": len(rows), "accuracy": float(prof.accuracy[-1]),
        "transition_block": l_star,
        "transition_fraction": None if l_star is None else l_star / num_layers,
        "mean_decision_margin": [float(x) for x in prof.margin_summary[s.normalization].mean]}
  return out


def full_profile(ctx: Context, encoded: tasks.EncodedTask | None = None,
                 sweep: Sweep | None = None) -> tuple[Readout, metrics.Profile]:
  """Readouts and metrics of the unpruned model (default: on the evaluation items)."""
  encoded = encoded or ctx.evaluation
  sweep = sweep or ctx.eval_sweep
  readout = sweep.readouts(np.ones((1, ctx.num_layers), bool), description="full-model readout")
  one = Readout(readout.option_logits[0], readout.log_normalizer[0])
  return one, _profile(one, encoded, ctx.settings)


# ----------------------------------------------------------------------------
# Curves: masks -> evaluation-set points.


def curve(ctx: Context, masks: np.ndarray, description: str) -> list[dict[str, Any]]:
  """One point per mask: kept blocks (1-based), final accuracy, DM, NLL, per-layer profile."""
  masks = np.asarray(masks, bool)
  readout = ctx.eval_sweep.readouts(masks, description=description)
  prof = _profile(readout, ctx.evaluation, ctx.settings)
  points = []
  enc = ctx.evaluation
  for m, mask in enumerate(masks):
    last = int(np.flatnonzero(mask)[-1]) + 1  # the final readout's layer
    z = readout.option_logits[m, last]
    lse = readout.log_normalizer[m, last]
    nll = float(np.mean(lse - z[np.arange(len(enc.answer)), enc.answer]))
    kept = [int(b) + 1 for b in np.flatnonzero(mask)]
    points.append({
        "removed": int((~mask).sum()),
        "kept": kept,
        "export_keep": ",".join(str(b - 1) for b in kept),
        "accuracy": float(prof.accuracy[m, last]),
        "mean_final_dm": {norm: float(prof.margin_summary[norm].mean[m, last])
                          for norm in metrics.NORMALIZATIONS},
        "nll": nll,
        "transition_block": (None if int(prof.transition[m]) == metrics.NO_TRANSITION
                             else int(prof.transition[m])),
        "layer_mean_dm": prof.margin_summary[ctx.settings.normalization].mean[m],
        "layer_accuracy": prof.accuracy[m],
    })
  return points


def _with_collapse(result: dict[str, Any], full: dict[str, Any], chance: float) -> dict[str, Any]:
  points = result["curve"]
  result["collapse_point"] = pruning.collapse_point(
      [p["removed"] for p in points], [p["accuracy"] for p in points], full["accuracy"], chance)
  return result


def _unpruned_point(ctx: Context) -> dict[str, Any]:
  """Every curve starts here (evaluated once per study)."""
  if ctx.unpruned is None:
    ctx.unpruned = curve(ctx, np.ones((1, ctx.num_layers), bool), "unpruned")[0]
  return ctx.unpruned


# ----------------------------------------------------------------------------
# Methods.


def _stats_json(stats: FinalStats) -> dict[str, float]:
  n = max(int(stats.items), 1)
  return {"accuracy": stats.correct / n, "mean_final_dm_vocab": stats.margin_sum / n,
          "nll": stats.nll_sum / n}


def run_iterative(ctx: Context, state: resume.RunState, criterion: str, name: str,
                  allowed=None) -> dict[str, Any]:
  """Iterative Pruning, resumable step by step; the curve on the evaluation items."""
  saved = state.load(name) or {"removed": [], "calibration": [], "done": False}
  if not saved["done"]:
    removed, calibration = list(saved["removed"]), list(saved["calibration"])

    def on_step(block, kept, stats):
      removed.append(block)
      calibration.append(_stats_json(stats))
      state.save(name, len(removed), {"removed": removed, "calibration": calibration,
                                      "done": False})
      if is_main_process():
        print(f"{name}: step {len(removed)}: removed block {block + 1}, {len(kept)} left, "
              f"calibration accuracy {calibration[-1]['accuracy']:.3f} (state saved)", flush=True)

    pruning.iterative_prune(ctx.cal_sweep, criterion=criterion,
                            min_layers=ctx.settings.min_layers, done=removed, allowed=allowed,
                            on_step=on_step)
    saved = {"removed": removed, "calibration": calibration, "done": True}
    state.save(name, len(removed) + 1, saved)
  removed = [int(b) for b in saved["removed"]]
  masks = np.ones((len(removed), ctx.num_layers), bool)
  for n in range(len(removed)):
    masks[n, removed[:n + 1]] = False
  return {"kind": "iterative", "criterion": criterion,
          "removed_order": [b + 1 for b in removed], "calibration": saved["calibration"],
          "curve": [_unpruned_point(ctx)] + curve(ctx, masks, name)}


def influence_and_angles(ctx: Context) -> tuple[np.ndarray, np.ndarray]:
  """Block influence `[L]` (all calibration tokens) and angular distances
  `[L+1, L+1]` (answer positions) of the unpruned model."""
  answer_states = []

  def hidden():
    for batch in ctx.cal_sweep.batches:
      states = np.asarray(ctx.model.hidden_states(batch.input_ids,
                                                  attention_mask=batch.attention_mask))
      rows = batch.index >= 0
      answer_states.append(states[:, rows, -1])
      yield states[:, rows], batch.attention_mask[rows]

  influence = pruning.block_influence(hidden())
  return influence, pruning.angular_distances(np.concatenate(answer_states, axis=1))


def run_one_shot(ctx: Context, name: str, ranking: Sequence[int]) -> dict[str, Any]:
  masks = pruning.masks_from_ranking(ranking, ctx.num_layers)
  return {"kind": "one_shot", "ranking": [b + 1 for b in ranking],
          "curve": [_unpruned_point(ctx)] + curve(ctx, masks, name)}


def run_angular(ctx: Context, distances: np.ndarray) -> dict[str, Any]:
  blocks = [pruning.angular_blocks(distances, n) for n in range(1, ctx.num_layers)]
  masks = np.ones((len(blocks), ctx.num_layers), bool)
  for m, removed in enumerate(blocks):
    masks[m, removed] = False
  return {"kind": "one_shot", "removed_sets": [[b + 1 for b in r] for r in blocks],
          "curve": [_unpruned_point(ctx)] + curve(ctx, masks, "angular")}


def run_random(ctx: Context) -> dict[str, Any]:
  seeds = list(range(ctx.settings.random_seeds))
  rankings = [pruning.random_ranking(ctx.num_layers, seed) for seed in seeds]
  masks = np.concatenate([pruning.masks_from_ranking(r, ctx.num_layers) for r in rankings])
  points = curve(ctx, masks, "random")
  per_seed = [points[i * (ctx.num_layers - 1):(i + 1) * (ctx.num_layers - 1)]
              for i in range(len(seeds))]
  unpruned = _unpruned_point(ctx)
  mean_curve = [unpruned]
  for n in range(ctx.num_layers - 1):
    accs = [seed_points[n]["accuracy"] for seed_points in per_seed]
    dms = [seed_points[n]["mean_final_dm"]["vocab"] for seed_points in per_seed]
    mean_curve.append({"removed": n + 1, "accuracy": float(np.mean(accs)),
                       "accuracy_std": float(np.std(accs)), "accuracy_min": float(np.min(accs)),
                       "accuracy_max": float(np.max(accs)),
                       "mean_final_dm": {"vocab": float(np.mean(dms))}})
  return {"kind": "one_shot", "seeds": seeds, "rankings": [[b + 1 for b in r] for r in rankings],
          "per_seed_curves": [[unpruned] + p for p in per_seed], "curve": mean_curve}


def run_phase_experiment(ctx: Context, l_star: int | None, influence: np.ndarray) -> dict[str, Any]:
  s = ctx.settings
  L = ctx.num_layers
  if l_star is None or l_star <= 1:
    why = ("the unpruned model has no transition" if l_star is None
           else "the Silent Phase is empty (transition at block 1)")
    return {"skipped": why, "transition_block": l_star}
  silent_size, decisive_size = l_star - 1, L - l_star + 1
  max_k = min(silent_size, decisive_size)
  if s.phase_max_k:
    max_k = min(max_k, s.phase_max_k)
  out = {"transition_block": l_star, "silent_phase": list(range(1, l_star)),
         "decisive_phase": list(range(l_star, L + 1)), "max_k": max_k, "selections": {}}
  for selection in s.phase_selections:
    seeds = list(range(s.random_seeds)) if selection == "random" else [0]
    arms = {"silent": [], "decisive": []}
    masks, where = [], []
    for seed in seeds:
      orders = pruning.phase_removals(l_star, L, selection, influence, seed)
      for arm, order in orders.items():
        for k in range(1, max_k + 1):
          mask = np.ones(L, bool)
          mask[order[:k]] = False
          masks.append(mask)
          where.append((arm, k, seed))
    points = curve(ctx, np.array(masks), f"phase {selection}")
    for arm in arms:
      for k in range(1, max_k + 1):
        chosen = [p for p, (a, kk, _) in zip(points, where) if a == arm and kk == k]
        accs = [p["accuracy"] for p in chosen]
        arms[arm].append({
            "k": k, "removed_sets": [[b for b in range(1, L + 1) if b not in p["kept"]]
                                     for p in chosen],
            "accuracy": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
            "mean_final_dm": {norm: float(np.mean([p["mean_final_dm"][norm] for p in chosen]))
                              for norm in metrics.NORMALIZATIONS}})
    out["selections"][selection] = arms
  return out


def run_phase_aware(ctx: Context, state: resume.RunState, l_star: int | None) -> dict[str, Any]:
  """Prune inside the Decisive Phase only (most redundant first) until it is
  exhausted, then go on greedily over every block to show what happens next."""
  if l_star is None:
    return {"skipped": "the unpruned model has no transition", "transition_block": None}
  decisive = set(range(l_star - 1, ctx.num_layers))
  criterion = ctx.settings.criteria[0]

  def allowed(kept):
    inside = [b for b in kept if b in decisive]
    return inside or kept

  result = run_iterative(ctx, state, criterion, "phase_aware", allowed=allowed)
  result["kind"] = "phase_aware"
  result["transition_block"] = l_star
  # Steps after which no Decisive-Phase block is left (None: pruning stopped first).
  reachable = len(decisive) <= ctx.num_layers - ctx.settings.min_layers
  result["decisive_exhausted_at"] = len(decisive) if reachable else None
  return result


# ----------------------------------------------------------------------------
# The whole study.


def run(settings: Settings, placement: Placement | None = None) -> dict[str, Any]:
  """The whole study; returns what it wrote to `results.json`."""
  s = settings
  timings: dict[str, float] = {}
  clock = time.perf_counter()
  ctx = prepare(s, placement)
  timings["prepare_seconds"] = time.perf_counter() - clock
  # Checked before anything is written, so a bad flag leaves no output behind.
  if s.methods and not 1 <= s.min_layers <= ctx.num_layers:
    raise ValueError(f"min_layers={s.min_layers} must be between 1 and the model's "
                     f"{ctx.num_layers} blocks.")
  out = s.output_dir
  main = is_main_process()
  if main:
    os.makedirs(out, exist_ok=True)
  state_dir = os.path.join(out, STATE_DIR)
  if s.restart and main and os.path.isdir(state_dir):
    shutil.rmtree(state_dir)
  state = resume.RunState(state_dir, s.fingerprint(), write=main) if s.methods else None

  clock = time.perf_counter()
  readout, prof = full_profile(ctx)
  timings["full_profile_seconds"] = time.perf_counter() - clock
  L = ctx.num_layers
  full = report.profile_json(prof, L)
  full["by_subject"] = subject_profiles(readout, ctx.evaluation, s)
  cfg = ctx.model.config
  results: dict[str, Any] = {
      "model": {"path": s.model, "architecture": cfg.architecture, "num_layers": L,
                "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
                "param_dtype": cfg.param_dtype, "compute_dtype": str(ctx.model.compute_dtype)},
      "task": {"spec": s.task, "split": s.split, "k_shot": s.k_shot,
               "num_items": len(ctx.evaluation.items),
               "num_calibration_items": len(ctx.calibration.items) if ctx.calibration else 0,
               "num_options": ctx.evaluation.num_options.tolist(),
               "subjects": sorted({it.subject for it in ctx.evaluation.items}),
               "left_truncated_items": int(ctx.evaluation.truncated.sum())},
      "settings": dataclasses.asdict(s),
      "full_model": full,
      "methods": {},
      "timings": timings,
  }

  if s.methods:
    clock = time.perf_counter()
    _, cal_prof = full_profile(ctx, ctx.calibration, ctx.cal_sweep)
    l_star = int(cal_prof.transition)
    l_star = None if l_star == metrics.NO_TRANSITION else l_star
    results["calibration_transition_block"] = l_star
    unpruned_accuracy = full["accuracy"][-1]
    chance = full["chance"]
    full_point = {"accuracy": unpruned_accuracy}
    influence = distances = None
    if {"block_influence", "angular", "phase"} & set(s.methods):
      influence, distances = influence_and_angles(ctx)
      results["block_influence"] = influence

    for method in s.methods:
      started = time.perf_counter()
      if method == "iterative":
        for criterion in s.criteria:
          name = f"iterative_{criterion}"
          results["methods"][name] = _with_collapse(
              run_iterative(ctx, state, criterion, name), full_point, chance)
      elif method == "block_influence":
        results["methods"][method] = _with_collapse(
            run_one_shot(ctx, method, pruning.block_influence_ranking(influence)), full_point,
            chance)
      elif method == "angular":
        results["methods"][method] = _with_collapse(run_angular(ctx, distances), full_point,
                                                    chance)
      elif method == "single_layer":
        drop = ctx.cal_sweep.drop_one(list(range(L)))
        results["methods"][method] = _with_collapse(
            run_one_shot(ctx, method, pruning.single_layer_ranking(drop)), full_point, chance)
      elif method == "reverse":
        results["methods"][method] = _with_collapse(
            run_one_shot(ctx, method, pruning.reverse_ranking(L)), full_point, chance)
      elif method == "random":
        results["methods"][method] = _with_collapse(run_random(ctx), full_point, chance)
      elif method == "phase":
        results["phase_experiment"] = run_phase_experiment(ctx, l_star, influence)
      elif method == "phase_aware":
        aware = run_phase_aware(ctx, state, l_star)
        results["methods"]["phase_aware"] = (aware if "skipped" in aware
                                             else _with_collapse(aware, full_point, chance))
      timings[f"{method}_seconds"] = time.perf_counter() - started
    timings["methods_seconds"] = time.perf_counter() - clock
    counters = ctx.eval_sweep.counters, ctx.cal_sweep.counters
    results["engine"] = {
        "compiled_programs": ctx.eval_sweep.compile_count() + ctx.cal_sweep.compile_count(),
        "block_evaluations_executed": sum(c.executed for c in counters),
        "block_evaluations_minimum": sum(c.minimum for c in counters),
        "block_evaluations_naive": sum(c.naive for c in counters),
        "candidates_stopped_early": sum(c.stopped_early for c in counters),
    }

  if main:
    report.write_study(out, results, readout, prof, ctx.evaluation, s)
  return results
