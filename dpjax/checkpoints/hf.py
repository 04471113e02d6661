"""Reading a Hugging Face checkpoint: find it, parse its config, stack its weights.

Weights are read tensor by tensor from memory-mapped safetensors files (one
`model.safetensors` or the shards a `model.safetensors.index.json` names) into
preallocated stacked arrays, so peak memory is about one copy of the weights.
Every tensor is checked against the architecture table before anything is
written: a missing, extra or mis-shaped tensor is an error that names it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
from safetensors import safe_open

from dpjax.checkpoints import architectures
from dpjax.config import ModelConfig

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
# Files copied beside converted or exported weights so the tokenizer travels too.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "generation_config.json",
)
_HUB_PATTERNS = ["config.json", "*.safetensors", WEIGHTS_INDEX_FILE, *TOKENIZER_FILES]


class CheckpointError(ValueError):
  """The checkpoint's files are missing, unreadable or inconsistent with its config."""


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

  def tokenizer_files(self) -> list[str]:
    return [os.path.join(self.directory, name) for name in TOKENIZER_FILES
            if os.path.isfile(os.path.join(self.directory, name))]

  def read_params(self) -> dict[str, Any]:
    """The weights as dpjax's nested param dict of numpy arrays, blocks stacked."""
    files = weight_files(self.directory)
    located: dict[str, str] = {}
    for path in files:
      with _open(path) as f:
        for name in f.keys():
          located[name] = path
    handles: dict[str, Any] = {}

    def read(name: str) -> np.ndarray:
      path = located[name]
      if path not in handles:
        for other in list(handles):  # one file open at a time
          handles.pop(other).__exit__(None, None, None)
        handles[path] = _open(path).__enter__()
      try:
        return handles[path].get_tensor(name)
      except Exception as e:
        raise CheckpointError(f"cannot read tensor {name} from {path}: {e}") from e

    # Read file by file, in the order the tensors are stored.
    order = {path: n for n, path in enumerate(files)}
    try:
      return stack_params(self.config, located, read, f"checkpoint {self.directory}",
                          order=lambda name: order[located[name]])
    finally:
      for handle in handles.values():
        handle.__exit__(None, None, None)


def allocate_params(cfg: ModelConfig) -> dict[str, Any]:
  """Empty dpjax parameter arrays (blocks stacked on a leading layer axis)."""
  dtype = np.dtype(numpy_dtype(cfg.param_dtype))
  params: dict[str, Any] = {}
  for rule in architectures.tensor_rules(cfg):
    shape = rule.shape(cfg)
    if rule.per_layer:
      shape = (cfg.num_layers, *shape)
    _set(params, rule.path, np.empty(shape, dtype))
  return params


def check_tensor_names(cfg: ModelConfig, available, source: str) -> None:
  """Refuses a checkpoint whose tensor names are not the table's (names the culprits)."""
  expected = architectures.expected_hf_tensors(cfg)
  missing = sorted(set(expected) - set(available))
  extra = sorted(name for name in set(available) - set(expected)
                 if not name.endswith(architectures.IGNORABLE_SUFFIXES))
  # A tied checkpoint may still carry a copy of the embedding as lm_head.
  if cfg.tie_word_embeddings and "lm_head.weight" in extra:
    extra.remove("lm_head.weight")
  if missing:
    raise CheckpointError(f"{source} is missing tensors {missing[:8]}"
                          f"{' and more' if len(missing) > 8 else ''}.")
  if extra:
    raise CheckpointError(
        f"{source} has tensors the {cfg.architecture} table does not know: {extra[:8]}"
        f"{' and more' if len(extra) > 8 else ''}. Its config may not describe its weights.")


def store_tensor(params: dict[str, Any], cfg: ModelConfig, name: str, tensor: np.ndarray,
                 rows: slice | None = None) -> None:
  """Writes HF tensor `name` (or rows `rows` of it) into its dpjax parameters."""
  for rule, layer in architectures.expected_hf_tensors(cfg)[name]:
    target = _get(params, rule.path)
    if layer is not None:
      target = target[layer]
    if rows is None:
      target[...] = rule.from_hf(tensor, cfg)
      continue
    # A block of the HF tensor's rows: the matching part of this rule's rows.
    start, stop, _ = rule.rows(cfg) if rule.rows else (0, rule.hf_shape(cfg)[0], None)
    lo, hi = max(rows.start, start), min(rows.stop, stop)
    if lo >= hi:
      continue
    part = tensor[lo - rows.start:hi - rows.start]
    if rule.transpose:
      target[:, lo - start:hi - start] = part.T
    else:
      target[lo - start:hi - start] = part


def hf_tensor_shape(cfg: ModelConfig, name: str) -> tuple[int, ...]:
  return architectures.expected_hf_tensors(cfg)[name][0][0].hf_shape(cfg)


def stack_params(cfg: ModelConfig, available, read, source: str, order=None) -> dict[str, Any]:
  """dpjax's parameters from HF-named tensors: `read(name)` returns one in HF layout.

  Every name and shape is checked against the architecture table before its
  values are written; a fused HF tensor fills several parameters.
  """
  check_tensor_names(cfg, available, source)
  params = allocate_params(cfg)
  names = sorted(architectures.expected_hf_tensors(cfg), key=order) if order else \
      list(architectures.expected_hf_tensors(cfg))
  for name in names:
    tensor = read(name)
    want = hf_tensor_shape(cfg, name)
    if tuple(tensor.shape) != want:
      raise CheckpointError(f"tensor {name} has shape {tuple(tensor.shape)}, expected "
                            f"{want} for this config.")
    store_tensor(params, cfg, name, tensor)
    del tensor
  return params


def numpy_dtype(name: str):
  if name == "bfloat16":
    import ml_dtypes
    return ml_dtypes.bfloat16
  return np.dtype(name)


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree
