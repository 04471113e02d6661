"""Exact match of generated answers, normalized as lm-eval normalizes them for NQ-open and
TriviaQA: the generation cut at the first newline, stripped; case and punctuation
ignored; for NQ-open, articles removed first (its `regexes_to_ignore`). An item
scores 1 when the answer matches any gold answer.
"""

from __future__ import annotations

import re
import string
from typing import Sequence

# lm-eval's nq_open `regexes_to_ignore` (applied before lower-casing, so case matters here).
NQ_ARTICLES = "\\b(?:The |the |An |A |The |a |an )"
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str, remove_articles: bool = False) -> str:
  if remove_articles:
    text = re.sub(NQ_ARTICLES, "", text)
  return text.lower().translate(_PUNCTUATION)


def answer_of(generation: str) -> str:
  """The answer a generation gives: up to its first newline, stripped."""
  return generation.split("\n", 1)[0].strip()


def exact_match(generation: str, golds: Sequence[str], remove_articles: bool = False) -> bool:
  answer = normalize(answer_of(generation), remove_articles)
  return any(answer == normalize(g, remove_articles) for g in golds)
