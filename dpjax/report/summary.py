"""The summary a person reads first: Markdown with the study's numbers, and a
self-contained HTML page of it with every figure inlined."""

from __future__ import annotations

import base64
import html
import os
from typing import Sequence

from dpjax.study import metrics
from dpjax.study import statistics
from dpjax.study.results import StudyResults


def _title(results: StudyResults) -> str:
  return (f"{os.path.basename(os.path.normpath(results.model['path']))} on "
          f"{results.task['spec']}")


def findings(results: StudyResults) -> list[str]:
  """The paper's three questions, answered with this run's numbers (Markdown lines).

  "Collapsed" uses the collapse threshold `chance + (full - chance) / 2`; sharp
  or gradual is `metrics.transition_shape`.
  """
  full = results.full_model
  unpruned, threshold = full.final_accuracy, full.collapse_threshold()
  out = ["", "## Findings", ""]
  norm = results.settings.get("normalization", "vocab")
  l_star = full.transition_block
  if l_star is None:
    out.append("- Transition: none; the mean Decision Margin is not positive at the final layer.")
  else:
    shape = metrics.transition_shape(full.decision_margin[norm].mean, full.sharpness_rise)
    verdict = "sharp" if shape.sharp else "gradual"
    out.append(f"- Transition: {verdict}. The mean DM ({norm}) rises by {shape.total_rise:.3f} "
               f"from its lowest layer to the last; the largest one-block rise, "
               f"{full.sharpness_rise:+.3f} at block {full.sharpness_block}, is "
               f"{shape.share:.0%} of that. l* = {l_star} of {full.num_layers} blocks.")
  phase = results.phase_experiment
  if phase is not None and phase.skipped is None:
    said = {True: "collapses", False: "does not collapse"}
    for selection, arms in phase.arms.items():
      silent, decisive = arms["silent"][-1], arms["decisive"][-1]
      out.append(f"- Silent vs Decisive ({selection}, largest k = {silent.k}): "
                 f"Silent-Phase pruning {said[silent.accuracy < threshold]} "
                 f"({silent.accuracy:.3f}), Decisive-Phase pruning "
                 f"{said[decisive.accuracy < threshold]} ({decisive.accuracy:.3f}); "
                 f"unpruned {unpruned:.3f}, collapse threshold {threshold:.3f}.")
    if phase.comparisons:
      claim, why = statistics.verdict(phase.comparisons)
      out.append(f"- The paper's claim on this run, from the paired comparisons (Holm over "
                 f"{len(phase.comparisons)}): **{claim}** ({why}).")
  for name, result in results.curves().items():
    if result.kind != "iterative":
      continue
    point = result.collapse_point
    if point is None:
      out.append(f"- {name}: no cliff; accuracy stays above {threshold:.3f} down to "
                 f"{result.curve[-1].removed} blocks removed.")
      continue
    before = result.accuracy_at(point - 1)
    out.append(f"- {name}: the cliff falls at {point} blocks removed (accuracy "
               f"{float('nan') if before is None else before:.3f} with {point - 1} removed, "
               f"{result.accuracy_at(point):.3f} with {point}).")
  return out


def lens_line(results: StudyResults) -> str:
  """Which lens every number below came from."""
  task = results.task
  fmt = task.get("format", "letter")
  fmt_text = fmt + (f", {task['cloze_norm']} normalization" if fmt == "cloze" else "")
  if results.lens.get("kind") != "tuned":
    return f"Every number is read through the logit lens; answer format: {fmt_text}."
  logit = results.full_model_logit_lens
  beside = ("" if logit is None else
            f" The logit lens on the same items: final accuracy {logit.final_accuracy:.3f}, "
            f"transition block {logit.transition_block}.")
  return (f"Every number is read through the tuned lens at `{results.lens['path']}` (trained "
          f"on {results.lens.get('trained_on')}); answer format: {fmt_text}.{beside}")


def summary_markdown(results: StudyResults) -> str:
  """What a person reads first."""
  full, model, task = results.full_model, results.model, results.task
  n = full.num_layers
  lines = [f"# dpjax study: {_title(results)}",
           "",
           f"- {n} blocks ({model['architecture']}); {task['num_items']} evaluation items "
           f"({task['num_calibration_items']} calibration items for the pruning search"
           + (f", l* read on {task['num_transition_items']}"
              if task.get("num_transition_items", 0) > task['num_calibration_items'] else "")
           + f"), {task['k_shot']}-shot.",
           f"- Unpruned accuracy {full.final_accuracy:.3f} (chance {full.chance:.3f}).",
           *([f"- Open answers: accuracy is the gold first token's; chance is the best "
              f"constant guess (one token for every item). Exact match of greedy "
              f"generation: {full.exact_match:.3f}."] if full.exact_match is not None else []),
           *([_answered_line(full.answered, n)] if full.answered is not None else []),
           f"- {lens_line(results)}",
           ]
  l_star = full.transition_block
  if l_star is None:
    lines.append("- No decision transition: the mean Decision Margin is not above tau at the "
                 "final layer.")
  else:
    lines.append(f"- Transition block l* = {l_star} ({l_star / n:.0%} of depth): Silent Phase "
                 f"blocks 1-{l_star - 1}, Decisive Phase blocks {l_star}-{n}. Sharpest rise of "
                 f"the mean DM: {full.sharpness_rise:+.3f} at block {full.sharpness_block}.")
  if len(full.by_subject) > 1:
    lines += ["", "| subject | items | final accuracy | transition block l* | fraction of depth |",
              "|---|---|---|---|---|"]
    for subject, sub in full.by_subject.items():
      frac = "-" if sub.transition_block is None else f"{sub.transition_fraction:.0%}"
      lines.append(f"| {subject} | {sub.num_items} | {sub.accuracy:.3f} | "
                   f"{'none' if sub.transition_block is None else sub.transition_block} | "
                   f"{frac} |")
  if results.methods:
    lines += ["", "| method | collapse point (blocks removed) | accuracy after 1 / 25% / 50% "
              "removed |", "|---|---|---|"]
    picks = [1, max(1, round(n / 4)), max(1, round(n / 2))]
    for name, result in results.methods.items():
      if result.skipped is not None:
        lines.append(f"| {name} | skipped: {result.skipped} | |")
        continue
      accs = [result.accuracy_at(k) for k in picks]
      shown = " / ".join("-" if a is None else f"{a:.3f}" for a in accs)
      lines.append(f"| {name} | {result.collapse_point} | {shown} |")
  phase = results.phase_experiment
  if phase is not None:
    lines.append("")
    if phase.skipped is not None:
      lines.append(f"- Phase-targeted experiment skipped: {phase.skipped}.")
    else:
      cal = results.calibration_transition or {}
      used = cal.get(cal.get("used", ""), {})
      interval = (f", 95% interval {used['ci95'][0]}-{used['ci95'][1]} over "
                  f"{cal['items']} items" if used.get("ci95") else "")
      lines.append(f"- Phase-targeted pruning (l* = {phase.transition_block} on the "
                   f"calibration items{interval}): Silent arm against Decisive arm, paired on "
                   "the same evaluation items:")
      lines += ["", "| rule | k | Silent | Decisive | Silent - Decisive [95%] | McNemar p | "
                "Holm p |", "|---|---|---|---|---|---|---|"]
      for c in phase.comparisons:
        k = c.k if c.k_silent is None else f"{c.k_silent} / {c.k_decisive}"
        lines.append(f"| {c.rule} | {k} | {c.silent_accuracy:.3f} | {c.decisive_accuracy:.3f} "
                     f"| {c.difference:+.3f} [{c.ci95[0]:+.3f}, {c.ci95[1]:+.3f}] | "
                     f"{c.mcnemar_p:.3g} | {c.holm_p:.3g} |")
  lines += findings(results)
  engine = results.engine
  if engine is not None:
    lines += ["", f"- Engine: {engine.xla_compilations} XLA compilations "
              f"({engine.cache_hits} more programs from the persistent cache); "
              f"{engine.block_evaluations_executed} block evaluations executed against "
              f"{engine.block_evaluations_minimum} needed "
              f"({engine.block_evaluations_naive} without prefix sharing)."]
  return "\n".join(lines) + "\n"


def markdown_to_html(text: str) -> str:
  """Our summary's Markdown (headings, nested lists, tables, code, bold) as HTML."""
  import markdown
  return markdown.markdown(text, extensions=["tables"])


def summary_html(text: str, directory: str, figures: Sequence[str]) -> str:
  """A self-contained page: the summary, then every figure inlined as a PNG data URI."""
  parts = []
  for name in figures:
    with open(os.path.join(directory, name), "rb") as f:
      data = base64.b64encode(f.read()).decode("ascii")
    parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(name)}">'
                 f"<figcaption>{html.escape(name)}</figcaption></figure>")
  style = ("body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;"
           "padding:0 1em;line-height:1.45}table{border-collapse:collapse;margin:1em 0}"
           "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}"
           "figure{margin:1.5em 0}img{max-width:100%}figcaption{color:#666;font-size:.9em}"
           "code{background:#f3f3f3;padding:0 .2em}")
  return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>dpjax study</title>"
          f"<style>{style}</style></head><body>\n{markdown_to_html(text)}\n"
          + "\n".join(parts) + "\n</body></html>\n")


def _answered_line(answered: dict, num_layers: int) -> str:
  """The open format's transition on the items the model answers (`study.answered_items`)."""
  head = (f"- On the {answered['items']} items the model answers (top token a gold first "
          f"token at the last layer; {answered['left_out_constant']} more left out, which "
          f"the best constant guess answers too): ")
  if not answered["items"]:
    return head + "none."
  l_star = answered["transition_block"]
  where = ("no transition by the margin rule" if l_star is None else
           f"l* = {l_star} ({l_star / num_layers:.0%} of depth) by the margin rule")
  return (head + f"{where}; the median item's top token becomes and stays a gold one at "
          f"layer {answered['median_decision_layer']:g}.")
