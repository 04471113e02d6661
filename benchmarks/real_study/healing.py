"""Does healing recover Silent-Phase and Decisive-Phase removals equally?

    python -m benchmarks.real_study.healing                    # Gemma 3 and SmolLM2 on SciQ
    python -m benchmarks.real_study.healing --models=bundled --task=synthetic --format=letter

For each model: one `dpjax` study of the phase experiment alone (the adjacent rule, k up
to `--k`) on the task, then for each arm at k (the `k` blocks just before l*, the Silent
arm, and the first `k` blocks from l* on, the Decisive arm) `dpjax-prune --keep=ARM
--heal_steps=N` (LoRA, Gromov et al.'s defaults, KL to the unpruned model on ARC-Easy's
test split, science text disjoint from SciQ; `--heal_corpus`): both arms healed with the
same budget, scored on the same held-out items.
Per arm: held-out accuracy before and after healing, the gain with its paired interval
and exact McNemar p; per model: the Silent arm's gain minus the Decisive arm's, paired
over the same held-out items (bootstrap), Holm over the models. Where a phase has fewer
than `k` blocks, k is the smaller phase's size (the record says so).

Writes `healing.json`, `HEALING.md` and `healing.png` to `--out_dir` (default
`benchmarks/real_study/healing/`); every step's files stay under `--work_dir` and a
re-run skips what finished.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
from absl import app
from absl import flags

from benchmarks import common

FLAGS = flags.FlagValues()  # this program's own flags (see common.run_program)

_MODELS = flags.DEFINE_list("models", ["smollm2", "gemma3"], "Real models (keys of "
                            "tests.support.real_models.MODELS), or bundled.", flag_values=FLAGS)
_TASK = flags.DEFINE_string("task", "sciq", "Task.", flag_values=FLAGS)
_FORMAT = flags.DEFINE_string("format", "cloze", "Answer format.", flag_values=FLAGS)
_ITEMS = flags.DEFINE_integer("num_items", 100, "Evaluation items (half of them held out).",
                              flag_values=FLAGS)
_CAL = flags.DEFINE_integer("calibration_items", 64, "Calibration items (l* is read on them).",
                            flag_values=FLAGS)
_K = flags.DEFINE_integer("k", 4, "Blocks removed from each phase.", flag_values=FLAGS)
_STEPS = flags.DEFINE_integer("heal_steps", 60, "LoRA steps per arm.", flag_values=FLAGS)
_CORPUS = flags.DEFINE_string("heal_corpus", "task:arc_easy@test", "Healing corpus (SciQ "
                              "has one split, the evaluation's: ARC-Easy's test split is "
                              "science text disjoint from it).", flag_values=FLAGS)
_WORK = flags.DEFINE_string("work_dir", "", "Where the studies and exports live (default: "
                            "~/.cache/dpjax/real_study/healing).", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                   "healing"), "Where the record goes.",
                           flag_values=FLAGS)

ARMS = ("silent", "decisive")


def _model(work: str, key: str) -> str:
  if key == "bundled":
    from dpjax.bundled import BUNDLED_MODEL
    return BUNDLED_MODEL
  from tests.support import real_models
  return real_models.fetch(key)


def _study(work: str, key: str) -> str:
  from dpjax.study import run as study
  from dpjax.study.settings import Settings
  out = os.path.join(work, key, "study")
  if not os.path.isfile(os.path.join(out, "results.json")):
    extra = {"normalization": "options"} if _FORMAT.value == "cloze" else {}
    study.run(Settings(model=_model(work, key), task=_TASK.value, format=_FORMAT.value,
                       methods=("phase",), phase_selections=("adjacent",),
                       phase_max_k=_K.value, phase_ks="doublings", phase_seeds=1,
                       num_items=_ITEMS.value,
                       calibration_items=_CAL.value, transition_items=_CAL.value,
                       curve_layers="iterative", output_dir=out, progress=True, **extra))
  return out


def _arms(study_dir: str) -> tuple[int, dict[str, list[int]], int]:
  """(k used, the arms' kept blocks (0-based), l*) from the study's phase experiment."""
  with open(os.path.join(study_dir, "results.json")) as f:
    results = json.load(f)
  phase = results["phase_experiment"]
  if "skipped" in phase:
    raise RuntimeError(f"{study_dir}: the phase experiment skipped: {phase['skipped']}")
  arms = phase["selections"]["adjacent"]
  k = min(_K.value, max(p["k"] for p in arms["silent"]))
  L = results["model"]["num_layers"]
  kept = {}
  for arm in ARMS:
    point = next(p for p in arms[arm] if p["k"] == k)
    removed = {b - 1 for b in point["removed_sets"][0]}
    kept[arm] = [b for b in range(L) if b not in removed]
  return k, kept, phase["transition_block"]


def _prune(work: str, key: str, study_dir: str, arm: str, kept: list[int]) -> dict:
  from dpjax.variants.budget import PLAN_FILE, PruneSettings, prune
  out = os.path.join(work, key, arm)
  if os.path.isfile(os.path.join(out, PLAN_FILE)):
    with open(os.path.join(out, PLAN_FILE)) as f:
      return json.load(f)
  return prune(PruneSettings(model=_model(work, key), task=_TASK.value, format=_FORMAT.value,
                             study=study_dir, keep=",".join(map(str, kept)),
                             heal_steps=_STEPS.value, heal_corpus=_CORPUS.value,
                             ppl_windows=0, throughput=False,
                             output_dir=out, overwrite=True))


def _heldout_outcomes(plan: dict, study_dir: str, out: str) -> tuple[np.ndarray, np.ndarray]:
  """Per held-out item: pruned and healed 0/1, in the plan's held-out order."""
  with open(os.path.join(study_dir, "variants.jsonl")) as f:
    records = [json.loads(line) for line in f]
  with open(os.path.join(study_dir, "items.jsonl")) as f:
    ids = [json.loads(line)["id"] for line in f]
  pruned = next(r for r in records if list(r["kept"]) == plan["kept_blocks"]
                and r["method"] != "unpruned")
  with open(os.path.join(out, "healed_outcomes.jsonl")) as f:
    healed = {r["id"]: r["correct"] for r in map(json.loads, f)}
  held = plan["items"]["heldout_ids"]
  index = {i: n for n, i in enumerate(ids)}
  return (np.array([pruned["correct"][index[i]] == "1" for i in held], float),
          np.array([healed[i] for i in held], float))


SETTINGS = ("task", "format", "num_items", "heal_steps", "heal_corpus", "k_asked")


def _recorded(out: str, record: dict) -> dict:
  """The models of an earlier record at `out` made with the same settings: kept as they
  are (their work directories may be gone), so a model can be added without rerunning the
  others; delete healing.json to rerun them."""
  path = os.path.join(out, "healing.json")
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    earlier = json.load(f)
  if any(earlier.get(name) != record[name] for name in SETTINGS):
    return {}
  return earlier.get("models", {})


def run_models(work: str, out: str) -> dict:
  from dpjax.study import statistics
  record = {"task": _TASK.value, "format": _FORMAT.value, "num_items": _ITEMS.value,
            "heal_steps": _STEPS.value, "heal_corpus": _CORPUS.value, "k_asked": _K.value,
            "models": {}}
  recorded = _recorded(out, record)
  for key in _MODELS.value:
    if key in recorded and not os.path.isdir(os.path.join(work, key)):
      print(f"{key}: kept from {os.path.join(out, 'healing.json')}", flush=True)
      record["models"][key] = recorded[key]
      continue
    started = time.perf_counter()
    study_dir = _study(work, key)
    k, kept, l_star = _arms(study_dir)
    entry = {"transition_block": l_star, "k": k, "arms": {}}
    gains = {}
    for arm in ARMS:
      plan = _prune(work, key, study_dir, arm, kept[arm])
      before, after = _heldout_outcomes(plan, study_dir, os.path.join(work, key, arm))
      gains[arm] = after - before
      h = plan["healing"]
      entry["arms"][arm] = {
          "removed_blocks": plan["removed_blocks"],
          "unpruned_heldout": plan["accuracy"]["unpruned"]["heldout"],
          "before": plan["accuracy"]["pruned"]["heldout"],
          "after": h["accuracy"]["heldout"], "gain": h["gain_heldout"],
          "loss_first": h["loss_first"], "loss_last": h["loss_last"]}
    diff, ci = statistics.paired_bootstrap(gains["silent"], gains["decisive"])
    entry["gain_difference"] = {"silent_minus_decisive": diff, "ci95": list(ci),
                                "items": int(len(gains["silent"]))}
    entry["seconds"] = time.perf_counter() - started
    record["models"][key] = entry
    print(f"{key}: k={k}, l*={l_star}: gain silent "
          f"{entry['arms']['silent']['gain']['gain']:+.3f}, decisive "
          f"{entry['arms']['decisive']['gain']['gain']:+.3f}; difference {diff:+.3f} "
          f"[{ci[0]:+.3f}, {ci[1]:+.3f}]", flush=True)
  # Holm over every arm's gain test (McNemar).
  tests = [(key, arm) for key in record["models"] for arm in ARMS]
  adjusted = statistics.holm([record["models"][m]["arms"][a]["gain"]["mcnemar_p"]
                              for m, a in tests])
  for (m, a), p in zip(tests, adjusted):
    record["models"][m]["arms"][a]["gain"]["holm_p"] = p
  record["finding"] = finding(record)
  return record


def finding(record: dict) -> str:
  """What the numbers say, computed: per model, whether each arm's gain is significant
  (Holm p < 0.05 with its interval excluding 0) and whether the gains differ (the paired
  interval of their difference excludes 0)."""
  lines = []
  for key, entry in record["models"].items():
    parts = []
    for arm in ARMS:
      g = entry["arms"][arm]["gain"]
      significant = g["holm_p"] < 0.05 and (g["ci95"][0] > 0 or g["ci95"][1] < 0)
      parts.append(f"{arm} arm {'gains' if g['gain'] > 0 else 'changes'} {g['gain']:+.3f} "
                   f"({'significant' if significant else 'not significant'}, Holm p "
                   f"{g['holm_p']:.2g})")
    d = entry["gain_difference"]
    differ = d["ci95"][0] > 0 or d["ci95"][1] < 0
    verdict = (("healing recovers the Silent-Phase removal more" if d["silent_minus_decisive"]
                > 0 else "healing recovers the Decisive-Phase removal more")
               if differ else "the two recoveries cannot be told apart")
    lines.append(f"{key} (k = {entry['k']}): {'; '.join(parts)}; gain difference "
                 f"{d['silent_minus_decisive']:+.3f} [{d['ci95'][0]:+.3f}, "
                 f"{d['ci95'][1]:+.3f}]: {verdict}.")
  return " ".join(lines)


def write(record: dict, out: str) -> None:
  from dpjax import fileio
  from dpjax.report.figures import pyplot
  os.makedirs(out, exist_ok=True)
  fileio.write_json(os.path.join(out, "healing.json"), record)
  rows = ["| model | l* | arm | removed (0-based) | unpruned | before healing | after healing "
          "| gain [95% CI] | Holm p |", "|---|---|---|---|---|---|---|---|---|"]
  for key, entry in record["models"].items():
    for arm in ARMS:
      a = entry["arms"][arm]
      g = a["gain"]
      rows.append(f"| {key} | {entry['transition_block']} | {arm} | "
                  f"{','.join(map(str, a['removed_blocks']))} | "
                  f"{a['unpruned_heldout']['accuracy']:.3f} | {a['before']['accuracy']:.3f} | "
                  f"{a['after']['accuracy']:.3f} | {g['gain']:+.3f} [{g['ci95'][0]:+.3f}, "
                  f"{g['ci95'][1]:+.3f}] | {g['holm_p']:.2g} |")
  text = (f"# Healing Silent-Phase and Decisive-Phase removals\n\n"
          f"{record['task']} ({record['format']}), {record['num_items']} evaluation items "
          f"(held-out half shown), {record['heal_steps']} LoRA steps per arm (rank 8, FFN, KL "
          f"to the unpruned model, corpus `{record['heal_corpus']}`). Generated by "
          f"`python -m benchmarks.real_study.healing`.\n\n" + "\n".join(rows)
          + f"\n\n![healing](healing.png)\n\n**Finding (computed):** {record['finding']}\n")
  fileio.atomic_write_text(os.path.join(out, "HEALING.md"), text)
  plt = pyplot()
  keys = list(record["models"])
  fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
  for ax, key in zip(axes[0], keys):
    entry = record["models"][key]
    for x, arm in enumerate(ARMS):
      a = entry["arms"][arm]
      for dx, stage, color in ((-0.15, "before", "tab:red"), (0.15, "after", "tab:green")):
        acc = a[stage]["accuracy"]
        low, high = a[stage]["ci95"]
        ax.bar(x + dx, acc, width=0.3, color=color, alpha=0.7,
               label=f"{stage} healing" if x == 0 else None)
        ax.errorbar([x + dx], [acc], yerr=[[acc - low], [high - acc]], color="black",
                    capsize=3, lw=1)
    ax.axhline(entry["arms"]["silent"]["unpruned_heldout"]["accuracy"], color="black",
               ls="--", lw=1, label="unpruned")
    ax.set_xticks(range(len(ARMS)), [f"{a} (k={entry['k']})" for a in ARMS])
    ax.set_title(f"{key}: l* = {entry['transition_block']}")
    ax.set_ylabel("held-out accuracy")
    ax.legend(fontsize=7)
  fileio.save_figure(fig, os.path.join(out, "healing.png"))


def main(argv) -> None:
  del argv
  from dpjax.fileio import cache_root
  from absl import logging
  logging.set_verbosity(logging.WARNING)  # the checkpointer's per-save lines
  work = os.path.abspath(_WORK.value) if _WORK.value else cache_root("real_study", "healing")
  os.makedirs(work, exist_ok=True)
  record = run_models(work, _OUT.value)
  write(record, _OUT.value)
  print(f"wrote {os.path.join(_OUT.value, 'HEALING.md')}")


def run() -> None:
  common.run_program(main, FLAGS)


if __name__ == "__main__":
  run()
