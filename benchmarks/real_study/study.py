"""The study on real pretrained models: every run, resumable, then one report across them.

    python -m benchmarks.real_study                 # every run of the plan, then the report
    python -m benchmarks.real_study --only=smollm2  # the runs whose name holds "smollm2"
    python -m benchmarks.real_study --report_only   # the report from the runs done so far
    python -m benchmarks.real_study --methods=phase # a first pass: the phase experiments

Each run is one `dpjax` study (`dpjax.study.run.run`) of one model, task, answer
format and lens, in its own directory under `--work_dir` (default
`~/.cache/dpjax/real_study`; the study's own Orbax state makes a killed run
resume). The models are the three GGUF files of `tests.support.real_models`, the
tasks come from `dpjax-data`. A finished run's summary, results.json and
figures are copied to `--out_dir` (default `benchmarks/real_study/runs/`); the
state stays behind. Then `report.report` reads every finished run and writes
REPORT.md and its figures.

The plan (`PLAN`) and what it cuts, and why, are written in REPORT.md.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time

from absl import app
from absl import flags

from benchmarks import common

FLAGS = flags.FlagValues()  # this program's own flags (see common.run_program)

_ONLY = flags.DEFINE_string("only", "", "Run only this plan entry (its exact name), or the "
                            "entries whose name holds this.", flag_values=FLAGS)
_WORK = flags.DEFINE_string("work_dir", "", "Where runs and their state live (default: "
                            "~/.cache/dpjax/real_study).", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out_dir", os.path.dirname(os.path.abspath(__file__)),
                           "Where the runs' kept files and the report go.", flag_values=FLAGS)
_METHODS = flags.DEFINE_list(
    "methods", [], "Run only these of each selected run's methods (a first pass: "
    "`--methods=phase` gives every run's phase experiment first). A run so cut is not "
    "finished: a later pass without the flag runs the rest, reusing its saved state.",
    flag_values=FLAGS)
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Write the report from finished runs.",
                                 flag_values=FLAGS)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "List the plan and stop.", flag_values=FLAGS)
_RERUN = flags.DEFINE_bool("rerun", False, "Run the selected runs again even where they "
                           "finished (after a change to what a study records); what their "
                           "saved state holds, finished curves and pruning steps, is reused.",
                           flag_values=FLAGS)

# Files of a finished run that are kept in the repository (not the state, not the arrays):
# items.jsonl and variants.jsonl are what every paired comparison recomputes from.
KEPT_FILES = ("summary.md", "results.json", "variants.jsonl", "items.jsonl", "hf_check.json",
              "decision_margin.png", "decision_margin_lenses.png", "pruning_curves.png",
              "phase_comparison.png", "phase_differences.png", "iterative_heatmap.png",
              "removed_blocks.png", "option_frequency.png", "accuracy_throughput.png",
              "throughput.json", "throughput.csv")


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  model: str          # a key of tests.support.real_models.MODELS
  task: str
  format: str
  settings: tuple = ()  # extra Settings fields, as (name, value) pairs
  lens: str = "logit"   # or a lens key of LENSES


# Every run: 300 evaluation items (ARC-Easy has 570 in validation, SciQ 1000, PIQA 1838);
# apart from them 128 calibration items, on which l* is read with its bootstrap interval,
# the first 64 of them the pruning search's. One-shot baselines read their last block only
# (--curve_layers=iterative). The random baseline over 3 seeds, the phase experiment's
# random rule over 10 (the default), the batch chosen by the fit step.
COMMON = (("num_items", 300), ("calibration_items", 64), ("transition_items", 128),
          ("curve_layers", "iterative"), ("random_seeds", 3))
# Cloze runs read the Decision Margin with the options normalization (a softmax over the
# options' summed log-probabilities). Under the vocab normalization a multi-token
# option's probability is the product of its tokens' (SmolLM2 on ARC-Easy: mean DM of
# order 1e-3 at the last layer), so the mean DM, and with it l*, is decided by the few
# items with the shortest options. (Iterative Pruning's accuracy criterion and every
# one-shot ranking read no normalization.)
CLOZE = (("normalization", "options"),)
# Every multiple-choice cloze run: the whole study (profile, Iterative Pruning, the
# one-shot baselines, the phase experiment with its five rules and the phase-aware method,
# which skips itself where the Decisive Phase is a single block). Gemma 3's 262k
# vocabulary and Qwen2.5's 4.2x heavier blocks make their phase experiment run at
# k = 1, 2, 4, ... and the smaller phase's size (--phase_ks=doublings).
DOUBLINGS = (("phase_ks", "doublings"),)
PHASE_ONLY = (("methods", ("phase",)),)
# NQ-open, the open format, and the 5-shot letter format: the profile and the phase
# experiment (whether a transition shows at all; the letter format: whether small models
# answer letters above chance).
OPEN = PHASE_ONLY + DOUBLINGS
LETTER = (("k_shot", 5),) + PHASE_ONLY + DOUBLINGS
# In cost order (the cheapest first), so that a pass (`--methods=phase`) gives the
# cheap runs' verdicts first.
PLAN = (
    Run("smollm2_arc_easy_cloze", "smollm2", "arc_easy", "cloze", CLOZE),
    Run("smollm2_arc_easy_letter_5shot", "smollm2", "arc_easy", "letter", LETTER),
    Run("smollm2_nq_open", "smollm2", "nq_open", "open", OPEN),
    Run("smollm2_sciq_cloze", "smollm2", "sciq", "cloze", CLOZE),
    Run("smollm2_piqa_cloze", "smollm2", "piqa", "cloze", CLOZE),
    Run("gemma3_arc_easy_cloze", "gemma3", "arc_easy", "cloze", CLOZE + DOUBLINGS),
    Run("gemma3_arc_easy_letter_5shot", "gemma3", "arc_easy", "letter", LETTER),
    Run("qwen25_arc_easy_cloze", "qwen25", "arc_easy", "cloze", CLOZE + DOUBLINGS),
    Run("qwen25_arc_easy_letter_5shot", "qwen25", "arc_easy", "letter", LETTER),
    Run("qwen25_arc_easy_letter_5shot_accuracy_rule", "qwen25", "arc_easy", "letter",
        (("transition_rule", "accuracy"),) + LETTER),
    Run("qwen25_nq_open", "qwen25", "nq_open", "open", OPEN),
    Run("gemma3_sciq_cloze", "gemma3", "sciq", "cloze", CLOZE + DOUBLINGS),
    Run("gemma3_piqa_cloze", "gemma3", "piqa", "cloze", CLOZE + DOUBLINGS),
    Run("qwen25_sciq_cloze", "qwen25", "sciq", "cloze", CLOZE + DOUBLINGS),
    Run("qwen25_piqa_cloze", "qwen25", "piqa", "cloze", CLOZE + DOUBLINGS),
)
# Tuned lenses (dpjax-train-lens), and the runs read through them.
# The lens learns from ARC-Easy's test split; the runs evaluate its validation split.
LENSES = {"smollm2_arc_easy": dict(model="smollm2", corpus="task:arc_easy@test", steps=300)}
# Under another lens only what depends on l* can change: the phase experiment runs.
TUNED_RUNS = (
    Run("smollm2_arc_easy_cloze_tuned", "smollm2", "arc_easy", "cloze", CLOZE + PHASE_ONLY,
        lens="smollm2_arc_easy"),
)


# The run whose numbers are recomputed with HF PyTorch before the report is written.
HF_CHECKED = "smollm2_arc_easy_cloze"
HF_CHECK_STEPS = 3


def select(only: str) -> list[Run]:
  """The runs `--only` names: one run by its exact name, else every run whose name holds it."""
  every = PLAN + TUNED_RUNS
  exact = [r for r in every if r.name == only]
  return exact or [r for r in every if only in r.name]


def work_dir() -> str:
  if _WORK.value:
    return os.path.abspath(_WORK.value)
  from dpjax.fileio import cache_root
  return cache_root("real_study")


def _model_link(work: str, key: str) -> str:
  """`models/<key>.gguf` under the work directory (so results record a relative path)."""
  from tests.support import real_models
  os.makedirs(os.path.join(work, "models"), exist_ok=True)
  link = os.path.join("models", f"{key}.gguf")
  target = real_models.fetch(key)
  if not os.path.islink(os.path.join(work, link)):
    os.symlink(target, os.path.join(work, link))
  return link


def train_lens(work: str, key: str) -> str:
  """The tuned lens `key` of LENSES, trained once (resumable)."""
  from dpjax.lens import tuned as tuned_lens
  from dpjax.lens.training import LensSettings, train
  spec = LENSES[key]
  path = os.path.join("lenses", key)
  if not os.path.isfile(os.path.join(work, path, tuned_lens.LENS_FILE)):
    started = time.perf_counter()
    train(LensSettings(model=_model_link(work, spec["model"]), output_dir=path,
                       corpus=spec["corpus"], steps=spec["steps"]))
    print(f"lens {key}: {time.perf_counter() - started:.0f} s", flush=True)
  kept = os.path.join(_OUT.value, "lenses")
  os.makedirs(kept, exist_ok=True)  # the lens's record (held-out KL per layer), not its weights
  shutil.copy2(os.path.join(work, path, tuned_lens.LENS_FILE), os.path.join(kept, f"{key}.json"))
  return path


def _methods(run: Run, only_methods=()) -> tuple:
  """The run's methods; `only_methods` keeps only those of them."""
  from dpjax.study.settings import METHODS
  methods = dict(run.settings).get("methods", METHODS)
  return tuple(m for m in methods if m in only_methods) if only_methods else tuple(methods)


def _settings(work: str, run: Run, output: str, only_methods=()):
  """The run's study settings; `only_methods` keeps only those of its methods."""
  from dpjax.study.settings import Settings
  lens = "logit" if run.lens == "logit" else f"tuned:{train_lens(work, run.lens)}"
  fields = {**dict(COMMON), **dict(run.settings), "methods": _methods(run, only_methods)}
  return Settings(model=_model_link(work, run.model), task=run.task, format=run.format,
                  output_dir=output, lens=lens, **fields)


def _finished(work: str, output: str, methods) -> bool:
  """Whether the run's results.json exists and records every one of `methods`."""
  import json
  path = os.path.join(work, output, "results.json")
  if not os.path.isfile(path):
    return False
  with open(path) as f:
    ran = json.load(f)["settings"]["methods"]
  return set(methods) <= set(ran)


def hf_check(work: str, run: Run, output: str) -> dict:
  """The run's final-layer accuracy on its evaluation items and the calibration accuracy
  of its first Iterative Pruning variants, recomputed with HF PyTorch.

  transformers loads the same GGUF file; blocks are deleted from `model.model.layers`
  (`tests.support.reference.delete_blocks`); every option is scored as lm-eval scores a
  cloze request (`reference.lm_eval_cloze_scores`: context and continuation encoded
  apart, the whole sequence alone, the continuation's log-probabilities summed). The
  items are the run's own (`dpjax.study.run.select_items`). Raises when HF and dpjax
  disagree by more than one item (a near tie may fall either way between float32
  implementations) or by more than 1% in mean Decision Margin; otherwise returns the figures, also written to `hf_check.json`.
  """
  import json

  import numpy as np
  import torch
  import transformers

  from tests.support import reference
  from dpjax import tasks
  from dpjax.study import run as study
  from dpjax.fileio import atomic_write_text
  settings = _settings(work, run, output)
  if settings.format != "cloze" or settings.k_shot or settings.cloze_norm != "none":
    raise ValueError(f"the HF check scores 0-shot cloze runs; {run.name} is not one.")
  with open(os.path.join(work, output, "results.json")) as f:
    results = json.load(f)
  _, _, _, calibration, evaluation = study.select_items(settings)
  calibration = calibration[:settings.calibration_items]  # the search's items
  path = os.path.realpath(settings.model)
  where, name = os.path.dirname(path), os.path.basename(path)
  tokenizer = transformers.AutoTokenizer.from_pretrained(where, gguf_file=name)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      where, gguf_file=name, dtype=torch.float32, attn_implementation="eager").eval()
  layers, types = list(hf.model.layers), getattr(hf.config, "layer_types", None)

  def scores(items, keep) -> tuple[float, float]:
    """Accuracy and mean Decision Margin (vocab: exp of the summed log-probabilities)."""
    reference.delete_blocks(hf, keep, all_layers=layers, layer_types=types)
    correct, margin = 0, 0.0
    for item in items:
      s, _ = reference.lm_eval_cloze_scores(hf, tokenizer, tasks.cloze_requests(item))
      correct += int(np.argmax(s)) == item.answer  # ties to the lower option
      p = np.exp(s)
      margin += p[item.answer] - np.delete(p, item.answer).max()
    return correct / len(items), margin / len(items)

  started = time.perf_counter()
  keep = np.ones(len(layers), bool)
  full = results["full_model"]
  rows = [{"variant": "unpruned", "items": "evaluation", "n": len(evaluation),
           "dpjax": full["accuracy"][-1], "dpjax_dm": full["decision_margin"]["vocab"]["mean"][-1]}]
  rows[0]["hf"], rows[0]["hf_dm"] = scores(evaluation, keep)
  iterative = results["methods"]["iterative_accuracy"]
  for step in range(HF_CHECK_STEPS):
    removed = iterative["removed_order"][step]
    keep[removed - 1] = False
    rows.append({"variant": f"step {step + 1}: block {removed} removed",
                 "items": "calibration", "n": len(calibration),
                 "dpjax": iterative["calibration"][step]["accuracy"],
                 "dpjax_dm": iterative["calibration"][step]["mean_final_dm_vocab"]})
    rows[-1]["hf"], rows[-1]["hf_dm"] = scores(calibration, keep)
  check = {"run": run.name, "rows": rows, "seconds": time.perf_counter() - started,
           "reference": "transformers (PyTorch, float32) on the same GGUF, blocks deleted, "
                        "lm-eval cloze scoring"}
  for row in rows:
    print(f"HF check {row['variant']} ({row['items']}, {row['n']} items): dpjax "
          f"{row['dpjax']:.4f}, HF {row['hf']:.4f}; mean DM (vocab) dpjax "
          f"{row['dpjax_dm']:.5e}, HF {row['hf_dm']:.5e}", flush=True)
  atomic_write_text(os.path.join(work, output, "hf_check.json"), json.dumps(check, indent=2))
  worst = max(abs(r["dpjax"] - r["hf"]) * r["n"] for r in rows)
  # The vocab margin of a multi-token continuation is a product of probabilities (often
  # below 1e-4), so it is compared relatively.
  worst_dm = max(abs(r["dpjax_dm"] - r["hf_dm"]) / max(abs(r["hf_dm"]), 1e-12) for r in rows)
  if worst > 1 + 1e-9 or worst_dm > 1e-2:
    raise RuntimeError(f"{run.name}: dpjax and HF PyTorch differ by {worst:.0f} items and "
                       f"{worst_dm:.1e} (relative) in mean DM (see hf_check.json); the report is not "
                       "written.")
  return check


def run_one(work: str, run: Run, out_dir: str, rerun: bool = False,
            only_methods=()) -> None:
  from dpjax.study import run as study
  output = os.path.join("runs", run.name)
  methods = _methods(run, only_methods)
  if only_methods and not methods:
    print(f"{run.name}: none of --methods={','.join(only_methods)}; left for later", flush=True)
    return
  if _finished(work, output, methods) and not rerun:
    print(f"{run.name}: done before", flush=True)
  else:
    settings = _settings(work, run, output, only_methods)
    started = time.perf_counter()
    results = study.run(settings)
    print(f"{run.name}: {time.perf_counter() - started:.0f} s; accuracy "
          f"{results.full_model.final_accuracy:.3f}, l* {results.full_model.transition_block}",
          flush=True)
  checkable = _finished(work, output, ("iterative",))  # the check reads its first steps
  if (run.name == HF_CHECKED and checkable
      and not os.path.isfile(os.path.join(work, output, "hf_check.json"))):
    hf_check(work, run, output)
  kept = os.path.join(out_dir, "runs", run.name)
  os.makedirs(kept, exist_ok=True)
  for name in KEPT_FILES:
    source = os.path.join(work, output, name)
    if os.path.isfile(source):
      shutil.copy2(source, os.path.join(kept, name))


def main(argv):
  del argv
  from dpjax.study.settings import METHODS
  unknown = sorted(set(_METHODS.value) - set(METHODS))
  if unknown:
    raise app.UsageError(f"--methods={','.join(_METHODS.value)} names {unknown}, which are "
                         f"not methods; choose from {', '.join(METHODS)}.")
  work = work_dir()
  os.makedirs(work, exist_ok=True)
  # A relative --out_dir names a folder under the caller's directory, not the work one.
  FLAGS.out_dir = os.path.abspath(_OUT.value)
  os.chdir(work)  # models, lenses and runs are recorded relative to it
  runs = select(_ONLY.value)
  if _DRY_RUN.value:
    for r in runs:
      print(r)
    return
  if not _REPORT_ONLY.value:
    from dpjax.tasks.benchmarks import default_data_dir
    from dpjax.tasks.fetch import fetch_benchmarks
    fetch_benchmarks(default_data_dir(), sorted({r.task for r in runs}))
    for run in runs:
      run_one(work, run, _OUT.value, rerun=_RERUN.value, only_methods=tuple(_METHODS.value))
  from benchmarks.real_study import report as real_study_report
  real_study_report.write_report(_OUT.value, PLAN + TUNED_RUNS)


def run() -> None:
  common.run_program(main, FLAGS)
