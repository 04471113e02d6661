"""The noise probe: residual noise as an input of the block scan, its engine, and the method.

Checked against independent numbers: a zero scale is the unnoised stream bit for bit;
a noised forward equals Hugging Face's Llama run in float64 with the same noise values
added after the same blocks by hooks; the noise does not depend on the batch or on the
other variants; and the study method records what it says on the bundled model.
"""

from __future__ import annotations

import functools
import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import dpjax
from dpjax import tasks
from dpjax.bundled import BUNDLED_MODEL
from dpjax.engine import noise as noise_engine
from dpjax.engine.sweep import Sweep
from dpjax.lens.readout import Lens, Reads
from dpjax.model.transformer import (ResidualNoise, add_residual_noise, noise_draw,
                                     noise_row_keys)
from dpjax.study import run as study
from dpjax.study.settings import Settings
from dpjax.tasks import synthetic


@pytest.fixture(scope="module")
def bundled():
  """The bundled model (float32), its tokenizer and 6 held-out synthetic items."""
  model = dpjax.load_model(BUNDLED_MODEL, dtype="float32")
  tokenizer = transformers.AutoTokenizer.from_pretrained(BUNDLED_MODEL)
  items = synthetic.generate("test", 6, seed=3)
  encoded = tasks.encode(tokenizer, items, [tasks.prompt(item) for item in items])
  return model, tokenizer, encoded


def _sweep(bundled, batch_size: int, in_flight: int | None = 1) -> Sweep:
  """A sweep of the 6 items; `in_flight` None vmaps every variant of a call (as on an
  accelerator), 1 runs them one after another (the CPU's default)."""
  model, tokenizer, encoded = bundled
  return Sweep(model, encoded, batch_size=batch_size, pad_id=tokenizer.pad_token_id,
               progress=False, in_flight=in_flight)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _final(graphdef, form: str, noised: bool, state, ids, mask, items, letters, scale):
  """The final residual `[B, T or 1, d]` and letter logits `[B, K]` of every block, in the
  mask form, the gather form, or the gather form reading the last column only."""
  module = nnx.merge(graphdef, state)
  num_layers = module.cfg.num_layers
  positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
  noise = ResidualNoise(scale, noise_row_keys(7, items), positions) if noised else None
  index = None if form == "mask" else jnp.arange(num_layers, dtype=jnp.int32)
  rows = jnp.full((ids.shape[0], 1), ids.shape[1] - 1, jnp.int32) if form == "rows" else None
  h, _, _ = module.run_blocks(ids, mask, index, jnp.ones(num_layers, bool), rows=rows,
                              noise=noise)
  lens = Lens("letter")
  return h, lens(module, lens.unembedding(module), h, Reads(letters), num_layers).option_logits


def test_zero_scale_is_the_unnoised_stream_bit_for_bit(bundled):
  model, tokenizer, encoded = bundled
  batch = tasks.batches(encoded, 8, tokenizer.pad_token_id)[0]
  args = (model.state, batch.input_ids, batch.attention_mask, batch.index, batch.letter_ids)
  zero = np.zeros(model.num_layers, np.float32)
  some = zero.copy()
  some[4] = np.sqrt(0.1)
  for form in ("mask", "rows"):  # the scan, and the gathered loop with its last block
    h, logits = _final(model.graphdef, form, False, *args, zero)
    h0, logits0 = _final(model.graphdef, form, True, *args, zero)
    assert np.array_equal(np.asarray(h), np.asarray(h0)), form
    assert np.array_equal(np.asarray(logits), np.asarray(logits0)), form
    # The same program with a scale after block 5 moves the stream.
    h5, _ = _final(model.graphdef, form, True, *args, some)
    assert not np.allclose(np.asarray(h5), np.asarray(h), atol=1e-3), form


def _hf_with_noise(hf, scale: np.ndarray, seed: int, item: int, tokens: list[int]):
  """HF's Llama `hf` (float64) on one unpadded prompt, with `h + eps * sigma(h) * z` added
  after every block whose scale is positive: `z` regenerated with jax.random from the same
  key (seed, item, block, position), the addition done in torch float64 by a hook."""
  key = noise_row_keys(seed, jnp.array([item]))[0]
  positions = jnp.arange(len(tokens), dtype=jnp.int32)
  draw = jax.jit(noise_draw, static_argnums=3)  # one program, not one per operation
  handles = []
  for b, layer in enumerate(hf.model.layers):
    eps = float(scale[b])
    if eps <= 0:
      continue
    z = torch.from_numpy(np.asarray(draw(key, b + 1, positions, hf.config.hidden_size),
                                    np.float64))

    def hook(module, inputs, output, eps=eps, z=z):
      h = output[0] if isinstance(output, tuple) else output
      noised = h + eps * h.std(dim=-1, unbiased=False, keepdim=True) * z[None]
      return (noised, *output[1:]) if isinstance(output, tuple) else noised

    handles.append(layer.register_forward_hook(hook))
  with torch.no_grad():
    logits = hf(input_ids=torch.tensor([tokens]), use_cache=False).logits[0, -1].numpy()
  for handle in handles:
    handle.remove()
  return logits


def test_a_noised_forward_equals_a_float64_recompute_with_the_same_noise(bundled):
  _, _, encoded = bundled
  sweep = _sweep(bundled, batch_size=4)  # 6 items: two left-padded batches
  num_layers = sweep.num_layers
  scales = np.zeros((2, num_layers), np.float32)
  scales[0, [1, 8]] = np.sqrt(0.2)        # after blocks 2 and 9
  scales[1, :] = np.sqrt(0.05)            # after every block
  seeds = np.array([3, 11])
  ours = noise_engine.noised_readouts(sweep, scales, seeds)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      BUNDLED_MODEL, dtype=torch.float64, attn_implementation="eager").eval()
  for v in range(2):
    for item in (0, 3, 5):
      letters = encoded.letter_ids[item, :encoded.num_options[item]]
      reference = _hf_with_noise(hf, scales[v], int(seeds[v]), item,
                                 list(encoded.tokens[item]))
      got = ours.option_logits[v, item, :len(letters)]
      want = reference[letters]
      np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max(), rtol=0)
  # The noise is not negligible here: the same items unnoised read other logits.
  clean = noise_engine.noised_readouts(sweep, np.zeros_like(scales[:1]), seeds[:1])
  assert np.abs(clean.option_logits[0] - ours.option_logits[0]).max() > 1e-2


def test_the_noise_does_not_depend_on_the_batch_or_the_other_variants(bundled):
  model, tokenizer, encoded = bundled
  num_layers, d = model.num_layers, model.config.hidden_size
  # The values added: the same (seed, item, block, position) in two different batches
  # (other rows beside it, other padding) gets the same draw, bit for bit.
  scale = np.full(num_layers, 0.5, np.float32)
  h = jnp.ones((3, 12, d), jnp.float32) * jnp.arange(d, dtype=jnp.float32)  # sigma > 0
  mask_a = np.zeros((3, 12), np.int32)
  mask_a[:, 2:] = 1                      # 10 tokens, left-padded by 2
  mask_b = np.zeros((3, 12), np.int32)
  mask_b[:, 5:] = 1                      # 7 tokens, left-padded by 5
  added = lambda items, mask: np.asarray(add_residual_noise(h, 4, ResidualNoise(
      jnp.asarray(scale), noise_row_keys(9, jnp.asarray(items)),
      jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0))) - h)
  a, b = added([4, 2, 0], mask_a), added([1, 2, 7], mask_b)
  # Item 2 is row 1 in both; its positions 0..6 are columns 2..8 in a and 5..11 in b.
  assert np.array_equal(a[1, 2:9], b[1, 5:12])
  assert not np.allclose(a[0, 2:9], b[0, 5:12])  # other items, other noise
  # Whole variants: batches of 4 and of 6, each variant alone or beside others, run one
  # after another or vmapped.
  scales = np.zeros((3, num_layers), np.float32)
  scales[0, :8] = np.sqrt(0.2)
  scales[1, 8:] = np.sqrt(0.2)
  scales[2, 3] = np.sqrt(0.5)
  seeds = np.array([0, 1, 2])
  together = noise_engine.noised_readouts(_sweep(bundled, 4), scales, seeds)
  alone = noise_engine.noised_readouts(_sweep(bundled, 6, in_flight=None), scales[2:],
                                       seeds[2:])
  scale_of = np.abs(together.option_logits[np.isfinite(together.option_logits)]).max()
  np.testing.assert_allclose(alone.option_logits[0], together.option_logits[2],
                             atol=1e-5 * scale_of, rtol=0)
  np.testing.assert_array_equal(alone.option_logits[0].argmax(-1),
                                together.option_logits[2].argmax(-1))


def test_a_shared_prefix_batch_runs_as_whole_prompts_in_parts(bundled):
  """Few-shot rows that share a prefix run whole (a row's noise is its own), in parts no
  larger in tokens than the shared batch, rows in order and none lost."""
  _, tokenizer, _ = bundled
  items = synthetic.generate("test", 12, seed=3)
  shots = tasks.shots_for(items, synthetic.generate("dev", 40, seed=3), 3)
  encoded = tasks.encode(tokenizer, items,
                         [tasks.prompt(item, shot) for item, shot in zip(items, shots)])
  shared = [b for b in tasks.batches(encoded, 8, tokenizer.pad_token_id, share_prefix=True)
            if b.prefix_ids is not None]
  assert shared
  for batch in shared:
    whole = batch.unshared()
    for data_size in (1, 2):
      parts = noise_engine.unshared_parts(batch, data_size)
      assert len(parts) > 1 and len({p.input_ids.shape for p in parts}) == 1
      rows, width = parts[0].input_ids.shape
      assert rows % data_size == 0
      assert rows * width <= batch.input_ids.size + batch.prefix_ids.size
      for name in ("input_ids", "attention_mask", "letter_ids", "answer", "index"):
        assert np.array_equal(np.concatenate([getattr(p, name) for p in parts]),
                              getattr(whole, name)), name
      assert all(p.prefix_ids is None for p in parts)


def test_the_method_on_the_bundled_model(tmp_path):
  out = tmp_path / "noise"
  results = study.run(Settings(methods=("noise",), num_items=24, calibration_items=16,
                               transition_items=64, noise_seeds=2, batch_size=4,
                               output_dir=str(out), progress=False))
  probe = results.noise_probe
  assert probe is not None and probe.skipped is None, getattr(probe, "skipped", None)
  with open(out / "results.json") as f:
    record = json.load(f)["noise_probe"]
  levels = [0.02, 0.05, 0.1, 0.2]
  l_star, num_layers = record["transition_block"], results.num_layers
  assert record["levels"] == levels and record["seeds"] == [0, 1]
  assert l_star == results.calibration_transition_block and 1 < l_star <= num_layers
  assert record["silent_phase"] == list(range(1, l_star))
  assert record["decisive_phase"] == list(range(l_star, num_layers + 1))
  for arm in ("silent", "decisive"):
    assert [a["level"] for a in record["arms"][arm]] == levels
    for a in record["arms"][arm]:
      assert len(a["seed_accuracies"]) == 2
      assert a["accuracy"] == pytest.approx(np.mean(a["seed_accuracies"]))
      assert a["accuracy_ci95"][0] <= a["accuracy"] <= a["accuracy_ci95"][1]
  assert [c["rule"] for c in record["comparisons"]] == [f"noise {lv:g}" for lv in levels]
  profile = np.array(record["profile"]["accuracy"], float)
  assert profile.shape == (num_layers, len(levels)) and np.isfinite(profile).all()

  with open(out / "variants.jsonl") as f:
    variants = [json.loads(line) for line in f]
  with open(out / "items.jsonl") as f:
    num_items = sum(1 for _ in f)
  noised = [v for v in variants if v["method"] == "noise"]
  assert len(noised) == 2 * len(levels) * 2 + num_layers * len(levels)
  outcome = lambda v: np.array([int(c) for c in v["correct"]])
  for v in noised:
    assert len(v["correct"]) == num_items == 24 and len(v["final_dm"]) == num_items
    assert v["kept"] == list(range(num_layers)) and v["level"] in levels
  arm_rows = lambda arm, level: [v for v in noised if v["phase"] == arm and v["level"] == level]
  for arm in ("silent", "decisive"):
    blocks = [b - 1 for b in record[f"{arm}_phase"]]
    for a in record["arms"][arm]:
      rows = sorted(arm_rows(arm, a["level"]), key=lambda v: v["seed"])
      assert [v["seed"] for v in rows] == [0, 1]
      assert all(v["noised_blocks"] == blocks for v in rows)
      assert [outcome(v).mean() for v in rows] == pytest.approx(a["seed_accuracies"])
  for block in range(1, num_layers + 1):
    for j, level in enumerate(levels):
      (row,) = arm_rows(block, level)
      assert row["noised_blocks"] == [block - 1]
      assert outcome(row).mean() == pytest.approx(profile[block - 1, j])
  # Each paired comparison's difference recomputes from the lines.
  for c, level in zip(record["comparisons"], levels):
    silent = np.array([outcome(v) for v in arm_rows("silent", level)])
    decisive = np.array([outcome(v) for v in arm_rows("decisive", level)])
    assert silent.mean() - decisive.mean() == pytest.approx(c["difference"], abs=1e-12)
  # The noise changes outcomes: at the highest level noise through the Silent Phase's
  # blocks costs accuracy that the lowest level does not.
  low, high = (np.array([outcome(v) for v in arm_rows("silent", lv)]) for lv in (0.02, 0.2))
  assert high.mean() < low.mean() - 0.1
  assert (high != low).any(axis=1).all()
  assert (out / "noise_by_phase.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  summary = (out / "summary.md").read_text()
  assert "Noise probe (l* = " in summary and "| 0.2 |" in summary
  assert "noise_by_phase.png" in (out / "summary.html").read_text()


def test_the_noise_flags_are_checked():
  assert Settings(noise_levels=("0.1", "0.3")).noise_levels == (0.1, 0.3)
  with pytest.raises(ValueError, match=r"noise_levels=\('0.1', 'x'\): give one or more "
                     r"distinct positive numbers .* --noise_levels=0.02,0.05,0.1,0.2"):
    Settings(noise_levels=("0.1", "x"))
  with pytest.raises(ValueError, match="noise_levels"):
    Settings(noise_levels=(0.1, 0.1))
  with pytest.raises(ValueError, match="noise_profile_seeds=-1 at least 0"):
    Settings(noise_profile_seeds=-1)
