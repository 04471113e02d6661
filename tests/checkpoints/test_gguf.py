"""GGUF files in: weights, config and tokenizer from the file, against transformers' own loading.

The files are tiny random models written the way llama.cpp writes them
(`tests.support.reference.write_gguf`: q/k rows permuted on llama, Gemma norms as
`1 + w`, Q8_0 weights); the three real GGUF models are in test_real_models.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import dpjax
from tests.support import reference
from dpjax.checkpoints.convert import convert, load_tokenizer
from dpjax.checkpoints.export import export
from dpjax.checkpoints.hf import CheckpointError


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
  cache = {}

  def get(variant: str):
    if variant not in cache:
      directory = tmp_path_factory.mktemp(variant)
      path = str(directory / f"{variant}.gguf")
      reference.write_gguf(variant, path, seed=3)
      cache[variant] = path
    return cache[variant]

  return get


def _hf_from_gguf(path: str):
  return reference.load_hf_gguf(path, torch.float32)  # dense, as dpjax dequantizes


@pytest.mark.parametrize("variant", ["llama_gqa_tied_sharded", "gemma3_qk_norm_local_rope"])
def test_gguf_logits_equal_transformers_loading_the_same_file(tiny_gguf, variant):
  path = tiny_gguf(variant)
  model = dpjax.load_model(path)
  assert model.config.architecture == reference.VARIANTS[variant].family
  hf = _hf_from_gguf(path)
  ids, mask = reference.random_batch(model.config.vocab_size, 3, 11, seed=1, padding="left")
  real = mask.astype(bool)
  want, _ = reference.hf_forward(hf, ids, mask)
  got = np.asarray(model.logits(ids, attention_mask=mask))
  assert np.abs(got - want)[real].max() <= 1e-4
  keep = dpjax.keep_mask([0, 2, 3], model.num_layers)
  want, _ = reference.hf_forward(reference.delete_blocks(hf, keep), ids, mask)
  got = np.asarray(model.logits(ids, keep=keep, attention_mask=mask))
  assert np.abs(got - want)[real].max() <= 1e-4


def test_gguf_converts_and_exports_to_an_hf_checkpoint_without_gguf(tiny_gguf, tmp_path):
  path = tiny_gguf("gemma3_qk_norm_local_rope")
  result = subprocess.run([sys.executable, "-m", "checkpoints_convert.convert_cli",
                           f"--hf_model={path}", f"--output_dir={tmp_path / 'converted'}"],
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  converted = dpjax.load_model(str(tmp_path / "converted"))
  direct = dpjax.load_model(path)
  ids, mask = reference.random_batch(direct.config.vocab_size, 2, 9, seed=2, padding="left")
  np.testing.assert_array_equal(np.asarray(converted.logits(ids, attention_mask=mask)),
                                np.asarray(direct.logits(ids, attention_mask=mask)))
  assert load_tokenizer(str(tmp_path / "converted")).vocab_size == direct.config.vocab_size
  # A pruned export: a plain HF checkpoint (config.json + safetensors + tokenizer files).
  out = export(path, str(tmp_path / "pruned"), kept_blocks=[1, 2, 3])
  assert not any(name.endswith(".gguf") for name in os.listdir(out))
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
  hf = reference.load_hf(out)
  assert type(hf).__name__ == "Gemma3ForCausalLM" and len(hf.model.layers) == 3
  want, _ = reference.hf_forward(hf, ids, mask)
  got = np.asarray(direct.logits(ids, keep=dpjax.keep_mask([1, 2, 3], 4), attention_mask=mask))
  assert np.abs(got - want)[mask.astype(bool)].max() <= 1e-4


def test_unsupported_gguf_architecture_is_named(tmp_path):
  path = str(tmp_path / "mamba.gguf")
  reference.write_gguf("llama_gqa_tied_sharded", path, architecture="mamba")
  with pytest.raises(ValueError, match=r"general.architecture='mamba'.*gemma2, gemma3, llama, "
                                       r"qwen2, qwen3"):
    dpjax.load_model(path)


def test_unsupported_quantization_type_is_named(tmp_path):
  path = str(tmp_path / "q81.gguf")
  reference.write_gguf("llama_gqa_tied_sharded", path, raw_types={"blk.1.ffn_up.weight": "Q8_1"})
  with pytest.raises(ValueError, match=r"types \['Q8_1'\].*blk.1.ffn_up.weight.*supported: .*Q4_K"):
    dpjax.load_model(path)


def test_truncated_and_garbage_files_are_clear_errors_and_write_nothing(tiny_gguf, tmp_path):
  source = tiny_gguf("llama_gqa_tied_sharded")
  with open(source, "rb") as f:
    data = f.read()
  truncated = tmp_path / "truncated.gguf"
  truncated.write_bytes(data[:len(data) - 5000])
  garbage = tmp_path / "garbage.gguf"
  garbage.write_bytes(np.random.default_rng(0).bytes(4096))
  for path, match in ((truncated, "truncated"), (garbage, "not a GGUF file")):
    out = tmp_path / f"out_{path.stem}"
    with pytest.raises(CheckpointError, match=match):
      convert(str(path), str(out))
    assert not out.exists()
  with pytest.raises(CheckpointError, match="no GGUF file"):
    dpjax.load_model(str(tmp_path / "absent.gguf"))
