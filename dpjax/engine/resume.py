"""Resumable runs: the state of long methods saved after every step, in two places.

A run's state is a set of named records (`iterative_accuracy`, `curve_phase_random`,
...), each a JSON value whose latest step is the record's latest state, and
`settings.json` (every setting that can change a result). Every save writes the
record twice:

* into the run's `progress/` directory, as `<record>.json.gz` (written under a
  temporary name and renamed into place): small, portable files that can be kept
  with the run's results (the real-model study commits them), so a rerun on
  another machine, with no cache, continues from them;
* into the run's `state/` directory, one Orbax checkpoint manager per record (Orbax
  writes each step to a temporary directory and renames it when complete).

Loading takes the newer of the two (the Orbax copy is a speed-up that can be
deleted; the progress file is never the only copy's backup but its equal). A kill
leaves the previous step of every record intact. Rerunning the same command
continues where the state stops; a run whose settings differ refuses to resume and
names the settings that differ.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from typing import Any

import orbax.checkpoint as ocp

from dpjax.fileio import atomic_file, atomic_write_text

SETTINGS_FILE = "settings.json"
PROGRESS_SUFFIX = ".json.gz"


def _read_progress(path: str) -> dict[str, Any] | None:
  """A progress file's `{"step": int, "record": ...}`, or None when there is none."""
  if not os.path.isfile(path):
    return None
  with gzip.open(path, "rt") as f:
    return json.load(f)


def write_progress(path: str, step: int, record: Any) -> None:
  """`record` as step `step` in the gzipped JSON file `path`, written atomically (the
  gzip header carries no time, so the same record gives the same bytes)."""
  text = json.dumps({"step": int(step), "record": record}, sort_keys=True,
                    separators=(",", ":"))
  with atomic_file(path) as tmp:
    with open(tmp, "wb") as raw:
      with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(text.encode())


class ResumeMismatch(ValueError):
  """The saved state was made with other settings."""


class RunState:
  """Saved progress of one run."""

  def __init__(self, directory: str, fingerprint: dict[str, Any], *, write: bool = True,
               progress_dir: str | None = None, defaults: dict[str, Any] | None = None):
    self.directory = os.path.abspath(directory)
    self.progress_dir = None if progress_dir is None else os.path.abspath(progress_dir)
    self.fingerprint = json.loads(json.dumps(fingerprint))  # as JSON would give it back
    self.write = write  # only one process of a multi-process run writes settings.json
    self.loads = 0  # records restored, and from where (tests count them)
    self.loaded_from: dict[str, str] = {}
    path = os.path.join(self.directory, SETTINGS_FILE)
    portable = (None if self.progress_dir is None
                else os.path.join(self.progress_dir, SETTINGS_FILE))
    if not os.path.exists(path) and portable is not None and os.path.exists(portable):
      path = portable  # the Orbax state is gone (a fresh machine): the progress files decide
    if os.path.exists(path):
      with open(path) as f:
        saved = json.load(f)
      # A setting added to dpjax after the run began, left at its default, cannot have
      # changed what the run recorded.
      defaults = json.loads(json.dumps(defaults or {}))
      added = {k for k in set(self.fingerprint) - set(saved)
               if k in defaults and self.fingerprint[k] == defaults[k]}
      differ = sorted(k for k in (set(saved) | set(self.fingerprint)) - added
                      if saved.get(k) != self.fingerprint.get(k))
      if differ:
        def said(k: str, values: dict) -> str:
          # A value at its default was most likely never given: say so, not just the value.
          return (f"{values.get(k)!r}" + (" (the default: the flag not given)"
                                           if k in defaults and values.get(k) == defaults[k]
                                           else ""))
        details = "; ".join(f"--{k} was {said(k, saved)}, now {said(k, self.fingerprint)}"
                            for k in differ)
        raise ResumeMismatch(
            f"the output directory holds a run made with other settings ({details}). Rerun "
            "with the same flags to resume it, pass --restart to discard its saved state, or "
            "choose another --output_dir.")
    os.makedirs(self.directory, exist_ok=True)
    if write:
      text = json.dumps(self.fingerprint, indent=2, sort_keys=True) + "\n"
      for where in (self.directory, self.progress_dir):
        if where is not None and not os.path.exists(os.path.join(where, SETTINGS_FILE)):
          atomic_write_text(os.path.join(where, SETTINGS_FILE), text)

  def progress_path(self, name: str) -> str | None:
    if self.progress_dir is None:
      return None
    return os.path.join(self.progress_dir, re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
                        + PROGRESS_SUFFIX)

  def _manager(self, name: str) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    return ocp.CheckpointManager(os.path.join(self.directory, name), options=options)

  def _load_orbax(self, name: str) -> tuple[int, Any] | None:
    if not os.path.isdir(os.path.join(self.directory, name)):
      return None
    with self._manager(name) as manager:
      step = manager.latest_step()
      if step is None:
        return None
      return step, manager.restore(step, args=ocp.args.JsonRestore())

  def load(self, name: str) -> Any | None:
    """The latest saved state of `name` (the newer of its Orbax step and its progress
    file), or None."""
    found = []
    path = self.progress_path(name)
    portable = _read_progress(path) if path else None
    if portable is not None:
      found.append((portable["step"], 1, portable["record"], "progress"))
    orbax = self._load_orbax(name)
    if orbax is not None:
      found.append((orbax[0], 0, orbax[1], "orbax"))
    if not found:
      return None
    step, _, record, where = max(found, key=lambda f: (f[0], f[1]))
    self.loads += 1
    self.loaded_from[name] = where
    return record

  def save(self, name: str, step: int, record: Any) -> None:
    """Saves `record` as step `step` of `name` (JSON-serializable).

    Every process of a multi-process run calls this: Orbax synchronizes them
    and its primary process writes.
    """
    record = json.loads(json.dumps(record))  # what either copy gives back
    with self._manager(name) as manager:
      manager.save(step, args=ocp.args.JsonSave(record), force=True)
      manager.wait_until_finished()
    path = self.progress_path(name)
    if path is not None and self.write:
      write_progress(path, step, record)
