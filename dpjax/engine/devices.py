"""Devices: one mesh over every device, described once; multi-host set-up.

The mesh has two axes: `data` (items are split along it) and `model` (weights
are split along it when a model is too large for one device; size 1 by
default). Sharding is said here once, as rules, and nowhere in the model code:
XLA's SPMD partitioner inserts the collectives.

Multi-host: `initialize(coordinator, num_processes, process_id)` wraps
`jax.distributed.initialize`; every process builds the same host batches, each
transfers only the shards its own devices hold, and results are gathered once
per call with `process_allgather`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from dpjax.fields import setting

DATA, MODEL = "data", "model"

# Which axis of each weight the model axis splits (Megatron-style: column-parallel in,
# row-parallel out; the embedding and the unembedding along the vocabulary). The leading
# axis of block weights is the layer, which is never split.
_MODEL_AXIS_RULES = {
    "q": 2, "k": 2, "v": 2, "gate": 2, "up": 2,
    "q_bias": 1, "k_bias": 1, "v_bias": 1, "gate_bias": 1, "up_bias": 1,
    "o": 1, "down": 1,
    "embed": 0, "lm_head": 1,
}
BLOCK_AXIS = 0  # the layer axis of stacked block weights


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process joins a multi-process run (each field is also a flag)."""
  coordinator_address: str | None = setting(None, "Multi-host: HOST:PORT of process 0 "
                                            "(jax.distributed.initialize).")
  num_processes: int = setting(1, "Multi-host: number of processes.")
  process_id: int = setting(0, "Multi-host: this process's index.")


def initialize(coordinator_address: str | None, num_processes: int, process_id: int) -> None:
  """Joins a multi-process run (no-op for a single process)."""
  if num_processes <= 1:
    return
  if coordinator_address is None:
    raise ValueError("--num_processes > 1 needs --coordinator_address=HOST:PORT (process 0's).")
  if not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must be in 0..{num_processes - 1}.")
  # Processes on CPUs talk through gloo (the setting is ignored by accelerators).
  # It must be set before anything touches a backend.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where arrays live: items along `data`, weights replicated or along `model`."""
  mesh: Mesh

  @classmethod
  def create(cls, model_axis: int = 1) -> "Placement":
    devices = np.array(jax.devices())
    if model_axis < 1 or len(devices) % model_axis:
      raise ValueError(f"--model_axis={model_axis} must divide the {len(devices)} devices.")
    return cls(Mesh(devices.reshape(-1, model_axis), (DATA, MODEL)))

  @classmethod
  def single(cls) -> "Placement":
    """The first local device alone (a 1 x 1 mesh)."""
    return cls(Mesh(np.array(jax.local_devices()[:1]).reshape(1, 1), (DATA, MODEL)))

  @property
  def data_size(self) -> int:
    return self.mesh.shape[DATA]

  def check_batch_size(self, batch_size: int) -> None:
    if batch_size % self.data_size:
      raise ValueError(f"batch_size={batch_size} is not a multiple of the {self.data_size} "
                       f"devices on the data axis; use {self.data_size * max(1, batch_size // self.data_size)} "
                       f"or another multiple.")

  def items(self, array: np.ndarray) -> jax.Array:
    """A host array `[B, ...]` split along the data axis by its first dimension."""
    array = np.asarray(array)
    sharding = NamedSharding(self.mesh, P(DATA, *([None] * (array.ndim - 1))))
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

  @property
  def model_size(self) -> int:
    return self.mesh.shape[MODEL]

  def spec_for(self, key: str, shape: tuple[int, ...], drop_leading: bool = False) -> P:
    """The weight `key`'s partition: split along `model` by the rules above when that
    axis divides evenly, else replicated. `drop_leading`: the spec of one block's slice
    of a stacked weight (its layer axis dropped)."""
    full = (1, *shape) if drop_leading else tuple(shape)
    axis = _MODEL_AXIS_RULES.get(key)
    spec = [None] * len(full)
    if (self.model_size > 1 and axis is not None and axis < len(full)
        and full[axis] % self.model_size == 0):
      spec[axis] = MODEL
    return P(*(spec[1:] if drop_leading else spec))

  def sharding_for(self, key: str, shape: tuple[int, ...],
                   drop_leading: bool = False) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec_for(key, shape, drop_leading))

  def residuals(self, x: jax.Array) -> jax.Array:
    """Under jit: residual streams `[n, B, T, d]` kept across programs, placed with their
    rows along `data` and their hidden size along `model` (a shared prefix's `[n, 1, P, d]`
    along `model` only)."""
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(self.mesh, self.residual_spec(x.shape)))

  def residual_spec(self, shape: tuple[int, ...]) -> P:
    rows = DATA if shape[1] % self.data_size == 0 and shape[1] > 1 else None
    hidden = MODEL if shape[-1] % self.model_size == 0 else None
    return P(None, rows, *([None] * (len(shape) - 3)), hidden)

  def params(self, tree: dict[str, Any]) -> dict[str, Any]:
    """Host weights placed by the rules above, each device given only its slice."""
    out = {}
    for key, value in tree.items():
      if isinstance(value, dict):
        out[key] = self.params(value)
        continue
      value = np.asarray(value)
      sharding = self.sharding_for(key, value.shape)
      out[key] = jax.make_array_from_callback(value.shape, sharding, lambda index, v=value: v[index])
    return out


def fetch(array) -> np.ndarray:
  """A host copy of a (possibly multi-process) array."""
  if isinstance(array, jax.Array) and not array.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
  return np.asarray(array)


def is_main_process() -> bool:
  return jax.process_index() == 0
