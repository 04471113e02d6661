"""The planner's table, and its prediction checked against measured times on this machine.

    python -m benchmarks.planning --part=calibrate     # local CPU: predicted / measured
    python -m benchmarks.planning --part=table         # the four rows (needs .[plan])

`calibrate`: `dpjax-plan --target=local`'s model of each program (its parts' costs from
XLA's cost analysis, times the parts a call runs, at this machine's measured matmul rate
and copy bandwidth) against the program run for real on the bundled model, one
representative call each (every block kept; 8 drop-one candidates), median of repeats.

`table`: Llama-3-8B on 1xH200 and v5p-8, Llama-3-70B on 8xH100 and v5p-64 (MMLU 5-shot,
letter format, prompts of 640 tokens, 300 evaluation items): each row compiled ahead of
time for the topology by `dpjax.planner.plan`, in a process of its own.

Results go to `benchmarks/results/plan.json`; `--report_only` renders the Markdown.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from absl import app
from absl import flags
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "plan.json")

_PART = flags.DEFINE_enum("part", "calibrate", ["calibrate", "table", "both"], "What to run.")
_OUT = flags.DEFINE_string("out", RESULTS, "The JSON file (updated, other parts kept).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls of each program.")
_ROWS = flags.DEFINE_string("rows", "", "Only these rows of the table (names, comma-separated).")

TABLE = (("llama3-8b", "1xH200"), ("llama3-8b", "v5p-8"), ("llama3-70b", "8xH100"),
         ("llama3-70b", "v5p-64"))


def calibrate(model_dir: str | None = None, rows: int = 16, tokens: int = 96,
              repeats: int = 5) -> dict[str, Any]:
  """Per program: predicted and measured seconds of one call on the local devices."""
  import jax
  import jax.numpy as jnp

  import dpjax
  from dpjax import fit, planner
  from dpjax.bundled import BUNDLED_MODEL
  from dpjax.readout import Lens, Reads, packing
  from dpjax.sweep import Programs

  model = dpjax.load_model(model_dir or BUNDLED_MODEL)
  cfg, L = model.config, model.num_layers
  lens = Lens("letter")
  workload = fit.Workload("letter", tokens, 4)
  target = planner.local_target()
  parts = planner.part_costs(cfg, 1, workload, rows, lens, model.compute_dtype)
  programs = Programs.build(model.graphdef, lens, 1, True, None)
  batch = workload.batch(rows)
  rng = np.random.default_rng(0)
  batch.input_ids = rng.integers(3, cfg.vocab_size, batch.input_ids.shape).astype(np.int32)
  batch.letter_ids = rng.integers(3, cfg.vocab_size, batch.letter_ids.shape).astype(np.int32)
  reads, packed = Reads.of(batch), packing(batch)
  full = (np.arange(L, dtype=np.int32), np.ones(L, bool))
  stream = programs.stream(model.state, batch.input_ids, batch.attention_mask, packed, None,
                           *full)
  c = 8
  tails = [tuple(range(p + 1, L)) for p in range(c)]  # dropping block p of the full model
  index = np.zeros((c, L), np.int32)
  valid = np.zeros((c, L), bool)
  for i, t in enumerate(tails):
    index[i, :len(t)], valid[i, :len(t)] = t, True
  starts = np.arange(c, dtype=np.int32)
  lengths = [len(t) for t in tails]
  W = planner.Work
  calls = {
      "readout": (lambda: programs.readout(model.state, None, batch.input_ids,
                                           batch.attention_mask, reads, packed, None,
                                           full[0][None], full[1][None]),
                  W(calls=1, embed=1, block=L, lens=L + 1)),
      "readout_final": (lambda: programs.readout_final(model.state, None, batch.input_ids,
                                                       batch.attention_mask, reads, packed,
                                                       None, full[0][None], full[1][None]),
                        W(calls=1, embed=1, block=L - 1, last=1, lens=1)),
      "stream": (lambda: programs.stream(model.state, batch.input_ids, batch.attention_mask,
                                         packed, None, *full),
                 W(calls=1, embed=1, block=L)),
      "tails": (lambda: programs.tails(model.state, None, stream, starts, batch.attention_mask,
                                       packed, None, reads, index, valid),
                W(calls=1, block=sum(n - 1 for n in lengths), last=c, lens=c)),
      "tails_layers": (lambda: programs.tails_layers(model.state, None, stream, starts,
                                                     batch.attention_mask, packed, None, reads,
                                                     index, valid),
                       W(calls=1, block=sum(lengths), lens=sum(lengths))),
      "stream_layers": (lambda: programs.stream_layers(model.state, None, stream,
                                                       np.int32(L + 1), reads),
                        W(calls=1, lens=L + 1)),
  }
  out = {}
  for name, (call, work) in calls.items():
    jax.block_until_ready(call())
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(call())
      times.append(time.perf_counter() - start)
    measured = float(np.median(times))
    seconds = {p: parts[p].seconds(target, model.compute_dtype) for p in parts}
    predicted = (seconds["embed"] * work.embed + seconds["block"] * work.block
                 + seconds["last"] * work.last + seconds["lens"] * work.lens)
    out[name] = {"predicted_s": predicted, "measured_s": measured,
                 "spread_s": float(np.max(times) - np.min(times)),
                 "ratio": predicted / measured}
  return {"model": "bundled" if model_dir is None else model_dir, "rows": rows,
          "tokens": tokens, "target": {"flops": target.f32_flops,
                                       "bandwidth": target.bandwidth},
          "parts": {k: {"flops": v.flops, "bytes": v.bytes} for k, v in parts.items()},
          "programs": out}


def table_row(model: str, target: str, num_items: int = 300) -> dict[str, Any]:
  """One row, planned in a fresh process (the topology's compiler is loaded once)."""
  code = ("import json, sys\n"
          "from dpjax import planner\n"
          f"p = planner.plan({model!r}, {target!r}, num_items={num_items}, progress=lambda s: "
          "print(s, file=sys.stderr, flush=True))\n"
          "print(json.dumps(p))\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  started = time.perf_counter()
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=4 * 3600)
  if result.returncode != 0:
    raise RuntimeError(f"{model} on {target}: {result.stderr[-3000:]}")
  row = json.loads(result.stdout.strip().splitlines()[-1])
  row["wall_seconds"] = time.perf_counter() - started
  return row


def markdown(results: dict[str, Any]) -> str:
  lines = ["## The planner (`dpjax-plan`, `benchmarks/planning.py`)", ""]
  rows = results.get("table", [])
  if rows:
    lines += ["Every program of a whole study compiled ahead of time for the topology "
              "(abstract bf16 weights, MMLU 5-shot in the letter format: prompts of 640 "
              "tokens, 300 evaluation items and 64 calibration items). Memory is XLA's "
              "per-device analysis of each compiled program (arguments + outputs + "
              "temporaries); the TPU compiler also checks HBM itself, the GPU compile-only "
              "figures leave out cuBLAS/cuDNN/NCCL workspaces, so 15% of each device is kept "
              "free. Time: each program's parts (one block on a shard's rows, the last "
              "block at the read positions, one lens readout) from XLA's cost analysis at "
              "the per-device shapes, at the chip's peak bf16 rate or HBM bandwidth "
              "(whichever binds), times the calls of a whole study counted as the engine "
              "makes them (no early stop: an upper bound).", "",
              "| model | target | mesh (data x model) | chosen | program | args GB | temp GB "
              "| peak GB | of GB | calls | s/call |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
      ch = row["chosen"]
      chosen = (f"{ch['rows_per_shard']} rows/shard, {ch['masks_in_flight'] or 'all'} masks "
                f"in flight, {ch['candidates_per_call']} candidates/call")
      for name, p in row["programs"].items():
        m = p["memory"]
        lines.append(f"| {row['model']} | {row['target']} | {row['mesh']['data']} x "
                     f"{row['mesh']['model']} | {chosen} | {name} | {m['arguments_gb']:.1f} | "
                     f"{m['temporaries_gb']:.1f} | {m['peak_gb']:.1f} | {row['budget_gb']:.1f} "
                     f"| {p['calls']} | {p['seconds_per_call']:.3f} |")
    lines += ["", "| model | target | every program fits | predicted study, 300 items | "
              "planning took |", "|---|---|---|---|---|"]
    for row in rows:
      lines.append(f"| {row['model']} | {row['target']} | {'yes' if row['fits'] else 'NO'} | "
                   f"{row['predicted_study_hours']:.2f} h | {row['wall_seconds']:.0f} s |")
  cal = results.get("calibration")
  if cal:
    lines += ["", f"Checked on this machine (`--target=local`, the bundled model, "
              f"{cal['rows']} rows x {cal['tokens']} tokens, one call of each program, "
              f"median of repeats; matmul rate {cal['target']['flops'] / 1e9:.0f} GFLOP/s, copy "
              f"bandwidth {cal['target']['bandwidth'] / 1e9:.1f} GB/s):", "",
              "| program | predicted s | measured s | predicted / measured |",
              "|---|---|---|---|"]
    for name, p in cal["programs"].items():
      lines.append(f"| {name} | {p['predicted_s']:.4f} | {p['measured_s']:.4f} | "
                   f"{p['ratio']:.2f} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  from dpjax import fileio
  results = {}
  if os.path.isfile(_OUT.value):
    with open(_OUT.value) as f:
      results = json.load(f)
  if _PART.value in ("calibrate", "both"):
    results["calibration"] = calibrate(repeats=_REPEATS.value)
    print(markdown({"calibration": results["calibration"]}))
  if _PART.value in ("table", "both"):
    wanted = set(_ROWS.value.split(",")) if _ROWS.value else None
    rows = {(r["model"], r["target"]): r for r in results.get("table", [])}
    for model, target in TABLE:
      if wanted and f"{model}@{target}" not in wanted:
        continue
      print(f"planning {model} on {target} ...", flush=True)
      rows[(model, target)] = table_row(model, target)
      results["table"] = [rows[k] for k in TABLE if k in rows]
      fileio.write_json(_OUT.value, results)
    print(markdown({"table": results["table"]}))
  fileio.write_json(_OUT.value, results)


if __name__ == "__main__":
  app.run(main)
