"""The study's figures (matplotlib, Agg backend: no display needed), each written atomically.

Each function draws one PNG from the typed results (`dpjax.study.results`):
the decision margin and Option Frequency per layer, per subject, the pruning
curves, the Iterative Pruning heatmap, the phase experiment and where each
method's removed blocks fall, and the noise probe.
"""

from __future__ import annotations

import numpy as np

from dpjax.study import metrics
from dpjax.fileio import save_figure
from dpjax.study.results import FullProfile, MethodResult, NoiseProbe, PhaseExperiment
from dpjax.tasks import LETTERS

MARGIN_FIGURE = "decision_margin.png"
LENSES_FIGURE = "decision_margin_lenses.png"
SUBJECT_FIGURE = "decision_margin_by_subject.png"
FREQUENCY_FIGURE = "option_frequency.png"
CURVES_FIGURE = "pruning_curves.png"
PHASE_FIGURE = "phase_comparison.png"
DIFFERENCES_FIGURE = "phase_differences.png"
NOISE_FIGURE = "noise_by_phase.png"
HEATMAP_FIGURE = "iterative_heatmap.png"
REMOVED_FIGURE = "removed_blocks.png"
# Figures in the order the HTML summary shows them.
FIGURES = (MARGIN_FIGURE, LENSES_FIGURE, SUBJECT_FIGURE, FREQUENCY_FIGURE, CURVES_FIGURE,
           DIFFERENCES_FIGURE, PHASE_FIGURE, NOISE_FIGURE,
           HEATMAP_FIGURE, REMOVED_FIGURE)
LAYER_AXIS = "layer (0 = embeddings, l = after block l)"


def pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _integer_ticks():
  from matplotlib.ticker import MaxNLocator
  return MaxNLocator(integer=True)


def plot_decision_margin(path: str, full: FullProfile, headline: str, title: str) -> None:
  """Mean Decision Margin against layer, both normalizations, the transition marked."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  layers = np.array(full.layers)
  colours = {"vocab": "tab:blue", "options": "tab:orange"}
  # The headline normalization drawn last and thicker, the other dashed beneath it: where
  # the two coincide (a letter format's late layers) the headline line stays visible.
  for norm in sorted(metrics.NORMALIZATIONS, key=lambda n: n == headline):
    stats = full.decision_margin[norm]
    main = norm == headline
    ax.plot(layers, np.asarray(stats.mean, float), marker="o", ms=4 if main else 3,
            lw=2.2 if main else 1.2, ls="-" if main else "--", color=colours[norm],
            zorder=3 if main else 2,
            label=f"mean DM ({norm}){' (headline)' if main else ''}")
    if norm == headline:
      ax.fill_between(layers, np.asarray(stats.q10, float), np.asarray(stats.q90, float),
                      color=colours[norm], alpha=0.15, label=f"10-90% of items ({norm})")
  l_star = full.transition_block
  if l_star is not None:
    ax.axvspan(0.5, l_star - 0.5, color="grey", alpha=0.12, label="Silent Phase")
    ax.axvline(l_star, color="black", ls="--", lw=1, label=f"transition l* = {l_star}")
  ax.axhline(0, color="black", lw=0.5)
  ax.xaxis.set_major_locator(_integer_ticks())
  ax.set_xlabel(LAYER_AXIS)
  ax.set_ylabel("Decision Margin")
  ax.set_title(title)
  ax.legend(fontsize=8, loc="upper left")
  save_figure(fig, path)


def plot_lenses(path: str, tuned: FullProfile, logit: FullProfile, headline: str,
                title: str) -> None:
  """Mean Decision Margin and layer accuracy per layer under both lenses, each transition
  marked: does the Silent Phase survive a better-calibrated reading?"""
  plt = pyplot()
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
  layers = np.array(tuned.layers)
  for name, prof, colour in (("tuned lens", tuned, "tab:purple"), ("logit lens", logit,
                                                                   "tab:blue")):
    top.plot(layers, np.asarray(prof.decision_margin[headline].mean, float), marker="o", ms=3,
             color=colour, label=f"{name} (l* = {prof.transition_block})")
    bottom.plot(layers, np.asarray(prof.accuracy, float), marker="o", ms=3, color=colour,
                label=name)
    if prof.transition_block is not None:
      top.axvline(prof.transition_block, color=colour, ls="--", lw=1)
  top.axhline(0, color="black", lw=0.5)
  bottom.axhline(tuned.chance, color="black", ls=":", lw=1, label="chance")
  top.set_ylabel(f"mean Decision Margin ({headline})")
  bottom.set_ylabel("accuracy")
  bottom.set_xlabel(LAYER_AXIS)
  bottom.xaxis.set_major_locator(_integer_ticks())
  top.legend(fontsize=8, loc="upper left")
  bottom.legend(fontsize=8, loc="upper left")
  top.set_title(title + ": tuned lens and logit lens")
  save_figure(fig, path)


def plot_option_frequency(path: str, full: FullProfile, title: str,
                          labels: tuple[str, ...] | None = None) -> None:
  """Option Frequency as stacked bars per layer, with the correct-option share
  (`labels`: the options' names; default the letters)."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  layers = np.array(full.layers)
  freq = np.nan_to_num(np.asarray(full.option_frequency, dtype=float))
  bottom = np.zeros(len(layers))
  cmap = plt.get_cmap("tab10")
  for k in range(freq.shape[1]):
    ax.bar(layers, freq[:, k], bottom=bottom, color=cmap(k), width=0.8,
           label=labels[k] if labels else LETTERS[k])
    bottom += freq[:, k]
  ax.plot(layers, np.asarray(full.accuracy, dtype=float), color="black", marker="o", ms=3,
          label="correct option")
  ax.axhline(full.chance, color="black", ls=":", lw=1, label="chance")
  ax.set_xlabel(LAYER_AXIS)
  ax.set_ylabel("fraction of items whose top option is ...")
  ax.set_ylim(0, 1.02)
  ax.xaxis.set_major_locator(_integer_ticks())
  ax.set_title(title)
  ax.legend(fontsize=8, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  save_figure(fig, path)


def plot_subject_margins(path: str, full: FullProfile, headline: str, title: str) -> None:
  """Mean Decision Margin per subject (task family), each subject's transition marked."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  layers = np.array(full.layers)
  cmap = plt.get_cmap("tab10")
  for i, (subject, sub) in enumerate(full.by_subject.items()):
    colour = cmap(i % 10)
    l_star = sub.transition_block
    label = f"{subject} (l* = {l_star if l_star is not None else 'none'})"
    ax.plot(layers, np.asarray(sub.mean_decision_margin, float), marker="o", ms=3,
            color=colour, label=label)
    if l_star is not None:
      ax.axvline(l_star, color=colour, ls="--", lw=1)
  ax.axhline(0, color="black", lw=0.5)
  ax.xaxis.set_major_locator(_integer_ticks())
  ax.set_xlabel(LAYER_AXIS)
  ax.set_ylabel(f"mean Decision Margin ({headline})")
  ax.set_title(title)
  ax.legend(fontsize=8, loc="upper left")
  save_figure(fig, path)


def plot_pruning_curves(path: str, methods: dict[str, MethodResult], full: FullProfile,
                        title: str) -> None:
  """Accuracy against blocks removed for every method: where each falls off the cliff.

  The random baseline's band is the range over its seeds (min to max).
  """
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(8, 4.5))
  for name, result in methods.items():
    points = result.curve
    x = [p.removed for p in points]
    y = np.array([p.accuracy for p in points])
    style = "-" if result.kind != "one_shot" else "--"
    line, = ax.plot(x, y, style, marker="o", ms=3, label=name)
    if any(p.spread is not None for p in points):
      low = np.array([p.spread.min if p.spread else p.accuracy for p in points])
      high = np.array([p.spread.max if p.spread else p.accuracy for p in points])
      ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15)
    if result.collapse_point is not None:
      ax.plot([result.collapse_point], [y[x.index(result.collapse_point)]], marker="x", ms=9,
              color=line.get_color())
  ax.axhline(full.outcome_chance, color="black", ls=":", lw=1, label="chance")
  ax.axhline(full.collapse_threshold(), color="grey", ls="-.", lw=0.8, label="collapse threshold")
  ax.xaxis.set_major_locator(_integer_ticks())
  ax.set_xlabel("blocks removed")
  ax.set_ylabel(f"{full.outcome_name} (evaluation items)")
  ax.set_ylim(0, 1.02)
  ax.set_title(title + " (x: collapse point; band: range over seeds)")
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  save_figure(fig, path)


def plot_iterative_heatmap(path: str, result: MethodResult, name: str,
                           normalization: str) -> None:
  """Mean Decision Margin per layer (x) at each Iterative Pruning step (y)."""
  plt = pyplot()
  grid = np.array([np.asarray(p.layer_mean_dm, dtype=float) for p in result.curve])
  fig, ax = plt.subplots(figsize=(8, 0.3 * len(grid) + 2))
  masked = np.ma.masked_invalid(grid)
  limit = max(float(np.nanmax(np.abs(grid))), 1e-6)
  cmap = plt.get_cmap("RdBu_r").copy()
  cmap = cmap.with_extremes(bad="lightgrey")
  image = ax.imshow(masked, aspect="auto", cmap=cmap, vmin=-limit, vmax=limit,
                    interpolation="nearest")
  fig.colorbar(image, ax=ax, label=f"mean Decision Margin ({normalization})")
  ax.set_xlabel("layer (0 = embeddings; grey = removed block)")
  ax.set_ylabel("step (blocks removed)")
  ax.xaxis.set_major_locator(_integer_ticks())
  ax.yaxis.set_major_locator(_integer_ticks())
  ax.set_title(f"{name}: the decision profile as blocks go")
  save_figure(fig, path)


def plot_phase_comparison(path: str, phase: PhaseExperiment, full: FullProfile,
                          title: str) -> None:
  """Silent-arm against Decisive-arm pruning, per selection rule."""
  plt = pyplot()
  selections = list(phase.arms)
  # Two panels per row at most, readable fonts, whole-number ticks that never crowd.
  cols = min(len(selections), 3)
  rows = 2 * ((len(selections) + cols - 1) // cols)
  fig, grid = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
  axes = np.empty((2, len(selections)), dtype=object)
  for i in range(len(selections)):
    axes[0, i] = grid[2 * (i // cols), i % cols]
    axes[1, i] = grid[2 * (i // cols) + 1, i % cols]
  for i in range(len(selections), (rows // 2) * cols):
    grid[2 * (i // cols), i % cols].set_visible(False)
    grid[2 * (i // cols) + 1, i % cols].set_visible(False)
  colours = {"silent": "tab:red", "decisive": "tab:green"}
  for col, selection in enumerate(selections):
    for arm, points in phase.arms[selection].items():
      k = [p.k for p in points]
      acc = np.array([p.accuracy for p in points])
      axes[0, col].plot(k, acc, marker="o", ms=3, color=colours[arm], label=f"{arm} arm")
      if selection == "random":
        std = np.array([p.accuracy_std for p in points])
        axes[0, col].fill_between(k, acc - std, acc + std, color=colours[arm], alpha=0.15)
      axes[1, col].plot(k, [p.mean_final_dm["vocab"] for p in points], marker="o", ms=3,
                        color=colours[arm], label=f"{arm} arm")
    axes[0, col].axhline(full.outcome_chance, color="black", ls=":", lw=1)
    axes[0, col].set_ylim(0, 1.02)
    axes[0, col].set_title(f"selection: {selection}", fontsize=11)
    axes[1, col].set_xlabel("blocks removed inside the phase (k)", fontsize=10)
    ks = sorted({p.k for points in phase.arms[selection].values() for p in points})
    for row in range(2):
      axes[row, col].set_xticks(ks)  # only the k that ran: a single k is one tick
      axes[row, col].set_xlim(min(ks) - 0.5, max(ks) + 0.5)
      axes[row, col].tick_params(labelsize=10)
    axes[0, col].set_ylabel("accuracy", fontsize=10)
    axes[1, col].set_ylabel("mean final DM (vocab)", fontsize=10)
  axes[0, 0].legend(fontsize=9)
  fig.suptitle(f"{title}: Silent vs Decisive pruning (l* = {phase.transition_block})",
               fontsize=12)
  fig.tight_layout()
  save_figure(fig, path)


def plot_forest(path: str, rows: list[tuple[str, object]], title: str,
                alpha: float = 0.05) -> None:
  """A forest plot of Silent-minus-Decisive accuracy differences: one row per
  (label, `statistics.Comparison`), its paired 95% interval, a filled marker where the
  Holm-adjusted p is below `alpha` (left of 0: the Silent arm costs more, the
  paper's direction)."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7.5, max(2.5, 0.24 * len(rows) + 1.2)))
  y = np.arange(len(rows))[::-1]
  for yi, (label, c) in zip(y, rows):
    significant = c.holm_p is not None and c.holm_p < alpha
    colour = "tab:red" if c.difference < 0 else "tab:green"
    ax.plot(c.ci95, [yi, yi], color=colour, lw=1.5)
    ax.plot([c.difference], [yi], marker="o", ms=6, color=colour,
            mfc=colour if significant else "white")
  ax.axvline(0, color="black", lw=0.8)
  ax.set_yticks(y)
  ax.set_yticklabels([label for label, _ in rows], fontsize=7)
  ax.set_xlabel("accuracy, Silent arm minus Decisive arm (paired 95% interval)")
  ax.set_title(f"{title}\nfilled: Holm-adjusted p < {alpha} (McNemar, or sign-flip over seeds); "
               "left of 0: pruning the Silent Phase costs more", fontsize=9)
  save_figure(fig, path)


def plot_phase_differences(path: str, phase: PhaseExperiment, title: str) -> None:
  """The study's paired comparisons as a forest plot, one row per rule and k."""
  rows = [(f"{c.rule}, k={c.k}" if c.k_silent is None else
           f"{c.rule}, {c.k_silent} silent / {c.k_decisive} decisive", c)
          for c in phase.comparisons]
  plot_forest(path, rows, f"{title}: Silent vs Decisive (l* = {phase.transition_block})")


def plot_noise_by_phase(path: str, probe: NoiseProbe, full: FullProfile, title: str) -> None:
  """The noise probe: accuracy against the noise level `eps^2` with noise after every
  block of the Silent or of the Decisive Phase (the band: the range over seeds), the
  unpruned model and chance as horizontal lines; beside it, when there is a profile, the
  accuracy with noise after one block at a time (block x level, the phase boundary
  marked)."""
  plt = pyplot()
  has_profile = bool(probe.profile_points)
  fig, axes = plt.subplots(1, 2 if has_profile else 1, figsize=(12 if has_profile else 6.5, 5),
                           squeeze=False, gridspec_kw={"width_ratios": [1.2, 1]
                                                       if has_profile else [1]})
  ax = axes[0, 0]
  levels = np.array(probe.levels, float)
  order = np.argsort(levels)
  colours = {"silent": "tab:red", "decisive": "tab:green"}
  names = {"silent": f"Silent Phase (blocks 1-{probe.transition_block - 1})",
           "decisive": f"Decisive Phase (blocks {probe.transition_block}-{probe.num_layers})"}
  for arm, arm_levels in probe.arms.items():
    acc = np.array([a.accuracy for a in arm_levels])[order]
    low = np.array([min(a.seed_accuracies) for a in arm_levels])[order]
    high = np.array([max(a.seed_accuracies) for a in arm_levels])[order]
    ax.plot(levels[order], acc, marker="o", ms=5, lw=2, color=colours[arm],
            label=f"noise after every block of the {names[arm]}")
    ax.fill_between(levels[order], low, high, color=colours[arm], alpha=0.2)
  ax.axhline(full.outcome_accuracy, color="black", lw=1.2,
             label=f"no noise ({full.outcome_accuracy:.3f})")
  ax.axhline(full.outcome_chance, color="black", ls=":", lw=1, label="chance")
  ax.set_xscale("log")
  ax.set_xticks(levels[order])
  ax.set_xticklabels([f"{v:g}" for v in levels[order]])
  ax.minorticks_off()
  ax.set_ylim(0, 1.02)
  ax.set_xlabel("noise level eps² (variance relative to the residual's)", fontsize=11)
  ax.set_ylabel(f"{full.outcome_name} (evaluation items)", fontsize=11)
  ax.tick_params(labelsize=10)
  ax.set_title(f"phase arms: mean over {len(probe.seeds)} seeds (band: their range)",
               fontsize=11)
  ax.legend(fontsize=9, loc="lower left")
  if has_profile:
    ax = axes[0, 1]
    grid = probe.profile_grid()[:, order]
    # The colours span the profile's own range (up to the unpruned accuracy), so a few
    # points of accuracy show; every cell is written out where there is room.
    low = float(np.nanmin(grid))
    high = max(float(np.nanmax(grid)), full.outcome_accuracy, low + 1e-3)
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", vmin=low,
                      vmax=high, interpolation="nearest",
                      extent=(-0.5, len(levels) - 0.5, probe.num_layers + 0.5, 0.5))
    colourbar = fig.colorbar(image, ax=ax)
    colourbar.set_label("accuracy", fontsize=11)
    if probe.num_layers <= 40 and len(levels) <= 8:
      for row in range(probe.num_layers):
        for col in range(len(levels)):
          if np.isfinite(grid[row, col]):
            dark = grid[row, col] < low + 0.5 * (high - low)
            ax.text(col, row + 1, f"{grid[row, col]:.3f}", ha="center", va="center",
                    fontsize=8 if probe.num_layers <= 24 else 6,
                    color="white" if dark else "black")
    ax.axhline(probe.transition_block - 0.5, color="red", ls="--", lw=1.5,
               label=f"l* = {probe.transition_block}: Decisive Phase below")
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
    ax.set_xticks(range(len(levels)))
    ax.set_xticklabels([f"{v:g}" for v in levels[order]])
    ax.yaxis.set_major_locator(_integer_ticks())
    ax.tick_params(labelsize=10)
    ax.set_xlabel("noise level eps²", fontsize=11)
    ax.set_ylabel("noised block (noise after it alone)", fontsize=11)
    ax.set_title("profile: noise after one block at a time", fontsize=11)
  fig.suptitle(f"{title}: noise in the residual stream by phase (l* = {probe.transition_block})",
               fontsize=12)
  save_figure(fig, path)


def plot_removed_blocks(path: str, methods: dict[str, MethodResult], l_star: int | None,
                        num_layers: int, title: str) -> None:
  """Which blocks each method removes first, against the transition."""
  plt = pyplot()
  names = list(methods)
  fig, ax = plt.subplots(figsize=(8, 0.45 * len(names) + 2))
  for row, name in enumerate(names):
    order = methods[name].removal_order()
    for rank, block in enumerate(order):
      colour = ("tab:grey" if l_star is None else "tab:red" if block < l_star else "tab:green")
      ax.scatter(block, row, s=90 * (1 - rank / max(len(order), 1)) + 10, color=colour,
                 alpha=0.8)
  if l_star is not None:
    ax.axvline(l_star - 0.5, color="black", ls="--", lw=1, label=f"transition l* = {l_star}")
    # Below the axes, under the x label: it covers no method's points and no title.
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.13), frameon=False)
  ax.set_yticks(range(len(names)), names)
  ax.set_xlim(0.5, num_layers + 0.5)
  ax.xaxis.set_major_locator(_integer_ticks())
  ax.set_xlabel("block (red: Silent Phase, green: Decisive, grey: no transition; "
                "larger dot = removed earlier)")
  ax.set_title(f"{title}: where the removed blocks fall")
  save_figure(fig, path)
