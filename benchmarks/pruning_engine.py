"""Figures for the pruning engine: one full Iterative Pruning run, timed and counted.

    python -m benchmarks.pruning_engine [--quick]

A random Llama (default: 16 blocks, hidden 512, vocab 32k, as the engine's
issue asks) evaluated on synthetic items; reports wall time (compilation
included and excluded), the number of compiled programs, and block evaluations
executed against the minimum a prefix-shared evaluation needs and against a
fresh forward per candidate. Writes `benchmarks/results/pruning_engine.json`.
"""

from __future__ import annotations

import json
import os
import platform
import time

from absl import app
from absl import flags
from flax import nnx
import jax
import numpy as np

_QUICK = flags.DEFINE_bool("quick", False, "A 4-block, hidden-64 smoke run.")
_LAYERS = flags.DEFINE_integer("layers", 16, "Blocks.")
_HIDDEN = flags.DEFINE_integer("hidden", 512, "Hidden size.")
_VOCAB = flags.DEFINE_integer("vocab", 32000, "Vocabulary size.")
_ITEMS = flags.DEFINE_integer("items", 128, "Calibration items.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Items per forward pass.")
_WARM = flags.DEFINE_bool("warm_rerun", True, "Run again with every program compiled, to time "
                          "the steady state.")
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results",
                                               "pruning_engine.json"), "Where to write figures.")


def main(argv):
  del argv
  from dpjax import pruning, synthetic, tasks
  from dpjax.config import ModelConfig
  from dpjax.fileio import atomic_write_text
  from dpjax.model import DecoderModel, Transformer
  from dpjax.sweep import Sweep

  layers, hidden, vocab, n_items = _LAYERS.value, _HIDDEN.value, _VOCAB.value, _ITEMS.value
  if _QUICK.value:
    layers, hidden, vocab, n_items = 4, 64, 1000, 32
  heads = max(1, hidden // 64)
  cfg = ModelConfig(architecture="llama", vocab_size=vocab, hidden_size=hidden,
                    intermediate_size=int(hidden * 2.75), num_layers=layers, num_heads=heads,
                    num_kv_heads=heads, head_dim=hidden // heads, rms_norm_eps=1e-5,
                    rope_theta=10000.0, max_position_embeddings=512)
  model = DecoderModel.from_module(Transformer(cfg, rngs=nnx.Rngs(0)))
  tokenizer = synthetic.build_tokenizer(synthetic.training_text(synthetic.generate("train", 400)),
                                        512)
  items = synthetic.generate("test", n_items)
  encoded = tasks.encode(tokenizer, items, [tasks.prompt(i) for i in items])
  sweep = Sweep(model, encoded, batch_size=_BATCH.value, pad_id=tokenizer.pad_token_id)
  step_times = []
  last = [time.perf_counter()]

  def on_step(block, kept, stats):
    now = time.perf_counter()
    step_times.append(now - last[0])
    last[0] = now
    print(f"step {len(step_times)}: removed block {block + 1}, {len(kept)} left, "
          f"{step_times[-1]:.1f} s", flush=True)

  start = time.perf_counter()
  order = pruning.iterative_prune(sweep, criterion="accuracy", on_step=on_step)
  wall = time.perf_counter() - start
  warm_wall = None
  if _WARM.value:
    # The same run again, every program compiled: the steady-state cost.
    warm = Sweep(model, encoded, batch_size=_BATCH.value, pad_id=tokenizer.pad_token_id)
    warm._stream, warm._tails = sweep._stream, sweep._tails
    start = time.perf_counter()
    assert pruning.iterative_prune(warm, criterion="accuracy") == order
    warm_wall = time.perf_counter() - start
  c = sweep.counters
  tokens = int(np.mean([b.input_ids.shape[1] for b in sweep.batches]))
  results = {
      "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                  "jax_backend": jax.default_backend(),
                  "devices": [str(d) for d in jax.devices()]},
      "model": {"layers": layers, "hidden": hidden, "vocab": vocab,
                "parameters": int(sum(np.prod(x.shape) for x in
                                      jax.tree.leaves(model.params())))},
      "items": n_items, "batch_size": _BATCH.value, "padded_tokens": tokens,
      "removed_order": [b + 1 for b in order],
      "wall_seconds_with_compilation": wall,
      "wall_seconds_compiled": warm_wall,
      "step_seconds": step_times,
      "compiled_programs": sweep.compile_count(),
      "block_evaluations": {"executed": c.executed, "minimum": c.minimum, "naive": c.naive,
                            "executed_over_minimum": c.executed / c.minimum,
                            "naive_over_executed": c.naive / c.executed},
      "candidates_stopped_early": c.stopped_early,
  }
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  atomic_write_text(_OUT.value, json.dumps(results, indent=2) + "\n")
  print(json.dumps({k: v for k, v in results.items() if k != "step_seconds"}, indent=2))


if __name__ == "__main__":
  app.run(main)
