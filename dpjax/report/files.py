"""The study's report on disk: results.json, per-item arrays, CSV tables, figures, summary.

Every file goes through `dpjax.fileio` (written under a temporary name and
renamed into place), and results.json is written last, so a reader never sees
half a report.
"""

from __future__ import annotations

import json
import os

import numpy as np

from dpjax.report import figures
from dpjax.study import metrics
from dpjax.fileio import atomic_write_text, write_csv, write_json, write_npz
from dpjax.study.results import FullProfile, MethodResult, StudyResults, variant_records
from dpjax.report.summary import summary_html, summary_markdown
from dpjax.tasks import LETTERS, EncodedTask, prompts

RESULTS_FILE = "results.json"
ARRAYS_FILE = "readouts.npz"
ITEMS_FILE = "items.jsonl"
PROFILE_CSV = "layer_profile.csv"
CURVES_CSV = "pruning_curves.csv"
SUMMARY_FILE = "summary.md"
SUMMARY_HTML = "summary.html"
VARIANTS_FILE = "variants.jsonl"


def write_items(path: str, encoded: EncodedTask, answers=None) -> None:
  """One JSON line per item: everything needed to recompute its numbers elsewhere (the
  prompt exactly as fed, and what each format reads); `answers` (the generate format):
  the unpruned model's greedy generation of each item, as `generation`."""
  lines = []
  for i, item in enumerate(encoded.items):
    record = {"id": item.id, "subject": item.subject, "format": encoded.format,
              "prompt": encoded.prompts[i]}
    if encoded.format == "letter":
      record.update(options=list(item.options), letters=list(LETTERS[:item.num_options]),
                    letter_token_ids=[int(t) for t in encoded.letter_ids[i, :item.num_options]],
                    answer=item.answer)
    elif encoded.format == "cloze":
      requests = prompts.cloze_parts(item)
      record.update(options=list(item.options), contexts=list(requests[0]),
                    continuations=list(requests[1]), answer=item.answer,
                    option_bytes=[float(b) for b in encoded.option_bytes[i, :item.num_options]])
    else:
      record.update(golds=list(item.golds),
                    gold_first_token_ids=[int(t) for t in encoded.letter_ids[i] if t >= 0])
    if answers is not None:
      record["generation"] = answers[i]
    record.update(num_prompt_tokens=len(encoded.tokens[i]),
                  left_truncated=bool(encoded.truncated[i]))
    lines.append(json.dumps(record))
  atomic_write_text(path, "\n".join(lines) + "\n")


def write_profile_csv(path: str, full: FullProfile) -> None:
  num_options = np.asarray(full.option_frequency).shape[1]
  stats = ("mean", "median", "q10", "q90")
  header = (["layer", "accuracy"]
            + [f"dm_{norm}_{stat}" for norm in metrics.NORMALIZATIONS for stat in stats]
            + [f"of_{LETTERS[k]}" for k in range(num_options)])
  rows = []
  for layer in full.layers:
    row = [layer, float(full.accuracy[layer])]
    for norm in metrics.NORMALIZATIONS:
      summary = full.decision_margin[norm]
      row += [float(getattr(summary, stat)[layer]) for stat in stats]
    row += [float(x) for x in full.option_frequency[layer]]
    rows.append(row)
  write_csv(path, header, rows)


def write_curves_csv(path: str, methods: dict[str, MethodResult]) -> None:
  rows = []
  for name, result in methods.items():
    for p in result.curve:
      rows.append([name, p.removed, p.accuracy, p.mean_final_dm["vocab"],
                   float("nan") if p.nll is None else p.nll,
                   float("nan") if p.spread is None else p.spread.std,
                   " ".join(str(b) for b in p.kept or ())])
  write_csv(path, ["method", "blocks_removed", "accuracy", "mean_final_dm_vocab", "nll",
                   "accuracy_std", "kept_blocks"], rows)


def write_study(out: str, results: StudyResults, readout, prof: metrics.Profile,
                encoded: EncodedTask, settings) -> None:
  """Every file of the report, each written atomically; results.json last."""
  full = results.full_model
  unpruned = results.unpruned_point
  write_items(os.path.join(out, ITEMS_FILE), encoded,
              None if unpruned is None else unpruned.answers)
  extra = {} if readout.option_logprob is None else {"option_logprob": readout.option_logprob}
  write_npz(
      os.path.join(out, ARRAYS_FILE),
      item_ids=np.array([it.id for it in encoded.items]),
      answer=encoded.answer, num_options=encoded.num_options, letter_ids=encoded.letter_ids,
      option_logits=readout.option_logits, log_normalizer=readout.log_normalizer,
      decision_margin_vocab=np.asarray(prof.margin["vocab"]),
      decision_margin_options=np.asarray(prof.margin["options"]),
      top_option=np.asarray(prof.top), **extra)
  write_profile_csv(os.path.join(out, PROFILE_CSV), full)
  title = (f"{os.path.basename(os.path.normpath(settings.model))} on {settings.task}"
           + ("" if settings.format == "letter" else f" ({settings.format})"))
  path = lambda name: os.path.join(out, name)
  figures.plot_decision_margin(path(figures.MARGIN_FIGURE), full, settings.normalization, title)
  if results.full_model_logit_lens is not None:
    figures.plot_lenses(path(figures.LENSES_FIGURE), full, results.full_model_logit_lens,
                        settings.normalization, title)
  labels = ("gold", "other token") if encoded.format == "open" else None
  figures.plot_option_frequency(path(figures.FREQUENCY_FIGURE), full, title, labels)
  if len(full.by_subject) > 1:
    figures.plot_subject_margins(path(figures.SUBJECT_FIGURE), full, settings.normalization,
                                 title)
  curves = results.curves()
  if curves:
    write_curves_csv(path(CURVES_CSV), curves)
    figures.plot_pruning_curves(path(figures.CURVES_FIGURE), curves, full, title)
    figures.plot_removed_blocks(path(figures.REMOVED_FIGURE), curves, full.transition_block,
                                full.num_layers, title)
  iterative = [name for name, m in curves.items() if m.kind == "iterative"]
  if iterative:
    figures.plot_iterative_heatmap(path(figures.HEATMAP_FIGURE), curves[iterative[0]],
                                   iterative[0], settings.normalization)
  phase = results.phase_experiment
  if phase is not None and phase.skipped is None:
    figures.plot_phase_comparison(path(figures.PHASE_FIGURE), phase, full, title)
    if phase.comparisons:
      figures.plot_phase_differences(path(figures.DIFFERENCES_FIGURE), phase, title)
  noise = results.noise_probe
  if noise is not None and noise.skipped is None:
    figures.plot_noise_by_phase(path(figures.NOISE_FIGURE), noise, full, title)
  variants = variant_records(results)
  if variants:
    atomic_write_text(path(VARIANTS_FILE), "".join(json.dumps(v) + "\n" for v in variants))
  markdown = summary_markdown(results)
  atomic_write_text(path(SUMMARY_FILE), markdown)
  shown = [f for f in figures.FIGURES if os.path.exists(path(f))]
  atomic_write_text(path(SUMMARY_HTML), summary_html(markdown, out, shown))
  write_json(path(RESULTS_FILE), results.to_json())
