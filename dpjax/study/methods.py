"""The study's pruning methods, as a registry: each proposes masks, the sweep evaluates them.

Every method is a function of the study's `Context` that adds its results to
a `StudyResults`: one `MethodResult` per curve (Iterative Pruning adds one per
criterion) or, for `phase`, the `PhaseExperiment` and, for `noise`, the
`NoiseProbe`. `METHODS` maps the names
`--methods` takes to those functions, in the order a study runs them; the
collapse point of every curve is added afterwards, in one place
(`study.run`). Masks are evaluated on the evaluation items; blocks are chosen
on the calibration items.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from typing import TYPE_CHECKING, Any, Callable, Sequence

import jax
import numpy as np

from dpjax import tasks
from dpjax.study import metrics
from dpjax.study import pruning
from dpjax.engine import resume
from dpjax.serve import server as serve
from dpjax.study import statistics
from dpjax.tasks import scoring
from dpjax.engine.devices import Placement, is_main_process
from dpjax.engine.progress import Progress
from dpjax.lens.readout import Readout
from dpjax.study.results import (ArmPoint, CurvePoint, MethodResult, NoiseArm, NoiseProbe,
                                 PhaseExperiment, Spread, StudyResults, bootstrap_ci)
from dpjax.engine import noise as noise_engine
from dpjax.engine.sweep import FinalStats, Sweep

if TYPE_CHECKING:  # the settings import this module for its method names
  from dpjax.study.settings import Settings


@dataclasses.dataclass
class Context:
  """What every method shares: the model, the item sets and their sweeps, the saved state."""
  settings: Settings
  model: Any
  tokenizer: Any
  evaluation: tasks.EncodedTask
  calibration: tasks.EncodedTask | None
  pad_id: int
  placement: Placement | None
  eval_sweep: Sweep
  cal_sweep: Sweep | None
  split: str = ""
  fewshot_split: str | None = None
  state: resume.RunState | None = None
  calibration_transition: int | None = None  # l* of the unpruned model, calibration items
  lens_record: dict[str, Any] | None = None  # the tuned lens's, when one is used
  logit_eval_sweep: Sweep | None = None      # the logit lens beside a tuned one
  fit: Any = None                            # the chunking the fit step chose (`dpjax.engine.fit`)
  transition_items: tasks.EncodedTask | None = None  # the calibration items l* is read on
  transition_sweep: Sweep | None = None
  make_sweep: Callable[[tasks.EncodedTask], Sweep] | None = None  # another item set's

  @property
  def num_layers(self) -> int:
    return self.model.num_layers

  @functools.cached_property
  def unpruned_point(self) -> CurvePoint:
    """Every curve starts here (evaluated once per study)."""
    return curve(self, np.ones((1, self.num_layers), bool), "unpruned",
                 with_exact_match=self.settings.format == "open")[0]

  @functools.cached_property
  def influence_and_angles(self) -> tuple[np.ndarray, np.ndarray]:
    """Block influence `[L]` (every calibration token) and angular distances `[L+1, L+1]`
    (answer positions) of the unpruned model; a run with saved state keeps them."""
    saved = self.state.load("influence_and_angles") if self.state is not None else None
    if saved is not None:
      return (np.asarray(saved["influence"], np.float64),
              np.asarray(saved["angles"], np.float64))
    answer_states = []

    def hidden():
      for batch in self.cal_sweep.batches:
        batch = batch.unshared()  # whole prompts: every token counts, shots included
        states = np.asarray(self.model.hidden_states(batch.input_ids,
                                                     attention_mask=batch.attention_mask))
        rows = batch.index >= 0
        answer_states.append(states[:, rows, -1])
        yield states[:, rows], batch.attention_mask[rows]

    influence = np.asarray(pruning.block_influence(hidden()), np.float64)
    angles = np.asarray(pruning.angular_distances(np.concatenate(answer_states, axis=1)),
                        np.float64)
    if self.state is not None:  # float64 survives JSON exactly
      self.state.save("influence_and_angles", 1, {"influence": influence.tolist(),
                                                  "angles": angles.tolist()})
    return influence, angles

  @property
  def influence(self) -> np.ndarray:
    return self.influence_and_angles[0]


# Masks whose metrics are computed in one compiled call (the last chunk is padded), so a
# study compiles its metrics once per item set, not once per curve length.
PROFILE_CHUNK = 16


def profile_of(readout: Readout, encoded: tasks.EncodedTask, s: Settings) -> metrics.Profile:
  """Every metric of readouts `[..., L+1, N, K]` (a mask axis or none), with the transition
  rule `s` asks for."""
  single = readout.option_logits.ndim == 3
  fields = [readout.option_logits, readout.log_normalizer, readout.option_logprob]
  if single:
    fields = [None if f is None else f[None] for f in fields]
  count = fields[0].shape[0]
  parts = []
  for start in range(0, count, PROFILE_CHUNK):
    take = np.minimum(np.arange(start, start + PROFILE_CHUNK), count - 1)  # pad: the last
    logits, normalizer, logprob = (None if f is None else np.asarray(f)[take] for f in fields)
    parts.append(jax.device_get(metrics.profile_jit(
        logits, normalizer, encoded.answer, encoded.num_options,
        normalization=s.normalization, tau=s.transition_tau, delta=s.accuracy_delta,
        option_logprob=logprob, chance=encoded.chance)))
  # numpy from here: indexing device arrays compiles a program per shape
  prof = jax.tree.map(lambda *xs: np.concatenate(xs)[:count] if np.ndim(xs[0]) else xs[0],
                      *parts)
  if single:
    prof = jax.tree.map(lambda x: x[0] if np.ndim(x) else x, prof)
  if s.transition_rule == "accuracy":
    prof = prof._replace(transition=prof.accuracy_transition)
  return prof


# New tokens generated for the open and generate formats' answers (both cut at their stop
# sequences: lm-eval's answers to NQ-open and TriviaQA are a few words).
OPEN_NEW_TOKENS = 16


def generated_answers(ctx: Context, mask: np.ndarray, noise_scale: np.ndarray | None = None,
                      noise_seed: int = 0, bar: Progress | None = None) -> list[str]:
  """Each evaluation item's greedy generation (up to 16 new tokens, cut at the first
  end-of-sequence token) by the variant `mask` through the KV-cache server, in item
  order; with `noise_scale` `[L]`, the noise probe's variant of the unpruned model (its
  noise keyed by `noise_seed`, the item, the block and the position, as the sweep's)."""
  server = serve.Server(ctx.model, mask, bucketed=True)
  eos = ctx.tokenizer.eos_token_id
  texts: list[str] = [""] * len(ctx.evaluation.items)
  for batch in ctx.eval_sweep.batches:
    batch = batch.unshared()  # generation runs whole prompts
    rows = batch.index >= 0
    noise = ({} if noise_scale is None else
             dict(noise_scale=noise_scale, noise_seed=noise_seed, items=batch.index))
    tokens = np.asarray(server.generate(batch.input_ids, batch.attention_mask,
                                        max_new_tokens=OPEN_NEW_TOKENS, **noise))
    for i, row in zip(batch.index[rows], tokens[rows]):
      row = list(row)
      if eos is not None and eos in row:
        row = row[:row.index(eos)]
      texts[i] = ctx.tokenizer.decode(row, skip_special_tokens=True)
    if bar is not None:
      bar.update()
  return texts


def generation_bar(ctx: Context, variants: int, description: str) -> Progress:
  """A progress bar (with its ETA) over the item batches `variants` variants generate."""
  return Progress(variants * len(ctx.eval_sweep.batches), f"{description}: generating",
                  enabled=ctx.settings.progress and is_main_process())


def judged_answers(ctx: Context, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Per item: the generate format's exact match `[N]` bool and token F1 `[N]` float64 of
  `texts`, scored as lm-eval scores NQ-open / TriviaQA (`dpjax.tasks.scoring`)."""
  items = ctx.evaluation.items
  articles = ctx.settings.task == "nq_open"
  stops = scoring.GENERATE_STOPS
  em = np.array([scoring.exact_match(t, item.golds, articles, stops)
                 for t, item in zip(texts, items)], bool)
  f1 = np.array([scoring.token_f1(t, item.golds, stops) for t, item in zip(texts, items)],
                np.float64)
  return em, f1


def judged_by_generation(ctx: Context, point: CurvePoint, mask: np.ndarray | None = None,
                         noise_scale: np.ndarray | None = None, noise_seed: int = 0,
                         bar: Progress | None = None) -> CurvePoint:
  """`point` judged by what the variant generates (the generate format): its accuracy and
  per-item outcomes are the exact match of its greedy answers, its `item_f1` their token
  F1; its per-layer profile stays the readout of the first answer token."""
  mask = np.ones(ctx.num_layers, bool) if mask is None else mask
  texts = generated_answers(ctx, mask, noise_scale, noise_seed, bar)
  em, f1 = judged_answers(ctx, texts)
  unpruned = bool(np.all(mask)) and (noise_scale is None or not np.any(noise_scale))
  return dataclasses.replace(point, accuracy=float(em.mean()), item_correct=em, item_f1=f1,
                             exact_match=float(em.mean()), token_f1=float(f1.mean()),
                             answers=texts if unpruned else None)


def exact_match_of(ctx: Context, mask: np.ndarray) -> float:
  """The open format's exact match of the variant `mask` on the evaluation items: greedy
  generation (up to 16 new tokens, cut at the first newline) through the KV-cache
  server, normalized as lm-eval normalizes NQ-open / TriviaQA answers."""
  articles = ctx.settings.task == "nq_open"
  texts = generated_answers(ctx, mask)
  return float(np.mean([scoring.exact_match(t, item.golds, articles)
                        for t, item in zip(texts, ctx.evaluation.items)]))


def curve(ctx: Context, masks: np.ndarray, description: str,
          with_exact_match: bool = False, per_layer: bool = True,
          reuse: Sequence[str] = ()) -> list[CurvePoint]:
  """One point per mask `[M, L]`: its final accuracy, DM, NLL and per-layer profile
  (and, `with_exact_match`, the open format's exact match of greedy generation).
  Without `per_layer`, only the last kept block is read: the per-layer profile is
  NaN but there, and the point has no transition block. In a run with saved state
  a finished curve is saved, and a resumed run restores it instead of evaluating
  it again. `reuse` names other curves of the run (their descriptions): a variant one of
  them already evaluated, on the same items and read the same way, is taken from its
  saved points instead of being evaluated again (the screened search's curve shares the
  exact search's where both removed the same blocks)."""
  masks = np.asarray(masks, bool)
  key = _curve_key(masks, per_layer, with_exact_match) + (
      "g" if ctx.settings.format == "generate" else "")
  record = _curve_record(description)
  saved = ctx.state.load(record) if ctx.state is not None else None
  if saved is not None and saved["key"] == key:
    if is_main_process():
      print(f"{description}: curve of {len(masks)} variants restored from the saved state",
            flush=True)
    return [CurvePoint.from_state(p) for p in saved["points"]]
  known = _saved_points(ctx, reuse, key.split(":", 1)[1])
  todo = [m for m, mask in enumerate(masks) if _kept(mask) not in known]
  if len(todo) < len(masks) and is_main_process():
    print(f"{description}: {len(masks) - len(todo)} of {len(masks)} variants taken from "
          f"{', '.join(reuse)}", flush=True)
  fresh = iter(_evaluate_curve(ctx, masks[todo], description, with_exact_match, per_layer)
               if todo else [])
  points = [known[_kept(mask)] if _kept(mask) in known else next(fresh) for mask in masks]
  if ctx.state is not None:  # a finished curve is kept: a resumed run does not repeat it
    step = 1 if saved is None else saved["step"] + 1
    ctx.state.save(record, step, {"key": key, "step": step,
                                  "points": [p.to_state() for p in points]})
  return points


def _curve_record(description: str) -> str:
  """The saved-state record of the curve `description`."""
  return f"curve_{re.sub(r'[^A-Za-z0-9_]+', '_', description)}"


def _kept(mask: np.ndarray) -> tuple[int, ...]:
  """A mask's kept blocks, 1-based (as `CurvePoint.kept`)."""
  return tuple(int(b) + 1 for b in np.flatnonzero(mask))


def _saved_points(ctx: Context, descriptions: Sequence[str], read: str) -> dict:
  """The saved points of the curves `descriptions` read as `read` (the part of their key
  after the masks' digest), by kept set."""
  known = {}
  for description in descriptions if ctx.state is not None else ():
    saved = ctx.state.load(_curve_record(description))
    if saved is not None and saved["key"].split(":", 1)[1] == read:
      for state in saved["points"]:
        point = CurvePoint.from_state(state)
        if point.kept is not None:
          known.setdefault(tuple(point.kept), point)
  return known


def _curve_key(masks: np.ndarray, per_layer: bool, with_exact_match: bool) -> str:
  """What a saved curve must match to be reused (the settings are checked by RunState)."""
  digest = hashlib.sha256(np.packbits(masks).tobytes() + str(masks.shape).encode())
  return f"{digest.hexdigest()}:{int(per_layer)}{int(with_exact_match)}"


def _evaluate_curve(ctx: Context, masks: np.ndarray, description: str, with_exact_match: bool,
                    per_layer: bool) -> list[CurvePoint]:
  readout = ctx.eval_sweep.readouts(masks, description=description, final_only=not per_layer)
  prof = profile_of(readout, ctx.evaluation, ctx.settings)
  answer = ctx.evaluation.answer
  points = []
  bar = (generation_bar(ctx, len(masks), description) if ctx.settings.format == "generate"
         else None)
  for m, mask in enumerate(masks):
    last = int(np.flatnonzero(mask)[-1]) + 1  # the final readout's layer
    rows = np.arange(len(answer))
    if readout.option_logprob is not None:  # cloze: the correct continuation's log-probability
      nll = -readout.option_logprob[m, last][rows, answer]
    else:
      nll = readout.log_normalizer[m, last] - readout.option_logits[m, last][rows, answer]
    l_star = int(prof.transition[m])
    points.append(CurvePoint(
        removed=int((~mask).sum()),
        kept=tuple(int(b) + 1 for b in np.flatnonzero(mask)),
        # From the per-item outcomes in float64: the same figure every report recomputes
        # from variants.jsonl (the profile's float32 mean can round the other way).
        accuracy=float(np.mean(np.asarray(prof.top[m, last]) == answer)),
        mean_final_dm={norm: float(prof.margin_summary[norm].mean[m, last])
                       for norm in metrics.NORMALIZATIONS},
        nll=float(np.mean(nll)),
        transition_block=None if l_star == metrics.NO_TRANSITION or not per_layer else l_star,
        layer_mean_dm=np.asarray(prof.margin_summary[ctx.settings.normalization].mean[m]),
        layer_accuracy=np.asarray(prof.accuracy[m]),
        item_correct=np.asarray(prof.top[m, last]) == answer,
        item_final_dm=np.asarray(prof.margin[ctx.settings.normalization][m, last]),
        exact_match=exact_match_of(ctx, mask) if with_exact_match else None))
    if bar is not None:
      points[-1] = judged_by_generation(ctx, points[-1], mask, bar=bar)
  if bar is not None:
    bar.close()
  return points


def _stats_json(stats: FinalStats) -> dict[str, float]:
  n = max(int(stats.items), 1)
  return {"accuracy": stats.correct / n, "mean_final_dm_vocab": stats.margin_sum / n,
          "nll": stats.nll_sum / n}


def _removal_masks(removed: Sequence[int], num_layers: int) -> np.ndarray:
  """`[n, L]`: mask `i` removes the first `i + 1` blocks of `removed` (0-based)."""
  masks = np.ones((len(removed), num_layers), bool)
  for n in range(len(removed)):
    masks[n, list(removed[:n + 1])] = False
  return masks


def iterative_result(ctx: Context, criterion: str, name: str, allowed=None,
                     kind: str = "iterative", screen: Sweep | None = None,
                     screen_keep: int = 0, reuse: Sequence[str] = ()) -> MethodResult:
  """Iterative Pruning, resumable step by step; the curve on the evaluation items.
  With `screen`, the screened search (`pruning.iterative_prune`)."""
  state = ctx.state
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
                            on_step=on_step, screen=screen, screen_keep=screen_keep)
    saved = {"removed": removed, "calibration": calibration, "done": True}
    state.save(name, len(removed) + 1, saved)
  removed = [int(b) for b in saved["removed"]]
  points = curve(ctx, _removal_masks(removed, ctx.num_layers), name,
                 with_exact_match=ctx.settings.format == "open", reuse=reuse)
  order = {"criterion": criterion, "removed_order": [b + 1 for b in removed],
           "calibration": saved["calibration"]}
  return MethodResult(kind=kind, curve=[ctx.unpruned_point] + points, order=order)


def one_shot_curve(ctx: Context, masks: np.ndarray, name: str) -> list[CurvePoint]:
  """A one-shot baseline's points (per layer unless --curve_layers=iterative)."""
  return curve(ctx, masks, name, per_layer=ctx.settings.curve_layers == "all")


def one_shot_result(ctx: Context, name: str, ranking: Sequence[int]) -> MethodResult:
  masks = pruning.masks_from_ranking(ranking, ctx.num_layers)
  return MethodResult(kind="one_shot", curve=[ctx.unpruned_point] + one_shot_curve(ctx, masks, name),
                      order={"ranking": [b + 1 for b in ranking]})


# ----------------------------------------------------------------------------
# The methods.


def run_iterative(ctx: Context, out: StudyResults) -> None:
  for criterion in ctx.settings.criteria:
    name = f"iterative_{criterion}"
    out.methods[name] = iterative_result(ctx, criterion, name)


def run_iterative_screened(ctx: Context, out: StudyResults) -> None:
  """Iterative Pruning by a screened search: each step scores every candidate on the
  first `--screen_items` calibration items (the proxy), evaluates the best
  `--screen_keep` on all of them and removes the best; a fraction of the exact search's
  work on deep models. Recorded as `iterative_screened_<criterion>` (its saved steps are
  keyed by the two settings, so changing them starts a new search)."""
  s = ctx.settings
  n = min(s.screen_items, len(ctx.calibration.items))
  screen = ctx.make_sweep(ctx.calibration.subset(range(n)))
  for criterion in s.criteria:
    name = f"iterative_screened_{criterion}"
    result = iterative_result(ctx, criterion, f"{name}_{n}x{s.screen_keep}",
                              kind="iterative_screened", screen=screen,
                              screen_keep=s.screen_keep, reuse=(f"iterative_{criterion}",))
    result.details = {"screen_items": n, "screen_keep": s.screen_keep}
    out.methods[name] = result


def run_block_influence(ctx: Context, out: StudyResults) -> None:
  out.methods["block_influence"] = one_shot_result(
      ctx, "block_influence", pruning.block_influence_ranking(ctx.influence))


def run_angular(ctx: Context, out: StudyResults) -> None:
  distances = ctx.influence_and_angles[1]
  blocks = [pruning.angular_blocks(distances, n) for n in range(1, ctx.num_layers)]
  masks = np.ones((len(blocks), ctx.num_layers), bool)
  for m, removed in enumerate(blocks):
    masks[m, removed] = False
  out.methods["angular"] = MethodResult(
      kind="one_shot", curve=[ctx.unpruned_point] + one_shot_curve(ctx, masks, "angular"),
      order={"removed_sets": [[b + 1 for b in r] for r in blocks]})


def run_single_layer(ctx: Context, out: StudyResults) -> None:
  saved = ctx.state.load("single_layer_ranking") if ctx.state is not None else None
  if saved is None:
    drop = ctx.cal_sweep.drop_one(list(range(ctx.num_layers)))
    saved = {"ranking": [int(b) for b in pruning.single_layer_ranking(drop)]}
    if ctx.state is not None:
      ctx.state.save("single_layer_ranking", 1, saved)
  out.methods["single_layer"] = one_shot_result(ctx, "single_layer", saved["ranking"])


def run_reverse(ctx: Context, out: StudyResults) -> None:
  out.methods["reverse"] = one_shot_result(ctx, "reverse", pruning.reverse_ranking(ctx.num_layers))


def run_random(ctx: Context, out: StudyResults) -> None:
  L = ctx.num_layers
  seeds = list(range(ctx.settings.random_seeds))
  rankings = [pruning.random_ranking(L, seed) for seed in seeds]
  masks = np.concatenate([pruning.masks_from_ranking(r, L) for r in rankings])
  points = one_shot_curve(ctx, masks, "random")
  per_seed = [points[i * (L - 1):(i + 1) * (L - 1)] for i in range(len(seeds))]
  unpruned = ctx.unpruned_point
  mean_curve = [unpruned]
  for n in range(L - 1):
    accs = [seed_points[n].accuracy for seed_points in per_seed]
    dms = [seed_points[n].mean_final_dm["vocab"] for seed_points in per_seed]
    mean_curve.append(CurvePoint(
        removed=n + 1, accuracy=float(np.mean(accs)), mean_final_dm={"vocab": float(np.mean(dms))},
        spread=Spread(float(np.std(accs)), float(np.min(accs)), float(np.max(accs)))))
  out.methods["random"] = MethodResult(
      kind="one_shot", curve=mean_curve,
      order={"seeds": seeds, "rankings": [[b + 1 for b in r] for r in rankings]},
      per_seed_curves=[[unpruned] + p for p in per_seed])


def phase_ks(max_k: int, which: str) -> list[int]:
  """The k values of the phase experiment: every k up to `max_k` ("all"), or 1, 2, 4, ...
  below it and `max_k` itself ("doublings")."""
  if which == "all":
    return list(range(1, max_k + 1))
  return sorted({2 ** i for i in range(max_k.bit_length()) if 2 ** i < max_k} | {max_k})


def _no_transition(s) -> str:
  """Why a phase method skips: l* is read on the calibration items, under the run's rule."""
  return f"the unpruned model has no transition on the calibration items ({s.transition_rule} rule)"


def clears_bar(accuracy: float, chance: float, gap: float) -> bool:
  """Whether `accuracy` is at least `gap` above `chance`, up to float rounding: 60 of 100
  items right clears chance 0.5 plus 0.1 (in float32 the accuracy is 0.59999996, and in
  float64 0.5 + 0.1 is above 0.6)."""
  return accuracy >= chance + gap - 1e-6


def below_the_bar(out: StudyResults, s) -> str | None:
  """Why the phase methods skip a run whose unpruned model is too close to chance
  (`--phase_min_gap`), or None."""
  if s.phase_min_gap <= 0:
    return None
  full = out.full_model
  if clears_bar(full.outcome_accuracy, full.outcome_chance, s.phase_min_gap):
    return None
  return (f"the unpruned model's {full.outcome_name} {full.outcome_accuracy:.3f} is below "
          f"chance {full.outcome_chance:.3f} plus --phase_min_gap={s.phase_min_gap}")


def run_phase(ctx: Context, out: StudyResults) -> None:
  """Silent arm against Decisive arm per selection rule, `k` blocks each (or the same share
  of each phase, `--phase_sizing=fraction`), and the two arms compared paired on the
  same evaluation items at every (rule, k), Holm-adjusted over all of them."""
  s, L, l_star = ctx.settings, ctx.num_layers, ctx.calibration_transition
  below = below_the_bar(out, s)
  if below:
    out.phase_experiment = PhaseExperiment(transition_block=l_star, skipped=below)
    return
  if l_star is None or l_star <= 1:
    why = (_no_transition(s) if l_star is None
           else "the Silent Phase is empty (transition at block 1 on the calibration items)")
    out.phase_experiment = PhaseExperiment(transition_block=l_star, skipped=why)
    return
  experiment = PhaseExperiment(transition_block=l_star, num_layers=L, sizing=s.phase_sizing)
  comparisons = []
  for selection in s.phase_selections:
    seeds = list(range(s.phase_seeds)) if selection == "random" else [0]
    orders = [pruning.phase_removals(l_star, L, selection, ctx.influence, seed)
              for seed in seeds]
    n_silent, n_decisive = len(orders[0]["silent"]), len(orders[0]["decisive"])
    if not n_silent or not n_decisive:  # a control whose arm has nothing left to remove
      continue
    sizes = pruning.phase_sizes(n_silent, n_decisive, s.phase_sizing, s.phase_max_k)
    chosen_ks = set(phase_ks(len(sizes), s.phase_ks))
    sizes = [size for size in sizes if size[0] in chosen_ks]
    masks, where = [], []
    for seed, order in zip(seeds, orders):
      for k, k_silent, k_decisive in sizes:
        for arm, n in (("silent", k_silent), ("decisive", k_decisive)):
          mask = np.ones(L, bool)
          mask[order[arm][:n]] = False
          masks.append(mask)
          where.append((arm, k, seed))
    points = one_shot_curve(ctx, np.array(masks), f"phase {selection}")
    arms: dict[str, list[ArmPoint]] = {"silent": [], "decisive": []}
    for k, k_silent, k_decisive in sizes:
      outcomes = {}
      for arm in arms:
        chosen = [p for p, (a, kk, _) in zip(points, where) if a == arm and kk == k]
        accs = [p.accuracy for p in chosen]
        outcomes[arm] = np.stack([p.item_correct for p in chosen])  # [seeds, N]
        arms[arm].append(ArmPoint(
            k=k, removed_sets=[[b for b in range(1, L + 1) if b not in p.kept] for p in chosen],
            accuracy=float(np.mean(accs)), accuracy_std=float(np.std(accs)),
            mean_final_dm={norm: float(np.mean([p.mean_final_dm[norm] for p in chosen]))
                           for norm in metrics.NORMALIZATIONS},
            accuracy_ci95=bootstrap_ci(outcomes[arm].mean(0)), points=chosen))
      sized = ({} if s.phase_sizing == "count"
               else {"k_silent": k_silent, "k_decisive": k_decisive})
      variants = tuple(tuple(tuple(sorted(p.kept)) for p in (
          [q for q, (a, kk, _) in zip(points, where) if a == arm and kk == k]))
          for arm in ("silent", "decisive"))
      comparisons.append(statistics.compare_arms(
          selection, k, outcomes["silent"], outcomes["decisive"],
          unpruned=(out.unpruned_point or ctx.unpruned_point).item_correct, margin=s.margin,
          threshold=out.full_model.collapse_threshold(), variants=variants, **sized))
    experiment.arms[selection] = arms
    experiment.max_k = max(experiment.max_k, max(size[0] for size in sizes))
  experiment.comparisons = statistics.with_holm(comparisons, margin=s.margin)
  out.phase_experiment = experiment


def final_points(ctx: Context, readout: Readout) -> list[CurvePoint]:
  """One point per variant of final readouts `[V, N, K]` of the unpruned model's blocks
  (every block kept): accuracy, mean final DM, NLL, per-item outcomes and final DM."""
  layered = Readout(*(None if f is None else np.asarray(f)[:, None] for f in readout))
  prof = profile_of(layered, ctx.evaluation, ctx.settings)  # one "layer": the final one
  answer, rows = ctx.evaluation.answer, np.arange(len(ctx.evaluation.answer))
  if readout.option_logprob is not None:  # cloze: the correct continuation's log-probability
    nll = -np.asarray(readout.option_logprob)[:, rows, answer]
  else:
    nll = (np.asarray(readout.log_normalizer)
           - np.asarray(readout.option_logits)[:, rows, answer])
  kept = tuple(range(1, ctx.num_layers + 1))
  return [CurvePoint(
      removed=0, kept=kept, accuracy=float(np.mean(np.asarray(prof.top[v, 0]) == answer)),
      mean_final_dm={norm: float(prof.margin_summary[norm].mean[v, 0])
                     for norm in metrics.NORMALIZATIONS},
      nll=float(np.mean(nll[v])),
      item_correct=np.asarray(prof.top[v, 0]) == answer,
      item_final_dm=np.asarray(prof.margin[ctx.settings.normalization][v, 0]))
      for v in range(len(nll))]


def run_noise(ctx: Context, out: StudyResults) -> None:
  """The noise probe (the paper's Section 4.3.1): Gaussian noise `eps * sigma(h) * N(0, I)`
  after every block of the Silent Phase (blocks `1..l*-1`) or of the Decisive Phase
  (`l*..L`), every block kept, at each level `eps^2` of `--noise_levels` over
  `--noise_seeds` seeds; the two arms compared paired on the same evaluation items at
  every level, Holm-adjusted over the levels; and the profile, noise after one block at a
  time, every block at every level, over `--noise_profile_seeds` seeds. All variants are
  evaluated together (`dpjax.engine.noise.noised_readouts`), each resuming from the
  unpruned model's stream at its first noised block, its noise keyed by its seed, the
  item, the block and the position."""
  s, L, l_star = ctx.settings, ctx.num_layers, ctx.calibration_transition
  why = below_the_bar(out, s)
  if why is None and (l_star is None or l_star <= 1):
    why = (_no_transition(s) if l_star is None
           else "the Silent Phase is empty (transition at block 1 on the calibration items)")
  if why is not None:
    out.noise_probe = NoiseProbe(transition_block=l_star, skipped=why)
    return
  probe = NoiseProbe(transition_block=l_star, num_layers=L, levels=tuple(s.noise_levels),
                     seeds=list(range(s.noise_seeds)),
                     profile_seeds=list(range(s.noise_profile_seeds)))
  phases = {"silent": probe.silent_phase, "decisive": probe.decisive_phase}
  where, scales, seeds = [], [], []  # per variant: (arm or block, level), its scales, its seed

  def add(key, blocks, level, seed):
    scale = np.zeros(L, np.float32)
    scale[[b - 1 for b in blocks]] = np.sqrt(level)
    where.append(key)
    scales.append(scale)
    seeds.append(seed)

  for arm, blocks in phases.items():
    for level in probe.levels:
      for seed in probe.seeds:
        add((arm, level), blocks, level, seed)
  for block in range(1, L + 1):
    for level in probe.levels:
      for seed in probe.profile_seeds:
        add((block, level), [block], level, seed)
  # A finished probe is kept with the run's state, keyed by its variants (scales and
  # seeds): a later call of the same run restores it instead of evaluating it again.
  digest = hashlib.sha256(np.stack(scales).tobytes() + np.array(seeds).tobytes()).hexdigest()
  digest += "g" if s.format == "generate" else ""
  saved = ctx.state.load("noise_probe") if ctx.state is not None else None
  if saved is not None and saved["key"] == digest:
    points = [CurvePoint.from_state(p) for p in saved["points"]]
    if is_main_process():
      print(f"noise probe: {len(points)} variants restored from the saved state", flush=True)
  else:
    readout = noise_engine.noised_readouts(ctx.eval_sweep, np.stack(scales), np.array(seeds),
                                           description="noise probe")
    points = final_points(ctx, readout)
    if s.format == "generate":  # each variant judged by what it generates, noised alike
      bar = generation_bar(ctx, len(points), "noise probe")
      points = [judged_by_generation(ctx, p, noise_scale=scale, noise_seed=seed, bar=bar)
                for p, scale, seed in zip(points, scales, seeds)]
      bar.close()
    if ctx.state is not None:
      step = 1 if saved is None else saved["step"] + 1
      ctx.state.save("noise_probe", step, {"key": digest, "step": step,
                                           "points": [p.to_state() for p in points]})
  grouped: dict[Any, list[CurvePoint]] = {}
  for key, point in zip(where, points):
    grouped.setdefault(key, []).append(point)  # in seed order
  comparisons = []
  for arm in phases:
    probe.arms[arm] = []
    for level in probe.levels:
      points = grouped[(arm, level)]
      accs = [p.accuracy for p in points]
      outcomes = np.stack([p.item_correct for p in points])  # [seeds, N]
      probe.arms[arm].append(NoiseArm(
          level=level, accuracy=float(np.mean(accs)), accuracy_std=float(np.std(accs)),
          seed_accuracies=accs,
          mean_final_dm={norm: float(np.mean([p.mean_final_dm[norm] for p in points]))
                         for norm in metrics.NORMALIZATIONS},
          accuracy_ci95=bootstrap_ci(outcomes.mean(0)), points=points))
  unpruned = (out.unpruned_point or ctx.unpruned_point).item_correct  # the same items
  for level in probe.levels:
    outcome = lambda arm: np.stack([p.item_correct for p in grouped[(arm, level)]])
    # k = 0: no block is removed; the arms differ in which blocks are noised. Each arm is
    # also compared with the unpruned model, as the phase experiment's arms are.
    comparisons.append(statistics.compare_arms(
        f"noise {level:g}", 0, outcome("silent"), outcome("decisive"), unpruned=unpruned,
        margin=s.margin, threshold=out.full_model.collapse_threshold(), unit="item"))
  probe.comparisons = statistics.with_holm(comparisons, margin=s.margin)
  probe.profile_points = {key: points for key, points in grouped.items()
                          if isinstance(key[0], int)}
  out.noise_probe = probe


def run_phase_aware(ctx: Context, out: StudyResults) -> None:
  """Prune inside the Decisive Phase only (most redundant first) until it is
  exhausted, then go on greedily over every block to show what happens next."""
  l_star = ctx.calibration_transition
  if l_star is None:
    out.methods["phase_aware"] = MethodResult.skip(
        "phase_aware", _no_transition(ctx.settings), transition_block=None)
    return
  decisive = set(range(l_star - 1, ctx.num_layers))
  if len(decisive) == 1:  # its first step would be the phase experiment's Decisive arm, k=1
    out.methods["phase_aware"] = MethodResult.skip(
        "phase_aware", "the Decisive Phase is one block (its removal is the phase "
        "experiment's Decisive arm at k = 1; what follows is Iterative Pruning)",
        transition_block=l_star)
    return

  def allowed(kept):
    inside = [b for b in kept if b in decisive]
    return inside or kept

  result = iterative_result(ctx, ctx.settings.criteria[0], "phase_aware", allowed=allowed,
                            kind="phase_aware")
  # Steps after which no Decisive-Phase block is left (None: pruning stopped first).
  reachable = len(decisive) <= ctx.num_layers - ctx.settings.min_layers
  result.details = {"transition_block": l_star,
                    "decisive_exhausted_at": len(decisive) if reachable else None}
  out.methods["phase_aware"] = result


def run_decisive_only(ctx: Context, out: StudyResults) -> None:
  """The paper's second question as a method: greedy removal (Iterative Pruning's first
  criterion) restricted to the Decisive Phase, every Silent-Phase block kept; the curve
  ends when the Decisive Phase is exhausted (or --min_layers is reached). When
  `phase_aware` ran, its first steps are this search (same criterion, same candidates,
  same items), so its curve is reused rather than searched again."""
  s, l_star = ctx.settings, ctx.calibration_transition
  if l_star is None:
    out.methods["decisive_only"] = MethodResult.skip(
        "decisive_only", _no_transition(s), transition_block=None)
    return
  decisive = set(range(l_star - 1, ctx.num_layers))
  steps = min(len(decisive), ctx.num_layers - s.min_layers)
  aware = out.methods.get("phase_aware")
  if aware is not None and not aware.skipped and aware.order.get("criterion") == s.criteria[0]:
    result = MethodResult(kind="decisive_only", curve=list(aware.curve[:steps + 1]),
                          order={**aware.order,
                                 "removed_order": aware.order["removed_order"][:steps],
                                 "calibration": aware.order["calibration"][:steps]})
    source = "phase_aware"
  else:
    result = iterative_result(ctx, s.criteria[0], "decisive_only", kind="decisive_only",
                              allowed=lambda kept: [b for b in kept if b in decisive])
    source = "searched"
  result.details = {"transition_block": l_star, "decisive_blocks": len(decisive),
                    "steps": steps, "curve_from": source}
  out.methods["decisive_only"] = result


METHODS: dict[str, Callable[[Context, StudyResults], None]] = {
    "iterative": run_iterative,
    "iterative_screened": run_iterative_screened,  # not in a study's default methods
    "block_influence": run_block_influence,
    "angular": run_angular,
    "single_layer": run_single_layer,
    "reverse": run_reverse,
    "random": run_random,
    "phase": run_phase,
    "noise": run_noise,
    "phase_aware": run_phase_aware,
    "decisive_only": run_decisive_only,  # after phase_aware: reuses its first steps
}
