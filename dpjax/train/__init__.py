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

from dpjax.train.card import MODEL_CARD_FILE, TRAINING_LOG_FILE
from dpjax.train.data import TrainingStream, pack, statement, tokenize_examples
from dpjax.train.loop import train
from dpjax.train.settings import TrainSettings, model_config

__all__ = ["MODEL_CARD_FILE", "TRAINING_LOG_FILE", "TrainSettings", "TrainingStream", "model_config",
           "pack", "statement", "tokenize_examples", "train"]
