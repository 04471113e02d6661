"""Few-shot prompts share their shots: a batch's common prefix runs once, exactly."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import dpjax
from tests.support import reference
from dpjax import tasks
from dpjax.model.plan import stacked_steps
from dpjax.engine.sweep import Sweep
from dpjax.tasks.encoding import MIN_SHARED_PREFIX, PREFIX_MULTIPLE, batches, prefix_groups


@pytest.fixture(scope="module")
def models(hf_checkpoint_dir):
  cache = {}

  def get(name):
    if name not in cache:
      cache[name] = dpjax.load_model(hf_checkpoint_dir(name), dtype="float32")
    return cache[name]

  return get


def _rows_and_whole(vocab: int, seed: int):
  """A prefix of 9 tokens (left-padded to 12) and three rows after it (8, 5 and 3 tokens,
  left-padded to 8), and the same prompts whole (left-padded to 17)."""
  rng = np.random.default_rng(seed)
  prefix = rng.integers(1, vocab, 9)
  rests = [rng.integers(1, vocab, n) for n in (8, 5, 3)]
  prefix_ids, prefix_mask = np.zeros(12, np.int32), np.zeros(12, np.int32)
  prefix_ids[3:], prefix_mask[3:] = prefix, 1
  ids, mask = np.zeros((3, 8), np.int32), np.zeros((3, 8), np.int32)
  whole_ids, whole_mask = np.zeros((3, 17), np.int32), np.zeros((3, 17), np.int32)
  for r, rest in enumerate(rests):
    ids[r, 8 - len(rest):], mask[r, 8 - len(rest):] = rest, 1
    full = np.concatenate([prefix, rest])
    whole_ids[r, 17 - len(full):], whole_mask[r, 17 - len(full):] = full, 1
  return (ids, mask, (jnp.asarray(prefix_ids), jnp.asarray(prefix_mask))), (whole_ids, whole_mask)


@pytest.mark.parametrize("variant", ["llama_gqa_tied_sharded", "mistral_window_head_dim",
                                     "gemma2_softcap_window", "gemma3_qk_norm_local_rope"])
def test_rows_after_a_shared_prefix_equal_the_whole_prompts(models, variant):
  """Every layer's residual at the rows' positions, the last block at read positions only,
  and an empty loop: the same as the whole prompts run row by row (sliding windows that
  reach into the prefix included), within float rounding: 1e-5 relative to the residual's
  largest entry (on the Gemma 3 fixture, whose residual reaches 22, three more padding
  columns alone move it by 1.7e-5)."""
  model = models(variant)
  module, L = model.module(), model.num_layers
  (ids, mask, prefix), (whole_ids, whole_mask) = _rows_and_whole(model.config.vocab_size, 3)
  read = lambda h: h[0] if isinstance(h, tuple) else h
  rows = np.array([[7, 6], [7, 4], [7, 5]], np.int32)
  take = lambda h: np.take_along_axis(np.asarray(h), rows[..., None], axis=1)
  for kept in ([0, 1, 2, 3], [0, 2], [3], [1, 2]):
    index, valid = (jnp.asarray(a[0]) for a in stacked_steps([kept], L))
    whole, _, whole_steps = module.run_blocks(whole_ids, whole_mask, index, valid,
                                              readout=lambda h, layer: h)
    shared, _, shared_steps = module.run_blocks(ids, mask, index, valid, prefix=prefix,
                                                readout=lambda h, layer: read(h))
    live = mask.astype(bool)
    want = np.asarray(whole)[:, 9:]
    tol = 1e-5 * max(1.0, float(np.abs(np.asarray(whole_steps)).max()))
    np.testing.assert_allclose(np.asarray(shared)[live], want[live], atol=tol, rtol=0,
                               err_msg=str(kept))
    for s in range(len(kept)):
      np.testing.assert_allclose(np.asarray(shared_steps[s])[live],
                                 np.asarray(whole_steps[s])[:, 9:][live], atol=tol, rtol=0)
    at_rows, _, _ = module.run_blocks(ids, mask, index, valid, prefix=prefix, rows=rows)
    np.testing.assert_allclose(at_rows, take(want), atol=tol, rtol=0)
  none, _, _ = module.run_blocks(ids, mask, index, jnp.zeros_like(valid), prefix=prefix,
                                 rows=rows)
  np.testing.assert_array_equal(none, take(module.embed_tokens(ids)))


def test_a_prefix_that_is_not_the_rows_own_changes_the_result(models):
  """The check above can fail: rows after another prefix give other states."""
  model = models("llama_gqa_tied_sharded")
  module = model.module()
  (ids, mask, (pids, pmask)), (whole_ids, whole_mask) = _rows_and_whole(
      model.config.vocab_size, 3)
  index, valid = (jnp.asarray(a[0]) for a in stacked_steps([[0, 1, 2, 3]], 4))
  whole, _, _ = module.run_blocks(whole_ids, whole_mask, index, valid)
  other = pids.at[5].set((pids[5] + 1) % model.config.vocab_size)
  shared, _, _ = module.run_blocks(ids, mask, index, valid, prefix=(other, pmask))
  live = mask.astype(bool)
  assert np.abs(np.asarray(shared)[live] - np.asarray(whole)[:, 9:][live]).max() > 1e-3
  with pytest.raises(ValueError, match="gather form"):
    module.run_blocks(ids, mask, None, jnp.ones(4, bool), prefix=(pids, pmask))
  with pytest.raises(ValueError, match="positions"):
    module.attention_context(mask, positions=jnp.zeros_like(mask), prefix_mask=pmask)


def _few_shot_task(tokenizer, k_shot: int):
  """The synthetic suite in the letter format with k shots per subject."""
  from dpjax.tasks import synthetic
  chosen = synthetic.generate("test", 40, seed=1)
  shots = tasks.shots_for(chosen, synthetic.generate("dev", 40, seed=1), k_shot)
  return tasks.encode(tokenizer, chosen, [tasks.prompt(i, s) for i, s in zip(chosen, shots)])


def test_few_shot_items_are_batched_by_their_shots(synthetic_model_dir):
  import transformers
  tokenizer = transformers.AutoTokenizer.from_pretrained(synthetic_model_dir)
  encoded = _few_shot_task(tokenizer, 3)
  groups, alone = prefix_groups(encoded.tokens)
  subjects = {encoded.items[i].subject for i in range(len(encoded.items))}
  assert len(groups) == len(subjects) and not alone
  for group in groups:
    assert len({encoded.items[i].subject for i in group}) == 1
  assert all(b.prefix_ids is None for b in batches(encoded, 8))  # off unless asked
  out = batches(encoded, 8, share_prefix=True)
  assert sorted(int(i) for b in out for i in b.index if i >= 0) == list(range(len(encoded.items)))
  # One prefix per subject, padded coarsely: few shapes to compile.
  assert len({b.prefix_ids.tobytes() for b in out}) == len(groups)
  assert all(b.prefix_ids.shape[0] % PREFIX_MULTIPLE == 0 for b in out)
  for batch in out:
    shared = int(batch.prefix_mask.sum())
    assert shared >= MIN_SHARED_PREFIX
    prefix = batch.prefix_ids[batch.prefix_mask.astype(bool)].tolist()
    for r, i in enumerate(batch.index):
      if i >= 0:
        rest = batch.input_ids[r][batch.attention_mask[r].astype(bool)].tolist()
        assert prefix + rest == list(encoded.tokens[i])
        whole = batch.unshared()  # the prompts whole again, left-padded
        assert whole.input_ids[r][whole.attention_mask[r].astype(bool)].tolist() == list(
            encoded.tokens[i])
        assert whole.attention_mask[r, -1] == 1
    assert whole.input_ids.shape[1] == -(-max(len(encoded.tokens[i]) for i in batch.index
                                              if i >= 0) // 32) * 32  # no wider than needed
  # Zero-shot prompts share only their header: batched as before.
  zero = _few_shot_task(tokenizer, 0)
  assert all(b.prefix_ids is None for b in batches(zero, 8, share_prefix=True))


def test_sweep_with_shared_shots_equals_the_unshared_sweep(synthetic_model_dir):
  """Per-layer readouts of several masks, final-only readouts and a drop-one step (the
  stream and its tails): shared and unshared agree within 1e-5; the shared batches hold
  fewer tokens."""
  import transformers
  tokenizer = transformers.AutoTokenizer.from_pretrained(synthetic_model_dir)
  model = dpjax.load_model(synthetic_model_dir)
  encoded = _few_shot_task(tokenizer, 3)
  plain = Sweep(model, encoded, batch_size=8, share_prefix=False)
  shared = Sweep(model, encoded, batch_size=8)
  assert all(b.prefix_ids is not None for b in shared.batches)
  assert (sum(b.input_ids.size for b in shared.batches)
          < 0.5 * sum(b.input_ids.size for b in plain.batches))
  masks = np.array([[1, 1, 1, 1], [1, 0, 1, 1], [0, 1, 1, 0]], bool)
  for final_only in (False, True):
    a = plain.readouts(masks, final_only=final_only)
    b = shared.readouts(masks, final_only=final_only)
    np.testing.assert_allclose(b.option_logits, a.option_logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(b.log_normalizer, a.log_normalizer, atol=1e-5, rtol=1e-5)
  for kept in ([0, 1, 2, 3], [0, 2, 3]):
    a, b = plain.drop_one(kept), shared.drop_one(kept)
    assert set(a) == set(b) == set(kept)
    for block in kept:
      assert int(a[block].correct) == int(b[block].correct)
      assert float(b[block].margin_sum) == pytest.approx(float(a[block].margin_sum), abs=1e-5)
      assert float(b[block].nll_sum) == pytest.approx(float(a[block].nll_sum), rel=1e-5)
  # Block evaluations: each readout call (per layer, final only) runs the unpruned trunk
  # (4 blocks) and the masks' tails after their first removed block (0 + 2 + 2); the
  # drop-one steps 4 + 6 and 3 + 3. A shared batch's prefix row counts once more.
  assert plain.counters.minimum == 32 * len(plain.batches) * 8
  assert shared.counters.minimum == 32 * len(shared.batches) * (8 + 1)
  assert shared.counters.executed >= shared.counters.minimum


def test_a_few_shot_study_gives_the_same_results_shared_or_not(synthetic_model_dir, tmp_path):
  """The whole study, 2-shot: the profile, Iterative Pruning and block influence (which
  runs whole prompts) agree with the unshared run, and with a run sharded over 8 devices."""
  from dpjax.study import run as study
  results = {}
  for share in (True, False):
    settings = study.Settings(model=synthetic_model_dir, k_shot=2, num_items=16,
                              calibration_items=8, batch_size=8, methods=("iterative",
                              "block_influence"), share_prefix=share, progress=False,
                              output_dir=str(tmp_path / str(share)))
    results[share] = study.run(settings)
    if share:  # the shots are long enough to be shared
      ctx = study.prepare(settings)
      for sweep in (ctx.eval_sweep, ctx.cal_sweep):
        shared = [i for b in sweep.batches if b.prefix_ids is not None for i in b.index if i >= 0]
        assert len(shared) >= 0.75 * len(sweep.encoded.items)
  a, b = results[True], results[False]
  np.testing.assert_allclose(a.full_model.accuracy, b.full_model.accuracy, atol=1e-9)
  np.testing.assert_allclose(a.block_influence, b.block_influence, atol=1e-5, rtol=1e-5)
  for name in ("iterative_accuracy", "block_influence"):
    assert a.methods[name].removal_order() == b.methods[name].removal_order()
    assert ([p.accuracy for p in a.methods[name].curve]
            == pytest.approx([p.accuracy for p in b.methods[name].curve], abs=1e-9))
  # Sharded: items over a data axis of 4, weights over a model axis of 2 (the prefix is
  # replicated on every device).
  import json
  import os
  import subprocess
  import sys
  out = str(tmp_path / "sharded")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  run = subprocess.run(
      [sys.executable, "-m", "dpjax.cli.study", f"--model={synthetic_model_dir}", f"--output_dir={out}",
       "--k_shot=2", "--num_items=16", "--calibration_items=8", "--batch_size=8",
       "--methods=iterative,block_influence", "--model_axis=2", "--noprogress"],
      capture_output=True, text=True, timeout=900, env=env)
  assert run.returncode == 0, run.stderr[-3000:]
  with open(os.path.join(out, "results.json")) as f:
    sharded = json.load(f)
  with open(os.path.join(tmp_path / "True", "results.json")) as f:
    single = json.load(f)
  for name, order in (("iterative_accuracy", "removed_order"), ("block_influence", "ranking")):
    assert sharded["methods"][name][order] == single["methods"][name][order]
    assert [p["accuracy"] for p in sharded["methods"][name]["curve"]] == pytest.approx(
        [p["accuracy"] for p in single["methods"][name]["curve"]], abs=1e-9)
  np.testing.assert_allclose(sharded["full_model"]["decision_margin"]["vocab"]["mean"],
                             single["full_model"]["decision_margin"]["vocab"]["mean"], atol=1e-5)
  assert sharded["full_model"]["accuracy"] == pytest.approx(single["full_model"]["accuracy"],
                                                            abs=1e-9)
