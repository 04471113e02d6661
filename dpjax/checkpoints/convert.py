"""`dpjax-convert`: an HF checkpoint -> a dpjax checkpoint (Orbax + config).

A converted checkpoint is a directory holding

* `dpjax_config.json`: the `ModelConfig` the forward pass runs on;
* `hf_config.json`: the source's `config.json`, verbatim, for the exporter;
* `params/`: an Orbax checkpoint of the parameter tree (blocks stacked);
* the source's tokenizer files, unchanged.

It is written to a temporary directory and renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dpjax.checkpoints import architectures
from dpjax.checkpoints import hf as hf_checkpoint
from dpjax.checkpoints.hf import HFCheckpoint
from dpjax import fileio
from dpjax.config import ModelConfig

CONFIG_FILE = "dpjax_config.json"
HF_CONFIG_FILE = "hf_config.json"
PARAMS_DIR = "params"


def is_converted(directory: str) -> bool:
  return os.path.isfile(os.path.join(directory, CONFIG_FILE))


def convert(hf_model: str, output_dir: str, *, dtype: str | None = None,
            overwrite: bool = False) -> str:
  """Converts an HF checkpoint (directory or hub id) into `output_dir`; returns it."""
  if os.path.exists(output_dir) and not overwrite:
    # Checked before reading gigabytes; checked again at the final rename.
    raise FileExistsError(
        f"output directory {os.path.abspath(output_dir)} already exists; choose another "
        "path or pass --overwrite to replace it.")
  checkpoint = HFCheckpoint.open(hf_model, dtype)
  params = checkpoint.read_params()
  # Orbax copies numpy leaves while it saves them; handing it device arrays,
  # made one leaf at a time as each numpy leaf is dropped, keeps the peak near
  # one copy of the weights.
  _move_to_device_in_place(params)
  with fileio.atomic_directory(output_dir, overwrite=overwrite) as tmp:
    write_converted(tmp, checkpoint.config, checkpoint.raw_config, params,
                    checkpoint.tokenizer_files())
  return os.path.abspath(output_dir)


def _move_to_device_in_place(tree: dict[str, Any]) -> None:
  for key, value in tree.items():
    if isinstance(value, dict):
      _move_to_device_in_place(value)
    else:
      tree[key] = jax.device_put(value)
      del value


def write_converted(directory: str, config: ModelConfig, raw_config: dict[str, Any],
                    params: dict[str, Any], tokenizer_files: list[str]) -> None:
  """Writes a converted checkpoint into an existing, empty `directory`."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.join(os.path.abspath(directory), PARAMS_DIR), params)
    checkpointer.wait_until_finished()
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    f.write(config.to_json())
  with open(os.path.join(directory, HF_CONFIG_FILE), "w") as f:
    json.dump(raw_config, f, indent=2, sort_keys=True)
  for path in tokenizer_files:
    shutil.copy2(path, directory)


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
  """Weights and configs from either kind of checkpoint directory."""
  config: ModelConfig
  params: dict[str, Any]
  raw_config: dict[str, Any]
  directory: str
  tokenizer_files: list[str]


def load_checkpoint(path_or_id: str, dtype: str | None = None) -> LoadedCheckpoint:
  """Reads a converted checkpoint, or converts an HF directory / hub id in memory."""
  if os.path.isdir(path_or_id) and is_converted(path_or_id):
    directory = os.path.abspath(path_or_id)
    config, params, raw = read_converted(directory)
    if dtype is not None and dtype != config.param_dtype:
      if dtype not in architectures.SUPPORTED_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of "
                         f"{architectures.SUPPORTED_DTYPES}.")
      target = hf_checkpoint.numpy_dtype(dtype)
      params = jax.tree.map(lambda x: x.astype(target), params)
      config = config.replace(param_dtype=dtype)
    files = [os.path.join(directory, n) for n in hf_checkpoint.TOKENIZER_FILES
             if os.path.isfile(os.path.join(directory, n))]
    return LoadedCheckpoint(config, params, raw, directory, files)
  checkpoint = HFCheckpoint.open(path_or_id, dtype)
  return LoadedCheckpoint(checkpoint.config, checkpoint.read_params(), checkpoint.raw_config,
                          checkpoint.directory, checkpoint.tokenizer_files())


def _to_numpy(tree: Any) -> Any:
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)
