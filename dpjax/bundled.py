"""Where the small model bundled with dpjax lives (the default `--model`)."""

from __future__ import annotations

import os

BUNDLED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bundled_model")


def bundled_model_dir() -> str:
  """The bundled model's directory, or a clear error when this installation lacks it."""
  if not os.path.isdir(BUNDLED_MODEL):
    raise ValueError("the bundled model is not in this installation; pass --model=PATH_OR_HUB_ID.")
  return BUNDLED_MODEL
