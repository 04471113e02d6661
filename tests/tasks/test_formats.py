"""The cloze and open answer formats: against an independent HF PyTorch computation of
lm-eval's scoring, item by item; packed sequences against separate ones; the sweep
engine in each format; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import transformers

import dpjax
from tests.support import real_models
from tests.support import reference
from dpjax import tasks
from dpjax.study import metrics
from dpjax.lens.readout import DecisionReader, Lens
from dpjax.engine.sweep import Sweep
from dpjax.tasks import synthetic
from dpjax.tasks.benchmarks import default_data_dir
from dpjax.tasks.fetch import fetch_benchmarks


@pytest.fixture(scope="module")
def random_model(synthetic_model_dir):
  return (dpjax.load_model(synthetic_model_dir),
          transformers.AutoTokenizer.from_pretrained(synthetic_model_dir),
          reference.load_hf(synthetic_model_dir))


def _cloze_items():
  """Synthetic items (default template, one shot), plus one whose options have contexts
  of their own and share their continuation (WinoGrande's partial scoring)."""
  items = synthetic.generate("test", 11)
  shots = tasks.shots_for(items, synthetic.generate("dev", 20), 1)
  wino = tasks.Item("wino", "Fill in the blank", ("red", "blue"), 1,
                    cloze_contexts=("The sky is red", "The sky is blue"),
                    cloze_continuations=(" on a clear day.", " on a clear day."))
  return items + [wino], shots + [[]]


def _reference_scores(hf, tokenizer, items, requests, layers=False):
  """lm-eval's scores, option by option, as `[.., N, K]` sums and `[N, K]` byte lengths."""
  kmax = max(item.num_options for item in items)
  shape = (len(hf.model.layers) + 1,) if layers else ()
  sums = np.full(shape + (len(items), kmax), -np.inf)
  lengths = np.ones((len(items), kmax))
  for i, (item, reqs) in enumerate(zip(items, requests)):
    scores, _ = reference.lm_eval_cloze_scores(hf, tokenizer, reqs, layers=layers)
    sums[..., i, :len(reqs)] = scores
    lengths[i, :len(reqs)] = [len(c[1:].encode()) for _, c in reqs]
  return sums, lengths


def test_cloze_readouts_equal_lm_eval_scoring_at_every_layer(random_model):
  model, tokenizer, hf = random_model
  items, shots = _cloze_items()
  requests = [tasks.cloze_requests(item, sh) for item, sh in zip(items, shots)]
  encoded = tasks.encode_cloze(tokenizer, items, requests)
  want, lengths = _reference_scores(hf, tokenizer, items, requests, layers=True)
  for norm in ("none", "bytes"):
    out = DecisionReader(model, lens=Lens("cloze", norm)).run(encoded, batch_size=4,
                                                              progress=False)
    got = out.option_logprob[0]
    real = np.isfinite(want)
    assert np.abs(got[real] - want[real]).max() <= 1e-4
    scores = want if norm == "none" else want / lengths
    np.testing.assert_allclose(out.option_logits[0][real], scores[real], atol=1e-4, rtol=0)
    # The final layer's choice is lm-eval's (acc, or acc_norm with bytes), item by item.
    assert out.option_logits[0, -1].argmax(-1).tolist() == scores[-1].argmax(-1).tolist()
  # The vocab probability is the continuation's probability; the options one renormalizes.
  prof = metrics.profile(out.option_logits[0], out.log_normalizer[0], encoded.answer,
                         encoded.num_options, option_logprob=out.option_logprob[0])
  p = np.exp(want[-1])
  is_answer = np.arange(p.shape[-1]) == encoded.answer[:, None]
  dm = (p * is_answer).sum(-1) - np.where(is_answer, -np.inf, p).max(-1)
  np.testing.assert_allclose(np.asarray(prof.margin["vocab"])[-1], dm, atol=1e-6)


def test_packed_sequences_cost_one_context_plus_the_continuations(random_model):
  model, tokenizer, _ = random_model
  items, shots = _cloze_items()
  requests = [tasks.cloze_requests(item, sh) for item, sh in zip(items, shots)]
  encoded = tasks.encode_cloze(tokenizer, items, requests)
  for i, reqs in enumerate(requests[:-1]):
    context = tokenizer(reqs[0][0], add_special_tokens=False)["input_ids"]
    whole = [tokenizer(c + x, add_special_tokens=False)["input_ids"] for c, x in reqs]
    own = sum(len(w) - len(context) for w in whole)
    # The context once, each continuation once (its first tokens may be shared too).
    assert len(encoded.tokens[i]) <= len(context) + own
    assert len(encoded.tokens[i]) < sum(len(w) for w in whole)
  assert encoded.layouts[-1].segments.count(0) < len(encoded.tokens[-1])


def test_cloze_sweep_equals_plain_masked_readouts(random_model):
  """Drop-one candidates (prefix sharing over packed sequences) give what a fresh
  readout of each candidate gives."""
  model, tokenizer, _ = random_model
  items, shots = _cloze_items()
  encoded = tasks.encode_cloze(tokenizer, items, [tasks.cloze_requests(item, sh)
                                                  for item, sh in zip(items, shots)])
  sweep = Sweep(model, encoded, batch_size=4)
  kept = [0, 1, 2, 3]
  stats = sweep.drop_one(kept)
  masks = np.array([[b != j for b in range(4)] for j in kept])
  readout = sweep.readouts(masks)
  for m, j in enumerate(kept):
    z = readout.option_logits[m, -1 if j != 3 else 3]
    assert stats[j].correct == int((z.argmax(-1) == encoded.answer).sum())
    p = np.exp(readout.option_logprob[m, -1 if j != 3 else 3].astype(np.float64))
    is_answer = np.arange(p.shape[-1]) == encoded.answer[:, None]
    dm = (p * is_answer).sum(-1) - np.where(is_answer, -np.inf, p).max(-1)
    assert stats[j].margin_sum == pytest.approx(dm.sum(), abs=1e-6)


def test_open_readout_margins_equal_numpy(random_model):
  """`DM = max_{g in G} p(g) - max_{v not in G} p(v)` at the answer position, by layer."""
  model, tokenizer, hf = random_model
  items = [tasks.Item(f"q{i}", f"What is {a} + 1?", (), -1, golds=(str(a + 1), f"{a + 1}.0"),
                      cloze_contexts=(f"Q: What is {a} + 1?\nA:",))
           for i, a in enumerate((10, 11, 19, 20, 28, 29, 37, 38))]
  prompts = [tasks.open_prompt(item) for item in items]
  encoded = tasks.encode_open(tokenizer, items, prompts)
  out = DecisionReader(model, lens=Lens("open")).run(encoded, batch_size=4, progress=False)
  prof = metrics.profile(out.option_logits[0], out.log_normalizer[0], encoded.answer,
                         encoded.num_options, chance=0.0)
  import torch
  golds = []
  for i, item in enumerate(items):
    ids = tokenizer(prompts[i], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
      res = hf(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
      states = [hf.lm_head(hf.model.norm(h[0, -1])) for h in res.hidden_states[:-1]]
    logits = np.stack([s.numpy() for s in states] + [res.logits[0, -1].numpy()]).astype(np.float64)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    gold = sorted({tokenizer(prompts[i] + " " + g, add_special_tokens=False)["input_ids"][len(ids)]
                   for g in item.golds})
    assert encoded.letter_ids[i][encoded.letter_ids[i] >= 0].tolist() == gold
    in_gold = np.isin(np.arange(p.shape[-1]), gold)
    dm = p[:, in_gold].max(-1) - p[:, ~in_gold].max(-1)
    np.testing.assert_allclose(np.asarray(prof.margin["vocab"])[:, i], dm, atol=1e-5)
    top_in_gold = np.isin(logits.argmax(-1), gold)
    assert (np.asarray(prof.top)[:, i] == 0).tolist() == top_in_gold.tolist()
    golds.append(gold)
  # Chance is the best constant guess: the token that begins a gold answer most often.
  best = max(sum(token in gold for gold in golds) for gold in golds for token in gold)
  assert encoded.chance == pytest.approx(best / len(items))
  first_two = encoded.subset([0, 1])
  assert first_two.chance == (1.0 if set(golds[0]) & set(golds[1]) else 0.5)
  assert tasks.encode(tokenizer, [synthetic.generate("test", 1)[0]], ["Q"]).chance is None


def test_bad_input_in_the_new_formats_is_named(random_model):
  _, tokenizer, _ = random_model
  item = tasks.Item("empty", "Pick", ("a", "b"), 0, cloze_contexts=("Pick:",),
                    cloze_continuations=(" a", ""))
  with pytest.raises(tasks.TaskDataError, match=r"item 'empty': option B's continuation ''"):
    tasks.encode_cloze(tokenizer, [item], [tasks.cloze_requests(item)])
  with pytest.raises(tasks.TaskDataError, match="at least one"):
    from dpjax.tasks.benchmarks import parse_nq_open
    parse_nq_open({"question": "who?", "answer": []}, "nq_open (split validation)", 4)
  mc = synthetic.generate("test", 1)[0]
  with pytest.raises(tasks.TaskDataError, match="open format needs an open-ended task"):
    tasks.open_prompt(mc)
  open_item = tasks.Item("o", "q", (), -1, golds=("4", " "), cloze_contexts=("Q: q?\nA:",))
  with pytest.raises(tasks.TaskDataError, match=r"item 'o' has an empty gold answer"):
    tasks.encode_open(tokenizer, [open_item], ["Q: q?\nA:"])
  with pytest.raises(tasks.TaskDataError, match="has no gold answers"):
    tasks.encode_open(tokenizer, [mc], ["Q"])


# ----------------------------------------------------------------------------
# Real data and a real model.


@pytest.fixture(scope="module")
def data_dir():
  directory = default_data_dir()
  fetch_benchmarks(directory)  # once; later runs find the copies
  return directory


def test_benchmark_quirks_on_real_rows(data_dir):
  arc = tasks.load_task("arc_easy", "validation", data_dir=data_dir)
  assert len(arc) == 570
  assert sorted({item.num_options for item in arc}) == [3, 4, 5]
  digit = [item for item in arc if item.id == "NYSEDREGENTS_2015_4_8"]
  assert not digit or digit[0].options  # a digit-keyed row parses like the others
  assert arc[0].cloze_contexts == ("Question: Which technology was developed most recently?"
                                   "\nAnswer:",)
  assert arc[0].options[arc[0].answer] == "cellular telephone"
  sciq = tasks.load_task("sciq", "validation", data_dir=data_dir)
  answers = [item.answer for item in sciq]
  assert len(set(answers)) == 4 and max(np.bincount(answers)) < 0.4 * len(sciq)  # shuffled
  assert sciq[0].options[sciq[0].answer] == "darwin"
  assert sciq[0].cloze_contexts[0] == ("\nQuestion: Who proposed the theory of evolution by "
                                       "natural selection?\nAnswer:")
  # SciQ open-ended: the same items, the correct option the one gold to generate.
  sciq_open = tasks.load_task("sciq_open", "validation", data_dir=data_dir)
  assert [i.id for i in sciq_open] == [i.id for i in sciq]
  assert all(o.golds == (m.options[m.answer],) and o.cloze_contexts == m.cloze_contexts
             and not o.options for o, m in zip(sciq_open[:50], sciq[:50]))
  assert tasks.resolve_task("sciq_open").formats == ("open", "generate")
  piqa = tasks.load_task("piqa", "validation", data_dir=data_dir)
  assert {item.num_options for item in piqa} == {2} and len(piqa) == 1838
  hella = tasks.load_task("hellaswag", "validation", data_dir=data_dir)
  assert hella[0].cloze_contexts[0] == ("Roof shingle removal: A man is sitting on a roof. He")
  assert not any("[" in c for item in hella[:200] for c in item.cloze_continuations)
  wino = tasks.load_task("winogrande", "validation", data_dir=data_dir)
  assert wino[0].cloze_contexts == (
      "Sarah was a much better surgeon than Maria so Sarah",
      "Sarah was a much better surgeon than Maria so Maria")
  assert wino[0].cloze_continuations == (" always got the easier cases.",) * 2
  assert wino[0].answer == 1
  mmlu_dev = tasks.load_task("mmlu", "dev", data_dir=data_dir)
  assert len(mmlu_dev) == 285 and len({item.subject for item in mmlu_dev}) == 57
  test = tasks.load_task("mmlu", "test", data_dir=data_dir)[:3]
  shots = tasks.shots_for(test, mmlu_dev, 5)
  assert [s.id for s in shots[0]] == [f"abstract_algebra/{i}" for i in range(5)]
  assert tasks.prompt(test[0], shots[0]).startswith(
      "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
      "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\n"
      "Answer: B\n\n")
  nq = tasks.load_task("nq_open", "validation", data_dir=data_dir)
  assert nq[0].golds == ("14 December 1972 UTC", "December 1972")
  assert tasks.open_prompt(nq[0]) == ("Answer these questions:\n\nQ: when was the last time "
                                      "anyone was on the moon?\nA:")
  trivia = tasks.load_task("triviaqa", "validation", data_dir=data_dir)
  assert "Sunset Boulevard" in trivia[0].golds
  with pytest.raises(tasks.TaskDataError, match="has no split 'train'"):
    tasks.load_task("piqa", "train", data_dir=data_dir)


def test_cloze_choices_on_smollm2_equal_lm_eval(data_dir):
  """SmolLM2-135M on the first ARC-Easy items: the final layer's choices equal lm-eval's
  scoring of the same model (transformers loading the same GGUF), both normalizations."""
  import os
  import torch
  path = real_models.fetch("smollm2")
  model = dpjax.load_model(path)
  tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                         gguf_file=os.path.basename(path))
  hf = reference.load_hf_gguf(path, torch.float32)  # dense, as dpjax dequantizes
  items = tasks.load_task("arc_easy", "validation", data_dir=data_dir)[:8]
  requests = [tasks.cloze_requests(item) for item in items]
  encoded = tasks.encode_cloze(tokenizer, items, requests)
  want, lengths = _reference_scores(hf, tokenizer, items, requests)
  for norm, scores in (("none", want), ("bytes", want / lengths)):
    # The last layer only, as every sweep reads it (the last block only where read).
    out = DecisionReader(model, lens=Lens("cloze", norm)).run(encoded, batch_size=8,
                                                              progress=False, final_only=True)
    assert out.option_logits[0, -1].argmax(-1).tolist() == scores.argmax(-1).tolist()
    real = np.isfinite(want)
    assert np.abs(out.option_logprob[0, -1][real] - want[real]).max() <= 1e-3


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_last_block_at_the_read_positions_only_changes_nothing(random_model, tmp_path, family):
  """Final readouts whose last block runs its attention output and MLP only where the lens
  reads equal the whole computation, in every format, for plain masks and for drop-one
  candidates (whose tail may be empty), on Llama and on Gemma 3 (sliding windows, local
  rope, soft-capping)."""
  model, tokenizer, _ = random_model
  if family == "gemma3":
    config = dict(reference.VARIANTS["gemma3_qk_norm_local_rope"].config,
                  vocab_size=len(tokenizer), max_position_embeddings=256)
    reference.build_hf_model("gemma3_text", config, seed=4).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = dpjax.load_model(str(tmp_path))
  items, shots = _cloze_items()
  letter_items = items[:-1]
  opens = [tasks.Item(f"q{i}", f"What is {a} + 1?", (), -1, golds=(str(a + 1),),
                      cloze_contexts=(f"Q: What is {a} + 1?\nA:",))
           for i, a in enumerate(range(10, 16))]
  encoded = {
      "letter": tasks.encode(tokenizer, letter_items, [tasks.prompt(i) for i in letter_items]),
      "cloze": tasks.encode_cloze(tokenizer, items, [tasks.cloze_requests(item, sh)
                                                     for item, sh in zip(items, shots)]),
      "open": tasks.encode_open(tokenizer, opens, [tasks.open_prompt(i) for i in opens]),
  }
  masks = np.array([[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 0], [0, 0, 1, 0]], bool)
  for fmt, enc in encoded.items():
    runs = {at: Sweep(model, enc, batch_size=4, last_at_reads=at) for at in (True, False)}
    fast, full = (runs[at].readouts(masks, final_only=True) for at in (True, False))
    for a, b in zip(fast, full):
      if b is not None:
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0, equal_nan=True, err_msg=fmt)
    fast, full = (runs[at].drop_one([0, 2, 3]) for at in (True, False))
    for block, stats in full.items():
      assert fast[block].correct == stats.correct, (fmt, block)
      assert fast[block].margin_sum == pytest.approx(stats.margin_sum, abs=1e-5)
      assert fast[block].nll_sum == pytest.approx(stats.nll_sum, abs=1e-4)
