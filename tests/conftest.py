"""Shared fixtures: tiny HF checkpoints on disk, built once per test session."""

from __future__ import annotations

import pytest

from dpjax import hf_reference


@pytest.fixture(scope="session")
def hf_checkpoint_dir(tmp_path_factory):
  """`hf_checkpoint_dir(name)` -> directory of variant `name`, saved once."""
  cache: dict[str, str] = {}

  def get(name: str) -> str:
    if name not in cache:
      directory = str(tmp_path_factory.mktemp(name))
      cache[name] = hf_reference.save_variant(name, directory)
    return cache[name]

  return get


@pytest.fixture(scope="session")
def synthetic_model_dir(tmp_path_factory):
  """A random 4-block Llama with a tokenizer trained on the synthetic suite."""
  from dpjax import synthetic
  directory = str(tmp_path_factory.mktemp("synthetic_model"))
  tokenizer = synthetic.build_tokenizer(
      synthetic.training_text(synthetic.generate("train", 400)), 400)
  config = dict(hf_reference.VARIANTS["llama_gqa_tied_sharded"].config, vocab_size=len(tokenizer),
                tie_word_embeddings=False)
  hf_reference.build_hf_model("llama", config, seed=5).save_pretrained(directory)
  tokenizer.save_pretrained(directory)
  return directory
