"""Shared fixtures: tiny HF checkpoints on disk, built once per test session."""

from __future__ import annotations

import pytest

from tests.support import reference


@pytest.fixture(scope="session")
def hf_checkpoint_dir(tmp_path_factory):
  """`hf_checkpoint_dir(name)` -> directory of variant `name`, saved once."""
  cache: dict[str, str] = {}

  def get(name: str) -> str:
    if name not in cache:
      directory = str(tmp_path_factory.mktemp(name))
      cache[name] = reference.save_variant(name, directory)
    return cache[name]

  return get


@pytest.fixture(scope="session")
def synthetic_model_dir(tmp_path_factory):
  """A random 4-block Llama with a tokenizer trained on the synthetic suite."""
  from dpjax.tasks import synthetic
  directory = str(tmp_path_factory.mktemp("synthetic_model"))
  tokenizer = synthetic.build_tokenizer(
      synthetic.training_text(synthetic.generate("train", 400)), 400)
  config = dict(reference.VARIANTS["llama_gqa_tied_sharded"].config, vocab_size=len(tokenizer),
                tie_word_embeddings=False, max_position_embeddings=256)
  reference.build_hf_model("llama", config, seed=5).save_pretrained(directory)
  tokenizer.save_pretrained(directory)
  return directory


def pytest_configure(config):
  """A persistent compilation cache shared by this session, its workers and subprocesses,
  and kept between runs (`~/.cache/dpjax/test-xla-cache`, or `$JAX_COMPILATION_CACHE_DIR`).

  The end-to-end tests start `dpjax` several times on the same tiny model, and most
  tests compile the programs an earlier run compiled: with the cache, only the first
  start pays for XLA compilation. Entries are keyed by the program, the JAX version and
  the flags, so a changed program compiles afresh.
  """
  import os
  cache = os.environ.setdefault(
      "JAX_COMPILATION_CACHE_DIR",
      os.path.join(os.path.expanduser("~"), ".cache", "dpjax", "test-xla-cache"))
  os.makedirs(cache, exist_ok=True)
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  reference.cache_gguf_metadata()
  import jax
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
