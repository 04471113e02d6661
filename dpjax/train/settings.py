"""What a training run depends on: `TrainSettings` (each field is also a flag) and the model it makes."""

from __future__ import annotations

import dataclasses
from typing import Any

from dpjax.model.config import ModelConfig
from dpjax.fields import setting
from dpjax.tasks import synthetic

# Fixed parts of the architecture (not flags): those of the bundled model.
MAX_POSITION_EMBEDDINGS = 256
RMS_NORM_EPS = 1e-5
ROPE_THETA = 10000.0


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """Everything a training run depends on. Each field is also a flag of the same name."""
  output_dir: str = setting(help='Where the checkpoint goes (required; refused if it exists unless --overwrite).', required=True)
  overwrite: bool = setting(False, 'Replace an existing --output_dir.')
  # Data.
  num_train_items: int = setting(16000, 'Items of the synthetic train split to train on.')
  num_eval_items: int = setting(400, 'Items of the synthetic test split to measure held-out accuracy on.')
  one_shot_fraction: float = setting(0.0, 'Fraction of the letter examples given one shot (another train item, same subject).')
  statement_fraction: float = setting(0.0, "Fraction of examples that are statements (question, then the correct answer's text) instead of lettered prompts.")
  vocab_size: int = setting(512, 'Vocabulary of the BPE tokenizer trained on the training text.')
  seq_len: int = setting(80, 'Training sequence length in tokens (examples are right-padded to it).')
  # Model.
  num_layers: int = setting(16, 'Decoder blocks.')
  hidden_size: int = setting(64, 'Residual width (head_dim = hidden_size / num_heads).')
  intermediate_size: int = setting(256, 'SwiGLU MLP width.')
  num_heads: int = setting(4, 'Attention (query) heads.')
  num_kv_heads: int = setting(2, 'Key/value heads (grouped-query attention).')
  # Optimization.
  steps: int = setting(4000, 'Training steps.')
  batch_size: int = setting(32, 'Sequences per step.')
  learning_rate: float = setting(3e-3, 'Peak AdamW learning rate.')
  warmup_fraction: float = setting(0.05, 'Fraction of --steps spent in linear warmup.')
  final_lr_fraction: float = setting(0.1, 'Cosine decay ends at this fraction of the peak learning rate.')
  weight_decay: float = setting(0.1, 'AdamW weight decay (not applied to norm gains).')
  clip_norm: float = setting(1.0, 'Gradient clipping by global norm.')
  answer_weight: float = setting(4.0, "Extra weight on the answer-letter token's cross-entropy.")
  seed: int = setting(0, 'Seed of the items, tokenizer, initial weights and data order.')
  # Progress and stopping.
  log_every: int = setting(50, 'Print and log the mean losses every this many steps.')
  eval_every: int = setting(250, 'Measure held-out accuracy every this many steps (and at the end).')
  eval_batch_size: int = setting(50, 'Items per forward pass in evaluation.')
  target_accuracy: float = setting(0.97, 'Stop once held-out accuracy reaches this at an evaluation (>1: never).')

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


def model_config(settings: TrainSettings, vocab_size: int) -> ModelConfig:
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
