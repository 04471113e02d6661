"""The generate format: every variant of a study judged by its greedy answers (exact
match, token F1), recomputed from HF's own greedy decoding with the blocks deleted and
with the noise probe's noise added by hooks, and scored by this file's own scorer."""

from __future__ import annotations

import collections
import json
import re
import string
import subprocess
import sys

import numpy as np
import pytest
import transformers

from dpjax.tasks import scoring
from tests.support import reference

NEW = 16  # dpjax.study.methods.OPEN_NEW_TOKENS


def _answer(text: str) -> str:
  """lm-eval's TriviaQA answer: the generation up to its first "\\n", "." or ","."""
  return re.split(r"[\n.,]", text, maxsplit=1)[0].strip()


def _em(text: str, golds) -> bool:
  drop = str.maketrans("", "", string.punctuation)
  return any(_answer(text).lower().translate(drop) == g.lower().translate(drop) for g in golds)


def _f1(text: str, golds) -> float:
  """SQuAD's evaluation script's F1, written out again."""
  def words(s):
    s = "".join(c for c in s.lower() if c not in set(string.punctuation))
    return " ".join(w for w in s.split() if w not in ("a", "an", "the")).split()
  scores = []
  for gold in golds:
    p, g = words(_answer(text)), words(gold)
    if not p or not g:
      scores.append(float(p == g))
      continue
    same = sum((collections.Counter(p) & collections.Counter(g)).values())
    scores.append(0.0 if same == 0 else 2 * same / (len(p) + len(g)))
  return max(scores)


def test_scoring_on_real_answers():
  """lm-eval's stops for the generate format, and SQuAD's F1, on answers as models give them."""
  stops = scoring.GENERATE_STOPS
  cases = [("The Eiffel Tower, in Paris.\n", ["Eiffel Tower"]),
           (" Paris. It is the capital", ["paris", "Paris, France"]),
           ("William Shakespeare wrote it\nQuestion:", ["Shakespeare", "William Shakespeare"]),
           ("1,000 metres", ["1000 metres"]),
           ("\n", ["anything"]),
           ("the United States of America", ["United States", "USA"])]
  for text, golds in cases:
    assert scoring.exact_match(text, golds, stops=stops) == _em(text, golds), text
    assert scoring.token_f1(text, golds, stops) == pytest.approx(_f1(text, golds)), text
  assert scoring.token_f1("the United States of America", ["United States"], stops) == \
      pytest.approx(2 * (2 / 4) * 1 / (2 / 4 + 1))
  assert scoring.exact_match("Paris. It is", ["paris"], stops=stops)
  assert not scoring.exact_match("Paris. It is", ["paris"])  # the open format: a newline only
  # The best constant answer: "paris" answers two of three items.
  assert scoring.constant_answer_share([["Paris"], ["paris", "x"], ["Rome"]]) == \
      pytest.approx(2 / 3)


def _hf_answers(model, tokenizer, prompts, scale=None, seed=0):
  out = []
  for i, prompt in enumerate(prompts):
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    tokens = reference.hf_noised_greedy(model, ids, NEW, scale, seed=seed, item=i,
                                        eos=tokenizer.eos_token_id)
    out.append(tokenizer.decode(tokens, skip_special_tokens=True))
  return out


def test_generate_study_judges_every_variant_by_its_answers(hf_checkpoint_dir, tmp_path):
  directory = hf_checkpoint_dir("llama_gqa_tied_sharded")
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  model = reference.load_hf(directory)
  rng = np.random.default_rng(0)
  questions = [" ".join(f"w{w}" for w in rng.integers(3, 97, size=4)) for _ in range(40)]
  # Half the golds are what the unpruned model answers (HF's greedy decoding), so its
  # exact match is known without dpjax; the rest are answers it does not give.
  prompts = [f"Question: {q}?\nAnswer:" for q in questions]
  answers = _hf_answers(model, tokenizer, prompts)
  rows = []
  for i, (q, a) in enumerate(zip(questions, answers)):
    # Otherwise one word the answer does not begin with, a different one per item (a
    # shared gold first token would be a constant guess as good as the model).
    other = next(f"w{3 + (i + j) % 94}" for j in range(94)
                 if not _answer(a).startswith(f"w{3 + (i + j) % 94}"))
    golds = [_answer(a)] if i % 2 == 0 and _answer(a) else [other]
    rows.append({"question": q, "question_id": f"q{i}",
                 "answer": {"aliases": golds, "value": golds[0]}})
  data = tmp_path / "data"
  split = data / "trivia_qa" / "rc.wikipedia.nocontext" / "validation"
  split.mkdir(parents=True)
  (split / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

  out = tmp_path / "out"
  result = subprocess.run(
      [sys.executable, "-m", "dpjax.cli.study", f"--model={directory}", "--task=triviaqa",
       f"--data_dir={data}", "--format=generate", f"--output_dir={out}", "--noprogress",
       "--methods=phase,noise", "--num_items=16", "--calibration_items=24",
       "--transition_rule=accuracy", "--phase_seeds=1", "--phase_selection=adjacent,random",
       "--noise_levels=0.5", "--noise_seeds=1", "--noise_profile_seeds=0", "--batch_size=8"],
      capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "greedy answers: exact match" in result.stdout
  with open(out / "results.json") as f:
    results = json.load(f)
  with open(out / "items.jsonl") as f:
    items = [json.loads(line) for line in f]
  with open(out / "variants.jsonl") as f:
    variants = [json.loads(line) for line in f]
  golds = [it["golds"] for it in items]
  evaluated = [it["prompt"] for it in items]
  assert len(items) == 16

  def judged(texts):
    return ("".join("1" if _em(t, g) else "0" for t, g in zip(texts, golds)),
            [_f1(t, g) for t, g in zip(texts, golds)])

  def check(record, texts):
    correct, f1 = judged(texts)
    assert record["correct"] == correct, record
    np.testing.assert_allclose(record["f1"], f1, atol=1e-4)

  unpruned = next(v for v in variants if v["method"] == "unpruned")
  hf_texts = _hf_answers(model, tokenizer, evaluated)
  check(unpruned, hf_texts)
  assert [it["generation"] for it in items] == hf_texts
  generation = results["full_model"]["generation"]
  assert generation["exact_match"] == pytest.approx(unpruned["correct"].count("1") / 16)
  assert generation["token_f1"] == pytest.approx(np.mean(unpruned["f1"]))
  assert 0 < generation["exact_match"] < 1  # half the golds are the model's own answers
  constant = collections.Counter(g.lower() for gs in golds for g in set(gs))
  assert generation["chance"] == pytest.approx(max(constant.values()) / 16)

  # Two pruned variants of the phase experiment, through HF with their blocks deleted.
  phase = results["phase_experiment"]
  assert "skipped" not in phase, phase
  pruned = [v for v in variants if v["method"] == "phase"]
  assert pruned and all("f1" in v for v in pruned)
  for record in {tuple(v["kept"]): v for v in pruned}.values():
    keep = np.zeros(4, bool)
    keep[record["kept"]] = True
    hf = reference.delete_blocks(reference.load_hf(directory), keep)
    check(record, _hf_answers(hf, tokenizer, evaluated))
  # The arms' accuracies are their variants' exact matches.
  arm = phase["selections"]["adjacent"]["silent"][0]
  record = next(v for v in pruned if v["rule"] == "adjacent" and v["phase"] == "silent"
                and v["k"] == arm["k"])
  assert arm["accuracy"] == pytest.approx(record["correct"].count("1") / 16)

  # Each noised variant: HF with the same noise added by hooks (the item's index keys it).
  noised = [v for v in variants if v["method"] == "noise"]
  assert {v["phase"] for v in noised} == {"silent", "decisive"}
  for record in noised:
    scale = np.zeros(4, np.float32)
    scale[record["noised_blocks"]] = np.sqrt(record["level"])
    check(record, _hf_answers(model, tokenizer, evaluated, scale, record["seed"]))
  summary = (out / "summary.md").read_text()
  assert (f"greedy answers (unpruned {generation['exact_match']:.3f}, token F1 "
          f"{generation['token_f1']:.3f}") in summary

