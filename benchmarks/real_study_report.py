"""The report across the real-model runs: tables, two figures, the relations the paper implies.

`write_report(out_dir, runs)` reads `out_dir/runs/<name>/results.json` of every
finished run and writes `out_dir/REPORT.md` (per model and task: accuracy
against chance with its 95% interval, l* as a fraction of depth, sharpness,
both arms of the phase experiment with intervals, each method's collapse
point; l* against Iterative Pruning's collapse; the phase-aware method against
Iterative Pruning and block influence at equal blocks removed) and
`dm_by_relative_depth.png`, `silent_vs_decisive.png`,
`transition_vs_collapse.png`. The verdict in words is written by hand at the
end of REPORT.md (`VERDICT.md` beside it, kept across rewrites).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from dpjax import metrics
from dpjax.fileio import atomic_write_text, save_figure


# Accuracy the models' authors publish for the same model and task, as (fraction, where).
# The cards do not give their prompts or normalization, and the files studied here are
# 4-bit quantizations, so only rough agreement is expected. SmolLM2-135M-Instruct's card
# gives ARC only as the mean of Easy and Challenge; Qwen2.5-Coder's gives none of these.
PUBLISHED = {
    ("gemma3", "arc_easy"): (0.577, "Gemma 3 270M (pretrained) model card, ARC-e 0-shot"),
    ("gemma3", "piqa"): (0.677, "Gemma 3 270M (pretrained) model card, PIQA 0-shot"),
}


def _published(run) -> str:
  figure = PUBLISHED.get((run.model, run.task))
  return "none found" if figure is None else f"{figure[0]:.3f} ({figure[1]})"


def _load(out_dir, runs):
  found = []
  for run in runs:
    path = os.path.join(out_dir, "runs", run.name, "results.json")
    if os.path.isfile(path):
      with open(path) as f:
        found.append((run, json.load(f)))
  return found


def _fmt(x, digits=3):
  return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _label(run, results):
  lens = results.get("lens", {}).get("kind", "logit")
  shots = results["task"].get("k_shot", 0)
  norm = results["settings"].get("normalization", "vocab")
  return (f"{run.model} / {run.task} / {run.format}" + (f" {shots}-shot" if shots else "")
          + (f" / {norm} DM" if run.format == "cloze" else "")
          + (" / tuned lens" if lens == "tuned" else "")
          + (" / accuracy rule" if results["settings"].get("transition_rule") == "accuracy"
             else ""))


def _phase_rows(results):
  phase = results.get("phase_experiment") or {}
  if "selections" not in phase:
    return [], phase.get("skipped")
  rows = []
  max_k = phase["max_k"]
  for rule, arms in phase["selections"].items():
    silent = {p["k"]: p for p in arms["silent"]}
    decisive = {p["k"]: p for p in arms["decisive"]}
    for k in sorted({1, 2, 4, max_k}):
      if k in silent and k in decisive:
        rows.append((rule, k, silent[k], decisive[k]))
  return rows, None


def _shape(full, normalization):
  mean = np.array([np.nan if v is None else v for v in
                   full["decision_margin"][normalization]["mean"]], float)
  shape = metrics.transition_shape(mean, full["sharpness"]["rise"])
  return shape


def _correlation(x, y):
  x, y = np.asarray(x, float), np.asarray(y, float)
  if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
    return None
  pearson = float(np.corrcoef(x, y)[0, 1])
  def rank(v):  # average ranks: tied values share the mean of their positions
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v), dtype=float)
    for value in np.unique(v):
      ranks[v == value] = ranks[v == value].mean()
    return ranks
  spearman = float(np.corrcoef(rank(x), rank(y))[0, 1])
  return pearson, spearman


def transition_collapse_rows(found) -> list[dict]:
  """Per run with Iterative Pruning: l* by both rules and the collapse point, as
  fractions of depth (None where there is none), and the blocks left at the collapse."""
  rows = []
  for run, r in found:
    it = r["methods"].get("iterative_accuracy", {})
    if "curve" not in it:
      continue
    L = r["model"]["num_layers"]
    full = r["full_model"]
    margin, accuracy = full["transition_block"], full.get("accuracy_transition_block")
    collapse = it.get("collapse_point")
    rows.append({"label": _label(run, r), "num_layers": L, "margin_block": margin,
                 "margin": None if margin is None else margin / L,
                 "accuracy": None if accuracy is None else accuracy / L,
                 "collapse": None if collapse is None else collapse / L,
                 "blocks_left": "-" if collapse is None else L - collapse})
  return rows


def write_report(out_dir: str, runs) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  found = _load(out_dir, runs)
  lines = ["# dpjax on real pretrained models: does the Silent/Decisive asymmetry hold?", ""]
  if not found:
    lines.append("No run has finished yet.")
    atomic_write_text(os.path.join(out_dir, "REPORT.md"), "\n".join(lines) + "\n")
    return "\n".join(lines)
  lines += ["Every number below comes from the runs in `runs/` (one dpjax study each; "
            "`python -m benchmarks.real_study` reproduces them). Accuracy intervals are 95% "
            "bootstrap intervals over evaluation items.", ""]

  # 0. What ran, and for how long.
  lines += ["## The runs", "",
            "Wall time is the finishing process's: a run resumed from saved state (an "
            "Iterative Pruning search, say) does not count its earlier processes' time.", "",
            "| run | normalization | methods | wall time on two cores |", "|---|---|---|---|"]
  for run, r in found:
    t = r.get("timings", {})
    seconds = t.get("prepare_seconds", 0) + t.get("full_profile_seconds", 0) + t.get(
        "methods_seconds", 0)
    ran = [name for name, m in r["methods"].items() if "skipped" not in m]
    if r.get("phase_experiment") and "skipped" not in r["phase_experiment"]:
      ran.append("phase experiment")
    lines.append(f"| {run.name} | {r['settings']['normalization']} | {', '.join(ran) or '-'} | "
                 f"{seconds / 60:.0f} min |")
  for run, r in found:
    path = os.path.join(out_dir, "runs", run.name, "hf_check.json")
    if not os.path.isfile(path):
      continue
    with open(path) as f:
      check = json.load(f)
    lines += ["", f"Checked against HF PyTorch before this report ({run.name}; "
              f"{check['reference']}):", "",
              "| variant | items | dpjax accuracy | HF accuracy | dpjax mean DM (vocab) | "
              "HF mean DM (vocab) |", "|---|---|---|---|---|---|"]
    for row in check["rows"]:
      lines.append(f"| {row['variant']} | {row['items']} ({row['n']}) | {row['dpjax']:.4f} | "
                   f"{row['hf']:.4f} | {row['dpjax_dm']:.4e} | {row['hf_dm']:.4e} |")
  lines.append("")

  # 1. Per model and task.
  lines += ["## Per model and task", "",
            "| run | items | accuracy [95% CI] | chance | published | l* / L | "
            "sharpest rise (share) | collapse points (iterative / phase-aware / block "
            "influence / reverse / random) |",
            "|---|---|---|---|---|---|---|---|"]
  for run, r in found:
    full, L = r["full_model"], r["model"]["num_layers"]
    ci = full.get("final_accuracy_ci95") or [None, None]
    l_star = full["transition_block"]
    norm = r["settings"]["normalization"]
    shape = _shape(full, norm)
    methods = r["methods"]
    cp = lambda name: (methods.get(name, {}).get("collapse_point", "-")
                       if "skipped" not in methods.get(name, {}) else "skipped")
    lines.append(
        f"| {_label(run, r)} | {r['task']['num_items']} | {_fmt(full['accuracy'][-1])} "
        f"[{_fmt(ci[0])}, {_fmt(ci[1])}] | {_fmt(full['chance'])} | {_published(run)} | "
        f"{'none' if l_star is None else f'{l_star}/{L} = {l_star / L:.2f}'} | "
        f"{full['sharpness']['rise']:+.4f} at {full['sharpness']['block']} "
        f"({_fmt(shape.share, 2)}: {'sharp' if shape.sharp else 'gradual'}) | "
        f"{cp('iterative_accuracy')} / {cp('phase_aware')} / {cp('block_influence')} / "
        f"{cp('reverse')} / {cp('random')} of {L} |")

  # 1b. Open answers: the transition on the items the model answers.
  opens = [(run, r) for run, r in found if run.format == "open"]
  if opens:
    lines += ["", "## Open-ended answers (NQ-open)", "",
              "Accuracy here is the gold first token's (top token at the answer position); "
              "chance is the best constant guess (the one token that begins a gold answer for "
              "the most items: a bare space, which begins every number). Most items are never "
              "answered, so the mean DM over all items stays negative and the margin rule finds "
              "no l*; the transition is read instead on the items the unpruned model answers, "
              "leaving out those the constant guess answers too. Each item's decision layer is "
              "the first layer from which its top token stays a gold first token.", "",
              "| run | items | first-token accuracy [CI] | chance | exact match | answered "
              "(constant left out) | l* / L on them | median decision layer / L | decision "
              "layers |", "|---|---|---|---|---|---|---|---|---|"]
    for run, r in opens:
      full, L = r["full_model"], r["model"]["num_layers"]
      ci = full.get("final_accuracy_ci95") or [None, None]
      a = full.get("answered") or {}
      l_star, median = a.get("transition_block"), a.get("median_decision_layer")
      lines.append(
          f"| {_label(run, r)} | {r['task']['num_items']} | {_fmt(full['accuracy'][-1])} "
          f"[{_fmt(ci[0])}, {_fmt(ci[1])}] | {_fmt(full['chance'])} | "
          f"{_fmt(full.get('exact_match'))} | {a.get('items', '-')} "
          f"({a.get('left_out_constant', '-')}) | "
          f"{'none' if l_star is None else f'{l_star}/{L} = {l_star / L:.2f}'} | "
          f"{'-' if median is None else f'{median:g}/{L} = {median / L:.2f}'} | "
          f"{', '.join(str(x) for x in sorted(a.get('decision_layers', []))) or '-'} |")

  # 2. The phase experiment.
  lines += ["", "## Silent arm against Decisive arm", "",
            "Accuracy after removing k blocks inside each phase (l* from the calibration items), "
            "with 95% bootstrap intervals over evaluation items.", "",
            "| run | rule | k | Silent arm [CI] | Decisive arm [CI] | unpruned |",
            "|---|---|---|---|---|---|"]
  points = []
  for run, r in found:
    rows, skipped = _phase_rows(r)
    if skipped:
      lines.append(f"| {_label(run, r)} | skipped: {skipped} | | | | |")
    for rule, k, s, d in rows:
      sc, dc = s.get("accuracy_ci95") or [None, None], d.get("accuracy_ci95") or [None, None]
      lines.append(f"| {_label(run, r)} | {rule} | {k} | {_fmt(s['accuracy'])} "
                   f"[{_fmt(sc[0])}, {_fmt(sc[1])}] | {_fmt(d['accuracy'])} "
                   f"[{_fmt(dc[0])}, {_fmt(dc[1])}] | {_fmt(r['full_model']['accuracy'][-1])} |")
      if k == max(kk for rr, kk, _, _ in rows if rr == rule):
        points.append((_label(run, r), rule, k, s, d))

  # 3. l* against the collapse of Iterative Pruning.
  rows = transition_collapse_rows(found)
  lines += ["", "## Does l* of the unpruned model predict where Iterative Pruning collapses?", "",
            "l* is the unpruned model's transition on the evaluation items, by the margin rule "
            "(mean DM above 0 from l* on) and by the accuracy rule (layer accuracy above "
            "chance + 0.1 from l* on); the collapse is Iterative Pruning's (accuracy "
            "criterion, chosen on the calibration items, measured on the evaluation items): "
            "the fewest blocks removed that leave accuracy below halfway between chance and "
            "the unpruned model's. Only runs with Iterative Pruning appear.", "",
            "| run | l* / L (margin) | l* / L (accuracy) | collapse / L | blocks left at "
            "collapse | Decisive Phase size (margin) |", "|---|---|---|---|---|---|"]
  share = lambda x: "none" if x is None else f"{x:.2f}"
  for row in rows:
    size = "-" if row["margin"] is None else str(row["num_layers"] - row["margin_block"] + 1)
    lines.append(f"| {row['label']} | {share(row['margin'])} | {share(row['accuracy'])} | "
                 f"{share(row['collapse'])} | {row['blocks_left']} | {size} |")
  lines.append("")
  for rule in ("margin", "accuracy"):
    pairs = [(row[rule], row["collapse"]) for row in rows
             if row[rule] is not None and row["collapse"] is not None]
    corr = _correlation([p[0] for p in pairs], [p[1] for p in pairs])
    lines.append(f"By the {rule} rule, across {len(pairs)} runs: " + (
        f"Pearson r = {corr[0]:+.2f}, Spearman rho = {corr[1]:+.2f} between l*/L and "
        "collapse/L." if corr else "too few runs (or no spread in l*) for a correlation."))

  # 4. Phase-aware against Iterative Pruning and block influence.
  lines += ["", "## The phase-aware method against Iterative Pruning and block influence", "",
            "Accuracy at equal blocks removed (n = 1, 2, 4, 8, and L/4, L/2).", "",
            "| run | n | iterative | phase-aware | block influence |", "|---|---|---|---|---|"]
  wins = {"iterative": 0, "phase_aware": 0, "block_influence": 0}
  # A run's curves, completed by its siblings (same model, task, format and lens: the
  # pruning curves of one and the phase-aware curve of another).
  family = lambda run, r: (run.model, run.task, run.format, r.get("lens", {}).get("kind"),
                           r["task"].get("k_shot", 0))
  for run, r in found:
    if "skipped" in r["methods"].get("phase_aware", {"skipped": ""}):
      continue
    L = r["model"]["num_layers"]
    curves = {}
    for name, key in (("iterative", "iterative_accuracy"), ("phase_aware", "phase_aware"),
                      ("block_influence", "block_influence")):
      for other_run, other in [(run, r)] + found:
        method = other["methods"].get(key, {})
        if family(other_run, other) == family(run, r) and "curve" in method:
          curves[name] = {p["removed"]: p["accuracy"] for p in method["curve"]}
          break
      else:
        curves[name] = {}
    for n in sorted({1, 2, 4, 8, L // 4, L // 2}):
      accs = {name: c.get(n) for name, c in curves.items()}
      if any(a is None for a in accs.values()):
        continue
      best = max(accs.values())
      for name, a in accs.items():
        wins[name] += int(a == best)
      lines.append(f"| {_label(run, r)} | {n} | {_fmt(accs['iterative'])} | "
                   f"{_fmt(accs['phase_aware'])} | {_fmt(accs['block_influence'])} |")
  lines += ["", "Rows where each method keeps the most accuracy (ties count for each): "
            + ", ".join(f"{k} {v}" for k, v in wins.items()) + "."]

  # Figures.
  fig, ax = plt.subplots(figsize=(8, 4.5))
  ax.set_prop_cycle(color=plt.get_cmap("tab20").colors)  # more runs than tab10's colours
  plotted = set()
  for run, r in found:
    full, L = r["full_model"], r["model"]["num_layers"]
    if family(run, r) in plotted:  # the same items and lens: the same curve
      continue
    plotted.add(family(run, r))
    # The open format's DM is the vocab one (gold first tokens against every other token).
    # Open answers: on the items the model answers (the table above), where it is read.
    answered = (full.get("answered") or {}).get("mean_margin")
    if run.format == "open" and answered:
      mean, extra = answered, f" / vocab DM, {full['answered']['items']} answered items"
    else:
      norm = "vocab" if run.format == "open" else "options"
      mean = [np.nan if v is None else v for v in full["decision_margin"][norm]["mean"]]
      extra = " / vocab DM" if run.format == "open" else ""
    label = _label(run, r).replace(" / vocab DM", " / options DM")  # what is plotted
    ax.plot(np.arange(L + 1) / L, mean, marker="o", ms=2, label=label + extra,
            ls="--" if run.format == "open" else "-")
  ax.axhline(0, color="black", lw=0.5)
  ax.set_xlabel("relative depth (layer / L)")
  ax.set_ylabel("mean Decision Margin (options normalization;\nopen: vocab, answered items)")
  ax.set_title("Decision Margin by relative depth, every model and task")
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  save_figure(fig, os.path.join(out_dir, "dm_by_relative_depth.png"))

  fig, ax = plt.subplots(figsize=(6, 6))
  markers = {"adjacent": "o", "redundant": "s", "random": "^"}
  # One colour per run, one marker per selection rule.
  runs_plotted = list(dict.fromkeys(label for label, *_ in points))
  palette = plt.get_cmap("tab10" if len(runs_plotted) <= 10 else "tab20")
  colour = {label: palette(i % palette.N) for i, label in enumerate(runs_plotted)}
  for label, rule, k, s, d in points:
    sc, dc = s.get("accuracy_ci95"), d.get("accuracy_ci95")
    xerr = None if sc is None else [[s["accuracy"] - sc[0]], [sc[1] - s["accuracy"]]]
    yerr = None if dc is None else [[d["accuracy"] - dc[0]], [dc[1] - d["accuracy"]]]
    ax.errorbar(s["accuracy"], d["accuracy"], xerr=xerr, yerr=yerr, fmt=markers[rule], ms=5,
                capsize=2, color=colour[label], label=f"{label} ({rule}, k={k})")
  ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_xlabel("Silent arm accuracy (k Silent-Phase blocks removed)")
  ax.set_ylabel("Decisive arm accuracy (k Decisive-Phase blocks removed)")
  ax.set_title("Above the diagonal: Silent-Phase pruning hurts more (the paper's claim)")
  ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  save_figure(fig, os.path.join(out_dir, "silent_vs_decisive.png"))

  plotted_rows = [row for row in rows if row["collapse"] is not None]
  if plotted_rows:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for rule, marker in (("margin", "o"), ("accuracy", "x")):
      points = [row for row in plotted_rows if row[rule] is not None]
      ax.scatter([row[rule] for row in points], [row["collapse"] for row in points],
                 marker=marker, label=f"l* by the {rule} rule")
    for row in plotted_rows:  # one label per run, at its accuracy-rule point
      x = row["accuracy"] if row["accuracy"] is not None else row["margin"]
      if x is not None:
        ax.annotate(row["label"].split(" / cloze")[0], (x, row["collapse"]), fontsize=6,
                    xytext=(-4, -10), textcoords="offset points", ha="right")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, 1.0)
    ax.set_xlabel("l* / L (unpruned model, evaluation items)")
    ax.set_ylabel("Iterative Pruning collapse / L")
    ax.set_title("Does the transition predict the collapse?")
    ax.legend(fontsize=7)
    save_figure(fig, os.path.join(out_dir, "transition_vs_collapse.png"))

  lens_dir = os.path.join(out_dir, "lenses")
  for name in sorted(os.listdir(lens_dir)) if os.path.isdir(lens_dir) else []:
    with open(os.path.join(lens_dir, name)) as f:
      lens = json.load(f)
    key = name.removesuffix(".json")
    kl = lens["heldout_kl"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for which in ("logit", "tuned"):
      ax.plot(np.arange(len(kl[which])), kl[which], marker="o", ms=3, label=f"{which} lens")
    ax.set_yscale("log")
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("held-out KL to the final distribution (nats)")
    ax.set_title(f"{lens['model']}: logit lens against tuned lens")
    ax.legend()
    save_figure(fig, os.path.join(out_dir, f"lens_kl_{key}.png"))
    lines += ["", f"## The tuned lens `{key}`", "",
              f"Trained on `{lens['corpus']}` for {lens['steps_run']} steps "
              f"({lens['train_seconds']:.0f} s). Held-out KL to the model's final next-token "
              "distribution, per layer:", "",
              "| layer | " + " | ".join(str(i) for i in range(len(kl["logit"]))) + " |",
              "|---" * (len(kl["logit"]) + 1) + "|",
              "| logit | " + " | ".join(f"{v:.2f}" for v in kl["logit"]) + " |",
              "| tuned | " + " | ".join(f"{v:.2f}" for v in kl["tuned"]) + " |", "",
              f"![held-out KL per layer](lens_kl_{key}.png)"]

  lines += ["", "![mean DM by relative depth](dm_by_relative_depth.png)", "",
            "![Silent arm against Decisive arm](silent_vs_decisive.png)", ""]
  verdict = os.path.join(out_dir, "VERDICT.md")
  if os.path.isfile(verdict):
    with open(verdict) as f:
      lines += ["", f.read().strip()]
  text = "\n".join(lines) + "\n"
  atomic_write_text(os.path.join(out_dir, "REPORT.md"), text)
  return text
