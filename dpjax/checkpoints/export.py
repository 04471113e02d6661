"""`dpjax-export`: the kept blocks of a model -> an HF checkpoint any HF tool loads.

Reads a converted checkpoint (or an HF directory / hub id), keeps the chosen
blocks in their original order, renumbers them `0..K-1`, and writes
safetensors (sharded past `max_shard_bytes`) through the same architecture table
the converter reads, plus `config.json` with the new `num_hidden_layers` and
every per-layer list (such as `layer_types`) cut to the kept blocks, plus the
tokenizer files.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Sequence

import numpy as np
from safetensors.numpy import save_file

from dpjax.checkpoints import architectures
from dpjax.checkpoints.convert import load_checkpoint
from dpjax.checkpoints.hf import WEIGHTS_FILE, WEIGHTS_INDEX_FILE
from dpjax import fileio
from dpjax.model.plan import KeepPlan

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def pruned_hf_config(raw_config: dict[str, Any], kept: Sequence[int],
                     num_layers: int) -> dict[str, Any]:
  """The HF config.json of the model that keeps only blocks `kept`."""
  config = dict(raw_config)
  config["num_hidden_layers"] = len(kept)
  for key, value in raw_config.items():
    if isinstance(value, list) and len(value) == num_layers:
      config[key] = [value[i] for i in kept]
  # Qwen2/Qwen3 derive layer_types from this threshold when the list is absent;
  # the list written above (if any) is what counts, so keep the two consistent.
  if "max_window_layers" in config and "layer_types" not in raw_config:
    threshold = raw_config["max_window_layers"]
    config["max_window_layers"] = sum(1 for i in kept if i < threshold)
  return config


def hf_tensors(config, params: dict[str, Any], kept: Sequence[int]) -> dict[str, np.ndarray]:
  """HF-named tensors for the kept blocks, renumbered, via the architecture table (the
  rows of a fused HF tensor concatenated back in order)."""
  parts: dict[str, list[tuple[int, np.ndarray]]] = {}
  for rule in architectures.tensor_rules(config):
    value = params
    for key in rule.path:
      value = value[key]
    layers = list(enumerate(kept)) if rule.per_layer else [(None, None)]
    start = rule.rows(config)[0] if rule.rows else 0
    for new, old in layers:
      tensor = value if old is None else value[old]
      tensor = tensor.T if rule.transpose else tensor
      parts.setdefault(rule.hf_name(new), []).append((start, np.asarray(tensor)))
  # C order always: safetensors writes an array's memory as it lies (a concatenation of
  # transposed views comes out in Fortran order).
  return {name: np.ascontiguousarray(
              np.concatenate([t for _, t in sorted(pieces, key=lambda p: p[0])], axis=0))
          for name, pieces in parts.items()}


def _shards(tensors: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
  shards, current, size = [], {}, 0
  for name, tensor in tensors.items():
    if current and size + tensor.nbytes > max_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = tensor
    size += tensor.nbytes
  shards.append(current)
  return shards


def write_hf_checkpoint(directory: str, config, raw_config: dict[str, Any],
                        params: dict[str, Any], kept: Sequence[int],
                        save_tokenizer: Callable[[str], None] | None = None,
                        max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
  """Writes the HF checkpoint of blocks `kept` into the existing `directory`.

  `raw_config` is the HF `config.json` of the unpruned model (for a model made
  in dpjax: a transformers config's `to_dict()`).
  """
  tensors = hf_tensors(config, params, kept)
  hf_config = pruned_hf_config(raw_config, kept, config.num_layers)
  hf_config["dtype"] = config.param_dtype
  hf_config.pop("torch_dtype", None)
  shards = _shards(tensors, max_shard_bytes)
  if len(shards) == 1:
    save_file(shards[0], os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
  else:
    weight_map = {}
    for n, shard in enumerate(shards, start=1):
      name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
      weight_map.update({tensor: name for tensor in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": weight_map}
    with open(os.path.join(directory, WEIGHTS_INDEX_FILE), "w") as f:
      json.dump(index, f, indent=2, sort_keys=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  if save_tokenizer is not None:
    save_tokenizer(directory)


def export(checkpoint: str, output_dir: str, *, keep: Sequence[bool] | None = None,
           kept_blocks: Sequence[int] | None = None, overwrite: bool = False,
           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
           params: dict[str, Any] | None = None) -> str:
  """Writes the HF checkpoint of `checkpoint` with only the kept blocks.

  Give either `keep` (a boolean vector over blocks) or `kept_blocks` (0-based
  indices); neither keeps every block. `params`: the checkpoint's weights already in
  memory, in its own dtype (`load_checkpoint`'s), not read again.
  """
  if keep is not None and kept_blocks is not None:
    raise ValueError("give keep (a mask) or kept_blocks (indices), not both.")
  # Checked before reading gigabytes; checked again at the final rename.
  fileio.check_replaceable(output_dir, overwrite)
  loaded = load_checkpoint(checkpoint, params=params)
  num_layers = loaded.config.num_layers
  if kept_blocks is not None:
    plan = KeepPlan.from_kept(kept_blocks, num_layers)
  else:
    plan = KeepPlan.from_mask(keep, num_layers)
  kept = list(plan.kept)

  with fileio.atomic_directory(output_dir, overwrite=overwrite) as tmp:
    write_hf_checkpoint(tmp, loaded.config, loaded.raw_config, loaded.params, kept,
                        loaded.save_tokenizer, max_shard_bytes)
  return os.path.abspath(output_dir)
