"""The `dpjax` program end to end: its report, checked against independent numbers."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from tests.support import reference
from dpjax.study import run as study


@pytest.fixture(scope="module")
def report_dir(synthetic_model_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("report")
  result = subprocess.run(
      [sys.executable, "-m", "dpjax.cli.study", f"--model={synthetic_model_dir}", "--num_items=40",
       "--k_shot=1", "--batch_size=8", "--methods=", f"--output_dir={out}"],
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  # The progress bar shows elapsed<remaining time.
  assert re.search(r"full-model readout: .*\[\d\d:\d\d<\d\d:\d\d", result.stderr)
  return str(out)


def test_report_files(report_dir):
  assert sorted(os.listdir(report_dir)) == sorted([
      "results.json", "readouts.npz", "items.jsonl", "layer_profile.csv",
      "decision_margin.png", "decision_margin_by_subject.png", "option_frequency.png",
      "summary.md", "summary.html", "variants.jsonl"])
  # With no method, variants.jsonl holds the unpruned model alone: its per-item outcomes
  # are the final layer's top option against the answer (recomputed from the arrays).
  with open(os.path.join(report_dir, "variants.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["method"] for r in records] == ["unpruned"] and len(records[0]["kept"]) == 4
  arrays = np.load(os.path.join(report_dir, "readouts.npz"))
  top = arrays["option_logits"][-1].argmax(-1)
  assert records[0]["correct"] == "".join("1" if t == a else "0"
                                          for t, a in zip(top, arrays["answer"]))
  for figure in ("decision_margin.png", "option_frequency.png"):
    with open(os.path.join(report_dir, figure), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_results_agree_with_a_recomputation_from_the_arrays(report_dir):
  with open(os.path.join(report_dir, "results.json")) as f:
    results = json.load(f)
  arrays = np.load(os.path.join(report_dir, "readouts.npz"))
  z, lse, answer = arrays["option_logits"], arrays["log_normalizer"], arrays["answer"]
  assert z.shape == (5, 40, 4) and results["task"]["num_items"] == 40
  full = results["full_model"]
  # Decision Margin (vocab) and accuracy recomputed in plain numpy.
  p = np.exp(z.astype(np.float64) - lse[..., None])
  is_answer = np.arange(4) == answer[:, None]
  dm = (p * is_answer).sum(-1) - np.where(is_answer, -np.inf, p).max(-1)
  np.testing.assert_allclose(full["decision_margin"]["vocab"]["mean"], dm.mean(-1), atol=1e-6)
  np.testing.assert_allclose(full["decision_margin"]["vocab"]["median"], np.median(dm, -1), atol=1e-6)
  accuracy = (z.argmax(-1) == answer).mean(-1)
  np.testing.assert_allclose(full["accuracy"], accuracy, atol=1e-6)
  q = np.exp(z - z.max(-1, keepdims=True))
  q /= q.sum(-1, keepdims=True)
  dm_options = (q * is_answer).sum(-1) - np.where(is_answer, -np.inf, q).max(-1)
  np.testing.assert_allclose(full["decision_margin"]["options"]["mean"], dm_options.mean(-1), atol=1e-5)
  frequency = np.stack([(z.argmax(-1) == k).mean(-1) for k in range(4)], -1)
  np.testing.assert_allclose(full["option_frequency"], frequency, atol=1e-6)
  mean = dm.mean(-1)
  above = [l for l in range(1, 5) if all(mean[m] > 0 for m in range(l, 5))]
  assert full["transition_block"] == (above[0] if above else None)
  # The CSV table holds the same numbers.
  with open(os.path.join(report_dir, "layer_profile.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [int(r["layer"]) for r in rows] == list(range(5))
  np.testing.assert_allclose([float(r["dm_vocab_mean"]) for r in rows], mean, atol=1e-6)
  np.testing.assert_allclose([float(r["accuracy"]) for r in rows], accuracy, atol=1e-6)


def test_items_jsonl_lets_another_tool_recompute_the_final_layer(report_dir, synthetic_model_dir):
  with open(os.path.join(report_dir, "items.jsonl")) as f:
    items = [json.loads(line) for line in f]
  arrays = np.load(os.path.join(report_dir, "readouts.npz"))
  assert [it["id"] for it in items] == arrays["item_ids"].tolist()
  tokenizer = transformers.AutoTokenizer.from_pretrained(synthetic_model_dir)
  hf = reference.load_hf(synthetic_model_dir)
  for i in (0, 17, 39):
    item = items[i]
    assert item["prompt"].endswith("Answer:") and item["prompt"].count("Answer:") == 2  # 1 shot
    ids = tokenizer(item["prompt"], add_special_tokens=False)["input_ids"]
    assert len(ids) == item["num_prompt_tokens"]
    with torch.no_grad():
      logits = hf(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].double()
    logp = torch.log_softmax(logits, -1).numpy()
    ours = arrays["option_logits"][-1, i] - arrays["log_normalizer"][-1, i]
    np.testing.assert_allclose(ours, logp[item["letter_token_ids"]], atol=1e-4)


def test_bad_task_is_a_clear_error(synthetic_model_dir, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "dpjax.cli.study", f"--model={synthetic_model_dir}",
       "--task=mystery:file", f"--output_dir={tmp_path / 'out'}"],
      capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "dpjax: error: task 'mystery:file': unknown task or format 'mystery'" in result.stderr


def test_settings_are_validated():
  with pytest.raises(ValueError, match="normalization='logits'"):
    study.Settings(model="m", normalization="logits")
  with pytest.raises(ValueError, match="transition_rule='median'"):
    study.Settings(model="m", transition_rule="median")


def test_accuracy_rule_changes_the_transition(synthetic_model_dir, tmp_path):
  settings = study.Settings(model=synthetic_model_dir, num_items=16, transition_rule="accuracy",
                            accuracy_delta=-1.0, output_dir=str(tmp_path), progress=False)
  results = study.run(settings)
  # With delta = -1 every layer is above chance + delta: the transition is block 1.
  assert results.full_model.transition_block == 1
  assert results.full_model.decisive_phase == [1, 2, 3, 4]


def test_summary_html_is_self_contained(tmp_path):
  from dpjax.report import summary
  png = b"\x89PNG\r\n\x1a\nfake"
  (tmp_path / "a.png").write_bytes(png)
  markdown = ("# Title `x<y`\n\n- one **bold**\n    - nested\n- two\n\n| a | b |\n|---|---|\n"
              "| 1 | 2 |\n\nplain & text\n")
  page = summary.summary_html(markdown, str(tmp_path), ["a.png"])
  import base64
  assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in page
  body = summary.markdown_to_html(markdown)
  compact = body.replace("\n", "")
  assert "<h1>Title <code>x&lt;y</code></h1>" in compact
  assert "<li>one <strong>bold</strong><ul><li>nested</li></ul></li><li>two</li>" in compact
  assert "<th>a</th><th>b</th>" in compact and "<td>1</td><td>2</td>" in compact
  assert "<p>plain &amp; text</p>" in compact

def test_python_settings_and_the_command_line_run_the_same_study(synthetic_model_dir, tmp_path):
  """`study.run(Settings(model=...))` and `dpjax --model=...` share every default."""
  from dpjax.study.settings import Settings
  flags = dict(num_items=16, calibration_items=8, batch_size=8, random_seeds=2,
               methods=("iterative", "reverse"))
  settings = Settings(model=synthetic_model_dir, output_dir=str(tmp_path / "python"),
                      progress=False, **flags)
  study.run(settings)
  result = subprocess.run(
      [sys.executable, "-m", "dpjax.cli.study", f"--model={synthetic_model_dir}",
       f"--output_dir={tmp_path / 'cli'}", "--noprogress", "--num_items=16",
       "--calibration_items=8", "--batch_size=8", "--random_seeds=2",
       "--methods=iterative,reverse"], capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]

  def load(name):
    with open(tmp_path / name / "results.json") as f:
      results = json.load(f)
    results.pop("timings")
    results["settings"].pop("output_dir")
    # Compilations are counted process-wide: this test process has compiled before.
    results["engine"].pop("xla_compilations")
    results["engine"].pop("cache_hits")
    return results

  python, cli = load("python"), load("cli")
  assert python["settings"]["calibration_items"] == 8 and python["methods"]
  assert python == cli
  # With no method, no calibration items are set aside (the command's behaviour too).
  assert Settings(model="m", methods=()).calibration_items == 0
  assert Settings(model="m").methods == ("iterative", "block_influence", "angular",
                                         "single_layer", "reverse", "random", "phase",
                                         "noise", "phase_aware", "decisive_only")


def test_cloze_and_open_studies_from_the_command_line(synthetic_model_dir, tmp_path):
  """The whole study in the cloze format (synthetic suite) and the open format (NQ-open):
  what results.json, items.jsonl and readouts.npz say, recomputed where it can be."""
  from dpjax.tasks.benchmarks import default_data_dir
  from dpjax.tasks.fetch import fetch_benchmarks
  fetch_benchmarks(default_data_dir(), ["nq_open"])
  common = [sys.executable, "-m", "dpjax.cli.study", f"--model={synthetic_model_dir}", "--noprogress",
            "--batch_size=8", "--methods=iterative,reverse", "--min_layers=3"]
  cloze = tmp_path / "cloze"
  result = subprocess.run(common + [f"--output_dir={cloze}", "--format=cloze", "--cloze_norm=bytes",
                                    "--num_items=16", "--calibration_items=8", "--k_shot=1"],
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(cloze / "results.json") as f:
    results = json.load(f)
  assert results["task"]["format"] == "cloze" and results["task"]["cloze_norm"] == "bytes"
  arrays = np.load(cloze / "readouts.npz")
  with open(cloze / "items.jsonl") as f:
    items = [json.loads(line) for line in f]
  assert items[0]["continuations"][0] == " " + items[0]["options"][0]
  assert items[0]["prompt"].count("Question:") == 2  # one shot, then the question
  scores, answer = arrays["option_logits"][-1], arrays["answer"]
  np.testing.assert_allclose(scores, arrays["option_logprob"][-1] / np.array(
      [it["option_bytes"] for it in items]), atol=1e-5)
  assert results["full_model"]["accuracy"][-1] == pytest.approx(
      float((scores.argmax(-1) == answer).mean()))
  assert [p["removed"] for p in results["methods"]["iterative_accuracy"]["curve"]] == [0, 1]

  nq = tmp_path / "open"
  result = subprocess.run(common + [f"--output_dir={nq}", "--task=nq_open", "--format=open",
                                    "--num_items=8", "--calibration_items=8"],
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(nq / "results.json") as f:
    results = json.load(f)
  assert results["task"]["format"] == "open"
  points = results["methods"]["iterative_accuracy"]["curve"]
  assert all(0.0 <= p["exact_match"] <= 1.0 for p in points)
  assert results["full_model"]["exact_match"] == points[0]["exact_match"]
  assert "exact_match" not in results["methods"]["reverse"]["curve"][1]
  with open(nq / "items.jsonl") as f:
    opens = [json.loads(line) for line in f]
  first = opens[0]
  assert first["golds"] and first["prompt"].startswith("Answer these questions:\n\nQ: ")
  # Chance is the best constant guess's accuracy, recomputed from the items' gold tokens.
  firsts = [set(it["gold_first_token_ids"]) for it in opens]
  best = max(sum(t in f for f in firsts) for t in set().union(*firsts)) / len(opens)
  assert results["full_model"]["chance"] == pytest.approx(best) and best > 0
  # The answered items' profile, recomputed from the readouts.
  arrays = np.load(nq / "readouts.npz")
  constant = max(set().union(*firsts), key=lambda t: (sum(t in f for f in firsts), -t))
  chosen = (arrays["top_option"][-1] == 0) & np.array([constant not in f for f in firsts])
  answered = results["full_model"]["answered"]
  assert answered["items"] == int(chosen.sum())
  assert answered["answered_at_last_layer"] == int((arrays["top_option"][-1] == 0).sum())
  assert answered["constant_guess_token"] == constant
  if chosen.any():
    np.testing.assert_allclose(answered["mean_margin"],
                               arrays["decision_margin_vocab"][:, chosen].mean(1), atol=1e-6)

  refused = subprocess.run(common + [f"--output_dir={tmp_path / 'no'}", "--format=open"],
                           capture_output=True, text=True, timeout=300)
  assert refused.returncode != 0
  assert "task 'synthetic' does not support --format=open; it supports letter, cloze" in \
      refused.stderr
  assert not (tmp_path / "no").exists()
