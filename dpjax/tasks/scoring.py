"""Scoring generated answers as lm-eval scores NQ-open and TriviaQA, and by token F1.

Exact match (lm-eval's `exact_match` with `ignore_case`, `ignore_punctuation`, and for
NQ-open its `regexes_to_ignore`, the articles): the answer a generation gives is its
text up to the first stop sequence, stripped (the open format stops at a newline; the
generate format at lm-eval's `until` for both tasks: a newline, "." or ","), and it
scores 1 when it equals any gold answer so normalized.

Token F1 (SQuAD's): both texts lower-cased, punctuation and the articles a/an/the
removed, split on whitespace; the harmonic mean of the precision and recall of the
answer's tokens against a gold's (as multisets), the best over the golds; 1 when both
are empty, 0 when one is.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Sequence

# lm-eval's nq_open `regexes_to_ignore` (applied before lower-casing, so case matters here).
NQ_ARTICLES = "\\b(?:The |the |An |A |The |a |an )"
_PUNCTUATION = str.maketrans("", "", string.punctuation)
# Where an answer ends: the open format's newline; lm-eval's `until` for NQ-open and
# TriviaQA (the generate format).
OPEN_STOPS = ("\n",)
GENERATE_STOPS = ("\n", ".", ",")


def normalize(text: str, remove_articles: bool = False) -> str:
  if remove_articles:
    text = re.sub(NQ_ARTICLES, "", text)
  return text.lower().translate(_PUNCTUATION)


def answer_of(generation: str, stops: Sequence[str] = OPEN_STOPS) -> str:
  """The answer a generation gives: up to its first stop sequence, stripped."""
  cut = min((i for i in (generation.find(s) for s in stops) if i >= 0), default=len(generation))
  return generation[:cut].strip()


def exact_match(generation: str, golds: Sequence[str], remove_articles: bool = False,
                stops: Sequence[str] = OPEN_STOPS) -> bool:
  answer = normalize(answer_of(generation, stops), remove_articles)
  return any(answer == normalize(g, remove_articles) for g in golds)


def _f1_tokens(text: str) -> list[str]:
  text = text.lower().translate(_PUNCTUATION)
  return re.sub(r"\b(a|an|the)\b", " ", text).split()


def token_f1(generation: str, golds: Sequence[str], stops: Sequence[str] = OPEN_STOPS) -> float:
  """SQuAD's token F1 of the generation's answer, the best over `golds` (0 without golds)."""
  answer = _f1_tokens(answer_of(generation, stops))
  best = 0.0
  for gold in golds:
    reference = _f1_tokens(gold)
    if not answer or not reference:
      best = max(best, float(answer == reference))
      continue
    common = sum((collections.Counter(answer) & collections.Counter(reference)).values())
    if common:
      precision, recall = common / len(answer), common / len(reference)
      best = max(best, 2 * precision * recall / (precision + recall))
  return best


def constant_answer_share(gold_sets: Sequence[Sequence[str]], remove_articles: bool = False
                          ) -> float:
  """The exact match of the best constant answer: the largest share of items one
  normalized answer matches (the generate format's chance)."""
  if not gold_sets:
    return 0.0
  counts: collections.Counter = collections.Counter()
  for golds in gold_sets:
    counts.update({normalize(g, remove_articles) for g in golds})
  return max(counts.values(), default=0) / len(gold_sets)
