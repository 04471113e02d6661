"""Multiple-choice tasks: one item schema, readers, lm-eval prompts, token batches.

* `schema`: `Item` (question, options (2 to 10), correct index, subject, id).
* `readers`: MMLU (HF `cais/mmlu` rows and the original per-subject CSVs),
  ARC, CommonsenseQA and OpenBookQA (HF rows or the original JSONL), generic
  JSONL/CSV with named columns, and the HF hub through `datasets`.
* `synthetic`: the offline synthetic suite.
* `prompts`: lm-eval's MMLU template and its k-shot examples.
* `encoding`: token ids, in-context letter ids, left-padded batches.
* `specs`: `load_task(spec, split)` for the command line's task specs.

The names below are the package's public surface.
"""

from dpjax.tasks.encoding import Batch, EncodedTask, batches, encode
from dpjax.tasks.prompts import describe, prompt, question_text, shots_for
from dpjax.tasks.schema import LETTERS, MAX_OPTIONS, MIN_OPTIONS, Item, TaskDataError, make_item
from dpjax.tasks.specs import TASK_FORMATS, load_task

__all__ = ["Batch", "EncodedTask", "Item", "LETTERS", "MAX_OPTIONS", "MIN_OPTIONS",
           "TASK_FORMATS", "TaskDataError", "batches", "describe", "encode", "load_task",
           "make_item", "prompt", "question_text", "shots_for"]
