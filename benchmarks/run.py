"""Every benchmark in one run: dpjax against the straightforward HF-PyTorch way.

    python -m benchmarks.run            # the full run (tens of minutes on two CPU cores)
    python -m benchmarks.run --quick    # a smoke run, a few minutes

Writes `RESULTS.md` (tables) and `results.json` (the same figures) to
`--out_dir` (default `benchmarks/`), with the machine they came from.

1. Iterative Pruning, dpjax against `tests.support.reference` (HF PyTorch), on the
   bundled model and on a random 16-block Llama (hidden 512, vocab 32k, 128
   items). The two must pick the same sequence with the same accuracy and
   Decision Margin at every step; this is checked before any time is reported.
2. Work efficiency: block evaluations executed against the minimum, and the
   sweep's achieved FLOP/s against the dense-matmul FLOP/s measured in this run.
3. Serving a physically pruned variant (`dpjax.serve.server`, kept blocks gathered):
   prefill and KV-cache decode tokens/s for 25% and 50% of the blocks removed,
   against the full model and against the ideal `L / (L - k)`.
4. Scaling of `Sweep.readouts` with the number of masks (1..512) and of items:
   time against the total kept blocks, and peak memory.
5. Compile count and compile time of the sweep against the number of masks.

Ratios come from one process; warm-up (compilation) is excluded unless a
figure says it is included; repeats are reported as median and spread. Without torch
(the default install) the reference does not run: dpjax's side alone, its random
Llamas written with numpy (`benchmarks.common.random_llama_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import threading
import time
from typing import Any, Callable

from absl import app
from absl import flags
import numpy as np

from benchmarks.common import PeakMemory, block_row_flops, has_torch, machine

from benchmarks import common

FLAGS = flags.FlagValues()  # this program's own flags (see common.run_program)

_QUICK = flags.DEFINE_bool("quick", False, "Small models and few items: a smoke run of every "
                           "measurement and check (a few minutes).", flag_values=FLAGS)
_OUT_DIR = flags.DEFINE_string("out_dir", os.path.dirname(os.path.abspath(__file__)),
                               "Where RESULTS.md and results.json go.", flag_values=FLAGS)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats of each short measurement.",
                                flag_values=FLAGS)
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Rewrite RESULTS.md from the "
                                  "results.json in --out_dir (no measurement).", flag_values=FLAGS)
_RESULTS_DIR = flags.DEFINE_string(
    "results_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
    "Where the other suites' results are read from for RESULTS.md.", flag_values=FLAGS)
_MODEL = flags.DEFINE_string("bundled_model", None, "The bundled model's directory (default: the "
                             "one installed with dpjax); empty: skip it.", flag_values=FLAGS)

RESULTS_MD = "RESULTS.md"
RESULTS_JSON = "results.json"


# ----------------------------------------------------------------------------
# Measuring.


def timed(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
  """Median and spread (max - min) of `repeats` calls of `fn`, after one warm-up call."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return {"median": float(np.median(times)), "spread": float(np.max(times) - np.min(times)),
          "repeats": repeats}


def matmul_gflops(n: int, repeats: int) -> dict[str, float]:
  """Dense float32 `n x n` matmul rate of JAX on this machine (the FLOP/s yardstick)."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  t = timed(lambda: f(a, b).block_until_ready(), max(repeats, 5))
  return {"n": n, "gflops": 2 * n**3 / t["median"] / 1e9, "seconds": t}


# ----------------------------------------------------------------------------
# 1-2. Iterative Pruning against the HF-PyTorch reference.


@dataclasses.dataclass
class Case:
  name: str
  directory: str           # an HF checkpoint directory (config.json + safetensors)
  tokenizer: Any
  num_items: int
  batch_size: int
  min_layers: int
  hf_repeats: int
  dpjax_repeats: int
  # A real model: what dpjax loads (a GGUF file; default `directory`), what HF's loading
  # takes besides `directory` (its `gguf_file`), and the items (default: synthetic ones).
  dpjax_path: str | None = None
  hf_kwargs: dict = dataclasses.field(default_factory=dict)
  encoded: Any = None


def random_llama(directory: str, layers: int, hidden: int, vocab: int, tokenizer) -> str:
  """A random HF Llama written with `save_pretrained` (with numpy where torch is not
  installed), with `tokenizer` beside it."""
  heads = max(1, hidden // 64)
  config = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                max_position_embeddings=512)
  if has_torch():
    from tests.support import reference
    reference.build_hf_model("llama", config, seed=0).save_pretrained(directory)
  else:
    from benchmarks.common import random_llama_checkpoint
    random_llama_checkpoint(directory, config, seed=0)
  tokenizer.save_pretrained(directory)
  return directory


def _encoded(case: Case):
  if case.encoded is not None:
    return case.encoded
  from dpjax import tasks
  from dpjax.tasks import synthetic
  items = synthetic.generate("test", case.num_items, seed=0)
  return tasks.encode(case.tokenizer, items, [tasks.prompt(i) for i in items])


def iterative(case: Case) -> dict[str, Any]:
  """One case of measurement 1: both implementations, checked against each other, timed
  (dpjax alone where torch is not installed: the reference's fields are None)."""
  import dpjax
  from dpjax.study import pruning
  from dpjax.engine.compilation import CompileCounter
  from dpjax.engine.sweep import Sweep

  print(f"\n== Iterative Pruning: {case.name}", flush=True)
  model = dpjax.load_model(case.dpjax_path or case.directory, dtype="float32")
  encoded = _encoded(case)
  pad = case.tokenizer.pad_token_id or 0

  # dpjax, cold: compilation included.
  records: list[tuple[int, float, float]] = []

  def on_step(block, kept, stats):
    records.append((block, stats.correct / stats.items, stats.margin_sum / stats.items))

  counter = CompileCounter()
  cold_sweep = Sweep(model, encoded, batch_size=case.batch_size, pad_id=pad)
  start = time.perf_counter()
  order = pruning.iterative_prune(cold_sweep, criterion="accuracy", min_layers=case.min_layers,
                                  on_step=on_step)
  cold = time.perf_counter() - start
  programs, compile_seconds = counter.programs, counter.seconds
  print(f"dpjax (compiling as it goes): {cold:.1f} s, {programs} programs", flush=True)

  # dpjax, warm: the same run with every program compiled, timed per program kind.
  warm_times = []
  phases = {"stream": 0.0, "candidates": 0.0}
  for _ in range(case.dpjax_repeats):
    warm = Sweep(model, encoded, batch_size=case.batch_size, pad_id=pad, time_phases=True)
    start = time.perf_counter()
    again = pruning.iterative_prune(warm, criterion="accuracy", min_layers=case.min_layers)
    warm_times.append(time.perf_counter() - start)
    if again != order:
      raise SystemExit(f"{case.name}: dpjax chose {again} on a rerun, {order} the first time.")
    for key in phases:
      phases[key] += warm.phase_seconds[key] / case.dpjax_repeats
  # No compiled rerun (`dpjax_repeats=0`, a long case): the cold run's time, less its
  # compile time, stands for it.
  warm_s = float(np.median(warm_times)) if warm_times else cold - compile_seconds
  print(f"dpjax (compiled): {warm_s:.1f} s" + ("" if warm_times else " (cold run less its "
                                                "compile time)"), flush=True)

  # Same sequence, same numbers, checked at every step as the reference takes it (a long
  # run fails at once). The reference evaluates every candidate itself and walks dpjax's
  # sequence; where its own pick differs, the two picks must tie (equal accuracy, mean DM
  # within 1e-5): a float32 near-tie, not a bug.
  near_ties: list[int] = []
  seen: list[dict] = []  # the reference's steps so far
  worst = [0.0]

  def check(s):
    i = len(seen)
    seen.append(s)
    block, acc, margin = records[i]
    print(f"  reference step {i + 1}: removed block {s['removed'] + 1}", flush=True)
    if s["choice"] != block:
      tie = (abs(s["choice_accuracy"] - s["accuracy"]) < 1e-9
             and abs(s["choice_margin"] - s["margin"]) <= 1e-5)
      if not tie:
        raise SystemExit(
            f"{case.name}: step {i + 1}: dpjax removed block {block + 1} (HF scores it "
            f"accuracy {s['accuracy']:.4f}, mean DM {s['margin']:.6f}), the HF reference "
            f"would remove block {s['choice'] + 1} (accuracy {s['choice_accuracy']:.4f}, mean "
            f"DM {s['choice_margin']:.6f}).")
      near_ties.append(i + 1)
    if abs(acc - s["accuracy"]) > 1e-9:
      raise SystemExit(f"{case.name}: removing block {block + 1}: dpjax accuracy {acc}, HF "
                       f"{s['accuracy']}.")
    worst[0] = max(worst[0], abs(margin - s["margin"]))
    if worst[0] > 1e-4:
      raise SystemExit(f"{case.name}: removing block {block + 1}: mean Decision Margins differ "
                       f"by {worst[0]:.2e} > 1e-4.")

  # The reference, timed after one warm-up forward.
  hf_times, ref_order, hf_block_rows = [], None, None
  if has_torch():
    import transformers
    from tests.support.reference import HFIterativeReference
    hf = transformers.AutoModelForCausalLM.from_pretrained(case.directory, dtype="float32",
                                                           **case.hf_kwargs).eval()
    ref = HFIterativeReference(hf, cold_sweep.batches)  # its first call is the warm-up
    steps = None
    for _ in range(case.hf_repeats):
      ref.block_rows = 0
      near_ties.clear()
      seen.clear()
      start = time.perf_counter()
      steps = ref.iterative_prune(model.num_layers, case.min_layers, follow=order, on_step=check)
      hf_times.append(time.perf_counter() - start)
    ref_order = [s["choice"] + 1 for s in steps]
    hf_block_rows = ref.block_rows
  hf_s = float(np.median(hf_times)) if hf_times else None
  print(f"HF PyTorch reference: {hf_s:.1f} s" if hf_times else
        "HF PyTorch reference: not run (torch is not installed)", flush=True)
  worst_margin = worst[0] if hf_times else None

  c = cold_sweep.counters
  cfg = model.config
  tokens = int(cold_sweep.batches[0].input_ids.shape[1])
  lens = 2.0 * cfg.hidden_size * cfg.vocab_size  # one final readout of one row
  # Executed work: block-rows run, plus one final lens per candidate row (an upper
  # bound: candidates stopped early skip some).
  readout_rows = sum(len(kept) for kept in _kept_sets(model.num_layers, order)) \
      * len(cold_sweep.batches) * case.batch_size
  flops = c.executed * block_row_flops(cfg, tokens) + readout_rows * lens
  return {
      "case": case.name, "layers": cfg.num_layers, "hidden": cfg.hidden_size,
      "vocab": cfg.vocab_size, "items": case.num_items, "batch_size": case.batch_size,
      "padded_tokens": tokens, "min_layers": case.min_layers,
      "removed_order": [b + 1 for b in order],
      "reference_removed_order": ref_order,
      "near_tie_steps": near_ties,
      "max_mean_margin_difference": worst_margin,
      "dpjax_seconds_with_compilation": cold, "dpjax_seconds": warm_s,
      "dpjax_seconds_all": warm_times, "dpjax_phase_seconds": phases,
      "hf_seconds": hf_s, "hf_seconds_all": hf_times,
      "speedup": None if hf_s is None else hf_s / warm_s,
      "speedup_with_compilation": None if hf_s is None else hf_s / cold,
      "compiled_programs": programs, "compile_seconds": compile_seconds,
      "block_evaluations": {"executed": c.executed, "minimum": c.minimum, "naive": c.naive,
                            "executed_over_minimum": c.executed / c.minimum,
                            "hf_reference": hf_block_rows},
      "candidates_stopped_early": c.stopped_early,
      "sweep_gflops": flops / warm_s / 1e9,
  }


def _kept_sets(num_layers: int, order: list[int]):
  """The kept set before each step (whose every block is one candidate)."""
  kept = list(range(num_layers))
  for block in order:
    yield list(kept)
    kept.remove(block)


# ----------------------------------------------------------------------------
# 3. Serving a physically pruned variant.


def serving(directory: str, quick: bool, repeats: int) -> dict[str, Any]:
  import jax
  import dpjax
  from dpjax.serve import server as serve
  model = dpjax.load_model(directory, dtype="float32")
  cfg = model.config
  n = cfg.num_layers
  batch, prompt = (2, 32) if quick else (8, 128)
  short, long = (4, 20) if quick else (8, 40)
  repeats = max(repeats, 3)
  rng = np.random.default_rng(0)
  ids = rng.integers(3, min(cfg.vocab_size, 500), size=(batch, prompt)).astype(np.int32)
  rows = []
  full = {}
  block = block_row_flops(cfg, 1)
  head = 2.0 * cfg.hidden_size * cfg.vocab_size
  for removed_fraction in (0.0, 0.25, 0.5):
    k = int(round(n * removed_fraction))
    # Remove evenly spaced blocks (speed does not depend on which).
    removed = set(np.linspace(0, n - 1, k).round().astype(int).tolist()) if k else set()
    keep = dpjax.keep_mask([b for b in range(n) if b not in removed], n)
    server = serve.Server(model, keep)
    pre = timed(lambda: jax.block_until_ready(server.prefill(ids)), repeats)
    gen_short = timed(lambda: jax.block_until_ready(
        server.generate(ids, max_new_tokens=short)), repeats)
    gen_long = timed(lambda: jax.block_until_ready(
        server.generate(ids, max_new_tokens=long)), repeats)
    prefill_tps = batch * prompt / pre["median"]
    decode_tps = batch * (long - short) / (gen_long["median"] - gen_short["median"])
    row = {"blocks_removed": k, "blocks_kept": n - k, "prefill_seconds": pre,
           "prefill_tokens_per_second": prefill_tps,
           "decode_seconds_short": gen_short, "decode_seconds_long": gen_long,
           "decode_tokens_per_second": decode_tps,
           "ideal_speedup": n / (n - k),
           # The unembedding is not pruned: the best a per-token cost model allows.
           "decode_bound_with_unembedding": (n * block + head) / ((n - k) * block + head)}
    if k == 0:
      full = row
    row["prefill_speedup"] = prefill_tps / full["prefill_tokens_per_second"]
    row["decode_speedup"] = decode_tps / full["decode_tokens_per_second"]
    row["prefill_of_ideal"] = row["prefill_speedup"] / row["ideal_speedup"]
    row["decode_of_ideal"] = row["decode_speedup"] / row["ideal_speedup"]
    rows.append(row)
    print(f"serving, {k} of {n} blocks removed: prefill {prefill_tps:.0f} tok/s, decode "
          f"{decode_tps:.0f} tok/s", flush=True)
  return {"layers": n, "hidden": cfg.hidden_size, "vocab": cfg.vocab_size, "batch": batch,
          "prompt_tokens": prompt, "decode_tokens": [short, long], "rows": rows}


# ----------------------------------------------------------------------------
# 4-5. Scaling with masks and items; compile counts.


def scaling(directory: str, tokenizer, quick: bool, repeats: int) -> dict[str, Any]:
  import dpjax
  from dpjax import tasks
  from dpjax.engine.compilation import CompileCounter
  from dpjax.tasks import synthetic
  from dpjax.engine.sweep import Sweep
  model = dpjax.load_model(directory, dtype="float32")
  n = model.num_layers
  items = synthetic.generate("test", 64 if quick else 256, seed=0)
  encoded_all = tasks.encode(tokenizer, items, [tasks.prompt(i) for i in items])

  def masks_of(m):
    rng = np.random.default_rng(m)  # the same masks for the same count
    masks = np.zeros((m, n), bool)
    for row in masks:
      row[rng.choice(n, size=int(rng.integers(1, n + 1)), replace=False)] = True
    return masks

  def measure(m, num_items):
    encoded = encoded_all.subset(range(num_items))
    masks = masks_of(m)
    sweep = Sweep(model, encoded, batch_size=16, pad_id=tokenizer.pad_token_id or 0)
    counter = CompileCounter()
    start = time.perf_counter()
    with PeakMemory() as first_memory:
      sweep.readouts(masks)
    first = time.perf_counter() - start
    programs, compile_seconds = counter.programs, counter.seconds
    with PeakMemory() as memory:
      t = timed(lambda: sweep.readouts(masks), repeats)
    kept_block_rows = int(masks.sum()) * len(sweep.batches) * 16
    return {"masks": m, "items": num_items, "total_kept_blocks": int(masks.sum()),
            "kept_block_rows": kept_block_rows, "seconds": t,
            "microseconds_per_kept_block_row": 1e6 * t["median"] / kept_block_rows,
            "first_call_seconds": first, "compile_seconds": compile_seconds,
            "compiled_programs": programs, "peak_memory_added_mb": memory.added_mb,
            "peak_memory_added_mb_first_call": first_memory.added_mb}

  mask_counts = (1, 4, 16) if quick else (1, 8, 64, 512)
  item_counts = (16, 64) if quick else (16, 64, 256)
  by_masks = []
  for m in mask_counts:
    by_masks.append(measure(m, 32 if quick else 64))
    print(f"scaling: {m} masks: {by_masks[-1]['seconds']['median']:.2f} s, "
          f"{by_masks[-1]['compiled_programs']} programs", flush=True)
  by_items = []
  for num in item_counts:
    by_items.append(measure(16, num))
    print(f"scaling: {num} items: {by_items[-1]['seconds']['median']:.2f} s", flush=True)
  return {"layers": n, "hidden": model.config.hidden_size, "vocab": model.config.vocab_size,
          "by_masks": by_masks, "by_items": by_items,
          "program_memory": program_memory(model, encoded_all.subset(range(16)),
                                           tokenizer.pad_token_id or 0)}


def program_memory(model, encoded, pad_id: int, chunks=(1, 4, 16)) -> list[dict[str, Any]]:
  """XLA's own count of the working memory (temporaries) of the vmapped readout program,
  per number of masks it runs together (`--mask_chunk`), for one batch of 16 items.

  A sweep runs masks `mask_chunk` at a time, so its peak above the result arrays is one
  such program's temporaries, whatever the number of masks: this is the figure that sets
  it, free of the allocator's and the sampler's noise.
  """
  from dpjax.lens.readout import DecisionReader, Reads, mask_steps, packing, shared_prefix
  from dpjax.tasks import batches
  reader = DecisionReader(model)
  batch = batches(encoded, 16, pad_id)[0]
  rows = []
  for m in chunks:
    index, valid = mask_steps(np.ones((m, model.num_layers), bool))
    for final_only in (False, True):
      compiled = reader._fns[final_only].lower(
          model.state, None, batch.input_ids, batch.attention_mask, Reads.of(batch),
          packing(batch), shared_prefix(batch), index, valid).compile()
      analysis = compiled.memory_analysis()
      rows.append({"masks_per_program": m, "final_only": final_only,
                   "tokens": list(batch.input_ids.shape),
                   "temp_mb": analysis.temp_size_in_bytes / 2**20,
                   "output_mb": analysis.output_size_in_bytes / 2**20})
  return rows


# ----------------------------------------------------------------------------
# The report.


def _goal(value: float, goal: float, above: bool) -> str:
  met = value >= goal if above else value <= goal
  return "met" if met else "missed"


def _torch(m: dict[str, Any]) -> str:
  """The reference's library, or that it was not there."""
  if m.get("torch") is None:
    return "no torch (the HF-PyTorch reference did not run)"
  return f"torch {m['torch']} with {m['torch_threads']} threads"


def results_markdown(r: dict[str, Any]) -> str:
  m = r["machine"]
  lines = [
      "# dpjax benchmarks",
      "",
      f"`python -m benchmarks.run{' --quick' if r['quick'] else ''}`, one process. Machine: "
      f"{m['cpu_count']} CPU cores ({m['processor']}), {m['platform']}; JAX {m['jax']} on "
      f"{', '.join(sorted(set(m['jax_devices'])))}; {_torch(m)}. Dense float32 matmul "
      f"({r['matmul']['n']}^2, JAX): "
      f"{r['matmul']['gflops']:.1f} GFLOP/s.",
      "",
      "## 1-2. Iterative Pruning against HF PyTorch (same sequence and metrics checked)",
      "",
      "| model | items x tokens | steps | HF s | dpjax s (compiled) | speedup (goal >= 5x) | "
      "dpjax s incl. compile | speedup incl. compile | executed / minimum (goal <= 1.05) | "
      "sweep GFLOP/s (% of matmul, goal >= 50%) |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for c in r["iterative"]:
    pct = 100 * c["sweep_gflops"] / r["matmul"]["gflops"]
    e = c["block_evaluations"]["executed_over_minimum"]
    if c["hf_seconds"] is None:  # no torch: dpjax's side alone
      hf, speedup, with_compile = "-", "-", "-"
    else:
      hf = f"{c['hf_seconds']:.1f}"
      speedup = f"{c['speedup']:.2f}x ({_goal(c['speedup'], 5, True)})"
      with_compile = f"{c['speedup_with_compilation']:.2f}x"
    lines.append(
        f"| {c['case']} ({c['layers']} blocks, hidden {c['hidden']}, vocab {c['vocab']}) | "
        f"{c['items']} x {c['padded_tokens']} | {len(c['removed_order'])} | "
        f"{hf} | {c['dpjax_seconds']:.1f} | {speedup} | "
        f"{c['dpjax_seconds_with_compilation']:.1f} | {with_compile} | "
        f"{e:.3f} ({_goal(e, 1.05, False)}) | "
        f"{c['sweep_gflops']:.1f} ({pct:.0f}%, {_goal(pct, 50, True)}) |")
  lines += ["", "Where dpjax's compiled time goes (blocking timers around each program):", ""]
  for c in r["iterative"]:
    ph = c["dpjax_phase_seconds"]
    rest = c["dpjax_seconds"] - sum(ph.values())
    hf_rows = c["block_evaluations"]["hf_reference"]
    lines.append(f"- {c['case']}: current-model streams {ph['stream']:.1f} s, candidate tails "
                 f"{ph['candidates']:.1f} s, host (batching, stats, choice) {rest:.1f} s; "
                 f"{c['compiled_programs']} programs compiled; "
                 f"{c['candidates_stopped_early']} candidate evaluations stopped early; "
                 + (f"HF ran {hf_rows:,} block-rows, dpjax " if hf_rows is not None
                    else "dpjax ran ")
                 + f"{c['block_evaluations']['executed']:,}.")
  s = r["serving"]
  lines += [
      "",
      f"## 3. Serving a physically pruned variant ({s['layers']} blocks, hidden {s['hidden']}, "
      f"vocab {s['vocab']}; batch {s['batch']}, prompt {s['prompt_tokens']} tokens; decode "
      f"rate from {s['decode_tokens'][0]} vs {s['decode_tokens'][1]} new tokens)",
      "",
      "| blocks removed | prefill tok/s | prefill speedup | of ideal (goal >= 90%) | decode "
      "tok/s | decode speedup | of ideal (goal >= 90%) | ideal L/(L-k) | decode bound with "
      "the unpruned unembedding |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for row in s["rows"]:
    lines.append(
        f"| {row['blocks_removed']} of {s['layers']} | {row['prefill_tokens_per_second']:.0f} | "
        f"{row['prefill_speedup']:.2f}x | {100 * row['prefill_of_ideal']:.0f}% | "
        f"{row['decode_tokens_per_second']:.0f} | {row['decode_speedup']:.2f}x | "
        f"{100 * row['decode_of_ideal']:.0f}% | {row['ideal_speedup']:.2f}x | "
        f"{row['decode_bound_with_unembedding']:.2f}x |")
  sc = r["scaling"]
  lines += [
      "",
      f"## 4-5. Scaling of `Sweep.readouts` ({sc['layers']} blocks, hidden {sc['hidden']}, "
      f"vocab {sc['vocab']}; random masks)",
      "",
      "| masks | items | kept blocks | s (median, spread) | us per kept block-row | peak memory "
      "added MB (warm / first call) | programs compiled | compile s (est.) |",
      "|---|---|---|---|---|---|---|---|",
  ]
  for row in sc["by_masks"] + sc["by_items"]:
    t = row["seconds"]
    lines.append(
        f"| {row['masks']} | {row['items']} | {row['total_kept_blocks']} | {t['median']:.3f} "
        f"({t['spread']:.3f}) | {row['microseconds_per_kept_block_row']:.1f} | "
        f"{row['peak_memory_added_mb']:.1f} / {row['peak_memory_added_mb_first_call']:.1f} | "
        f"{row['compiled_programs']} | "
        f"{row.get('compile_seconds', row.get('compile_seconds_estimate', float('nan'))):.1f} |")
  memory = sc.get("program_memory")
  if memory:
    tokens = memory[0]["tokens"]
    lines += ["", "The peak above the results is one vmapped program's working memory, set by "
              "how many masks run together (`--mask_chunk`, 16 by default) and the item batch, "
              "not by the number of masks; XLA's count of its temporaries (batch "
              f"{tokens[0]} x {tokens[1]} tokens):", "",
              "| masks per program | every layer read MB | last layer only MB |", "|---|---|---|"]
    by = {(r["masks_per_program"], r["final_only"]): r["temp_mb"] for r in memory}
    for m in sorted({r["masks_per_program"] for r in memory}):
      lines.append(f"| {m} | {by[(m, False)]:.1f} | {by[(m, True)]:.1f} |")
  from benchmarks import measured
  where = _RESULTS_DIR.value
  plan = measured._read(os.path.join(where, "plan.json"))
  for side in (measured.planning_markdown(plan) if plan else "",
               measured.interleaved_markdown(os.path.join(where, "interleaved.json")),
               measured.shared_prefix_markdown(os.path.join(where, "shared_prefix.json")),
               measured.bf16_markdown(os.path.join(where, "bf16.json")),
               measured.resume_markdown(os.path.join(where, "resume.json")),
               measured.lm_eval_markdown(os.path.join(where, "lm_eval.json")),
               measured.llama_cpp_markdown(os.path.join(where, "llama_cpp.json")),
               measured.end_to_end_markdown(os.path.join(where, "end_to_end.json"))):
    if side:
      lines += ["", side.rstrip()]
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  from dpjax.tasks import synthetic
  from dpjax.fileio import atomic_write_text
  from dpjax.bundled import BUNDLED_MODEL
  import transformers

  if _REPORT_ONLY.value:
    with open(os.path.join(_OUT_DIR.value, RESULTS_JSON)) as f:
      atomic_write_text(os.path.join(_OUT_DIR.value, RESULTS_MD), results_markdown(json.load(f)))
    return
  quick, repeats = _QUICK.value, (1 if _QUICK.value else _REPEATS.value)
  if has_torch():
    import torch
    torch.set_num_threads(os.cpu_count() or 1)
  bundled = BUNDLED_MODEL if _MODEL.value is None else _MODEL.value
  started = time.perf_counter()
  with tempfile.TemporaryDirectory() as tmp:
    if quick and bundled and os.path.isdir(bundled):  # the same kind of tokenizer, trained
      suite_tokenizer = transformers.AutoTokenizer.from_pretrained(bundled)
    else:
      suite_tokenizer = synthetic.build_tokenizer(
          synthetic.training_text(synthetic.generate("train", 400)), 512)
    big = (dict(layers=4, hidden=64, vocab=1000) if quick
           else dict(layers=16, hidden=512, vocab=32000))
    big_dir = random_llama(os.path.join(tmp, "random"), **big, tokenizer=suite_tokenizer)
    # A smoke run measures scaling on the same small model (the full run on a mid-sized one).
    small_dir = big_dir if quick else random_llama(os.path.join(tmp, "small"), layers=16,
                                                   hidden=128, vocab=8000,
                                                   tokenizer=suite_tokenizer)
    cases = []
    # A smoke run: one batch of items, one step on the bundled model.
    if bundled and os.path.isdir(bundled):
      cases.append(Case("bundled model", bundled,
                        transformers.AutoTokenizer.from_pretrained(bundled),
                        num_items=16 if quick else 128, batch_size=16,
                        min_layers=15 if quick else 1, hf_repeats=1 if quick else 3,
                        dpjax_repeats=1 if quick else 3))
    cases.append(Case("random Llama", big_dir, suite_tokenizer, num_items=16 if quick else 128,
                      batch_size=16, min_layers=1, hf_repeats=1, dpjax_repeats=1))
    os.makedirs(_OUT_DIR.value, exist_ok=True)

    def save():  # after every measurement, so a long run that is stopped keeps what it has
      atomic_write_text(os.path.join(_OUT_DIR.value, RESULTS_JSON), json.dumps(results, indent=2))

    results = {"quick": quick, "machine": machine(),
               "matmul": matmul_gflops(1024 if quick else 2048, repeats), "iterative": []}
    print(f"dense matmul: {results['matmul']['gflops']:.1f} GFLOP/s", flush=True)
    for case in cases:
      results["iterative"].append(iterative(case))
      save()
    results["serving"] = serving(big_dir, quick, repeats)
    save()
    results["scaling"] = scaling(small_dir, suite_tokenizer, quick, repeats)
  results["total_seconds"] = time.perf_counter() - started
  save()
  markdown = results_markdown(results)
  atomic_write_text(os.path.join(_OUT_DIR.value, RESULTS_MD), markdown)
  print("\n" + markdown)
  print(f"wrote {os.path.join(_OUT_DIR.value, RESULTS_MD)} and {RESULTS_JSON} "
        f"({results['total_seconds']:.0f} s)")


if __name__ == "__main__":
  common.run_program(main, FLAGS)
