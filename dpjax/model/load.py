"""`dpjax.load_model`: any checkpoint a user has, ready to run, its weights read straight
onto the devices that hold them."""

from __future__ import annotations

import os

from dpjax.bundled import resolve_recorded
from dpjax.checkpoints import architectures
from dpjax.checkpoints.convert import is_converted, open_source, read_converted_config, \
    restore_converted
from dpjax.engine.devices import Placement
from dpjax.model.transformer import DecoderModel


def load_model(path_or_id: str, dtype: str | None = None, compute_dtype: str | None = None,
               placement: Placement | None = None) -> DecoderModel:
  """Loads a converted dpjax checkpoint, an HF checkpoint directory, a GGUF file or a hub id.

  Args:
    path_or_id: `dpjax/bundled_model` (the bundled model), a directory written by
      `dpjax-convert`, an HF directory
      (config.json + safetensors, sharded or not; converted on the fly), a GGUF
      file (`*.gguf`, dequantized on the fly), or a Hugging Face hub model id.
    dtype: weight dtype (`float32`, `bfloat16`, `float16`); default: the
      checkpoint's own.
    compute_dtype: activation dtype; default: the weight dtype.
    placement: the device mesh the weights go to (`dpjax.engine.devices.Placement`):
      each device receives only its own slice, read from the file (in a
      multi-process run, each process reads only what its devices hold). Default:
      the first local device.
  """
  placement = placement or Placement.single()
  if not os.path.exists(path_or_id):
    path_or_id = resolve_recorded(path_or_id)  # `dpjax/bundled_model` from any directory
  if os.path.isdir(path_or_id) and is_converted(path_or_id):
    directory = os.path.abspath(path_or_id)
    config, _ = read_converted_config(directory)
    if dtype is not None and dtype != config.param_dtype:
      if dtype not in architectures.SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of "
                         f"{architectures.SUPPORTED_DTYPES}.")
      config = config.replace(param_dtype=dtype)
    params, source = restore_converted(directory, config, placement), directory
  else:
    checkpoint = open_source(path_or_id, dtype)
    config, params, source = (checkpoint.config, checkpoint.place_params(placement),
                              checkpoint.source)
  return DecoderModel(config, params, compute_dtype=compute_dtype, source=source)
