"""The objective and one optimizer step (optax AdamW), jit-compiled once per model shape."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from dpjax.train.settings import TrainSettings


def loss_fn(state, graphdef, batch: dict[str, jax.Array], answer_weight: float):
  """The objective `token_loss + answer_weight * answer_loss`, and its parts.

  `token_loss`: mean next-token cross-entropy over non-pad targets (the answer
  letter and EOS included); `answer_loss`: mean cross-entropy of the answer
  letter; `answer_accuracy`: how often the letter is the argmax over the vocab.
  """
  module = nnx.merge(graphdef, state)
  h, _, _ = module.run_blocks(batch["input_ids"], batch["attention_mask"], None,
                              jnp.ones(module.cfg.num_layers, bool))
  logits = module.unembed(h).astype(jnp.float32)  # [B, T, V]
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # [B, T]
  loss_mask, answer_mask = batch["loss_mask"], batch["answer_mask"]
  token_loss = jnp.sum(nll * loss_mask) / jnp.maximum(jnp.sum(loss_mask), 1.0)
  answer_loss = jnp.sum(nll * answer_mask) / jnp.maximum(jnp.sum(answer_mask), 1.0)
  hit = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
  answer_accuracy = jnp.sum(hit * answer_mask) / jnp.maximum(jnp.sum(answer_mask), 1.0)
  objective = token_loss + answer_weight * answer_loss
  return objective, {"token_loss": token_loss, "answer_loss": answer_loss,
                     "answer_accuracy": answer_accuracy}


@dataclasses.dataclass(frozen=True)
class Optimization:
  """The settings the train step compiles for (hashable: a static argument of the step)."""
  steps: int
  learning_rate: float
  warmup_fraction: float
  final_lr_fraction: float
  weight_decay: float
  clip_norm: float
  answer_weight: float

  @classmethod
  def of(cls, settings: TrainSettings) -> "Optimization":
    return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})


def make_optimizer(opt: Optimization) -> tuple[optax.GradientTransformation, Any]:
  """AdamW with linear warmup and cosine decay, after global-norm clipping; and the schedule."""
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt.learning_rate,
      warmup_steps=int(round(opt.warmup_fraction * opt.steps)), decay_steps=opt.steps,
      end_value=opt.learning_rate * opt.final_lr_fraction)

  def decay_mask(state):
    # No weight decay on the RMSNorm gains: decaying them pulls them toward 0, not 1.
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "norm" not in jax.tree_util.keystr(path), state)

  optimizer = optax.chain(
      optax.clip_by_global_norm(opt.clip_norm),
      optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=opt.weight_decay, mask=decay_mask))
  return optimizer, schedule


# Jitted once at module level with the graph and the optimization static, so that
# runs of the same model in one process (tests, sweeps) compile the step once.
@functools.partial(jax.jit, static_argnames=("graphdef", "opt"),
                   donate_argnames=("state", "opt_state"))
def train_step(state, opt_state, batch: dict[str, jax.Array], *, graphdef, opt: Optimization):
  """One AdamW step on `batch` (see `TrainingStream.next_batch`).

  Returns the new weights and optimizer state, and the step's `loss`,
  `token_loss`, `answer_loss`, `answer_accuracy` and (pre-clipping) `grad_norm`.
  """
  optimizer, _ = make_optimizer(opt)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (objective, parts), grads = grad_fn(state, graphdef, batch, opt.answer_weight)
  updates, opt_state = optimizer.update(grads, opt_state, state)
  state = optax.apply_updates(state, updates)
  grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
  return state, opt_state, dict(parts, loss=objective, grad_norm=grad_norm)
