"""The README says what the committed default run's files say."""

from __future__ import annotations

import json
import os

import numpy as np

from dpjax.bundled import BUNDLED_MODEL
from dpjax.report import claim, headline

ROOT = os.path.dirname(os.path.dirname(BUNDLED_MODEL))
RUN = os.path.join(BUNDLED_MODEL, "default_run")


def _results():
  with open(os.path.join(RUN, "results.json")) as f:
    return json.load(f)


def test_the_readme_block_is_generated_from_the_committed_default_run():
  readme = os.path.join(ROOT, "README.md")
  with open(readme) as f:
    text = f.read()
  assert headline.update_readme(readme, os.path.join(RUN, "results.json")) == text, (
      "README.md's headline differs from the committed default run: run "
      "`python -m dpjax.report.headline`")
  block = " ".join(text.split(headline.BEGIN)[1].split(headline.END)[0].split())
  assert "l* =" in block and "class this run as" in block
  # The report's word for the transition is the README's.
  word = headline.transition_word(_results())
  with open(os.path.join(RUN, "summary.md")) as f:
    assert f"Transition: {word}." in f.read()
  assert f"a {word} transition" in block


def test_the_committed_default_run_recomputes_from_its_variants():
  """Every comparison and accuracy in the committed results.json recomputes from the
  committed variants.jsonl (the files the README's numbers come from)."""
  results = _results()
  variants = claim.read_variants(RUN)
  with open(os.path.join(RUN, "items.jsonl")) as f:
    items = [json.loads(line) for line in f]
  assert len(items) == results["task"]["num_items"]
  unpruned = next(v for v in variants if v["method"] == "unpruned")
  accuracy = np.mean([c == "1" for c in unpruned["correct"]])
  assert accuracy == results["full_model"]["accuracy"][-1] or abs(
      accuracy - results["full_model"]["accuracy"][-1]) < 1e-6
  recorded = results["phase_experiment"]["comparisons"]
  recomputed = claim.phase_comparisons(variants, results, results["settings"]["margin"])
  assert [(c["rule"], c["k"]) for c in recorded] == [(c.rule, c.k) for c in recomputed]
  for r, c in zip(recorded, recomputed):
    assert abs(r["difference"] - c.difference) < 1e-12 and abs(r["p"] - c.p) <= 1e-12 * c.p
    assert r["holm_p"] == c.holm_p and r["verdict"] == c.verdict and r["same_as"] == c.same_as
  # The random rule at k = 1: its seeds split between variants; the sign-flip test's p.
  (random_1,) = [c for c in recomputed if c.rule == "random" and c.k == 1]
  assert "sign-flip" in random_1.test and random_1.p > 1e-3
  noise = results["noise_probe"]["comparisons"]
  again = claim.noise_comparisons(variants, results, results["settings"]["margin"])
  assert [round(c["difference"], 12) for c in noise] == [round(c.difference, 12) for c in again]
  assert [c["p"] for c in noise] == [c.p for c in again]
