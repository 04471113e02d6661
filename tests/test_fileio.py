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


def test_a_bad_output_dir_is_refused_before_any_work(tmp_path):
  """`dpjax --output_dir=` naming a file, or a path that cannot be written: one line, exit
  1, nothing written, before the model loads."""
  import subprocess
  import sys
  a_file = tmp_path / "results.txt"
  a_file.write_text("not a directory")
  for bad, said in ((a_file, "is a file, not a directory"),
                    (a_file / "below", "is a file, not a directory"),
                    ("/proc/dpjax_out", "cannot be written")):
    result = subprocess.run([sys.executable, "-m", "dpjax.cli.study", f"--output_dir={bad}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and said in lines[0] and lines[0].startswith("dpjax: error:")
  assert a_file.read_text() == "not a directory" and sorted(os.listdir(tmp_path)) == [
      "results.txt"]
