"""Writing outputs so that a reader never sees half of them.

Every file or directory dpjax produces is written under a temporary name beside
its destination and renamed into place only once complete, so a crash or a bad
input leaves either the old output or none, never a partial one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


def cache_root(*parts: str) -> str:
  """dpjax's cache directory (`$DPJAX_CACHE`, default `$XDG_CACHE_HOME/dpjax` or
  `~/.cache/dpjax`), joined with `parts`."""
  root = os.environ.get("DPJAX_CACHE") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dpjax")
  return os.path.join(root, *parts)


def sha256_file(path: str) -> str:
  """A file's SHA256, read a block at a time (never the whole file in memory)."""
  import hashlib
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def check_output_dir(path: str, flag: str = "--output_dir") -> None:
  """Refuses, before any work, an output directory that is a file or cannot be written
  (a read-only file system, no permission): the error names the path and what to do.
  Nothing is left behind (a probe file is written and removed in the directory, or in
  its nearest existing parent when it does not exist yet)."""
  path = os.path.abspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise NotADirectoryError(f"{flag}={path} is a file, not a directory; choose another "
                             "path.")
  probe_dir = path
  while not os.path.exists(probe_dir):
    probe_dir = os.path.dirname(probe_dir)
  if not os.path.isdir(probe_dir):
    raise NotADirectoryError(f"{flag}={path}: {probe_dir} is a file, not a directory; "
                             "choose another path.")
  try:
    fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=probe_dir)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"{flag}={path} cannot be written ({e.strerror}); choose a "
                          "directory you can write to.") from None


# Every directory output dpjax writes holds one of these files (an exported, healed or
# trained HF checkpoint its config.json; a converted checkpoint its dpjax_config.json):
# --overwrite replaces only such a directory.
OUTPUT_MARKERS = ("config.json", "dpjax_config.json", "model/config.json")


def check_replaceable(output_dir: str, overwrite: bool) -> None:
  """Refuses an existing `output_dir` unless `overwrite`, and even then anything that is
  not an earlier output (a file, or a directory holding other files): --overwrite never
  replaces what dpjax did not write."""
  output_dir = os.path.abspath(output_dir)
  if not os.path.lexists(output_dir):
    return
  if not overwrite:
    raise FileExistsError(
        f"output directory {output_dir} already exists; choose another path or pass "
        "--overwrite (overwrite=True) to replace it.")
  if os.path.islink(output_dir) or not os.path.isdir(output_dir):
    raise FileExistsError(
        f"{output_dir} is a file, not an earlier output directory; --overwrite replaces only "
        "a directory dpjax wrote: choose another path or remove the file.")
  if os.listdir(output_dir) and not any(os.path.isfile(os.path.join(output_dir, m))
                                        for m in OUTPUT_MARKERS):
    raise FileExistsError(
        f"{output_dir} holds files dpjax did not write (no {' or '.join(OUTPUT_MARKERS)}); "
        "--overwrite "
        "replaces only an earlier output directory: choose another path.")


def default_mode(directory: bool = False) -> int:
  """The permissions a plain `open` or `mkdir` would give under the current umask."""
  mask = os.umask(0)
  os.umask(mask)
  return (0o777 if directory else 0o666) & ~mask


@contextlib.contextmanager
def atomic_directory(output_dir: str, overwrite: bool = False) -> Iterator[str]:
  """Yields a temporary directory that becomes `output_dir` on success.

  Refuses an existing `output_dir` unless `overwrite`; on any exception the
  temporary directory is removed and an existing `output_dir` is untouched.
  """
  output_dir = os.path.abspath(output_dir)
  check_replaceable(output_dir, overwrite)
  parent = os.path.dirname(output_dir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.tmp-", dir=parent)
  # mkdtemp makes the directory private; the output gets ordinary permissions.
  os.chmod(tmp, default_mode(directory=True))
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(output_dir):
    trash = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.old-", dir=parent)
    os.replace(output_dir, os.path.join(trash, "old"))
    os.replace(tmp, output_dir)
    shutil.rmtree(trash, ignore_errors=True)
  else:
    os.replace(tmp, output_dir)


def atomic_write_text(path: str, text: str) -> None:
  """Writes `text` to `path` via a temporary file and a rename."""
  with atomic_file(path) as tmp:
    with open(tmp, "w") as f:
      f.write(text)


@contextlib.contextmanager
def atomic_file(path: str, suffix: str = "") -> Iterator[str]:
  """Yields a temporary path beside `path` that becomes `path` when the block succeeds."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", suffix=suffix,
                             dir=directory)
  os.fchmod(fd, default_mode())  # mkstemp's file is private; results are not
  os.close(fd)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)


def write_json(path: str, data) -> None:
  """`data` (plain JSON types) as indented JSON, atomically."""
  import json
  atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def write_csv(path: str, header, rows) -> None:
  """A CSV table, atomically; NaN cells are left empty."""
  import csv
  import io
  import math
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(header)
  for row in rows:
    writer.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in row])
  atomic_write_text(path, buffer.getvalue())


def write_npz(path: str, **arrays) -> None:
  """Compressed numpy arrays, atomically."""
  import numpy as np
  with atomic_file(path, suffix=".npz") as tmp:
    with open(tmp, "wb") as f:
      np.savez_compressed(f, **arrays)


def write_npz_stable(path: str, **arrays) -> None:
  """Compressed numpy arrays, atomically, as the same bytes for the same arrays (the zip
  entries carry a fixed time, unlike `np.savez_compressed`'s): files kept in a
  repository change only when their numbers do. `np.load` reads them."""
  import io
  import zipfile

  import numpy as np
  with atomic_file(path, suffix=".npz") as tmp:
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
      for name in sorted(arrays):
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(arrays[name]), allow_pickle=False)
        info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        archive.writestr(info, buffer.getvalue())


def save_figure(fig, path: str, dpi: int = 120) -> None:
  """A matplotlib figure as PNG, atomically; the figure is closed."""
  import matplotlib.pyplot as plt
  try:
    with atomic_file(path, suffix=".png") as tmp:
      fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
  finally:
    plt.close(fig)


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
  """An exclusive lock on `path` (created if missing) while the block runs: two processes
  filling the same cache (a fetch) take turns instead of writing over each other."""
  import fcntl
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
