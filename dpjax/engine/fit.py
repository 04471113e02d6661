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
nothing fits, the error names the setting to change. Compiling is the step's
cost (tens of seconds a program for a large model's TPU topology), so each
distinct program shape is compiled once (`ProgramCache`), a chunking is refused
by the first of its programs that does not fit without compiling the others,
and the masks-in-flight rungs between two compiled ones are predicted from them
(`search`). On the CPU the ladders are
chosen for throughput, not memory: a vmapped group of masks is no faster
there, so masks and candidates run one at a time inside a call, and 16 rows
per call ran fastest per row (the bundled model's drop-one step on 400
items: 11.5 s at 4 rows, 7.8 s at 8, 6.3 s at 16, 7.5 s at 32, 11.7 s at 128;
larger batches leave the caches), so the CPU's rows start there.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
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
# What each program's shapes depend on: a program is compiled again only when that changes
# between the chunkings a search tries.
DEPENDS = {"readout": ("rows_per_shard", "masks_in_flight", "mask_chunk"),
           "readout_final": ("rows_per_shard", "masks_in_flight", "mask_chunk"),
           "stream": ("rows_per_shard",), "stream_layers": ("rows_per_shard",),
           "tails": ("rows_per_shard", "masks_in_flight", "candidates"),
           "tails_layers": ("rows_per_shard", "masks_in_flight", "candidates")}
# The programs that read the stream program's output (placed as it places it).
READS_STREAM = ("tails", "tails_layers", "stream_layers")


def program_key(name: str, chunking: Chunking) -> tuple:
  """What program `name`'s compilation at `chunking` is known by."""
  return (name, *(getattr(chunking, k) for k in DEPENDS[name]))


def live_members(name: str, chunking: Chunking) -> int:
  """Masks (readouts) or candidates (tails) whose activations program `name` holds at once
  (1 for the programs that run one model)."""
  if name.startswith("readout"):
    members = chunking.mask_chunk
  elif name.startswith("tails"):
    members = chunking.candidates
  else:
    return 1
  return members if chunking.masks_in_flight is None else min(chunking.masks_in_flight, members)


_SCALE = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def refused_memory(error: Exception) -> ProgramMemory | None:
  """A TPU compiler's refusal for want of HBM (`RESOURCE_EXHAUSTED: ... HLO temporaries
  (...) exceeds available HBM`) as the memory it asked for; None for another error."""
  text = str(error)
  if "RESOURCE_EXHAUSTED" not in text and "exceeds" not in text:
    return None
  found = re.search(r"temporaries \(([0-9.]+)([KMGT])\)", text)
  need = float(found.group(1)) * _SCALE[found.group(2)] if found else float("inf")
  return ProgramMemory(0, 0, int(min(need, 1e18)))


class ProgramCache:
  """The fit step's compilations, each distinct program shape compiled once.

  `memory(name, chunking)` compiles program `name` only when no chunking tried before
  gave it the same shapes (`DEPENDS`: the stream program depends on the rows alone, so
  walking masks in flight and candidates reuses it; `readout` does not depend on the
  candidates, the tails not on the mask chunk). The programs that read the stream get
  its compiled output sharding at those rows (it is compiled first when needed).
  `build(masks_in_flight)` gives the jitted programs (`sweep.Programs`);
  `arguments(name, chunking, stream_sharding)` their abstract arguments;
  `compiler_options`, XLA's options for every compilation. `compiled` counts the
  compilations, `seconds` their time."""

  def __init__(self, build: Callable[[int | None], Any],
               arguments: Callable[[str, Chunking, Any], tuple],
               progress: Callable[[str], None] | None = None,
               compiler_options: dict[str, Any] | None = None):
    self.build = build
    self.arguments = arguments
    self.progress = progress
    self.compiler_options = compiler_options
    self.known: dict[tuple, ProgramMemory] = {}
    self.stream_shardings: dict[int, Any] = {}
    self.compiled = 0
    self.seconds = 0.0

  def memory(self, name: str, chunking: Chunking) -> ProgramMemory:
    key = program_key(name, chunking)
    if key in self.known:
      return self.known[key]
    sharding = None
    if name in READS_STREAM:
      self.memory("stream", chunking)
      sharding = self.stream_shardings.get(chunking.rows_per_shard)
    program = getattr(self.build(chunking.masks_in_flight), name)
    if self.progress is not None:
      self.progress(f"  compiling {name} at {chunking.describe()}")
    start = time.perf_counter()
    try:
      compiled = program.lower(*self.arguments(name, chunking, sharding)).compile(
          self.compiler_options)
    except Exception as e:  # RESOURCE_EXHAUSTED on TPUs: the compiler checks HBM itself
      refused = refused_memory(e)
      if refused is None:
        raise
      self.known[key] = refused
    else:
      self.known[key] = ProgramMemory.of(compiled)
      if name == "stream":
        self.stream_shardings[chunking.rows_per_shard] = compiled.output_shardings
    finally:
      self.compiled += 1
      self.seconds += time.perf_counter() - start
    return self.known[key]

  def all(self, chunking: Chunking) -> dict[str, ProgramMemory]:
    return {name: self.memory(name, chunking) for name in PROGRAMS}


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
  compilations: int = 0               # programs compiled to choose (each shape once)

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
# The order a chunking's programs are compiled in, the likeliest to refuse first (after
# the program that refused the chunking before): a refused chunking compiles no more.
COMPILE_ORDER = ("tails", "readout_final", "readout", "tails_layers", "stream",
                 "stream_layers")


def search(measure: Callable[[str, Chunking], ProgramMemory], budget: int, *,
           rows: Sequence[int], in_flight: Sequence[int | None], candidates: Sequence[int],
           mask_chunk: int, fixed: dict[str, Any],
           estimate: Callable[[Chunking], float] | None = None) -> FitResult:
  """The first chunking, walking down the ladders (masks in flight, then candidates, then
  rows), whose every program fits `budget`. `measure(name, chunking)`: program `name`'s
  memory at `chunking` (a `ProgramCache`, which compiles each distinct shape once).
  `fixed`: the settings the user gave (their flag name -> value), named by the error when
  nothing fits. `estimate`: a chunking it puts above `SKIP_ABOVE` times the budget is not
  compiled (the last one always is).

  A chunking's programs are compiled until one refuses it (`COMPILE_ORDER`). When a
  program that holds several masks at once refuses the top of the masks-in-flight
  ladder, it is compiled at the bottom too: if that refuses, the rungs between are
  skipped; else its memory, linear in the masks it holds, is interpolated between the
  two and the search goes on from the first rung predicted to fit (compiled in full: a
  wrong prediction walks on down as before)."""
  r, f, c = 0, 0, 0
  tried = []
  first = None  # the program that refused the last chunking compiled
  while True:
    chunking = Chunking(rows[r], in_flight[f], candidates[c], mask_chunk)
    last = f + 1 == len(in_flight) and c + 1 == len(candidates) and r + 1 == len(rows)
    guess = estimate(chunking) if estimate is not None else 0.0
    jump = None
    if guess > SKIP_ABOVE * budget and not last:
      tried.append(f"{chunking.describe()}: estimated at {guess / GB:.1f} GB, not compiled")
      memory = None
    else:
      memory = {}
      for name in sorted(COMPILE_ORDER, key=lambda n: n != first):
        memory[name] = measure(name, chunking)
        if memory[name].peak > budget:
          break
      worst = max(memory, key=lambda k: memory[k].peak)
      if memory[worst].peak <= budget:
        return FitResult(chunking, budget, {name: memory[name] for name in PROGRAMS}, tried)
      first = worst
      tried.append(f"{chunking.describe()}: {worst} needs {memory[worst].peak / GB:.2f} GB")
      if f == 0 and len(in_flight) > 2 and live_members(worst, chunking) > 1:
        jump = _in_flight_jump(measure, worst, chunking, budget, in_flight, tried)
    if jump is not None:
      f = jump
    elif f + 1 < len(in_flight):
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


def _in_flight_jump(measure, name: str, top: Chunking, budget: int, in_flight: Sequence,
                    tried: list[str]) -> int:
  """Where the masks-in-flight ladder goes on after program `name` refused its top rung
  `top`: `name` compiled at the bottom rung; the bottom when that refuses too (the rungs
  between hold more masks), else the first rung whose memory, interpolated linearly in
  the masks held between the two, fits."""
  bottom = dataclasses.replace(top, masks_in_flight=in_flight[-1])
  low, high = measure(name, bottom), measure(name, top)
  low_live, high_live = live_members(name, bottom), live_members(name, top)
  if low.peak > budget or high_live == low_live:
    return len(in_flight) - 1
  slope = (high.peak - low.peak) / (high_live - low_live)
  for f in range(1, len(in_flight) - 1):
    rung = dataclasses.replace(top, masks_in_flight=in_flight[f])
    predicted = low.peak + slope * (live_members(name, rung) - low_live)
    if predicted <= budget:
      return f
    tried.append(f"{rung.describe()}: {name} predicted at {predicted / GB:.2f} GB (linear in "
                 "the masks in flight), not compiled")
  return len(in_flight) - 1


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

  workloads: dict[int, Workload] = {}

  def workload(rows_per_shard: int) -> Workload:
    """The shapes of the item sets' batches at these rows (their widest batch)."""
    if rows_per_shard not in workloads:
      prepared = [b for enc in encoded if enc is not None for b in make_batches(
          enc, rows_per_shard * data_size, pad_id, share_prefix=share_prefix)]
      workloads[rows_per_shard] = Workload.of_batches(prepared, encoded[0].format)
    return workloads[rows_per_shard]

  cache = ProgramCache(
      lambda in_flight: Programs.build(model.graphdef, lens, in_flight, last_at_reads,
                                       placement),
      lambda name, chunking, stream_sharding: program_arguments(
          name, cfg.num_layers, cfg.hidden_size, model.compute_dtype, state,
          abstract_translators, workload(chunking.rows_per_shard), chunking, abstract,
          data_size, stream_sharding))
  found = search(cache.memory, budget, rows=rows, in_flight=in_flight, candidates=cands,
                 mask_chunk=mask_chunk, fixed=fixed)
  found.compilations = cache.compiled
  return found
