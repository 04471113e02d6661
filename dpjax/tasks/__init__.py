"""Multiple-choice tasks: one item schema, readers, lm-eval prompts, token batches.

* `schema`: `Item` (question, options (2 to 10), correct index, subject, id).
* `readers`: MMLU (HF `cais/mmlu` rows and the original per-subject CSVs),
  ARC, CommonsenseQA and OpenBookQA (HF rows or the original JSONL), generic
  JSONL/CSV/saved-dataset rows with named columns, and the HF hub.
* `benchmarks` (with `disk`, `fetch`): the common benchmarks by name, from a
  local directory of HF `save_to_disk` datasets that `dpjax-data` fills.
* `scoring`: lm-eval's exact match and SQuAD's token F1 for open-ended answers.
* `synthetic`: the offline synthetic suite.
* `prompts`: lm-eval's templates (the MMLU letter layout, each task's cloze and
  open templates) and the k-shot examples.
* `encoding`: the three read formats as tokens (letter ids, gold first
  tokens, packed cloze sequences), left-padded batches.
* `specs`: `load_task(spec, split)` for the command line's task specs.

The names below are the package's public surface.
"""

from dpjax.tasks.encoding import (ANSWER_FORMATS, CLOZE_NORMS, FORMATS, Batch, EncodedTask,
                                  batches, encode, encode_cloze, encode_open, read_format)
from dpjax.tasks.prompts import (cloze_requests, describe, first_per_subject, open_prompt, prompt,
                                 question_text, shots_for)
from dpjax.tasks.schema import LETTERS, MAX_OPTIONS, MIN_OPTIONS, Item, TaskDataError, make_item
from dpjax.tasks.specs import TASK_FORMATS, TaskInfo, load_task, resolve_task

__all__ = ["ANSWER_FORMATS", "Batch", "CLOZE_NORMS", "EncodedTask", "FORMATS", "Item", "LETTERS", "MAX_OPTIONS",
           "MIN_OPTIONS", "TASK_FORMATS", "TaskDataError", "TaskInfo", "batches",
           "cloze_requests", "describe", "encode", "encode_cloze", "encode_open",
           "first_per_subject", "load_task", "make_item", "open_prompt", "prompt",
           "question_text", "read_format", "resolve_task", "shots_for"]
