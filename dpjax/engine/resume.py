"""Resumable runs: the state of long methods saved with Orbax after every step.

A run's state directory holds `settings.json` (every setting that can change a
result) and one Orbax checkpoint manager per record (`iterative_accuracy`,
`block_influence`, ...), whose latest step is the record's latest state. Orbax
writes each step to a temporary directory and renames it when complete, so a
kill leaves the previous step intact. Rerunning the same command continues
where the state stops; a run whose settings differ refuses to resume and names
the settings that differ.
"""

from __future__ import annotations

import json
import os
from typing import Any

import orbax.checkpoint as ocp

from dpjax.fileio import atomic_write_text

SETTINGS_FILE = "settings.json"


class ResumeMismatch(ValueError):
  """The saved state was made with other settings."""


class RunState:
  """Saved progress of one run."""

  def __init__(self, directory: str, fingerprint: dict[str, Any], *, write: bool = True):
    self.directory = os.path.abspath(directory)
    self.fingerprint = json.loads(json.dumps(fingerprint))  # as JSON would give it back
    self.write = write  # only one process of a multi-process run writes settings.json
    path = os.path.join(self.directory, SETTINGS_FILE)
    if os.path.exists(path):
      with open(path) as f:
        saved = json.load(f)
      differ = sorted(k for k in set(saved) | set(self.fingerprint)
                      if saved.get(k) != self.fingerprint.get(k))
      if differ:
        details = "; ".join(f"--{k} was {saved.get(k)!r}, now {self.fingerprint.get(k)!r}"
                            for k in differ)
        raise ResumeMismatch(
            f"the output directory holds a run made with other settings ({details}). Rerun "
            "with the same flags to resume it, pass --restart to discard its saved state, or "
            "choose another --output_dir.")
    else:
      os.makedirs(self.directory, exist_ok=True)
    if write and not os.path.exists(path):
      atomic_write_text(path, json.dumps(self.fingerprint, indent=2, sort_keys=True) + "\n")

  def _manager(self, name: str) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=2, create=True)
    return ocp.CheckpointManager(os.path.join(self.directory, name), options=options)

  def load(self, name: str) -> Any | None:
    """The latest saved state of `name`, or None."""
    if not os.path.isdir(os.path.join(self.directory, name)):
      return None
    with self._manager(name) as manager:
      step = manager.latest_step()
      if step is None:
        return None
      return manager.restore(step, args=ocp.args.JsonRestore())

  def save(self, name: str, step: int, record: Any) -> None:
    """Saves `record` as step `step` of `name` (JSON-serializable).

    Every process of a multi-process run calls this: Orbax synchronizes them
    and its primary process writes.
    """
    with self._manager(name) as manager:
      manager.save(step, args=ocp.args.JsonSave(record), force=True)
      manager.wait_until_finished()
