"""The model bundled with dpjax: what its card says, recomputed; and the default study on it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

import dpjax
from tests.support import reference
from dpjax.tasks import synthetic
from dpjax import tasks
from dpjax.study import metrics
from dpjax.bundled import BUNDLED_MODEL
from dpjax.lens.readout import DecisionReader


@pytest.fixture(scope="module")
def training_log():
  with open(os.path.join(BUNDLED_MODEL, "training_log.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def held_out(training_log):
  """The card's held-out items (test split, 0-shot), encoded with the bundled tokenizer."""
  s = training_log["settings"]
  items = synthetic.generate("test", s["num_eval_items"], seed=s["seed"])
  tokenizer = transformers.AutoTokenizer.from_pretrained(BUNDLED_MODEL)
  return tokenizer, tasks.encode(tokenizer, items, [tasks.prompt(item) for item in items])


def test_the_checkpoint_is_what_the_card_says(training_log):
  files = os.listdir(BUNDLED_MODEL)
  for name in ("config.json", "model.safetensors", "tokenizer.json", "MODEL_CARD.md",
               "training_log.json"):
    assert name in files
  size = sum(os.path.getsize(os.path.join(BUNDLED_MODEL, f)) for f in files)
  assert size <= 20 * 2**20, f"{size / 2**20:.1f} MB"
  hf = transformers.AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL)
  assert type(hf).__name__ == "LlamaForCausalLM"
  assert hf.config.num_hidden_layers >= 16
  assert training_log["final_accuracy"] >= 0.9
  assert training_log["train_seconds"] <= 3600
  with open(os.path.join(BUNDLED_MODEL, "MODEL_CARD.md")) as f:
    card = f.read()
  stated = float(re.search(r"\*\*(0\.\d+)\*\*", card).group(1))
  assert stated == pytest.approx(training_log["final_accuracy"], abs=5e-4)
  assert "python -m dpjax.train" in card
  # Letters are single tokens of their own.
  tokenizer = transformers.AutoTokenizer.from_pretrained(BUNDLED_MODEL)
  for letter in "ABCD":
    assert len(tokenizer(" " + letter, add_special_tokens=False)["input_ids"]) == 1


def test_held_out_accuracy_recomputed_by_dpjax_and_hf(training_log, held_out):
  tokenizer, encoded = held_out
  card = training_log["final_accuracy"]
  n = len(encoded.items)

  model = dpjax.load_model(BUNDLED_MODEL, dtype="float32")
  readout = DecisionReader(model).run(encoded, batch_size=50, pad_id=tokenizer.pad_token_id,
                                      progress=False)
  top = np.asarray(metrics.top_option(readout.option_logits[0]))[-1]
  ours = float(np.mean(top == encoded.answer))
  assert ours == pytest.approx(card, abs=1e-6)  # the card holds a float32 mean

  hf = transformers.AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL, dtype=torch.float32).eval()
  hf_top = []
  with torch.no_grad():
    for ids, letters in zip(encoded.tokens, encoded.letter_ids):
      logits = hf(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
      hf_top.append(int(torch.argmax(logits[torch.as_tensor(letters)])))
  hf_top = np.array(hf_top)
  # Float32 rounding may flip a near-tie; no more than one item in the whole set.
  assert np.sum(hf_top != top) <= 1
  assert float(np.mean(hf_top == encoded.answer)) == pytest.approx(card, abs=1.0 / n + 1e-9)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
  """`dpjax` with no --model and no --task: the bundled model on the synthetic suite."""
  out = str(tmp_path_factory.mktemp("default_run"))
  result = subprocess.run(
      [sys.executable, "-m", "dpjax.cli.study", "--num_items=64", "--calibration_items=16",
       "--random_seeds=1", "--noise_profile_seeds=0", "--noprogress",
       f"--output_dir={out}"], capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "transition block" in result.stdout
  # The last lines: the verdict in one sentence, then where the report is.
  last = result.stdout.strip().splitlines()[-2:]
  assert "class this run as" in last[0]
  assert last[1] == f"report: {os.path.join(os.path.abspath(out), 'summary.html')}"
  with open(os.path.join(out, "results.json")) as f:
    return out, json.load(f)


def test_default_run_writes_the_whole_report(default_run):
  out, results = default_run
  assert results["model"]["path"] == "dpjax/bundled_model" and results["task"]["spec"] == "synthetic"
  assert results["settings"]["model"] == "dpjax/bundled_model"  # no machine's path
  pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
  assert {"decision_margin.png", "decision_margin_by_subject.png", "option_frequency.png",
          "pruning_curves.png", "phase_comparison.png"} <= set(pngs)
  with open(os.path.join(out, "summary.md")) as f:
    summary = f.read()
  l_star = results["full_model"]["transition_block"]
  assert f"Transition block l* = {l_star}" in summary
  assert "| iterative_accuracy |" in summary and "Silent arm" in summary
  with open(os.path.join(out, "summary.html")) as f:
    page = f.read()
  # Self-contained: every figure inline, nothing fetched from elsewhere.
  assert page.count('src="data:image/png;base64,') == len(pngs)
  assert "http" not in page.replace("http-equiv", "")
  assert f"Transition block l* = {l_star}" in page
  assert "<table>" in page


def test_default_run_runs_every_method_without_a_skip(default_run):
  """Every method of the registry gives a curve and the phase experiment its arms: on the
  bundled model (a transition at block 15 of 16), nothing may be skipped."""
  _, results = default_run
  methods = results["methods"]
  assert sorted(methods) == sorted(["iterative_accuracy", "block_influence", "angular",
                                    "single_layer", "reverse", "random", "phase_aware",
                                    "decisive_only"])
  num_layers = results["model"]["num_layers"]
  l_star = results["calibration_transition_block"]
  decisive = list(range(l_star, num_layers + 1))
  for name, result in methods.items():
    assert "skipped" not in result, (name, result.get("skipped"))
    removed = [p["removed"] for p in result["curve"]]
    length = len(decisive) + 1 if name == "decisive_only" else num_layers
    assert removed == list(range(len(removed))) and len(removed) == length, name
    assert "collapse_point" in result
  aware = methods["phase_aware"]
  # It removes the Decisive Phase's blocks first, all of them, then carries on.
  assert sorted(aware["removed_order"][:len(decisive)]) == decisive
  assert aware["decisive_exhausted_at"] == len(decisive)
  # decisive_only stops there: every Silent-Phase block kept at every point.
  only = methods["decisive_only"]
  assert only["removed_order"] == aware["removed_order"][:len(decisive)]
  assert only["curve_from"] == "phase_aware"
  for point in only["curve"]:
    assert set(range(1, l_star)) <= set(point.get("kept", range(1, num_layers + 1)))
  phase = results["phase_experiment"]
  assert "skipped" not in phase and phase["transition_block"] == l_star
  assert sorted(phase["selections"]) == ["adjacent", "adjacent_keep_first",
                                         "adjacent_keep_last", "random", "redundant"]
  silent, decisive = l_star - 1, num_layers - l_star + 1
  sizes = {"adjacent": min(silent, decisive), "redundant": min(silent, decisive),
           "random": min(silent, decisive), "adjacent_keep_last": min(silent, decisive - 1),
           "adjacent_keep_first": min(silent - 1, decisive)}
  for rule, arms in phase["selections"].items():
    for arm in ("silent", "decisive"):
      assert [p["k"] for p in arms[arm]] == list(range(1, sizes[rule] + 1)), rule
  # The controls keep what their names say, at every k.
  last, first = num_layers, 1
  for p in phase["selections"]["adjacent_keep_last"]["decisive"]:
    assert all(last not in removed for removed in p["removed_sets"])
  for p in phase["selections"]["adjacent_keep_first"]["silent"]:
    assert all(first not in removed for removed in p["removed_sets"])
  assert [(c["rule"], c["k"]) for c in phase["comparisons"]] == [
      (rule, k) for rule, arms in phase["selections"].items()
      for k in range(1, sizes[rule] + 1)]
  assert [c["seeds"] for c in phase["comparisons"] if c["rule"] == "random"] == [10] * sizes[
      "random"]


def test_every_comparison_recomputes_from_variants_jsonl(default_run):
  """variants.jsonl holds every evaluated variant's per-item outcomes: each paired
  comparison's difference and p recompute from it with numpy and scipy (exact McNemar for a
  deterministic rule, scipy's exact permutation test over the seeds' paired differences for
  the random rule), the curves' accuracies too, Holm over the distinct comparisons gives the
  reported holm_p, and a control that removes what `adjacent` removes is marked and counted
  once."""
  from scipy import stats as scipy_stats
  out, results = default_run
  with open(os.path.join(out, "variants.jsonl")) as f:
    variants = [json.loads(line) for line in f]
  n = results["task"]["num_items"]
  assert all(len(v["correct"]) == n and len(v["final_dm"]) == n for v in variants)
  unpruned = [v for v in variants if v["method"] == "unpruned"]
  assert len(unpruned) == 1 and len(unpruned[0]["kept"]) == results["model"]["num_layers"]
  outcome = lambda v: np.array([int(c) for c in v["correct"]])
  assert outcome(unpruned[0]).mean() == pytest.approx(results["full_model"]["accuracy"][-1])
  for point in results["methods"]["reverse"]["curve"][1:]:
    (v,) = [v for v in variants if v["method"] == "reverse" and v["k"] == point["removed"]]
    assert v["kept"] == [b - 1 for b in point["kept"]]
    assert outcome(v).mean() == pytest.approx(point["accuracy"])
  comparisons = results["phase_experiment"]["comparisons"]
  ps, seen, distinct = {}, {}, []
  for c in comparisons:
    picked = lambda name: [v for v in variants if v["method"] == "phase"
                           and v["rule"] == c["rule"] and v["phase"] == name
                           and v["k"] == c["k"]]
    silent_v, decisive_v = picked("silent"), picked("decisive")
    silent = np.array([outcome(v) for v in silent_v])
    decisive = np.array([outcome(v) for v in decisive_v])
    assert len(silent) == len(decisive) == c["seeds"]
    assert silent.mean() - decisive.mean() == pytest.approx(c["difference"], abs=1e-12)
    if c["seeds"] > 1:  # the seed is the unit: sign flips of the per-seed differences
      d = silent.mean(1) - decisive.mean(1)
      p = scipy_stats.permutation_test((d,), np.mean, permutation_type="samples",
                                       n_resamples=np.inf).pvalue
    else:
      only_silent = int(np.sum((silent[0] == 1) & (decisive[0] == 0)))
      discordant = only_silent + int(np.sum((silent[0] == 0) & (decisive[0] == 1)))
      p = 1.0 if discordant == 0 else scipy_stats.binomtest(only_silent, discordant,
                                                             0.5).pvalue
    assert c["p"] == pytest.approx(p, rel=1e-9, abs=1e-300)
    key = (tuple(tuple(v["kept"]) for v in silent_v), tuple(tuple(v["kept"]) for v in decisive_v))
    name = f"{c['rule']} k={c['k']}"
    assert c["same_as"] == seen.get(key)
    if key not in seen:
      seen[key] = name
      distinct.append(name)
    ps[name] = p
  # The bundled model's Decisive Phase is blocks 15-16: adjacent_keep_last removes, at
  # k = 1, what adjacent removes (block 15 and block 1 ... the Silent arm's first block).
  assert any(c["same_as"] for c in comparisons)
  m, order, running = len(distinct), np.argsort([ps[d] for d in distinct]), 0.0
  holm = {}
  for rank, i in enumerate(order):
    running = max(running, min(1.0, (m - rank) * ps[distinct[i]]))
    holm[distinct[i]] = running
  for c in comparisons:
    expected = holm[c["same_as"] or f"{c['rule']} k={c['k']}"]
    assert c["holm_p"] == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_the_random_rule_is_tested_over_its_seeds(default_run):
  """The random rule's p is the exact sign-flip test's over its ten seeds (never below
  2 / 2^10, where McNemar on the items' majority outcomes went to 4e-58 on the default
  run), and each arm is compared with the unpruned model."""
  _, results = default_run
  (c,) = [c for c in results["phase_experiment"]["comparisons"]
          if c["rule"] == "random" and c["k"] == 1]
  assert "sign-flip" in c["test"] and c["seeds"] == 10
  assert c["p"] >= 2 / 2 ** 10 - 1e-12
  for arm in ("silent_drop", "decisive_drop"):
    drop = c[arm]
    assert drop["drop_ci95"][0] <= drop["drop"] <= drop["drop_ci95"][1]
    assert drop["non_inferior"] == (drop["drop_ci95"][1] <= results["settings"]["margin"])


def test_default_run_numbers_recomputed_with_hf(default_run):
  out, results = default_run
  with open(os.path.join(out, "items.jsonl")) as f:
    items = [json.loads(line) for line in f]
  arrays = np.load(os.path.join(out, "readouts.npz"))
  z, lse, answer = arrays["option_logits"], arrays["log_normalizer"], arrays["answer"]
  num_layers = results["model"]["num_layers"]
  full = results["full_model"]

  # The transition and the per-subject figures, from the arrays in plain numpy.
  p = np.exp(z.astype(np.float64) - lse[..., None])
  is_answer = np.arange(z.shape[-1]) == answer[:, None]
  dm = (p * is_answer).sum(-1) - np.where(is_answer, -np.inf, p).max(-1)
  mean = dm.mean(-1)
  above = [l for l in range(1, num_layers + 1) if all(mean[m] > 0 for m in range(l, num_layers + 1))]
  assert full["transition_block"] == (above[0] if above else None)
  subjects = np.array([it["subject"] for it in items])
  for subject, sub in full["by_subject"].items():
    rows = subjects == subject
    assert sub["num_items"] == int(rows.sum())
    assert sub["accuracy"] == pytest.approx(float((z[-1, rows].argmax(-1) == answer[rows]).mean()))
    np.testing.assert_allclose(sub["mean_decision_margin"], dm[:, rows].mean(-1), atol=1e-6)

  # Final-layer accuracy, unpruned and after the first Iterative Pruning step, by HF PyTorch.
  tokenizer = transformers.AutoTokenizer.from_pretrained(BUNDLED_MODEL)
  point = results["methods"]["iterative_accuracy"]["curve"][1]
  assert point["removed"] == 1
  for kept, want in ((list(range(1, num_layers + 1)), full["accuracy"][-1]),
                     (point["kept"], point["accuracy"])):
    hf = reference.delete_blocks(
        transformers.AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL, dtype=torch.float32),
        dpjax.keep_mask([b - 1 for b in kept], num_layers))
    correct = 0
    with torch.no_grad():
      for item in items:
        ids = tokenizer(item["prompt"], add_special_tokens=False)["input_ids"]
        logits = hf.eval()(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
        correct += int(int(torch.argmax(logits[item["letter_token_ids"]])) == item["answer"])
    assert correct / len(items) == pytest.approx(want, abs=1.0 / len(items) + 1e-9)


def test_decisive_only_searched_alone_equals_the_phase_aware_prefix(default_run, tmp_path):
  """Run alone, decisive_only searches the Decisive Phase itself: the same removals and
  the same curve as the prefix of phase_aware's search the default run reused."""
  _, results = default_run
  out = str(tmp_path / "alone")
  result = subprocess.run(
      [sys.executable, "-m", "dpjax.cli.study", "--num_items=64", "--calibration_items=16",
       "--methods=decisive_only", "--noprogress", f"--output_dir={out}"],
      capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(out, "results.json")) as f:
    alone = json.load(f)["methods"]["decisive_only"]
  derived = results["methods"]["decisive_only"]
  assert alone["curve_from"] == "searched"
  assert alone["removed_order"] == derived["removed_order"]
  assert [p["accuracy"] for p in alone["curve"]] == pytest.approx(
      [p["accuracy"] for p in derived["curve"]], abs=1e-9)
