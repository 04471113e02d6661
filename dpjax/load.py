"""`dpjax.load_model`: any checkpoint a user has, ready to run."""

from __future__ import annotations

from dpjax.checkpoints.convert import load_checkpoint, move_to_device_in_place
from dpjax.model import DecoderModel


def load_model(path_or_id: str, dtype: str | None = None,
               compute_dtype: str | None = None) -> DecoderModel:
  """Loads a converted dpjax checkpoint, an HF checkpoint directory, a GGUF file or a hub id.

  Args:
    path_or_id: a directory written by `dpjax-convert`, an HF directory
      (config.json + safetensors, sharded or not; converted on the fly), a GGUF
      file (`*.gguf`, dequantized on the fly), or a Hugging Face hub model id.
    dtype: weight dtype (`float32`, `bfloat16`, `float16`); default: the
      checkpoint's own.
    compute_dtype: activation dtype; default: the weight dtype.
  """
  checkpoint = load_checkpoint(path_or_id, dtype)
  move_to_device_in_place(checkpoint.params)  # one copy of the weights at a time
  return DecoderModel(checkpoint.config, checkpoint.params, compute_dtype=compute_dtype,
                      source=checkpoint.source)
