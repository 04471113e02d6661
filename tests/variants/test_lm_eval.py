"""lm-eval's `dpjax` backend against lm-eval's own HF backend (`HFLM`, PyTorch, float32, CPU)
on the same requests, unpruned and with blocks removed (HF with those blocks deleted), and
its wiring: lm-eval's registry, `simple_evaluate` on a local task, the command line.

lm-eval is the `lm_eval` extra (in the test extra): without it these tests fail with the
install to run, never skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

try:
  import lm_eval
  from lm_eval.api.instance import Instance
  from lm_eval.models.huggingface import HFLM
except ImportError as e:
  raise ImportError("these tests need lm-evaluation-harness: pip install -e '.[test]' (or "
                    "pip install 'lm_eval>=0.4.8')") from e

from dpjax.tasks import synthetic
from dpjax.variants import lm_eval as backend
from tests.support import reference

MAX_LENGTH = 64  # both backends: short enough that truncation and rolling windows show
PRUNED = (0, 2)  # of the tiny model's 4 blocks


@pytest.fixture(scope="module")
def models(synthetic_model_dir):
  """`models(kept)` -> (HFLM, DpjaxLM) of the tiny random Llama, `kept` None or blocks."""
  cache = {}

  def get(kept):
    if kept not in cache:
      # dpjax: a call holds every packed row of a test's requests (one compiled program).
      ours = backend.DpjaxLM(pretrained=synthetic_model_dir, dtype="float32", batch_size=16,
                             max_length=MAX_LENGTH,
                             keep=None if kept is None else ";".join(map(str, kept)))
      if kept is None:
        hf = HFLM(pretrained=synthetic_model_dir, device="cpu", dtype="float32", batch_size=4,
                  max_length=MAX_LENGTH)
      else:
        model = reference.delete_blocks(reference.load_hf(synthetic_model_dir),
                                        np.isin(np.arange(4), kept))
        hf = HFLM(pretrained=model, tokenizer=synthetic_model_dir, batch_size=4,
                  max_length=MAX_LENGTH)
      cache[kept] = hf, ours
    return cache[kept]

  return get


def _instances(kind, args):
  return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _greedy_continuation(hf: HFLM, context: str, tokens: int = 2) -> str:
  """The text of HF's own greedy next tokens after `context` (is_greedy when it
  tokenizes back to them)."""
  import torch
  ids = hf.tok_encode(context)
  with torch.no_grad():
    for _ in range(tokens):
      ids.append(int(hf.model(torch.tensor([ids])).logits[0, -1].argmax()))
  return hf.tok_decode(ids[-tokens:])


def _loglikelihood_requests(hf: HFLM) -> list[tuple[str, str]]:
  """Multiple-choice contexts (one context, four continuations: packed), an empty context
  (the prefix token), a context with a trailing space (moved to the continuation), one
  longer than max_length (left-truncated) and HF's own greedy continuations."""
  out = []
  for item in synthetic.generate("test", 3):
    context = f"Question: {item.question}\nAnswer:"
    out += [(context, " " + option) for option in item.options]
    out.append((context, _greedy_continuation(hf, context)))
  out += [("", "An empty context"), ("Trailing space ", "moves"),
          ("far too long " * 40, " for the window"),
          ("Once upon", _greedy_continuation(hf, "Once upon", 3))]
  return out


@pytest.mark.parametrize("kept", [None, PRUNED])
def test_loglikelihoods_and_greedy_flags_equal_hf(models, kept):
  hf, ours = models(kept)
  requests = _instances("loglikelihood", _loglikelihood_requests(hf))
  want = hf.loglikelihood(requests, disable_tqdm=True)
  got = ours.loglikelihood(requests, disable_tqdm=True)
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], atol=1e-4, rtol=0)
  assert [g[1] for g in got] == [w[1] for w in want]
  assert any(w[1] for w in want) and not all(w[1] for w in want)


def test_rolling_loglikelihoods_equal_hf(models):
  hf, ours = models(None)
  texts = ["A document that spans three windows of the model. " * 8, "short text"]
  assert len(hf.tok_encode(texts[0])) > 2 * MAX_LENGTH
  requests = _instances("loglikelihood_rolling", [(t,) for t in texts])
  want = hf.loglikelihood_rolling(requests, disable_tqdm=True)
  got = ours.loglikelihood_rolling(requests, disable_tqdm=True)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kept", [None, PRUNED])
def test_greedy_generations_equal_hf_with_stop_sequences(models, kept):
  hf, ours = models(kept)
  prompts = [f"Question: {item.question}\nAnswer:" for item in synthetic.generate("test", 3)]
  prompts.append("far too long " * 30)  # left-truncated to max_length - max_gen_toks
  free = hf.generate_until(_instances("generate_until", [(p, {"until": [], "max_gen_toks": 12})
                                                         for p in prompts]), disable_tqdm=True)
  # A stop string each generation meets halfway, so that cutting at it is tested.
  stops = [text[len(text) // 2:len(text) // 2 + 2] for text in free[:2]]
  args = [(p, {"until": stops, "max_gen_toks": 12, "do_sample": False}) for p in prompts]
  want = hf.generate_until(_instances("generate_until", args), disable_tqdm=True)
  got = ours.generate_until(_instances("generate_until", args), disable_tqdm=True)
  assert got == want
  assert any(len(w) < len(f) for w, f in zip(want, free))


def test_the_registry_the_model_args_and_a_plan(synthetic_model_dir, tmp_path):
  from lm_eval.api.registry import get_model
  assert get_model("dpjax") is backend.DpjaxLM
  assert get_model("hf") is HFLM  # lm-eval's own backends are still there
  assert backend.parse_keep("0-3;5;9", 16) == [0, 1, 2, 3, 5, 9]
  assert backend.parse_keep([4, 1], 16) == [1, 4] and backend.parse_keep("[0,2]", 4) == [0, 2]
  with pytest.raises(ValueError, match="out of range"):
    backend.parse_keep("0;16", 16)
  with pytest.raises(ValueError, match="keep=0;1;5"):  # lm-eval cut it at its commas
    backend.DpjaxLM.create_from_arg_string(f"pretrained={synthetic_model_dir},keep=0,1,5")
  plan = {"source": {"model": synthetic_model_dir, "num_layers": 4}, "kept_blocks": [0, 2]}
  with open(tmp_path / "pruning_plan.json", "w") as f:
    json.dump(plan, f)
  lm = backend.DpjaxLM.create_from_arg_string(f"plan={tmp_path},dtype=float32")
  assert lm.kept == [0, 2] and lm.get_model_info()["dpjax_kept_blocks"] == [0, 2]


def test_simple_evaluate_runs_a_local_task_on_a_pruned_variant(synthetic_model_dir, tmp_path):
  """A multiple-choice task from a local JSON file (no hub), through lm-eval's evaluator by
  the backend's registered name, with `keep=` in a model_args string."""
  from lm_eval.tasks import TaskManager
  items = synthetic.generate("test", 6)
  with open(tmp_path / "tiny.jsonl", "w") as f:
    for item in items:
      f.write(json.dumps({"question": item.question, "choices": list(item.options),
                          "answer": item.answer}) + "\n")
  with open(tmp_path / "tiny.yaml", "w") as f:
    f.write(f"task: dpjax_tiny_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {tmp_path / 'tiny.jsonl'}\n  cache_dir: {tmp_path / 'datasets'}\n"
            "test_split: test\n"
            "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
            "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
  tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)
  out = lm_eval.simple_evaluate(
      model="dpjax", model_args=f"pretrained={synthetic_model_dir},keep=0;2,dtype=float32",
      tasks=["dpjax_tiny_mc"], task_manager=tasks, batch_size=8)
  result = out["results"]["dpjax_tiny_mc"]
  assert result["sample_len"] == 6 and 0.0 <= result["acc,none"] <= 1.0
  assert out["config"]["dpjax_kept_blocks"] == [0, 2]


def test_the_command_line_is_lm_evals_with_dpjax_registered(monkeypatch):
  """`dpjax-lm-eval ARGS` is `lm_eval ARGS` with the backend registered (a whole run
  indexes every lm-eval task first, too slow here: `simple_evaluate` above runs one)."""
  import lm_eval.__main__
  from lm_eval.api.registry import get_model
  seen = []
  monkeypatch.setattr(sys, "argv", ["dpjax-lm-eval"])
  monkeypatch.setattr(lm_eval.__main__, "cli_evaluate",
                      lambda: seen.append((list(sys.argv), get_model("dpjax"))))
  backend.main(["run", "--model", "dpjax", "--tasks", "arc_easy"])
  assert seen == [(["dpjax-lm-eval", "run", "--model", "dpjax", "--tasks", "arc_easy"],
                   backend.DpjaxLM)]
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  with open(os.path.join(root, "setup.cfg")) as f:
    assert "dpjax-lm-eval = dpjax.cli.lm_eval:run" in f.read()
  result = subprocess.run([sys.executable, "-m", "dpjax.variants.lm_eval", "run", "--help"],
                          capture_output=True, text=True, timeout=300, cwd=root)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "--model_args" in result.stdout and "--include_path" in result.stdout


def test_without_lm_eval_the_program_says_how_to_install_it(tmp_path):
  from tests.support import default_install
  result = default_install.run(["-m", "dpjax.cli.lm_eval", "run", "--model", "dpjax"],
                               str(tmp_path), hidden=default_install.EXTRA_ONLY + ("lm_eval",))
  assert result.returncode == 1
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and "pip install -e '.[lm_eval]'" in lines[0], result.stderr[-2000:]
