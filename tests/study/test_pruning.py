"""The pruning engine: brute-force agreement, prefix sharing, baselines against torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import dpjax
from tests.support import reference
from dpjax.tasks import synthetic
from dpjax import tasks
from dpjax.study import pruning
from dpjax.engine.sweep import Sweep, final_stats


@pytest.fixture(scope="module")
def setup(synthetic_model_dir):
  tokenizer = transformers.AutoTokenizer.from_pretrained(synthetic_model_dir)
  items = synthetic.generate("test", 30)
  encoded = tasks.encode(tokenizer, items, [tasks.prompt(i) for i in items])
  model = dpjax.load_model(synthetic_model_dir)
  return model, encoded, synthetic_model_dir


def _brute_force_order(model, encoded, criterion):
  """Plain loop: every candidate one masked forward (full logits), numpy scoring."""
  batches = tasks.batches(encoded, 8)
  kept, order = list(range(model.num_layers)), []
  while len(kept) > 1:
    stats = {}
    for j in kept:
      keep = dpjax.keep_mask([b for b in kept if b != j], model.num_layers)
      z_all, lse_all, answers = [], [], []
      for b in batches:
        logits = np.asarray(model.logits(b.input_ids, keep=keep, attention_mask=b.attention_mask,
                                         gather=False))[:, -1].astype(np.float64)
        top = logits.max(-1, keepdims=True)
        lse = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
        z = np.take_along_axis(logits, np.maximum(b.letter_ids, 0), -1)
        rows = b.index >= 0
        z_all.append(np.where(b.letter_ids >= 0, z, -np.inf)[rows])
        lse_all.append(lse[rows])
        answers.append(b.answer[rows])
      s = final_stats(np.concatenate(z_all)[None], np.concatenate(lse_all)[None],
                      np.concatenate(answers))
      stats[j] = type(s)(*(x[0] for x in s))
    best = pruning.choose(stats, criterion)
    kept.remove(best)
    order.append(best)
  return order


@pytest.mark.parametrize("criterion", pruning.CRITERIA)
def test_iterative_pruning_picks_the_brute_force_sequence(setup, criterion):
  model, encoded, _ = setup
  order = pruning.iterative_prune(Sweep(model, encoded, batch_size=8), criterion=criterion)
  assert order == _brute_force_order(model, encoded, criterion)
  assert sorted(order) == sorted(set(order)) and len(order) == model.num_layers - 1


def _every_mask(num_layers):
  """Every mask that keeps at least one block, `[2^L - 1, L]`."""
  return np.array([[(m >> b) & 1 for b in range(num_layers)]
                   for m in range(1, 2 ** num_layers)], bool)


@pytest.mark.parametrize("final_only", [True, False])
@pytest.mark.parametrize("answer_format", ["letter", "cloze"])
def test_resumed_readouts_equal_fresh_ones(setup, answer_format, final_only):
  """Readouts that resume from the unpruned stream (each mask runs only its blocks after
  its first removed one; per layer, the layers before it are read once for all) equal a
  fresh forward per mask, for every mask (cloze: over packed sequences,
  log-probabilities too); they run fewer blocks."""
  model, encoded, directory = setup
  if answer_format == "cloze":
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    items = synthetic.generate("test", 11)
    encoded = tasks.encode_cloze(tokenizer, items, [tasks.cloze_requests(i) for i in items])
  masks = _every_mask(model.num_layers)
  resumed = Sweep(model, encoded, batch_size=4)
  fresh = Sweep(model, encoded, batch_size=4)
  a = resumed.readouts(masks, final_only=final_only)
  b = fresh.readouts(masks, final_only=final_only, resume=False)
  assert (a.option_logprob is None) == (answer_format == "letter")
  for got, want in zip(a, b):
    if want is not None:
      np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
      np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  read = np.isfinite(a.log_normalizer).all(-1)  # [M, L+1]: the layers read
  want = np.zeros_like(read)
  for m, mask in enumerate(masks):
    want[m, [int(np.flatnonzero(mask)[-1]) + 1] if final_only else
         [0] + [b + 1 for b in np.flatnonzero(mask)]] = True
  np.testing.assert_array_equal(read, want)
  # Per batch row: the trunk (the unpruned model's 4 blocks: the unpruned mask removes
  # none), then each mask's kept blocks after its first removed one (17 in all).
  first = [int(np.argmin(m)) if not m.all() else 4 for m in masks]
  tails = sum(int(m[d + 1:].sum()) for m, d in zip(masks, first))
  rows = len(resumed.batches) * 4
  assert resumed.counters.minimum == (max(first) + tails) * rows == 21 * rows
  assert fresh.counters.minimum == resumed.counters.naive == int(masks.sum()) * rows == 32 * rows


def test_prefix_shared_candidates_equal_plain_masked_evaluation(setup):
  model, encoded, _ = setup
  sweep = Sweep(model, encoded, batch_size=8)
  kept = [0, 1, 3]
  shared = sweep.drop_one(kept)
  masks = np.array([dpjax.keep_mask([b for b in kept if b != j], 4) for j in kept])
  readout = sweep.readouts(masks)
  for m, j in enumerate(kept):
    last = max(b for b in kept if b != j) + 1
    plain = final_stats(readout.option_logits[m, last][None], readout.log_normalizer[m, last][None],
                        encoded.answer)
    assert shared[j].correct == int(plain.correct[0])
    assert shared[j].margin_sum == pytest.approx(float(plain.margin_sum[0]), abs=1e-4)
    assert shared[j].nll_sum == pytest.approx(float(plain.nll_sum[0]), abs=1e-3)
  # Prefix sharing: dropping one of 4 blocks costs the current model's 4 blocks
  # plus 3 + 2 + 1 + 0 for the candidates, against 4 x 3 for fresh forwards.
  fresh = Sweep(model, encoded, batch_size=8)
  fresh.drop_one([0, 1, 2, 3])
  rows = len(fresh.batches) * 8
  assert fresh.counters.minimum == 10 * rows
  assert fresh.counters.naive == 12 * rows
  assert fresh.counters.executed == 10 * rows  # L=4: every bucket is exact


def test_early_stopping_changes_nothing_but_the_work(setup):
  model, encoded, _ = setup
  full = Sweep(model, encoded, batch_size=4)
  fast = Sweep(model, encoded, batch_size=4)
  everything = full.drop_one(list(range(4)))
  survivors = fast.drop_one(list(range(4)), stop_early=True)
  best = pruning.choose(everything, "accuracy")
  assert pruning.choose(survivors, "accuracy") == best
  for block, stats in survivors.items():
    assert stats == everything[block]  # survivors saw every item
  top = max(s.correct for s in everything.values())
  tied_or_better = {b for b, s in everything.items() if s.correct == top}
  assert tied_or_better <= set(survivors)


def _hf_hidden(model_dir, encoded):
  """HF residual streams `[L+1, T, d]` per prompt, all before the final norm."""
  hf = reference.load_hf(model_dir)
  captured = {}
  hook = hf.model.norm.register_forward_hook(
      lambda module, inputs, output: captured.update(pre_norm=inputs[0]))
  out = []
  for tokens in encoded.tokens:
    with torch.no_grad():
      res = hf(input_ids=torch.tensor([tokens]), output_hidden_states=True, use_cache=False)
    # HF's last entry is after the final norm; the residual before it is what BI compares.
    states = [h[0].double() for h in res.hidden_states[:-1]] + [captured["pre_norm"][0].double()]
    out.append(torch.stack(states))
  hook.remove()
  return out


def test_block_influence_and_angular_equal_torch_from_hf_hidden_states(setup):
  model, encoded, model_dir = setup
  hf_states = _hf_hidden(model_dir, encoded)
  # Independent: torch cosine over every token of every prompt, then mean.
  cos_sum = torch.zeros(model.num_layers, dtype=torch.float64)
  tokens = 0
  for h in hf_states:
    cos_sum += torch.nn.functional.cosine_similarity(h[:-1], h[1:], dim=-1).sum(-1)
    tokens += h.shape[1]
  want_bi = (1 - cos_sum / tokens).numpy()
  answer = torch.stack([h[:, -1] for h in hf_states], 1)  # [L+1, N, d]
  n = answer.shape[1]
  want_angle = np.zeros((model.num_layers + 1,) * 2)
  for i in range(model.num_layers + 1):
    for j in range(model.num_layers + 1):
      c = torch.nn.functional.cosine_similarity(answer[i], answer[j], dim=-1).clamp(-1, 1)
      want_angle[i, j] = float((torch.arccos(c) / np.pi).sum() / n)

  batches = tasks.batches(encoded, 8)
  answer_states = []

  def hidden():
    for b in batches:
      states = np.asarray(model.hidden_states(b.input_ids, attention_mask=b.attention_mask))
      rows = b.index >= 0
      answer_states.append(states[:, rows, -1])
      yield states[:, rows], b.attention_mask[rows]

  got_bi = pruning.block_influence(hidden())
  np.testing.assert_allclose(got_bi, want_bi, atol=1e-5)
  got_angle = pruning.angular_distances(np.concatenate(answer_states, 1))
  np.testing.assert_allclose(got_angle, want_angle, atol=1e-4)
  # The ranking and the chosen contiguous blocks follow.
  assert pruning.block_influence_ranking(got_bi)[0] == int(np.argmin(want_bi))
  starts = [want_angle[l - 1, l] for l in range(1, model.num_layers + 1)]
  assert pruning.angular_blocks(got_angle, 1) == [int(np.argmin(starts))]


def test_rankings_and_masks():
  assert pruning.reverse_ranking(4) == [3, 2, 1, 0]
  assert pruning.random_ranking(6, 1) == pruning.random_ranking(6, 1)
  assert sorted(pruning.random_ranking(6, 1)) == list(range(6))
  assert pruning.random_ranking(6, 1) != pruning.random_ranking(6, 2)
  masks = pruning.masks_from_ranking([2, 0, 1], 3)
  assert masks.tolist() == [[True, True, False], [False, True, False]]
  assert pruning.block_influence_ranking(np.array([0.3, 0.1, 0.1, 0.5])) == [2, 1, 0, 3]
  d = np.full((5, 5), 0.9)
  d[1, 3] = 0.1  # removing blocks 2..3 (1-based) keeps h_1 ~ h_3
  assert pruning.angular_blocks(d, 2) == [1, 2]


def test_phase_removals():
  bi = np.array([0.5, 0.1, 0.3, 0.2, 0.9, 0.05])
  arms = pruning.phase_removals(4, 6, "adjacent", bi)
  assert arms == {"silent": [2, 1, 0], "decisive": [3, 4, 5]}
  arms = pruning.phase_removals(4, 6, "redundant", bi)
  assert arms == {"silent": [1, 2, 0], "decisive": [5, 3, 4]}
  arms = pruning.phase_removals(4, 6, "random", bi, seed=3)
  assert sorted(arms["silent"]) == [0, 1, 2] and sorted(arms["decisive"]) == [3, 4, 5]


def test_collapse_point():
  # full 0.9, chance 0.25: threshold 0.575
  assert pruning.collapse_point([0, 1, 2, 3], [0.9, 0.8, 0.5, 0.7], 0.9, 0.25) == 2
  assert pruning.collapse_point([0, 1, 2], [0.9, 0.8, 0.6], 0.9, 0.25) is None


def test_bad_input(setup):
  model, encoded, _ = setup
  sweep = Sweep(model, encoded, batch_size=8)
  with pytest.raises(ValueError, match="mask 1 removes every block"):
    sweep.readouts(np.array([[1, 1, 1, 1], [0, 0, 0, 0]], bool))
  with pytest.raises(ValueError, match=r"candidates \[2\] are not in the kept set \[0, 1, 3\]"):
    sweep.drop_one([0, 1, 3], [2])
  with pytest.raises(ValueError, match="min_layers=5 must be between 1 and the model's 4 blocks"):
    pruning.iterative_prune(sweep, min_layers=5)
  with pytest.raises(ValueError, match="item set is empty"):
    Sweep(model, encoded.subset([]), batch_size=8)
  with pytest.raises(ValueError, match=r"masks must be \[M, 4\] booleans"):
    sweep.readouts(np.ones((2, 3), bool))


def test_compiled_programs_do_not_grow_with_pruning_steps():
  """An 8-block model pruned to one block: one stream program and one candidates program
  whatever the kept count (with 8 blocks every candidate of a step falls in a bucket of
  its own, so each runs alone), and a second full run compiles nothing new."""
  from flax import nnx
  from dpjax.engine.compilation import CompileCounter
  from dpjax.model.config import ModelConfig
  from dpjax.model.transformer import DecoderModel, Transformer
  cfg = ModelConfig(architecture="llama", vocab_size=600, hidden_size=32, intermediate_size=64,
                    num_layers=8, num_heads=2, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5,
                    rope_theta=1e4, max_position_embeddings=512)
  model = DecoderModel.from_module(Transformer(cfg, rngs=nnx.Rngs(0)))
  tokenizer = synthetic.build_tokenizer(synthetic.training_text(synthetic.generate("train", 300)), 512)
  items = synthetic.generate("test", 16)
  encoded = tasks.encode(tokenizer, items, [tasks.prompt(i) for i in items])
  sweep = Sweep(model, encoded, batch_size=16)
  counter = CompileCounter()
  first = pruning.iterative_prune(sweep)
  assert counter.programs == 2
  again = CompileCounter()
  assert pruning.iterative_prune(sweep) == first
  assert again.programs == 0
  assert sweep.counters.executed == sweep.counters.minimum  # L=8: every bucket exact


def test_masks_in_flight_change_the_memory_not_the_results(setup):
  """Masks run one at a time (or three) inside a call give the vmapped results; the
  program's working memory is one mask's, not the group's; and the work counted is each
  mask's own loop (one at a time: exactly the minimum)."""
  from dpjax.lens.readout import Reads, mask_steps, packing, shared_prefix
  from dpjax.engine.sweep import executed_steps
  model, encoded, _ = setup
  rng = np.random.default_rng(3)
  masks = rng.random((9, 4)) < 0.6
  masks[:, 0] |= ~masks.any(1)
  sweeps = {k: Sweep(model, encoded, batch_size=8, mask_chunk=8, in_flight=k) for k in (None, 1, 3)}
  outs = {k: s.readouts(masks) for k, s in sweeps.items()}
  drops = {k: s.drop_one([0, 1, 3]) for k, s in sweeps.items()}
  for k in (1, 3):
    for want, got in zip(outs[None], outs[k]):
      if want is not None:
        np.testing.assert_allclose(got, want, atol=2e-5, equal_nan=True)
    for block, stats in drops[None].items():
      assert drops[k][block].correct == stats.correct
      assert drops[k][block].margin_sum == pytest.approx(stats.margin_sum, abs=1e-4)
  assert executed_steps([3, 1, 2, 2], None) == 12 and executed_steps([3, 1, 2, 2], 1) == 8
  assert executed_steps([3, 1, 2, 2], 3) == 9 + 2
  one = sweeps[1].counters
  assert one.executed == one.minimum <= sweeps[None].counters.executed

  batch = sweeps[1].batches[0]
  index, valid = mask_steps(np.ones((8, 4), bool))
  args = (model.state, None, batch.input_ids, batch.attention_mask, Reads.of(batch),
          packing(batch), shared_prefix(batch), index, valid)
  temp = {k: s.reader._fns[False].lower(*args).compile().memory_analysis().temp_size_in_bytes
          for k, s in sweeps.items()}
  assert temp[1] * 4 < temp[None], temp


def test_phase_arms_sized_by_count_or_by_the_same_share_of_each_phase():
  assert pruning.phase_sizes(14, 2, "count") == [(1, 1, 1), (2, 2, 2)]
  # The same share of each phase: k / 2 of the smaller (Decisive) one, of the Silent too.
  assert pruning.phase_sizes(14, 2, "fraction") == [(1, 7, 1), (2, 14, 2)]
  assert pruning.phase_sizes(3, 9, "fraction") == [(1, 1, 3), (2, 2, 6), (3, 3, 9)]
  assert pruning.phase_sizes(14, 6, "count", max_k=2) == [(1, 1, 1), (2, 2, 2)]
  with pytest.raises(ValueError, match="phase_sizing='share'"):
    pruning.phase_sizes(3, 3, "share")
  # The controls keep the block they name out of their arm.
  orders = pruning.phase_removals(12, 16, "adjacent_keep_last", np.zeros(16))
  assert 15 not in orders["decisive"] and orders["decisive"] == [11, 12, 13, 14]
  orders = pruning.phase_removals(12, 16, "adjacent_keep_first", np.zeros(16))
  assert 0 not in orders["silent"] and orders["silent"][0] == 10 and orders["silent"][-1] == 1
