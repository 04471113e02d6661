"""Healing a pruned variant with LoRA (Gromov et al., 2024): low-rank adapters on the
feed-forward weights of the kept blocks, trained with optax, merged into the weights.

The pruned model's weight `W` of each adapted module (`[K, in, out]`, stacked over the
kept blocks) runs as `W + (alpha / rank) * A @ B`, `A` `[K, in, rank]` drawn from a
normal of scale `1 / sqrt(in)`, `B` `[K, rank, out]` zero, so training starts from the
pruned model. The objective is the KL divergence from the unpruned model's next-token
distribution to the pruned one's (`kl`) or the plain next-token loss (`nll`), on windows
of a corpus (by default the task's train split, disjoint from the evaluation items).
The training state (adapters, optimizer, step) is saved with Orbax every
`checkpoint_every` steps and a killed run resumes; a progress bar shows the loss and the
ETA. `merge` folds the adapters into the weights.

`method="last_blocks"` is the baseline "Reassessing Layer Pruning" (Lu et al., 2024)
found strong: no adapters, the head (the final norm and the unembedding; with tied
embeddings that is the shared embedding matrix, so the input embedding moves with it)
and the last `last_blocks` kept blocks trained in full, every other weight frozen. With
`--method=reverse` (drop the last blocks) it is that paper's recipe.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dpjax.engine.progress import Progress

ADAPTED = ("gate", "up", "down", "q", "k", "v", "o")
FEED_FORWARD = ("gate", "up", "down")
HEAL_METHODS = ("lora", "last_blocks")
# Adam's learning rate when none is given: adapters start at zero and move fast; whole
# pretrained blocks want smaller steps.
DEFAULT_LEARNING_RATE = {"lora": 1e-3, "last_blocks": 1e-4}


@dataclasses.dataclass(frozen=True)
class Healing:
  steps: int
  rank: int = 8
  alpha: float = 16.0
  modules: tuple[str, ...] = FEED_FORWARD
  objective: str = "kl"        # kl | nll
  learning_rate: float | None = None  # None: DEFAULT_LEARNING_RATE[method]
  batch_size: int = 8
  seq_len: int = 64
  seed: int = 0
  checkpoint_every: int = 50
  method: str = "lora"         # lora | last_blocks
  last_blocks: int = 3         # last_blocks: how many of the last kept blocks are trained

  def __post_init__(self):
    if self.method not in HEAL_METHODS:
      raise ValueError(f"--heal_method={self.method!r}; use one of {', '.join(HEAL_METHODS)}.")
    if self.method == "last_blocks" and self.last_blocks < 0:
      raise ValueError(f"--heal_last_blocks={self.last_blocks}; give 0 (the head alone) or "
                       "more.")
    if self.learning_rate is None:
      object.__setattr__(self, "learning_rate", DEFAULT_LEARNING_RATE[self.method])
    bad = [m for m in self.modules if m not in ADAPTED]
    if bad:
      raise ValueError(f"--heal_modules {bad}: adapters go on {', '.join(ADAPTED)}.")
    if self.objective not in ("kl", "nll"):
      raise ValueError(f"--heal_objective={self.objective!r}; use kl or nll.")
    if self.rank < 1 or self.steps < 1:
      raise ValueError(f"healing needs --heal_steps >= 1 and --heal_rank >= 1; got "
                       f"{self.steps} and {self.rank}.")


def init_adapters(params: dict[str, Any], healing: Healing) -> dict[str, dict[str, jax.Array]]:
  """`{module: {"a": [K, in, rank], "b": [K, rank, out]}}` for the pruned model's weights."""
  key = jax.random.key(healing.seed)
  out = {}
  for i, name in enumerate(healing.modules):
    w = params["blocks"][name]
    layers, fan_in, fan_out = w.shape
    a = jax.random.normal(jax.random.fold_in(key, i), (layers, fan_in, healing.rank),
                          jnp.float32) / np.sqrt(fan_in)
    out[name] = {"a": a, "b": jnp.zeros((layers, healing.rank, fan_out), jnp.float32)}
  return out


def init_trainable(params: dict[str, Any], healing: Healing) -> dict[str, Any]:
  """What healing trains: LoRA adapters (`init_adapters`), or for `last_blocks` the head's
  weights and the last kept blocks' weights (copies of the pruned model's, float32)."""
  if healing.method == "lora":
    return init_adapters(params, healing)
  layers = next(iter(params["blocks"].values())).shape[0]
  if healing.last_blocks > layers:
    raise ValueError(f"--heal_last_blocks={healing.last_blocks}, but the variant keeps "
                     f"{layers} blocks.")
  head = [name for name in ("final_norm", "lm_head") if params.get(name) is not None]
  if params.get("lm_head") is None:
    head.append("embed")  # tied: the unembedding is the embedding matrix
  out = {name: jnp.asarray(params[name], jnp.float32) for name in head}
  out["blocks"] = {name: jnp.asarray(w[layers - healing.last_blocks:], jnp.float32)
                   for name, w in params["blocks"].items()}
  return out


def compose(params: dict[str, Any], trainable: dict[str, Any], healing: Healing
            ) -> dict[str, Any]:
  """The weights the healed model runs with: `merge` for adapters; for `last_blocks`,
  the trained head and tail blocks in place of the pruned model's."""
  if healing.method == "lora":
    return merge(params, trainable, healing)
  out = dict(params)
  blocks = dict(params["blocks"])
  for name, tail in trainable["blocks"].items():
    w = blocks[name]
    keep = w.shape[0] - tail.shape[0]
    blocks[name] = jnp.concatenate([jnp.asarray(w[:keep]), tail.astype(w.dtype)], axis=0)
  for name, w in trainable.items():
    if name != "blocks":
      out[name] = w.astype(params[name].dtype)
  out["blocks"] = blocks
  return out


def merge(params: dict[str, Any], adapters: dict[str, dict[str, jax.Array]],
          healing: Healing) -> dict[str, Any]:
  """The weights with the adapters folded in: `W + (alpha / rank) * A @ B`."""
  blocks = dict(params["blocks"])
  scale = healing.alpha / healing.rank
  for name, ab in adapters.items():
    w = blocks[name]
    delta = jnp.einsum("lir,lro->lio", ab["a"], ab["b"], precision=jax.lax.Precision.HIGHEST)
    blocks[name] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
  return {**params, "blocks": blocks}


def adapted_logits(model, params, adapters, healing: Healing, input_ids, attention_mask):
  """`[B, T, V]` float32 logits of `model`'s architecture with `params` and the trained
  weights (`adapters`: see `init_trainable`), composed inside the trace (so the gradient
  reaches them)."""
  state = jax.tree.map(lambda x: x, model.state)
  nnx.replace_by_pure_dict(state, compose(params, adapters, healing))
  module = nnx.merge(model.graphdef, state)
  layers = module.cfg.num_layers
  h, _, _ = module.run_blocks(input_ids, attention_mask, None, jnp.ones(layers, bool))
  return module.unembed(h).astype(jnp.float32)


def heal(pruned, teacher, teacher_keep, windows: np.ndarray, healing: Healing,
         state_dir: str | None = None, progress: bool = True) -> tuple[dict, list[float]]:
  """Trains the adapters of `pruned` (a DecoderModel of the kept blocks) on `windows`
  (`[n, seq_len]` token ids); `teacher` with `teacher_keep` gives the KL targets.
  Returns the adapters and the loss of every step."""
  params = jax.tree.map(jnp.asarray, pruned.params())
  adapters = init_trainable(params, healing)
  optimizer = optax.adam(healing.learning_rate)
  opt_state = optimizer.init(adapters)
  start, losses = 0, []
  manager = None
  if state_dir:
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(os.path.abspath(state_dir),
                                    options=ocp.CheckpointManagerOptions(max_to_keep=1))
    if manager.latest_step() is not None:
      restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(
          {"adapters": adapters, "opt_state": opt_state, "losses": np.zeros(
              manager.latest_step(), np.float32)}))
      adapters, opt_state = restored["adapters"], restored["opt_state"]
      losses = [float(x) for x in restored["losses"]]
      start = manager.latest_step()

  def loss_fn(adapters, params, ids, mask, target):
    logits = adapted_logits(pruned, params, adapters, healing, ids, mask)
    logp = jax.nn.log_softmax(logits[:, :-1], -1)
    weights = mask[:, 1:].astype(jnp.float32)
    if healing.objective == "kl":
      target_logp = jax.nn.log_softmax(target[:, :-1], -1)
      per = jnp.sum(jnp.exp(target_logp) * (target_logp - logp), -1)
    else:
      per = -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    return jnp.sum(per * weights) / jnp.maximum(jnp.sum(weights), 1.0)

  @jax.jit
  def step(adapters, opt_state, params, ids, mask, target):
    # The frozen weights are an argument, not constants of the trace (which XLA would
    # fold and embed in the program).
    loss, grads = jax.value_and_grad(loss_fn)(adapters, params, ids, mask, target)
    updates, opt_state = optimizer.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  rng = np.random.default_rng([healing.seed, 3])
  order = np.concatenate([rng.permutation(len(windows))
                          for _ in range(healing.steps * healing.batch_size // len(windows) + 1)])
  bar = Progress(healing.steps, "healing", progress, unit="step")
  bar.update(start)
  for i in range(start, healing.steps):
    ids = windows[order[i * healing.batch_size:(i + 1) * healing.batch_size]]
    mask = np.ones(ids.shape, np.int32)
    target = (np.asarray(teacher.logits(ids, keep=teacher_keep), np.float32)
              if healing.objective == "kl" else np.zeros((1, 1, 1), np.float32))
    adapters, opt_state, loss = step(adapters, opt_state, params, ids, mask, target)
    losses.append(float(loss))
    bar.update()
    bar.set_postfix(loss=f"{float(loss):.4f}")
    if manager is not None and ((i + 1) % healing.checkpoint_every == 0
                                or i + 1 == healing.steps):
      import orbax.checkpoint as ocp
      manager.save(i + 1, args=ocp.args.StandardSave(
          {"adapters": adapters, "opt_state": opt_state,
           "losses": np.asarray(losses, np.float32)}))
      manager.wait_until_finished()
  bar.close()
  return adapters, losses
