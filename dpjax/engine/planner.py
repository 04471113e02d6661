"""Planning a study before renting the machine: memory, chunking and time of every program.

`plan(model_spec, target)` builds the model's abstract weights (no download: a preset,
an HF directory or a `config.json`), places them on the target's mesh (the local
devices, or a TPU/GPU topology that is not there, compiled through libtpu or JAX's CUDA
plugin alone), and

1. compiles every program of the study (`sweep.Programs`) ahead of time and lets the
   fit step (`dpjax.engine.fit`) choose rows per data shard, masks in flight and candidates
   per call from the compiled memory against the chip's (TPU compilers also check
   capacity themselves; GPU compile-only figures leave out library workspaces, which
   the margin keeps room for);
2. measures the work of each program's parts with XLA's cost analysis, per device:
   one block on a shard's rows, the last block at the read positions only, and one
   lens readout, compiled at the per-device shapes of the split weights. XLA counts a
   loop's body once, so a program's flops and bytes are its parts times their trip
   counts, which the planner knows (`schedule`);
3. predicts each part's time from the chip's peak figures (the larger of its flops
   over the peak rate and its bytes over the memory bandwidth) and the whole study's
   wall time for N items by counting every call the engine makes (`schedule`, which
   groups masks and candidates as the engine does).

`dpjax-plan` (`dpjax.cli.plan`) prints the table and writes it as JSON.
"""

from __future__ import annotations

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
from dpjax.model.config import ModelConfig
from dpjax.engine.devices import DATA, MODEL, Placement
from dpjax.model.plan import KeepPlan, bucket_size
from dpjax.lens.readout import Lens, Reads, final_readout, packing
from dpjax.engine.sweep import CANDIDATE_GROUP, Programs, step_groups

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
  flops: float
  bytes: float

  def __add__(self, other: "Cost") -> "Cost":
    return Cost(self.flops + other.flops, self.bytes + other.bytes)

  def __mul__(self, n: float) -> "Cost":
    return Cost(self.flops * n, self.bytes * n)

  def seconds(self, t: Target, compute_dtype) -> float:
    return max(self.flops / t.peak_flops(compute_dtype), self.bytes / t.bandwidth)


def _cost_of(compiled) -> Cost:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, list):
    analysis = analysis[0]
  analysis = analysis or {}
  return Cost(float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0)))


def part_costs(cfg: ModelConfig, model_axis: int, workload: fit.Workload, rows: int,
               lens: Lens, compute_dtype) -> dict[str, Cost]:
  """Per-device cost of the `embed`ding (with the rope tables and masks a call makes once),
  one `block` on a shard's rows, the `last` block at the read positions only, and one
  `lens` readout of those rows, from XLA's cost analysis of each compiled alone (no loop)
  on this machine's CPU at the per-device shapes. Flops and bytes are properties of the
  program more than of the chip; the collectives of a split model are left out, and the
  block's and the lens's costs include the rope tables and masks, a small part, that the
  engine makes once per call."""
  from dpjax.model.transformer import Transformer
  shard = shard_config(cfg, model_axis)
  lens = dataclasses.replace(lens, vocab_shards=1)  # the shard holds its own vocabulary
  cpu = jax.local_devices(backend="cpu")[0]
  module = nnx.eval_shape(lambda: Transformer(shard, compute_dtype=compute_dtype, dot_chunk=None,
                                              rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(module)
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  batch = workload.batch(rows)
  sds = lambda x: None if x is None else jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
  ids, attention = sds(batch.input_ids), sds(batch.attention_mask)
  reads = jax.tree.map(sds, Reads.of(batch))
  packed = tuple(sds(p) for p in packing(batch))
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

  compile_ = lambda f, *args: _cost_of(jax.jit(f).lower(*args).compile())
  with jax.default_device(cpu):
    costs = {"embed": compile_(embed, state, ids, attention, packed),
             "block": compile_(block, state, h, attention, packed),
             "last": compile_(last, state, h, attention, packed, reads),
             "lens": compile_(read, state, h, reads)}
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


@dataclasses.dataclass(frozen=True)
class StudyShape:
  """What a whole study runs (the defaults of `dpjax`)."""
  num_layers: int
  eval_items: int
  calibration_items: int = 64
  batch: int = 16               # rows per call (global)
  candidates: int = CANDIDATE_GROUP
  in_flight: int | None = None
  random_seeds: int = 3
  transition_fraction: float = 0.75  # where l* is assumed, for the phase experiment
  per_layer_curves: bool = True


def _tails(work: dict[str, Work], tails: Sequence[int], L: int, s: StudyShape,
           final_only: bool, batches: int) -> None:
  """The tails of masks resuming from a stream, `batches` times: grouped as the engine
  groups them (`sweep.step_groups`)."""
  groups = step_groups(list(range(len(tails))), list(tails), L, s.candidates,
                       pad=s.in_flight is not None)
  for size, group in groups:
    lengths = [0 if m is None else tails[m] for m in group]
    if final_only or size == 0:
      w = work["tails"]
      w.add(calls=batches, block=batches * sum(max(n - 1, 0) for n in lengths),
            last=batches * sum(1 for n in lengths if n > 0), lens=batches * len(lengths))
    else:
      w = work["tails_layers"]
      w.add(calls=batches, block=batches * sum(lengths), lens=batches * sum(lengths))


def _curve(work: dict[str, Work], masks: np.ndarray, s: StudyShape, batches: int,
           per_layer: bool) -> None:
  """A curve's masks through `Sweep.readouts` (resumed from the unpruned stream)."""
  L = s.num_layers
  first = np.where(masks.all(1), L, np.argmin(masks, axis=1))
  shared = int(first.max())
  work["stream"].add(calls=batches, embed=batches, block=batches * shared)
  if per_layer:
    work["stream_layers"].add(calls=batches, lens=batches * (shared + 1))
  tails = [int(sum(1 for b in np.flatnonzero(m) if b > d)) for m, d in zip(masks, first)]
  _tails(work, tails, L, s, not per_layer, batches)


def _removal_masks(order: Sequence[int], L: int) -> np.ndarray:
  masks = np.ones((L - 1, L), bool)
  for n in range(1, L):
    masks[n - 1, list(order[:n])] = False
  return masks


def iterative_work(work: dict[str, Work], s: StudyShape, batches: int, min_layers: int = 1
                   ) -> None:
  """Iterative Pruning from every block to `min_layers` on `batches` batches: at each step
  with k blocks kept, the current model's stream, then the k candidates' tails."""
  L = s.num_layers
  for k in range(L, min_layers, -1):
    work["stream"].add(calls=batches, embed=batches, block=batches * k)
    _tails(work, [k - 1 - p for p in range(k)], L, s, True, batches)


def schedule(s: StudyShape) -> dict[str, Work]:
  """Every call of a whole default study (profile, Iterative Pruning to one block, its curve,
  the one-shot baselines, random over seeds, the phase experiment, the phase-aware method),
  counted without the early stop (an upper bound) and with Iterative Pruning's removals in
  a seeded random order (the curves' cost depends on which blocks go first)."""
  L = s.num_layers
  work = {name: Work() for name in fit.PROGRAMS}
  ev = math.ceil(s.eval_items / s.batch)
  cal = math.ceil(s.calibration_items / s.batch)
  rng = np.random.default_rng(0)
  # The unpruned profile, on both item sets: one mask per call, every layer read.
  work["readout"].add(calls=ev + cal, embed=ev + cal, block=(ev + cal) * L,
                      lens=(ev + cal) * (L + 1))

  for _ in range(2):  # Iterative Pruning, then the phase-aware method
    iterative_work(work, s, cal)
    _curve(work, _removal_masks(rng.permutation(L), L), s, ev, True)
  _tails(work, [L - 1 - p for p in range(L)], L, s, True, cal)  # single-layer ranking
  work["stream"].add(calls=cal, embed=cal, block=cal * L)
  orders = [list(range(L - 1, -1, -1))] + [rng.permutation(L) for _ in range(3 + s.random_seeds)]
  for order in orders:  # reverse, block influence, angular, single layer, random seeds
    _curve(work, _removal_masks(order, L), s, ev, s.per_layer_curves)
  l_star = max(2, int(round(s.transition_fraction * L)))
  max_k = min(l_star - 1, L - l_star + 1)
  masks = []
  for rule in range(2 + s.random_seeds):
    for arm in (range(0, l_star - 1), range(l_star - 1, L)):
      blocks = list(arm)
      order = blocks if rule == 0 else list(rng.permutation(blocks))
      for k in range(1, max_k + 1):
        mask = np.ones(L, bool)
        mask[order[:k]] = False
        masks.append(mask)
  _curve(work, np.array(masks), s, ev, s.per_layer_curves)
  # Block influence: the unpruned model's hidden states on the calibration items.
  work["stream"].add(calls=cal, embed=cal, block=cal * L)
  return work


# ----------------------------------------------------------------------------
# The plan.


def _compile_memory(programs, names, arguments) -> dict[str, fit.ProgramMemory]:
  """Each program's memory; a TPU compiler that refuses a program for want of HBM gives
  the temporaries it asked for."""
  out, stream_sharding = {}, None
  for name in sorted(names, key=lambda n: n != "stream"):
    try:
      compiled = getattr(programs, name).lower(*arguments(name, stream_sharding)).compile()
    except Exception as e:  # RESOURCE_EXHAUSTED on TPUs
      text = str(e)
      if "RESOURCE_EXHAUSTED" not in text and "exceeds" not in text:
        raise
      found = re.search(r"temporaries \(([0-9.]+)([KMGT])\)", text)
      scale = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
      need = float(found.group(1)) * scale[found.group(2)] if found else float("inf")
      out[name] = fit.ProgramMemory(0, 0, int(min(need, 1e18)))
      continue
    out[name] = fit.ProgramMemory.of(compiled)
    if name == "stream":
      stream_sharding = compiled.output_shardings
  return out


def plan(model_spec: str, target_name: str, *, num_items: int, calibration_items: int = 64,
         fmt: str = "letter", tokens: int = 640, options: int = 4, reads: int = 0,
         dtype: str = "bfloat16", model_axis: int = 0, batch_size: int = 0,
         masks_in_flight: int = 0, candidates: int = 0, margin: float = fit.DEFAULT_MARGIN,
         mask_chunk: int = 16, progress=print) -> dict[str, Any]:
  """The plan of a study of `model_spec` on `target_name` for `num_items` evaluation items
  (see the module docstring); a JSON-ready record. `fits` is False when some program
  does not fit even at the smallest chunking."""
  cfg = model_config(model_spec, dtype)
  t = target(target_name)
  devices = t.compile_devices()
  axis = model_axis or choose_model_axis(cfg, t)
  if t.devices % axis:
    raise ValueError(f"--model_axis={axis} must divide the {t.devices} devices of {t.name}.")
  placement = Placement(Mesh(np.array(devices).reshape(-1, axis), (DATA, MODEL)))
  platform = "gpu" if t.platform in ("gpu", "cuda") else t.platform
  graphdef, state, compute_dtype = abstract_model(cfg, placement, platform)
  lens = Lens(fmt, vocab_shards=axis)
  workload = fit.Workload(fmt, tokens, options, reads)
  abstract = fit.Abstract(placement, local=(t.name == "local"))
  budget = int(t.memory_bytes * (1 - margin))
  rows, in_flight, cands, fixed = fit.ladders(platform, batch_size=batch_size,
                                              masks_in_flight=masks_in_flight,
                                              candidates=candidates,
                                              data_size=placement.data_size)
  compiled_at: dict[tuple, fit.ProgramMemory] = {}
  started = time.perf_counter()

  def measure(chunking: fit.Chunking) -> dict[str, fit.ProgramMemory]:
    key = (chunking.rows_per_shard, chunking.masks_in_flight, chunking.candidates)
    if key not in compiled_at:
      programs = Programs.build(graphdef, lens, chunking.masks_in_flight, True, placement)
      progress(f"  compiling 6 programs at {chunking.describe()} "
               f"({time.perf_counter() - started:.0f} s so far)")
      compiled_at[key] = _compile_memory(programs, fit.PROGRAMS, lambda name, ss:
                                         fit.program_arguments(
                                             name, cfg.num_layers, cfg.hidden_size,
                                             compute_dtype, state, None, workload, chunking,
                                             abstract, placement.data_size, ss))
    return compiled_at[key]

  try:
    compute_bytes = jnp.dtype(compute_dtype).itemsize
    estimate = lambda ch: fit.estimate_peak(cfg, ch, workload, axis,
                                            parameter_bytes(cfg) / axis, compute_bytes)
    fitted = fit.search(measure, budget, rows=rows, in_flight=in_flight, candidates=cands,
                        mask_chunk=mask_chunk, fixed=fixed, estimate=estimate)
    fits, why = True, None
  except fit.DoesNotFit as e:
    fits, why = False, str(e)
    smallest = fit.Chunking(rows[-1], in_flight[-1], cands[-1], mask_chunk)
    fitted = fit.FitResult(smallest, budget, measure(smallest), [])
  chunking = fitted.chunking
  compile_seconds = time.perf_counter() - started
  parts = part_costs(cfg, axis, workload, chunking.rows_per_shard, lens, compute_dtype)
  study = StudyShape(cfg.num_layers, num_items, calibration_items,
                     batch=chunking.rows_per_shard * placement.data_size,
                     candidates=chunking.candidates, in_flight=chunking.masks_in_flight)
  work = schedule(study)
  programs = {}
  total = 0.0
  for name in fit.PROGRAMS:
    w = work[name]
    per_part = {p: parts[p].seconds(t, compute_dtype) for p in parts}
    seconds = (per_part["embed"] * w.embed + per_part["block"] * w.block
               + per_part["last"] * w.last + per_part["lens"] * w.lens)
    total += seconds
    cost = w.cost(parts)
    calls = max(w.calls, 1)
    programs[name] = {
        "memory": fitted.memory[name].to_json(),
        "fits": fitted.memory[name].peak <= budget,
        "calls": w.calls, "flops_per_call": cost.flops / calls,
        "bytes_per_call": cost.bytes / calls, "seconds_per_call": seconds / calls,
        "seconds": seconds}
  return {
      "model": model_spec, "architecture": cfg.architecture, "num_layers": cfg.num_layers,
      "parameters_gb": parameter_bytes(cfg) / GB, "dtype": dtype, "target": t.name,
      "devices": t.devices, "mesh": {"data": placement.data_size, "model": axis},
      "device_memory_gb": t.memory_bytes / GB, "budget_gb": budget / GB, "margin": margin,
      "peak_tflops": t.peak_flops(compute_dtype) / 1e12, "bandwidth_gbs": t.bandwidth / 1e9,
      "workload": dataclasses.asdict(workload), "num_items": num_items,
      "calibration_items": calibration_items, "chosen": fitted.to_json(), "fits": fits,
      "why_not": why, "programs": programs,
      "parts": {k: dataclasses.asdict(v) for k, v in parts.items()},
      "predicted_study_hours": total / 3600, "compile_seconds": compile_seconds}
