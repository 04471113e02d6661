"""Task loaders, prompts, in-context letter tokens, batches, and the synthetic suite."""

from __future__ import annotations

import collections
import csv
import json
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
import transformers

from dpjax.tasks import synthetic
from dpjax import tasks
from dpjax.tasks import readers
from dpjax.tasks import Item, TaskDataError


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_mmlu_hf_rows():
  rows = [{"question": "What is 2+2?", "subject": "elementary_mathematics",
           "choices": ["3", "4", "5", "6"], "answer": 1}]
  (item,) = readers.mmlu_rows(rows, "cais/mmlu")
  assert item == Item(id="elementary_mathematics/0", question="What is 2+2?",
                      options=("3", "4", "5", "6"), answer=1, subject="elementary_mathematics")


def test_mmlu_original_csv_layout(tmp_path):
  for split, rows in {"dev": [["Dev q?", "a", "b", "c", "d", "C"]],
                      "test": [["First, with a comma?", "x", "y, z", "w", "v", "B"],
                               ['Says "hi"?', "1", "2", "3", "4", "D"]]}.items():
    (tmp_path / split).mkdir()
    with open(tmp_path / split / f"high_school_physics_{split}.csv", "w", newline="") as f:
      csv.writer(f).writerows(rows)
  test = readers.load_mmlu_csv(str(tmp_path), "test")
  assert [it.question for it in test] == ["First, with a comma?", 'Says "hi"?']
  assert test[0].options == ("x", "y, z", "w", "v") and test[0].answer == 1
  assert test[1].answer == 3 and test[1].subject == "high_school_physics"
  assert test[0].id == "high_school_physics/test/0"
  dev = readers.load_mmlu_csv(str(tmp_path / "dev" / "high_school_physics_dev.csv"), "dev")
  assert dev[0].answer == 2 and dev[0].subject == "high_school_physics"


def test_arc_hf_rows_with_numeric_labels_and_3_to_5_options():
  rows = [
      {"id": "Mercury_1", "question": "Which is a planet?",
       "choices": {"text": ["Sun", "Mars", "Moon"], "label": ["1", "2", "3"]}, "answerKey": "2"},
      {"id": "Mercury_2", "question": "Pick E",
       "choices": {"text": ["a", "b", "c", "d", "e"], "label": list("ABCDE")}, "answerKey": "E"},
  ]
  items = readers.choices_rows(rows, "arc.jsonl", "arc")
  assert [it.answer for it in items] == [1, 4]
  assert [it.num_options for it in items] == [3, 5]


def test_arc_original_jsonl_layout(tmp_path):
  path = _write_jsonl(tmp_path / "ARC-Challenge-Test.jsonl", [
      {"id": "q1", "question": {"stem": "Stem?", "choices": [
          {"text": "one", "label": "A"}, {"text": "two", "label": "B"},
          {"text": "three", "label": "C"}, {"text": "four", "label": "D"}]}, "answerKey": "D"}])
  (item,) = readers.load_choices_jsonl(path, "arc")
  assert (item.question, item.options, item.answer) == ("Stem?", ("one", "two", "three", "four"), 3)


def test_commonsense_qa_and_openbookqa_rows():
  csqa = readers.choices_rows([{
      "id": "c1", "question": "Where do fish live?", "question_concept": "fish",
      "choices": {"label": list("ABCDE"), "text": ["tree", "sea", "sky", "desk", "car"]},
      "answerKey": "B"}], "csqa", "commonsense_qa")
  assert csqa[0].answer == 1 and csqa[0].num_options == 5
  obqa = readers.choices_rows([{
      "id": "7-980", "question_stem": "The sun is a",
      "choices": {"text": ["star", "planet", "moon", "comet"], "label": list("ABCD")},
      "answerKey": "A"}], "openbookqa", "openbookqa")
  assert obqa[0].question == "The sun is a" and obqa[0].answer == 0


def test_generic_jsonl_and_csv(tmp_path):
  jsonl = _write_jsonl(tmp_path / "t.jsonl", [
      {"qid": "a", "q": "Q1?", "opts": ["x", "y"], "gold": 1},
      {"qid": "b", "q": "Q2?", "opts": ["x", "y", "z"], "gold": "C"}])
  items = readers.load_generic(jsonl, question="q", options="opts", answer="gold", id="qid")
  assert [(it.id, it.answer, it.num_options) for it in items] == [("a", 1, 2), ("b", 2, 3)]
  path = tmp_path / "t.csv"
  path.write_text("id,question,A,B,C,answer,subject\n1,Q?,p,q,r,2,topic\n")
  (item,) = readers.load_generic(str(path))
  assert item.options == ("p", "q", "r") and item.answer == 2 and item.subject == "topic"


@pytest.mark.parametrize("row,match", [
    ({"id": "1", "question": "Q?", "options": ["a", "b"]}, r"t.jsonl, row 1: field 'answer' is missing"),
    ({"id": "1", "question": "Q?", "options": ["a", "b"], "answer": 2},
     r"t.jsonl, row 1: field 'answer' is 2, which is not one of the 2 options"),
    ({"id": "1", "question": "Q?", "options": ["a", " "], "answer": 0},
     r"t.jsonl, row 1: field 'options' has empty options \['B'\]"),
    ({"id": "1", "question": "Q?", "options": ["a"], "answer": 0},
     r"t.jsonl, row 1: field 'options' has 1 options; dpjax takes 2 to 10"),
    ({"id": "1", "question": "", "options": ["a", "b"], "answer": 0},
     r"t.jsonl, row 1: field 'question' is empty"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, row, match):
  path = _write_jsonl(tmp_path / "t.jsonl", [row])
  with pytest.raises(TaskDataError, match=match):
    readers.load_generic(path)


def test_duplicate_ids_are_refused(tmp_path):
  row = {"id": "same", "question": "Q?", "options": ["a", "b"], "answer": 0}
  path = _write_jsonl(tmp_path / "t.jsonl", [row, row])
  with pytest.raises(TaskDataError, match=r"t.jsonl: duplicate id 'same' at items 0 and 1"):
    readers.load_generic(path)


def test_bad_mmlu_answer_letter_names_file_and_row(tmp_path):
  path = tmp_path / "law_test.csv"
  path.write_text("Q?,a,b,c,d,F\n")
  with pytest.raises(TaskDataError, match=r"law_test.csv, row 1: field 'answer' is 'F'"):
    readers.load_mmlu_csv(str(path), "test")


def test_hub_loading_without_datasets_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "datasets", None)
  with pytest.raises(TaskDataError, match=r"needs the `datasets` package.*dpjax\[hub\]"):
    readers.load_from_hub("cais/mmlu", None, "test")
  with pytest.raises(TaskDataError, match="has no loader"):
    readers.load_from_hub("someone/else", None, "test")


def test_prompt_is_lm_eval_mmlu_template():
  shot = Item("s", "  Shot question? ", ("p", "q"), 1, "college_biology")
  item = Item("i", "Real question?", ("a", "b", "c"), 0, "college_biology")
  assert tasks.prompt(item, [shot]) == (
      "The following are multiple choice questions (with answers) about college biology.\n\n"
      "Shot question?\nA. p\nB. q\nAnswer: B\n\n"
      "Real question?\nA. a\nB. b\nC. c\nAnswer:")
  assert tasks.prompt(Item("j", "Q?", ("x", "y"), 0)) == "Q?\nA. x\nB. y\nAnswer:"


def test_shots_are_the_first_k_of_the_subject():
  dev = [Item(f"d{i}", f"q{i}", ("a", "b"), 0, "s1" if i % 2 else "s2") for i in range(6)]
  item = Item("t", "q", ("a", "b"), 0, "s1")
  assert [s.id for s in tasks.shots_for([item], dev, 2)[0]] == ["d1", "d3"]
  with pytest.raises(TaskDataError, match=r"k_shot=4 but the few-shot split has 3 items for subject 's1'"):
    tasks.shots_for([item], dev, 4)


@pytest.fixture(scope="module")
def tokenizer():
  train = synthetic.generate("train", 400)
  return synthetic.build_tokenizer(synthetic.training_text(train), 400)


def test_letter_tokens_are_found_in_context(tokenizer):
  items = synthetic.generate("test", 8)
  enc = tasks.encode(tokenizer, items, [tasks.prompt(i) for i in items])
  want = tokenizer.convert_tokens_to_ids(["ĠA", "ĠB", "ĠC", "ĠD"])
  assert enc.letter_ids.tolist() == [want] * 8
  # Exactly lm-eval's split: the prompt's tokens, then one token for " C".
  whole = tokenizer(tasks.prompt(items[0]) + " C", add_special_tokens=False)["input_ids"]
  assert whole == enc.tokens[0] + [want[2]]


def _byte_tokenizer(merges):
  alphabet = pre_tokenizers.ByteLevel.alphabet()
  vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
  for a, b in merges:
    vocab[a + b] = len(vocab)
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


def test_multi_token_letters_are_an_error_that_shows_them():
  items = [Item("x", "Q?", ("a", "b"), 0)]
  with pytest.raises(TaskDataError, match=r"item 'x': the continuations \['A', 'B'\] are not one "
                     r"token each.*'Ġ', 'A'"):
    tasks.encode(_byte_tokenizer([]), items, [tasks.prompt(items[0])])


def test_letters_sharing_a_token_are_an_error():
  vocab = {"<unk>": 0, "Q?": 1, "A.": 2, "B.": 3, "a": 4, "b": 5, "Answer:": 6}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
  items = [Item("y", "Q?", ("a", "b"), 0)]
  with pytest.raises(TaskDataError, match=r"item 'y': letters \['A', 'B'\] share token ids"):
    tasks.encode(wrapped, items, [tasks.prompt(items[0])])


def test_long_prompts_are_refused_or_left_truncated(tokenizer):
  items = synthetic.generate("test", 4)
  prompts = [tasks.prompt(i) for i in items]
  full = tasks.encode(tokenizer, items, prompts)
  longest = max(len(t) for t in full.tokens)
  with pytest.raises(TaskDataError, match=r"prompt is \d+ tokens, longer than the model's 20.*--truncation=left"):
    tasks.encode(tokenizer, items, prompts, max_length=20)
  cut = tasks.encode(tokenizer, items, prompts, max_length=20, truncation="left")
  assert longest > 20
  for whole, kept in zip(full.tokens, cut.tokens):
    assert kept == whole[-20:]
  assert cut.truncated.all()
  np.testing.assert_array_equal(cut.letter_ids, full.letter_ids)


def test_batches_are_left_padded_with_the_answer_last(tokenizer):
  items = synthetic.generate("test", 10, families=("arithmetic", "number_comparison"))
  enc = tasks.encode(tokenizer, items, [tasks.prompt(i) for i in items])
  out = tasks.batches(enc, 4, pad_id=0, length_multiple=16)
  assert [b.input_ids.shape[0] for b in out] == [4, 4, 4]
  longest = max(len(t) for t in enc.tokens)
  # Similar lengths: one common length, the longest rounded up to 16.
  assert {b.input_ids.shape[1] for b in out} == {-(-longest // 16) * 16}
  seen = []
  for b in out:
    for row, i in enumerate(b.index):
      if i < 0:
        continue
      seen.append(i)
      n = len(enc.tokens[i])
      assert b.input_ids[row, -n:].tolist() == enc.tokens[i]
      assert b.attention_mask[row].sum() == n and b.attention_mask[row, -1] == 1
      assert b.answer[row] == items[i].answer
  assert sorted(seen) == list(range(10))
  assert (out[-1].index == -1).sum() == 2


def test_batches_of_very_different_lengths_get_their_own_lengths():
  items = [Item(str(i), "q " * (5 if i < 6 else 60), ("a", "b"), 0) for i in range(8)]
  enc = tasks.EncodedTask(items, [""] * 8, [[5] * (6 if i < 6 else 200) for i in range(8)],
                          np.zeros((8, 2), np.int32), np.zeros(8, bool))
  out = tasks.batches(enc, 4, length_multiple=32)
  assert [b.input_ids.shape[1] for b in out] == [32, 224]


def test_synthetic_suite_is_deterministic_balanced_and_disjoint():
  a = synthetic.generate("test", 200, seed=3)
  assert a == synthetic.generate("test", 200, seed=3)
  assert a != synthetic.generate("test", 200, seed=4)
  by_family = collections.defaultdict(list)
  for item in a:
    by_family[item.subject].append(item.answer)
  assert sorted(by_family) == sorted(synthetic.FAMILIES)
  for answers in by_family.values():
    counts = collections.Counter(answers)
    assert len(counts) == 4 and max(counts.values()) - min(counts.values()) <= 1
  keys = lambda items: {(i.question, i.options) for i in items}
  train = synthetic.generate("train", 2000, seed=3)
  dev = synthetic.generate("dev", 20, seed=3)
  assert not keys(train) & keys(a) and not keys(dev) & keys(a) and not keys(train) & keys(dev)
  assert len({i.id for i in a}) == 200


def test_synthetic_answers_are_right():
  table = synthetic.fact_table(0)
  for item in synthetic.generate("test", 400):
    correct = item.options[item.answer]
    q = item.question
    if item.subject == "arithmetic":
      a, b = q[len("What is "):-1].split(" + ")
      assert int(correct) == int(a) + int(b)
    elif item.subject == "number_comparison":
      assert int(correct) == max(int(o) for o in item.options)
    elif item.subject == "alphabet":
      assert correct == min(item.options)
    else:
      country = q.rstrip("?").split()[-1]
      c = table.countries.index(country)
      assert correct in (table.capitals[c], table.colours[c], table.animals[c])
      assert correct in q.split("?")[0].replace(".", " ").split()  # stated in the prompt
    assert len(set(item.options)) == 4
