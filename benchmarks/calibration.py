"""The planner's prediction of each program against the program run for real (no flags
here, so both `benchmarks.planning` and `benchmarks/gpu_check.py` can import it)."""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def calibrate(model_dir: str | None = None, rows: int = 16, tokens: int = 96,
              repeats: int = 5) -> dict[str, Any]:
  """Per program: predicted and measured seconds of one call on the local devices."""
  import jax
  import jax.numpy as jnp

  import dpjax
  from dpjax.engine import fit
  from dpjax.engine import planner
  from dpjax.bundled import BUNDLED_MODEL
  from dpjax.lens.readout import Lens, Reads, packing
  from dpjax.engine.sweep import Programs

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
  c = min(8, L)
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
                W(calls=1, block=sum(max(n - 1, 0) for n in lengths),
                  last=sum(n > 0 for n in lengths), lens=c)),
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
