"""Atomic outputs: all or nothing, with ordinary permissions."""

from __future__ import annotations

import os
import stat

import pytest

from dpjax import fileio


def test_atomic_write_text_replaces_whole_and_is_readable(tmp_path):
  old = os.umask(0o022)
  try:
    path = tmp_path / "out.json"
    path.write_text("old")
    fileio.atomic_write_text(str(path), "new")
    assert path.read_text() == "new"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert os.listdir(tmp_path) == ["out.json"]
  finally:
    os.umask(old)


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
  target = tmp_path / "result"
  with pytest.raises(RuntimeError):
    with fileio.atomic_directory(str(target)) as tmp:
      open(os.path.join(tmp, "half"), "w").close()
      raise RuntimeError("boom")
  assert os.listdir(tmp_path) == []
  old = os.umask(0o022)
  try:
    with fileio.atomic_directory(str(target)) as tmp:
      open(os.path.join(tmp, "whole"), "w").close()
  finally:
    os.umask(old)
  assert os.listdir(target) == ["whole"]
  assert stat.S_IMODE(os.stat(target).st_mode) == 0o755
  with pytest.raises(FileExistsError, match="already exists.*--overwrite"):
    with fileio.atomic_directory(str(target)):
      pass
