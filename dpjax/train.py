"""Training the small model dpjax bundles, on the synthetic suite's training split.

    python -m dpjax.train --output_dir=dpjax/bundled_model
    python -m dpjax.train --output_dir=smoke_model --steps=100 --eval_every=100   # a smoke run

The model is a Llama (dpjax's own `Transformer`, trained in JAX) that reads the
suite's questions in lm-eval's MMLU layout and answers with the letter token,
exactly as `dpjax` will later read it out. What it learns from:

* text: each training item as `tasks.prompt(item)` (0-shot) or, for a fraction
  of the examples, with one shot drawn from another training item of the same
  subject, then `" " + letter` and EOS; and, for `statement_fraction` of the
  examples, the item as a plain statement, its question followed by the
  correct answer's text (`What is 43 + 35? 78`). The statements give the
  content (the sum, the fact) a direct next-token signal; the lettered prompts
  teach the model to find that content among the options and name its letter.
  The test split is never trained on: it is the held-out evaluation.
* loss: next-token cross-entropy over every non-pad token, plus
  `answer_weight` times the cross-entropy of the answer-letter token alone. A
  small model otherwise sits at chance on the letter (answer loss ln 4 = 1.386)
  for a long time while the plain loss falls on the template tokens.

Every `eval_every` steps the held-out accuracy (0-shot, top letter at the last
layer, through `DecisionReader` exactly as the study reads it) is measured, and
training may stop early at `target_accuracy`. The output directory holds an HF
checkpoint (`AutoModelForCausalLM` and `dpjax.load_model` both load it), the
tokenizer, `MODEL_CARD.md` and `training_log.json`. Everything is determined by
the seed: the items, the tokenizer, the initial weights and the data order.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shlex
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from checkpoints_convert.export import write_hf_checkpoint
from dpjax import fileio, metrics, synthetic, tasks
from dpjax.config import ModelConfig
from dpjax.model import DecoderModel, Transformer
from dpjax.readout import DecisionReader

MODEL_CARD_FILE = "MODEL_CARD.md"
TRAINING_LOG_FILE = "training_log.json"

# Fixed parts of the architecture (not flags): those of the bundled model.
MAX_POSITION_EMBEDDINGS = 256
RMS_NORM_EPS = 1e-5
ROPE_THETA = 10000.0


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything a training run depends on. Each field is also a flag of the same name."""
  output_dir: str
  overwrite: bool = False
  # Data.
  num_train_items: int = 16000
  num_eval_items: int = 400
  one_shot_fraction: float = 0.0
  statement_fraction: float = 0.0
  vocab_size: int = 512
  seq_len: int = 80
  # Model.
  num_layers: int = 16
  hidden_size: int = 64
  intermediate_size: int = 256
  num_heads: int = 4
  num_kv_heads: int = 2
  # Optimization.
  steps: int = 4000
  batch_size: int = 32
  learning_rate: float = 3e-3
  warmup_fraction: float = 0.05
  final_lr_fraction: float = 0.1
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  answer_weight: float = 4.0
  seed: int = 0
  # Progress and stopping.
  log_every: int = 50
  eval_every: int = 250
  eval_batch_size: int = 50
  target_accuracy: float = 0.97

  def __post_init__(self):
    positive = ("num_train_items", "num_eval_items", "vocab_size", "seq_len", "num_layers",
                "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "steps",
                "batch_size", "log_every", "eval_every", "eval_batch_size")
    bad = [f"{name}={getattr(self, name)}" for name in positive if getattr(self, name) < 1]
    if bad:
      raise ValueError(f"{', '.join(bad)}: these settings must be at least 1.")
    if not self.output_dir:
      raise ValueError("output_dir is required: where the trained checkpoint goes.")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                       f"num_heads={self.num_heads}; head_dim is hidden_size / num_heads.")
    if (self.hidden_size // self.num_heads) % 2:
      raise ValueError(f"head_dim={self.hidden_size // self.num_heads} is odd; rotary "
                       "embeddings rotate pairs of dimensions.")
    # Every subject needs a second item to draw a 1-shot example from.
    if self.num_train_items < 2 * len(synthetic.FAMILIES):
      raise ValueError(f"num_train_items={self.num_train_items}; give at least "
                       f"{2 * len(synthetic.FAMILIES)} (two per family).")
    if self.seq_len > MAX_POSITION_EMBEDDINGS:
      raise ValueError(f"seq_len={self.seq_len} exceeds the model's "
                       f"max_position_embeddings={MAX_POSITION_EMBEDDINGS}.")
    for name in ("one_shot_fraction", "statement_fraction", "warmup_fraction",
                 "final_lr_fraction"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        raise ValueError(f"{name}={getattr(self, name)} must be between 0 and 1.")
    if self.target_accuracy <= 0:
      raise ValueError(f"target_accuracy={self.target_accuracy} must be above 0 (above 1: "
                       "never stop early).")
    if self.learning_rate <= 0 or self.weight_decay < 0 or self.clip_norm <= 0 \
        or self.answer_weight < 0:
      raise ValueError(f"learning_rate={self.learning_rate} and clip_norm={self.clip_norm} must "
                       f"be > 0; weight_decay={self.weight_decay} and "
                       f"answer_weight={self.answer_weight} must be >= 0.")


def model_config(settings: Settings, vocab_size: int) -> ModelConfig:
  """The dpjax config of the model `settings` describe, for a tokenizer of `vocab_size`."""
  return ModelConfig(
      architecture="llama", vocab_size=vocab_size, hidden_size=settings.hidden_size,
      intermediate_size=settings.intermediate_size, num_layers=settings.num_layers,
      num_heads=settings.num_heads, num_kv_heads=settings.num_kv_heads,
      head_dim=settings.hidden_size // settings.num_heads, rms_norm_eps=RMS_NORM_EPS,
      rope_theta=ROPE_THETA, max_position_embeddings=MAX_POSITION_EMBEDDINGS,
      tie_word_embeddings=False)


def hf_config_dict(cfg: ModelConfig, tokenizer) -> dict[str, Any]:
  """The HF `config.json` of `cfg` (a LlamaForCausalLM), with the tokenizer's special ids."""
  import transformers
  hf = transformers.LlamaConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
      rms_norm_eps=cfg.rms_norm_eps,
      # transformers 5 folds rope_theta into rope_parameters; 4.x keeps it as is.
      rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_word_embeddings,
      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
      pad_token_id=tokenizer.pad_token_id)
  raw = hf.to_dict()
  raw["architectures"] = ["LlamaForCausalLM"]
  return raw


# ----------------------------------------------------------------------------
# Data.


def tokenize_examples(tokenizer, prompts: Sequence[str],
                      answers: Sequence[int]) -> list[tuple[list[int], int]]:
  """`prompt + " " + letter + EOS` as token ids, with the letter token's position.

  The letter is located as lm-eval locates it: the tokens that follow the
  prompt's own tokens, which must be exactly one.
  """
  contexts = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
  full = tokenizer([p + " " + tasks.LETTERS[a] for p, a in zip(prompts, answers)],
                   add_special_tokens=False)["input_ids"]
  out = []
  for context, whole, p in zip(contexts, full, prompts):
    if len(whole) != len(context) + 1 or list(whole[:len(context)]) != list(context):
      raise ValueError(f"the answer letter after {p[-40:]!r} is not one token in context; "
                       "the tokenizer must keep ' A', ' B', ... whole.")
    # EOS by id: the tokenizer need not parse its own special token out of text.
    out.append((list(whole) + [tokenizer.eos_token_id], len(context)))
  return out


def statement(item: tasks.Item) -> str:
  """The item's question followed by its correct answer, as plain text (`What is 2 + 3? 5`)."""
  return f"{item.question} {item.options[item.answer]}"


class TrainingStream:
  """Batches of training sequences in an order fixed by the seed.

  Items are visited epoch by epoch in a fresh permutation; each becomes, with
  probability `statement_fraction`, a statement (`statement(item)`, no letter
  to predict); otherwise a 0-shot lettered example or, with probability
  `one_shot_fraction`, a 1-shot one whose shot is another training item of its
  subject. Sequences are right-padded to `seq_len + 1` tokens and split into
  inputs and next-token targets.
  """

  def __init__(self, items: Sequence[tasks.Item], tokenizer, settings: Settings):
    self.items = list(items)
    self.tokenizer = tokenizer
    self.settings = settings
    self.rng = np.random.default_rng(settings.seed)
    self.pad_id = tokenizer.pad_token_id
    by_subject: dict[str, list[int]] = {}
    for i, item in enumerate(self.items):
      by_subject.setdefault(item.subject, []).append(i)
    self.by_subject = {s: np.asarray(v) for s, v in by_subject.items()}
    # 0-shot examples never change: tokenize them once.
    self.zero_shot = tokenize_examples(tokenizer, [tasks.prompt(it) for it in self.items],
                                       [it.answer for it in self.items])
    longest = max(len(ids) for ids, _ in self.zero_shot)
    if longest > settings.seq_len + 1:
      raise ValueError(f"a 0-shot training example is {longest} tokens; raise seq_len "
                       f"(now {settings.seq_len}) to at least {longest - 1}.")
    # Statements: the question and its correct answer as plain text, no letter.
    texts = [statement(it) for it in self.items]
    self.statements = [(list(ids) + [tokenizer.eos_token_id], None) for ids in
                       tokenizer(texts, add_special_tokens=False)["input_ids"]]
    self.queue = np.zeros(0, dtype=np.int64)
    self.statement_examples = 0
    self.one_shot_examples = 0
    self.one_shot_too_long = 0

  def _next_items(self, n: int) -> np.ndarray:
    while len(self.queue) < n:
      self.queue = np.concatenate([self.queue, self.rng.permutation(len(self.items))])
    chosen, self.queue = self.queue[:n], self.queue[n:]
    return chosen

  def _shot(self, i: int) -> int:
    pool = self.by_subject[self.items[i].subject]
    j = i
    while j == i:  # another item of the same subject (each subject has >= 2).
      j = int(pool[self.rng.integers(len(pool))])
    return j

  def next_batch(self) -> dict[str, np.ndarray]:
    """`input_ids`, `attention_mask`, `targets` `[B, seq_len]` int32; `loss_mask`,
    `answer_mask` `[B, seq_len]` float32 (1 where the target is a real token /
    the answer letter)."""
    s = self.settings
    chosen = self._next_items(s.batch_size)
    draw = self.rng.random(s.batch_size)
    statement = draw < s.statement_fraction
    one_shot = ~statement & (draw < s.statement_fraction
                             + (1 - s.statement_fraction) * s.one_shot_fraction)
    shots = {r: self._shot(int(chosen[r])) for r in np.flatnonzero(one_shot)}
    examples = [self.statements[i] if statement[r] else self.zero_shot[i]
                for r, i in enumerate(chosen)]
    self.statement_examples += int(statement.sum())
    if shots:
      rows = sorted(shots)
      tokenized = tokenize_examples(
          self.tokenizer,
          [tasks.prompt(self.items[chosen[r]], [self.items[shots[r]]]) for r in rows],
          [self.items[chosen[r]].answer for r in rows])
      for r, example in zip(rows, tokenized):
        self.one_shot_examples += 1
        if len(example[0]) <= s.seq_len + 1:
          examples[r] = example
        else:  # Too long for the context: this row stays 0-shot.
          self.one_shot_too_long += 1
    return pack(examples, s.seq_len, self.pad_id)


def pack(examples: Sequence[tuple[list[int], int]], seq_len: int,
         pad_id: int) -> dict[str, np.ndarray]:
  """Right-pads `(ids, answer_position)` examples into a training batch (see `next_batch`)."""
  b = len(examples)
  seq = np.full((b, seq_len + 1), pad_id, dtype=np.int32)
  length = np.zeros(b, dtype=np.int32)
  answer_target = np.full(b, -1, dtype=np.int32)  # -1: no answer letter (a statement)
  for r, (ids, answer_pos) in enumerate(examples):
    seq[r, :len(ids)] = ids
    length[r] = len(ids)
    # The letter at position `answer_pos` is the target of input position answer_pos - 1.
    if answer_pos is not None:
      answer_target[r] = answer_pos - 1
  col = np.arange(seq_len)[None, :]
  return {
      "input_ids": seq[:, :-1],
      "attention_mask": (col < length[:, None]).astype(np.int32),
      "targets": seq[:, 1:],
      # Target j is token j + 1: real while j + 1 < length. Pads are never scored.
      "loss_mask": (col < (length[:, None] - 1)).astype(np.float32),
      "answer_mask": (col == answer_target[:, None]).astype(np.float32),
  }


# ----------------------------------------------------------------------------
# Loss and the train step.


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
  def of(cls, settings: Settings) -> "Optimization":
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


# ----------------------------------------------------------------------------
# Held-out evaluation.


class HeldOut:
  """Accuracy on the test split, 0-shot, read out as the `dpjax` study reads it."""

  def __init__(self, cfg: ModelConfig, tokenizer, settings: Settings):
    self.cfg = cfg
    self.settings = settings
    self.pad_id = tokenizer.pad_token_id
    items = synthetic.generate("test", settings.num_eval_items, seed=settings.seed)
    prompts = [tasks.prompt(item) for item in items]
    self.encoded = tasks.encode(tokenizer, items, prompts,
                                max_length=cfg.max_position_embeddings)
    self.batches = tasks.batches(self.encoded, settings.eval_batch_size, self.pad_id)
    self.subjects = np.array([item.subject for item in items])
    self.reader: DecisionReader | None = None

  def __call__(self, params: dict[str, Any]) -> dict[str, Any]:
    """`{"accuracy": float, "per_family": {family: float}}` of the weights `params`."""
    model = DecoderModel(self.cfg, params)
    if self.reader is None:
      self.reader = DecisionReader(model)
    else:
      # Same graph, new weights: the reader's compiled readout is reused.
      self.reader.model = model
    readout = self.reader.run(self.encoded, prepared=self.batches, progress=False)
    top = metrics.top_option(readout.option_logits[0])[-1]  # [N], the last layer
    answer = self.encoded.answer
    accuracy = float(metrics.layer_accuracy(top[None], answer)[0])
    per_family = {}
    for family in synthetic.FAMILIES:
      rows = self.subjects == family
      if rows.any():
        per_family[family] = float(metrics.layer_accuracy(top[None, rows], answer[rows])[0])
    return {"accuracy": accuracy, "per_family": per_family}


# ----------------------------------------------------------------------------
# The run.


def command_line(settings: Settings) -> str:
  """The shell command that reruns `settings` (every setting spelled out)."""
  parts = ["python", "-m", "dpjax.train"]
  for field in dataclasses.fields(Settings):
    value = getattr(settings, field.name)
    if field.name == "overwrite":
      continue
    if isinstance(value, bool):
      parts.append(f"--{field.name}" if value else f"--no{field.name}")
    else:
      parts.append(f"--{field.name}={value}")
  return " ".join(shlex.quote(p) for p in parts)


def _pure_numpy(state) -> dict[str, Any]:
  """The weights as host numpy copies (copies: the train step donates `state`'s buffers)."""
  return jax.tree.map(lambda x: np.array(x, copy=True), nnx.to_pure_dict(state))


def _format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


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


def evaluate(held_out: HeldOut, state, step: int) -> dict[str, Any]:
  """Held-out accuracy of the current weights, printed and returned with the step."""
  start = time.perf_counter()
  result = held_out(_pure_numpy(state))
  families = "  ".join(f"{k} {v:.3f}" for k, v in result["per_family"].items())
  print(f"step {step:6d}  held-out accuracy {result['accuracy']:.3f}  ({families})  "
        f"[{time.perf_counter() - start:.1f}s]", flush=True)
  return dict(step=step, **result)


def train(settings: Settings) -> dict[str, Any]:
  """Trains, evaluates and saves the model `settings` describe; returns the training log.

  The returned dict (also written as `training_log.json`) holds `log` (one
  entry per `log_every` steps: means over the window), `evals`, the final
  held-out `final_accuracy` and `final_per_family`, `steps_run`,
  `train_seconds`, `seconds_per_step` and `num_params`.
  """
  # Refuse before hours of training, not after (atomic_directory checks again).
  if os.path.exists(settings.output_dir) and not settings.overwrite:
    raise FileExistsError(
        f"output directory {os.path.abspath(settings.output_dir)} already exists; choose "
        "another path or pass --overwrite (overwrite=True) to replace it.")
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
      speed = (f"{rate:.2f} steps/s  ETA {_format_seconds((settings.steps - step) / rate)}"
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
  params = _pure_numpy(state)
  summary = {
      "settings": dataclasses.asdict(settings),
      "command": command_line(settings),
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
        f"{final['accuracy']:.3f} after {step} steps ({_format_seconds(wall_seconds)})",
        flush=True)
  return summary


def save(settings: Settings, cfg: ModelConfig, tokenizer, params: dict[str, Any],
         summary: dict[str, Any]) -> None:
  """The HF checkpoint, tokenizer, model card and training log, written atomically."""
  with fileio.atomic_directory(settings.output_dir, overwrite=settings.overwrite) as tmp:
    write_hf_checkpoint(tmp, cfg, hf_config_dict(cfg, tokenizer), params,
                        kept=list(range(cfg.num_layers)))
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, TRAINING_LOG_FILE), "w") as f:
      json.dump(summary, f, indent=2)
    with open(os.path.join(tmp, MODEL_CARD_FILE), "w") as f:
      f.write(model_card(cfg, summary))


def model_card(cfg: ModelConfig, summary: dict[str, Any]) -> str:
  """`MODEL_CARD.md`: what the model is, what it was trained on, how well it does."""
  s = summary["settings"]
  last = summary["log"][-1] if summary["log"] else {}
  nan = float("nan")
  families = ", ".join(f"`{f}`" for f in summary["families"])
  stop = (f"stopped early at step {summary['steps_run']}, when held-out accuracy reached "
          f"{s['target_accuracy']}" if summary["stopped_early"]
          else f"{summary['steps_run']} steps")
  device = summary["jax"]
  lines = [
      "# dpjax synthetic-suite model",
      "",
      "A small Llama-architecture decoder trained from scratch with `dpjax.train` on the "
      "synthetic multiple-choice suite (`dpjax.synthetic`). It answers with the option letter "
      "in lm-eval's MMLU prompt layout, so the `dpjax` study can read its decision out layer "
      "by layer. It is a research fixture, not a general language model.",
      "",
      "## Architecture",
      "",
      "| | |",
      "|---|---|",
      "| architecture | `LlamaForCausalLM` (dpjax `llama`) |",
      f"| blocks | {cfg.num_layers} |",
      f"| hidden size | {cfg.hidden_size} |",
      f"| MLP (SwiGLU) size | {cfg.intermediate_size} |",
      f"| attention heads / key-value heads | {cfg.num_heads} / {cfg.num_kv_heads} "
      f"(head dim {cfg.head_dim}) |",
      f"| vocabulary | {cfg.vocab_size} (byte-level BPE trained on the training items' text) |",
      f"| context | {cfg.max_position_embeddings} positions, rope theta {cfg.rope_theta:g} |",
      f"| RMSNorm eps | {cfg.rms_norm_eps:g} |",
      f"| tied embeddings | {cfg.tie_word_embeddings} |",
      f"| parameters | {summary['num_params']:,} |",
      f"| weight dtype | {cfg.param_dtype} |",
      "",
      "## Training data",
      "",
      f"* {summary['num_train_items']} items of the suite's `train` split (seed {s['seed']}), "
      f"spread evenly over the families {families}. The `test` split, which shares no item "
      "with `train`, is only evaluated on.",
      f"* With probability {s['statement_fraction']} an example is a statement: the item's "
      "question followed by its correct answer's text (`What is 43 + 35? 78`), no letter. "
      f"{summary['statement_examples']:,} statements were drawn.",
      "* Otherwise it is `dpjax.tasks.prompt(item)` (lm-eval layout with the subject header) "
      f"or, with probability {s['one_shot_fraction']}, a 1-shot prompt whose shot is another "
      "training item of the same subject; then `\" \" + answer letter` and EOS, right-padded "
      f"to {s['seq_len']} tokens. {summary['one_shot_too_long']} of the "
      f"{summary['one_shot_examples']} 1-shot examples drawn were too long and stayed 0-shot.",
      "",
      "## Training",
      "",
      "* Objective: next-token cross-entropy over all non-pad tokens, plus "
      f"{s['answer_weight']} x the cross-entropy of the answer-letter token (chance on the "
      f"letter: ln 4 = {math.log(4):.3f}).",
      f"* AdamW (b1 0.9, b2 0.95, weight decay {s['weight_decay']}, none on the norm gains), "
      f"peak learning rate {s['learning_rate']}, linear warmup over {s['warmup_fraction']} of "
      f"the steps, cosine decay to {s['final_lr_fraction']} x peak; gradients clipped to "
      f"global norm {s['clip_norm']}.",
      f"* Batch size {s['batch_size']}; {stop}.",
      f"* Training time: {_format_seconds(summary['train_seconds'])} in train steps "
      f"({summary['seconds_per_step']:.3f} s/step after the first, compiling, step); "
      f"{_format_seconds(summary['wall_seconds'])} wall in all (data, tokenizer, evaluations), "
      f"on JAX {device['version']} ({device['backend']}: {device['device']}).",
      f"* Last logged window: loss {last.get('loss', nan):.4f}, token loss "
      f"{last.get('token_loss', nan):.4f}, answer loss {last.get('answer_loss', nan):.4f}.",
      "",
      "## Held-out accuracy",
      "",
      f"0-shot, lm-eval layout, {s['num_eval_items']} items of the `test` split "
      f"(seed {s['seed']}), top letter at the last layer (as `dpjax` reads it): "
      f"**{summary['final_accuracy']:.3f}** (chance 0.25).",
      "",
      "| family | accuracy |",
      "|---|---|",
      *(f"| {family} | {acc:.3f} |" for family, acc in summary["final_per_family"].items()),
      "",
      "## Reproduce",
      "",
      "```bash",
      summary["command"],
      "```",
      "",
      "`training_log.json` holds the logged losses and every evaluation.",
  ]
  return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# Command line.

_HELP = {
    "output_dir": "Where the checkpoint goes (required; refused if it exists unless --overwrite).",
    "overwrite": "Replace an existing --output_dir.",
    "num_train_items": "Items of the synthetic train split to train on.",
    "num_eval_items": "Items of the synthetic test split to measure held-out accuracy on.",
    "one_shot_fraction": "Fraction of the letter examples given one shot (another train item, "
                         "same subject).",
    "statement_fraction": "Fraction of examples that are statements (question, then the correct "
                          "answer's text) instead of lettered prompts.",
    "vocab_size": "Vocabulary of the BPE tokenizer trained on the training text.",
    "seq_len": "Training sequence length in tokens (examples are right-padded to it).",
    "num_layers": "Decoder blocks.",
    "hidden_size": "Residual width (head_dim = hidden_size / num_heads).",
    "intermediate_size": "SwiGLU MLP width.",
    "num_heads": "Attention (query) heads.",
    "num_kv_heads": "Key/value heads (grouped-query attention).",
    "steps": "Training steps.",
    "batch_size": "Sequences per step.",
    "learning_rate": "Peak AdamW learning rate.",
    "warmup_fraction": "Fraction of --steps spent in linear warmup.",
    "final_lr_fraction": "Cosine decay ends at this fraction of the peak learning rate.",
    "weight_decay": "AdamW weight decay (not applied to norm gains).",
    "clip_norm": "Gradient clipping by global norm.",
    "answer_weight": "Extra weight on the answer-letter token's cross-entropy.",
    "seed": "Seed of the items, tokenizer, initial weights and data order.",
    "log_every": "Print and log the mean losses every this many steps.",
    "eval_every": "Measure held-out accuracy every this many steps (and at the end).",
    "eval_batch_size": "Items per forward pass in evaluation.",
    "target_accuracy": "Stop once held-out accuracy reaches this at an evaluation (>1: never).",
}


def define_flags() -> None:
  """One flag per `Settings` field, same name and default (defined only when run as a program,
  so that importing this module adds nothing to absl's global flags)."""
  definers = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
              str: flags.DEFINE_string}
  for field in dataclasses.fields(Settings):
    default = None if field.default is dataclasses.MISSING else field.default
    kind = {"str": str, "bool": bool, "int": int, "float": float}[field.type]
    definers[kind](field.name, default, _HELP[field.name])
  flags.mark_flag_as_required("output_dir")


def settings_from_flags() -> Settings:
  return Settings(**{f.name: flags.FLAGS[f.name].value for f in dataclasses.fields(Settings)})


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; everything is a flag.")
  try:
    settings = settings_from_flags()
    train(settings)
  except (ValueError, FileExistsError, tasks.TaskDataError) as e:
    raise SystemExit(f"dpjax.train: error: {e}") from e


def run() -> None:
  define_flags()
  app.run(main)


if __name__ == "__main__":
  run()
