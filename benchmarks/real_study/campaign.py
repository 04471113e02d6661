"""The real-model campaign: its plan, its units of work, their predicted cost and its ledger.

A *run* is one model on one task (one dpjax study, in `runs/<name>/`). A run's work is
cut into *units*, each one `dpjax.study.run.run` call that adds methods to what the run
recorded before:

| unit | methods | what it gives |
|---|---|---|
| `phase` | `phase` | the profile, l* with its interval, the phase experiment |
| `noise` | `phase`, `noise` | the noise probe by phase |
| `iterative` | ..., `iterative` | Iterative Pruning (exact greedy search) and its curve |
| `screened` | ..., `iterative_screened` | the screened search (`--screen_items`, `--screen_keep`) |
| `baselines` | ..., the one-shot baselines | block influence, angular, single layer, reverse, random |

Every unit records what it computed in the run's `progress/` directory (the study's
saved records, `dpjax.engine.resume`, and the unpruned readouts) and in its
results.json, variants.jsonl and items.jsonl, all kept in the repository: a unit that
finished is never computed again, on this machine or a fresh clone with an empty
cache (a later unit restores it from `progress/` at the cost of loading the model).

`ledger.json` beside the runs records every finished unit: its measured seconds, the
seconds predicted for it before it started, and the run's unpruned accuracy. The units
run in `priority` order (`PLAN`'s docstring says which); `--hours` stops before a unit
whose prediction would pass the budget.

Predictions (`predict`) count the work of a unit as the planner counts a study's
(`dpjax.engine.planner.schedule`: block evaluations on tokens, decoding steps, lens
reads), turn each part into seconds with the model's shapes and a prior rate for two CPU
cores (fitted to earlier measured runs), and add the model's fixed cost (loading the
model, encoding) and, for a unit that sweeps pruned variants, the cost of compiling
their programs. The finished units fit one coefficient per part (`calibrate`: every kind
and model at once), so the prediction for the next unit uses every measurement so far.
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import itertools
import json
import math
import os
from typing import Any, Sequence

import numpy as np

from dpjax.fileio import atomic_write_text

LEDGER_FILE = "ledger.json"

# ----------------------------------------------------------------------------
# Models and tasks.


@dataclasses.dataclass(frozen=True)
class Shape:
  """What the cost of one model depends on (its GGUF file's config; `tests.support.
  real_models` names the files)."""
  num_layers: int
  hidden: int
  intermediate: int
  q_dim: int      # heads x head size
  kv_dim: int     # key/value heads x head size
  vocab: int

  @property
  def block_flops_per_token(self) -> float:
    d = self.hidden
    params = d * self.q_dim * 2 + d * self.kv_dim * 2 + 3 * d * self.intermediate
    return 2.0 * params

  @property
  def lens_flops_per_read(self) -> float:
    return 2.0 * self.hidden * self.vocab


SHAPES = {
    "smollm2": Shape(30, 576, 1536, 9 * 64, 3 * 64, 49152),
    "gemma3": Shape(18, 640, 2048, 4 * 256, 1 * 256, 262144),
    "qwen25": Shape(24, 896, 4864, 14 * 64, 2 * 64, 151936),
}

# Tokens per item in the cloze format (the context once, every option's continuation)
# and lens reads per item (the continuations' tokens): the priors until a run's
# items.jsonl gives its own (`run_facts`). SciQ's context holds its support paragraph.
TASK_TOKENS = {"arc_easy": (40, 16), "arc_challenge": (45, 18), "sciq": (130, 12),
               "piqa": (65, 50), "hellaswag": (140, 100),
               "triviaqa": (150, 1.4),  # five shots; the first answer token read
               "sciq_open": (146, 1.4)}  # two shots
# The unpruned models' cloze accuracy in the earlier runs (300 items; FACTS): where it is
# below chance plus the bar, the plan expects the phase unit to stop after the profile
# and the run's other units not to be needed (the run's own profile decides).
PRIOR_ACCURACY = {("smollm2", "arc_easy"): 0.54, ("smollm2", "sciq"): 0.75,
                  ("smollm2", "piqa"): 0.62, ("gemma3", "arc_easy"): 0.41,
                  ("gemma3", "sciq"): 0.69, ("gemma3", "piqa"): 0.57,
                  ("qwen25", "arc_easy"): 0.51, ("qwen25", "sciq"): 0.85,
                  ("smollm2", "sciq_open"): 0.35}  # exact match, 40 items, two shots
CHANCE = {"arc_easy": 0.25, "arc_challenge": 0.25, "sciq": 0.25, "piqa": 0.5,
          "hellaswag": 0.25, "triviaqa": 0.02,  # open-ended: the best constant answer's
          "sciq_open": 0.025}

# Priors for two CPU cores, fitted to the earlier real-model runs' measured times (older
# code; see REPORT.md): the rate of block work and of lens work (a lens read is one large
# matrix product with the unembedding, faster per FLOP than a block on a few rows), and
# a unit's fixed cost (loading the GGUF file, encoding, compiling the programs).
PRIOR_BLOCK_RATE = 67e9
PRIOR_LENS_RATE = 219e9
PRIOR_FIXED = {"smollm2": 60.0, "gemma3": 120.0, "qwen25": 90.0}
# The noise probe's settings where this dpjax has none (so the plan can be costed).
NOISE_DEFAULTS = {"noise_levels": (0.02, 0.05, 0.1, 0.2), "noise_seeds": 3,
                  "noise_profile_seeds": 1}

# ----------------------------------------------------------------------------
# The plan.


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  model: str          # a key of tests.support.real_models.MODELS
  task: str
  format: str = "cloze"
  settings: tuple = ()  # extra Settings fields, as (name, value) pairs
  lens: str = "logit"

  @property
  def fields(self) -> dict[str, Any]:
    return dict(self.settings)


UNIT_METHODS = {
    "phase": ("phase",),
    "noise": ("noise",),
    "iterative": ("iterative",),
    "screened": ("iterative_screened",),
    "baselines": ("block_influence", "angular", "single_layer", "reverse", "random"),
}
UNIT_KINDS = tuple(UNIT_METHODS)


@dataclasses.dataclass(frozen=True)
class Unit:
  run: Run
  kind: str
  priority: int

  @property
  def name(self) -> str:
    return f"{self.run.name}:{self.kind}"


@dataclasses.dataclass(frozen=True)
class Size:
  """How big every run is: items, seeds, the k values, and what is cut."""
  name: str
  common: tuple            # Settings fields every run shares
  items: dict              # evaluation items per model
  iterative_runs: tuple    # runs whose (exact) Iterative Pruning is in the plan
  baselines_runs: tuple    # runs whose one-shot baselines are in the plan
  screened_runs: tuple = ()  # runs whose screened Iterative Pruning is in the plan
  tasks: tuple = ("arc_easy", "sciq", "piqa", "arc_challenge", "hellaswag")
  task_settings: dict = dataclasses.field(default_factory=dict)  # extra fields per task
  # The generation runs (the generate format: every variant judged by its greedy
  # answers), one per model: their task, items per model and extra fields.
  generation_task: str = "triviaqa"
  generation_items: dict = dataclasses.field(default_factory=dict)
  generation_settings: tuple = ()


# Every run reads l* on 128 calibration items (the search takes the first 64), the
# Decision Margin under the options normalization (a softmax over the options' summed
# log-probabilities: under the vocab normalization a multi-token option's probability is
# a product of its tokens', so the mean margin is decided by the items with the shortest
# options), one-shot curves at their last block only, and the phase experiment and the
# noise probe only where the unpruned model is at least 0.1 above chance on its
# evaluation items (`--phase_min_gap`).
_COMMON = (("calibration_items", 64), ("transition_items", 128),
           ("curve_layers", "iterative"), ("normalization", "options"),
           ("phase_min_gap", 0.1))

# The generation runs: SciQ's items with the correct answer generated (`sciq_open`, the
# generate format), two shots (zero-shot, the instruction-tuned models answer in
# sentences: SmolLM2's exact match 0.02 on 48 items, 0.35 with two shots; on TriviaQA
# five-shot SmolLM2 and Qwen2.5 both scored 0.04, below the bar), l* read on 64 items.
# Each variant generates every answer token by token (SmolLM2: 1.05 CPU-seconds an item,
# two-shot prompts of 130 tokens), so the runs are cut further: the random rule over 3
# seeds, k = 1 and 2 only, the noise probe over one seed, and Qwen2.5 (4x SmolLM2's
# blocks) and Gemma 3 on 24 and 40 items.
# l* by the accuracy rule: the first answer token's mean margin over every item stays
# negative where most answers are wrong (SmolLM2's first run, margin rule: exact match
# 0.22, no transition), while its accuracy rises above the constant guess's.
GENERATION_SETTINGS = (("k_shot", 2), ("transition_items", 64), ("phase_seeds", 3),
                       ("phase_max_k", 2), ("noise_seeds", 1), ("transition_rule", "accuracy"))

# On two CPU cores (the default): 100 evaluation items (60 for Qwen2.5, whose blocks
# are 4x SmolLM2's; ARC-Easy, the first runs, 120 and 80; the runs not started when the
# plan was predicted above 12 hours cut further: HellaSwag, whose items are 3x longer,
# 30 / 20 / 20, ARC-Challenge 60 for Gemma 3 and 40 for Qwen2.5), the random rule
# over 5 seeds, k = 1, 2, 4, ... and the smaller phase's size, the noise probe's arms at
# four levels over 2 seeds without its block-by-block profile, Iterative Pruning on each
# model's ARC-Easy run (the exact search on SmolLM2's and Gemma 3's; the screened search,
# 16 items screening every candidate and 4 evaluated on all 64, on all three: where both
# ran, the report compares their removals) and the one-shot baselines on SmolLM2's.
LOCAL = Size(
    name="local",
    common=_COMMON + (("phase_seeds", 5), ("phase_ks", "doublings"), ("random_seeds", 3),
                      ("noise_seeds", 2), ("noise_profile_seeds", 0)),
    items={"smollm2": 100, "gemma3": 100, "qwen25": 60,
           ("smollm2", "arc_easy"): 120, ("gemma3", "arc_easy"): 120,
           ("qwen25", "arc_easy"): 80,
           ("smollm2", "hellaswag"): 30, ("gemma3", "hellaswag"): 20,
           ("qwen25", "hellaswag"): 20, ("gemma3", "sciq"): 60,
           ("gemma3", "arc_challenge"): 60, ("qwen25", "arc_challenge"): 40},
    task_settings={task: (("transition_items", 64),)
                   for task in ("sciq", "piqa", "arc_challenge", "hellaswag")},
    iterative_runs=("smollm2_arc_easy_cloze", "gemma3_arc_easy_cloze"),
    baselines_runs=("smollm2_arc_easy_cloze",),
    screened_runs=("smollm2_arc_easy_cloze", "gemma3_arc_easy_cloze",
                   "qwen25_arc_easy_cloze"),
    generation_task="sciq_open", generation_items={"smollm2": 100, "gemma3": 40, "qwen25": 24},
    generation_settings=GENERATION_SETTINGS)

# On one GPU: the full size (300 items, 10 seeds, every k, the noise profile, Iterative
# Pruning and the baselines on every run).
FULL = Size(
    name="full",
    common=_COMMON + (("phase_seeds", 10), ("phase_ks", "all"), ("random_seeds", 3),
                      ("noise_seeds", 3), ("noise_profile_seeds", 1)),
    items={"smollm2": 300, "gemma3": 300, "qwen25": 300},
    iterative_runs=("*",), baselines_runs=("*",),
    generation_task="sciq_open", generation_items={"smollm2": 300, "gemma3": 300, "qwen25": 300},
    generation_settings=(("k_shot", 2), ("transition_items", 128),
                         ("transition_rule", "accuracy")))

SIZES = {"local": LOCAL, "full": FULL}
MODELS = ("smollm2", "gemma3", "qwen25")


def runs(size: Size) -> list[Run]:
  """Every run of the plan: each model on each task, cloze format, `size`'s items; then
  each model's generation run."""
  out = []
  for task in size.tasks:
    for model in MODELS:
      items = size.items.get((model, task), size.items[model])
      common = dict(size.common)
      common.update(size.task_settings.get(task, ()))
      out.append(Run(f"{model}_{task}_cloze", model, task, "cloze",
                     (("num_items", items),) + tuple(common.items())))
  for model in MODELS:
    if model in size.generation_items:
      common = dict(size.common)
      common.update(size.generation_settings)
      out.append(Run(f"{model}_{size.generation_task}_generate", model, size.generation_task,
                     "generate", (("num_items", size.generation_items[model]),)
                     + tuple(common.items())))
  return out


def plan(size: Size) -> list[Unit]:
  """The units in the order they run: (1) every multiple-choice run's phase unit, then
  their noise units (the claim's two probes; cheaper tasks first), then the generation
  runs' (the paper's first open question), (2) Iterative Pruning on one run per model
  (exact, then screened), (3) the one-shot baselines."""
  every = runs(size)
  chosen = lambda names, run: "*" in names or run.name in names
  choice = [run for run in every if run.format != "generate"]
  generation = [run for run in every if run.format == "generate"]
  units = [Unit(run, "phase", 1) for run in choice]
  units += [Unit(run, "noise", 1) for run in choice]
  units += [Unit(run, kind, 1) for run in generation for kind in ("phase", "noise")]
  units += [Unit(run, "iterative", 2) for run in every if chosen(size.iterative_runs, run)]
  units += [Unit(run, "screened", 2) for run in every if chosen(size.screened_runs, run)]
  units += [Unit(run, "baselines", 3) for run in every if chosen(size.baselines_runs, run)]
  return units


def methods_of(unit: Unit, done: Sequence[str]) -> tuple[str, ...]:
  """The study methods a unit's call runs: its own and every finished unit's of the same
  run (restored from the progress files), in the study's order."""
  from dpjax.study.settings import METHODS
  wanted = set(UNIT_METHODS[unit.kind]) | {"phase"}
  for kind in done:
    wanted |= set(UNIT_METHODS[kind])
  return tuple(m for m in METHODS if m in wanted)


# ----------------------------------------------------------------------------
# The work of a unit, counted as the planner counts a study.

# Tokens a generation run's variant generates per item (`dpjax.study.methods.OPEN_NEW_TOKENS`).
GENERATED_TOKENS = 16


def run_settings(run: Run) -> dict[str, Any]:
  from dpjax.study.settings import Settings
  defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
  return {**NOISE_DEFAULTS, **defaults, **run.fields}


def phase_masks(num_layers: int, l_star: int, fields: dict[str, Any]) -> int:
  """How many variants the phase experiment evaluates for a transition at `l_star`."""
  from dpjax.study import methods
  silent, decisive = l_star - 1, num_layers - l_star + 1
  if silent < 1 or decisive < 1:
    return 0
  max_k = min(silent, decisive)
  if fields.get("phase_max_k"):
    max_k = min(max_k, fields["phase_max_k"])
  ks = len(methods.phase_ks(max_k, fields["phase_ks"]))
  rules = 2 + fields["phase_seeds"] + 1 + (1 if silent > 1 else 0)
  return rules * ks * 2


@dataclasses.dataclass
class Work:
  """Block evaluations (on one token) while reading prompts, block evaluations while
  generating token by token (a decode step runs one row at a time, at another rate), lens
  reads (on one read token) of the profile and of the variants' last layer, whether the
  unit sweeps pruned variants (its programs, compiled for every batch width, are a cost
  its token counts do not see), and the lens reads of a search's curve, which reads every
  layer of every variant it evaluates (a program that holds every layer's readout at once:
  another rate)."""
  block_tokens: float = 0.0
  lens_reads: float = 0.0
  decode_tokens: float = 0.0
  sweep: float = 0.0
  curve_reads: float = 0.0

  def flops(self, shape: Shape) -> float:
    return ((self.block_tokens + self.decode_tokens) * shape.block_flops_per_token
            + (self.lens_reads + self.curve_reads) * shape.lens_flops_per_read)

  def parts(self, shape: Shape) -> np.ndarray:
    """Seconds at the prior rates per part (`COST_PARTS`), the calibration's regressors."""
    return np.array([self.block_tokens * shape.block_flops_per_token / PRIOR_BLOCK_RATE,
                     self.decode_tokens * shape.block_flops_per_token / PRIOR_BLOCK_RATE,
                     self.lens_reads * shape.lens_flops_per_read / PRIOR_LENS_RATE,
                     self.sweep,
                     self.curve_reads * shape.lens_flops_per_read / PRIOR_LENS_RATE])

  def base_seconds(self, shape: Shape) -> float:
    """Seconds at the prior rates, before the fixed cost and the fitted coefficients."""
    return float(self.parts(shape) @ PRIOR_COEFFICIENTS)


# The parts of a unit's cost and their prior coefficients: block work, decoding and lens
# reads at the prior rates (1: the rates themselves), a sweep's compile overhead in
# seconds (0 until units measure it) and a search curve's lens reads at the prior lens
# rate. The curve's reads are a part of their own because the finished units say so:
# counted as lens reads, the four searches took 1.3-1.9x their predictions (their curves
# took a third of Gemma 3's search); as their own part, each predicted from the other
# units, within 1.25x (REPORT.md's table).
COST_PARTS = ("blocks", "decoding", "lens", "sweep", "curve")
PRIOR_COEFFICIENTS = np.array([1.0, 1.0, 1.0, 0.0, 1.0])


def unit_work(unit: Unit, l_star: int | None, tokens: tuple[float, float],
              profile_only: bool = False) -> Work:
  """The unit's work, `l_star` the run's transition (None: before its profile, assumed at
  three quarters of the depth), `tokens` (tokens, read tokens) per item; `profile_only`:
  the run is expected below the bar (its phase unit stops after the profile, its other
  units are not needed)."""
  shape, f = SHAPES[unit.run.model], run_settings(unit.run)
  L, n = shape.num_layers, f["num_items"]
  cal, transition = f["calibration_items"], f["transition_items"]
  t, r = tokens
  w = Work()
  assumed = l_star if l_star is not None else max(2, round(0.75 * L))
  if profile_only and unit.kind != "phase":
    return w
  if unit.run.format == "generate":  # every variant also generates its answers
    variants = 1 if unit.kind == "phase" else 0  # the unpruned model's, once
    kept = L
    if unit.kind == "phase" and not profile_only:
      variants += phase_masks(L, assumed, f)
      kept = L - 0.5 * min(assumed - 1, L - assumed + 1)  # about half the largest k removed
    elif unit.kind == "noise":
      variants = 2 * len(f["noise_levels"]) * f["noise_seeds"]
    w.block_tokens += variants * n * t * kept  # the prompts
    w.decode_tokens += variants * n * GENERATED_TOKENS * kept
    w.lens_reads += variants * n * GENERATED_TOKENS
  if unit.kind == "phase":
    w.block_tokens += (n + transition) * L * t  # the unpruned profile, every layer read
    w.lens_reads += (n + transition) * (L + 1) * r
    if profile_only:
      return w
    masks = phase_masks(L, assumed, f)
    w.sweep = 1.0 if masks else 0.0
    silent_share = 0.5  # half the variants remove Silent blocks: a tail from there on
    tail = silent_share * (L - assumed / 2) + (1 - silent_share) * (L - assumed) / 2
    w.block_tokens += n * t * (L + masks * tail) + cal * t * L  # stream, tails, influence
    w.lens_reads += n * r * masks
  elif unit.kind == "noise":
    arms = 2 * len(f["noise_levels"]) * f["noise_seeds"]
    profile = L * len(f["noise_levels"]) * f["noise_profile_seeds"]
    w.block_tokens += n * t * L * (arms + profile)
    w.lens_reads += n * r * (arms + profile)
  elif unit.kind in ("iterative", "screened"):
    # The search, each step: the stream, then candidates' tails (the screened search: a
    # proxy on every candidate over `screen` items, the best `screen_keep` on all).
    w.sweep = 1.0
    screened = unit.kind == "screened"
    screen = f["screen_items"] if screened else 0
    for k in range(L, f["min_layers"], -1):
      keep = min(f["screen_keep"], k) if screened else k
      w.block_tokens += screen * t * (k + k * (k - 1) / 2)
      w.block_tokens += cal * t * (k + keep * (k - 1) / 2)
      w.lens_reads += screen * r * k + cal * r * keep
    w.block_tokens += n * t * (L + (L - 1) * L / 2)  # its curve, every layer read
    w.curve_reads += n * r * (L - 1) * L / 2
  elif unit.kind == "baselines":
    w.sweep = 1.0
    curves = 4 + f["random_seeds"]
    w.block_tokens += n * t * curves * (L + (L - 1) * L / 2)
    w.lens_reads += n * r * curves * (L - 1)
    w.block_tokens += cal * t * (L + L * (L - 1) / 2) + cal * t * L  # single layer, influence
  else:
    raise ValueError(f"unknown unit kind {unit.kind!r}; the kinds are {UNIT_KINDS}.")
  return w


# ----------------------------------------------------------------------------
# The ledger: what finished, measured against what was predicted.


def read_ledger(out_dir: str) -> dict[str, Any]:
  path = os.path.join(out_dir, LEDGER_FILE)
  if not os.path.isfile(path):
    return {"units": {}}
  with open(path) as f:
    return json.load(f)


def write_ledger(out_dir: str, ledger: dict[str, Any]) -> None:
  atomic_write_text(os.path.join(out_dir, LEDGER_FILE),
                    json.dumps(ledger, indent=1, sort_keys=True) + "\n")


def start_unit(out_dir: str, unit: Unit) -> int:
  """Notes in the ledger that `unit` started; returns how many earlier starts it had (a
  start not followed by `record_unit`: a process killed mid-unit, whose recorded steps
  the next start restores, so that start's time is not the unit's work)."""
  ledger = read_ledger(out_dir)
  started = ledger.setdefault("started", {})
  earlier = int(started.get(unit.name, 0))
  started[unit.name] = earlier + 1
  write_ledger(out_dir, ledger)
  return earlier


def record_unit(out_dir: str, unit: Unit, seconds: float, predicted: float,
                **details: Any) -> None:
  """Adds a finished unit to the ledger (read again first: the file is the truth);
  `details` holds its `base_seconds` (the prior's figure the calibration scales) and, for
  a unit resumed after a killed start, `earlier_starts`."""
  ledger = read_ledger(out_dir)
  ledger.get("started", {}).pop(unit.name, None)
  if not ledger.get("started"):
    ledger.pop("started", None)
  ledger["units"][unit.name] = {
      "run": unit.run.name, "kind": unit.kind, "model": unit.run.model,
      "seconds": round(float(seconds), 1), "predicted_seconds": round(float(predicted), 1),
      "finished": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
      **details}
  write_ledger(out_dir, ledger)


def run_facts(out_dir: str, run: Run) -> dict[str, Any]:
  """What the run's committed files tell the planner: l* on the calibration items, its
  tokens per item, whether the unpruned model clears the bar."""
  results_path = os.path.join(out_dir, "runs", run.name, "results.json")
  items_path = os.path.join(out_dir, "runs", run.name, "items.jsonl")
  prior = PRIOR_ACCURACY.get((run.model, run.task))
  gap = run_settings(run)["phase_min_gap"]
  facts: dict[str, Any] = {"l_star": None, "tokens": TASK_TOKENS[run.task], "eligible": None,
                           "expected_eligible": prior is None
                           or prior >= CHANCE[run.task] + gap,
                           "assumed_l_star": _model_l_star(out_dir, run),
                           "phase_ran": False}
  if os.path.isfile(items_path):
    tokens, reads = [], []
    with open(items_path) as f:
      for line in f:
        item = json.loads(line)
        tokens.append(item["num_prompt_tokens"])
        reads.append(sum(len(c.split()) * 1.4 for c in item.get("continuations", ["x"])))
    facts["tokens"] = (float(np.mean(tokens)), float(np.mean(reads)))
  if os.path.isfile(results_path):
    with open(results_path) as f:
      results = json.load(f)
    facts["l_star"] = results.get("calibration_transition_block")
    facts["phase_ran"] = True
    full = results["full_model"]
    # A generation run's variants are judged by the exact match of their answers.
    judged = full.get("generation") or {"exact_match": full["accuracy"][-1],
                                        "chance": full["chance"]}
    facts["accuracy"] = judged["exact_match"]
    from dpjax.study.methods import clears_bar
    facts["eligible"] = clears_bar(judged["exact_match"], judged["chance"], gap)
    facts["expected_eligible"] = facts["eligible"]
  return facts


def _model_l_star(out_dir: str, run: Run) -> int | None:
  """Before a run's profile: l* at the depth fraction the model's other runs measured
  (their mean), None where none has a transition (`unit_work` then assumes 3/4). A
  generation run on a multiple-choice task's items (`sciq_open`: SciQ's) takes l* from
  the model's run on that task where it has one."""
  source = os.path.join(out_dir, "runs", f"{run.model}_{run.task.removesuffix('_open')}_cloze",
                        "results.json")
  if run.format == "generate" and os.path.isfile(source):
    with open(source) as f:
      l_star = json.load(f).get("calibration_transition_block")
    if l_star:
      return max(2, int(l_star))
  fractions = []
  for path in glob.glob(os.path.join(out_dir, "runs", f"{run.model}_*", "results.json")):
    with open(path) as f:
      l_star = json.load(f).get("calibration_transition_block")
    if l_star:
      fractions.append(l_star / SHAPES[run.model].num_layers)
  if not fractions:
    return None
  return max(2, round(float(np.mean(fractions)) * SHAPES[run.model].num_layers))


def _work(unit: Unit, facts: dict[str, Any]) -> Work:
  """The unit's work from its run's facts: a run whose profile found no transition ran
  no phase experiment (its phase unit was the profile)."""
  l_star = facts["l_star"] if facts["phase_ran"] else facts["assumed_l_star"]
  no_transition = facts["phase_ran"] and facts["l_star"] is None
  if no_transition and unit.kind == "noise":
    return Work()
  profile_only = not facts["expected_eligible"] or (no_transition and unit.kind == "phase")
  return unit_work(unit, l_star, facts["tokens"], profile_only=profile_only)


@dataclasses.dataclass
class Calibration:
  """What the finished units say about the cost of a unit: the model's fixed cost plus its
  parts (`Work.parts`: block work, decoding and lens reads at the prior rates, whether it
  sweeps pruned variants, and a search curve's lens reads) times `coefficients`, fitted to
  every finished unit of every kind and model (`fit_coefficients`)."""
  fixed: dict[str, float]
  coefficients: np.ndarray = dataclasses.field(default_factory=lambda: PRIOR_COEFFICIENTS.copy())
  units: int = 0  # the finished units it was fitted to

  def seconds(self, model: str, parts: np.ndarray) -> float:
    return self.fixed[model] + float(np.asarray(parts) @ self.coefficients)


# From this many finished units on, every coefficient is fitted on its own (below it, one
# scale on the priors: five coefficients from three units would follow their noise). One
# rate for every kind, not a scale per kind: the units' kinds differ in what they do (a
# phase unit reads every layer of the unpruned model and sweeps tails, a noise unit runs
# whole models, a generation unit decodes token by token), which the parts count; the
# first 17 finished units, each predicted from the 16 others, fell within 1.5x of their
# time 9 times this way against 8 with a line (an overhead and a slope) per kind
# (REPORT.md's table gives the count over every finished unit since).
MIN_FIT_UNITS = len(COST_PARTS) + 2


def fit_coefficients(parts: np.ndarray, spent: np.ndarray,
                     prior: np.ndarray = PRIOR_COEFFICIENTS) -> np.ndarray:
  """Non-negative coefficients `c` minimising the relative error of `parts @ c` against
  `spent` (each unit weighs alike, whatever its length): every subset of the parts the
  units exercise is solved by least squares and the best solution with no negative
  coefficient is kept (five parts: 31 subsets). A part no unit exercised (every row
  zero: no generation unit has finished) keeps its prior."""
  parts, spent = np.asarray(parts, float), np.asarray(spent, float)
  used = [j for j in range(parts.shape[1]) if np.any(parts[:, j] > 0)]
  weighted = parts / spent[:, None]
  best, best_error = None, math.inf
  for size in range(1, len(used) + 1):
    for subset in itertools.combinations(used, size):
      cols = list(subset)
      solution, *_ = np.linalg.lstsq(weighted[:, cols], np.ones_like(spent), rcond=None)
      if np.any(solution < 0):
        continue
      coef = np.zeros(parts.shape[1])
      coef[cols] = solution
      error = float(np.sum((weighted @ coef - 1) ** 2))
      if error < best_error - 1e-12:
        best, best_error = coef, error
  out = np.array(prior, float)
  if best is not None:
    out[used] = best[used]
  return out


# A unit measured beside other work took longer than its work says: its time is
# reported, flagged, and left out of the calibration (it would mispredict the units run
# on a quiet machine). The other work is the unit's mean load average less the cores the
# unit kept busy itself (its CPU seconds over its wall seconds; two where the ledger has
# no CPU time). Beside more than one core of it (half the machine), a unit is contended:
# a unit that got 1.3 of two cores beside a load of 3.7 took 2.1x its prediction.
CONTENDED_OTHER_CORES = 1.0


def unit_load(rec: dict[str, Any]) -> float | None:
  """The unit's mean one-minute load average: sampled through the unit where the ledger
  has it, else the mean of its start and end."""
  if rec.get("load_mean") is not None:
    return float(rec["load_mean"])
  if rec.get("load"):
    return float(np.mean(rec["load"]))
  return None


def other_load(rec: dict[str, Any]) -> float | None:
  """The load beside the unit's own: its mean load less the cores it kept busy."""
  load = unit_load(rec)
  if load is None:
    return None
  own = (rec["cpu_seconds"] / rec["seconds"] if rec.get("cpu_seconds") and rec.get("seconds")
         else 2.0)
  return max(load - own, 0.0)


def contended(rec: dict[str, Any]) -> bool:
  other = other_load(rec)
  return other is not None and other > CONTENDED_OTHER_CORES


# The cores a unit keeps busy on a quiet machine where the ledger has no quiet unit with
# CPU time to say (the quiet units measured 1.3-1.85 of two).
PRIOR_QUIET_CORES = 1.7


def quiet_cores(ledger: dict[str, Any]) -> float:
  """The cores a unit keeps busy on a quiet machine: the quiet units' CPU seconds over
  their wall seconds, summed (the prior where none recorded its CPU time)."""
  quiet = [r for r in ledger.values() if r.get("cpu_seconds") and not contended(r)]
  if not quiet:
    return PRIOR_QUIET_CORES
  return sum(r["cpu_seconds"] for r in quiet) / sum(r["seconds"] for r in quiet)


def quiet_seconds(rec: dict[str, Any], cores: float) -> float | None:
  """What the unit would have taken on a quiet machine: its wall seconds where it ran
  quiet; beside other work, its CPU seconds over the quiet units' cores (the work it
  did, which other work slows far less than the wall clock); None where a contended
  unit has no CPU time."""
  if not contended(rec):
    return float(rec["seconds"])
  if rec.get("cpu_seconds"):
    return float(rec["cpu_seconds"]) / cores
  return None


class LoadSampler:
  """Samples the one-minute load average every `every` seconds while in use (a daemon
  thread), so a unit's record says what ran beside it through its whole run."""

  def __init__(self, every: float = 30.0):
    import threading
    self.every, self.samples = every, [os.getloadavg()[0]]
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._sample, daemon=True)

  def _sample(self) -> None:
    while not self._stop.wait(self.every):
      self.samples.append(os.getloadavg()[0])

  def __enter__(self) -> "LoadSampler":
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()
    self.samples.append(os.getloadavg()[0])

  @property
  def mean(self) -> float:
    return float(np.mean(self.samples))


def finished_costs(out_dir: str, units: Sequence[Unit]) -> list[tuple[Unit, np.ndarray, float]]:
  """Every finished unit of `units` that says what its work costs: (unit, its parts counted
  again from what its run's files now say (its l*, its items' tokens), its seconds on a
  quiet machine beyond the fixed cost (`quiet_seconds`: a unit measured beside other work
  counts by its CPU time)). Left out: skipped units, contended units without CPU time, and
  units whose time is not their whole work (`resumed`)."""
  ledger = read_ledger(out_dir)["units"]
  cores = quiet_cores(ledger)
  by_name = {u.name: u for u in units}
  rows = []
  for name, rec in ledger.items():
    seconds = quiet_seconds(rec, cores)
    if name not in by_name or rec.get("skipped") or seconds is None:
      continue
    if resumed(rec):
      continue
    unit = by_name[name]
    parts = _work(unit, run_facts(out_dir, unit.run)).parts(SHAPES[unit.run.model])
    if not np.any(parts > 0):
      continue
    rows.append((unit, parts, max(seconds - PRIOR_FIXED[rec["model"]], 1.0)))
  return rows


def resumed(rec: dict[str, Any]) -> bool:
  """Whether a finished unit's time is only part of its work: it resumed steps an earlier,
  killed start recorded, or it was recorded again from its run's saved state (shorter
  than loading its model)."""
  return bool(rec.get("earlier_starts")) or rec["seconds"] < PRIOR_FIXED[rec["model"]]


def calibrate(out_dir: str, units: Sequence[Unit]) -> Calibration:
  """The coefficients fitted to the finished units of `units` (`finished_costs`): every
  part on its own from `MIN_FIT_UNITS` units on, one scale on the priors before."""
  rows = finished_costs(out_dir, units)
  if not rows:
    return Calibration(dict(PRIOR_FIXED))
  parts = np.stack([p for _, p, _ in rows])
  spent = np.array([s for _, _, s in rows])
  if len(rows) >= MIN_FIT_UNITS:
    coefficients = fit_coefficients(parts, spent)
  else:
    coefficients = PRIOR_COEFFICIENTS * spent.sum() / (parts @ PRIOR_COEFFICIENTS).sum()
  return Calibration(dict(PRIOR_FIXED), coefficients, len(rows))


def predict(out_dir: str, unit: Unit, calibration: Calibration) -> tuple[float, float]:
  """(seconds, prior seconds) predicted for `unit` from its run's committed files."""
  work = _work(unit, run_facts(out_dir, unit.run))
  shape = SHAPES[unit.run.model]
  return calibration.seconds(unit.run.model, work.parts(shape)), work.base_seconds(shape)


def status(out_dir: str, units: Sequence[Unit],
           every: Sequence[Unit] | None = None) -> list[dict[str, Any]]:
  """Every unit of `units` with its state (done / skipped / to do / after phase / not
  needed) and its predicted and measured seconds, calibrated on the finished units of
  `every` (the whole plan; default `units`)."""
  ledger = read_ledger(out_dir)["units"]
  calibration = calibrate(out_dir, every or units)  # on every finished unit of the plan
  rows = []
  for unit in units:
    rec = ledger.get(unit.name)
    facts = run_facts(out_dir, unit.run)
    predicted, _ = predict(out_dir, unit, calibration)
    if rec is not None:
      state = "skipped" if rec.get("skipped") else "done"
    elif unit.kind != "phase" and not facts["expected_eligible"]:
      state = "not needed"  # below the bar: the phase unit recorded why
    elif unit.kind != "phase" and f"{unit.run.name}:phase" not in ledger:
      state = "after phase"  # every unit of a run builds on its profile and l*
    elif (unit.kind == "noise" and f"{unit.run.name}:phase" in ledger
          and not (facts["l_star"] or 0) > 1):
      state = "not needed"  # no transition (or an empty Silent Phase): no phases to noise
    else:
      state = "to do"
    rows.append({"unit": unit.name, "state": state, "priority": unit.priority, "predicted_seconds": predicted,
                 "measured_seconds": None if rec is None else rec["seconds"],
                 "predicted_before": None if rec is None else rec["predicted_seconds"],
                 "why": None if rec is None else rec.get("skipped")})
  return rows


def hours(seconds: float) -> str:
  return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def format_status(rows: list[dict[str, Any]]) -> str:
  lines = [f"{'unit':<44} {'state':<11} {'predicted':>10} {'measured':>10}"]
  for r in rows:
    measured = "-" if r["measured_seconds"] is None else hours(r["measured_seconds"])
    lines.append(f"{r['unit']:<44} {r['state']:<11} {hours(r['predicted_seconds']):>10} "
                 f"{measured:>10}" + (f"  ({r['why']})" if r["why"] else ""))
  left = sum(r["predicted_seconds"] for r in rows if r["state"] in ("to do", "after phase"))
  done = sum(r["measured_seconds"] or 0 for r in rows if r["state"] in ("done", "skipped"))
  for priority in sorted({r["priority"] for r in rows}):
    upto = [r for r in rows if r["priority"] <= priority and r["state"] != "not needed"]
    lines.append(f"priorities 1-{priority}: {hours(sum(r['predicted_seconds'] for r in upto))} "
                 f"predicted ({len(upto)} units)")
  lines.append(f"done: {hours(done)} measured; left: {hours(left)} predicted "
               f"({sum(r['state'] in ('to do', 'after phase') for r in rows)} units)")
  return "\n".join(lines)
