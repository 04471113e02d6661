"""dpjax.train: a tiny model trains, saves a checkpoint HF and dpjax load alike, reproducibly."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import transformers

import dpjax
from tests.support import reference
from dpjax.tasks import synthetic
from dpjax import tasks, train

ATOL = 1e-4


def tiny_settings(output_dir, **changes) -> train.TrainSettings:
  """A model and run small enough for a test: 2 blocks of width 32, a 300-token vocabulary."""
  fields = dict(output_dir=str(output_dir), num_train_items=200, num_eval_items=40,
                vocab_size=300, num_layers=2, hidden_size=32, intermediate_size=64,
                num_heads=4, num_kv_heads=2, steps=40, batch_size=16, learning_rate=3e-3,
                seq_len=192, log_every=1, eval_every=1000, eval_batch_size=40)
  fields.update(changes)
  return train.TrainSettings(**fields)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """One 40-step run: its returned log and its output directory."""
  out = tmp_path_factory.mktemp("train") / "model"
  return train.train(tiny_settings(out)), str(out)


def test_loss_falls(trained):
  result, _ = trained
  log = result["log"]
  assert [entry["step"] for entry in log] == list(range(1, 41))
  first = log[0]["loss"]
  last = np.mean([entry["loss"] for entry in log[-10:]])
  # From about (1 + answer_weight) * ln(300) = 28.5 at the start.
  assert last < 0.6 * first, (first, last)
  # The answer letter is learned to be a letter at least: below ln(300), toward ln 4.
  assert np.mean([entry["answer_loss"] for entry in log[-10:]]) < 0.6 * log[0]["answer_loss"]


def test_checkpoint_loads_in_hf_and_dpjax_with_equal_logits(trained):
  _, out = trained
  tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  items = synthetic.generate("test", 8, seed=3)
  encoded = tasks.encode(tokenizer, items, [tasks.prompt(item) for item in items])
  batch = tasks.batches(encoded, 8, pad_id=tokenizer.pad_token_id)[0]
  hf = reference.load_hf(out)
  assert len(hf.model.layers) == 2
  want, _ = reference.hf_forward(hf, batch.input_ids, batch.attention_mask)
  got = np.asarray(dpjax.load_model(out).logits(batch.input_ids,
                                               attention_mask=batch.attention_mask))
  real = batch.attention_mask.astype(bool)
  assert np.abs(got - want)[real].max() <= ATOL
  # Trained, not random: the next token after "Answer:" is a letter for every item.
  letters = {int(i) for i in encoded.letter_ids.ravel()}
  assert {int(i) for i in got[:, -1].argmax(-1)} <= letters


def test_card_and_log_describe_the_run(trained):
  result, out = trained
  with open(os.path.join(out, train.TRAINING_LOG_FILE)) as f:
    logged = json.load(f)
  assert logged["log"] == result["log"]
  assert [e["step"] for e in logged["evals"]] == [40]
  assert logged["final_accuracy"] == result["final_accuracy"]
  assert set(logged["final_per_family"]) == set(synthetic.FAMILIES)
  with open(os.path.join(out, train.MODEL_CARD_FILE)) as f:
    card = f.read()
  assert f"{result['num_params']:,}" in card
  assert result["command"] in card
  assert "--steps=40" in result["command"] and "--num_layers=2" in result["command"]


def test_same_seed_same_run(trained, tmp_path):
  # A second run of the fixture's settings (same seed; the step is already compiled).
  first, first_dir = trained
  again = train.train(tiny_settings(tmp_path / "again"))
  assert again["log"][-1]["loss"] == first["log"][-1]["loss"]
  assert [e["loss"] for e in again["log"]] == [e["loss"] for e in first["log"]]
  with open(os.path.join(first_dir, "model.safetensors"), "rb") as a, \
      open(tmp_path / "again" / "model.safetensors", "rb") as b:
    assert a.read() == b.read()


def test_existing_output_dir_is_refused(tmp_path, monkeypatch):
  out = tmp_path / "taken"
  out.mkdir()
  (out / "keep.txt").write_text("mine")

  def no_training(*args, **kwargs):
    raise AssertionError("refused only after starting to train")

  # Refused up front, not after a whole training run.
  monkeypatch.setattr(synthetic, "generate", no_training)
  with pytest.raises(FileExistsError, match="already exists"):
    train.train(tiny_settings(out))
  monkeypatch.undo()
  assert os.listdir(out) == ["keep.txt"]
  assert sorted(os.listdir(tmp_path)) == ["taken"]  # no temporary directory left behind
  # The program says so too, before any training.
  result = subprocess.run([sys.executable, "-m", "dpjax.train", f"--output_dir={out}"],
                          capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert "already exists" in result.stderr
  assert os.listdir(out) == ["keep.txt"]


def test_batches_score_real_tokens_and_one_answer_letter():
  settings = tiny_settings("unused", batch_size=32, one_shot_fraction=0.5, statement_fraction=0.0)
  items = synthetic.generate("train", 40, seed=0)
  tokenizer = synthetic.build_tokenizer(synthetic.training_text(items), vocab_size=300)
  stream = train.TrainingStream(items, tokenizer, settings)
  batch = stream.next_batch()
  ids, targets = batch["input_ids"], batch["targets"]
  # Targets are the inputs shifted by one; pads are never scored nor attended.
  np.testing.assert_array_equal(ids[:, 1:], targets[:, :-1])
  assert not (batch["loss_mask"].astype(bool) & (targets == tokenizer.pad_token_id)).any()
  assert not (batch["attention_mask"].astype(bool) & (ids == tokenizer.pad_token_id)).any()
  # One answer target per row: a letter token, followed by EOS.
  np.testing.assert_array_equal(batch["answer_mask"].sum(1), 1)
  rows, cols = np.nonzero(batch["answer_mask"])
  letters = {tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" " + l))[0]
             for l in tasks.LETTERS[:4]}
  assert set(targets[rows, cols].tolist()) <= letters
  np.testing.assert_array_equal(targets[rows, cols + 1], tokenizer.eos_token_id)
  # Some rows are 1-shot (longer: a whole second question); shots share the subject.
  assert stream.one_shot_examples > 0
  subject = {item.id: item.subject for item in items}
  for i in range(len(items)):
    j = stream._shot(i)
    assert j != i and subject[items[j].id] == subject[items[i].id]


def test_statements_carry_the_answer_text_and_no_letter():
  settings = tiny_settings("unused", batch_size=64, statement_fraction=0.5)
  items = synthetic.generate("train", 40, seed=0)
  tokenizer = synthetic.build_tokenizer(synthetic.training_text(items), vocab_size=300)
  stream = train.TrainingStream(items, tokenizer, settings)
  batch = stream.next_batch()
  statements = batch["answer_mask"].sum(1) == 0
  assert 0 < stream.statement_examples == int(statements.sum()) < 64
  np.testing.assert_array_equal(batch["answer_mask"][~statements].sum(1), 1)
  texts = {train.statement(item) for item in items}
  for row in np.flatnonzero(statements):
    ids = batch["input_ids"][row][batch["attention_mask"][row].astype(bool)]
    assert ids[-1] == tokenizer.eos_token_id
    text = tokenizer.decode(ids[:-1])
    assert text in texts
    # The statement's tokens are all scored (up to EOS).
    assert batch["loss_mask"][row].sum() == len(ids) - 1
  assert train.statement(items[0]).endswith(items[0].options[items[0].answer])
