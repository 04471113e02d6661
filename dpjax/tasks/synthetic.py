"""The synthetic task suite: offline, deterministic by seed, four kinds of computation.

Families, each its own `subject`, each answerable from the prompt alone (a
model learns the skill, not a table of answers, so held-out items are fair):

* `arithmetic`: `What is 57 + 10?` (`+ 1` or `+ 10`), distractors within 2 or
  exactly 10 of the sum (carrying out a small computation).
* `made_up_geography`: a fact about an invented country, stated in the prompt,
  then asked back (`The capital of Kalozor is Ranmi. What is the capital of
  Kalozor?`); the facts come from a table the generator defines (reading a
  fact out of the context).
* `number_comparison`: `Which number is the largest?` over the options
  themselves (comparing what the options say).
* `alphabet`: `Which letter comes first in the alphabet?` over four letters (an
  order on a symbolic set).

Every split has the correct answers balanced across the letters. `train`,
`dev` (few-shot examples) and `test` never share an item: an item is its
question with its ordered options. `build_tokenizer` trains a small byte-level
BPE on the suite's own text, in which `" A"`, `" B"`, ... are single tokens.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Callable, Sequence

import numpy as np

from dpjax.tasks.prompts import prompt
from dpjax.tasks.schema import LETTERS, Item

FAMILIES = ("arithmetic", "made_up_geography", "number_comparison", "alphabet")
NUM_OPTIONS = 4
_SYLLABLES = ("ka", "lo", "mi", "ran", "tu", "vel", "zor", "bi", "shen", "da", "po", "qui",
              "nar", "fe", "gul", "the", "wy", "xo", "sa", "mon")
_COLOURS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey",
            "brown", "pink", "silver")
_ANIMALS = ("wolf", "eagle", "bear", "lion", "owl", "fox", "horse", "tiger", "whale", "crane",
            "otter", "lynx")


@dataclasses.dataclass(frozen=True)
class FactTable:
  """The invented world the `made_up_geography` questions are about."""
  countries: tuple[str, ...]
  capitals: tuple[str, ...]
  colours: tuple[str, ...]
  animals: tuple[str, ...]


def fact_table(seed: int = 0, num_countries: int = 24) -> FactTable:
  rng = np.random.default_rng([seed, 7919])
  names: list[str] = []
  while len(names) < 2 * num_countries:
    n = int(rng.integers(2, 4))
    name = "".join(rng.choice(_SYLLABLES, size=n)).capitalize()
    if name not in names:
      names.append(name)
  return FactTable(
      countries=tuple(names[:num_countries]),
      capitals=tuple(names[num_countries:]),
      colours=tuple(rng.choice(_COLOURS, size=num_countries)),
      animals=tuple(rng.choice(_ANIMALS, size=num_countries)))


def _arithmetic(rng) -> tuple[str, str, list[str]]:
  a = int(rng.integers(10, 90))
  b = int(rng.choice([1, 10]))
  total = a + b
  near = [total + o for o in (-2, -1, 1, 2, -10, 10) if 0 < total + o < 100]
  distractors = [int(x) for x in rng.choice(near, size=NUM_OPTIONS - 1, replace=False)]
  return f"What is {a} + {b}?", str(total), [str(d) for d in distractors]


def _geography(rng, table: FactTable) -> tuple[str, str, list[str]]:
  c = int(rng.integers(len(table.countries)))
  country = table.countries[c]
  kind = int(rng.integers(3))
  if kind == 0:
    others = [x for x in table.capitals if x != table.capitals[c]]
    return (f"The capital of {country} is {table.capitals[c]}. What is the capital of "
            f"{country}?", table.capitals[c],
            list(rng.choice(others, size=NUM_OPTIONS - 1, replace=False)))
  values, pool = ((table.colours, _COLOURS) if kind == 1 else (table.animals, _ANIMALS))
  question = (f"The flag of {country} is {values[c]}. What colour is the flag of {country}?"
              if kind == 1 else
              f"The emblem of {country} is the {values[c]}. Which animal is the emblem of "
              f"{country}?")
  others = [x for x in pool if x != values[c]]
  return question, values[c], list(rng.choice(others, size=NUM_OPTIONS - 1, replace=False))


def _comparison(rng) -> tuple[str, str, list[str]]:
  numbers = rng.choice(np.arange(10, 100), size=NUM_OPTIONS, replace=False)
  largest = int(numbers.max())
  return ("Which number is the largest?", str(largest),
          [str(int(n)) for n in numbers if n != largest])


def _alphabet(rng) -> tuple[str, str, list[str]]:
  letters = sorted(rng.choice(list(string.ascii_lowercase), size=NUM_OPTIONS, replace=False))
  return "Which letter comes first in the alphabet?", str(letters[0]), [str(x) for x in letters[1:]]


def _generator(family: str, table: FactTable) -> Callable:
  return {
      "arithmetic": _arithmetic,
      "made_up_geography": lambda rng: _geography(rng, table),
      "number_comparison": _comparison,
      "alphabet": _alphabet,
  }[family]


_SPLIT_STREAMS = {"test": 1, "dev": 2, "train": 3}


def generate(split: str, num_items: int, seed: int = 0,
             families: Sequence[str] = FAMILIES) -> list[Item]:
  """`num_items` items of `split`, spread evenly over `families`, letters balanced.

  Deterministic in (`split`, `num_items`, `seed`, `families`). Items of `train`
  and `dev` never equal an item of `test` (nor of each other): earlier splits
  in the order test, dev, train claim an item first.
  """
  if split not in _SPLIT_STREAMS:
    raise ValueError(f"split={split!r}; the synthetic suite has {sorted(_SPLIT_STREAMS)}.")
  unknown = sorted(set(families) - set(FAMILIES))
  if unknown:
    raise ValueError(f"unknown synthetic families {unknown}; choose from {FAMILIES}.")
  table = fact_table(seed)
  taken = set()
  for earlier in list(_SPLIT_STREAMS)[:list(_SPLIT_STREAMS).index(split)]:
    taken |= _claimed(earlier, seed, families)
  return _generate(split, num_items, seed, families, table, taken)


# How many items the test and dev splits may claim (sizes above this are refused).
_CLAIM_LIMIT = {"test": 4000, "dev": 200}


def _claimed(split: str, seed: int, families: Sequence[str]) -> set:
  items = _generate(split, _CLAIM_LIMIT[split], seed, families, fact_table(seed), set())
  return {(it.question, it.options) for it in items}


def _generate(split, num_items, seed, families, table, taken) -> list[Item]:
  if split in _CLAIM_LIMIT and num_items > _CLAIM_LIMIT[split]:
    raise ValueError(f"the synthetic {split} split holds at most {_CLAIM_LIMIT[split]} items; "
                     f"asked for {num_items}.")
  per_family = [num_items // len(families) + (f < num_items % len(families))
                for f in range(len(families))]
  items = []
  for f, family in enumerate(families):
    rng = np.random.default_rng([seed, _SPLIT_STREAMS[split], f])
    make = _generator(family, table)
    letters = rng.permutation(NUM_OPTIONS)
    seen = set(taken)
    n = 0
    attempts = 0
    while n < per_family[f]:
      attempts += 1
      if attempts > 200 * per_family[f] + 1000:
        raise ValueError(f"the {family} family cannot make {per_family[f]} distinct {split} "
                         "items; ask for fewer.")
      question, correct, distractors = make(rng)
      answer = int(letters[n % NUM_OPTIONS])
      options = [str(d) for d in rng.permutation(distractors)]
      options.insert(answer, correct)
      key = (question, tuple(options))
      if key in seen:
        continue
      seen.add(key)
      items.append(Item(id=f"{family}/{split}/{n}", question=question, options=tuple(options),
                        answer=answer, subject=family))
      n += 1
  return items


def training_text(items: Sequence[Item]) -> list[str]:
  """Each item as the prompt followed by its answer, as a model should learn it."""
  return [prompt(item) + " " + LETTERS[item.answer] for item in items]


def build_tokenizer(texts: Sequence[str], vocab_size: int = 512):
  """A byte-level BPE trained on `texts`, wrapped for transformers.

  The letters `" A"` ... `" J"` are guaranteed single tokens (checked).
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  import transformers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  letters = " ".join(LETTERS)
  tok.train_from_iterator(list(texts) + [f"Answer: {letters}"] * 1000, trainer=trainer)
  wrapped = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
  for letter in LETTERS:
    ids = wrapped("Answer: " + letter, add_special_tokens=False)["input_ids"]
    if len(wrapped("Answer:", add_special_tokens=False)["input_ids"]) != len(ids) - 1:
      raise RuntimeError(f"the trained tokenizer splits ' {letter}'; raise vocab_size.")
  return wrapped
