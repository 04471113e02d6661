"""Reading a Hugging Face checkpoint: find it, parse its config, read its weights.

Weights are read slice by slice from memory-mapped safetensors files (one
`model.safetensors` or the shards a `model.safetensors.index.json` names),
either straight onto the devices that hold each slice (`place_params`) or
into stacked host arrays (`read_params`, for conversion and export); see
`dpjax.checkpoints.slices`. Every tensor's name and shape is checked against
the architecture table before anything is read: a missing, extra or
mis-shaped tensor is an error that names it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
from safetensors import safe_open

from dpjax.checkpoints import architectures, slices
from dpjax.checkpoints.slices import CheckpointError, numpy_dtype  # re-exported
from dpjax.model.config import ModelConfig

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# Files copied beside converted or exported weights so the tokenizer travels too.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "generation_config.json",
)
_HUB_PATTERNS = ["config.json", "*.safetensors", WEIGHTS_INDEX_FILE, *TOKENIZER_FILES]
# torch is not a dependency of dpjax (PyPI's default torch wheel is a multi-GB CUDA build
# and dpjax computes in JAX): only the checks against transformers' PyTorch models need
# it, and where it is missing they are skipped with a note naming this command.
TORCH_INSTALL = "pip install torch"


def torch_available() -> bool:
  """Whether transformers' PyTorch models can run here (torch is installed)."""
  import importlib.util
  return importlib.util.find_spec("torch") is not None


def resolve(path_or_id: str) -> str:
  """A local directory for an HF checkpoint directory or a hub model id."""
  if os.path.isdir(path_or_id):
    return os.path.abspath(path_or_id)
  if os.path.exists(path_or_id):
    raise CheckpointError(f"{path_or_id} is a file; pass the checkpoint's directory.")
  looks_like_id = (path_or_id.count("/") <= 1 and not path_or_id.startswith((".", "/", "~"))
                   and path_or_id.strip())
  if not looks_like_id:
    raise CheckpointError(f"no checkpoint directory at {path_or_id}.")
  try:
    import huggingface_hub  # A dependency of transformers.
    return huggingface_hub.snapshot_download(path_or_id, allow_patterns=_HUB_PATTERNS)
  except Exception as e:  # Network, auth, missing repo: all end the same way.
    raise CheckpointError(
        f"{path_or_id!r} is not a local directory and could not be fetched from the "
        f"Hugging Face hub ({type(e).__name__}: {e}). Pass a local checkpoint directory, "
        "or check the model id and your network access.") from e


def read_raw_config(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise CheckpointError(f"{directory} has no config.json; it is not an HF checkpoint.")
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def parse_config(directory: str, dtype: str | None = None) -> tuple[ModelConfig, dict[str, Any]]:
  """The dpjax config and the raw config.json of an HF checkpoint directory.

  The raw JSON is checked for a supported `model_type` first, then parsed by
  transformers' own config class. `dtype` overrides the checkpoint's dtype.
  """
  raw = read_raw_config(directory)
  architectures.check_model_type(raw)
  import transformers
  hf = transformers.AutoConfig.from_pretrained(directory)
  stored = raw.get("dtype", raw.get("torch_dtype")) or "float32"
  if dtype is None:
    dtype = stored if stored in architectures.SUPPORTED_DTYPES else "float32"
  return architectures.model_config_from_hf(hf, dtype), raw


def weight_files(directory: str) -> list[str]:
  """The safetensors files of a checkpoint, in the order the index names them."""
  index = os.path.join(directory, WEIGHTS_INDEX_FILE)
  if os.path.isfile(index):
    try:
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise CheckpointError(f"{index} is not a valid safetensors index: {e!r}") from e
    files = list(dict.fromkeys(weight_map.values()))
    missing = [name for name in files if not os.path.isfile(os.path.join(directory, name))]
    if missing:
      raise CheckpointError(f"{index} names shard files that are not in {directory}: {missing}")
    return [os.path.join(directory, name) for name in files]
  single = os.path.join(directory, WEIGHTS_FILE)
  if os.path.isfile(single):
    return [single]
  raise CheckpointError(
      f"{directory} has neither {WEIGHTS_FILE} nor {WEIGHTS_INDEX_FILE}. dpjax reads "
      "safetensors only; re-save the model with save_pretrained(safe_serialization=True).")


def _open(path: str):
  try:
    return safe_open(path, framework="numpy")
  except Exception as e:
    raise CheckpointError(
        f"cannot read safetensors file {path}: {e}. It may be truncated or corrupt; "
        "download or save it again.") from e


class SafetensorsReader:
  """The tensors of an HF checkpoint's safetensors files, read slice by slice from the
  memory-mapped files (the pages read are clean file cache, not the process's own
  memory)."""

  def __init__(self, directory: str):
    self.source = f"checkpoint {directory}"
    self.files = weight_files(directory)
    self._located: dict[str, str] = {}
    self._shapes: dict[str, tuple[int, ...]] = {}
    self._handles: dict[str, Any] = {}
    for path in self.files:
      handle = self._handle(path)
      for name in handle.keys():
        self._located[name] = path
        self._shapes[name] = tuple(handle.get_slice(name).get_shape())

  def _handle(self, path: str):
    if path not in self._handles:
      self._handles[path] = _open(path).__enter__()
    return self._handles[path]

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return dict(self._shapes)

  def read(self, name: str, index: slices.Index) -> np.ndarray:
    path = self._located[name]
    try:
      return np.asarray(self._handle(path).get_slice(name)[index])
    except Exception as e:
      raise CheckpointError(f"cannot read tensor {name} from {path}: {e}") from e

  def close(self) -> None:
    for handle in self._handles.values():
      handle.__exit__(None, None, None)
    self._handles.clear()


@dataclasses.dataclass
class HFCheckpoint:
  """An HF checkpoint on disk, with its dpjax config."""
  directory: str
  config: ModelConfig
  raw_config: dict[str, Any]

  @classmethod
  def open(cls, path_or_id: str, dtype: str | None = None) -> "HFCheckpoint":
    directory = resolve(path_or_id)
    config, raw = parse_config(directory, dtype)
    return cls(directory, config, raw)

  @property
  def source(self) -> str:
    """Where the weights come from (what `DecoderModel.source` records)."""
    return self.directory

  def tokenizer_files(self) -> list[str]:
    return [os.path.join(self.directory, name) for name in TOKENIZER_FILES
            if os.path.isfile(os.path.join(self.directory, name))]

  def reader(self) -> SafetensorsReader:
    return SafetensorsReader(self.directory)

  def read_params(self) -> dict[str, Any]:
    """The weights as dpjax's nested param dict of numpy arrays, blocks stacked."""
    reader = self.reader()
    try:
      return slices.host_params(self.config, reader)
    finally:
      reader.close()

  def place_params(self, placement) -> dict[str, Any]:
    """The weights on `placement`'s devices, each reading only its own slices."""
    reader = self.reader()
    try:
      return slices.place_params(self.config, reader, placement)
    finally:
      reader.close()
