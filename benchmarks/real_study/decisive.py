"""The paper's second question: does pruning only the Decisive Phase give efficient models?

    python -m benchmarks.real_study.decisive                  # the three real models, SciQ
    python -m benchmarks.real_study.decisive --models=bundled --task=synthetic --format=letter

For each model: one `dpjax` study with Iterative Pruning, block influence and
`decisive_only` (greedy removal inside the Decisive Phase, every Silent-Phase block kept)
on the same items, then `dpjax-prune --study=... --method=M --max_drop=B` for each
method: the variant the fixed-sequence walk chooses on the selection items (the drop's
paired upper 95% bound within the budget), judged on the held-out items (whether the
budget holds there too), and timed against the unpruned model
(dpjax-throughput's measurement). Writes `decisive.json` and `DECISIVE.md` to `--out_dir`
(default `benchmarks/real_study/decisive/`); a re-run skips what finished.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags

from benchmarks import common

FLAGS = flags.FlagValues()  # this program's own flags (see common.run_program)

_MODELS = flags.DEFINE_list("models", ["smollm2", "gemma3", "qwen25"], "Real models (keys of "
                            "tests.support.real_models.MODELS), or bundled.", flag_values=FLAGS)
_TASK = flags.DEFINE_string("task", "sciq", "Task.", flag_values=FLAGS)
_FORMAT = flags.DEFINE_string("format", "cloze", "Answer format.", flag_values=FLAGS)
_ITEMS = flags.DEFINE_integer("num_items", 200, "Evaluation items (half of them held out).",
                              flag_values=FLAGS)
_CAL = flags.DEFINE_integer("calibration_items", 64, "Calibration items.", flag_values=FLAGS)
_MAX_REMOVED = flags.DEFINE_integer(
    "max_removed", 10, "Iterative Pruning's curve stops after this many removals (its "
    "min_layers): a 5% budget is met long before the curve's end, and each greedy step costs "
    "one drop-one sweep. 0: the whole curve.", flag_values=FLAGS)
_BUDGET = flags.DEFINE_float("max_drop", 0.05, "The budget every method is pruned to.",
                             flag_values=FLAGS)
_WORK = flags.DEFINE_string("work_dir", "", "Where the studies and exports live (default: "
                            "~/.cache/dpjax/real_study/decisive).", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                   "decisive"), "Where the record goes.",
                           flag_values=FLAGS)

_RENDER_ONLY = flags.DEFINE_bool("render_only", False, "Write DECISIVE.md from decisive.json "
                                 "alone (no model runs).", flag_values=FLAGS)

METHODS = ("iterative", "block_influence", "decisive_only")


def _num_layers(key: str) -> int:
  if key == "bundled":
    from dpjax.bundled import BUNDLED_MODEL
    with open(os.path.join(BUNDLED_MODEL, "config.json")) as f:
      return json.load(f)["num_hidden_layers"]
  from tests.support import real_models
  return real_models.MODELS[key].num_layers


def _study(work: str, key: str, model: str) -> str:
  from dpjax.study import run as study
  from dpjax.study.settings import Settings
  out = os.path.join(work, key, "study")
  if not os.path.isfile(os.path.join(out, "results.json")):
    extra = {"normalization": "options"} if _FORMAT.value == "cloze" else {}
    if _MAX_REMOVED.value:
      extra["min_layers"] = max(1, _num_layers(key) - _MAX_REMOVED.value)
    study.run(Settings(model=model, task=_TASK.value, format=_FORMAT.value,
                       methods=("iterative", "block_influence", "decisive_only"),
                       num_items=_ITEMS.value, calibration_items=_CAL.value,
                       transition_items=_CAL.value, curve_layers="iterative",
                       output_dir=out, progress=True, **extra))
  return out


def _prune(work: str, key: str, model: str, study_dir: str, method: str) -> dict:
  from dpjax.variants.budget import PLAN_FILE, PruneSettings, prune
  out = os.path.join(work, key, method)
  if os.path.isfile(os.path.join(out, PLAN_FILE)):
    with open(os.path.join(out, PLAN_FILE)) as f:
      return json.load(f)
  try:
    return prune(PruneSettings(model=model, task=_TASK.value, format=_FORMAT.value,
                               study=study_dir, method=method, max_drop=_BUDGET.value,
                               ppl_windows=0, output_dir=out, overwrite=True))
  except ValueError as e:  # no variant within the budget: recorded, not fatal
    return {"error": str(e)}


def finding(record: dict) -> str:
  """What the table says, computed: per model, the methods ordered by blocks removed within
  the budget (fewest kept first), and whether `decisive_only` met the budget at all."""
  lines = []
  for key, entry in record["models"].items():
    met = {m: len(v["kept_blocks"]) for m, v in entry["methods"].items() if "kept_blocks" in v}
    missed = [m for m in METHODS if m in entry["methods"] and m not in met]
    if not met:
      lines.append(f"{key}: no method finds a variant within the budget.")
      continue
    order = sorted(met, key=lambda m: (met[m], METHODS.index(m)))
    best = met[order[0]]
    ranked = ", ".join(f"{m} {entry['num_layers'] - met[m]}" for m in order)
    tied = [m for m in order if met[m] == best]
    text = (f"{key}: blocks removed within the budget on the selection half: {ranked}; most: "
            f"{' and '.join(tied)}")
    if missed:
      text += f"; {' and '.join(missed)} found no variant within it"
    holds = [m for m in order if entry["methods"][m].get("holds_on_heldout")]
    text += ("; on the held-out half the budget holds for "
             + (" and ".join(holds) if holds else "none of them"))
    lines.append(text + ".")
  return " ".join(lines)


EARLIER_RULE = ("the fewest blocks among the curve points whose percentile-bootstrap bound "
                "passed the budget (the rule before the fixed-sequence walk; a rerun applies "
                "the walk)")
WALK_RULE = ("the fixed-sequence walk (from the fewest blocks removed, the last point before "
             "the first whose Tango bound exceeds the budget)")


def heldout_judgement(held: dict, num_items: int, max_drop: float) -> dict:
  """The held-out drop's paired 95% interval recomputed from its discordant counts with
  Tango's score interval (the items are the held-out half of `num_items`, as
  `dpjax.variants.budget.split_items` splits them), and whether the budget holds there."""
  from dpjax.study import statistics
  from dpjax.variants import budget
  n = len(budget.split_items(num_items, 0.5, 0)[1])
  low, high = statistics._tango_interval(held["only_unpruned_right"],
                                          held["only_variant_right"], n, 0.95)
  return {"drop": held["drop"], "ci95": [low, high], "upper95": high, "items": n,
          "holds": bool(high <= max_drop)}


def render(record: dict) -> str:
  """DECISIVE.md from the record alone (and each method's held-out judgement set in it)."""
  rows = ["| model | l* | method | blocks kept | held-out drop [95% CI] | budget holds on "
          "held-out | decode speedup | prefill speedup |",
          "|---|---|---|---|---|---|---|---|"]
  for key, entry in record["models"].items():
    for method in METHODS:
      m = entry["methods"].get(method)
      if m is None:
        continue
      if "kept_blocks" not in m:
        rows.append(f"| {key} | {entry['transition_block']} | {method} | none within the "
                    "budget | | | | |")
        continue
      held = heldout_judgement(m["heldout_drop"], record["num_items"], record["max_drop"])
      m["holds_on_heldout"] = held["holds"]
      at_end = " (the curve ends here)" if m.get("curve_end") else ""
      pruned = m["throughput"]
      rows.append(f"| {key} | {entry['transition_block']} | {method} | "
                  f"{len(m['kept_blocks'])}/{entry['num_layers']}{at_end} | "
                  f"{held['drop']:+.3f} [{held['ci95'][0]:+.3f}, {held['ci95'][1]:+.3f}] | "
                  f"{'yes' if held['holds'] else 'no'} (upper bound {held['upper95']:.3f}) | "
                  f"{pruned['decode_speedup']:.2f}x | {pruned['prefill_speedup']:.2f}x |")
  record["finding"] = finding(record)
  rule = record.get("selection_rule", EARLIER_RULE)
  return (f"# Pruning only the Decisive Phase, at one budget\n\n{record['task']} "
          f"({record['format']}), {record['num_items']} evaluation items, budget: the drop's "
          f"paired upper 95% bound at most {record['max_drop']}. Chosen on the selection "
          f"half by {rule}; judged on the held-out half (Tango's score interval of the drop, "
          "recomputed from its discordant counts), timed on this machine against the "
          "unpruned model"
          + (f"; Iterative Pruning's curve stops after {record['max_removed']} removals"
             if record["max_removed"] else "") + ". "
          "Generated by `python -m benchmarks.real_study.decisive` (`--render_only`: from "
          "decisive.json alone).\n\n" + "\n".join(rows)
          + f"\n\n**Finding (computed):** {record['finding']}\n")


def _write(record: dict) -> str:
  from dpjax import fileio
  text = render(record)
  os.makedirs(_OUT.value, exist_ok=True)
  fileio.write_json(os.path.join(_OUT.value, "decisive.json"), record)
  fileio.atomic_write_text(os.path.join(_OUT.value, "DECISIVE.md"), text)
  print(text)
  return text


def main(argv) -> None:
  del argv
  if _RENDER_ONLY.value:
    with open(os.path.join(_OUT.value, "decisive.json")) as f:
      _write(json.load(f))
    return
  from dpjax.fileio import cache_root
  from absl import logging
  from dpjax import fileio
  logging.set_verbosity(logging.WARNING)
  work = os.path.abspath(_WORK.value) if _WORK.value else cache_root("real_study", "decisive")
  record = {"task": _TASK.value, "format": _FORMAT.value, "num_items": _ITEMS.value,
            "calibration_items": _CAL.value,
            "max_drop": _BUDGET.value, "max_removed": _MAX_REMOVED.value, "models": {}}
  for key in _MODELS.value:
    if key == "bundled":
      from dpjax.bundled import BUNDLED_MODEL as model
    else:
      from tests.support import real_models
      model = real_models.fetch(key)
    study_dir = _study(work, key, model)
    with open(os.path.join(study_dir, "results.json")) as f:
      results = json.load(f)
    entry = {"transition_block": results["calibration_transition_block"],
             "num_layers": results["model"]["num_layers"], "methods": {}}
    for method in METHODS:
      plan = _prune(work, key, model, study_dir, method)
      if "error" in plan:
        entry["methods"][method] = plan
        continue
      held = plan["accuracy"]["drop"]["heldout"]
      pruned = next(r for r in plan["throughput"]["rows"] if r["variant"] == "pruned")
      entry["methods"][method] = {"kept_blocks": plan["kept_blocks"], "heldout_drop": held,
                                  "throughput": pruned}
      # Iterative Pruning's curve was cut at max_removed: a variant at its end may not be
      # the smallest within the budget.
      at_end = (method == "iterative" and _MAX_REMOVED.value
                and len(plan["kept_blocks"]) <= entry["num_layers"] - _MAX_REMOVED.value)
      entry["methods"][method]["curve_end"] = bool(at_end)
    record["models"][key] = entry
  record["selection_rule"] = WALK_RULE
  _write(record)


if __name__ == "__main__":
  common.run_program(main, FLAGS)
