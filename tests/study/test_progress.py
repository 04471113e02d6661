"""A run's progress lives in its output files: a fresh copy without the Orbax state or any
cache continues from `progress/` and computes nothing recorded there; a kill loses at most
the unit in flight."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from dpjax.bundled import BUNDLED_MODEL
from dpjax.engine import resume

# A small study of the bundled model (l* = 15 of 16 blocks on its calibration items):
# Iterative Pruning three steps deep, and the phase experiment.
FLAGS = dict(model=BUNDLED_MODEL, task="synthetic", num_items=24, calibration_items=16,
             transition_items=16, batch_size=8, phase_seeds=2, random_seeds=1,
             min_layers=13, methods=("iterative", "phase", "noise"), noise_seeds=2,
             noise_profile_seeds=0, progress=False, compilation_cache_dir="")


def _settings(out, **changes):
  from dpjax.study.settings import Settings
  return Settings(output_dir=str(out), **{**FLAGS, **changes})


def _comparable(out):
  with open(os.path.join(out, "results.json")) as f:
    results = json.load(f)
  for key in ("timings", "engine"):
    results.pop(key, None)
  results["settings"].pop("output_dir")
  with open(os.path.join(out, "variants.jsonl")) as f:
    variants = f.read()
  return results, variants


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  from dpjax.study import run as study
  out = tmp_path_factory.mktemp("progress") / "run"
  study.run(_settings(out))
  return str(out)


def test_a_fresh_copy_computes_nothing_its_files_record(finished, tmp_path, monkeypatch):
  """The files a repository keeps (no `state/`, no compilation cache): rerun there, the study
  calls the model for no readout, no drop-one search and no hidden state."""
  from dpjax.engine.sweep import Sweep
  from dpjax.model.transformer import DecoderModel
  from dpjax.study import run as study
  copy = tmp_path / "clone"
  shutil.copytree(finished, copy, ignore=shutil.ignore_patterns("state", "readouts.npz"))
  assert os.path.isdir(copy / "progress") and not os.path.exists(copy / "state")
  calls = []

  def counted(name, original):
    def call(*args, **kwargs):
      calls.append(name)
      return original(*args, **kwargs)
    return call

  from dpjax.engine import noise
  for owner, name in ((Sweep, "readouts"), (Sweep, "drop_one"), (Sweep, "final_stats"),
                      (DecoderModel, "hidden_states"), (DecoderModel, "logits"),
                      (noise, "noised_readouts")):
    if hasattr(owner, name):
      monkeypatch.setattr(owner, name, counted(name, getattr(owner, name)))
  loads = []
  original_load = resume.RunState.load
  monkeypatch.setattr(resume.RunState, "load",
                      lambda self, name: loads.append(name) or original_load(self, name))
  study.run(_settings(copy))
  assert calls == [], f"model calls on a run whose files record everything: {calls}"
  assert {"iterative_accuracy", "influence_and_angles", "noise_probe"} <= set(loads)
  assert _comparable(copy) == _comparable(finished)


def test_the_progress_files_equal_the_orbax_state(finished, tmp_path):
  with open(os.path.join(finished, "progress", resume.SETTINGS_FILE)) as f:
    fingerprint = json.load(f)
  state = resume.RunState(os.path.join(finished, "state"), fingerprint, write=False)
  portable = resume.RunState(str(tmp_path / "no_state"), fingerprint, write=False,
                             progress_dir=os.path.join(finished, "progress"))
  names = [n for n in os.listdir(os.path.join(finished, "state")) if n != resume.SETTINGS_FILE]
  assert "iterative_accuracy" in names and len(names) >= 4
  for name in names:
    assert portable.load(name) == state.load(name), name
    assert portable.loaded_from[name] == "progress"


def test_a_setting_added_later_at_its_default_does_not_block_resuming(tmp_path):
  saved = {"model": "m", "num_items": 4}
  resume.RunState(str(tmp_path / "s"), saved)
  resume.RunState(str(tmp_path / "s"), {**saved, "new_flag": 1}, defaults={"new_flag": 1})
  with pytest.raises(resume.ResumeMismatch, match="--new_flag was None, now 2"):
    resume.RunState(str(tmp_path / "s"), {**saved, "new_flag": 2}, defaults={"new_flag": 1})


def test_a_changed_flag_at_its_default_is_said_to_be_the_default(tmp_path):
  """A run made without --num_items, rerun with --num_items=40: the message says the
  saved 0 was the default (the flag not given), not a 0 the user never typed."""
  resume.RunState(str(tmp_path / "s"), {"model": "m", "num_items": 0})
  with pytest.raises(resume.ResumeMismatch) as raised:
    resume.RunState(str(tmp_path / "s"), {"model": "m", "num_items": 40},
                    defaults={"model": "m", "num_items": 0})
  assert "--num_items was 0 (the default: the flag not given), now 40;" not in str(raised.value)
  assert "--num_items was 0 (the default: the flag not given), now 40)" in str(raised.value)
  assert "--restart" in str(raised.value)


def test_killed_mid_unit_resumes_from_the_progress_files_alone(finished, tmp_path):
  """SIGKILL during Iterative Pruning's second step, then the Orbax state deleted (a fresh
  machine): the rerun starts at step 2 and ends with the uninterrupted run's files."""
  out = str(tmp_path / "killed")
  flags = [f"--{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
           for k, v in FLAGS.items() if k != "progress"] + ["--noprogress",
                                                              f"--output_dir={out}"]
  proc = subprocess.Popen([sys.executable, "-m", "dpjax.cli.study", *flags],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  for line in proc.stdout:
    if "iterative_accuracy: step 1:" in line:
      proc.send_signal(signal.SIGKILL)
      break
  proc.wait(timeout=600)
  assert proc.returncode == -signal.SIGKILL
  assert not os.path.exists(os.path.join(out, "results.json"))
  shutil.rmtree(os.path.join(out, "state"))
  resumed = subprocess.run([sys.executable, "-m", "dpjax.cli.study", *flags],
                           capture_output=True, text=True, timeout=900)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "iterative_accuracy: step 1:" not in resumed.stdout
  assert "iterative_accuracy: step 2:" in resumed.stdout
  assert _comparable(out) == _comparable(finished)
