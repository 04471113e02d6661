"""The report: results.json, per-item arrays, CSV tables, figures, items.jsonl.

Every file is written under a temporary name and renamed into place, so a
reader never sees half a file. Figures use matplotlib's Agg backend (no
display needed).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from typing import Any, Sequence

import numpy as np

from dpjax import metrics
from dpjax.fileio import atomic_write_text, default_mode
from dpjax.tasks import LETTERS, EncodedTask

RESULTS_FILE = "results.json"
ARRAYS_FILE = "readouts.npz"
ITEMS_FILE = "items.jsonl"
PROFILE_CSV = "layer_profile.csv"
MARGIN_FIGURE = "decision_margin.png"
FREQUENCY_FIGURE = "option_frequency.png"


def _clean(value: Any) -> Any:
  """JSON-ready: arrays to lists, NaN to None, numpy scalars to Python."""
  if isinstance(value, dict):
    return {str(k): _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
    return _clean(np.asarray(value).tolist())
  if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
    return None
  return value


def write_json(path: str, data: dict[str, Any]) -> None:
  atomic_write_text(path, json.dumps(_clean(data), indent=2) + "\n")


def write_npz(path: str, **arrays: np.ndarray) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".readouts.tmp-", suffix=".npz", dir=directory)
  try:
    os.fchmod(fd, default_mode())
    with os.fdopen(fd, "wb") as f:
      np.savez_compressed(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(header)
  for row in rows:
    writer.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in row])
  atomic_write_text(path, buffer.getvalue())


def write_items(path: str, encoded: EncodedTask) -> None:
  """One JSON line per item: everything needed to recompute its numbers elsewhere."""
  lines = []
  for i, item in enumerate(encoded.items):
    lines.append(json.dumps({
        "id": item.id,
        "subject": item.subject,
        "prompt": encoded.prompts[i],
        "options": list(item.options),
        "letters": list(LETTERS[:item.num_options]),
        "letter_token_ids": [int(t) for t in encoded.letter_ids[i, :item.num_options]],
        "answer": item.answer,
        "num_prompt_tokens": len(encoded.tokens[i]),
        "left_truncated": bool(encoded.truncated[i]),
    }))
  atomic_write_text(path, "\n".join(lines) + "\n")


def profile_json(prof: metrics.Profile, num_layers: int) -> dict[str, Any]:
  """The per-layer profile of one model as plain JSON (layers 0..L, 0 = h_0)."""
  l_star = int(prof.transition)
  silent, decisive = metrics.phases(l_star, num_layers)
  return {
      "layers": list(range(num_layers + 1)),
      "decision_margin": {
          norm: {"mean": s.mean, "median": s.median, "q10": s.q10, "q90": s.q90}
          for norm, s in prof.margin_summary.items()},
      "accuracy": prof.accuracy,
      "chance": float(prof.chance),
      "option_frequency": prof.option_frequency,
      "transition_block": None if l_star == metrics.NO_TRANSITION else l_star,
      "accuracy_transition_block": (None if int(prof.accuracy_transition) == metrics.NO_TRANSITION
                                    else int(prof.accuracy_transition)),
      "silent_phase": [b + 1 for b in np.flatnonzero(np.asarray(silent))],
      "decisive_phase": [b + 1 for b in np.flatnonzero(np.asarray(decisive))],
      "sharpness": {"rise": float(prof.sharpness.rise), "block": int(prof.sharpness.block)},
  }


def write_profile_csv(path: str, prof: dict[str, Any]) -> None:
  num_options = len(prof["option_frequency"][0])
  header = (["layer", "accuracy"]
            + [f"dm_{norm}_{stat}" for norm in metrics.NORMALIZATIONS
               for stat in ("mean", "median", "q10", "q90")]
            + [f"of_{LETTERS[k]}" for k in range(num_options)])
  rows = []
  for layer in prof["layers"]:
    row = [layer, float(prof["accuracy"][layer])]
    for norm in metrics.NORMALIZATIONS:
      for stat in ("mean", "median", "q10", "q90"):
        row.append(float(prof["decision_margin"][norm][stat][layer]))
    row += [float(x) for x in prof["option_frequency"][layer]]
    rows.append(row)
  write_csv(path, header, rows)


# ----------------------------------------------------------------------------
# Figures.


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _integer_ticks():
  from matplotlib.ticker import MaxNLocator
  return MaxNLocator(integer=True)


def save_figure(fig, path: str) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".figure.tmp-", suffix=".png", dir=directory)
  os.fchmod(fd, default_mode())
  os.close(fd)
  try:
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
    _pyplot().close(fig)


def plot_decision_margin(path: str, prof: dict[str, Any], headline: str, title: str) -> None:
  """Mean Decision Margin against layer, both normalizations, the transition marked."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  layers = np.array(prof["layers"])
  colours = {"vocab": "tab:blue", "options": "tab:orange"}
  for norm in metrics.NORMALIZATIONS:
    stats = prof["decision_margin"][norm]
    mean = np.array(stats["mean"], dtype=float)
    ax.plot(layers, mean, marker="o", ms=3, color=colours[norm],
            label=f"mean DM ({norm}){' (headline)' if norm == headline else ''}")
    if norm == headline:
      ax.fill_between(layers, np.array(stats["q10"], float), np.array(stats["q90"], float),
                      color=colours[norm], alpha=0.15, label=f"10-90% of items ({norm})")
  l_star = prof["transition_block"]
  if l_star is not None:
    ax.axvspan(0.5, l_star - 0.5, color="grey", alpha=0.12, label="Silent Phase")
    ax.axvline(l_star, color="black", ls="--", lw=1, label=f"transition l* = {l_star}")
  ax.axhline(0, color="black", lw=0.5)
  ax.xaxis.set_major_locator(_integer_ticks())
  ax.set_xlabel("layer (0 = embeddings, l = after block l)")
  ax.set_ylabel("Decision Margin")
  ax.set_title(title)
  ax.legend(fontsize=8, loc="upper left")
  save_figure(fig, path)


def plot_option_frequency(path: str, prof: dict[str, Any], title: str) -> None:
  """Option Frequency as stacked bars per layer, with the correct-option share."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  layers = np.array(prof["layers"])
  freq = np.nan_to_num(np.array(prof["option_frequency"], dtype=float))
  bottom = np.zeros(len(layers))
  cmap = plt.get_cmap("tab10")
  for k in range(freq.shape[1]):
    ax.bar(layers, freq[:, k], bottom=bottom, color=cmap(k), width=0.8, label=LETTERS[k])
    bottom += freq[:, k]
  ax.plot(layers, np.array(prof["accuracy"], dtype=float), color="black", marker="o", ms=3,
          label="correct option")
  ax.axhline(prof["chance"], color="black", ls=":", lw=1, label="chance")
  ax.set_xlabel("layer (0 = embeddings, l = after block l)")
  ax.set_ylabel("fraction of items whose top option is ...")
  ax.set_ylim(0, 1.02)
  ax.xaxis.set_major_locator(_integer_ticks())
  ax.set_title(title)
  ax.legend(fontsize=8, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  save_figure(fig, path)


def plot_subject_margins(path: str, prof: dict[str, Any], headline: str, title: str) -> None:
  """Mean Decision Margin per subject (task family), each subject's transition marked."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  layers = np.array(prof["layers"])
  cmap = plt.get_cmap("tab10")
  for i, (subject, sub) in enumerate(prof["by_subject"].items()):
    colour = cmap(i % 10)
    l_star = sub["transition_block"]
    label = f"{subject} (l* = {l_star if l_star is not None else 'none'})"
    ax.plot(layers, np.array(sub["mean_decision_margin"], float), marker="o", ms=3,
            color=colour, label=label)
    if l_star is not None:
      ax.axvline(l_star, color=colour, ls="--", lw=1)
  ax.axhline(0, color="black", lw=0.5)
  ax.xaxis.set_major_locator(_integer_ticks())
  ax.set_xlabel("layer (0 = embeddings, l = after block l)")
  ax.set_ylabel(f"mean Decision Margin ({headline})")
  ax.set_title(title)
  ax.legend(fontsize=8, loc="upper left")
  save_figure(fig, path)


# ----------------------------------------------------------------------------
# The study's report.

CURVES_CSV = "pruning_curves.csv"
CURVES_FIGURE = "pruning_curves.png"
HEATMAP_FIGURE = "iterative_heatmap.png"
PHASE_FIGURE = "phase_comparison.png"
REMOVED_FIGURE = "removed_blocks.png"
SUBJECT_FIGURE = "decision_margin_by_subject.png"
SUMMARY_FILE = "summary.md"
SUMMARY_HTML = "summary.html"


def write_study(out: str, results: dict[str, Any], readout, prof: metrics.Profile,
                encoded: EncodedTask, settings) -> None:
  """Every file of the report, each written atomically; results.json last."""
  full = results["full_model"]
  write_items(os.path.join(out, ITEMS_FILE), encoded)
  write_npz(
      os.path.join(out, ARRAYS_FILE),
      item_ids=np.array([it.id for it in encoded.items]),
      answer=encoded.answer, num_options=encoded.num_options, letter_ids=encoded.letter_ids,
      option_logits=readout.option_logits, log_normalizer=readout.log_normalizer,
      decision_margin_vocab=np.asarray(prof.margin["vocab"]),
      decision_margin_options=np.asarray(prof.margin["options"]),
      top_option=np.asarray(prof.top))
  write_profile_csv(os.path.join(out, PROFILE_CSV), full)
  title = f"{os.path.basename(os.path.normpath(settings.model))} on {settings.task}"
  plot_decision_margin(os.path.join(out, MARGIN_FIGURE), full, settings.normalization, title)
  plot_option_frequency(os.path.join(out, FREQUENCY_FIGURE), full, title)
  if len(full.get("by_subject", {})) > 1:
    plot_subject_margins(os.path.join(out, SUBJECT_FIGURE), full, settings.normalization, title)
  methods = {k: v for k, v in results.get("methods", {}).items() if "curve" in v}
  if methods:
    write_curves_csv(os.path.join(out, CURVES_CSV), methods)
    plot_pruning_curves(os.path.join(out, CURVES_FIGURE), methods, full, title)
    plot_removed_blocks(os.path.join(out, REMOVED_FIGURE), methods, full["transition_block"],
                        results["model"]["num_layers"], title)
  iterative = [k for k in methods if methods[k]["kind"] == "iterative"]
  if iterative:
    plot_iterative_heatmap(os.path.join(out, HEATMAP_FIGURE), methods[iterative[0]],
                           iterative[0], settings.normalization)
  phase = results.get("phase_experiment")
  if phase and "selections" in phase:
    plot_phase_comparison(os.path.join(out, PHASE_FIGURE), phase, full, title)
  markdown = summary_markdown(results)
  atomic_write_text(os.path.join(out, SUMMARY_FILE), markdown)
  figures = [f for f in FIGURES if os.path.exists(os.path.join(out, f))]
  atomic_write_text(os.path.join(out, SUMMARY_HTML), summary_html(markdown, out, figures))
  write_json(os.path.join(out, RESULTS_FILE), results)


def write_curves_csv(path: str, methods: dict[str, Any]) -> None:
  rows = []
  for name, result in methods.items():
    for p in result["curve"]:
      rows.append([name, p["removed"], p["accuracy"], p["mean_final_dm"]["vocab"],
                   p.get("nll", float("nan")), p.get("accuracy_std", float("nan")),
                   " ".join(str(b) for b in p.get("kept", []))])
  write_csv(path, ["method", "blocks_removed", "accuracy", "mean_final_dm_vocab", "nll",
                   "accuracy_std", "kept_blocks"], rows)


def plot_pruning_curves(path: str, methods: dict[str, Any], full: dict[str, Any],
                        title: str) -> None:
  """Accuracy against blocks removed for every method: where each falls off the cliff."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(8, 4.5))
  for name, result in methods.items():
    points = result["curve"]
    x = [p["removed"] for p in points]
    y = np.array([p["accuracy"] for p in points])
    style = "-" if result["kind"] != "one_shot" else "--"
    line, = ax.plot(x, y, style, marker="o", ms=3, label=name)
    if "accuracy_std" in points[-1]:
      std = np.array([p.get("accuracy_std", 0.0) for p in points])
      ax.fill_between(x, y - std, y + std, color=line.get_color(), alpha=0.15)
    collapse = result.get("collapse_point")
    if collapse is not None:
      ax.plot([collapse], [y[x.index(collapse)]], marker="x", ms=9, color=line.get_color())
  ax.axhline(full["chance"], color="black", ls=":", lw=1, label="chance")
  half = full["chance"] + 0.5 * (full["accuracy"][-1] - full["chance"])
  ax.axhline(half, color="grey", ls="-.", lw=0.8, label="collapse threshold")
  ax.xaxis.set_major_locator(_integer_ticks())
  ax.set_xlabel("blocks removed")
  ax.set_ylabel("accuracy (evaluation items)")
  ax.set_ylim(0, 1.02)
  ax.set_title(title + " (x: collapse point)")
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  save_figure(fig, path)


def plot_iterative_heatmap(path: str, result: dict[str, Any], name: str,
                           normalization: str) -> None:
  """Mean Decision Margin per layer (x) at each Iterative Pruning step (y)."""
  plt = _pyplot()
  grid = np.array([np.array(p["layer_mean_dm"], dtype=float) for p in result["curve"]])
  fig, ax = plt.subplots(figsize=(8, 0.3 * len(grid) + 2))
  masked = np.ma.masked_invalid(grid)
  limit = max(float(np.nanmax(np.abs(grid))), 1e-6)
  cmap = plt.get_cmap("RdBu_r").copy()
  cmap.set_bad("lightgrey")
  image = ax.imshow(masked, aspect="auto", cmap=cmap, vmin=-limit, vmax=limit,
                    interpolation="nearest")
  fig.colorbar(image, ax=ax, label=f"mean Decision Margin ({normalization})")
  ax.set_xlabel("layer (0 = embeddings; grey = removed block)")
  ax.set_ylabel("step (blocks removed)")
  ax.xaxis.set_major_locator(_integer_ticks())
  ax.yaxis.set_major_locator(_integer_ticks())
  ax.set_title(f"{name}: the decision profile as blocks go")
  save_figure(fig, path)


def plot_phase_comparison(path: str, phase: dict[str, Any], full: dict[str, Any],
                          title: str) -> None:
  """Silent-arm against Decisive-arm pruning, per selection rule."""
  plt = _pyplot()
  selections = list(phase["selections"])
  fig, axes = plt.subplots(2, len(selections), figsize=(4 * len(selections), 6), squeeze=False)
  colours = {"silent": "tab:red", "decisive": "tab:green"}
  for col, selection in enumerate(selections):
    arms = phase["selections"][selection]
    for arm, points in arms.items():
      k = [p["k"] for p in points]
      acc = np.array([p["accuracy"] for p in points])
      axes[0, col].plot(k, acc, marker="o", ms=3, color=colours[arm], label=f"{arm} arm")
      if selection == "random":
        std = np.array([p["accuracy_std"] for p in points])
        axes[0, col].fill_between(k, acc - std, acc + std, color=colours[arm], alpha=0.15)
      axes[1, col].plot(k, [p["mean_final_dm"]["vocab"] for p in points], marker="o", ms=3,
                        color=colours[arm], label=f"{arm} arm")
    axes[0, col].axhline(full["chance"], color="black", ls=":", lw=1)
    axes[0, col].set_ylim(0, 1.02)
    axes[0, col].set_title(f"selection: {selection}")
    axes[1, col].set_xlabel("blocks removed inside the phase")
    for row in range(2):
      axes[row, col].xaxis.set_major_locator(_integer_ticks())
  axes[0, 0].set_ylabel("accuracy")
  axes[1, 0].set_ylabel("mean final DM (vocab)")
  axes[0, 0].legend(fontsize=8)
  fig.suptitle(f"{title}: Silent vs Decisive pruning (l* = {phase['transition_block']})")
  save_figure(fig, path)


def plot_removed_blocks(path: str, methods: dict[str, Any], l_star: int | None,
                        num_layers: int, title: str) -> None:
  """Which blocks each method removes first, against the transition."""
  plt = _pyplot()
  names = list(methods)
  fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 2))
  for row, name in enumerate(names):
    order = _removal_order(methods[name])
    for rank, block in enumerate(order):
      colour = ("tab:grey" if l_star is None else "tab:red" if block < l_star else "tab:green")
      ax.scatter(block, row, s=90 * (1 - rank / max(len(order), 1)) + 10, color=colour,
                 alpha=0.8)
  if l_star is not None:
    ax.axvline(l_star - 0.5, color="black", ls="--", lw=1, label=f"transition l* = {l_star}")
    ax.legend(fontsize=8, loc="upper right")
  ax.set_yticks(range(len(names)), names)
  ax.set_xlim(0.5, num_layers + 0.5)
  ax.xaxis.set_major_locator(_integer_ticks())
  ax.set_xlabel("block (red: Silent Phase, green: Decisive, grey: no transition; "
                "larger dot = removed earlier)")
  ax.set_title(f"{title}: where the removed blocks fall")
  save_figure(fig, path)


def _removal_order(result: dict[str, Any]) -> list[int]:
  if "removed_order" in result:
    return result["removed_order"]
  if "ranking" in result:
    return result["ranking"][:-1]
  if "rankings" in result:
    return result["rankings"][0][:-1]
  if "removed_sets" in result:  # angular: the first block each size adds
    order: list[int] = []
    for removed in result["removed_sets"]:
      order += [b for b in removed if b not in order]
    return order
  return []


def findings(results: dict[str, Any]) -> list[str]:
  """The paper's three questions, answered with this run's numbers (Markdown lines).

  "Collapsed" uses the collapse threshold `chance + (full - chance) / 2`. A
  transition counts as sharp when its largest one-block rise of the mean DM is
  at least half of the whole rise from the lowest layer to the final one.
  """
  full = results["full_model"]
  unpruned, chance = float(full["accuracy"][-1]), float(full["chance"])
  threshold = chance + 0.5 * (unpruned - chance)
  out = ["", "## Findings", ""]
  norm = results["settings"].get("normalization", "vocab")
  mean = np.array(full["decision_margin"][norm]["mean"], float)
  l_star, rise = full["transition_block"], full["sharpness"]["rise"]
  total = float(mean[-1] - np.nanmin(mean))
  if l_star is None:
    out.append("- Transition: none; the mean Decision Margin is not positive at the final layer.")
  else:
    share = rise / total if total > 0 else float("nan")
    verdict = "sharp" if share >= 0.5 else "gradual"
    out.append(f"- Transition: {verdict}. The mean DM ({norm}) rises by {total:.3f} from its "
               f"lowest layer to the last; the largest one-block rise, {rise:+.3f} at block "
               f"{full['sharpness']['block']}, is {share:.0%} of that. l* = {l_star} of "
               f"{results['model']['num_layers']} blocks.")
  phase = results.get("phase_experiment")
  if phase and "selections" in phase:
    k = phase["max_k"]
    for selection, arms in phase["selections"].items():
      silent = float(arms["silent"][k - 1]["accuracy"])
      decisive = float(arms["decisive"][k - 1]["accuracy"])
      said = {True: "collapses", False: "does not collapse"}
      out.append(f"- Silent vs Decisive ({selection}, {k} blocks removed from each phase): "
                 f"Silent-Phase pruning {said[silent < threshold]} ({silent:.3f}), "
                 f"Decisive-Phase pruning {said[decisive < threshold]} ({decisive:.3f}); "
                 f"unpruned {unpruned:.3f}, collapse threshold {threshold:.3f}.")
  for name, result in results.get("methods", {}).items():
    if result.get("kind") != "iterative" or "curve" not in result:
      continue
    point = result.get("collapse_point")
    if point is None:
      out.append(f"- {name}: no cliff; accuracy stays above {threshold:.3f} down to "
                 f"{result['curve'][-1]['removed']} blocks removed.")
      continue
    before = {p["removed"]: p["accuracy"] for p in result["curve"]}
    out.append(f"- {name}: the cliff falls at {point} blocks removed (accuracy "
               f"{before.get(point - 1, float('nan')):.3f} with {point - 1} removed, "
               f"{before[point]:.3f} with {point}).")
  return out


def summary_markdown(results: dict[str, Any]) -> str:
  """What a person reads first."""
  full = results["full_model"]
  model, task = results["model"], results["task"]
  lines = [f"# dpjax study: {os.path.basename(os.path.normpath(model['path']))} on {task['spec']}",
           "",
           f"- {model['num_layers']} blocks ({model['architecture']}); {task['num_items']} "
           f"evaluation items ({task['num_calibration_items']} calibration), {task['k_shot']}-shot.",
           f"- Unpruned accuracy {full['accuracy'][-1]:.3f} (chance {full['chance']:.3f}).",
           ]
  l_star = full["transition_block"]
  if l_star is None:
    lines.append("- No decision transition: the mean Decision Margin is not above tau at the "
                 "final layer.")
  else:
    frac = l_star / model["num_layers"]
    lines.append(f"- Transition block l* = {l_star} ({frac:.0%} of depth): Silent Phase blocks "
                 f"1-{l_star - 1}, Decisive Phase blocks {l_star}-{model['num_layers']}. "
                 f"Sharpest rise of the mean DM: {full['sharpness']['rise']:+.3f} at block "
                 f"{full['sharpness']['block']}.")
  by_subject = full.get("by_subject", {})
  if len(by_subject) > 1:
    lines += ["", "| subject | items | final accuracy | transition block l* | fraction of depth |",
              "|---|---|---|---|---|"]
    for subject, sub in by_subject.items():
      l_sub = sub["transition_block"]
      frac = "-" if l_sub is None else f"{sub['transition_fraction']:.0%}"
      lines.append(f"| {subject} | {sub['num_items']} | {sub['accuracy']:.3f} | "
                   f"{'none' if l_sub is None else l_sub} | {frac} |")
  methods = results.get("methods", {})
  if methods:
    lines += ["", "| method | collapse point (blocks removed) | accuracy after 1 / 25% / 50% removed |",
              "|---|---|---|"]
    n = model["num_layers"]
    for name, result in methods.items():
      if "curve" not in result:
        lines.append(f"| {name} | skipped: {result.get('skipped')} | |")
        continue
      by_removed = {p["removed"]: p["accuracy"] for p in result["curve"]}
      picks = [1, max(1, round(n / 4)), max(1, round(n / 2))]
      accs = " / ".join(f"{by_removed[k]:.3f}" if k in by_removed else "-" for k in picks)
      lines.append(f"| {name} | {result.get('collapse_point')} | {accs} |")
  phase = results.get("phase_experiment")
  if phase:
    lines.append("")
    if "selections" not in phase:
      lines.append(f"- Phase-targeted experiment skipped: {phase['skipped']}.")
    else:
      lines.append(f"- Phase-targeted pruning (l* = {phase['transition_block']} on the "
                   "calibration items), accuracy after removing k blocks:")
      for selection, arms in phase["selections"].items():
        k = phase["max_k"]
        silent, decisive = arms["silent"][k - 1]["accuracy"], arms["decisive"][k - 1]["accuracy"]
        lines.append(f"  - {selection}: k={k}: Silent arm {silent:.3f}, Decisive arm "
                     f"{decisive:.3f}.")
  lines += findings(results)
  engine = results.get("engine")
  if engine:
    lines += ["", f"- Engine: {engine['compiled_programs']} compiled programs; "
              f"{engine['block_evaluations_executed']} block evaluations executed against "
              f"{engine['block_evaluations_minimum']} needed "
              f"({engine['block_evaluations_naive']} without prefix sharing)."]
  return "\n".join(lines) + "\n"


# Figures in the order the HTML summary shows them.
FIGURES = (MARGIN_FIGURE, SUBJECT_FIGURE, FREQUENCY_FIGURE, CURVES_FIGURE, PHASE_FIGURE,
           HEATMAP_FIGURE, REMOVED_FIGURE)


def _inline_markdown(text: str) -> str:
  """`code` and **bold** of one line of our own Markdown, HTML-escaped."""
  import html
  import re
  text = html.escape(text, quote=False)
  text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
  return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def markdown_to_html(markdown: str) -> str:
  """The Markdown `summary_markdown` writes (headings, nested bullets, tables,
  paragraphs) as HTML. Not a general Markdown converter."""
  out: list[str] = []
  lines = markdown.splitlines()
  i = 0
  while i < len(lines):
    line = lines[i]
    if line.startswith("#"):
      level = len(line) - len(line.lstrip("#"))
      out.append(f"<h{level}>{_inline_markdown(line[level:].strip())}</h{level}>")
    elif line.startswith("|"):
      rows = []
      while i < len(lines) and lines[i].startswith("|"):
        cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
        if not all(set(c) <= set("-: ") for c in cells):
          rows.append(cells)
        i += 1
      head, body = rows[0], rows[1:]
      out.append("<table><tr>" + "".join(f"<th>{_inline_markdown(c)}</th>" for c in head)
                 + "</tr>" + "".join("<tr>" + "".join(f"<td>{_inline_markdown(c)}</td>"
                                                      for c in r) + "</tr>" for r in body)
                 + "</table>")
      continue
    elif line.lstrip().startswith("- "):
      out.append("<ul>")
      depth = 0
      while i < len(lines) and lines[i].lstrip().startswith("- "):
        indent = (len(lines[i]) - len(lines[i].lstrip())) // 2
        while depth < indent:
          out.append("<ul>")
          depth += 1
        while depth > indent:
          out.append("</ul>")
          depth -= 1
        out.append(f"<li>{_inline_markdown(lines[i].lstrip()[2:])}</li>")
        i += 1
      out.extend(["</ul>"] * (depth + 1))
      continue
    elif line.strip():
      out.append(f"<p>{_inline_markdown(line)}</p>")
    i += 1
  return "\n".join(out)


def summary_html(markdown: str, directory: str, figures: Sequence[str]) -> str:
  """A self-contained page: the summary, then every figure inlined as a PNG data URI."""
  import base64
  parts = []
  for name in figures:
    with open(os.path.join(directory, name), "rb") as f:
      data = base64.b64encode(f.read()).decode("ascii")
    parts.append(f'<figure><img src="data:image/png;base64,{data}" alt="{name}">'
                 f"<figcaption>{name}</figcaption></figure>")
  style = ("body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;"
           "padding:0 1em;line-height:1.45}table{border-collapse:collapse;margin:1em 0}"
           "td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}"
           "figure{margin:1.5em 0}img{max-width:100%}figcaption{color:#666;font-size:.9em}"
           "code{background:#f3f3f3;padding:0 .2em}")
  return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>dpjax study</title>"
          f"<style>{style}</style></head><body>\n{markdown_to_html(markdown)}\n"
          + "\n".join(parts) + "\n</body></html>\n")
