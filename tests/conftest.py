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
