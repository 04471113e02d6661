"""What a training run leaves behind: the HF checkpoint, the model card, the training log."""

from __future__ import annotations

import json
import math
import os
from typing import Any

from dpjax import fileio
from dpjax.checkpoints.export import write_hf_checkpoint
from dpjax.model.config import ModelConfig
from dpjax.train.settings import TrainSettings, hf_config_dict

MODEL_CARD_FILE = "MODEL_CARD.md"
TRAINING_LOG_FILE = "training_log.json"


def format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def save(settings: TrainSettings, cfg: ModelConfig, tokenizer, params: dict[str, Any],
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


# How the suite and the model came to be what they are (the runs before the one this card
# describes), part of every card the trainer writes.
HISTORY = (
    "The suite's families were first lookups of memorized answers (two-digit sums, facts of a "
    "hidden table, letter steps); two training runs stopped after 1,500 and 1,750 steps had "
    "learned only number comparison (held-out 0.43 and 0.42 overall), the second with the "
    "answer texts added as plain statements (`--statement_fraction`, still available). The "
    "families were then redesigned so that every item is answerable from its prompt (the fact "
    "is stated before it is asked, `+ 1` / `+ 10` instead of free sums, the first letter of "
    "four instead of letter steps), and the third run reached the target. Small models "
    "trained from scratch on multiple-choice items learn the answer letter late and "
    "suddenly: the answer loss sat at chance (ln 4) for over a thousand steps before it "
    "fell.")


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
      "synthetic multiple-choice suite (`dpjax.tasks.synthetic`). It answers with the option letter "
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
      f"* Training time: {format_seconds(summary['train_seconds'])} in train steps "
      f"({summary['seconds_per_step']:.3f} s/step after the first, compiling, step); "
      f"{format_seconds(summary['wall_seconds'])} wall in all (data, tokenizer, evaluations), "
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
      "",
      "## History",
      "",
      HISTORY,
  ]
  return "\n".join(lines) + "\n"
