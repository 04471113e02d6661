"""The training run: data, steps, evaluations, early stopping, and the saved model."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

from flax import nnx
import jax
import numpy as np

from dpjax import fileio
from dpjax.fields import command_line
from dpjax.model.transformer import Transformer
from dpjax.tasks import synthetic
from dpjax.train.card import format_seconds, save
from dpjax.train.data import TrainingStream
from dpjax.train.evaluate import HeldOut, evaluate, pure_numpy
from dpjax.train.settings import TrainSettings, model_config
from dpjax.train.step import Optimization, make_optimizer, train_step


class StepClock:
  """Seconds spent in train steps: the first (compiling) step apart, evaluations excluded.

  JAX dispatches steps asynchronously, so a lap is only read after something
  has waited for the steps (a metric fetched, `block_until_ready`).
  """

  def __init__(self):
    self.first_step_seconds = 0.0
    self.steps = 0         # steady steps timed so far
    self.seconds = 0.0     # their seconds
    self.start()

  def start(self) -> None:
    self._start, self._pending = time.perf_counter(), 0

  def tick(self) -> None:
    self._pending += 1

  def first_step(self) -> None:
    self.first_step_seconds = time.perf_counter() - self._start
    self.start()

  def lap(self) -> float | None:
    """Books the steps since the last start; returns their steps/s (None: no steps)."""
    elapsed, pending = time.perf_counter() - self._start, self._pending
    self.steps += pending
    self.seconds += elapsed
    self.start()
    return pending / elapsed if pending else None


def train(settings: TrainSettings) -> dict[str, Any]:
  """Trains, evaluates and saves the model `settings` describe; returns the training log.

  The returned dict (also written as `training_log.json`) holds `log` (one
  entry per `log_every` steps: means over the window), `evals`, the final
  held-out `final_accuracy` and `final_per_family`, `steps_run`,
  `train_seconds`, `seconds_per_step` and `num_params`.
  """
  # Refuse before hours of training, not after (atomic_directory checks again).
  fileio.check_replaceable(settings.output_dir, settings.overwrite)
  start = time.perf_counter()
  items = synthetic.generate("train", settings.num_train_items, seed=settings.seed)
  tokenizer = synthetic.build_tokenizer(synthetic.training_text(items),
                                        vocab_size=settings.vocab_size)
  stream = TrainingStream(items, tokenizer, settings)
  cfg = model_config(settings, len(tokenizer))
  held_out = HeldOut(cfg, tokenizer, settings)

  module = Transformer(cfg, rngs=nnx.Rngs(settings.seed))
  graphdef, state = nnx.split(module)
  num_params = int(sum(x.size for x in jax.tree.leaves(state)))
  opt = Optimization.of(settings)
  optimizer, schedule = make_optimizer(opt)
  opt_state = optimizer.init(state)
  print(f"model: {cfg.num_layers} blocks, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, "
        f"{num_params:,} parameters; {len(items)} training items; "
        f"{settings.steps} steps of {settings.batch_size}", flush=True)

  log: list[dict[str, Any]] = []
  evals: list[dict[str, Any]] = []
  window: list[dict[str, jax.Array]] = []  # metrics of the steps since the last log
  clock = StepClock()
  step = 0
  stopped_early = False
  while step < settings.steps:
    batch = stream.next_batch()
    state, opt_state, out = train_step(state, opt_state, batch, graphdef=graphdef, opt=opt)
    step += 1
    window.append(out)
    clock.tick()
    if step == 1:
      # The first step compiles: timed apart, so that steps/s and the ETA are the steady rate.
      jax.block_until_ready(out)
      clock.first_step()
    if step % settings.log_every == 0 or step == settings.steps:
      means = {k: float(np.mean([float(w[k]) for w in window])) for k in window[0]}
      rate = clock.lap()  # after the fetch above, which waits for the steps to finish
      entry = dict(step=step, learning_rate=float(schedule(step - 1)), steps_per_second=rate,
                   **means)
      log.append(entry)
      window = []
      speed = (f"{rate:.2f} steps/s  ETA {format_seconds((settings.steps - step) / rate)}"
               if rate else f"first step {clock.first_step_seconds:.1f}s (compiling)")
      print(f"step {step:6d}  loss {means['loss']:.4f}  token {means['token_loss']:.4f}  "
            f"answer {means['answer_loss']:.4f} (acc {means['answer_accuracy']:.3f})  "
            f"lr {entry['learning_rate']:.2e}  {speed}", flush=True)
    if step % settings.eval_every == 0 or step == settings.steps:
      jax.block_until_ready(state)
      clock.lap()  # evaluations are not training time
      result = evaluate(held_out, state, step)
      evals.append(result)
      clock.start()
      if result["accuracy"] >= settings.target_accuracy and step < settings.steps:
        print(f"held-out accuracy {result['accuracy']:.3f} >= target "
              f"{settings.target_accuracy}; stopping at step {step}.", flush=True)
        stopped_early = True
        break
  jax.block_until_ready(state)
  clock.lap()

  final = evals[-1]
  wall_seconds = time.perf_counter() - start
  params = pure_numpy(state)
  summary = {
      "settings": dataclasses.asdict(settings),
      "command": command_line("python -m dpjax.train", settings, skip=("overwrite",)),
      "model_config": dataclasses.asdict(cfg),
      "num_params": num_params,
      "num_train_items": len(items),
      "families": list(synthetic.FAMILIES),
      "steps_run": step,
      "stopped_early": stopped_early,
      "final_accuracy": final["accuracy"],
      "final_per_family": final["per_family"],
      "train_seconds": clock.first_step_seconds + clock.seconds,
      "first_step_seconds": clock.first_step_seconds,
      # Steady state: every step but the first, which compiles.
      "seconds_per_step": (clock.seconds / clock.steps if clock.steps
                           else clock.first_step_seconds),
      "wall_seconds": wall_seconds,
      "statement_examples": stream.statement_examples,
      "one_shot_examples": stream.one_shot_examples,
      "one_shot_too_long": stream.one_shot_too_long,
      "jax": {"version": jax.__version__, "backend": jax.default_backend(),
              "device": str(jax.devices()[0].device_kind)},
      "log": log,
      "evals": evals,
  }
  save(settings, cfg, tokenizer, params, summary)
  print(f"wrote {os.path.abspath(settings.output_dir)}: held-out accuracy "
        f"{final['accuracy']:.3f} after {step} steps ({format_seconds(wall_seconds)})",
        flush=True)
  return summary
