"""Planning a study before renting the machine: memory, chunking and time of every program.

`plan(model_spec, target)` builds the model's abstract weights (no download: a preset,
an HF directory or a `config.json`), places them on the target's mesh (the local
devices, or a TPU/GPU topology that is not there, compiled through libtpu or JAX's CUDA
plugin alone), and

1. compiles every program of the study (`sweep.Programs`) ahead of time and lets the
   fit step (`dpjax.engine.fit`) choose rows per data shard, masks in flight and candidates
   per call from the compiled memory against the chip's (TPU compilers also check
   capacity themselves; GPU compile-only figures leave out library workspaces, which
   the margin keeps room for). Each distinct program shape is compiled once
   (`fit.ProgramCache`), a chunking one program refuses compiles no other, and the
   masks-in-flight rungs between two compiled ones are predicted, not compiled
   (`fit.search`); a named TPU target's programs are compiled with the least effort on
   execution time (`COMPILE_ONLY_OPTIONS`: nothing runs them);
2. measures the work of each program's parts with XLA's cost analysis, per device:
   one block on a shard's rows, the last block at the read positions only, and one
   lens readout, compiled at the per-device shapes of the split weights. XLA counts a
   loop's body once, so a program's flops and bytes are its parts times their trip
   counts, which the planner knows (`schedule`);
3. predicts each part's time (on the local CPU, the part run there and timed; on a
   named target, the larger of its flops over the chip's peak rate and its bytes over
   the memory bandwidth) and the whole study's time by counting every call the engine
   makes, method by method (`schedule`, which groups masks and candidates as the engine
   does), at each batch's own width.

The study planned is `dpjax`'s (`Settings`, its defaults unless told otherwise), on
its items as `dpjax` makes them (`study_items`). `dpjax-plan` (`dpjax.cli.plan`) prints
the table and writes it as JSON.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import math
import os
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dpjax.engine import fit
from dpjax.checkpoints import architectures
from dpjax.bundled import recorded_path
from dpjax.model.config import ModelConfig
from dpjax.engine.devices import DATA, MODEL, Placement
from dpjax.model.plan import KeepPlan, bucket_size
from dpjax.lens.readout import Lens, Reads, final_readout, packing
from dpjax.engine.sweep import (CANDIDATE_GROUP, Programs, executed_steps, fixed_groups,
                                step_groups)
from dpjax.study.settings import Settings

GB = 1e9

# ----------------------------------------------------------------------------
# Models: presets (public configs) and configs on disk.

_LLAMA3 = dict(model_type="llama", vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
               max_position_embeddings=8192, tie_word_embeddings=False, hidden_act="silu",
               bos_token_id=128000, eos_token_id=128001)
PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8),
    "llama3-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8),
    "qwen2.5-72b": dict(model_type="qwen2", vocab_size=152064, hidden_size=8192,
                        intermediate_size=29568, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, rms_norm_eps=1e-6, rope_theta=1000000.0,
                        max_position_embeddings=32768, tie_word_embeddings=False,
                        hidden_act="silu", sliding_window=None, use_sliding_window=False),
}


def model_config(spec: str, dtype: str = "bfloat16") -> ModelConfig:
  """The dpjax config of a preset name, an HF checkpoint directory or a `config.json` file,
  parsed by transformers' config classes (nothing is downloaded, no weight is read)."""
  import transformers
  if spec in PRESETS:
    raw = dict(PRESETS[spec])
    hf = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
  elif os.path.isdir(spec) or (os.path.isfile(spec) and spec.endswith(".json")):
    path = spec if os.path.isfile(spec) else os.path.join(spec, "config.json")
    if not os.path.isfile(path):
      raise ValueError(f"{spec} has no config.json; pass a preset ({', '.join(PRESETS)}), an "
                       "HF checkpoint directory or a config.json file.")
    with open(path) as f:
      raw = json.load(f)
    architectures.check_model_type(raw)
    hf = transformers.AutoConfig.for_model(raw.pop("model_type"), **raw)
  else:
    raise ValueError(f"--model={spec!r} is neither a preset ({', '.join(PRESETS)}) nor an HF "
                     "directory nor a config.json file.")
  return architectures.model_config_from_hf(hf, dtype)


def parameter_bytes(cfg: ModelConfig) -> int:
  dtype = np.dtype(jnp.dtype(cfg.param_dtype))
  total = 0
  for rule in architectures.tensor_rules(cfg):
    shape = rule.shape(cfg)
    total += int(np.prod(shape)) * (cfg.num_layers if rule.per_layer else 1)
  return total * dtype.itemsize


# ----------------------------------------------------------------------------
# Targets: the local devices, or a named topology compiled without its hardware.

_H100 = """gpu_device_info {
  cuda_compute_capability { major: 9 minor: 0 }
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_block_optin: 232448
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: %d
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: %d
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 1 patch: 0 }
runtime_version { major: 12 minor: 4 patch: 0 }
device_description_str: "%s"
"""


@dataclasses.dataclass(frozen=True)
class Target:
  """A machine to plan for: its devices' memory and peak rates (per device), and how to get
  compile-only devices of it."""
  name: str
  platform: str             # tpu, gpu or the local devices' platform
  devices: int
  memory_bytes: float       # what one device can hold
  bf16_flops: float         # dense peak, per device
  f32_flops: float          # float32 matmuls at full precision (no TF32, no bf16 passes)
  bandwidth: float          # HBM bytes/s per device
  topology: dict[str, Any] = dataclasses.field(default_factory=dict)

  def peak_flops(self, compute_dtype) -> float:
    return self.f32_flops if jnp.dtype(compute_dtype) == jnp.float32 else self.bf16_flops

  def compile_devices(self) -> list:
    """Devices to compile for (the local ones for `local`)."""
    if self.name == "local":
      return list(jax.devices())
    from jax.experimental import topologies
    t = self.topology
    if self.platform == "tpu":
      os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
      try:
        topo = topologies.get_topology_desc(
            topology_name=t["name"], platform="tpu", chip_config_name=t["chip_config"],
            chips_per_host_bounds=t["chips_per_host"], num_slices=1,
            wrap=(False,) * len(t["chips_per_host"]))
      except Exception as e:
        raise RuntimeError(f"cannot make the {self.name} topology ({type(e).__name__}: {e}); "
                           "planning for TPUs needs libtpu: pip install -e '.[plan]'.") from e
    else:
      os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
      config = _H100 % (int(self.bandwidth), int(self.memory_bytes), t["description"])
      try:
        topo = topologies.get_topology_desc(t["name"], "cuda", target_config=config,
                                            topology=t["layout"])
      except Exception as e:
        raise RuntimeError(f"cannot make the {self.name} topology ({type(e).__name__}: {e}); "
                           "planning for GPUs needs JAX's CUDA plugin: pip install -e "
                           "'.[plan]'.") from e
    devices = list(topo.devices)
    if len(devices) != self.devices:
      raise RuntimeError(f"the {self.name} topology has {len(devices)} devices, expected "
                         f"{self.devices}.")
    return devices


# Peak figures from the vendors' data sheets (dense, no sparsity). TPU float32 matmuls at
# full precision take six bf16 passes; GPU float32 at full precision runs without TF32.
TARGETS = {
    "v5p-8": Target("v5p-8", "tpu", 4, 95.74e9, 459e12, 459e12 / 6, 2.765e12,
                    dict(name="v5p:2x2x1", chip_config="megacore", chips_per_host=(2, 2, 1))),
    "v5p-64": Target("v5p-64", "tpu", 32, 95.74e9, 459e12, 459e12 / 6, 2.765e12,
                     dict(name="v5p:4x4x2", chip_config="megacore", chips_per_host=(2, 2, 1))),
    "v6e-16": Target("v6e-16", "tpu", 16, 31.25e9, 918e12, 918e12 / 6, 1.64e12,
                     dict(name="v6e:4x4", chip_config="default", chips_per_host=(2, 2, 1))),
    "8xH100": Target("8xH100", "gpu", 8, 79.6e9, 989e12, 67e12, 3.35e12,
                     dict(name="h100", layout="1x1x8", description="NVIDIA H100 80GB HBM3")),
    "1xH200": Target("1xH200", "gpu", 1, 143.8e9, 989e12, 67e12, 4.8e12,
                     dict(name="h200", layout="1x1x1", description="NVIDIA H200")),
}


def measure_local_rates() -> tuple[float, float]:
  """This machine's float32 matmul FLOP/s (2048 x 2048, JAX) and copy bandwidth (bytes/s):
  the local target's peak figures."""
  n = 2048
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  start, reps = time.perf_counter(), 5
  for _ in range(reps):
    f(a).block_until_ready()
  flops = 2 * n ** 3 * reps / (time.perf_counter() - start)
  x = np.ones(64 << 20, np.uint8)  # 64 MB, read and written
  y = np.empty_like(x)
  np.copyto(y, x)  # the pages touched once before timing
  start = time.perf_counter()
  for _ in range(5):
    np.copyto(y, x)
  bandwidth = 2 * x.nbytes * 5 / (time.perf_counter() - start)
  return flops, bandwidth


def local_target() -> Target:
  devices = jax.local_devices()
  flops, bandwidth = measure_local_rates()
  per_device = len(devices) if devices[0].platform == "cpu" else 1  # fake CPU devices share
  return Target("local", devices[0].platform, len(jax.devices()), fit.device_memory(devices[0]),
                flops / per_device, flops / per_device, bandwidth / per_device)


def target(name: str) -> Target:
  if name == "local":
    return local_target()
  if name not in TARGETS:
    raise ValueError(f"--target={name!r}; use local or one of {', '.join(TARGETS)}.")
  return TARGETS[name]


# ----------------------------------------------------------------------------
# The mesh and the abstract model on it.


def choose_model_axis(cfg: ModelConfig, t: Target, weights_share: float = 0.4) -> int:
  """The smallest power-of-two model axis (dividing the devices) that leaves each device's
  share of the weights within `weights_share` of its memory (the rest: activations, the
  kept residual stream)."""
  axis = 1
  while (parameter_bytes(cfg) / axis > weights_share * t.memory_bytes
         and axis * 2 <= t.devices and t.devices % (axis * 2) == 0):
    axis *= 2
  return axis


def abstract_model(cfg: ModelConfig, placement: Placement, platform: str, compute_dtype=None):
  """(graphdef, abstract state placed on the mesh) of a model of `cfg`, with no weights."""
  from dpjax.model.transformer import Transformer
  dot_chunk = "auto" if platform == "cpu" else None
  module = nnx.eval_shape(lambda: Transformer(cfg, compute_dtype=compute_dtype,
                                              dot_chunk=dot_chunk, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(module)

  def place(path, leaf):
    key = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]  # the weight's name
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                sharding=placement.sharding_for(key, tuple(leaf.shape)))

  return graphdef, jax.tree_util.tree_map_with_path(place, state), module.compute_dtype


def shard_config(cfg: ModelConfig, model_axis: int) -> ModelConfig:
  """One device's share of the model: the split dimensions divided by the model axis (a
  dimension that does not divide stays whole, as the sharding rules leave it)."""
  div = lambda n: n // model_axis if n % model_axis == 0 else n
  heads = div(cfg.num_heads)
  kv = div(cfg.num_kv_heads) if heads != cfg.num_heads else cfg.num_kv_heads
  if heads % kv:
    heads, kv = cfg.num_heads, cfg.num_kv_heads
  return cfg.replace(num_heads=heads, num_kv_heads=kv,
                     intermediate_size=div(cfg.intermediate_size),
                     vocab_size=div(cfg.vocab_size))


# ----------------------------------------------------------------------------
# The parts of a program, and their cost per device.


@dataclasses.dataclass(frozen=True)
class Cost:
  """Work per device: flops and bytes (XLA's cost analysis) and, where the part was timed
  on the device itself (the local target), its measured seconds."""
  flops: float
  bytes: float
  measured: float | None = None

  def __add__(self, other: "Cost") -> "Cost":
    both = None if self.measured is None or other.measured is None else (
        self.measured + other.measured)
    return Cost(self.flops + other.flops, self.bytes + other.bytes, both)

  def __mul__(self, n: float) -> "Cost":
    return Cost(self.flops * n, self.bytes * n,
                None if self.measured is None else self.measured * n)

  def seconds(self, t: Target, compute_dtype) -> float:
    """The measured time, else the roofline: the larger of the flops at the chip's peak
    rate and the bytes at its memory bandwidth."""
    if self.measured is not None:
      return self.measured
    return max(self.flops / t.peak_flops(compute_dtype), self.bytes / t.bandwidth)


def _cost_of(compiled) -> Cost:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):
    analysis = analysis[0]
  analysis = analysis or {}
  return Cost(float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0)))


def time_call(compiled, args, budget_seconds: float = 1.0, repeats: int = 10) -> float:
  """What a call of `compiled` takes on this machine's cores when they are the study's
  alone: the fastest of up to `repeats` calls (after one to warm up, stopping once
  `budget_seconds` have been spent), each by the wall clock or by this process's CPU
  time, whichever is less (on a shared machine the other processes slow the wall clock;
  a call that runs on one core takes its CPU time)."""
  jax.block_until_ready(compiled(*args))
  best, spent = float("inf"), 0.0
  for _ in range(repeats):
    start, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(compiled(*args))
    took = time.perf_counter() - start
    best, spent = min(best, took, time.process_time() - cpu), spent + took
    if spent > budget_seconds:
      break
  return best


def part_costs(cfg: ModelConfig, model_axis: int, workload: fit.Workload, rows: int,
               lens: Lens, compute_dtype, timed: bool = False) -> dict[str, Cost]:
  """Per-device cost of the `embed`ding (with the rope tables and masks a call makes once),
  one `block` on a shard's rows, the `last` block at the read positions only, and one
  `lens` readout of those rows, from XLA's cost analysis of each compiled alone (no loop)
  on this machine's CPU at the per-device shapes. Flops and bytes are properties of the
  program more than of the chip; the collectives of a split model are left out, and the
  block's and the lens's costs include the rope tables and masks, a small part, that the
  engine makes once per call. `timed` (the local target, whose CPU runs the study):
  each part is also run on zero weights and timed (`time_call`), compiled as the engine
  compiles it there."""
  from dpjax.model.transformer import Transformer
  shard = shard_config(cfg, model_axis)
  lens = dataclasses.replace(lens, vocab_shards=1)  # the shard holds its own vocabulary
  cpu = jax.local_devices(backend="cpu")[0]
  module = nnx.eval_shape(lambda: Transformer(shard, compute_dtype=compute_dtype,
                                              dot_chunk="auto" if timed else None,
                                              rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(module)
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  batch = workload.batch(rows)
  sds = lambda x: None if x is None else jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
  ids, attention = batch.input_ids, batch.attention_mask
  reads = Reads.of(batch)
  packed = packing(batch)
  h = jax.ShapeDtypeStruct((rows, workload.tokens, cfg.hidden_size), module.compute_dtype)
  local_rope = shard.local_rope_theta is not None

  def one_block(m):
    block_def, blocks = nnx.split(m.blocks)
    return nnx.merge(block_def, jax.tree.map(lambda w: w[0], blocks))

  def embed(state, ids, attention, packed):
    m = nnx.merge(graphdef, state)
    ctx = m.attention_context(attention, *packed)
    return m.embed_tokens(ids), ctx

  def block(state, h, attention, packed):
    m = nnx.merge(graphdef, state)
    mask, cos, sin = m.attention_context(attention, *packed).for_block(False, local_rope)
    return one_block(m)(h, cos, sin, mask)

  def last(state, h, attention, packed, reads):
    m = nnx.merge(graphdef, state)
    mask, cos, sin = m.attention_context(attention, *packed).for_block(False, local_rope)
    b = one_block(m)
    at = (reads.read_index if workload.format == "cloze"
          else jnp.full((h.shape[0], 1), h.shape[1] - 1, jnp.int32))
    take = lambda x: jnp.take_along_axis(x, at.reshape(at.shape + (1,) * (x.ndim - 2)), axis=1)
    q, k, v = b.project(h, cos, sin)
    return b.attend_and_mlp(take(h), take(q), k, v, take(mask))

  def read(state, h, reads):
    m = nnx.merge(graphdef, state)
    return lens(m, lens.unembedding(m), h, reads, shard.num_layers, None)

  parts = {"embed": (embed, (state, ids, attention, packed)),
           "block": (block, (state, h, attention, packed)),
           "last": (last, (state, h, attention, packed, reads)),
           "lens": (read, (state, h, reads))}
  abstract = lambda x: x if isinstance(x, jax.ShapeDtypeStruct) else sds(x)
  concrete = lambda x: (jnp.zeros(x.shape, x.dtype) if isinstance(x, jax.ShapeDtypeStruct)
                        else jnp.asarray(x))
  costs = {}
  with jax.default_device(cpu):
    for name, (f, args) in parts.items():
      compiled = jax.jit(f).lower(*jax.tree.map(abstract, args)).compile()
      cost = _cost_of(compiled)
      if timed:
        cost = dataclasses.replace(cost, measured=time_call(compiled,
                                                            jax.tree.map(concrete, args)))
      costs[name] = cost
  return costs


# ----------------------------------------------------------------------------
# The study's calls, counted as the engine makes them.


@dataclasses.dataclass
class Work:
  """A program's total work over a study: calls, and the parts its calls run."""
  calls: int = 0
  embed: int = 0
  block: int = 0
  last: int = 0
  lens: int = 0

  def add(self, calls=0, embed=0, block=0, last=0, lens=0) -> None:
    self.calls += calls
    self.embed += embed
    self.block += block
    self.last += last
    self.lens += lens

  def cost(self, parts: dict[str, Cost]) -> Cost:
    return (parts["embed"] * self.embed + parts["block"] * self.block
            + parts["last"] * self.last + parts["lens"] * self.lens)


def study_default(name: str) -> Any:
  """The default of `dpjax`'s setting `name` (`dpjax.study.settings.Settings`): the plan's
  study is the one `dpjax` runs unless told otherwise."""
  return _SETTINGS_FIELDS[name].default


_SETTINGS_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


# Where a plan puts l* before the model has run: the last block but one. The studies run
# so far found it there or at the last block (the bundled model: 15 of 16; Qwen2.5-0.5B:
# 24 of 24; SmolLM2-135M: 30 of 30); an earlier l* costs the phase methods more
# (`--transition_block` plans for one).
TRANSITION_BEFORE_END = 1


@dataclasses.dataclass(frozen=True)
class StudyShape:
  """What a whole study runs: its item sets, the chunking the fit chose, and the settings
  that decide its masks (each by default `dpjax`'s). The transition block l* is not
  known before the unpruned model runs: the phase methods are counted at
  `transition_block` (0: `TRANSITION_BEFORE_END` blocks before the last)."""
  num_layers: int
  eval_items: int
  calibration_items: int = study_default("calibration_items")
  batch: int = 16               # rows per call (global)
  candidates: int = CANDIDATE_GROUP
  in_flight: int | None = None
  random_seeds: int = study_default("random_seeds")
  per_layer_curves: bool = study_default("curve_layers") == "all"
  transition_items: int = 0     # the items l* is read on (0: the calibration items)
  transition_block: int = 0     # l*, 1-based (0: TRANSITION_BEFORE_END before the last)
  mask_chunk: int = study_default("mask_chunk")
  methods: tuple[str, ...] = study_default("methods")
  criteria: int = len(study_default("criteria"))
  min_layers: int = study_default("min_layers")
  phase_seeds: int = study_default("phase_seeds")
  phase_selections: tuple[str, ...] = study_default("phase_selections")
  phase_ks: str = study_default("phase_ks")
  phase_sizing: str = study_default("phase_sizing")
  phase_max_k: int = study_default("phase_max_k")
  noise_levels: int = len(study_default("noise_levels"))
  noise_seeds: int = study_default("noise_seeds")
  noise_profile_seeds: int = study_default("noise_profile_seeds")
  screen_items: int = study_default("screen_items")
  screen_keep: int = study_default("screen_keep")

  @classmethod
  def of(cls, settings: Settings, num_layers: int, eval_items: int, calibration_items: int,
         transition_items: int, **chunking) -> "StudyShape":
    """The shape of the study `settings` describes, on item sets of these sizes (after
    the calibration split, as `dpjax.study.run` makes it)."""
    s = settings
    return cls(num_layers, eval_items, calibration_items, transition_items=transition_items,
               random_seeds=s.random_seeds, per_layer_curves=s.curve_layers == "all",
               mask_chunk=s.mask_chunk, methods=tuple(s.methods), criteria=len(s.criteria),
               min_layers=s.min_layers, phase_seeds=s.phase_seeds,
               phase_selections=tuple(s.phase_selections), phase_ks=s.phase_ks,
               phase_sizing=s.phase_sizing, phase_max_k=s.phase_max_k,
               noise_levels=len(s.noise_levels), noise_seeds=s.noise_seeds,
               noise_profile_seeds=s.noise_profile_seeds, screen_items=s.screen_items,
               screen_keep=s.screen_keep, **chunking)

  @property
  def l_star(self) -> int:
    return self.transition_block or max(2, self.num_layers - TRANSITION_BEFORE_END)

  def batches(self, items: int) -> int:
    return math.ceil(items / self.batch)


def _tails(work: dict[str, Work], tails: Sequence[int], L: int, s: StudyShape,
           final_only: bool, batches: int) -> None:
  """The tails of masks resuming from a stream, `batches` times: grouped as the engine
  groups them (`sweep.step_groups`; a vmapped group runs as long as its longest member,
  `sweep.executed_steps`)."""
  groups = step_groups(list(range(len(tails))), list(tails), L, s.candidates,
                       pad=s.in_flight is not None)
  for size, group in groups:
    lengths = [0 if m is None else tails[m] for m in group]
    steps = executed_steps(lengths, s.in_flight)
    if final_only or size == 0:
      last = sum(1 for n in lengths if n > 0)
      work["tails"].add(calls=batches, block=batches * (steps - last), last=batches * last,
                        lens=batches * len(lengths))
    else:
      work["tails_layers"].add(calls=batches, block=batches * steps,
                               lens=batches * sum(lengths))


def readouts_work(work: dict[str, Work], masks: np.ndarray, s: StudyShape, batches: int,
                  per_layer: bool) -> None:
  """`Sweep.readouts(masks)` on `batches` batches: resumed from the unpruned model's
  stream (its trunk read per layer once) when the blocks the masks share outweigh the
  trunk, else the readout program in chunks of masks of one kept-count bucket."""
  L = s.num_layers
  masks = np.asarray(masks, bool)
  first = np.where(masks.all(1), L, np.argmin(masks, axis=1))
  if first.sum() > first.max():
    shared = int(first.max())
    work["stream"].add(calls=batches, embed=batches, block=batches * shared)
    if per_layer:
      work["stream_layers"].add(calls=batches, lens=batches * (shared + 1))
    tails = [int(sum(1 for b in np.flatnonzero(m) if b > d)) for m, d in zip(masks, first)]
    _tails(work, tails, L, s, not per_layer, batches)
    return
  counts = masks.sum(1)
  buckets = np.array([bucket_size(int(k), L) for k in counts])
  name = "readout" if per_layer else "readout_final"
  for bucket in np.unique(buckets):
    for chunk in fixed_groups(list(np.flatnonzero(buckets == bucket)), s.mask_chunk):
      kept = [int(counts[m]) for m in chunk]
      steps = executed_steps(kept, s.in_flight)
      last = 0 if per_layer else len(chunk)
      work[name].add(calls=batches, embed=batches * len(chunk),
                     block=batches * (steps - last), last=batches * last,
                     lens=batches * (sum(k + 1 for k in kept) if per_layer else len(chunk)))


def _curve(work: dict[str, Work], masks: np.ndarray, s: StudyShape, batches: int,
           per_layer: bool) -> None:
  readouts_work(work, masks, s, batches, per_layer)


def _removal_masks(order: Sequence[int], L: int) -> np.ndarray:
  """`[n, L]`: mask `i` removes the first `i + 1` blocks of `order`."""
  masks = np.ones((len(order), L), bool)
  for n in range(len(order)):
    masks[n, list(order[:n + 1])] = False
  return masks


def iterative_work(work: dict[str, Work], s: StudyShape, batches: int, min_layers: int = 1,
                   allowed=None, seed: int = 0) -> list[int]:
  """Iterative Pruning (`pruning.iterative_prune`) on `batches` batches, every candidate
  evaluated on every item (no early stop: an upper bound): at each step with k blocks
  kept, the current model's stream, then the candidates' tails. `allowed(kept)`: the
  blocks a step may remove (default: every kept block). The block each step removes is
  a seeded draw among its candidates (which the search picks is not known before it
  runs); returns them in order."""
  L = s.num_layers
  kept, removed = list(range(L)), []
  rng = np.random.default_rng([seed, 11])
  while len(kept) > min_layers:
    candidates = list(kept if allowed is None else allowed(kept))
    if not candidates:
      break
    k = len(kept)
    position = {b: p for p, b in enumerate(kept)}
    work["stream"].add(calls=batches, embed=batches, block=batches * k)
    _tails(work, [k - 1 - position[c] for c in candidates], L, s, True, batches)
    block = candidates[int(rng.integers(len(candidates)))]
    kept.remove(block)
    removed.append(block)
  return removed


def _screened_work(work: dict[str, Work], s: StudyShape, batches: int, screen: int,
                   seed: int) -> list[int]:
  """The screened search: every candidate on the screen's batches, the best
  `screen_keep` on the calibration batches."""
  L = s.num_layers
  kept, removed = list(range(L)), []
  rng = np.random.default_rng([seed, 13])
  while len(kept) > s.min_layers:
    k = len(kept)
    ranked = list(range(k))
    if k > s.screen_keep:
      work["stream"].add(calls=screen, embed=screen, block=screen * k)
      _tails(work, [k - 1 - p for p in ranked], L, s, True, screen)
      ranked = sorted(rng.permutation(k)[:s.screen_keep].tolist())
    work["stream"].add(calls=batches, embed=batches, block=batches * k)
    _tails(work, [k - 1 - p for p in ranked], L, s, True, batches)
    block = kept[ranked[int(rng.integers(len(ranked)))]]
    kept.remove(block)
    removed.append(block)
  return removed


def noise_work(work: dict[str, Work], s: StudyShape, batches: int, l_star: int) -> None:
  """The noise probe (`dpjax.engine.noise.noised_readouts`), counted as the tails program
  it resembles: per batch the unpruned model's stream, then every variant from its
  first noised block on (each phase arm at every level and seed; the profile, one
  block at a time, every level and profile seed), final readouts only."""
  L = s.num_layers
  arm = s.noise_levels * s.noise_seeds
  starts = ([1] * arm + [l_star] * arm
            + [b for b in range(1, L + 1) for _ in range(s.noise_levels * s.noise_profile_seeds)])
  work["stream"].add(calls=batches, embed=batches, block=batches * L)
  _tails(work, [L - start for start in starts], L, s, True, batches)


def _phase_masks(s: StudyShape, l_star: int, influence: np.ndarray) -> list[np.ndarray]:
  """The phase experiment's masks, one array per selection rule it evaluates
  (`methods.run_phase`)."""
  from dpjax.study import methods, pruning
  L, out = s.num_layers, []
  for selection in s.phase_selections:
    seeds = range(s.phase_seeds) if selection == "random" else [0]
    orders = [pruning.phase_removals(l_star, L, selection, influence, seed) for seed in seeds]
    n_silent, n_decisive = len(orders[0]["silent"]), len(orders[0]["decisive"])
    if not n_silent or not n_decisive:
      continue
    sizes = pruning.phase_sizes(n_silent, n_decisive, s.phase_sizing, s.phase_max_k)
    chosen = set(methods.phase_ks(len(sizes), s.phase_ks))
    masks = []
    for order in orders:
      for k, k_silent, k_decisive in sizes:
        if k not in chosen:
          continue
        for arm, n in (("silent", k_silent), ("decisive", k_decisive)):
          mask = np.ones(L, bool)
          mask[order[arm][:n]] = False
          masks.append(mask)
    out.append(np.array(masks))
  return out


def schedule(s: StudyShape) -> dict[str, Work]:
  """Every call of a whole study, method by method as `dpjax.study.run` makes them: the
  unpruned model's profile (evaluation items) and its transition (calibration items),
  then each of `s.methods` (searches on the calibration items, curves on the evaluation
  items). Counted without the accuracy criterion's early stop (an upper bound), with the
  blocks a search or a ranking removes drawn by a seeded generator (what a search will
  pick is not known before it runs; the curves' cost depends on it a little), and the
  phase methods at l* = `s.l_star`."""
  L = s.num_layers
  work = {name: Work() for name in fit.PROGRAMS}
  ev, cal = s.batches(s.eval_items), s.batches(s.calibration_items)
  rng = np.random.default_rng(0)
  unpruned = np.ones((1, L), bool)
  readouts_work(work, unpruned, s, ev, True)  # the profile
  if not s.methods:
    return work
  readouts_work(work, unpruned, s, s.batches(s.transition_items or s.calibration_items),
                True)  # l* on the calibration items
  from dpjax.study import pruning
  l_star = s.l_star
  decisive = set(range(l_star - 1, L))
  influence = rng.random(L)  # stands in for the block influence the study measures
  one_shot = s.per_layer_curves
  hidden = False  # the unpruned model's hidden states on the calibration items, once
  unpruned_point = False  # the curves' first point, evaluated once
  for method in s.methods:
    if method in ("iterative", "iterative_screened"):
      for c in range(s.criteria):
        if method == "iterative":
          removed = iterative_work(work, s, cal, s.min_layers, seed=c)
        else:
          removed = _screened_work(work, s, cal, s.batches(min(s.screen_items,
                                                               s.calibration_items)), c)
        _curve(work, _removal_masks(removed, L), s, ev, True)
      unpruned_point = True
    elif method in ("block_influence", "angular"):
      hidden = unpruned_point = True
      if method == "block_influence":
        masks = pruning.masks_from_ranking(pruning.block_influence_ranking(influence), L)
      else:
        distances = rng.random((L + 1, L + 1))
        masks = np.ones((L - 1, L), bool)
        for n in range(1, L):
          masks[n - 1, pruning.angular_blocks(distances, n)] = False
      _curve(work, masks, s, ev, one_shot)
    elif method == "single_layer":
      work["stream"].add(calls=cal, embed=cal, block=cal * L)
      _tails(work, [L - 1 - p for p in range(L)], L, s, True, cal)
      _curve(work, pruning.masks_from_ranking(rng.permutation(L), L), s, ev, one_shot)
      unpruned_point = True
    elif method == "reverse":
      _curve(work, pruning.masks_from_ranking(pruning.reverse_ranking(L), L), s, ev, one_shot)
      unpruned_point = True
    elif method == "random":
      masks = np.concatenate([pruning.masks_from_ranking(pruning.random_ranking(L, seed), L)
                              for seed in range(s.random_seeds)])
      _curve(work, masks, s, ev, one_shot)
      unpruned_point = True
    elif method == "phase" and l_star > 1:
      hidden = hidden or "redundant" in s.phase_selections
      for masks in _phase_masks(s, l_star, influence):
        _curve(work, masks, s, ev, one_shot)
    elif method == "noise" and l_star > 1:
      noise_work(work, s, ev, l_star)
    elif method == "phase_aware" and len(decisive) > 1:
      allowed = lambda kept: [b for b in kept if b in decisive] or kept
      removed = iterative_work(work, s, cal, s.min_layers, allowed)
      _curve(work, _removal_masks(removed, L), s, ev, True)
      unpruned_point = True
    elif method == "decisive_only" and ("phase_aware" not in s.methods or len(decisive) == 1):
      removed = iterative_work(work, s, cal, s.min_layers,
                               lambda kept: [b for b in kept if b in decisive])
      _curve(work, _removal_masks(removed, L), s, ev, True)
      unpruned_point = True
  if unpruned_point:
    readouts_work(work, unpruned, s, ev, True)
  if hidden:
    work["stream"].add(calls=cal, embed=cal, block=cal * L)
  return work


# ----------------------------------------------------------------------------
# The study's items: counted and measured as `dpjax` would make them.


class WordPieces:
  """A stand-in tokenizer for a model without one (a preset, a `config.json`): each word
  with the spaces before it, in pieces of at most 4 characters (about what an English BPE
  vocabulary gives), so that prompts can be measured before the model's tokenizer is
  at hand."""

  _PIECE = re.compile(r"\s*\S{1,4}|\s+$")

  def __init__(self):
    self.ids: dict[str, int] = {}

  def _encode(self, text: str) -> list[int]:
    return [self.ids.setdefault(p, len(self.ids)) for p in self._PIECE.findall(text)]

  def __call__(self, texts, add_special_tokens: bool = False) -> dict[str, list[list[int]]]:
    return {"input_ids": [self._encode(t) for t in texts]}

  def convert_ids_to_tokens(self, ids):
    names = {i: p for p, i in self.ids.items()}
    return [names.get(i, "?") for i in ids]


@dataclasses.dataclass(frozen=True)
class StudyItems:
  """The item sets a study runs on, as the plan counts them: evaluation, the search's
  calibration items and the items l* is read on, and the shapes of their widest batch."""
  evaluation: int
  calibration: int
  transition: int
  workload: fit.Workload
  how: str  # how the prompts were measured, for the table
  widths: tuple[tuple[int, int], ...] = ()  # (tokens, batches of that width), all sets

  @property
  def width_share(self) -> float:
    """The batches' mean width over the widest's (1 when not known)."""
    if not self.widths:
      return 1.0
    batches = sum(n for _, n in self.widths)
    return sum(w * n for w, n in self.widths) / batches / max(w for w, _ in self.widths)

  def describe(self) -> str:
    return (f"{self.evaluation} evaluation items, {self.calibration} calibration items "
            f"(l* read on {self.transition}), prompts of up to {self.workload.tokens} tokens "
            f"({self.how})")


def _encode(tokenizer, chosen, dev, s: Settings, max_length: int):
  """Items encoded as `dpjax.study.run.prepare` encodes them."""
  from dpjax import tasks
  if not chosen:
    return None
  shots = tasks.shots_for(chosen, dev, s.k_shot)
  options = dict(max_length=max_length, truncation=s.truncation,
                 add_special_tokens=s.add_special_tokens)
  if s.format == "cloze":
    return tasks.encode_cloze(tokenizer, chosen, [tasks.cloze_requests(item, shot) for item, shot
                                                  in zip(chosen, shots)], **options)
  if s.format in ("open", "generate"):
    return tasks.encode_open(tokenizer, chosen, [tasks.open_prompt(item, shot) for item, shot
                                                 in zip(chosen, shots)], **options)
  return tasks.encode(tokenizer, chosen, [tasks.prompt(item, shot) for item, shot
                                          in zip(chosen, shots)], **options)


def study_items(model_spec: str, study: Settings, cfg: ModelConfig, *, tokens: int = 0,
                options: int = 0, reads: int = 0, rows: int = fit.CPU_ROWS) -> StudyItems:
  """The items `dpjax` would run `study` on: the task's items split into calibration and
  evaluation sets as `dpjax.study.run.select_items` splits them (the synthetic suite is
  generated here, a benchmark read from `--data_dir`), encoded with the model's tokenizer
  (a model without one: `WordPieces`), and batched as the engine batches them (`rows` a
  batch); their widest batch gives the workload's shapes. `tokens`, `options`, `reads`
  (> 0) override what the items give. A task whose items are not here is planned from
  `study.num_items` and `tokens`, which it then needs."""
  from dpjax import tasks
  from dpjax.study import run as study_run
  try:
    _, _, dev, calibration, evaluation = study_run.select_items(study)
  except (tasks.TaskDataError, OSError) as e:
    if not (study.num_items and tokens):
      raise ValueError(f"the items of task {study.task!r} are not here ({e}); give "
                       "--num_items and --tokens to plan without them.") from e
    cal = study.calibration_items if study.methods else 0
    return StudyItems(study.num_items, cal, max(cal, study.transition_items) if cal else 0,
                      fit.Workload(tasks.read_format(study.format), tokens, options or 4, reads),
                      "given: the task's items are not here")
  from dpjax.checkpoints.convert import load_tokenizer
  try:
    tokenizer, how = load_tokenizer(model_spec), "the model's tokenizer"
  except ValueError:
    tokenizer, how = WordPieces(), "estimated: words in pieces of up to 4 characters"
  max_length = study.max_length or cfg.max_position_embeddings
  search = calibration[:study.calibration_items]
  sets = [_encode(tokenizer, chosen, dev, study, max_length)
          for chosen in (evaluation, search, calibration)]
  prepared = [b for enc in sets if enc is not None for b in tasks.batches(
      enc, rows, 0, share_prefix=study.share_prefix)]
  found = fit.Workload.of_batches(prepared, tasks.read_format(study.format))
  widths = collections.Counter(b.input_ids.shape[1] + (0 if b.prefix_ids is None
                                                       else b.prefix_ids.shape[0])
                               for b in prepared)
  if tokens:
    how, widths = "given", {}
  workload = dataclasses.replace(found, tokens=tokens or found.tokens,
                                 options=options or found.options, reads=reads or found.reads)
  return StudyItems(len(evaluation), len(search), len(calibration), workload, how,
                    tuple(sorted(widths.items())))


# ----------------------------------------------------------------------------
# The plan.

# XLA's options for programs compiled for their memory alone (a named TPU target's, which
# nothing runs): the least effort on execution time. The TPU compiler then compiled
# Llama-3-8B's programs for a v5p-8 (32 rows x 640 tokens per shard) 4-5x faster, in CPU
# time: the final-only readout of 16 masks 16 s against 63 s, the tails of 8 candidates
# 17 s against 66 s, the stream 5 s against 22 s; their memory analyses differ by 0.05%
# at most (15 MB of 54 GB). The local target's and the GPU targets' programs (quicker to
# compile; not compared) get the defaults.
COMPILE_ONLY_OPTIONS = {"exec_time_optimization_effort": -1.0}
# The most batch widths whose parts the local target times (each its own compilations).
MAX_TIMED_WIDTHS = 4


def plan(model_spec: str, target_name: str, *, num_items: int = 300,
         calibration_items: int = 64, fmt: str = "letter", tokens: int = 640, options: int = 4,
         reads: int = 0, dtype: str = "bfloat16", model_axis: int = 0, batch_size: int = 0,
         masks_in_flight: int = 0, candidates: int = 0, margin: float = fit.DEFAULT_MARGIN,
         mask_chunk: int = 16, progress=print, study: Settings | None = None,
         items: StudyItems | None = None, transition_block: int = 0) -> dict[str, Any]:
  """The plan of a study of `model_spec` on `target_name` (see the module docstring); a
  JSON-ready record. `fits` is False when some program does not fit even at the smallest
  chunking.

  The study is `study` (default: `dpjax`'s defaults) on `items` (`study_items`); without
  `items`, on `num_items` evaluation and `calibration_items` calibration items in the
  `fmt` format, prompts of `tokens` tokens, `options` options and the cloze format's
  `reads` read positions. `transition_block`: the l* the phase methods are counted at
  (0: `TRANSITION_BEFORE_END` blocks before the last)."""
  started = time.perf_counter()
  cfg = model_config(model_spec, dtype)
  study = study or Settings(num_items=num_items, calibration_items=calibration_items,
                            format=fmt)
  if items is None:
    items = StudyItems(num_items, calibration_items, calibration_items,
                       fit.Workload(fmt, tokens, options, reads), "given")
  workload = items.workload
  fmt = workload.format
  t = target(target_name)
  devices = t.compile_devices()
  axis = model_axis or choose_model_axis(cfg, t)
  if t.devices % axis:
    raise ValueError(f"--model_axis={axis} must divide the {t.devices} devices of {t.name}.")
  placement = Placement(Mesh(np.array(devices).reshape(-1, axis), (DATA, MODEL)))
  platform = "gpu" if t.platform in ("gpu", "cuda") else t.platform
  graphdef, state, compute_dtype = abstract_model(cfg, placement, platform)
  lens = Lens(fmt, vocab_shards=axis)
  abstract = fit.Abstract(placement, local=(t.name == "local"))
  budget = int(t.memory_bytes * (1 - margin))
  rows, in_flight, cands, fixed = fit.ladders(platform, batch_size=batch_size,
                                              masks_in_flight=masks_in_flight,
                                              candidates=candidates,
                                              data_size=placement.data_size)
  cache = fit.ProgramCache(
      lambda live: Programs.build(graphdef, lens, live, True, placement),
      lambda name, chunking, stream_sharding: fit.program_arguments(
          name, cfg.num_layers, cfg.hidden_size, compute_dtype, state, None, workload,
          chunking, abstract, placement.data_size, stream_sharding),
      progress=lambda text: progress(f"{text} ({time.perf_counter() - started:.0f} s so far)"),
      compiler_options=COMPILE_ONLY_OPTIONS if t.name != "local" and t.platform == "tpu"
      else None)
  try:
    compute_bytes = jnp.dtype(compute_dtype).itemsize
    estimate = lambda ch: fit.estimate_peak(cfg, ch, workload, axis,
                                            parameter_bytes(cfg) / axis, compute_bytes)
    fitted = fit.search(cache.memory, budget, rows=rows, in_flight=in_flight,
                        candidates=cands, mask_chunk=mask_chunk, fixed=fixed,
                        estimate=estimate)
    fits, why = True, None
  except fit.DoesNotFit as e:
    fits, why = False, str(e)
    smallest = fit.Chunking(rows[-1], in_flight[-1], cands[-1], mask_chunk)
    fitted = fit.FitResult(smallest, budget, cache.all(smallest), [])
  chunking = fitted.chunking
  compile_seconds = cache.seconds
  timed = t.name == "local" and t.platform == "cpu"
  parts = part_costs(cfg, axis, workload, chunking.rows_per_shard, lens, compute_dtype,
                     timed=timed)
  shape = StudyShape.of(study, cfg.num_layers, items.evaluation, items.calibration,
                        items.transition, batch=chunking.rows_per_shard * placement.data_size,
                        candidates=chunking.candidates, in_flight=chunking.masks_in_flight,
                        transition_block=transition_block)
  work = schedule(shape)
  # Memory is fitted at the widest batch; time goes with each batch's own width: timed at
  # each width the batches have (a few), else the widest's times their mean width's share.
  per_part = {p: parts[p].seconds(t, compute_dtype) * items.width_share for p in parts}
  if timed and not workload.prefix and 1 < len(items.widths) <= MAX_TIMED_WIDTHS:
    batches = sum(n for _, n in items.widths)
    per_part = {p: 0.0 for p in parts}
    for width, n in items.widths:
      at = parts if width == workload.tokens else part_costs(
          cfg, axis, dataclasses.replace(workload, tokens=width), chunking.rows_per_shard,
          lens, compute_dtype, timed=True)
      for p in parts:
        per_part[p] += at[p].measured * n / batches
  programs = {}
  total = 0.0
  for name in fit.PROGRAMS:
    w = work[name]
    seconds = (per_part["embed"] * w.embed + per_part["block"] * w.block
               + per_part["last"] * w.last + per_part["lens"] * w.lens)
    total += seconds
    cost = w.cost(parts) * items.width_share
    calls = max(w.calls, 1)
    programs[name] = {
        "memory": fitted.memory[name].to_json(),
        "fits": fitted.memory[name].peak <= budget,
        "calls": w.calls, "flops_per_call": cost.flops / calls,
        "bytes_per_call": cost.bytes / calls, "seconds_per_call": seconds / calls,
        "seconds": seconds}
  return {
      "model": recorded_path(model_spec), "architecture": cfg.architecture,
      "num_layers": cfg.num_layers, "parameters_gb": parameter_bytes(cfg) / GB, "dtype": dtype,
      "target": t.name, "devices": t.devices, "mesh": {"data": placement.data_size, "model": axis},
      "device_memory_gb": t.memory_bytes / GB, "budget_gb": budget / GB, "margin": margin,
      "peak_tflops": t.peak_flops(compute_dtype) / 1e12, "bandwidth_gbs": t.bandwidth / 1e9,
      "workload": dataclasses.asdict(workload), "num_items": items.evaluation,
      "calibration_items": items.calibration, "transition_items": items.transition,
      "items_measured_by": items.how, "task": study.task, "methods": list(study.methods),
      "transition_block": shape.l_star, "time_from": "measured" if timed else "roofline",
      "chosen": fitted.to_json(), "fits": fits, "why_not": why, "programs": programs,
      "parts": {k: dataclasses.asdict(v) for k, v in parts.items()},
      "predicted_study_seconds": total, "predicted_study_hours": total / 3600,
      "compilations": cache.compiled, "compile_seconds": compile_seconds,
      "plan_seconds": time.perf_counter() - started}
