"""Fitting a study's programs to the device, known before anything runs.

The engine's programs (`dpjax.sweep.Programs`) are compiled ahead of time with
abstract arguments at the largest shapes the study will give them, for the
local devices or for a topology that is not there (`dpjax.planner`). XLA's own
memory analysis of each compiled program (arguments, outputs and temporaries
per device) is held against the device's memory less a margin, and chooses:

* `rows_per_shard`: item rows per data shard (the batch is that times the data axis);
* `masks_in_flight`: masks (or drop-one candidates) whose activations are live at
  once inside a call (None: all of a call, vmapped together);
* `candidates`: drop-one candidates evaluated per call (`sweep.CANDIDATE_GROUP`).

It starts from the largest setting (what an accelerator runs fastest) and
lowers, in that order, the masks in flight, the candidates per call and the
rows, until every program fits; a setting the user fixed is not lowered. When
nothing fits, the error names the setting to change. On the CPU, where a
vmapped group of masks is no faster, the rows are chosen for throughput
instead (`cpu_rows`): enough rows per call that its matmuls are not
overhead-bound, as long as the programs fit.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dpjax.distributed import DATA, Placement
from dpjax.readout import Lens, Reads, packing, shared_prefix
from dpjax.tasks import Batch

GB = 1e9
# Kept free of every device's memory: the runtime's own buffers, fragmentation and,
# on GPUs, the library workspaces XLA's analysis does not count.
DEFAULT_MARGIN = 0.15
# Ladders the search walks down (largest first).
ROWS_LADDER = (64, 32, 16, 8, 4, 2, 1)
IN_FLIGHT_LADDER = (None, 16, 8, 4, 2, 1)
CANDIDATES_LADDER = (8, 4, 2, 1)
# Default rows per data shard on accelerators (the largest a study starts from).
ACCELERATOR_ROWS = 16


@dataclasses.dataclass(frozen=True)
class Workload:
  """The shapes a study's programs see: its longest batch's width (`tokens`), the option
  columns (`options`: letters, cloze options, open-format gold ids), the cloze format's
  read positions per row (`reads`) and a shared prefix's width (`prefix`, 0: none)."""
  format: str
  tokens: int
  options: int
  reads: int = 0
  prefix: int = 0

  @classmethod
  def of_batches(cls, batches: Sequence[Batch], fmt: str) -> "Workload":
    widest = max(batches, key=lambda b: b.input_ids.shape[1] + (
        0 if b.prefix_ids is None else b.prefix_ids.shape[0]))
    return cls(fmt, int(widest.input_ids.shape[1]), int(widest.letter_ids.shape[1]),
               int(0 if widest.read_index is None else
                   max(b.read_index.shape[1] for b in batches)),
               int(0 if widest.prefix_ids is None else widest.prefix_ids.shape[0]))

  def batch(self, rows: int) -> Batch:
    """A batch of zeros of these shapes with `rows` rows (for abstract arguments)."""
    t, k = self.tokens, self.options
    zeros = lambda *shape: np.zeros(shape, np.int32)
    batch = Batch(input_ids=zeros(rows, t), attention_mask=np.ones((rows, t), np.int32),
                  letter_ids=zeros(rows, k), answer=zeros(rows), index=np.arange(rows,
                                                                                dtype=np.int32))
    if self.format == "cloze":
      r = max(self.reads, 1)
      batch.positions, batch.segments = zeros(rows, t), zeros(rows, t)
      batch.read_index, batch.read_target = zeros(rows, r), zeros(rows, r)
      batch.read_option = zeros(rows, r)
      batch.option_bytes = np.ones((rows, k), np.float32)
    if self.prefix:
      batch.prefix_ids, batch.prefix_mask = zeros(self.prefix), np.ones(self.prefix, np.int32)
    return batch


@dataclasses.dataclass(frozen=True)
class Chunking:
  """How a study's work is cut into calls (see the module docstring)."""
  rows_per_shard: int
  masks_in_flight: int | None
  candidates: int
  mask_chunk: int = 16

  def describe(self) -> str:
    live = "all" if self.masks_in_flight is None else self.masks_in_flight
    return (f"{self.rows_per_shard} rows per data shard, {live} masks in flight, "
            f"{self.candidates} candidates per call")


@dataclasses.dataclass
class ProgramMemory:
  """XLA's memory analysis of one compiled program, per device, in bytes."""
  arguments: int
  outputs: int
  temporaries: int
  aliased: int = 0

  @property
  def peak(self) -> int:
    return self.arguments + self.outputs + self.temporaries - self.aliased

  @classmethod
  def of(cls, compiled) -> "ProgramMemory":
    m = compiled.memory_analysis()
    return cls(int(m.argument_size_in_bytes), int(m.output_size_in_bytes),
               int(m.temp_size_in_bytes), int(m.alias_size_in_bytes))

  def to_json(self) -> dict[str, Any]:
    return {"arguments_gb": self.arguments / GB, "outputs_gb": self.outputs / GB,
            "temporaries_gb": self.temporaries / GB, "peak_gb": self.peak / GB}


class Abstract:
  """Abstract arguments on a mesh: item arrays split along `data`, the rest replicated
  (`local`: as the engine passes them, host arrays without a sharding)."""

  def __init__(self, placement: Placement | None, local: bool):
    self.placement = placement
    self.local = local

  def _sharding(self, ndim: int, split: bool):
    if self.placement is None or (self.local and not split):
      return None
    spec = P(DATA, *([None] * (ndim - 1))) if split else P()
    return NamedSharding(self.placement.mesh, spec)

  def items(self, x):
    return None if x is None else jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                       sharding=self._sharding(np.ndim(x), True))

  def replicated(self, x):
    if x is None:
      return None
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    return jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                sharding=self._sharding(np.ndim(x), False))

  def residuals(self, shape, dtype):
    """A kept residual stream `[n, B, T, d]`, placed as `Placement.residuals` places it."""
    if self.placement is None:
      return jax.ShapeDtypeStruct(shape, dtype)
    sharding = NamedSharding(self.placement.mesh, self.placement.residual_spec(shape))
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def abstract_state(state) -> Any:
  """Abstract weights (shape, dtype, sharding) of a model's state or of `nnx.eval_shape`'s."""
  def one(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
  return jax.tree.map(one, state)


def program_arguments(name: str, num_layers: int, hidden_size: int, compute_dtype,
                      state, translators, workload: Workload, chunking: Chunking,
                      abstract: Abstract, data_size: int) -> tuple:
  """The abstract arguments of program `name` (`sweep.Programs`) at the workload's shapes."""
  L = num_layers
  rows = chunking.rows_per_shard * data_size
  batch = workload.batch(rows)
  put = abstract.items
  ids, mask = put(batch.input_ids), put(batch.attention_mask)
  reads = Reads.of(batch, put)
  packed = packing(batch, put)
  prefix = shared_prefix(batch)
  if prefix is not None:
    prefix = tuple(abstract.replicated(p) for p in prefix)
  rep = abstract.replicated
  steps = lambda n: (rep(np.zeros((n, L), np.int32)), rep(np.zeros((n, L), bool)))
  if name in ("readout", "readout_final"):
    index, valid = steps(chunking.mask_chunk)
    return (state, translators, ids, mask, reads, packed, prefix, index, valid)
  if name == "stream":
    return (state, ids, mask, packed, prefix, rep(np.zeros(L, np.int32)),
            rep(np.zeros(L, bool)))
  stream = abstract.residuals((L + 1, rows, workload.tokens, hidden_size), compute_dtype)
  if prefix is not None:
    stream = (stream, abstract.residuals((L + 1, 1, workload.prefix, hidden_size),
                                         compute_dtype))
  if name in ("tails", "tails_layers"):
    index, valid = steps(chunking.candidates)
    starts = rep(np.zeros(chunking.candidates, np.int32))
    return (state, translators, stream, starts, mask, packed, prefix, reads, index, valid)
  if name == "stream_layers":
    return (state, translators, stream, reads)
  raise ValueError(f"unknown program {name!r}.")


PROGRAMS = ("readout", "readout_final", "stream", "tails", "tails_layers", "stream_layers")


def compile_programs(programs, names: Sequence[str], arguments: Callable[[str], tuple]):
  """`name -> compiled executable` of the jitted `programs` (a `sweep.Programs`)."""
  return {name: getattr(programs, name).lower(*arguments(name)).compile() for name in names}


def device_memory(device=None) -> int:
  """Bytes one device can hold: the runtime's limit on an accelerator; on the CPU the
  machine's physical memory over the local devices (fake devices share it)."""
  device = device or jax.local_devices()[0]
  if device.platform != "cpu":
    stats = device.memory_stats() or {}
    if "bytes_limit" in stats:
      return int(stats["bytes_limit"])
  total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return int(total // max(1, len(jax.local_devices())))


class DoesNotFit(ValueError):
  """No chunking of the study's work fits the device; the message names what to change."""


@dataclasses.dataclass
class FitResult:
  chunking: Chunking
  budget: int                         # bytes per device the programs may use
  memory: dict[str, ProgramMemory]    # per program, at the chosen chunking
  tried: list[str]                    # what was tried before, and why it was refused

  def to_json(self) -> dict[str, Any]:
    return {"rows_per_shard": self.chunking.rows_per_shard,
            "masks_in_flight": self.chunking.masks_in_flight,
            "candidates_per_call": self.chunking.candidates,
            "mask_chunk": self.chunking.mask_chunk,
            "device_budget_gb": self.budget / GB,
            "programs": {k: v.to_json() for k, v in self.memory.items()},
            "tried": self.tried}


def cpu_rows(workload: Workload, hidden_size: int, num_items: int, data_size: int) -> int:
  """Rows per data shard chosen for throughput on the CPU: the fewest that give every
  matmul at least `CPU_MIN_WORK` multiply-adds a row of weights sees (rows x tokens x
  hidden), so per-op overheads stop dominating, and no more than the items need."""
  per_row = workload.tokens * hidden_size
  rows = max(1, math.ceil(CPU_MIN_WORK / per_row))
  rows = 2 ** math.ceil(math.log2(rows))
  return int(max(1, min(rows, math.ceil(num_items / data_size), ROWS_LADDER[0] * 4)))


# Rows x tokens x hidden per call below which the CPU's matmuls are overhead-bound.
CPU_MIN_WORK = 1 << 21


def search(measure: Callable[[Chunking], dict[str, ProgramMemory]], budget: int, *,
           rows: Sequence[int], in_flight: Sequence[int | None], candidates: Sequence[int],
           mask_chunk: int, fixed: dict[str, Any]) -> FitResult:
  """The first chunking, walking down the ladders (masks in flight, then candidates, then
  rows), whose every program fits `budget`. `fixed`: the settings the user gave (their
  flag name -> value), named by the error when nothing fits."""
  r, f, c = 0, 0, 0
  tried = []
  while True:
    chunking = Chunking(rows[r], in_flight[f], candidates[c], mask_chunk)
    memory = measure(chunking)
    worst = max(memory, key=lambda k: memory[k].peak)
    if memory[worst].peak <= budget:
      return FitResult(chunking, budget, memory, tried)
    tried.append(f"{chunking.describe()}: {worst} needs {memory[worst].peak / GB:.2f} GB")
    if f + 1 < len(in_flight):
      f += 1
    elif c + 1 < len(candidates):
      c += 1
    elif r + 1 < len(rows):
      r, f, c = r + 1, 0, 0
    else:
      given = ", ".join(f"--{k}={v}" for k, v in fixed.items())
      raise DoesNotFit(
          f"no chunking of the study fits {budget / GB:.2f} GB per device (the device's memory "
          f"less the margin): at the smallest tried ({chunking.describe()}) the {worst} program "
          f"needs {memory[worst].peak / GB:.2f} GB, of which {memory[worst].arguments / GB:.2f} "
          f"GB are its arguments (the weights' share and the kept residual stream). "
          + (f"You fixed {given}; lower it, or " if given else "")
          + "split the weights over more devices (--model_axis), use bfloat16 weights "
          "(--dtype=bfloat16), or shorten the prompts (--k_shot, --max_length).")
