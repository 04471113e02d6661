"""The study on real pretrained models: every run, resumable, then one report across them.

    python -m benchmarks.real_study                 # every run of the plan, then the report
    python -m benchmarks.real_study --only=smollm2  # the runs whose name holds "smollm2"
    python -m benchmarks.real_study --report_only   # the report from the runs done so far

Each run is one `dpjax` study (`dpjax.study.run`) of one model, task, answer
format and lens, in its own directory under `--work_dir` (default
`~/.cache/dpjax/real_study`; the study's own Orbax state makes a killed run
resume). The models are the three GGUF files of `benchmarks.real_models`, the
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

_ONLY = flags.DEFINE_string("only", "", "Run only the plan entries whose name holds this.")
_WORK = flags.DEFINE_string("work_dir", "", "Where runs and their state live (default: "
                            "~/.cache/dpjax/real_study).")
_OUT = flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                   "real_study"), "Where the report goes.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Write the report from finished runs.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "List the plan and stop.")

# Files of a finished run that are kept in the repository (not the state, not the arrays).
KEPT_FILES = ("summary.md", "results.json", "decision_margin.png", "decision_margin_lenses.png",
              "pruning_curves.png", "phase_comparison.png", "iterative_heatmap.png",
              "removed_blocks.png", "option_frequency.png")


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  model: str          # a key of benchmarks.real_models.MODELS
  task: str
  format: str
  settings: tuple = ()  # extra Settings fields, as (name, value) pairs
  lens: str = "logit"   # or a lens key of LENSES


# The evaluation: 300 items per task (ARC-Easy has 570 in validation, SciQ 1000, PIQA
# 1838), 64 calibration items apart; every method; the phase experiment with all three
# selection rules. One-shot baselines read their last block only (--curve_layers=iterative).
COMMON = (("num_items", 300), ("calibration_items", 64), ("curve_layers", "iterative"),
          ("random_seeds", 3), ("batch_size", 16))
PLAN = (
    Run("smollm2_arc_easy_cloze", "smollm2", "arc_easy", "cloze"),
    Run("smollm2_sciq_cloze", "smollm2", "sciq", "cloze"),
    Run("smollm2_piqa_cloze", "smollm2", "piqa", "cloze"),
    Run("gemma3_arc_easy_cloze", "gemma3", "arc_easy", "cloze"),
    Run("qwen25_arc_easy_cloze", "qwen25", "arc_easy", "cloze"),
    Run("qwen25_arc_easy_letter_5shot", "qwen25", "arc_easy", "letter", (("k_shot", 5),)),
    Run("smollm2_nq_open", "smollm2", "nq_open", "open"),
    Run("gemma3_sciq_cloze", "gemma3", "sciq", "cloze"),
    Run("gemma3_piqa_cloze", "gemma3", "piqa", "cloze"),
    Run("qwen25_sciq_cloze", "qwen25", "sciq", "cloze"),
    Run("qwen25_piqa_cloze", "qwen25", "piqa", "cloze"),
)
# Tuned lenses (dpjax-train-lens), and the runs read through them.
LENSES = {"smollm2_arc_easy": dict(model="smollm2", corpus="task:arc_easy", steps=300)}
TUNED_RUNS = (
    Run("smollm2_arc_easy_cloze_tuned", "smollm2", "arc_easy", "cloze",
        (("methods", ("phase", "reverse", "block_influence")),), lens="smollm2_arc_easy"),
)


def work_dir() -> str:
  if _WORK.value:
    return os.path.abspath(_WORK.value)
  root = os.environ.get("DPJAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dpjax")
  return os.path.join(root, "real_study")


def _model_link(work: str, key: str) -> str:
  """`models/<key>.gguf` under the work directory (so results record a relative path)."""
  from benchmarks import real_models
  os.makedirs(os.path.join(work, "models"), exist_ok=True)
  link = os.path.join("models", f"{key}.gguf")
  target = real_models.fetch(key)
  if not os.path.islink(os.path.join(work, link)):
    os.symlink(target, os.path.join(work, link))
  return link


def train_lens(work: str, key: str) -> str:
  """The tuned lens `key` of LENSES, trained once (resumable)."""
  from dpjax import tuned_lens
  from dpjax.train_lens import LensSettings, train
  spec = LENSES[key]
  path = os.path.join("lenses", key)
  if not os.path.isfile(os.path.join(work, path, tuned_lens.LENS_FILE)):
    started = time.perf_counter()
    train(LensSettings(model=_model_link(work, spec["model"]), output_dir=path,
                       corpus=spec["corpus"], steps=spec["steps"]))
    print(f"lens {key}: {time.perf_counter() - started:.0f} s", flush=True)
  return path


def run_one(work: str, run: Run, out_dir: str) -> None:
  from dpjax import study
  from dpjax.settings import Settings
  output = os.path.join("runs", run.name)
  if os.path.isfile(os.path.join(work, output, "results.json")):
    print(f"{run.name}: done before", flush=True)
  else:
    lens = "logit" if run.lens == "logit" else f"tuned:{train_lens(work, run.lens)}"
    settings = Settings(model=_model_link(work, run.model), task=run.task, format=run.format,
                        output_dir=output, lens=lens, **dict(COMMON), **dict(run.settings))
    started = time.perf_counter()
    results = study.run(settings)
    print(f"{run.name}: {time.perf_counter() - started:.0f} s; accuracy "
          f"{results.full_model.final_accuracy:.3f}, l* {results.full_model.transition_block}",
          flush=True)
  kept = os.path.join(out_dir, "runs", run.name)
  os.makedirs(kept, exist_ok=True)
  for name in KEPT_FILES:
    source = os.path.join(work, output, name)
    if os.path.isfile(source):
      shutil.copy2(source, os.path.join(kept, name))


def main(argv):
  del argv
  work = work_dir()
  os.makedirs(work, exist_ok=True)
  os.chdir(work)  # models, lenses and runs are recorded relative to it
  runs = [r for r in PLAN + TUNED_RUNS if _ONLY.value in r.name]
  if _DRY_RUN.value:
    for r in runs:
      print(r)
    return
  if not _REPORT_ONLY.value:
    from dpjax.tasks.benchmarks import default_data_dir
    from dpjax.tasks.fetch import fetch_benchmarks
    fetch_benchmarks(default_data_dir(), sorted({r.task for r in runs}))
    for run in runs:
      run_one(work, run, _OUT.value)
  from benchmarks import real_study_report
  real_study_report.write_report(_OUT.value, PLAN + TUNED_RUNS)


if __name__ == "__main__":
  app.run(main)
