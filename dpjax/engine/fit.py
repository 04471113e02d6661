"""Fitting a study's programs to the device, known before anything runs.

The engine's programs (`dpjax.engine.sweep.Programs`) are compiled ahead of time with
abstract arguments at the largest shapes the study will give them, for the
local devices or for a topology that is not there (`dpjax.engine.planner`). XLA's own
memory analysis of each compiled program (arguments, outputs and temporaries
per device) is held against the device's memory less a margin, and chooses:

* `rows_per_shard`: item rows per data shard (the batch is that times the data axis);
* `masks_in_flight`: masks (or drop-one candidates) whose activations are live at
  once inside a call (None: all of a call, vmapped together);
* `candidates`: drop-one candidates evaluated per call (`sweep.CANDIDATE_GROUP`).

It starts from the largest setting (what an accelerator runs fastest) and
lowers, in that order, the masks in flight, the candidates per call and the
rows, until every program fits; a setting the user fixed is not lowered. When
nothing fits, the error names the setting to change. On the CPU the ladders are
chosen for throughput, not memory: a vmapped group of masks is no faster
there, so masks and candidates run one at a time inside a call, and 16 rows
per call ran fastest per row (the bundled model's drop-one step on 400
items: 11.5 s at 4 rows, 7.8 s at 8, 6.3 s at 16, 7.5 s at 32, 11.7 s at 128;
larger batches leave the caches), so the CPU's rows start there.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from dpjax.engine.devices import DATA, Placement
from dpjax.lens.readout import Lens, Reads, packing, shared_prefix
from dpjax.tasks import Batch

GB = 1e9
# Kept free of every device's memory: the runtime's own buffers, fragmentation and,
# on GPUs, the library workspaces XLA's analysis does not count.
DEFAULT_MARGIN = 0.15
# Ladders the search walks down (largest first).
ROWS_LADDER = (64, 32, 16, 8, 4, 2, 1)
IN_FLIGHT_LADDER = (None, 8, 4, 2, 1)  # None: every mask of a call (16, 8 candidates)
CANDIDATES_LADDER = (8, 4, 2, 1)
# Where the rows' ladder starts: accelerators take the largest batch that fits; on the
# CPU 16 rows per call were fastest per row (see the module docstring).
ACCELERATOR_ROWS = 32
CPU_ROWS = 16


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

  def residuals(self, shape, dtype, sharding=None):
    """A kept residual stream `[n, B, T, d]`, placed as the stream program places it (its
    compiled output sharding, when known: then the tails compile as the engine calls
    them), or as `Placement.residuals` says."""
    if sharding is None and self.placement is not None:
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
                      abstract: Abstract, data_size: int, stream_sharding=None) -> tuple:
  """The abstract arguments of program `name` (`sweep.Programs`) at the workload's shapes.
  `stream_sharding`: the compiled stream program's output shardings (rows, and prefix)."""
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
  given = (None, None) if stream_sharding is None else (
      tuple(stream_sharding) if prefix is not None else (stream_sharding, None))
  stream = abstract.residuals((L + 1, rows, workload.tokens, hidden_size), compute_dtype,
                              given[0])
  if prefix is not None:
    stream = (stream, abstract.residuals((L + 1, 1, workload.prefix, hidden_size),
                                         compute_dtype, given[1]))
  if name in ("tails", "tails_layers"):
    index, valid = steps(chunking.candidates)
    starts = rep(np.zeros(chunking.candidates, np.int32))
    return (state, translators, stream, starts, mask, packed, prefix, reads, index, valid)
  if name == "stream_layers":
    return (state, translators, stream, rep(np.int32(L + 1)), reads)
  raise ValueError(f"unknown program {name!r}.")


PROGRAMS = ("readout", "readout_final", "stream", "tails", "tails_layers", "stream_layers")


def compile_programs(programs, names: Sequence[str], arguments: Callable[..., tuple]):
  """`name -> compiled executable` of the jitted `programs` (a `sweep.Programs`);
  `arguments(name, stream_sharding)` gives each one's abstract arguments. The stream
  program goes first: the programs that read its output take it as it places it."""
  out, stream_sharding = {}, None
  for name in sorted(names, key=lambda n: n != "stream"):
    out[name] = getattr(programs, name).lower(*arguments(name, stream_sharding)).compile()
    if name == "stream":
      stream_sharding = out[name].output_shardings
  return out


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


def estimate_peak(cfg, chunking: Chunking, workload: Workload, model_axis: int,
                  weight_bytes: float, compute_bytes: int) -> float:
  """A rough upper estimate of the largest program's bytes per device (the weights' share,
  the kept stream, each live member's activations: a block's projections and MLP, the
  attention scores and probabilities in float32), used only to skip compiling chunkings
  that are far too large (`search`)."""
  split = lambda n: n / model_axis if n % model_axis == 0 else n
  rows, t, d = chunking.rows_per_shard, workload.tokens + workload.prefix, cfg.hidden_size
  member = (rows * t * (6 * d + 3 * split(cfg.intermediate_size)) * compute_bytes
            + rows * split(cfg.num_heads) * t * t * 4 * 2)
  live = lambda n: n if chunking.masks_in_flight is None else min(n, chunking.masks_in_flight)
  stream = (cfg.num_layers + 1) * rows * t * split(d) * compute_bytes
  readout = weight_bytes + live(chunking.mask_chunk) * member
  tails = (weight_bytes + stream + chunking.candidates * rows * t * split(d) * compute_bytes
           + live(chunking.candidates) * member)
  return max(readout, tails)


# A chunking whose estimate passes the budget by this much is skipped without compiling.
SKIP_ABOVE = 1.5


def search(measure: Callable[[Chunking], dict[str, ProgramMemory]], budget: int, *,
           rows: Sequence[int], in_flight: Sequence[int | None], candidates: Sequence[int],
           mask_chunk: int, fixed: dict[str, Any],
           estimate: Callable[[Chunking], float] | None = None) -> FitResult:
  """The first chunking, walking down the ladders (masks in flight, then candidates, then
  rows), whose every program fits `budget`. `fixed`: the settings the user gave (their
  flag name -> value), named by the error when nothing fits. `estimate`: a chunking it
  puts above `SKIP_ABOVE` times the budget is not compiled (the last one always is)."""
  r, f, c = 0, 0, 0
  tried = []
  while True:
    chunking = Chunking(rows[r], in_flight[f], candidates[c], mask_chunk)
    last = f + 1 == len(in_flight) and c + 1 == len(candidates) and r + 1 == len(rows)
    guess = estimate(chunking) if estimate is not None else 0.0
    if guess > SKIP_ABOVE * budget and not last:
      tried.append(f"{chunking.describe()}: estimated at {guess / GB:.1f} GB, not compiled")
      memory = None
    else:
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


def ladders(platform: str, *, batch_size: int, masks_in_flight: int, candidates: int,
            data_size: int) -> tuple[tuple, tuple, tuple, dict[str, Any]]:
  """The rows, masks-in-flight and candidates ladders a search walks for the settings
  (0: chosen by the fit; a value: fixed), and the fixed ones by flag name."""
  fixed: dict[str, Any] = {}
  if batch_size:
    fixed["batch_size"] = batch_size
    rows = (batch_size // data_size,)
  else:
    top = CPU_ROWS if platform == "cpu" else ACCELERATOR_ROWS
    rows = tuple(r for r in ROWS_LADDER if r <= top)
  if masks_in_flight:
    fixed["masks_in_flight"] = masks_in_flight
    in_flight = (masks_in_flight,)
  else:
    in_flight = (1,) if platform == "cpu" else IN_FLIGHT_LADDER
  if candidates:
    fixed["candidates_per_call"] = candidates
    cands = (candidates,)
  else:
    cands = CANDIDATES_LADDER
  return rows, in_flight, cands, fixed


def fit_study(model, placement: Placement | None, encoded: Sequence, lens: Lens,
              translators, *, batch_size: int = 0, masks_in_flight: int = 0,
              candidates: int = 0, mask_chunk: int = 16, share_prefix: bool = True,
              pad_id: int = 0, margin: float = DEFAULT_MARGIN, budget: int | None = None,
              last_at_reads: bool = True, platform: str | None = None) -> FitResult:
  """The chunking of a study's work on `model` (placed by `placement`) for the item sets
  `encoded` (their largest batch sets the shapes), every program compiled ahead of time
  and held against the device's memory less `margin` (or `budget` bytes). `platform`:
  whose ladders to walk (default: the local devices')."""
  from dpjax.engine.sweep import Programs
  from dpjax.tasks import batches as make_batches
  data_size = 1 if placement is None else placement.data_size
  device = jax.local_devices()[0]
  budget = int(device_memory(device) * (1 - margin)) if budget is None else int(budget)
  rows, in_flight, cands, fixed = ladders(platform or device.platform, batch_size=batch_size,
                                          masks_in_flight=masks_in_flight,
                                          candidates=candidates, data_size=data_size)
  cfg = model.config
  state = abstract_state(model.state)
  abstract = Abstract(placement, local=True)
  if placement is not None:
    lens = dataclasses.replace(lens, vocab_shards=placement.model_size)
  abstract_translators = None if translators is None else abstract_state(translators)

  # What each program's memory depends on: a program is compiled again only when that
  # changes between the chunkings the search tries.
  depends = {"readout": ("rows_per_shard", "masks_in_flight", "mask_chunk"),
             "readout_final": ("rows_per_shard", "masks_in_flight", "mask_chunk"),
             "stream": ("rows_per_shard",), "stream_layers": ("rows_per_shard",),
             "tails": ("rows_per_shard", "masks_in_flight", "candidates"),
             "tails_layers": ("rows_per_shard", "masks_in_flight", "candidates")}
  known: dict[tuple, ProgramMemory] = {}

  def measure(chunking: Chunking) -> dict[str, ProgramMemory]:
    key = lambda name: (name, *(getattr(chunking, k) for k in depends[name]))
    todo = [name for name in PROGRAMS if key(name) not in known]
    if todo:
      prepared = [b for enc in encoded if enc is not None for b in make_batches(
          enc, chunking.rows_per_shard * data_size, pad_id, share_prefix=share_prefix)]
      workload = Workload.of_batches(prepared, encoded[0].format)
      programs = Programs.build(model.graphdef, lens, chunking.masks_in_flight,
                                last_at_reads, placement)
      if "stream" not in todo and any(n.startswith(("tails", "stream_")) for n in todo):
        todo.append("stream")  # its output sharding places the others' inputs
      compiled = compile_programs(programs, todo, lambda name, stream_sharding:
                                  program_arguments(name, cfg.num_layers, cfg.hidden_size,
                                                    model.compute_dtype, state,
                                                    abstract_translators, workload, chunking,
                                                    abstract, data_size, stream_sharding))
      for name, c in compiled.items():
        known[key(name)] = ProgramMemory.of(c)
    return {name: known[key(name)] for name in PROGRAMS}

  return search(measure, budget, rows=rows, in_flight=in_flight, candidates=cands,
                mask_chunk=mask_chunk, fixed=fixed)
