"""The study on one model and task, from settings to the report on disk.

`run(settings)`:

1. loads the model and task and splits the items into calibration and
   evaluation sets (disjoint, by a seeded shuffle);
2. reads out every layer of the unpruned model (evaluation items: the reported
   profile; calibration items: the transition the phase methods use);
3. runs the pruning methods asked for (`dpjax.study.methods.METHODS`), each method's
   masks evaluated on the evaluation items by the sweep, and adds every
   curve's collapse point;
4. writes the report (see `dpjax.report.files`).

Long methods save their state after every step (`dpjax.engine.resume`); rerunning the
same command continues after a kill and ends with identical results.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import time
from typing import Any

import numpy as np

import jax

from dpjax import tasks
from dpjax.tasks import scoring
from dpjax.engine import compilation
from dpjax.engine import fit
from dpjax.study import metrics
from dpjax.study import pruning
from dpjax.report import files as report
from dpjax.engine import resume
from dpjax.study import statistics
from dpjax.lens import tuned as tuned_lens
from dpjax.bundled import recorded_path
from dpjax.engine.devices import Placement, is_main_process
from dpjax.fileio import check_output_dir, write_npz_stable
from dpjax.checkpoints.convert import load_tokenizer
from dpjax.model.load import load_model
from dpjax.study.methods import METHODS, Context, profile_of
from dpjax.lens.readout import Lens, Readout
from dpjax.study.results import (CurvePoint, EngineCounters, FullProfile, StudyResults,
                                 SubjectProfile, bootstrap_ci)
from dpjax.study.settings import Settings
from dpjax.engine.sweep import Sweep

STATE_DIR = "state"        # Orbax copies of the saved records (a speed-up; deletable)
PROGRESS_DIR = "progress"  # the portable copies, and the unpruned model's readouts


def calibration_size(s: Settings, available: int) -> int:
  """How many calibration items a study sets apart: `--transition_items` (the transition
  is read on all of them; the pruning search uses the first `--calibration_items`), as
  many as the task has beside the evaluation items, never fewer than the search's."""
  if not s.calibration_items:
    return 0
  room = available - (s.num_items or 1)
  return max(s.calibration_items, min(s.transition_items, room))


def _split_items(items: list[tasks.Item], s: Settings) -> tuple[list, list]:
  """Disjoint (calibration, evaluation) item lists by a seeded shuffle; the calibration
  list is `calibration_size` long, its first `--calibration_items` the search's."""
  if not s.calibration_items:
    return [], (items[:s.num_items] if s.num_items else items)
  order = np.random.default_rng([s.calibration_seed, 31337]).permutation(len(items))
  size = calibration_size(s, len(items))
  needed = size + s.num_items
  if len(items) < needed or len(items) <= size:
    raise ValueError(f"the task has {len(items)} items in split {s.split!r}, too few for "
                     f"{size} calibration items plus {s.num_items or 'some'} "
                     "evaluation items; lower --calibration_items or --num_items.")
  calibration = [items[i] for i in order[:size]]
  rest = [items[i] for i in order[size:]]
  return calibration, (rest[:s.num_items] if s.num_items else rest)


def select_items(s: Settings, info: tasks.TaskInfo | None = None):
  """The study's items: `(split, fewshot_split, shots pool, calibration, evaluation)` (the
  calibration items the transition is read on; the search's are their first
  `--calibration_items`),
  exactly as `prepare` takes them (for checks that recompute a run elsewhere)."""
  info = info or tasks.resolve_task(s.task)
  split = s.split or info.split
  fewshot_split = s.fewshot_split or info.fewshot_split
  extra = max(s.calibration_items, s.transition_items) if s.calibration_items else 0
  total = s.num_items + extra if s.num_items else 0
  if s.task == "synthetic" and not total:
    total = 400 + extra
  items = tasks.load_task(s.task, split, num_items=total if fewshot_split else 0, seed=s.seed,
                          data_dir=s.data_dir)
  dev = []
  if s.k_shot and fewshot_split:
    dev = tasks.load_task(s.task, fewshot_split, seed=s.seed, data_dir=s.data_dir,
                          num_items=200 if s.task == "synthetic" else 0)
  elif s.k_shot:  # no few-shot split: the first k items (per subject) are the shots
    dev = tasks.first_per_subject(items, s.k_shot)
    taken = {id(item) for item in dev}
    items = [item for item in items if id(item) not in taken]
  if not items:
    raise ValueError(f"task {s.task!r} split {split!r} has no items.")
  calibration, evaluation = _split_items(items, s)
  return split, fewshot_split, dev, calibration, evaluation


def prepare(settings: Settings, placement: Placement | None = None) -> Context:
  s = settings
  if placement is not None and s.batch_size:
    placement.check_batch_size(s.batch_size)
  model = load_model(s.model, dtype=s.dtype, compute_dtype=s.compute_dtype, placement=placement)
  tokenizer = load_tokenizer(model.source)
  info = tasks.resolve_task(s.task)
  if s.format not in info.formats:
    raise ValueError(f"task {s.task!r} does not support --format={s.format}; it supports "
                     f"{', '.join(info.formats)}.")
  split, fewshot_split, dev, calibration, evaluation = select_items(s, info)
  max_length = s.max_length or model.config.max_position_embeddings
  options = dict(max_length=max_length, truncation=s.truncation,
                 add_special_tokens=s.add_special_tokens)

  def encode(chosen):
    if not chosen:
      return None
    shots = tasks.shots_for(chosen, dev, s.k_shot)
    if s.format == "cloze":
      requests = [tasks.cloze_requests(item, sh) for item, sh in zip(chosen, shots)]
      return tasks.encode_cloze(tokenizer, chosen, requests, **options)
    if s.format in ("open", "generate"):
      prompts = [tasks.open_prompt(item, sh) for item, sh in zip(chosen, shots)]
      return tasks.encode_open(tokenizer, chosen, prompts, **options)
    prompts = [tasks.prompt(item, sh) for item, sh in zip(chosen, shots)]
    return tasks.encode(tokenizer, chosen, prompts, **options)

  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  encoded_eval = encode(evaluation)
  encoded_cal = encode(calibration[:s.calibration_items])
  encoded_transition = (encode(calibration) if len(calibration) > s.calibration_items
                        else encoded_cal)
  lens = Lens(tasks.read_format(s.format), s.cloze_norm)
  translators, lens_record = None, None
  if tuned_lens.lens_spec(s.lens):
    translators, lens_record = tuned_lens.load(tuned_lens.lens_spec(s.lens), model)
    translators = tuned_lens.Translators(*(jax.numpy.asarray(a) for a in translators))
  # Before anything runs: the programs compiled ahead of time for the largest batch, and
  # the chunking of the work chosen from their memory on this device (`dpjax.engine.fit`).
  fitted = fit.fit_study(model, placement, [encoded_eval, encoded_cal, encoded_transition],
                         lens, translators,
                         batch_size=s.batch_size, masks_in_flight=s.masks_in_flight,
                         candidates=s.candidates_per_call, mask_chunk=s.mask_chunk,
                         share_prefix=s.share_prefix, pad_id=pad_id, margin=s.fit_margin)
  chunking = fitted.chunking
  data_size = 1 if placement is None else placement.data_size
  sweep = lambda enc, tr: Sweep(model, enc, batch_size=chunking.rows_per_shard * data_size,
                                pad_id=pad_id, mask_chunk=s.mask_chunk, progress=s.progress,
                                placement=placement, lens=lens, translators=tr,
                                in_flight=chunking.masks_in_flight,
                                candidates=chunking.candidates, share_prefix=s.share_prefix)
  ctx = Context(s, model, tokenizer, encoded_eval, encoded_cal, pad_id, placement,
                sweep(encoded_eval, translators),
                sweep(encoded_cal, translators) if encoded_cal else None,
                split=split, fewshot_split=fewshot_split if s.k_shot else None)
  ctx.lens_record = lens_record
  ctx.fit = fitted
  ctx.make_sweep = lambda encoded: sweep(encoded, translators)
  ctx.transition_items = encoded_transition
  ctx.transition_sweep = (ctx.cal_sweep if encoded_transition is encoded_cal else
                          sweep(encoded_transition, translators)) if encoded_cal else None
  if translators is not None:  # the logit lens too, for the side-by-side profile
    ctx.logit_eval_sweep = sweep(encoded_eval, None)
  return ctx


def subject_profiles(prof: metrics.Profile, encoded: tasks.EncodedTask,
                     s: Settings) -> dict[str, SubjectProfile]:
  """Per subject (task family): items, final accuracy, transition block and its fraction of
  depth, from the whole profile's per-item margins and top options (the unpruned model: no
  layer is missing), with the rule the study uses."""
  subjects = np.array([item.subject for item in encoded.items])
  margin, top = np.asarray(prof.margin[s.normalization]), np.asarray(prof.top)
  answer, num_options = encoded.answer, encoded.num_options
  num_layers = top.shape[0] - 1
  out = {}
  for subject in sorted(set(subjects)):
    rows = np.flatnonzero(subjects == subject)
    mean = margin[:, rows].mean(axis=1)
    accuracy = (top[:, rows] == answer[rows]).mean(axis=1)
    if s.transition_rule == "accuracy":
      chance = (encoded.subset(rows).chance if encoded.format == "open"
                else float(np.mean(1.0 / num_options[rows])))
      l_star = int(metrics.first_of_last_run(accuracy > chance + s.accuracy_delta))
    else:
      l_star = int(metrics.first_of_last_run(mean > s.transition_tau))
    l_star = None if l_star == metrics.NO_TRANSITION else l_star
    out[str(subject)] = SubjectProfile(
        num_items=len(rows), accuracy=float(accuracy[-1]), transition_block=l_star,
        transition_fraction=None if l_star is None else l_star / num_layers,
        mean_decision_margin=[float(x) for x in mean])
  return out


def full_profile(ctx: Context, encoded: tasks.EncodedTask | None = None,
                 sweep: Sweep | None = None) -> tuple[Readout, metrics.Profile]:
  """Readouts and metrics of the unpruned model (default: on the evaluation items)."""
  encoded = encoded or ctx.evaluation
  sweep = sweep or ctx.eval_sweep
  readout = sweep.readouts(np.ones((1, ctx.num_layers), bool), description="full-model readout")
  one = Readout(readout.option_logits[0], readout.log_normalizer[0],
                None if readout.option_logprob is None else readout.option_logprob[0])
  return one, profile_of(one, encoded, ctx.settings)


def _items_key(encoded: tasks.EncodedTask, num_layers: int) -> str:
  """What a saved readout must match: the items (ids and prompts as fed) and the depth."""
  digest = hashlib.sha256()
  for item_id, prompt in zip((item.id for item in encoded.items), encoded.prompts):
    digest.update(f"{item_id}\x00{prompt}\x01".encode())
  digest.update(f"layers={num_layers}".encode())
  return digest.hexdigest()


def recorded_profile(ctx: Context, name: str, encoded: tasks.EncodedTask | None = None,
                     sweep: Sweep | None = None) -> tuple[Readout, metrics.Profile]:
  """`full_profile`, kept in the run's progress directory as `readout_<name>.npz` (the
  per-layer readout arrays, compressed) when the run saves state: a rerun, on this
  machine or a fresh one holding only the progress files, reads them back instead of
  running the model again (the settings were checked when the state was opened)."""
  encoded = encoded or ctx.evaluation
  state = ctx.state
  if state is None or state.progress_dir is None:
    return full_profile(ctx, encoded, sweep)
  path = os.path.join(state.progress_dir, f"readout_{name}.npz")
  key = _items_key(encoded, ctx.num_layers)
  if os.path.isfile(path):
    with np.load(path) as saved:
      if str(saved["key"]) == key:
        state.loads += 1
        state.loaded_from[f"readout_{name}"] = "progress"
        one = Readout(saved["option_logits"], saved["log_normalizer"],
                      saved["option_logprob"] if "option_logprob" in saved else None)
        return one, profile_of(one, encoded, ctx.settings)
  one, prof = full_profile(ctx, encoded, sweep)
  if state.write:
    arrays = {"key": np.array(key), "option_logits": np.asarray(one.option_logits),
              "log_normalizer": np.asarray(one.log_normalizer)}
    if one.option_logprob is not None:
      arrays["option_logprob"] = np.asarray(one.option_logprob)
    write_npz_stable(path, **arrays)
  return one, prof


def transition_intervals(prof: metrics.Profile, encoded: tasks.EncodedTask,
                         s: Settings) -> dict[str, Any]:
  """l* of the unpruned model on the calibration items it is read on, by the margin rule
  under both normalizations and by the accuracy rule, each with a 95% bootstrap interval
  over those items (`statistics.bootstrap_block`), and which one the phase methods use."""
  to_block = lambda v: None if v == metrics.NO_TRANSITION else int(v)
  out: dict[str, Any] = {"items": len(encoded.items), "rule": s.transition_rule,
                         "normalization": s.normalization,
                         "search_items": s.calibration_items}
  for norm in metrics.NORMALIZATIONS:
    rule = lambda mean: to_block(metrics.first_of_last_run(mean > s.transition_tau))
    block, ci, none = statistics.bootstrap_block(np.asarray(prof.margin[norm]), rule)
    out[f"margin_{norm}"] = {"block": block, "ci95": list(ci), "no_transition_share": none}
  chance = (encoded.chance if encoded.chance is not None
            else float(np.mean(1.0 / encoded.num_options)))
  correct = (np.asarray(prof.top) == encoded.answer).astype(float)
  rule = lambda acc: to_block(metrics.first_of_last_run(acc > chance + s.accuracy_delta))
  block, ci, none = statistics.bootstrap_block(correct, rule)
  out["accuracy"] = {"block": block, "ci95": list(ci), "no_transition_share": none}
  out["used"] = ("accuracy" if s.transition_rule == "accuracy"
                 else f"margin_{s.normalization}")
  return out


def _describe(ctx: Context) -> tuple[dict[str, Any], dict[str, Any]]:
  """The model and task records of results.json."""
  s, cfg = ctx.settings, ctx.model.config
  model = {"path": recorded_path(s.model), "architecture": cfg.architecture,
           "num_layers": ctx.num_layers,
           "fingerprint": tuned_lens.fingerprint(ctx.model),
           "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
           "param_dtype": cfg.param_dtype, "compute_dtype": str(ctx.model.compute_dtype)}
  task = {"spec": s.task, "split": ctx.split, "k_shot": s.k_shot,
          "fewshot_split": ctx.fewshot_split, "format": s.format,
          "cloze_norm": s.cloze_norm if s.format == "cloze" else None,
          "num_items": len(ctx.evaluation.items),
          "num_calibration_items": len(ctx.calibration.items) if ctx.calibration else 0,
          "num_transition_items": (len(ctx.transition_items.items) if ctx.transition_items
                                   else 0),
          "num_options": ctx.evaluation.num_options.tolist(),
          "subjects": sorted({it.subject for it in ctx.evaluation.items}),
          "left_truncated_items": int(ctx.evaluation.truncated.sum())}
  return model, task


def lens_info(ctx: Context) -> dict[str, Any]:
  """Which lens every number of the study was read through."""
  if ctx.lens_record is None:
    return {"kind": "logit"}
  record = ctx.lens_record
  return {"kind": "tuned", "path": tuned_lens.lens_spec(ctx.settings.lens),
          "trained_on": record.get("model"), "corpus": record.get("corpus"),
          "heldout_kl": record.get("heldout_kl")}


def answered_items(prof: metrics.Profile, encoded: tasks.EncodedTask, s: Settings) -> dict:
  """The open format's transition on the items the unpruned model answers (its top token
  at the last layer a gold first token), leaving out those the best constant guess
  answers too: an early layer that reads out that token (a bare space before a
  number) would look decided without having read the question."""
  token, _ = encoded.constant_guess
  constant = (encoded.letter_ids == token).any(axis=1)
  answered = np.asarray(prof.top)[-1] == 0
  out = metrics.answered_profile(prof.top, prof.margin["vocab"], answered & ~constant,
                                 tau=s.transition_tau)
  out.update(answered_at_last_layer=int(answered.sum()), constant_guess_token=token,
             left_out_constant=int((answered & constant).sum()))
  return out


def _add_collapse_points(results: StudyResults) -> None:
  full = results.full_model
  for result in results.curves().values():
    result.collapse_point = pruning.collapse_point(
        [p.removed for p in result.curve], [p.accuracy for p in result.curve],
        full.final_accuracy, full.chance)


def run(settings: Settings, placement: Placement | None = None) -> StudyResults:
  """The whole study; returns what it wrote to `results.json` (as typed records)."""
  s = settings
  if is_main_process():
    check_output_dir(s.output_dir)  # before the model loads: a bad path costs nothing
  compilation.enable_persistent_cache(s.compilation_cache_dir)
  counter = compilation.CompileCounter()
  timings: dict[str, float] = {}
  clock = time.perf_counter()
  ctx = prepare(s, placement)
  timings["prepare_seconds"] = time.perf_counter() - clock
  if is_main_process() and s.progress:
    worst = max(ctx.fit.memory, key=lambda k: ctx.fit.memory[k].peak)
    print(f"fit: {ctx.fit.chunking.describe()} (largest program: {worst}, "
          f"{ctx.fit.memory[worst].peak / 1e9:.2f} GB of {ctx.fit.budget / 1e9:.2f} GB per "
          "device)", flush=True)
  # Checked before anything is written, so a bad flag leaves no output behind.
  if s.methods and not 1 <= s.min_layers <= ctx.num_layers:
    raise ValueError(f"min_layers={s.min_layers} must be between 1 and the model's "
                     f"{ctx.num_layers} blocks.")
  out = s.output_dir
  main = is_main_process()
  if main:
    os.makedirs(out, exist_ok=True)
  state_dir = os.path.join(out, STATE_DIR)
  progress_dir = os.path.join(out, PROGRESS_DIR)
  for where in (state_dir, progress_dir):
    if s.restart and main and os.path.isdir(where):
      shutil.rmtree(where)
  if s.methods:
    ctx.state = resume.RunState(state_dir, s.fingerprint(), write=main,
                                progress_dir=progress_dir,
                                defaults=Settings.default_fingerprint())

  clock = time.perf_counter()
  readout, prof = recorded_profile(ctx, "evaluation")
  timings["full_profile_seconds"] = time.perf_counter() - clock
  full = FullProfile.from_metrics(prof, ctx.num_layers)
  full.by_subject = subject_profiles(prof, ctx.evaluation, s)
  full.final_accuracy_ci95 = bootstrap_ci(np.asarray(prof.top[-1]) == ctx.evaluation.answer)
  if s.format in ("open", "generate"):
    full.exact_match = ctx.unpruned_point.exact_match  # the answer itself
    full.answered = answered_items(prof, ctx.evaluation, s)
  if s.format == "generate":  # variants are judged by what they generate
    full.token_f1 = ctx.unpruned_point.token_f1
    full.generation_chance = scoring.constant_answer_share(
        [item.golds for item in ctx.evaluation.items], remove_articles=s.task == "nq_open")
  logit_full = None
  if ctx.logit_eval_sweep is not None:
    _, logit_prof = full_profile(ctx, sweep=ctx.logit_eval_sweep)
    logit_full = FullProfile.from_metrics(logit_prof, ctx.num_layers)
  model_info, task_info = _describe(ctx)
  recorded = {k: v for k, v in dataclasses.asdict(s).items() if k != "compilation_cache_dir"}
  recorded["model"] = recorded_path(s.model)
  results = StudyResults(model=model_info, task=task_info, settings=recorded,
                         full_model=full, timings=timings, ran_methods=bool(s.methods),
                         lens=lens_info(ctx), full_model_logit_lens=logit_full)

  last = ctx.num_layers
  results.unpruned_point = CurvePoint(
      removed=0, kept=tuple(range(1, last + 1)),
      accuracy=float(np.mean(np.asarray(prof.top[last]) == ctx.evaluation.answer)),
      mean_final_dm={norm: float(prof.margin_summary[norm].mean[last])
                     for norm in metrics.NORMALIZATIONS},
      item_correct=np.asarray(prof.top[last]) == ctx.evaluation.answer,
      item_final_dm=np.asarray(prof.margin[s.normalization][last]))
  if s.format == "generate":  # its outcomes are those of its greedy answers
    results.unpruned_point = ctx.unpruned_point
  if s.methods:
    clock = time.perf_counter()
    _, cal_prof = recorded_profile(ctx, "transition", ctx.transition_items,
                                   ctx.transition_sweep)
    l_star = int(cal_prof.transition)
    ctx.calibration_transition = None if l_star == metrics.NO_TRANSITION else l_star
    results.calibration_transition_block = ctx.calibration_transition
    results.calibration_transition = transition_intervals(cal_prof, ctx.transition_items, s)
    for method in s.methods:
      started = time.perf_counter()
      METHODS[method](ctx, results)
      timings[f"{method}_seconds"] = time.perf_counter() - started
    if "influence_and_angles" in ctx.__dict__:  # computed by a method that needed it
      results.block_influence = ctx.influence
    _add_collapse_points(results)
    timings["methods_seconds"] = time.perf_counter() - clock
    counters = ctx.eval_sweep.counters, ctx.cal_sweep.counters
    results.engine = EngineCounters(
        xla_compilations=counter.compiled, cache_hits=counter.cache_hits,
        block_evaluations_executed=sum(c.executed for c in counters),
        block_evaluations_minimum=sum(c.minimum for c in counters),
        block_evaluations_naive=sum(c.naive for c in counters),
        candidates_stopped_early=sum(c.stopped_early for c in counters),
        fit=ctx.fit.to_json())

  if main:
    report.write_study(out, results, readout, prof, ctx.evaluation, s)
  return results
