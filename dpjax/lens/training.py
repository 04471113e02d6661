"""`dpjax-train-lens`: a tuned lens for a model, trained with optax.

    dpjax-train-lens --model=PATH --corpus=task:arc_easy --output_dir=lenses/smollm2

For every layer `l < L` it learns a translator (`A_l`, `b_l`, starting at zero,
so training starts from the logit lens) minimizing the KL divergence from the
model's final next-token distribution to `softmax(W_U · norm_f(h_l + A_l h_l +
b_l))`, at sampled positions of a text corpus (Belrose et al., 2023). The model
is frozen. Hidden states are computed batch by batch and never all kept.

The corpus (`--corpus`): `text:FILE` (any text file), `task:SPEC` (a task's
questions with their correct answers, in the cloze layout for multiple-choice
tasks: `task:arc_easy`, `task:sciq`, `task:nq_open`, `task:synthetic`, ...; the
task's default split, or another with `@SPLIT`, as `task:arc_easy@test`, so that
a lens is not trained on the items a study then evaluates), or `synthetic` (the
synthetic suite's training split). It is tokenized as one
stream (documents joined by the end-of-text token), cut into windows of
`--seq_len` tokens, shuffled by the seed; the last `--heldout_fraction` of the
windows is held out. Training saves its state with Orbax every `--eval_every`
steps and resumes after a kill; at the end the lens is written with the held-out
KL per layer of the logit lens and of the tuned lens.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dpjax import tasks
from dpjax.bundled import BUNDLED_MODEL
from dpjax.lens import tuned as tuned_lens
from dpjax.checkpoints.convert import load_tokenizer
from dpjax.fileio import atomic_write_text
from dpjax.fields import setting
from dpjax.model.load import load_model
from dpjax.model.layers import rms_norm, soft_cap
from dpjax.engine.progress import Progress
from dpjax.lens.readout import unembedding_f32


@dataclasses.dataclass(frozen=True)
class LensSettings:
  """A tuned-lens training run. Each field is also a flag of the same name."""
  model: str = setting(BUNDLED_MODEL, "The model: a dpjax checkpoint, an HF directory or a "
                       "GGUF file. Default: the small model bundled with dpjax.")
  output_dir: str = setting("dpjax_lens", "Where the lens goes (and its training state).")
  corpus: str = setting("synthetic", "text:FILE | task:SPEC[@SPLIT] (a task's questions and "
                        "correct answers) | synthetic (the synthetic suite's training split).")
  data_dir: str = setting("", "Where benchmark tasks are read (see dpjax --data_dir).")
  corpus_items: int = setting(4000, "Most items (or synthetic items) a task corpus takes.")
  seq_len: int = setting(128, "Tokens per window.")
  batch_size: int = setting(4, "Windows per step (their hidden states computed together).")
  positions: int = setting(128, "Positions per step the loss is taken at (sampled).")
  steps: int = setting(300, "Optimizer steps.")
  learning_rate: float = setting(1e-3, "Peak Adam learning rate (linear warmup, cosine decay).")
  warmup_steps: int = setting(20, "Warmup steps.")
  heldout_fraction: float = setting(0.1, "Share of the windows held out for the KL figures.")
  heldout_positions: int = setting(4096, "Held-out positions the final KL is measured at.")
  eval_every: int = setting(50, "Save the state (and print the held-out KL) every this many "
                            "steps.")
  seed: int = setting(0, "Seed of the window order and the sampled positions.")
  dtype: str | None = setting(None, "Weight dtype (default: the checkpoint's).",
                              choices=("float32", "bfloat16", "float16"))
  progress: bool = setting(True, "Show a progress bar with the loss and an ETA.")

  def __post_init__(self):
    positive = ("corpus_items", "seq_len", "batch_size", "positions", "steps", "eval_every",
                "heldout_positions")
    bad = [f"{n}={getattr(self, n)}" for n in positive if getattr(self, n) < 1]
    if bad:
      raise ValueError(f"{', '.join(bad)} must be at least 1.")
    if not 0.0 < self.heldout_fraction < 1.0:
      raise ValueError(f"heldout_fraction={self.heldout_fraction} must be between 0 and 1.")
    if self.learning_rate <= 0:
      raise ValueError(f"learning_rate={self.learning_rate} must be above 0.")


def corpus_texts(spec: str, data_dir: str = "", limit: int = 4000) -> list[str]:
  """The documents of a corpus spec (see the module docstring)."""
  kind, _, rest = spec.partition(":")
  if kind == "text":
    if not os.path.isfile(rest):
      raise ValueError(f"corpus {spec!r}: no text file at {rest}.")
    with open(rest) as f:
      return [f.read()]
  if spec == "synthetic":
    from dpjax.tasks import synthetic
    return synthetic.training_text(synthetic.generate("train", limit))
  if kind != "task" or not rest:
    raise ValueError(f"corpus={spec!r}; use text:FILE, task:SPEC or synthetic.")
  rest, _, split = rest.partition("@")
  items = tasks.load_task(rest, split, num_items=limit, data_dir=data_dir)
  texts = []
  for item in items:
    if item.is_open:
      texts.append(tasks.open_prompt(item) + " " + item.golds[0])
    else:
      context, continuation = tasks.cloze_requests(item)[item.answer]
      texts.append(context + continuation)
  return texts


def windows(tokenizer, texts: list[str], seq_len: int) -> np.ndarray:
  """The documents as one token stream (joined by end-of-text) cut into `[n, seq_len]`."""
  eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
  stream: list[int] = []
  for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
    stream += list(ids) + [eos]
  n = len(stream) // seq_len
  if n < 2:
    raise ValueError(f"the corpus has {len(stream)} tokens, too few for two windows of "
                     f"{seq_len}; give a larger corpus or a smaller --seq_len.")
  return np.asarray(stream[:n * seq_len], np.int32).reshape(n, seq_len)


def _states(graphdef, state, input_ids):
  """`h_l` at every layer `[L+1, B, T, d]` (float32) and the final log-probabilities
  `[B, T, V]` (the model's own: the logit lens at the last layer)."""
  from flax import nnx
  module = nnx.merge(graphdef, state)
  mask = jnp.ones(input_ids.shape, jnp.int32)
  _, h0, per_step = module.run_blocks(input_ids, mask, None, jnp.ones(module.cfg.num_layers, bool),
                                      readout=lambda h, layer: h.astype(jnp.float32))
  hidden = jnp.concatenate([h0[None].astype(jnp.float32), per_step], axis=0)
  return hidden


def _lens_logprobs(norm_weight, unembed, cfg, x):
  z = jnp.einsum("...d,vd->...v", rms_norm(x, norm_weight, cfg.rms_norm_eps, cfg.norm_kind),
                 unembed, precision=jax.lax.Precision.HIGHEST)
  return jax.nn.log_softmax(soft_cap(z, cfg.final_logit_softcap), axis=-1)


def _kl_per_layer(translators, hidden, norm_weight, unembed, cfg):
  """`[L]` mean KL(final || layer l) over the positions of `hidden` `[L+1, P, d]`."""
  target = _lens_logprobs(norm_weight, unembed, cfg, hidden[-1])
  p_target = jnp.exp(target)

  @jax.checkpoint
  def one(layer):
    x = tuned_lens.translate(translators, hidden[layer], layer)
    logp = _lens_logprobs(norm_weight, unembed, cfg, x)
    return jnp.mean(jnp.sum(p_target * (target - logp), axis=-1))

  return jax.lax.map(one, jnp.arange(cfg.num_layers))


def train(settings: LensSettings) -> dict[str, Any]:
  """Trains and saves the lens; returns its record (also `lens.json`)."""
  s = settings
  out = os.path.abspath(s.output_dir)
  if os.path.isfile(os.path.join(out, tuned_lens.LENS_FILE)):
    raise FileExistsError(f"{out} already holds a trained lens; choose another --output_dir.")
  model = load_model(s.model, dtype=s.dtype)
  cfg = model.config
  tokenizer = load_tokenizer(model.source)
  all_windows = windows(tokenizer, corpus_texts(s.corpus, s.data_dir, s.corpus_items), s.seq_len)
  order = np.random.default_rng([s.seed, 11]).permutation(len(all_windows))
  held = max(1, int(round(len(order) * s.heldout_fraction)))
  train_windows, heldout_windows = all_windows[order[held:]], all_windows[order[:held]]
  if not len(train_windows):
    raise ValueError("no training windows are left after the held-out part; give a larger corpus.")

  module = model.module()
  unembed = unembedding_f32(module)
  norm_weight = module.final_norm[...].astype(jnp.float32)
  states = jax.jit(functools.partial(_states, model.graphdef))
  # At least one step of decay after the warmup (optax refuses a schedule without one).
  schedule = optax.warmup_cosine_decay_schedule(0.0, s.learning_rate,
                                                min(s.warmup_steps, s.steps - 1),
                                                s.steps, s.learning_rate * 0.1)
  optimizer = optax.adam(schedule)
  fresh = tuned_lens.zero_translators(cfg.num_layers, cfg.hidden_size)
  translators = tuned_lens.Translators(*(jnp.asarray(a) for a in fresh))
  opt_state = optimizer.init(translators)

  @jax.jit
  def step_fn(translators, opt_state, hidden):
    def loss(tr):
      return jnp.mean(_kl_per_layer(tr, hidden, norm_weight, unembed, cfg))
    value, grads = jax.value_and_grad(loss)(translators)
    grads = grads._replace(weight=grads.weight.at[-1].set(0.0), bias=grads.bias.at[-1].set(0.0))
    updates, opt_state = optimizer.update(grads, opt_state, translators)
    return optax.apply_updates(translators, updates), opt_state, value

  kl_fn = jax.jit(lambda tr, hidden: _kl_per_layer(tr, hidden, norm_weight, unembed, cfg))

  def sample(stream: int, step: int, pool: np.ndarray, count: int) -> jax.Array:
    """Hidden states `[L+1, P, d]` at `count` positions of `batch_size` windows of `pool`
    (random stream 0: training steps, 1: held-out batches)."""
    rng = np.random.default_rng([s.seed, 29, stream, step])
    rows = pool[rng.integers(len(pool), size=s.batch_size)]
    hidden = states(model.state, rows)  # [L+1, B, T, d]
    flat = hidden.reshape(hidden.shape[0], -1, hidden.shape[-1])
    picks = rng.choice(flat.shape[1], size=min(count, flat.shape[1]), replace=False)
    return flat[:, picks]

  def heldout_kl(tr) -> np.ndarray:
    total, batches = np.zeros(cfg.num_layers), 0
    per_batch = min(s.positions, s.batch_size * s.seq_len)
    for b in range(max(1, s.heldout_positions // per_batch)):
      total += np.asarray(kl_fn(tr, sample(1, b, heldout_windows, per_batch)))
      batches += 1
    return total / batches

  import orbax.checkpoint as ocp
  manager = ocp.CheckpointManager(os.path.join(out, "state"),
                                  options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True))
  start = manager.latest_step() or 0
  if start:
    restored = manager.restore(start, args=ocp.args.StandardRestore(
        {"translators": translators, "opt_state": opt_state}))
    translators = tuned_lens.Translators(*restored["translators"])
    opt_state = restored["opt_state"]
    print(f"resuming at step {start} of {s.steps}", flush=True)
  clock = time.perf_counter()
  bar = Progress(s.steps - start, "tuned lens", enabled=s.progress, unit="step")
  losses = []
  for step in range(start, s.steps):
    translators, opt_state, value = step_fn(translators, opt_state,
                                            sample(0, step, train_windows, s.positions))
    losses.append(float(value))
    bar.update()
    bar.set_postfix(loss=f"{losses[-1]:.4f}")
    if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
      manager.save(step + 1, args=ocp.args.StandardSave(
          {"translators": translators, "opt_state": opt_state}))
      manager.wait_until_finished()
  bar.close()
  manager.close()
  train_seconds = time.perf_counter() - clock

  logit = heldout_kl(tuned_lens.Translators(*(jnp.asarray(a) for a in fresh)))
  tuned = heldout_kl(translators)
  record = {
      "model": os.path.basename(os.path.normpath(s.model)),
      "fingerprint": tuned_lens.fingerprint(model), "num_layers": cfg.num_layers,
      "hidden_size": cfg.hidden_size, "corpus": s.corpus,
      "windows": {"train": int(len(train_windows)), "heldout": int(len(heldout_windows)),
                  "seq_len": s.seq_len},
      "settings": dataclasses.asdict(s),
      "train_seconds": train_seconds, "steps_run": s.steps - start,
      "final_train_loss": losses[-1] if losses else None,
      "heldout_kl": {"logit": logit.tolist(), "tuned": tuned.tolist()},
  }
  os.makedirs(out, exist_ok=True)
  tuned_lens.save_translators(out, tuned_lens.Translators(np.asarray(translators.weight),
                                                          np.asarray(translators.bias)))
  import json
  atomic_write_text(os.path.join(out, tuned_lens.LENS_FILE), json.dumps(record, indent=2) + "\n")
  print(f"wrote the lens to {out}: held-out KL (mean over layers) logit "
        f"{logit.mean():.4f}, tuned {tuned.mean():.4f}", flush=True)
  return record
