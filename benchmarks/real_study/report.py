"""The report across the real-model runs, and the verdict, both computed from the runs' files.

`write_report(out_dir, runs)` reads `out_dir/runs/<name>/results.json` and
`variants.jsonl` of every finished run and writes `out_dir/REPORT.md` (per model and
task: accuracy against chance with its 95% interval, l* with its interval, each
method's collapse point; Silent against Decisive paired at every rule and k, Holm over
every comparison of the study; l* against Iterative Pruning's collapse; the
phase-aware method against Iterative Pruning and block influence) and
`out_dir/VERDICT.md`, whose every statement is a number computed here: each run and
the study as a whole classed (holds / reversed / cannot tell) by
`dpjax.study.statistics.verdict` from the Holm-corrected paired results. Figures: a forest
plot of the differences (`silent_minus_decisive.png`), the Decision Margin by depth
one panel per model (`dm_by_relative_depth.png`), the arms' accuracies
(`silent_vs_decisive.png`) and l* against the collapse (`transition_vs_collapse.png`).
Nothing in either file is written by hand.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from dpjax.report import claim
from dpjax.report.summary import class_definitions, comparison_table
from dpjax.study import metrics
from dpjax.study import statistics
from dpjax.fileio import atomic_write_text, save_figure

# What the three GGUF files hold (tests.support.real_models): 4-bit quantizations, which dpjax
# and the HF reference both dequantize to float32.
PRECISION = {"smollm2": "SmolLM2-135M-Instruct, Q4_1", "gemma3": "Gemma 3 270M, Q4_K_M",
             "qwen25": "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M"}
ALPHA = statistics.ALPHA
MARGIN = statistics.MARGIN  # the study's default --margin


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
  """(run, results) of every run of `runs` whose results.json and variants.jsonl are there
  (a run without per-item outcomes cannot be compared paired, and is left out)."""
  found = []
  for run in runs:
    path = os.path.join(out_dir, "runs", run.name, "results.json")
    if os.path.isfile(path) and os.path.isfile(os.path.join(os.path.dirname(path),
                                                            "variants.jsonl")):
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


# The per-model table's collapse points, in its column order.
COLLAPSE_COLUMNS = ("iterative_accuracy", "iterative_screened_accuracy", "phase_aware",
                    "block_influence", "angular", "single_layer", "reverse", "random")


def transition_collapse_rows(found) -> list[dict]:
  """Per run with Iterative Pruning: l* by both rules and the collapse point, as
  fractions of depth (None where there is none), and the blocks left at the collapse.
  The exact search's collapse where it ran, else the screened search's (`search` says
  which: the screened one removes other blocks, REPORT.md's comparison of the two)."""
  rows = []
  for run, r in found:
    search, it = "exact", r["methods"].get("iterative_accuracy", {})
    if "curve" not in it:
      search, it = "screened", r["methods"].get("iterative_screened_accuracy", {})
    if "curve" not in it:
      continue
    L = r["model"]["num_layers"]
    full = r["full_model"]
    margin, accuracy = full["transition_block"], full.get("accuracy_transition_block")
    collapse = it.get("collapse_point")
    rows.append({"label": _label(run, r), "search": search, "num_layers": L,
                 "margin_block": margin,
                 "margin": None if margin is None else margin / L,
                 "accuracy": None if accuracy is None else accuracy / L,
                 "collapse": None if collapse is None else collapse / L,
                 "blocks_left": "-" if collapse is None else L - collapse})
  return rows



def _study_family(out_dir, found, record: str, compute) -> dict[str, list]:
  """`compute(variants, results)` for every run whose `record` ran, recomputed from its
  variants.jsonl, with Holm over the distinct comparisons of all runs together (the same
  kept sets in two runs are two comparisons; each results.json's own `holm_p` is over
  its run alone)."""
  per_run = {}
  for run, r in found:
    done = r.get(record) or {}
    if not done or done.get("skipped"):
      continue
    comparisons = compute(claim.read_variants(os.path.join(out_dir, "runs", run.name)), r)
    for c in comparisons:
      c.variants = None if c.variants is None else (run.name, c.variants)
    per_run[run.name] = comparisons
  statistics.with_holm([c for cs in per_run.values() for c in cs], ALPHA, MARGIN)
  return per_run


def study_comparisons(out_dir, found) -> dict[str, list[statistics.Comparison]]:
  """Every run's phase-experiment comparisons (`dpjax.report.claim`), Holm over the study."""
  return _study_family(out_dir, found, "phase_experiment",
                       lambda variants, r: claim.phase_comparisons(variants, r, MARGIN))


def noise_comparisons(out_dir, found) -> dict[str, list[statistics.Comparison]]:
  """Every run's noise-probe comparisons, Holm over the study's."""
  return _study_family(out_dir, found, "noise_probe",
                       lambda variants, r: claim.noise_comparisons(variants, r, MARGIN))


def why_no_phase(r: dict) -> str | None:
  """Why a run has no phase experiment (below the bar, no transition), or None."""
  phase = r.get("phase_experiment") or {}
  return phase.get("skipped") if phase else "the phase experiment has not run"


def classify(out_dir, found) -> tuple[dict[str, tuple[str, str]], dict[str, int],
                                      dict[str, list[str]]]:
  """Each run with a phase experiment classed by `statistics.verdict` on its comparisons
  (Holm over the study), the count of runs per class, and the runs without one by why
  (no transition, below the bar, not run)."""
  comparisons = study_comparisons(out_dir, found)
  classes = {name: statistics.verdict(c, ALPHA, MARGIN)
             for name, c in comparisons.items() if c}
  counts = {v: sum(cls == v for cls, _ in classes.values()) for v in statistics.VERDICTS}
  without: dict[str, list[str]] = {}
  for run, r in found:
    if run.name in classes:
      continue
    why = why_no_phase(r) or "no comparison"
    kind = ("below the bar" if "phase_min_gap" in why else
            "no transition" if "transition" in why or "Silent Phase is empty" in why else
            "not run")
    without.setdefault(kind, []).append(run.name)
  return classes, counts, without


def _interval(cal: dict, key: str) -> str:
  entry = (cal or {}).get(key) or {}
  if entry.get("block") is None:
    return "none"
  low, high = entry["ci95"]
  return f"{entry['block']} [{'none' if low is None else low}, {'none' if high is None else high}]"


def _gap_share(c: statistics.Comparison, results: dict) -> tuple[float, float]:
  """A comparison's Silent-minus-Decisive difference and its standard error as a share of
  the unpruned model's margin over chance on the run's own measure (`claim.outcome`), so
  a task scored near chance and one scored far above it are compared on one scale."""
  accuracy, chance = claim.outcome(results)
  gap = max(accuracy - chance, 1e-9)
  return c.difference / gap, claim.standard_error(c) / gap


def generation_against_choice(out_dir, found) -> list[dict]:
  """Per generation run and comparison (phase experiment at each rule and k, noise probe at
  each level): its Silent-minus-Decisive difference as a share of the margin over chance
  (`_gap_share`), against the same comparison of the model's multiple-choice runs pooled
  (DerSimonian-Laird on their shares), the difference of the two with its normal 95%
  interval and two-sided p (the item sets are independent), Holm over every row."""
  rows = []
  families = (("phase", study_comparisons), ("noise", noise_comparisons))
  by_model: dict[str, dict[str, dict]] = {}  # each model's multiple-choice comparisons, once
  for run, r in found:
    if run.format != "generate":
      continue
    choice = [(q, rq) for q, rq in found if q.model == run.model and q.format != "generate"]
    results_of = {q.name: rq for q, rq in choice}
    if run.model not in by_model:
      by_model[run.model] = {family: compute(out_dir, choice) for family, compute in families}
    for family, compute in families:
      mine = compute(out_dir, [(run, r)]).get(run.name, [])
      theirs = by_model[run.model][family]
      for c in mine:
        if c.same_as is not None:
          continue
        matched = {name: next((x for x in cs if x.rule == c.rule and x.k == c.k
                               and x.same_as is None), None) for name, cs in theirs.items()}
        matched = {name: x for name, x in matched.items() if x is not None}
        if not matched:
          continue
        shares = [_gap_share(x, results_of[name]) for name, x in sorted(matched.items())]
        pooled = statistics.random_effects_meta([e for e, _ in shares],
                                                [max(se, 1e-9) for _, se in shares])
        share, se = _gap_share(c, r)
        delta = share - pooled["estimate"]
        delta_se = math.sqrt(se ** 2 + pooled["standard_error"] ** 2)
        z = delta / max(delta_se, 1e-12)
        rows.append({"run": run.name, "model": run.model, "family": family,
                     "comparison": c.rule if family == "noise" else f"{c.rule} k={c.k}",
                     "generation": share, "choice": pooled["estimate"],
                     "choice_runs": sorted(matched), "delta": delta,
                     "ci95": (delta - claim.Z95 * delta_se, delta + claim.Z95 * delta_se),
                     "p": math.erfc(abs(z) / math.sqrt(2))})
  holm = statistics.holm([row["p"] for row in rows]) if rows else []
  for row, p in zip(rows, holm):
    row["holm_p"] = float(p)
  return rows


def screened_against_exact(found) -> list[dict]:
  """Where a run holds both searches: how far the screened search's removals follow the
  exact one's (in order, and as a set after each step) and how far apart their accuracy
  curves on the evaluation items lie."""
  pairs = []
  for run, r in found:
    exact = r["methods"].get("iterative_accuracy", {})
    screened = r["methods"].get("iterative_screened_accuracy", {})
    if "removed_order" not in exact or "removed_order" not in screened:
      continue
    a, b = exact["removed_order"], screened["removed_order"]
    steps = min(len(a), len(b))
    accuracy = [{p["removed"]: p["accuracy"] for p in m.get("curve", [])}
                for m in (exact, screened)]
    shared = sorted(set(accuracy[0]) & set(accuracy[1]))
    pairs.append({
        "run": run.name, "screen_items": screened.get("screen_items"),
        "screen_keep": screened.get("screen_keep"), "steps": steps,
        "first_difference": next((i + 1 for i in range(steps) if a[i] != b[i]), None),
        "same_set_steps": sum(set(a[:i]) == set(b[:i]) for i in range(1, steps + 1)),
        "largest_accuracy_difference": max(
            (abs(accuracy[0][k] - accuracy[1][k]) for k in shared), default=None),
        "collapse": (exact.get("collapse_point"), screened.get("collapse_point"))})
  return pairs


def sign_test(successes: int, trials: int) -> float:
  """The exact two-sided sign test of `successes` of `trials` against one half."""
  if trials == 0:
    return 1.0
  tail = min(successes, trials - successes)
  p = 2 * sum(math.comb(trials, i) for i in range(tail + 1)) / 2 ** trials
  return min(1.0, p)


def generation_lines(out_dir, found) -> list[str]:
  """VERDICT.md's section on the generation runs: their own verdicts and noise probe (Holm
  over the generation runs), and whether the phases matter more or less for generation
  than for the multiple-choice decision on the same model."""
  generated = [(run, r) for run, r in found if run.format == "generate"]
  if not generated:
    return []
  lines = ["", "## Generation: the phases for open-ended answers", "",
           "One run per model judges every variant by its greedy answers (the generate "
           "format: exact match as lm-eval scores the task, token F1 beside it; l* read on "
           "the first answer token), paired on the same items with the same statistics as "
           "the multiple-choice runs (Holm over the generation runs' comparisons).", "",
           
           "| run | items | unpruned exact match (token F1) | best constant answer | l* "
           "[95%] | verdict | what it rests on |", "|---|---|---|---|---|---|---|"]
  classes, _, without = classify(out_dir, generated)
  why_not = {name: kind for kind, names in without.items() for name in names}
  for run, r in generated:
    generation = r["full_model"].get("generation") or {}
    cal = r.get("calibration_transition") or {}
    cls, why = classes.get(run.name, (why_not.get(run.name, "-"), why_no_phase(r) or "-"))
    f1 = generation.get("token_f1")
    lines.append(f"| {run.name} | {r['task']['num_items']} | "
                 f"{_fmt(generation.get('exact_match'))} ({_fmt(f1)}) | "
                 f"{_fmt(generation.get('chance'))} | {_interval(cal, cal.get('used', ''))} | "
                 f"**{cls}** | {why} |")
  noise = noise_comparisons(out_dir, generated)
  if noise:
    lines += ["", "Noise by phase, judged by the answers (exact match):", "",
              "| run | eps^2 | Silent | Decisive | Silent - Decisive [95%] | Holm p |",
              "|---|---|---|---|---|---|"]
    for name, at_levels in noise.items():
      for c in at_levels:
        lines.append(f"| {name} | {c.rule.split()[-1]} | {c.silent_accuracy:.3f} | "
                     f"{c.decisive_accuracy:.3f} | {c.difference:+.3f} [{c.ci95[0]:+.3f}, "
                     f"{c.ci95[1]:+.3f}] | {c.holm_p:.2g} |")
  rows = generation_against_choice(out_dir, found)
  lines += ["", "Against the multiple-choice decision on the same model: each comparison's "
            "Silent-minus-Decisive difference as a share of the unpruned model's margin over "
            "chance (exact match over the best constant answer; accuracy over chance), the "
            "generation run's against the model's multiple-choice runs' pooled "
            "(DerSimonian-Laird), their difference with a normal 95% interval, Holm over "
            "every row. Negative: the Silent Phase costs relatively more, against the "
            "Decisive Phase, when the answer is generated.", ""]
  if not rows:
    lines.append("No generation run has a comparison that a multiple-choice run of its model "
                 "also has (below the bar, no transition, or not run yet): the question is "
                 "open here.")
    return lines
  lines += ["| run | comparison | generation | multiple choice (runs) | difference [95%] | "
            "Holm p |", "|---|---|---|---|---|---|"]
  for row in rows:
    lines.append(f"| {row['run']} | {row['family']} {row['comparison']} | "
                 f"{row['generation']:+.3f} | {row['choice']:+.3f} ({len(row['choice_runs'])}) "
                 f"| {row['delta']:+.3f} [{row['ci95'][0]:+.3f}, {row['ci95'][1]:+.3f}] | "
                 f"{row['holm_p']:.2g} |")
  lines.append("")
  for model in dict.fromkeys(row["model"] for row in rows):
    mine = [row for row in rows if row["model"] == model]
    lower = sum(row["holm_p"] < ALPHA and row["delta"] < 0 for row in mine)
    higher = sum(row["holm_p"] < ALPHA and row["delta"] > 0 for row in mine)
    if lower and not higher:
      direction = ("the Silent Phase costs relatively more, against the Decisive Phase, for "
                   "generation (the claim's direction stronger)")
    elif higher and not lower:
      direction = ("the Decisive Phase costs relatively more, against the Silent Phase, for "
                   "generation (the claim's direction weaker, or its reversal stronger)")
    elif lower and higher:
      direction = "the direction differs between comparisons"
    else:
      direction = "no difference in direction is detected at these items"
    # Whether the phases matter more: the size of the gap between the arms, either way.
    larger = sum(abs(row["generation"]) > abs(row["choice"]) for row in mine)
    p_size = sign_test(larger, len(mine))
    size = ("more" if p_size < ALPHA and larger * 2 > len(mine) else
            "less" if p_size < ALPHA else "no detectably more or less")
    gen_mean = float(np.mean([abs(row["generation"]) for row in mine]))
    choice_mean = float(np.mean([abs(row["choice"]) for row in mine]))
    lines.append(
        f"- {model}: the gap between the arms, either way, is {gen_mean:.2f} of the margin "
        f"over chance for generation and {choice_mean:.2f} for the multiple-choice decision "
        f"(mean over {len(mine)} comparisons), larger for generation in {larger} of them "
        f"(exact sign test p = {p_size:.2g}): the phases matter {size} for generation than "
        f"for the multiple-choice decision. In direction (Holm p < {ALPHA}), the Silent "
        f"Phase costs relatively more for generation in {lower} comparisons and less in "
        f"{higher}: {direction}.")
  return lines


def verdict_markdown(out_dir, found, runs) -> str:
  """VERDICT.md: every statement a number computed from the runs' files. The claim is
  classed on the multiple-choice runs; the generation runs have their own section."""
  every = found
  found = [(run, r) for run, r in found if run.format != "generate"]
  classes, counts, without = classify(out_dir, found)
  comparisons = study_comparisons(out_dir, found)
  total = sum(c.same_as is None for cs in comparisons.values() for c in cs)
  lines = ["# The verdict", "",
           "Computed by `benchmarks/real_study/report.py` from the runs' "
           "`runs/<name>/results.json` and `variants.jsonl` (regenerate: `python -m "
           "benchmarks.real_study --report_only`); nothing here is written by hand.", "",
           "The paper's claim: pruning Decisive-Phase blocks costs little, pruning "
           "Silent-Phase blocks collapses accuracy. " + class_definitions(MARGIN), ""]
  if not classes:
    lines.append("No run has a phase experiment yet: no verdict.")
  else:
    lines += [f"Of the {len(classes)} runs with a phase experiment the claim holds in "
              f"{counts['holds']}, is reversed in {counts['reversed']}, the arms are "
              f"equivalent in {counts['equivalent']} and it cannot be told in "
              f"{counts['cannot tell']} (Holm over the {total} distinct comparisons of the "
              f"study at {ALPHA})."
              + "".join(f" {kind.capitalize()}: {len(names)} run(s) ({', '.join(names)})."
                        for kind, names in sorted(without.items())), "",
              "| run | l* on the calibration items [95%] (items) | l* / L on the evaluation "
              "items | verdict | what it rests on |", "|---|---|---|---|---|"]
    for run, r in found:
      if run.name not in classes:
        continue
      cls, why = classes[run.name]
      cal = r.get("calibration_transition") or {}
      L = r["model"]["num_layers"]
      l_eval = r["full_model"]["transition_block"]
      lines.append(f"| {run.name} | {_interval(cal, cal.get('used', ''))} "
                   f"({cal.get('items', '-')}) | "
                   f"{'none' if l_eval is None else f'{l_eval}/{L} = {l_eval / L:.2f}'} | "
                   f"**{cls}** | {why} |")
    lines += ["", "## Across runs: random-effects meta-analysis", "",
              "The paired Silent-minus-Decisive difference pooled over the runs "
              "(DerSimonian-Laird; each run's standard error from its 95% interval), at "
              "k = 1 and at the largest k every run has, per rule. Negative: pruning the "
              "Silent Phase costs more.", "",
              "| rule | k | runs | pooled difference [95%] | tau^2 | I^2 | Q (p) |",
              "|---|---|---|---|---|---|---|"]
    rules = list(dict.fromkeys(c.rule for cs in comparisons.values() for c in cs))
    shown = set()
    for rule in rules:
      for k in (1, "largest"):
        pooled = claim.meta_analysis(comparisons, rule, k)
        if pooled is None or (rule, pooled["k"]) in shown:
          continue
        shown.add((rule, pooled["k"]))
        i2 = "-" if pooled["i2"] is None else f"{pooled['i2']:.0%}"
        q = "-" if pooled["q_p"] is None else f"{pooled['q']:.2f} ({pooled['q_p']:.2g})"
        lines.append(f"| {rule} | {pooled['k']} | {pooled['studies']} | "
                     f"{pooled['estimate']:+.3f} [{pooled['ci95'][0]:+.3f}, "
                     f"{pooled['ci95'][1]:+.3f}] | {pooled['tau2']:.4f} | {i2} | {q} |")
  # The noise probe by phase.
  noise = noise_comparisons(out_dir, found)
  if noise:
    lines += ["", "## Noise by phase", "",
              "Gaussian noise eps * sigma(h) * N(0, I) after every block of one phase (every "
              "block kept), at each level eps^2; Silent minus Decisive accuracy paired on the "
              "same items (the items are the unit: each item's noise is its own draw), Holm "
              "over every noise comparison of the study. The paper reports the Silent Phase "
              "degrading at 0.02 while the Decisive Phase holds at 0.1.", "",
              "| run | eps^2 | Silent | Decisive | Silent - Decisive [95%] | Holm p | "
              "Decisive drop [95%] |", "|---|---|---|---|---|---|---|"]
    for name, at_levels in noise.items():
      for c in at_levels:
        d = c.decisive_drop
        lines.append(f"| {name} | {c.rule.split()[-1]} | {c.silent_accuracy:.3f} | "
                     f"{c.decisive_accuracy:.3f} | {c.difference:+.3f} [{c.ci95[0]:+.3f}, "
                     f"{c.ci95[1]:+.3f}] | {c.holm_p:.2g} | {d.drop:+.3f} "
                     f"[{d.drop_ci95[0]:+.3f}, {d.drop_ci95[1]:+.3f}] |")
    lines += ["", "Pooled across runs (DerSimonian-Laird):", "",
              "| eps^2 | runs | pooled Silent - Decisive [95%] | I^2 |", "|---|---|---|---|"]
    for rule in dict.fromkeys(c.rule for cs in noise.values() for c in cs):
      pooled = claim.meta_analysis(noise, rule, 0)
      if pooled is not None:
        i2 = "-" if pooled["i2"] is None else f"{pooled['i2']:.0%}"
        lines.append(f"| {rule.split()[-1]} | {pooled['studies']} | {pooled['estimate']:+.3f} "
                     f"[{pooled['ci95'][0]:+.3f}, {pooled['ci95'][1]:+.3f}] | {i2} |")
  # The screened search against the exact one, where both ran.
  pairs = screened_against_exact(found)
  if pairs:
    lines += ["", "## The screened search against the exact one", "",
              "Iterative Pruning's exact greedy search against the screened search (every "
              "candidate scored on the first calibration items, the best few evaluated on "
              "all of them), on the same run: the blocks each removes in order, the steps "
              "after which both have removed the same set of blocks, and their accuracy on "
              "the evaluation items along the way.", "",
              "| run | screen (items x kept) | steps | same removals, in order | same set "
              "after | first step that differs | largest accuracy difference | collapse "
              "(exact / screened) |", "|---|---|---|---|---|---|---|---|"]
    for p in pairs:
      lines.append(
          f"| {p['run']} | {p['screen_items']} x {p['screen_keep']} | {p['steps']} | "
          f"{'yes' if p['first_difference'] is None else 'no'} | "
          f"{p['same_set_steps']} of {p['steps']} steps | "
          f"{'-' if p['first_difference'] is None else p['first_difference']} | "
          f"{_fmt(p['largest_accuracy_difference'])} | "
          f"{_fmt(p['collapse'][0], 0)} / {_fmt(p['collapse'][1], 0)} |")
  # Where the transition sits, and how firmly.
  with_l = [(run, r) for run, r in found if r.get("calibration_transition")]
  if with_l:
    lines += ["", "## The transition and its uncertainty", "",
              "l* of the unpruned model on the calibration items (the one the phase "
              "experiment uses), by the margin rule under both normalizations and by the "
              "accuracy rule, each with a 95% bootstrap interval over those items; and on the "
              "evaluation items.", "",
              "| run | margin, vocab | margin, options | accuracy rule | used | evaluation "
              "items (run's rule) |", "|---|---|---|---|---|---|"]
    for run, r in with_l:
      cal = r["calibration_transition"]
      lines.append(f"| {run.name} | {_interval(cal, 'margin_vocab')} | "
                   f"{_interval(cal, 'margin_options')} | {_interval(cal, 'accuracy')} | "
                   f"{cal['used']} | {r['full_model']['transition_block']} |")
  # The last block's share of the Decisive arm's cost: the control at the largest k.
  controls = []
  for run, r in found:
    by = {(c.rule, c.k): c for c in comparisons.get(run.name, [])}
    keep_last = [c for (rule, _), c in by.items() if rule == "adjacent_keep_last"]
    if keep_last and any(rule == "adjacent" for rule, _ in by):
      k = max(c.k for c in keep_last)
      base = by.get(("adjacent", k))
      if base is not None:
        controls.append((run.name, k, base, by[("adjacent_keep_last", k)]))
  if controls:
    lines += ["", "## The Decisive arm with and without the model's last block", "",
              "At the largest k the control rule keeps, the adjacent Decisive arm's "
              "accuracy against the same arm with the last block kept (`adjacent_keep_last`), "
              "and each against the Silent arm (paired differences, Holm over the study).", "",
              "| run | k | Decisive arm | Decisive arm, last block kept | Silent - Decisive "
              "[95%] (Holm p) | Silent - Decisive, last block kept [95%] (Holm p) |",
              "|---|---|---|---|---|---|"]
    for name, k, base, kept in controls:
      lines.append(f"| {name} | {k} | {base.decisive_accuracy:.3f} | "
                   f"{kept.decisive_accuracy:.3f} | {base.difference:+.3f} "
                   f"[{base.ci95[0]:+.3f}, {base.ci95[1]:+.3f}] ({base.holm_p:.2g}) | "
                   f"{kept.difference:+.3f} [{kept.ci95[0]:+.3f}, {kept.ci95[1]:+.3f}] "
                   f"({kept.holm_p:.2g}) |")
  lines += generation_lines(out_dir, every)
  found = every
  # Limits.
  models = sorted({run.model for run in runs})
  lines += ["", "## Limits", "",
            "- Precision: every model is a 4-bit GGUF file, dequantized to float32 ("
            + "; ".join(PRECISION.get(m, m) for m in models) + "): the quantized weights, not "
            "the published full-precision ones."]
  if found:
    counts = sorted({r["task"]["num_items"] for _, r in found}, reverse=True)
    lines.append(
        f"- Items: {' or '.join(map(str, counts))} evaluation items per run; the transition "
        "is read on " + ", ".join(sorted({str((r.get("calibration_transition") or {})
                                              .get("items", "-")) for _, r in found}))
        + " calibration items, the pruning search uses "
        + ", ".join(sorted({str(r["task"]["num_calibration_items"]) for _, r in found}))
        + " of them.")
  from benchmarks.real_study import campaign
  size = size_of(runs)
  left = [] if size is None else [
      row for row in campaign.status(out_dir, campaign.plan(size))
      if row["state"] in ("to do", "after phase")]
  if size is not None and size.name != "full":
    common = dict(size.common)
    lines.append(
        f"- Cut to fit two CPU cores (REPORT.md's campaign section gives why and the "
        f"predicted hours): the random rule over {common['phase_seeds']} seeds, k by "
        f"`--phase_ks={common['phase_ks']}`, the noise probe over {common['noise_seeds']} "
        "seed(s)" + ("" if common["noise_profile_seeds"] else " without its block-by-block "
                     "profile")
        + "; exact Iterative Pruning on " + ", ".join(size.iterative_runs)
        + (", screened on " + ", ".join(size.screened_runs) if size.screened_runs else "")
        + "; the one-shot baselines on " + ", ".join(size.baselines_runs)
        + ". The full size (300 items, 10 seeds, every k, every search) is "
        "`--size=full`, for an accelerator.")
  if left:
    lines.append(f"- Units of the plan not run yet ({len(left)}): "
                 + ", ".join(row["unit"] for row in left) + ".")
  return "\n".join(lines) + "\n"


def _dm_series(run, r):
  full = r["full_model"]
  answered = (full.get("answered") or {}).get("mean_margin")
  if run.format in ("open", "generate") and answered:
    return answered, "vocab DM, answered items"
  norm = ("vocab" if run.format in ("open", "generate")
          else r["settings"].get("normalization", "vocab"))
  return ([np.nan if v is None else v for v in full["decision_margin"][norm]["mean"]],
          f"{norm} DM")


def size_of(runs):
  """The campaign size (`campaign.SIZES`) whose runs these are, or None."""
  from benchmarks.real_study import campaign
  return next((z for z in campaign.SIZES.values()
               if [r.name for r in campaign.runs(z)] == [r.name for r in runs]
               and all(dict(r.settings) == dict(q.settings)
                       for r, q in zip(campaign.runs(z), runs))), None)


def campaign_lines(out_dir: str, runs) -> list[str]:
  """REPORT.md's account of the campaign: its size and what it cut (from the plan), and
  every finished unit's measured time against the time predicted before it started
  (from ledger.json)."""
  from benchmarks.real_study import campaign
  size = size_of(runs)
  lines = ["## The campaign", ""]
  if size is not None:
    items = {}
    for r in runs:
      if r.format != "generate":
        items.setdefault(r.model, {})[r.task] = dict(r.settings)["num_items"]
    described = []
    for model, per_task in items.items():
      usual = max(set(per_task.values()), key=list(per_task.values()).count)
      other = [f"{t} {n}" for t, n in per_task.items() if n != usual]
      described.append(f"{model} {usual}" + (f" ({', '.join(other)})" if other else ""))
    common = dict(size.common)
    generation = [r for r in runs if r.format == "generate"]
    lines += [f"Plan `{size.name}` (`benchmarks/real_study/campaign.py`): "
              f"{len(runs) - len(generation)} multiple-choice runs (three models, cloze "
              f"format, on {', '.join(size.tasks)}) and {len(generation)} generation runs "
              f"({size.generation_task}, the generate format: every variant judged by its "
              "greedy answers), each cut into units run in priority order: every "
              "multiple-choice run's profile and phase experiment, then their noise probes, "
              "then the generation runs' two; then "
              "Iterative Pruning on " + ", ".join(size.iterative_runs)
              + (", and the screened search on " + ", ".join(size.screened_runs)
                 if size.screened_runs else "") + "; then the one-shot "
              "baselines on " + ", ".join(size.baselines_runs) + ".", "",
              "Evaluation items per run: " + "; ".join(described)
              + f"; the random rule over {common['phase_seeds']} seeds (its exact "
              f"sign-flip test over seeds cannot go below p = 2/2^{common['phase_seeds']} = "
              f"{2 / 2 ** common['phase_seeds']:.3g}: on its own it cannot reach significance "
              "after Holm here, and the meta-analysis across runs is where it speaks), k by "
              f"`--phase_ks={common['phase_ks']}`, the noise probe over "
              f"{common['noise_seeds']} seeds"
              + (" without its block-by-block profile" if not common["noise_profile_seeds"]
                 else "") + "; the phase experiment and the noise probe only where the "
              f"unpruned model is at least {common['phase_min_gap']} above chance."]
    grouped: dict[tuple, list[str]] = {}
    for task, fields in size.task_settings.items():
      grouped.setdefault(tuple(fields), []).append(task)
    for fields, tasks in grouped.items():
      lines[-1] += (f" On {', '.join(tasks)}: " + ", ".join(f"`{k}={v}`" for k, v in fields)
                    + f" (elsewhere {', '.join(f'{k}={common[k]}' for k, _ in fields)}).")
    norms = {campaign.run_settings(r)["cloze_norm"] for r in runs if r.format == "cloze"}
    if norms == {"none"}:
      lines[-1] += (" Every multiple-choice run scores an option by its summed "
                    "log-probability (`--cloze_norm=none`, lm-eval's acc), HellaSwag's too: its "
                    "accuracies are not the acc_norm (per byte) figures usually published for it.")
    if generation:
      fields = dict(size.generation_settings)
      lines[-1] += (" The generation runs: evaluation items "
                    + ", ".join(f"{r.model} {dict(r.settings)['num_items']}" for r in generation)
                    + "; " + ", ".join(f"`{k}={v}`" for k, v in fields.items())
                    + " (each variant generates every answer token by token, so they are cut "
                    "further; the accuracy rule reads l* on the first answer token, whose mean "
                    "margin stays negative where most answers are wrong).")
    if size.task_settings:
      lines[-1] += (" SciQ's, PIQA's and HellaSwag's items are 3x ARC's tokens, so their "
                    "transition items and Gemma 3's evaluation items (its 262k-token "
                    "unembedding makes every lens read 3-5x the others') are cut to keep the "
                    "plan within 12 hours.")
    if size.name == "local":
      # As the dry run counts it: every unit but those the runs' profiles made unneeded.
      predicted = lambda z: sum(
          row["predicted_seconds"] for row in campaign.status(
              out_dir, campaign.plan(z), every=campaign.plan(size))
          if row["state"] != "not needed")
      lines += ["", "What this plan cuts from the full size (300 items, 10 seeds, every k, "
                "the noise profile, Iterative Pruning and the baselines on every run), and "
                f"why: on two CPU cores the full plan is predicted at "
                f"{campaign.hours(predicted(campaign.FULL))} and this one at "
                f"{campaign.hours(predicted(size))} (`--dry_run`, the same calibration), so items and seeds are cut before runs (fewer items widen each "
                "run's intervals; the meta-analysis across runs pools them; the two-stage "
                "statistics carry the random rule's seed spread with fewer seeds), k is "
                "sampled by doublings, the noise profile (one forward per block and level) "
                "is left out, and the searches run on one run per model (`python -m "
                "benchmarks.real_study --size=full` on an accelerator runs the rest)."]
  ledger = campaign.read_ledger(out_dir)["units"]
  if ledger:
    cores = campaign.quiet_cores(ledger)
    lines += ["", "Finished units: the time predicted before each started (from the "
              "planner's work count calibrated on the units before it), the time the dry "
              "run predicts for it now (calibrated on every other finished unit), against "
              "the time it took on two CPU cores, and the mean load through it. A unit run "
              f"beside more than {campaign.CONTENDED_OTHER_CORES:g} core of other work (its "
              "mean load less the cores it kept busy itself: its CPU seconds over its wall "
              "seconds) is marked contended: its wall time says more about the machine than "
              "about its work, so it is compared (and calibrates the others) by its time on "
              "a quiet machine: its CPU seconds over the cores the quiet units kept busy "
              f"({cores:.2f} of two). A resumed unit (one that continued the steps a "
              "killed start recorded, or was recorded again from its run's saved state) is "
              "not compared: its time is not its whole work.", "",
              "| unit | predicted before | predicted now | measured | quiet equivalent | "
              "quiet / before | quiet / now | load |", "|---|---|---|---|---|---|---|---|"]
    plan_units = {u.name: u for u in campaign.plan(size)} if size is not None else {}
    total, compared, within_before, within_now = 0.0, 0, 0, 0
    for name, rec in sorted(ledger.items(), key=lambda kv: kv[1]["finished"]):
      total += rec["seconds"]
      now = None
      if name in plan_units:
        others = [u for n, u in plan_units.items() if n != name]
        calibration = campaign.calibrate(out_dir, others)
        now = campaign.predict(out_dir, plan_units[name], calibration)[0]
      load = campaign.unit_load(rec)
      busy = campaign.contended(rec)
      quiet = campaign.quiet_seconds(rec, cores)
      restored = campaign.resumed(rec)
      if restored:  # its time is not its whole work
        quiet = None
      ratio_before = None if quiet is None else quiet / max(rec["predicted_seconds"], 1e-9)
      ratio_now = None if quiet is None or now is None else quiet / now
      if quiet is not None:
        compared += 1
        within_before += 1 / 1.5 <= ratio_before <= 1.5
        within_now += ratio_now is not None and 1 / 1.5 <= ratio_now <= 1.5
      ratio = lambda r: "-" if r is None else f"{r:.2f}"
      lines.append(
          f"| {name} | {campaign.hours(rec['predicted_seconds'])} | "
          f"{'-' if now is None else campaign.hours(now)} | {campaign.hours(rec['seconds'])} | "
          f"{'resumed' if restored else '-' if quiet is None else campaign.hours(quiet)}"
          f"{' (CPU time)' if busy and quiet is not None else ''} | {ratio(ratio_before)} | "
          f"{ratio(ratio_now)} | "
          f"{'-' if load is None else f'{load:.1f}'}{' (contended)' if busy else ''} |")
    lines += ["", f"Compute so far: {campaign.hours(total)} in {len(ledger)} units. Of the "
              f"{compared} units with a time on a quiet machine (measured, or from CPU time), "
              f"{within_before} took within 1.5x of the time predicted before they started "
              f"and {within_now} within 1.5x of the dry run's prediction now (each left out "
              "of its own calibration)."]
    calibration = campaign.calibrate(out_dir, list(plan_units.values()))
    if calibration.units >= campaign.MIN_FIT_UNITS:
      names = {"blocks": "block work", "decoding": "decoding", "lens": "lens reads",
               "curve": "a search curve's lens reads (every layer of every variant)"}
      rates = ", ".join(f"{names[p]} {c:.2f}x" for p, c in
                        zip(campaign.COST_PARTS, calibration.coefficients) if p in names)
      lines += ["", f"The dry run's cost model, fitted to the {calibration.units} finished "
                "units with a time on a quiet machine (every kind at once, each unit weighing "
                "alike in relative error): a unit takes its model's fixed cost (loading, "
                "encoding: " + ", ".join(f"{m} {campaign.hours(s)}" for m, s in
                                        campaign.PRIOR_FIXED.items())
                + f") plus its parts' seconds at the prior rates times {rates}, plus "
                f"{campaign.hours(calibration.coefficients[3])} where it sweeps pruned "
                "variants (compiling their programs for every batch width)."]
  return lines + [""]


def write_report(out_dir: str, runs) -> str:
  from dpjax.report import figures
  plt = figures.pyplot()
  found = _load(out_dir, runs)
  verdict = verdict_markdown(out_dir, found, runs)
  atomic_write_text(os.path.join(out_dir, "VERDICT.md"), verdict)
  lines = ["# dpjax on real pretrained models: does the Silent/Decisive asymmetry hold?", ""]
  lines += campaign_lines(out_dir, runs)
  if not found:
    lines.append("No run has finished yet.")
    text = "\n".join(lines) + "\n"
    atomic_write_text(os.path.join(out_dir, "REPORT.md"), text)
    return text
  lines += ["Every number below comes from the runs in `runs/` (one dpjax study each, "
            "`python -m benchmarks.real_study` reproduces them; `variants.jsonl` beside each "
            "results.json holds every evaluated variant's per-item outcomes, from which every "
            "comparison recomputes). Accuracy intervals are 95% bootstrap intervals over "
            "evaluation items; Silent against Decisive is compared paired.", ""]

  # 0. What ran, and for how long.
  lines += ["## The runs", "",
            "Wall time is the finishing process's: a run resumed from saved state does not "
            "count its earlier processes' time.", "",
            "| run | model (precision) | normalization | methods | wall time on two cores |",
            "|---|---|---|---|---|"]
  for run, r in found:
    t = r.get("timings", {})
    seconds = t.get("prepare_seconds", 0) + t.get("full_profile_seconds", 0) + t.get(
        "methods_seconds", 0)
    ran = [name for name, m in r["methods"].items() if "skipped" not in m]
    if r.get("phase_experiment") and "skipped" not in r["phase_experiment"]:
      ran.append("phase experiment")
    lines.append(f"| {run.name} | {PRECISION.get(run.model, run.model)} | "
                 f"{r['settings']['normalization']} | {', '.join(ran) or '-'} | "
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
            "sharpest rise (share) | collapse points (iterative / screened / phase-aware / "
            "block influence / angular / single layer / reverse / random) |",
            "|---|---|---|---|---|---|---|---|"]
  for run, r in found:
    full, L = r["full_model"], r["model"]["num_layers"]
    ci = full.get("final_accuracy_ci95") or [None, None]
    l_star = full["transition_block"]
    shape = _shape(full, r["settings"]["normalization"])
    methods = r["methods"]
    cp = lambda name: (methods.get(name, {}).get("collapse_point", "-")
                       if "skipped" not in methods.get(name, {}) else "skipped")
    lines.append(
        f"| {_label(run, r)} | {r['task']['num_items']} | {_fmt(full['accuracy'][-1])} "
        f"[{_fmt(ci[0])}, {_fmt(ci[1])}] | {_fmt(full['chance'])} | {_published(run)} | "
        f"{'none' if l_star is None else f'{l_star}/{L} = {l_star / L:.2f}'} | "
        f"{full['sharpness']['rise']:+.4f} at {full['sharpness']['block']} "
        f"({_fmt(shape.share, 2)}: {'sharp' if shape.sharp else 'gradual'}) | "
        + " / ".join(str(cp(name)) for name in COLLAPSE_COLUMNS) + f" of {L} |")

  # 2. The phase experiment, paired.
  comparisons = study_comparisons(out_dir, found)
  lines += ["", "## Silent arm against Decisive arm, paired", "",
            "Accuracy after removing k blocks inside each phase (l* from the calibration "
            "items), both arms on the same evaluation items, recomputed from each run's "
            "variants.jsonl; Holm p is over the distinct comparisons of the whole study."]
  for run, r in found:
    phase = r.get("phase_experiment") or {}
    if phase.get("skipped"):
      lines += ["", f"### {run.name}", "", f"Skipped: {phase['skipped']}."]
    elif run.name in comparisons:
      lines += ["", f"### {run.name}", "",
                *comparison_table(comparisons[run.name], MARGIN)]

  # 3. l* against the collapse of Iterative Pruning.
  rows = transition_collapse_rows(found)
  if rows:
    lines += ["", "## Does l* of the unpruned model predict where Iterative Pruning collapses?",
              "", "l* on the evaluation items by the margin and the accuracy rule; the "
              "collapse is Iterative Pruning's (accuracy criterion, chosen on the calibration "
              "items, measured on the evaluation items): the fewest blocks removed that leave "
              "accuracy below halfway between chance and the unpruned model's; the exact "
              "search's where it ran, else the screened search's.", "",
              "| run | search | l* / L (margin) | l* / L (accuracy) | collapse / L | blocks "
              "left at collapse |", "|---|---|---|---|---|---|"]
    share = lambda x: "none" if x is None else f"{x:.2f}"
    for row in rows:
      lines.append(f"| {row['label']} | {row['search']} | {share(row['margin'])} | "
                   f"{share(row['accuracy'])} | {share(row['collapse'])} | "
                   f"{row['blocks_left']} |")
    lines.append("")
    for rule in ("margin", "accuracy"):
      pairs = [(row[rule], row["collapse"]) for row in rows
               if row[rule] is not None and row["collapse"] is not None]
      corr = _correlation([p[0] for p in pairs], [p[1] for p in pairs])
      lines.append(f"By the {rule} rule, across {len(pairs)} runs: " + (
          f"Pearson r = {corr[0]:+.2f}, Spearman rho = {corr[1]:+.2f} between l*/L and "
          "collapse/L." if corr else "too few runs (or no spread in l*) for a correlation."))

  # 4. Phase-aware against Iterative Pruning and block influence.
  aware = []
  for run, r in found:
    m = r["methods"]
    if not all("curve" in m.get(k, {}) for k in ("phase_aware", "iterative_accuracy",
                                                  "block_influence")):
      continue
    L = r["model"]["num_layers"]
    curves = {k: {p["removed"]: p["accuracy"] for p in m[k]["curve"]}
              for k in ("iterative_accuracy", "phase_aware", "block_influence")}
    for n in sorted({1, 2, 4, 8, L // 4, L // 2}):
      if all(n in c for c in curves.values()):
        aware.append((run.name, n, *(curves[k][n] for k in curves)))
  if aware:
    lines += ["", "## The phase-aware method against Iterative Pruning and block influence",
              "", "| run | blocks removed | iterative | phase-aware | block influence |",
              "|---|---|---|---|---|"]
    for name, n, it, pa, bi in aware:
      lines.append(f"| {name} | {n} | {_fmt(it)} | {_fmt(pa)} | {_fmt(bi)} |")

  # Figures.
  forest = [(f"{run.name}: {c.rule} k={c.k}", c) for run, _ in found
            for c in comparisons.get(run.name, [])]
  if forest:
    figures.plot_forest(os.path.join(out_dir, "silent_minus_decisive.png"), forest,
                        "Silent arm minus Decisive arm, every run (Holm over the study)")
  models = sorted({run.model for run, _ in found})
  fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False,
                           sharey=True)
  for ax, model in zip(axes[0], models):
    for run, r in found:
      if run.model != model:
        continue
      L = r["model"]["num_layers"]
      mean, what = _dm_series(run, r)
      ax.plot(np.arange(len(mean)) / L, mean, marker="o", ms=2,
              label=f"{run.task} / {run.format} ({what})",
              ls="--" if run.format in ("open", "generate") else "-")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_title(PRECISION.get(model, model), fontsize=9)
    ax.set_xlabel("relative depth (layer / L)")
    ax.legend(fontsize=6)
  axes[0, 0].set_ylabel("mean Decision Margin")
  fig.suptitle("Decision Margin by relative depth, one panel per model")
  save_figure(fig, os.path.join(out_dir, "dm_by_relative_depth.png"))

  fig, ax = plt.subplots(figsize=(6, 6))
  markers = {"adjacent": "o", "redundant": "s", "random": "^", "adjacent_keep_last": "v",
             "adjacent_keep_first": "<"}
  labels = list(dict.fromkeys(run.name for run, _ in found))
  palette = plt.get_cmap("tab20")
  colour = {label: palette(i % palette.N) for i, label in enumerate(labels)}
  for run, _ in found:
    for c in comparisons.get(run.name, []):
      ax.scatter(c.silent_accuracy, c.decisive_accuracy, marker=markers.get(c.rule, "o"),
                 color=colour[run.name], s=18)
  for label in labels:
    ax.scatter([], [], color=colour[label], label=label, s=18)
  ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_xlabel("Silent arm accuracy")
  ax.set_ylabel("Decisive arm accuracy")
  ax.set_title("Per arm (the paired differences are the forest plot)\nabove the diagonal: "
               "Silent-Phase pruning hurts more", fontsize=9)
  ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  save_figure(fig, os.path.join(out_dir, "silent_vs_decisive.png"))

  plotted_rows = [row for row in rows if row["collapse"] is not None]
  if plotted_rows:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for rule, marker in (("margin", "o"), ("accuracy", "x")):
      points = [row for row in plotted_rows if row[rule] is not None]
      ax.scatter([row[rule] for row in points], [row["collapse"] for row in points],
                 marker=marker, label=f"l* by the {rule} rule")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, 1.0)
    ax.set_xlabel("l* / L (unpruned model, evaluation items)")
    ax.set_ylabel("Iterative Pruning collapse / L")
    ax.set_title("Does the transition predict the collapse?")
    ax.legend(fontsize=7)
    save_figure(fig, os.path.join(out_dir, "transition_vs_collapse.png"))

  lines += ["", "![Silent minus Decisive, every run](silent_minus_decisive.png)", "",
            "![mean DM by relative depth](dm_by_relative_depth.png)", "",
            "![Silent arm against Decisive arm](silent_vs_decisive.png)", "", verdict.strip()]
  text = "\n".join(lines) + "\n"
  atomic_write_text(os.path.join(out_dir, "REPORT.md"), text)
  return text
