"""Parameters read slice by slice: straight from the checkpoint file onto the devices.

A checkpoint source (safetensors files, a GGUF file) is a `TensorReader`: the
HF tensors it holds, and `read(name, index)`, any rectangular slice of one in
HF's layout. `param_slice` turns a slice of a dpjax parameter (one block's, in
dpjax's `[in, out]` layout) into the HF slice it comes from, through the
architecture table (`architectures.TensorRule`: transposes and the row blocks
of fused tensors), so the table stays the one place that maps names.

* `place_params(cfg, reader, placement)`: every parameter as a `jax.Array`
  sharded as the placement's rules say, each device receiving only its own
  slice. Stacked block weights are filled one block at a time into a donated
  device buffer, so the host holds at most one block's slices of one tensor;
  identical slices (replicas along the data axis) are read once; in a
  multi-process run each process reads only what its own devices hold. No
  stacked host copy of the model and no unsharded copy on any device exist.
* `host_params(cfg, reader)`: the stacked numpy arrays (conversion, export).
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Protocol, Sequence

import jax
import numpy as np

from dpjax.checkpoints import architectures
from dpjax.model.config import ModelConfig

Index = tuple[slice, ...]


class TensorReader(Protocol):
  """A checkpoint's tensors, by HF name."""
  source: str

  def shapes(self) -> Mapping[str, tuple[int, ...]]:
    """Every tensor the source holds -> its HF shape."""

  def read(self, name: str, index: Index) -> np.ndarray:
    """Rows and columns `index` (concrete slices, step 1) of tensor `name`, HF layout."""


class CheckpointError(ValueError):
  """The checkpoint's files are missing, unreadable or inconsistent with its config."""


def numpy_dtype(name: str):
  if name == "bfloat16":
    import ml_dtypes
    return ml_dtypes.bfloat16
  return np.dtype(name)


def concrete(index: Sequence[slice], shape: Sequence[int]) -> Index:
  """`index` with every bound resolved against `shape` (the slices JAX hands a callback
  may be `slice(None)`)."""
  out = []
  for part, size in zip(index, shape):
    start, stop, step = part.indices(size)
    if step != 1:
      raise ValueError(f"slice {part} has step {step}; parameters are read in whole ranges.")
    out.append(slice(start, stop))
  return tuple(out) + tuple(slice(0, size) for size in shape[len(out):])


def param_shape(cfg: ModelConfig, rule: architectures.TensorRule) -> tuple[int, ...]:
  """The dpjax parameter's whole shape (block weights stacked on a leading layer axis)."""
  shape = tuple(rule.shape(cfg))
  return (cfg.num_layers, *shape) if rule.per_layer else shape


def param_slice(cfg: ModelConfig, reader: TensorReader, rule: architectures.TensorRule,
                layer: int | None, index: Sequence[slice], dtype) -> np.ndarray:
  """Slice `index` of one block's (or a global) dpjax parameter, in `dtype`."""
  index = concrete(index, rule.shape(cfg))
  hf_index = tuple(reversed(index)) if rule.transpose else index
  if rule.rows is not None:  # this parameter is a block of a fused tensor's rows
    start = rule.rows(cfg)[0]
    first = hf_index[0]
    hf_index = (slice(first.start + start, first.stop + start), *hf_index[1:])
  part = reader.read(rule.hf_name(layer), hf_index)
  if rule.transpose:
    part = part.T
  return np.ascontiguousarray(part, dtype=dtype)


def check_names(cfg: ModelConfig, reader: TensorReader) -> None:
  """Refuses a source whose tensor names or shapes are not the table's (names the
  culprits), before anything is read."""
  available = reader.shapes()
  expected = architectures.expected_hf_tensors(cfg)
  missing = sorted(set(expected) - set(available))
  extra = sorted(name for name in set(available) - set(expected)
                 if not name.endswith(architectures.IGNORABLE_SUFFIXES))
  # A tied checkpoint may still carry a copy of the embedding as lm_head.
  if cfg.tie_word_embeddings and "lm_head.weight" in extra:
    extra.remove("lm_head.weight")
  if missing:
    raise CheckpointError(f"{reader.source} is missing tensors {missing[:8]}"
                          f"{' and more' if len(missing) > 8 else ''}.")
  if extra:
    raise CheckpointError(
        f"{reader.source} has tensors the {cfg.architecture} table does not know: {extra[:8]}"
        f"{' and more' if len(extra) > 8 else ''}. Its config may not describe its weights.")
  for name, pairs in expected.items():
    want = pairs[0][0].hf_shape(cfg)
    if tuple(available[name]) != tuple(want):
      raise CheckpointError(f"tensor {name} has shape {tuple(available[name])}, expected "
                            f"{want} for this config.")


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def host_params(cfg: ModelConfig, reader: TensorReader) -> dict[str, Any]:
  """dpjax's parameters as stacked numpy arrays in the config's dtype."""
  check_names(cfg, reader)
  dtype = numpy_dtype(cfg.param_dtype)
  params: dict[str, Any] = {}
  for rule in architectures.tensor_rules(cfg):
    whole = tuple(slice(None) for _ in rule.shape(cfg))
    if not rule.per_layer:
      _set(params, rule.path, param_slice(cfg, reader, rule, None, whole, dtype))
      continue
    stacked = np.empty(param_shape(cfg, rule), dtype)
    for layer in range(cfg.num_layers):
      stacked[layer] = param_slice(cfg, reader, rule, layer, whole, dtype)
    _set(params, rule.path, stacked)
  return params


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, block: jax.Array, layer: jax.Array) -> jax.Array:
  # In place (the stacked buffer is donated); the output keeps the input's sharding.
  return jax.lax.dynamic_update_index_in_dim(stacked, block, layer, 0)


def _zeros(shape, dtype, sharding) -> jax.Array:
  return jax.jit(lambda: jax.numpy.zeros(shape, dtype), out_shardings=sharding)()


def _from_slices(shape, sharding, read) -> jax.Array:
  """A sharded array whose every device slice comes from `read(index)`, each distinct
  slice read once (replicas share it)."""
  cache: dict[tuple, np.ndarray] = {}

  def callback(index):
    key = tuple((s.start, s.stop) for s in concrete(index, shape))
    if key not in cache:
      cache[key] = read(index)
    return cache[key]

  array = jax.make_array_from_callback(shape, sharding, callback)
  cache.clear()
  return array


def place_params(cfg: ModelConfig, reader: TensorReader, placement) -> dict[str, Any]:
  """dpjax's parameters on `placement`'s mesh (a `dpjax.engine.devices.Placement`), each device
  reading only its own slices (see the module docstring)."""
  check_names(cfg, reader)
  dtype = numpy_dtype(cfg.param_dtype)
  params: dict[str, Any] = {}
  for rule in architectures.tensor_rules(cfg):
    shape = param_shape(cfg, rule)
    sharding = placement.sharding_for(rule.path[-1], shape)
    if not rule.per_layer:
      _set(params, rule.path, _from_slices(
          shape, sharding, lambda index, r=rule: param_slice(cfg, reader, r, None, index, dtype)))
      continue
    # One block at a time: the block's own sharding is the stacked one's without the layer
    # axis (block weights are never split along it).
    block_sharding = placement.sharding_for(rule.path[-1], shape, drop_leading=True)
    stacked = _zeros(shape, dtype, sharding)
    for layer in range(cfg.num_layers):
      block = _from_slices(shape[1:], block_sharding,
                           lambda index, r=rule, l=layer: param_slice(cfg, reader, r, l, index,
                                                                      dtype))
      stacked = _set_layer(stacked, block, np.int32(layer))
      del block
    _set(params, rule.path, stacked)
  return params
