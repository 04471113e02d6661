"""The summary a person reads first: Markdown with the study's numbers, and a
self-contained HTML page of it with every figure inlined."""

from __future__ import annotations

import base64
import html
import os
from typing import Sequence

import numpy as np

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
  unpruned, threshold = full.outcome_accuracy, full.collapse_threshold()
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
      distinct = sum(c.same_as is None for c in phase.comparisons)
      out.append(f"- The paper's claim on this run, from the paired comparisons (Holm over "
                 f"{distinct} distinct comparisons): **{claim}** ({why}).")
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
           *([f"- Judged by generation: every variant's outcome is the exact match of its "
              f"greedy answers (unpruned {full.exact_match:.3f}, token F1 "
              f"{full.token_f1:.3f}; the best constant answer {full.generation_chance:.3f}); "
              f"the per-layer profile reads the first answer token."]
             if full.judged_by_generation else []),
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
                   f"the same evaluation items. {CLAIM}")
      lines += ["", *comparison_table(phase.comparisons, results.settings.get("margin",
                                                                        statistics.MARGIN))]
  if results.noise_probe is not None:
    lines += ["", *noise_lines(results.noise_probe)]
  lines += findings(results)
  engine = results.engine
  if engine is not None:
    lines += ["", f"- Engine: {engine.xla_compilations} XLA compilations "
              f"({engine.cache_hits} more programs from the persistent cache); "
              f"{engine.block_evaluations_executed} block evaluations executed against "
              f"{engine.block_evaluations_minimum} needed "
              f"({engine.block_evaluations_naive} without prefix sharing)."]
  return "\n".join(lines) + "\n"


CLAIM = ("The paper's claim: pruning Decisive-Phase blocks costs little, pruning Silent-Phase "
         "blocks collapses accuracy.")


def class_definitions(margin: float) -> str:
  return (f"Classes: **holds**: the Decisive arm is non-inferior to the unpruned model (the "
          f"upper 95% bound of its paired drop is at most the margin {margin}) and the Silent "
          "arm is significantly below the Decisive arm (Holm p < 0.05, interval below 0); "
          "**reversed**: the Decisive arm is significantly below the Silent arm; "
          f"**equivalent**: the 90% interval of the difference lies inside +-{margin}; "
          "**cannot tell**: none of these (the reason gives the difference these items could "
          "detect at 80% power).")


def comparison_table(comparisons, margin: float, what: str = "rule") -> list[str]:
  """Silent against Decisive at every (rule or level, k), with each arm against the
  unpruned model and the class (Markdown lines, the columns explained below the table)."""
  lines = [f"| {what} | k | Silent | Decisive | Silent - Decisive [95%] | p | Holm p | "
           "Decisive drop [95%] | Silent collapsed | class |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  tests = []
  for c in comparisons:
    k = c.k if c.k_silent is None else f"{c.k_silent} / {c.k_decisive}"
    if c.test not in tests:
      tests.append(c.test)
    mark = "*" * (tests.index(c.test) + 1)
    drop = c.decisive_drop
    drop_text = "-" if drop is None else (f"{drop.drop:+.3f} [{drop.drop_ci95[0]:+.3f}, "
                                          f"{drop.drop_ci95[1]:+.3f}]")
    collapsed = "-" if c.silent_drop is None else (
        "yes" if c.silent_drop.collapsed else "no")
    verdict = c.verdict or "-"
    if c.same_as is not None:
      verdict = f"same variants as {c.same_as}"
    lines.append(f"| {c.rule} | {k} | {c.silent_accuracy:.3f} | {c.decisive_accuracy:.3f} | "
                 f"{c.difference:+.3f} [{c.ci95[0]:+.3f}, {c.ci95[1]:+.3f}] | "
                 f"{c.p:.3g}{mark} | {c.holm_p:.3g} | {drop_text} | {collapsed} | {verdict} |")
  lines += ["", "Columns: Silent and Decisive are each arm's accuracy (the mean over seeds for "
            "a random rule); the difference is Silent minus Decisive with its paired 95% "
            "interval; p is the paired test's " + "; ".join(
                f"({'*' * (i + 1)}) {t}" for i, t in enumerate(tests))
            + "; Holm p adjusts p over the distinct comparisons (a row marked 'same variants' "
            "removes exactly the blocks of an earlier row and is counted once); the Decisive "
            "drop is the unpruned accuracy minus the Decisive arm's, paired, with its 95% "
            "interval (the arm is non-inferior when the upper end is at most the margin "
            f"{margin}); Silent collapsed: the Silent arm's 95% accuracy interval lies below the "
            "collapse threshold (chance plus half the unpruned model's gap above chance).",
            "", class_definitions(margin)]
  return lines


def noise_lines(probe) -> list[str]:
  """The noise probe (`results.NoiseProbe`) in Markdown: the arms at every level, compared
  paired, and the profile's extremes at the highest level."""
  if probe.skipped is not None:
    return [f"- Noise probe skipped: {probe.skipped}."]
  l_star, n = probe.transition_block, probe.num_layers
  lines = [f"- Noise probe (l* = {l_star} on the calibration items): Gaussian noise "
           "eps * sigma(h) * N(0, I) added to the residual stream after every block of the "
           f"Silent Phase (1-{l_star - 1}) or of the Decisive Phase ({l_star}-{n}), every "
           f"block kept, {len(probe.seeds)} seeds per level; the arms paired on the same "
           "evaluation items (`noise_by_phase.png`):",
           "", "| eps^2 | Silent (std over seeds) | Decisive (std over seeds) | "
           "Silent - Decisive [95%] | p | Holm p |", "|---|---|---|---|---|---|"]
  silent, decisive = probe.arms["silent"], probe.arms["decisive"]
  for a, b, c in zip(silent, decisive, probe.comparisons):
    lines.append(f"| {a.level:g} | {a.accuracy:.3f} ({a.accuracy_std:.3f}) | "
                 f"{b.accuracy:.3f} ({b.accuracy_std:.3f}) | {c.difference:+.3f} "
                 f"[{c.ci95[0]:+.3f}, {c.ci95[1]:+.3f}] | {c.p:.3g} | {c.holm_p:.3g} |")
  if probe.comparisons:
    lines += ["", f"The interval and p: {probe.comparisons[0].test}; Holm p adjusts p over the "
              f"{len(probe.comparisons)} levels."]
  if probe.profile_points:
    top = max(probe.levels)
    column = probe.profile_grid()[:, list(probe.levels).index(top)]
    worst, best = int(np.nanargmin(column)), int(np.nanargmax(column))
    lines += ["", f"- Noise profile (noise after one block at a time, {len(probe.profile_seeds)} "
              f"seed(s)): at eps^2 = {top:g}, accuracy {column[worst]:.3f} after block "
              f"{worst + 1} (the lowest) to {column[best]:.3f} after block {best + 1}; mean "
              f"{np.mean(column[:l_star - 1]):.3f} over the Silent Phase's blocks, "
              f"{np.mean(column[l_star - 1:]):.3f} over the Decisive Phase's."]
  return lines


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
