"""Prune to a budget: the smallest variant within a quality budget, judged on items it was
not chosen on, exported as an HF checkpoint, verified, with its provenance.

`prune(PruneSettings(...))`:

1. the method's pruning curve: from an existing study's output directory (`--study`) or
   from a study run for it (the method alone, into `OUTPUT_DIR/study`). Every curve point
   is a kept set with its per-item correctness on the study's evaluation items
   (`variants.jsonl`). A given kept set (`--keep`) needs no curve: without `--study`
   no study runs, and only the unpruned model and the kept set are evaluated, on the
   items that study would take (`Evaluation`; the model loaded once, for the checks too).
2. The evaluation items are split in two by a seeded permutation (`--selection_fraction`):
   the selection items choose the variant, the held-out items judge it. With
   `--max_drop`, the curve is walked from the fewest blocks removed (fixed-sequence
   testing): each point's accuracy drop below the unpruned model on the selection items
   has a paired upper 95% bound (Tango's score interval of `unpruned - variant`), the walk
   stops at the first point whose bound exceeds the budget, and the chosen variant is the
   last point before it; with `--target_blocks`, the curve point that keeps that many
   blocks.
   With `--max_ppl_ratio`, the variants within the accuracy budget are asked, fewest
   blocks first, for the paired upper 95% bound of their perplexity ratio on the
   selection windows of a corpus (`dpjax.variants.perplexity`); the first within it wins.
3. The held-out items then give the drop's point estimate, its paired 95% interval and
   an exact McNemar p-value, and whether the budget holds there too.
4. The kept blocks are exported (`dpjax.checkpoints.export`) to `OUTPUT_DIR/model`,
   reloaded by transformers' `AutoModelForCausalLM` and compared with dpjax's logits for
   the kept blocks before success is reported (the export is removed when they differ).
   torch is optional: without it the export is reloaded by dpjax's own reader of the
   written safetensors and compared the same way, and the plan and the output say that
   the transformers check was skipped (`pip install torch` enables it).
5. `OUTPUT_DIR/pruning_plan.json` records the source model and its weight fingerprint,
   the kept blocks, the method and its settings, the items (task, split, ids), the
   accuracies before and after with intervals, the exported files' SHA256, dpjax's
   version and the command line. `--plan=FILE` exports again from a plan alone and
   checks that the weights come out bit for bit the same.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import numpy as np

from dpjax import fileio
from dpjax.bundled import BUNDLED_MODEL, resolve_recorded
from dpjax.fields import command_line, setting
from dpjax.study import statistics
from dpjax.study.results import bootstrap_ci
from dpjax.variants.export import (GGUF_FILE, MODEL_DIR, TRANSFORMERS_SKIPPED,
                                   check_gguf_writable, check_verifiable, export_variant,
                                   file_hashes, verify_export, version)

PLAN_FILE = "pruning_plan.json"
STUDY_DIR = "study"
# The study methods whose curve is one kept set per number of blocks removed.
CURVE_METHODS = ("iterative", "block_influence", "angular", "single_layer", "reverse",
                 "phase_aware", "decisive_only")


@dataclasses.dataclass(frozen=True)
class PruneSettings:
  """A pruning to a budget. Each field is also the `dpjax-prune` flag of that name."""
  model: str = setting(BUNDLED_MODEL, "The model: a dpjax checkpoint, an HF directory or a "
                       "GGUF file. Default: the small model bundled with dpjax.")
  task: str = setting("synthetic", "The task the budget is judged on (as dpjax's --task).")
  format: str = setting("letter", "Answer format (as dpjax's --format).",
                        choices=("letter", "cloze", "open"))
  method: str = setting("iterative", "The method whose curve is pruned along.",
                        choices=CURVE_METHODS)
  study: str = setting("", "An existing dpjax output directory to take the curve from "
                       "(its results.json and variants.jsonl); empty: run the method.")
  max_drop: float | None = setting(None, "Budget: accuracy points (a fraction, 0.05 = 5 "
                                   "points) the variant may lose against the unpruned "
                                   "model, by the paired upper 95% bound on the selection "
                                   "items.")
  target_blocks: int = setting(0, "Budget instead of --max_drop / --max_ppl_ratio: the "
                               "number of blocks the variant keeps.")
  keep: str = setting("", "Budget instead: these 0-based kept blocks, comma-separated (a "
                      "variant of the study, e.g. a phase-experiment arm, or any kept set: "
                      "it is then evaluated on the study's items). Without --study no "
                      "search runs: only the unpruned model and this set are evaluated.")
  max_ppl_ratio: float | None = setting(None, "Perplexity gate: the variant's perplexity on "
                                        "the corpus may be at most this multiple of the "
                                        "unpruned model's (paired upper 95% bound on the "
                                        "selection windows). With --max_drop, both must "
                                        "hold.")
  ppl_corpus: str = setting("", "Perplexity corpus: text:FILE, task:SPEC@SPLIT or synthetic "
                            "(default: healing's default corpus, whose last tokens it "
                            "takes; healing then trains on the tokens before them).")
  ppl_windows: int = setting(32, "Perplexity windows (split into selection and held-out "
                             "windows like the items); 0: no perplexity.")
  ppl_seq_len: int = setting(128, "Tokens per perplexity window.")
  num_items: int = setting(400, "Evaluation items of the study (split into selection and "
                           "held-out items).")
  calibration_items: int = setting(64, "Calibration items of the method's search.")
  selection_fraction: float = setting(0.5, "Share of the evaluation items that choose the "
                                      "variant; the rest judge it.")
  seed: int = setting(0, "Seed of the split and of the bootstrap.")
  output_dir: str = setting("dpjax_pruned", "Where the export (model/), the study (study/) "
                            "and pruning_plan.json go.")
  plan: str = setting("", "A pruning_plan.json: export its kept blocks again from its "
                      "source model, checking that the weights come out identical.")
  gguf: bool = setting(False, "Also write the variant as a GGUF file (model.gguf): from a "
                       "GGUF source its stored tensors are copied and per-layer metadata cut; "
                       "from an HF Llama, Mistral without a window, Qwen2 or Qwen3 (head size "
                       "128) source the exported weights are written unquantized with its "
                       "byte-level BPE tokenizer (anything else is refused by name). Reloaded by "
                       "transformers' GGUF loading and checked (logits and tokenizer).")
  heal_steps: int = setting(0, "Heal the chosen variant: training steps (0: none).")
  heal_method: str = setting("lora", "lora (adapters, Gromov et al.) or last_blocks (the "
                             "head and the last --heal_last_blocks kept blocks trained in "
                             "full, the rest frozen: with --method=reverse, the baseline of "
                             "'Reassessing Layer Pruning').", choices=("lora", "last_blocks"))
  heal_last_blocks: int = setting(3, "last_blocks healing: how many of the last kept blocks "
                                  "are trained.")
  heal_rank: int = setting(8, "LoRA rank (Gromov et al.: 8).")
  heal_alpha: float = setting(16.0, "LoRA scale numerator: updates are alpha / rank * A @ B.")
  heal_modules: tuple[str, ...] = setting(("gate", "up", "down"), "Weights that get "
                                          "adapters (default: the feed-forward ones).",
                                          choices=("gate", "up", "down", "q", "k", "v", "o"))
  heal_objective: str = setting("kl", "kl (to the unpruned model's next-token distribution) "
                                "or nll (plain next-token loss).", choices=("kl", "nll"))
  heal_corpus: str = setting("", "Healing text: text:FILE, task:SPEC@SPLIT or synthetic "
                             "(default: the task's train split, disjoint from the "
                             "evaluation items).")
  heal_learning_rate: float | None = setting(None, "Adam learning rate (default: 1e-3 for "
                                            "lora, 1e-4 for last_blocks).")
  heal_batch_size: int = setting(8, "Windows per healing step.")
  heal_seq_len: int = setting(64, "Tokens per healing window.")
  throughput: bool = setting(True, "Measure the decode and prefill throughput of the unpruned "
                             "model, the variant and the healed variant (dpjax-throughput's "
                             "measurement), with accuracy_throughput.csv / .png.")
  throughput_batch_size: int = setting(8, "Batch size of the throughput measurement.")
  throughput_prompt_len: int = setting(128, "Prompt tokens of the throughput measurement.")
  throughput_new_tokens: int = setting(32, "Generated tokens of the throughput measurement.")
  verify: bool = setting(True, "Reload the export and compare its logits with dpjax's before "
                         "reporting success: with transformers where torch is installed, "
                         "else with dpjax's own reader of the written safetensors (a note "
                         "says the transformers check was skipped). --gguf's check loads the "
                         "file with transformers and needs torch.")
  overwrite: bool = setting(False, "Replace --output_dir's export and plan if they exist.")

  def __post_init__(self):
    if self.plan:
      return
    gates = self.max_drop is not None or self.max_ppl_ratio is not None
    if gates + bool(self.target_blocks) + bool(self.keep) != 1:
      raise ValueError("give one budget: --max_drop=FRACTION (e.g. 0.05) and/or "
                       "--max_ppl_ratio=R (e.g. 1.5), or --target_blocks=N (blocks to "
                       "keep), or --keep=BLOCKS; got max_drop="
                       f"{self.max_drop}, max_ppl_ratio={self.max_ppl_ratio}, "
                       f"target_blocks={self.target_blocks}, keep={self.keep!r}.")
    if self.max_ppl_ratio is not None and not (self.max_ppl_ratio >= 1 and self.ppl_windows):
      raise ValueError(f"--max_ppl_ratio={self.max_ppl_ratio} needs a ratio of at least 1 "
                       f"and --ppl_windows above 0 (got {self.ppl_windows}).")
    if self.max_drop is not None and not 0 <= self.max_drop < 1:
      raise ValueError(f"--max_drop={self.max_drop} is a fraction of accuracy in [0, 1), "
                       "e.g. 0.05 for 5 points.")
    if self.target_blocks < 0:
      raise ValueError(f"--target_blocks={self.target_blocks}; give a positive count.")
    if not 0 < self.selection_fraction < 1:
      raise ValueError(f"--selection_fraction={self.selection_fraction} must lie in (0, 1).")


def _variants(study_dir: str) -> list[dict[str, Any]]:
  path = os.path.join(study_dir, "variants.jsonl")
  if not os.path.isfile(path):
    raise ValueError(f"{study_dir} has no variants.jsonl: give a dpjax output directory "
                     "(made by this version of dpjax) or leave --study empty to run it.")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _study_settings(s: PruneSettings):
  from dpjax.study.settings import Settings
  return Settings(model=s.model, task=s.task, format=s.format, methods=(s.method,),
                  num_items=s.num_items, calibration_items=s.calibration_items,
                  curve_layers="iterative", output_dir=os.path.join(s.output_dir, STUDY_DIR),
                  progress=True)


def _curve(study_dir: str, method: str) -> tuple[dict, list[dict]]:
  """The unpruned record and the method's curve records (fewest removed first)."""
  records = _variants(study_dir)
  unpruned = [r for r in records if r["method"] == "unpruned"]
  curve = [r for r in records if r["method"] == method or r["method"].startswith(method + "_")]
  if not unpruned or not curve:
    ran = sorted({r["method"] for r in records})
    raise ValueError(f"{study_dir} has no curve of method {method!r} (it has {ran}); run "
                     f"dpjax with --methods={method} or choose --method among them.")
  return unpruned[0], sorted(curve, key=lambda r: r["k"])


def _outcomes(record: dict) -> np.ndarray:
  return np.array([c == "1" for c in record["correct"]], np.float64)


def split_items(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices of the selection and held-out items among `n` evaluation items."""
  order = np.random.default_rng([seed, 7]).permutation(n)
  cut = int(round(n * fraction))
  if not 0 < cut < n:
    raise ValueError(f"{n} evaluation items cannot be split {fraction}:{1 - fraction}; give "
                     "more --num_items.")
  return np.sort(order[:cut]), np.sort(order[cut:])


def _accuracy(outcomes: np.ndarray, seed: int) -> dict[str, Any]:
  low, high = bootstrap_ci(outcomes, seed=seed)
  return {"accuracy": round(float(outcomes.mean()), 6), "ci95": [round(low, 6), round(high, 6)],
          "items": int(len(outcomes))}


def _drop(full: np.ndarray, variant: np.ndarray, seed: int) -> dict[str, Any]:
  """Accuracy drop `full - variant`, paired over the same items: Tango's score interval
  (never [0, 0] merely because no item is discordant) and the exact McNemar test."""
  del seed  # the interval is not resampled
  drop, (low, high) = statistics.paired_interval(full, variant)
  only_full, only_variant, p = statistics.mcnemar_exact(full.astype(int), variant.astype(int))
  return {"drop": round(drop, 6), "ci95": [round(low, 6), round(high, 6)],
          "upper95": round(high, 6), "mcnemar_p": p, "only_unpruned_right": only_full,
          "only_variant_right": only_variant}


def choose(unpruned: dict, curve: list[dict], selection: np.ndarray, s: PruneSettings,
           ppl_gate=None, keep_record: dict | None = None) -> tuple[dict, list[dict]]:
  """The chosen curve point and what each point scored on the selection items.
  `ppl_gate(kept)` (the perplexity gate) is asked for the variants within the accuracy
  budget, fewest blocks first, until one passes; what it finds goes into the table."""
  full = _outcomes(unpruned)[selection]
  table = []
  for record in curve:
    d = _drop(full, _outcomes(record)[selection], s.seed)
    table.append({"kept": record["kept"], "blocks": len(record["kept"]), **d})
  if s.keep:
    return keep_record, table
  if s.target_blocks:
    chosen = [r for r in curve if len(r["kept"]) == s.target_blocks]
    if not chosen:
      sizes = sorted({len(r["kept"]) for r in curve})
      raise ValueError(f"--target_blocks={s.target_blocks}: the curve has variants of "
                       f"{sizes[0]}..{sizes[-1]} blocks; choose one of them.")
    return chosen[0], table
  # Fixed-sequence testing: from the fewest blocks removed, every point is tested at the
  # full level only while every point before it passed; the walk stops at the first
  # failure, so no point beyond it can be chosen by chance (no multiplicity to correct).
  order = sorted(range(len(table)), key=lambda i: -table[i]["blocks"])
  passed = (len(order) if s.max_drop is None else statistics.fixed_sequence(
      [table[i]["upper95"] for i in order], s.max_drop))
  for rank, i in enumerate(order):
    table[i]["walk"] = ("within" if rank < passed else
                        "first failure: the walk stops" if rank == passed else "not tested")
  within = sorted((table[i]["blocks"], i) for i in order[:passed])
  if not within:
    raise ValueError(f"no variant of the {s.method} curve loses at most {s.max_drop} "
                     "(paired upper 95% bound on the selection items); even one block removed "
                     f"bounds the drop at {table[0]['upper95']:.3f}. Raise --max_drop.")
  if ppl_gate is None:
    return curve[within[0][1]], table
  for _, i in within:
    passed, record = ppl_gate(curve[i]["kept"])
    table[i]["ppl_ratio"] = record
    if passed:
      return curve[i], table
  raise ValueError(f"no variant of the {s.method} curve within the accuracy budget keeps "
                   f"its perplexity ratio at most {s.max_ppl_ratio} (paired upper 95% bound "
                   "on the selection windows); raise --max_ppl_ratio.")


def _fingerprint(source: str) -> str:
  from dpjax.lens.tuned import fingerprint
  from dpjax.model.load import load_model
  return fingerprint(load_model(source))


def _read_study(study_dir: str) -> tuple[dict[str, Any], list[str]]:
  """A study's results.json and its evaluation items' ids (items.jsonl order)."""
  with open(os.path.join(study_dir, "results.json")) as f:
    results = json.load(f)
  with open(os.path.join(study_dir, "items.jsonl")) as f:
    ids = [json.loads(line)["id"] for line in f if line.strip()]
  return results, ids


# `--keep` without `--study`: what was evaluated, and where its outcomes are written (the
# files a study writes, in OUTPUT_DIR).
EVALUATED = {"variants": ["unpruned", "given"], "read": "each variant's last kept block",
             "items": "items.jsonl", "outcomes": "variants.jsonl"}


def _write_evaluated(out: str, evaluation: Evaluation, records: list[dict]) -> None:
  from dpjax.report import files as report
  os.makedirs(out, exist_ok=True)
  report.write_items(os.path.join(out, EVALUATED["items"]), evaluation.ctx.evaluation)
  fileio.atomic_write_text(os.path.join(out, EVALUATED["outcomes"]),
                           "".join(json.dumps(r) + "\n" for r in records))


def prune(s: PruneSettings) -> dict[str, Any]:
  """Runs the pruning to a budget (or again from a plan); returns the plan written."""
  if s.plan:
    return reproduce(s)
  out = s.output_dir
  if os.path.exists(os.path.join(out, PLAN_FILE)) and not s.overwrite:
    raise FileExistsError(f"{os.path.abspath(os.path.join(out, PLAN_FILE))} exists; choose "
                          "another --output_dir or pass --overwrite.")
  check_verifiable(s.gguf, s.verify)  # before the study, not after it
  if s.gguf and not s.study:
    check_gguf_writable(s.model, None)
  study_settings = _study_settings(s)
  evaluation = None  # the study's items on the source model, where this run evaluates any
  if s.study:
    study_dir = s.study
    results, ids = _read_study(study_dir)
  elif s.keep:
    # A given kept set needs no search and no per-layer profile: the unpruned model and
    # the kept set alone are evaluated, on the items a study with these settings takes.
    study_dir = None
    evaluation = Evaluation(study_settings, s.model, progress=True)
    from dpjax.checkpoints.gguf import GGUFCheckpoint, is_gguf
    if s.gguf and is_gguf(s.model):  # a kept set the file cannot state: refused now
      check_gguf_writable(s.model, _kept_blocks(
          s.keep, GGUFCheckpoint.open(s.model).config.num_layers))
    results, ids = evaluation.results(), evaluation.ids
  else:
    from dpjax.study import run as study
    study.run(study_settings)
    study_dir = study_settings.output_dir
    results, ids = _read_study(study_dir)
  source = s.model if not s.study else resolve_recorded(results["model"]["path"])
  from dpjax.study.run import select_items
  from dpjax.study.settings import Settings
  ran = Settings(**{k: tuple(v) if isinstance(v, list) else v
                    for k, v in results["settings"].items()})
  if s.keep:
    evaluation = evaluation or Evaluation(ran, ran.model, ids)
    unpruned, curve, keep_record = _given(study_dir, s.keep, results["model"]["num_layers"],
                                          ran, ids, evaluation)
    if study_dir is None:  # the two variants' outcomes, as a study records them
      _write_evaluated(out, evaluation, [unpruned, keep_record])
  else:
    (unpruned, curve), keep_record = _curve(study_dir, s.method), None
  # Perplexity, the export's check and healing's teacher read the source in float32: the
  # evaluation's model where it is that (not loaded twice).
  model = (evaluation.model_float32() if evaluation is not None and evaluation.prepared
           else None)
  if model is None:
    from dpjax.model.load import load_model
    model = load_model(source, dtype="float32")
  ppl = Perplexity(model, source, s) if s.ppl_windows else None
  selection, heldout = split_items(len(unpruned["correct"]), s.selection_fraction, s.seed)
  chosen, table = choose(unpruned, curve, selection, s,
                         ppl_gate=ppl.gate if s.max_ppl_ratio is not None else None,
                         keep_record=keep_record)
  full, variant = _outcomes(unpruned), _outcomes(chosen)
  kept = list(chosen["kept"])
  held = _drop(full[heldout], variant[heldout], s.seed)
  perplexity = ppl.record(kept) if ppl is not None else None
  budget: dict[str, Any] = {"target_blocks": s.target_blocks} if s.target_blocks else {}
  if s.keep:
    budget = {"keep": kept, "variant": {k: chosen[k] for k in ("method", "rule", "phase", "k",
                                                             "seed") if k in chosen}}
  if s.max_drop is not None:
    budget.update({"max_drop": s.max_drop, "rule": "paired upper 95% bound of the drop on "
                   "the selection items at most max_drop",
                   "holds_on_heldout": bool(held["upper95"] <= s.max_drop)})
  if s.max_ppl_ratio is not None:
    budget.update({"max_ppl_ratio": s.max_ppl_ratio, "ppl_rule": "paired upper 95% bound of "
                   "the perplexity ratio on the selection windows at most max_ppl_ratio",
                   "ppl_holds_on_heldout": bool(perplexity["ratio"]["heldout"]["upper95"]
                                                <= s.max_ppl_ratio)})
  calibration = select_items(ran)[3]
  exported = export_variant(
      source, out, kept, gguf=s.gguf, verify=s.verify, seed=s.seed, overwrite=s.overwrite,
      model=model, params=evaluation.source_params() if evaluation is not None else None)
  plan = {
      "dpjax_version": version(),
      "command": command_line("dpjax-prune", s),
      "argv": sys.argv,
      # The study's own record of the weights (tuned.fingerprint of the model it loaded).
      "source": {"model": source, "fingerprint": results["model"]["fingerprint"],
                 "num_layers": results["model"]["num_layers"],
                 "architecture": results["model"]["architecture"]},
      "kept_blocks": kept,
      "removed_blocks": sorted(set(range(results["model"]["num_layers"])) - set(kept)),
      "method": {"name": "given" if s.keep else s.method, "curve": chosen["method"],
                 "settings": results["settings"],
                 "study": None if study_dir is None else os.path.relpath(study_dir, out)
                 if not s.study else os.path.abspath(study_dir),
                 **({"evaluated": EVALUATED} if study_dir is None else {})},
      "items": {"task": results["task"]["spec"], "split": results["task"]["split"],
                "calibration_ids": [item.id for item in calibration],
                "selection_ids": [ids[i] for i in selection],
                "heldout_ids": [ids[i] for i in heldout],
                "split_seed": s.seed, "selection_fraction": s.selection_fraction},
      "budget": budget,
      "accuracy": {
          "unpruned": {"selection": _accuracy(full[selection], s.seed),
                       "heldout": _accuracy(full[heldout], s.seed)},
          "pruned": {"selection": _accuracy(variant[selection], s.seed),
                     "heldout": _accuracy(variant[heldout], s.seed)},
          "drop": {"selection": {"kept": kept, "blocks": len(kept),
                                **_drop(full[selection], variant[selection], s.seed)},
                   "heldout": held}},
      "perplexity": perplexity,
      "curve_on_selection": table,
      "export": exported,
      "settings": dataclasses.asdict(s),
  }
  if s.heal_steps:
    plan["healing"] = _heal(s, source, out, kept, ran, ids, full, variant,
                            selection, heldout, model, ppl)
  if s.throughput:
    plan["throughput"] = accuracy_throughput(s, source, out, plan)
  fileio.write_json(os.path.join(out, PLAN_FILE), plan)
  return plan


THROUGHPUT_CSV = "accuracy_throughput.csv"
THROUGHPUT_FIGURE = "accuracy_throughput.png"


def accuracy_throughput(s: PruneSettings, source: str, out: str, plan: dict[str, Any]
                        ) -> dict[str, Any]:
  """The unpruned model, the variant and the healed variant: held-out accuracy (with its
  interval) next to decode and prefill throughput measured by dpjax-throughput's code
  (the healed weights measured themselves), as a table and a figure in OUTPUT_DIR."""
  from dpjax.checkpoints.hf import torch_available
  from dpjax.serve import throughput as tp
  # The token check against HF generate runs with the export's check (it needs torch too;
  # without it the program's note says both were skipped).
  common = dict(batch_size=(str(s.throughput_batch_size),),
                prompt_len=(str(s.throughput_prompt_len),),
                new_tokens=(str(s.throughput_new_tokens),),
                check_tokens=s.verify and torch_available(), seed=s.seed)
  report = tp.measure(tp.ThroughputSettings(
      model=source, keep=",".join(map(str, plan["kept_blocks"])), **common))
  by_method = {r["method"]: r for r in report["rows"]}
  acc = plan["accuracy"]
  rows = [("unpruned", by_method["unpruned"], acc["unpruned"]["heldout"],
           plan["source"]["num_layers"]),
          ("pruned", by_method["given"], acc["pruned"]["heldout"], len(plan["kept_blocks"]))]
  if plan.get("healing"):
    healed = tp.measure(tp.ThroughputSettings(model=os.path.join(out, HEALED_DIR), **common),
                        unpruned_only=True)
    rows.append(("healed", healed["rows"][0], plan["healing"]["accuracy"]["heldout"],
                 len(plan["kept_blocks"])))
  table = []
  base = rows[0][1]
  for name, r, a, blocks in rows:
    table.append({"variant": name, "blocks": blocks, "heldout_accuracy": a["accuracy"],
                  "heldout_ci95": a["ci95"],
                  "decode_tokens_per_second": r["decode_tokens_per_second"],
                  "prefill_tokens_per_second": r["prefill_tokens_per_second"],
                  "decode_speedup": r["decode_tokens_per_second"]
                  / base["decode_tokens_per_second"],
                  "prefill_speedup": r["prefill_tokens_per_second"]
                  / base["prefill_tokens_per_second"],
                  "weights_mb": r["weights_mb"]})
  header = list(table[0])
  fileio.write_csv(os.path.join(out, THROUGHPUT_CSV), header,
                   [[row[h] if h != "heldout_ci95" else "{:.4f}..{:.4f}".format(*row[h])
                     for h in header] for row in table])
  _plot_accuracy_throughput(os.path.join(out, THROUGHPUT_FIGURE), table, report)
  return {"backend": report["backend"], "mesh": report["mesh"],
          "batch_size": s.throughput_batch_size, "prompt_len": s.throughput_prompt_len,
          "new_tokens": s.throughput_new_tokens, "rows": table,
          "files": [THROUGHPUT_CSV, THROUGHPUT_FIGURE]}


def _plot_accuracy_throughput(path: str, table: list[dict], report: dict) -> None:
  from dpjax.fileio import save_figure
  from dpjax.report.figures import pyplot
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  colors = {"unpruned": "black", "pruned": "tab:red", "healed": "tab:green"}
  for row in table:
    low, high = row["heldout_ci95"]
    y = row["heldout_accuracy"]
    ax.errorbar([row["decode_tokens_per_second"]], [y], yerr=[[y - low], [high - y]],
                fmt="o", color=colors[row["variant"]], capsize=3,
                label=f"{row['variant']} ({row['blocks']} blocks, "
                      f"{row['decode_speedup']:.2f}x decode)")
  ax.set_xlabel(f"decode tokens/s (batch {report['rows'][0]['batch_size']}, "
                f"{report['backend']})")
  ax.set_ylabel("held-out accuracy (95% interval)")
  ax.set_title("The chosen variant: accuracy against throughput")
  ax.legend(fontsize=8)
  save_figure(fig, path)


HEALED_DIR = "healed"
HEALED_OUTCOMES = "healed_outcomes.jsonl"


class Evaluation:
  """The study's evaluation items on one model (the items a study with `study_settings`
  evaluates), prepared once, when a variant is first asked for: the model loaded, the
  items tokenized, the programs fitted. Each variant is read at its last kept block, as
  the study reads a curve point: no search, no per-layer profile. `ids`: the items it
  must be (checked), or None (then `ids` are the prepared items')."""

  def __init__(self, study_settings, model_path: str, ids: list[str] | None = None,
               progress: bool = False):
    self.recorded = study_settings.replace(model=model_path)
    self.settings = self.recorded.replace(progress=progress)
    self.ids = None if ids is None else list(ids)
    self._ctx = None

  @property
  def prepared(self) -> bool:
    return self._ctx is not None

  @property
  def ctx(self):
    if self._ctx is None:
      from dpjax.engine import compilation
      from dpjax.study import run as study
      compilation.enable_persistent_cache(self.settings.compilation_cache_dir)  # as a study
      ctx = study.prepare(self.settings)
      got = [item.id for item in ctx.evaluation.items]
      if self.ids is not None and got != self.ids:
        raise RuntimeError(f"{self.settings.model} was evaluated on other items than the "
                           "study's; its accuracy cannot be compared paired.")
      self.ids, self._ctx = got, ctx
    return self._ctx

  def point(self, kept: list[int] | None, description: str = "evaluated"):
    """The curve point of the blocks `kept` (all: None), its last block read."""
    from dpjax.study import methods
    mask = np.ones((1, self.ctx.num_layers), bool)
    if kept is not None:
      mask[0] = False
      mask[0, kept] = True
    return methods.curve(self.ctx, mask, description, per_layer=False)[0]

  def outcomes(self, kept: list[int] | None) -> np.ndarray:
    """`[N]` 0/1: which items the blocks `kept` (all: None) get right."""
    return np.asarray(self.point(kept).item_correct, np.float64)

  def record(self, kept: list[int] | None, method: str) -> dict[str, Any]:
    """The variant's record as a study's variants.jsonl holds it."""
    point = self.point(kept, method)
    return {"method": method, "rule": None, "phase": None,
            "k": self.ctx.num_layers - len(point.kept), "seed": None,
            "kept": [b - 1 for b in point.kept],
            "correct": "".join("1" if c else "0" for c in np.asarray(point.item_correct, bool)),
            "final_dm": [round(float(x), 4) for x in np.asarray(point.item_final_dm)]}

  def model_float32(self):
    """The prepared model where its weights and activations are float32 (what the
    export's check, the perplexity and healing's teacher read), else None."""
    model = self.ctx.model
    if model.config.param_dtype == "float32" and str(model.compute_dtype) == "float32":
      return model
    return None

  def source_params(self) -> dict[str, Any] | None:
    """The prepared model's weights (numpy) where they are the checkpoint's own dtype (no
    --dtype given): what the export writes, not read from the file again. Else None."""
    if not self.prepared or self.settings.dtype is not None:
      return None
    return jax_to_numpy(self.ctx.model.params())

  def results(self) -> dict[str, Any]:
    """What the plan takes from a study's results.json: the model, the task and the
    settings (as the study records them)."""
    from dpjax.bundled import recorded_path
    from dpjax.lens.tuned import fingerprint
    ctx, s = self.ctx, self.settings
    cfg = ctx.model.config
    settings = {k: v for k, v in dataclasses.asdict(self.recorded).items()
                if k != "compilation_cache_dir"}
    settings["model"] = recorded_path(s.model)
    return {"model": {"path": recorded_path(s.model), "architecture": cfg.architecture,
                      "num_layers": ctx.num_layers, "fingerprint": fingerprint(ctx.model)},
            "task": {"spec": s.task, "split": ctx.split}, "settings": settings}


def evaluate(study_settings, model_path: str, kept: list[int] | None, ids: list[str]
             ) -> np.ndarray:
  """`[N]` 0/1: which of the study's evaluation items (`ids`, checked) the model at
  `model_path` with the blocks `kept` (all: None) gets right, read at its last block as
  the study reads a curve point."""
  return Evaluation(study_settings, model_path, ids).outcomes(kept)


def _kept_blocks(keep: str, num_layers: int) -> list[int]:
  """`--keep`'s blocks, 0-based (out of range and repeats refused)."""
  from dpjax.model.plan import KeepPlan
  try:
    kept = [int(x) for x in keep.split(",") if x.strip()]
  except ValueError as e:
    raise ValueError(f"--keep takes comma-separated 0-based block indices, got {keep!r}.") from e
  return list(KeepPlan.from_kept(kept, num_layers).kept)


def _given(study_dir: str | None, keep: str, num_layers: int, ran, ids,
           evaluation: Evaluation | None = None):
  """`--keep`: the unpruned record, no curve, and the record of the given kept set (the
  study's own when it evaluated that set, else evaluated now on the same items by
  `evaluation`, default one prepared for it). Without a study (`study_dir` None), both
  records are evaluated."""
  kept = _kept_blocks(keep, num_layers)
  evaluation = evaluation or Evaluation(ran, ran.model, ids)
  if study_dir is None:
    return evaluation.record(None, "unpruned"), [], evaluation.record(kept, "given")
  records = _variants(study_dir)
  unpruned = next(r for r in records if r["method"] == "unpruned")
  found = [r for r in records if list(r["kept"]) == kept and r["method"] != "unpruned"]
  if found:
    return unpruned, [], found[0]
  outcomes = evaluation.outcomes(kept)
  return unpruned, [], {"method": "given", "kept": kept,
                        "correct": "".join(str(int(c)) for c in outcomes)}


def _heal(s: PruneSettings, source: str, out: str, kept: list[int], study_settings, ids,
          full: np.ndarray, variant: np.ndarray, selection, heldout, teacher,
          ppl: "Perplexity | None") -> dict[str, Any]:
  """Heals the exported variant, writes it to OUTPUT_DIR/healed (verified), and scores it
  on the same evaluation items (and the same perplexity windows)."""
  from dpjax.checkpoints.convert import load_checkpoint, load_tokenizer
  from dpjax.checkpoints.export import write_hf_checkpoint
  from dpjax.lens.training import corpus_texts, windows
  from dpjax.model.load import load_model
  from dpjax.variants import heal
  healing = heal.Healing(steps=s.heal_steps, rank=s.heal_rank, alpha=s.heal_alpha,
                         modules=tuple(s.heal_modules), objective=s.heal_objective,
                         learning_rate=s.heal_learning_rate, batch_size=s.heal_batch_size,
                         seq_len=s.heal_seq_len, seed=s.seed, method=s.heal_method,
                         last_blocks=s.heal_last_blocks)
  corpus = s.heal_corpus or default_corpus(s)
  if ppl is not None and ppl.spec == corpus:  # the perplexity windows are held back
    n = len(ppl.before) // s.heal_seq_len
    if n < 2:
      raise ValueError(f"the healing corpus {corpus} leaves {len(ppl.before)} tokens before "
                       "the perplexity windows: give a larger corpus or fewer --ppl_windows.")
    data = np.asarray(ppl.before[:n * s.heal_seq_len], np.int32).reshape(n, s.heal_seq_len)
  else:
    data = windows(load_tokenizer(source), corpus_texts(corpus), s.heal_seq_len)
  pruned_dir = os.path.join(out, MODEL_DIR)
  student = load_model(pruned_dir, dtype="float32")
  adapters, losses = heal.heal(student, teacher, None, data, healing,
                               state_dir=os.path.join(out, "heal_state"))
  merged = jax_to_numpy(heal.compose(student.params(), adapters, healing))
  loaded = load_checkpoint(pruned_dir)
  healed_dir = os.path.join(out, HEALED_DIR)
  with fileio.atomic_directory(healed_dir, overwrite=True) as tmp:
    write_hf_checkpoint(tmp, loaded.config, loaded.raw_config, merged,
                        list(range(loaded.config.num_layers)), loaded.save_tokenizer)
  check = None
  healed_model = load_model(healed_dir, dtype="float32")
  if s.verify:
    check = verify_export(healed_dir, healed_dir, list(range(len(kept))), s.seed,
                          model=healed_model)
  # The healed model on the study's evaluation items (the same items: checked).
  healed_outcomes = evaluate(study_settings, healed_dir, None, ids)
  fileio.atomic_write_text(os.path.join(out, HEALED_OUTCOMES), "".join(
      json.dumps({"id": i, "correct": int(c)}) + "\n" for i, c in zip(ids, healed_outcomes)))
  return {
      "settings": dataclasses.asdict(healing), "corpus": corpus, "windows": int(len(data)),
      "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
      "export": {"directory": HEALED_DIR, "files": file_hashes(healed_dir),
                 "verification": check},
      "accuracy": {"selection": _accuracy(healed_outcomes[selection], s.seed),
                   "heldout": _accuracy(healed_outcomes[heldout], s.seed)},
      # Healed minus pruned, paired on the held-out items.
      "gain_heldout": _gain(healed_outcomes[heldout], variant[heldout], s.seed),
      "drop_heldout_vs_unpruned": _drop(full[heldout], healed_outcomes[heldout], s.seed),
      "perplexity": ppl.record_model(healed_model) if ppl is not None else None,
  }


def default_corpus(s: PruneSettings) -> str:
  """Healing's (and the perplexity gate's) corpus when none is given: the task's train
  split, disjoint from the evaluation items."""
  return f"task:{s.task}@train" if s.task != "synthetic" else "synthetic"


class Perplexity:
  """The perplexity windows of a pruning (`dpjax.variants.perplexity`), split into selection
  and held-out windows like the items; the unpruned model's NLLs computed once."""

  def __init__(self, model, source: str, s: PruneSettings):
    from dpjax.checkpoints.convert import load_tokenizer
    from dpjax.lens.training import corpus_texts, windows
    from dpjax.variants import perplexity
    self.model, self.s = model, s
    self.spec = s.ppl_corpus or default_corpus(s)
    stream = windows(load_tokenizer(source), corpus_texts(self.spec), 1).ravel()
    self.windows, self.before = perplexity.split_stream(stream, s.ppl_windows, s.ppl_seq_len)
    self.selection, self.heldout = split_items(len(self.windows), s.selection_fraction, s.seed)
    self.unpruned = perplexity.window_nll(model, self.windows)
    self._nll: dict[tuple[int, ...], np.ndarray] = {}

  def nll(self, kept) -> np.ndarray:
    """Per-window NLL of a kept set (computed once: the gate's choice is recorded after)."""
    from dpjax.model.plan import keep_mask
    from dpjax.variants import perplexity
    key = tuple(kept)
    if key not in self._nll:
      self._nll[key] = perplexity.window_nll(self.model, self.windows,
                                             keep_mask(list(kept), self.model.num_layers))
    return self._nll[key]

  def gate(self, kept) -> tuple[bool, dict[str, Any]]:
    from dpjax.variants import perplexity
    r = perplexity.ratio(self.nll(kept)[self.selection], self.unpruned[self.selection],
                         self.s.seed)
    return r["upper95"] <= self.s.max_ppl_ratio, r

  def _record(self, nll: np.ndarray) -> dict[str, Any]:
    from dpjax.variants import perplexity
    seed = self.s.seed
    return {"corpus": self.spec, "windows": int(len(self.windows)),
            "seq_len": int(self.windows.shape[1]),
            "unpruned": {part: perplexity.summary(self.unpruned[idx], seed)
                         for part, idx in self._parts()},
            "pruned": {part: perplexity.summary(nll[idx], seed) for part, idx in self._parts()},
            "ratio": {part: perplexity.ratio(nll[idx], self.unpruned[idx], seed)
                      for part, idx in self._parts()}}

  def _parts(self):
    return (("selection", self.selection), ("heldout", self.heldout))

  def record(self, kept) -> dict[str, Any]:
    return self._record(self.nll(kept))

  def record_model(self, model) -> dict[str, Any]:
    """The same windows under another model (the healed variant, every block run)."""
    from dpjax.variants import perplexity
    return self._record(perplexity.window_nll(model, self.windows))


def _gain(healed: np.ndarray, pruned: np.ndarray, seed: int) -> dict[str, Any]:
  """Accuracy gain `healed - pruned`, paired over the same items."""
  out = _drop(healed, pruned, seed)
  out["gain"] = out.pop("drop")
  out.pop("upper95")
  out["only_healed_right"] = out.pop("only_unpruned_right")
  out["only_pruned_right"] = out.pop("only_variant_right")
  return out


def jax_to_numpy(tree):
  import jax
  return jax.tree.map(np.asarray, tree)


def reproduce(s: PruneSettings) -> dict[str, Any]:
  """Exports a plan's kept blocks again from its source model; the weights must come out
  identical to the plan's (SHA256 of every file)."""
  with open(s.plan) as f:
    plan = json.load(f)
  source = plan["source"]["model"]
  if not os.path.isabs(source) and not os.path.exists(source):
    source = os.path.join(os.path.dirname(os.path.abspath(s.plan)), source)
  got = _fingerprint(source)
  if got != plan["source"]["fingerprint"]:
    raise ValueError(f"the source model {source} has weight fingerprint {got[:16]}..., not "
                     f"the plan's {plan['source']['fingerprint'][:16]}...: it is another model.")
  s = dataclasses.replace(s, gguf=bool(plan["settings"].get("gguf")))
  exported = export_variant(source, s.output_dir, plan["kept_blocks"], gguf=s.gguf,
                            verify=s.verify, seed=s.seed, overwrite=s.overwrite)
  different = sorted(name for name, digest in plan["export"]["files"].items()
                     if exported["files"].get(name) != digest)
  if plan["export"].get("gguf") and (exported["gguf"] or {}).get("sha256") != \
      plan["export"]["gguf"]["sha256"]:
    different.append(GGUF_FILE)
  if different:
    raise ValueError(f"exported again from the plan, {different} differ from the plan's "
                     "files.")
  again = {**plan, "reproduced_from": os.path.abspath(s.plan), "export": exported}
  fileio.write_json(os.path.join(s.output_dir, PLAN_FILE), again)
  return again
