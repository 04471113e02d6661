"""The campaign on real pretrained models: runs cut into units, progress kept in the repository.

    python -m benchmarks.real_study --dry_run      # every unit: predicted (and measured) time
    python -m benchmarks.real_study --hours=3      # run units in priority order for 3 hours
    python -m benchmarks.real_study --only=smollm2 # the units of runs whose name holds this
    python -m benchmarks.real_study --report_only  # REPORT.md and VERDICT.md from the files
    python -m benchmarks.real_study --size=full    # the full-size plan (an accelerator)

The plan, its units and their cost model are `benchmarks.real_study.campaign`. Each
run's directory `runs/<name>/` (under `--out_dir`, this folder by default) is the
study's output directory: results.json, variants.jsonl, items.jsonl, the summary and
figures, and `progress/`, the study's saved records and the unpruned model's readouts
(compressed). All of it is kept in the repository and is the campaign's state: a rerun
on a fresh clone with an empty cache continues from it and computes nothing it records
(the study's Orbax copies in `state/` and the model files in `models/` are not kept).
`ledger.json` lists the finished units with their measured and predicted seconds. A
unit killed midway loses at most its own work in flight (the study saves each curve
and each Iterative Pruning step as it finishes). The models are the three GGUF files
of `tests.support.real_models`; the tasks come from `dpjax-data`. Then
`report.write_report` writes REPORT.md and VERDICT.md from the runs' files.
"""

from __future__ import annotations

import os
import time

from absl import app
from absl import flags

from benchmarks import common
from benchmarks.real_study import campaign
from benchmarks.real_study.campaign import Run, Unit

FLAGS = flags.FlagValues()  # this program's own flags (see common.run_program)

_ONLY = flags.DEFINE_string("only", "", "Run only the units of this run (its exact name), or "
                            "of the runs whose name holds this.", flag_values=FLAGS)
_KINDS = flags.DEFINE_list("units", [], f"Run only these kinds of unit "
                           f"({', '.join(campaign.UNIT_KINDS)}); default: all.",
                           flag_values=FLAGS)
_OUT = flags.DEFINE_string("out_dir", "", "Where the runs, the ledger and the report go "
                           "(default: this folder for --size=local, its full/ folder for "
                           "--size=full).", flag_values=FLAGS)
_SIZE = flags.DEFINE_enum("size", "local", list(campaign.SIZES), "The plan's size: local "
                          "(fits two CPU cores in 12 hours) or full (300 items, 10 seeds, "
                          "every method on every run: for an accelerator).", flag_values=FLAGS)
_HOURS = flags.DEFINE_float("hours", 0.0, "Stop cleanly before a unit whose predicted time "
                            "would pass this many hours since the start (0: no limit).",
                            flag_values=FLAGS)
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Write the report from the runs' "
                                 "files and stop.", flag_values=FLAGS)
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print every unit's state with its predicted "
                             "(and, when done, measured) time, and the plan's total.",
                             flag_values=FLAGS)

# The run whose numbers are recomputed with HF PyTorch (after its Iterative Pruning).
HF_CHECKED = "smollm2_arc_easy_cloze"
HF_CHECK_STEPS = 3
# Files the study writes that are not kept (large, or recomputed from the kept ones).
NOT_KEPT = ("state", "readouts.npz")


def out_dir() -> str:
  if _OUT.value:
    return os.path.abspath(_OUT.value)
  here = os.path.dirname(os.path.abspath(__file__))
  return here if _SIZE.value == "local" else os.path.join(here, "full")


def model_link(out: str, key: str) -> str:
  """`models/<key>.gguf` under `out` (so results record a relative path), linked to the
  file `tests.support.real_models` fetched."""
  from tests.support import real_models
  os.makedirs(os.path.join(out, "models"), exist_ok=True)
  link = os.path.join("models", f"{key}.gguf")
  target = real_models.fetch(key)
  path = os.path.join(out, link)
  if os.path.islink(path) and os.readlink(path) != target:
    os.remove(path)
  if not os.path.islink(path):
    os.symlink(target, path)
  return link


def _settings(out: str, run: Run, output: str, methods):
  """The run's study settings (a plan field this dpjax does not have is left out: the
  noise probe's, before the method exists; none of them is fingerprinted)."""
  import dataclasses

  from dpjax.study.settings import Settings
  known = {f.name for f in dataclasses.fields(Settings)}
  fields = {k: v for k, v in run.fields.items() if k in known}
  return Settings(model=model_link(out, run.model), task=run.task, format=run.format,
                  output_dir=output, lens=run.lens, methods=tuple(methods), **fields)


def hf_check(out_dir: str, run: Run, output: str) -> dict:
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
  settings = _settings(out_dir, run, output, ("iterative",))  # the search's items
  if settings.format != "cloze" or settings.k_shot or settings.cloze_norm != "none":
    raise ValueError(f"the HF check scores 0-shot cloze runs; {run.name} is not one.")
  with open(os.path.join(out_dir, output, "results.json")) as f:
    results = json.load(f)
  _, _, _, calibration, evaluation = study.select_items(settings)
  calibration = calibration[:settings.calibration_items]  # the search's items
  path = os.path.realpath(settings.model)
  where, name = os.path.dirname(path), os.path.basename(path)
  tokenizer = transformers.AutoTokenizer.from_pretrained(where, gguf_file=name)
  # The dense dequantized model (transformers 5 otherwise keeps GGUF weights packed).
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      where, gguf_file=name, dtype=torch.float32, attn_implementation="eager",
      quantization_config=transformers.GgufConfig(dequantize=True)).eval()
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
  atomic_write_text(os.path.join(out_dir, output, "hf_check.json"), json.dumps(check, indent=2))
  worst = max(abs(r["dpjax"] - r["hf"]) * r["n"] for r in rows)
  # The vocab margin of a multi-token continuation is a product of probabilities (often
  # below 1e-4), so it is compared relatively.
  worst_dm = max(abs(r["dpjax_dm"] - r["hf_dm"]) / max(abs(r["hf_dm"]), 1e-12) for r in rows)
  if worst > 1 + 1e-9 or worst_dm > 1e-2:
    raise RuntimeError(f"{run.name}: dpjax and HF PyTorch differ by {worst:.0f} items and "
                       f"{worst_dm:.1e} (relative) in mean DM (see hf_check.json); the report is not "
                       "written.")
  return check



def done_kinds(out: str, run: Run) -> list[str]:
  ledger = campaign.read_ledger(out)["units"]
  return [kind for kind in campaign.UNIT_KINDS
          if f"{run.name}:{kind}" in ledger and not ledger[f"{run.name}:{kind}"].get("skipped")]


def run_unit(out: str, unit: Unit, predicted: float, base: float) -> dict:
  """One unit: the study with the run's finished methods (restored from its progress
  files) and the unit's own; recorded in the ledger."""
  from dpjax.study import run as study
  output = os.path.join("runs", unit.run.name)
  methods = campaign.methods_of(unit, done_kinds(out, unit.run))
  earlier = campaign.start_unit(out, unit)
  started, cpu = time.perf_counter(), time.process_time()
  with campaign.LoadSampler() as load:
    results = study.run(_settings(out, unit.run, output, methods))
  seconds = time.perf_counter() - started
  # What else ran beside it: the load through its run, at its start and end, and its own
  # CPU time (a unit measured on a busy machine takes longer than its work says).
  details_load = {"cpu_seconds": round(time.process_time() - cpu, 1),
                  "load": [round(load.samples[0], 2), round(load.samples[-1], 2)],
                  "load_mean": round(load.mean, 2)}
  full = results.full_model
  details = {"base_seconds": round(base, 2), **details_load, "accuracy": round(float(full.outcome_accuracy), 4),
             "chance": round(float(full.outcome_chance), 4),
             "l_star": results.calibration_transition_block}
  if earlier:
    details["earlier_starts"] = earlier
  phase = results.phase_experiment
  if unit.kind == "phase" and phase is not None and phase.skipped and "phase_min_gap" in (
      phase.skipped or ""):
    details["below_bar"] = True
  campaign.record_unit(out, unit, seconds, predicted, **details)
  print(f"{unit.name}: {seconds:.0f} s (predicted {predicted:.0f} s); {full.outcome_name} "
        f"{full.outcome_accuracy:.3f}, l* {results.calibration_transition_block}", flush=True)
  check_with_hf(out)
  return details


def check_with_hf(out: str) -> None:
  """The HF check of `HF_CHECKED`'s Iterative Pruning, once its unit is recorded (again
  at the next campaign where an earlier one was cut short)."""
  run = next(r for r in campaign.runs(campaign.LOCAL) if r.name == HF_CHECKED)
  output = os.path.join("runs", run.name)
  if (f"{run.name}:iterative" in campaign.read_ledger(out)["units"]
      and not os.path.isfile(os.path.join(out, output, "hf_check.json"))):
    hf_check(out, run, output)


def main(argv):
  del argv
  from dpjax.cli.program import quiet_logs
  quiet_logs()  # Orbax logs every save at INFO: off unless --verbosity asks
  size = campaign.SIZES[_SIZE.value]
  out = out_dir()
  unknown = sorted(set(_KINDS.value) - set(campaign.UNIT_KINDS))
  if unknown:
    raise app.UsageError(f"--units={','.join(_KINDS.value)} names {unknown}; the kinds are "
                         f"{', '.join(campaign.UNIT_KINDS)}.")
  units = campaign.plan(size)
  every_run = campaign.runs(size)
  if _ONLY.value:
    exact = [u for u in units if u.run.name == _ONLY.value]
    units = exact or [u for u in units if _ONLY.value in u.run.name]
  if _KINDS.value:
    units = [u for u in units if u.kind in _KINDS.value]
  if _DRY_RUN.value:
    print(campaign.format_status(campaign.status(out, units, campaign.plan(size))))
    return
  os.makedirs(os.path.join(out, "runs"), exist_ok=True)
  if not _REPORT_ONLY.value:
    from dpjax.tasks.benchmarks import default_data_dir
    from dpjax.tasks.fetch import fetch_benchmarks
    fetch_benchmarks(default_data_dir(), sorted({u.run.task for u in units}))
    os.chdir(out)  # models and runs are recorded relative to it
    clock = time.perf_counter()
    budget = _HOURS.value * 3600
    check_with_hf(out)
    for unit in units:
      row = {r["unit"]: r for r in campaign.status(out, [unit], campaign.plan(size))}[
          unit.name]
      if row["state"] != "to do":
        continue
      calibration = campaign.calibrate(out, campaign.plan(size))
      predicted, base = campaign.predict(out, unit, calibration)
      elapsed = time.perf_counter() - clock
      if budget and elapsed + predicted > budget:
        print(f"stopping before {unit.name}: predicted {campaign.hours(predicted)}, "
              f"{campaign.hours(budget - elapsed)} of --hours={_HOURS.value} left", flush=True)
        break
      print(f"{unit.name}: starting, predicted {campaign.hours(predicted)} "
            f"({campaign.hours(elapsed)} into this campaign)", flush=True)
      run_unit(out, unit, predicted, base)
    print(campaign.format_status(campaign.status(out, campaign.plan(size))), flush=True)
  from benchmarks.real_study import report as real_study_report
  real_study_report.write_report(out, every_run)


def run() -> None:
  common.run_program(main, FLAGS)
