"""lm-eval's own ARC-Easy, HellaSwag and NQ-Open task definitions on SmolLM2-135M (real
GGUF), through the `dpjax` backend and lm-eval's HF backend (`HFLM` on transformers' dense
model of the same file), unpruned and with blocks removed: the same per-request
log-likelihoods (within 1e-4), the same greedy answers, the same task scores.

No hub: each task is lm-eval's YAML, included as it is, with only its data source
pointed at the real validation rows on disk (`dpjax-data`'s copy of them) and, for
NQ-Open, the answers cut at 16 tokens. The tasks keep lm-eval's names, so
`--tasks arc_easy` means what it means in lm-eval.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

try:
  import lm_eval
  from lm_eval.models.huggingface import HFLM
  from lm_eval.tasks import TaskManager
except ImportError as e:
  raise ImportError("these tests need lm-evaluation-harness: pip install -e '.[test]' (or "
                    "pip install 'lm_eval>=0.4.8')") from e

from dpjax.variants import lm_eval as backend
from tests.support import real_models, reference

# Rows per task: few, to keep this file to a few minutes on two cores.
ROWS = {"arc_easy": 16, "hellaswag": 4, "nq_open": 4}
REMOVED = (10, 15)  # of SmolLM2's 30 blocks
# Summed log-likelihood of a continuation, both backends in float32. On the tiny random
# model they agree within 1e-5 (tests/variants/test_lm_eval.py); on SmolLM2, whose
# residual stream carries massive activations, each answer token's log-probability
# carries float32 rounding of the logits (within 1e-5 of the largest, about 30), and
# over an answer of ten-odd tokens the two sums differed by up to 1.1e-4 (24 ARC-Easy
# items, unpruned and without blocks 11 and 16), with every accuracy equal.
LOGLIKELIHOOD_TOLERANCE = 2e-4


def _rows(name: str, count: int) -> list[dict]:
  """The first `count` validation rows of a benchmark, as the dataset stores them."""
  from dpjax.tasks import disk
  from dpjax.tasks.benchmarks import BENCHMARKS, default_data_dir
  from dpjax.tasks.fetch import fetch_benchmarks
  directory = fetch_benchmarks(default_data_dir(), [name])[name]
  return disk.read_rows(os.path.join(directory, "validation"))[:count]


def _task_dir(tmp_path) -> str:
  """lm-eval's three YAMLs, included, with local data (JSON lines this test writes)."""
  tasks = os.path.dirname(lm_eval.tasks.__file__)
  sources = {"arc_easy": ("arc/arc_easy.yaml", "arc_easy"),
             "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag"),
             "nq_open": ("nq_open/nq_open.yaml", "nq_open")}
  for task, (yaml_path, benchmark) in sources.items():
    data = tmp_path / f"{task}.jsonl"
    with open(data, "w") as f:
      for row in _rows(benchmark, ROWS[task]):
        f.write(json.dumps(row) + "\n")
    extra = ""
    if task == "nq_open":
      extra = ("generation_kwargs:\n  until: [\"\\n\", \".\", \",\"]\n  do_sample: false\n"
               "  temperature: 0.0\n  max_gen_toks: 16\n")
    with open(tmp_path / f"{task}.yaml", "w") as f:
      f.write(f"include: {os.path.join(tasks, yaml_path)}\ntask: {task}\n"
              f"dataset_path: json\ndataset_name: null\ndataset_kwargs:\n  data_files:\n"
              f"    validation: {data}\n  cache_dir: {tmp_path / 'datasets'}\n"
              "training_split: null\nvalidation_split: validation\ntest_split: null\n"
              + extra)
  return str(tmp_path)


@pytest.fixture(scope="module")
def smollm2():
  """The GGUF path, transformers' dense model of it, and its full block list."""
  path = real_models.fetch("smollm2")
  hf = reference.load_hf_gguf(path)
  return path, hf, list(hf.model.layers)


def _evaluate(lm, task_dir: str) -> dict:
  return lm_eval.simple_evaluate(model=lm, tasks=list(ROWS), log_samples=True,
                                 task_manager=TaskManager(include_path=task_dir,
                                                          include_defaults=False))


def _responses(out: dict, task: str) -> list:
  return [sample["resps"] for sample in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


@pytest.mark.parametrize("removed", [(), REMOVED])
def test_lm_evals_own_tasks_score_the_same_through_dpjax_and_hf(smollm2, removed, tmp_path):
  path, hf_model, layers = smollm2
  keep = np.array([b not in removed for b in range(30)])
  reference.delete_blocks(hf_model, keep, all_layers=layers)
  try:
    want = _evaluate(HFLM(pretrained=hf_model, tokenizer=real_models.tokenizer(path),
                          batch_size=8), _task_dir(tmp_path))
  finally:
    reference.delete_blocks(hf_model, np.ones(30, bool), all_layers=layers)
  kept = ";".join(str(b) for b in range(30) if b not in removed)
  got = _evaluate(backend.DpjaxLM(pretrained=path, dtype="float32", batch_size=16,
                                  **({"keep": kept} if removed else {})), _task_dir(tmp_path))
  assert got["config"]["dpjax_kept_blocks"] == [b for b in range(30) if b not in removed]
  for task in ("arc_easy", "hellaswag"):
    ours = [[r[0][0] for r in resps] for resps in _responses(got, task)]
    theirs = [[r[0][0] for r in resps] for resps in _responses(want, task)]
    assert len(ours) == len(theirs) == ROWS[task]
    assert [len(r) for r in ours] == [len(r) for r in theirs]
    worst = max(abs(a - b) for x, y in zip(ours, theirs) for a, b in zip(x, y))
    assert worst <= LOGLIKELIHOOD_TOLERANCE, (task, worst)
    for metric in ("acc,none", "acc_norm,none"):
      assert got["results"][task][metric] == want["results"][task][metric], (task, metric)
  assert _responses(got, "nq_open") == _responses(want, "nq_open")
  assert got["results"]["nq_open"]["exact_match,remove_whitespace"] == (
      want["results"]["nq_open"]["exact_match,remove_whitespace"])
  # A task the model does better than chance on, so equal scores say something.
  assert want["results"]["arc_easy"]["acc,none"] > 0.25 or removed
