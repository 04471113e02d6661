"""`dpjax-convert`: an HF checkpoint or a GGUF file -> a dpjax checkpoint (Orbax + config).

A converted checkpoint is a directory holding

* `dpjax_config.json`: the `ModelConfig` the forward pass runs on;
* `hf_config.json`: the source's `config.json` (for a GGUF file: the HF config
  transformers derives from its metadata), for the exporter;
* `params/`: an Orbax checkpoint of the parameter tree (blocks stacked);
* the tokenizer files (copied, or for a GGUF file saved from its vocabulary).

It is written to a temporary directory and renamed into place when complete.
`load_checkpoint` reads any of the three kinds of source, and `load_tokenizer`
gives the tokenizer of any of them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from dpjax.checkpoints import architectures, slices
from dpjax.checkpoints import hf as hf_checkpoint
from dpjax.checkpoints.gguf import GGUFCheckpoint, gguf_tokenizer, is_gguf
from dpjax.checkpoints.hf import HFCheckpoint
from dpjax import fileio
from dpjax.bundled import resolve_recorded
from dpjax.model.config import ModelConfig

CONFIG_FILE = "dpjax_config.json"
HF_CONFIG_FILE = "hf_config.json"
PARAMS_DIR = "params"


def is_converted(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, CONFIG_FILE))


def open_source(path_or_id: str, dtype: str | None = None) -> HFCheckpoint | GGUFCheckpoint:
  """An HF checkpoint (directory or hub id) or a GGUF file, ready to read."""
  if is_gguf(path_or_id):
    return GGUFCheckpoint.open(path_or_id, dtype)
  return HFCheckpoint.open(path_or_id, dtype)


def save_tokenizer_of(source: HFCheckpoint | GGUFCheckpoint, directory: str) -> None:
  """The source's tokenizer files, written into `directory`."""
  if isinstance(source, GGUFCheckpoint):
    source.tokenizer().save_pretrained(directory)
    return
  for path in source.tokenizer_files():
    shutil.copy2(path, directory)


def convert(hf_model: str, output_dir: str, *, dtype: str | None = None,
            overwrite: bool = False) -> str:
  """Converts an HF checkpoint (directory or hub id) or a GGUF file into `output_dir`."""
  # Checked before reading gigabytes; checked again at the final rename.
  fileio.check_replaceable(output_dir, overwrite)
  checkpoint = open_source(hf_model, dtype)
  params = checkpoint.read_params()
  # Orbax copies numpy leaves while it saves them; handing it device arrays,
  # made one leaf at a time as each numpy leaf is dropped, keeps the peak near
  # one copy of the weights.
  move_to_device_in_place(params)
  with fileio.atomic_directory(output_dir, overwrite=overwrite) as tmp:
    write_converted(tmp, checkpoint.config, checkpoint.raw_config, params)
    # The weights go before the tokenizer is built: converting a GGUF vocabulary
    # (262k pieces for Gemma 3) takes several hundred MB of its own.
    del params
    save_tokenizer_of(checkpoint, tmp)
  return os.path.abspath(output_dir)


SAVE_CONCURRENT_GB = 1


def move_to_device_in_place(tree: dict[str, Any]) -> None:
  """Replaces every numpy leaf by a device array, one leaf at a time, dropping each
  host copy as it goes (so the peak is one copy of the weights plus one leaf)."""
  for key, value in tree.items():
    if isinstance(value, dict):
      move_to_device_in_place(value)
    else:
      tree[key] = _to_device(value)
      del value


def _to_device(value: Any) -> jax.Array:
  """A device array of `value`. On the CPU a numpy array is aliased, not copied (through
  DLPack; dtypes DLPack cannot carry, such as bfloat16, and unaligned buffers are copied)."""
  if isinstance(value, np.ndarray) and jax.default_backend() == "cpu":
    try:
      return jax.dlpack.from_dlpack(np.ascontiguousarray(value))
    except (BufferError, TypeError, ValueError, RuntimeError):
      pass
  return jax.device_put(value)


def write_converted(directory: str, config: ModelConfig, raw_config: dict[str, Any],
                    params: dict[str, Any]) -> None:
  """Writes a converted checkpoint (without its tokenizer) into an existing, empty
  `directory`."""
  # At most SAVE_CONCURRENT_GB being written at once: Orbax otherwise encodes every
  # leaf together, which holds a second copy of the weights (peak 1.9-2.0x the float32
  # size on the real models, against 1.4x with the limit).
  handler = ocp.StandardCheckpointHandler(save_concurrent_gb=SAVE_CONCURRENT_GB)
  with ocp.Checkpointer(handler) as checkpointer:
    checkpointer.save(os.path.join(os.path.abspath(directory), PARAMS_DIR),
                      args=ocp.args.StandardSave(params))
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    f.write(config.to_json())
  with open(os.path.join(directory, HF_CONFIG_FILE), "w") as f:
    json.dump(raw_config, f, indent=2, sort_keys=True)


def read_converted_config(directory: str) -> tuple[ModelConfig, dict[str, Any]]:
  """(config, raw HF config) of a converted checkpoint."""
  with open(os.path.join(directory, CONFIG_FILE)) as f:
    config = ModelConfig.from_json(f.read())
  with open(os.path.join(directory, HF_CONFIG_FILE)) as f:
    return config, json.load(f)


def restore_converted(directory: str, config: ModelConfig, placement) -> dict[str, Any]:
  """A converted checkpoint's weights on `placement`'s devices in `config.param_dtype`:
  Orbax restores into the target shardings, so each device (and each process) reads only
  its own slices."""
  abstract: dict[str, Any] = {}
  dtype = hf_checkpoint.numpy_dtype(config.param_dtype)
  for rule in architectures.tensor_rules(config):
    shape = slices.param_shape(config, rule)
    slices._set(abstract, rule.path, jax.ShapeDtypeStruct(
        shape, dtype, sharding=placement.sharding_for(rule.path[-1], shape)))
  path = os.path.join(os.path.abspath(directory), PARAMS_DIR)
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path, abstract)


def read_converted(directory: str) -> tuple[ModelConfig, dict[str, Any], dict[str, Any]]:
  """(config, params as numpy arrays, raw HF config) of a converted checkpoint."""
  with open(os.path.join(directory, CONFIG_FILE)) as f:
    config = ModelConfig.from_json(f.read())
  with open(os.path.join(directory, HF_CONFIG_FILE)) as f:
    raw_config = json.load(f)
  path = os.path.join(os.path.abspath(directory), PARAMS_DIR)
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(path)
  return config, _to_numpy(params), raw_config


@dataclasses.dataclass
class LoadedCheckpoint:
  """Weights and configs from any kind of source, and how to write its tokenizer."""
  config: ModelConfig
  params: dict[str, Any]
  raw_config: dict[str, Any]
  source: str  # the converted directory, the HF directory or the GGUF file it came from
  save_tokenizer: Callable[[str], None]


def load_checkpoint(path_or_id: str, dtype: str | None = None,
                    params: dict[str, Any] | None = None) -> LoadedCheckpoint:
  """Reads a converted checkpoint, or converts an HF directory, a hub id or a GGUF file
  in memory. `dpjax/bundled_model`, where no such directory is here, is the bundled model
  (how results record it, and how the README names it from any directory). `params`:
  its weights already in memory (numpy, dpjax's layout, in the checkpoint's own dtype:
  those of a model loaded from it), taken instead of reading them again."""
  if not os.path.exists(path_or_id):
    path_or_id = resolve_recorded(path_or_id)
  if os.path.isdir(path_or_id) and is_converted(path_or_id):
    directory = os.path.abspath(path_or_id)
    if params is None:
      config, params, raw = read_converted(directory)
    else:
      config, raw = read_converted_config(directory)
    if dtype is not None and dtype != config.param_dtype:
      if dtype not in architectures.SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of "
                         f"{architectures.SUPPORTED_DTYPES}.")
      target = hf_checkpoint.numpy_dtype(dtype)
      params = jax.tree.map(lambda x: x.astype(target), params)
      config = config.replace(param_dtype=dtype)

    def copy_tokenizer(out: str) -> None:
      for name in hf_checkpoint.TOKENIZER_FILES:
        if os.path.isfile(os.path.join(directory, name)):
          shutil.copy2(os.path.join(directory, name), out)

    return LoadedCheckpoint(config, params, raw, directory, copy_tokenizer)
  checkpoint = open_source(path_or_id, dtype)
  return LoadedCheckpoint(checkpoint.config,
                          checkpoint.read_params() if params is None else params,
                          checkpoint.raw_config, checkpoint.source,
                          lambda out: save_tokenizer_of(checkpoint, out))


def load_tokenizer(source: str):
  """The tokenizer of a converted checkpoint, an HF directory or a GGUF file."""
  import transformers
  try:
    if is_gguf(source):
      return gguf_tokenizer(source)
    return transformers.AutoTokenizer.from_pretrained(source)
  except Exception as e:
    raise ValueError(f"the model at {source} has no usable tokenizer ({type(e).__name__}: "
                     f"{e}); dpjax needs the checkpoint's tokenizer to build prompts.") from e


def _to_numpy(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)
