"""Where the small model bundled with dpjax lives (the default `--model`)."""

from __future__ import annotations

import os

BUNDLED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled_model")
# The committed output of `dpjax` with no flags (the study of the bundled model).
DEFAULT_RUN = os.path.join(BUNDLED_MODEL, "default_run")


def bundled_model_dir() -> str:
  """The bundled model's directory, or a clear error when this installation lacks it."""
  if not os.path.isdir(BUNDLED_MODEL):
    raise ValueError("the bundled model is not in this installation; pass --model=PATH_OR_HUB_ID.")
  return BUNDLED_MODEL


# How results name the bundled model (its place in the package, the same on every machine).
RECORDED_NAME = "dpjax/bundled_model"


def recorded_path(model: str) -> str:
  """A model path as results record it: the bundled model as `dpjax/bundled_model`, not by
  this machine's path to it; any other as given."""
  if os.path.abspath(model) == os.path.abspath(BUNDLED_MODEL):
    return RECORDED_NAME
  return model


def resolve_recorded(path: str) -> str:
  """The model a recorded path names (`recorded_path`'s inverse)."""
  return BUNDLED_MODEL if path == RECORDED_NAME else path
