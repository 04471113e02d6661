"""Rows of an HF `save_to_disk` directory, read with pyarrow (no `datasets` needed).

A `save_to_disk` directory holds `state.json`, which names its Arrow files
(IPC stream format), and `dataset_info.json`. A directory may instead hold a
`rows.jsonl` (how `dpjax-data` stores the splits it rebuilds, such as ARC's
test split). Either way the rows come back as plain dicts, in order.
"""

from __future__ import annotations

import glob
import json
import os

from dpjax.tasks.schema import TaskDataError

ROWS_JSONL = "rows.jsonl"


def is_dataset_dir(directory: str) -> bool:
  return (os.path.isfile(os.path.join(directory, "state.json"))
          or os.path.isfile(os.path.join(directory, ROWS_JSONL)))


def read_rows(directory: str) -> list[dict]:
  """Every row of the dataset saved in `directory`."""
  jsonl = os.path.join(directory, ROWS_JSONL)
  if os.path.isfile(jsonl):
    rows = []
    with open(jsonl) as f:
      for number, line in enumerate(f, start=1):
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise TaskDataError(f"{jsonl}, line {number}: not valid JSON ({e}).") from e
    return rows
  state = os.path.join(directory, "state.json")
  if not os.path.isfile(state):
    raise TaskDataError(f"{directory} is not a saved dataset (no state.json or {ROWS_JSONL}); "
                        "pass a directory written by datasets' save_to_disk.")
  try:
    with open(state) as f:
      files = [entry["filename"] for entry in json.load(f)["_data_files"]]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise TaskDataError(f"{state} does not list the dataset's files ({e!r}).") from e
  files = [os.path.join(directory, name) for name in files] or sorted(
      glob.glob(os.path.join(directory, "data-*.arrow")))
  import pyarrow as pa
  import pyarrow.ipc as ipc
  rows: list[dict] = []
  for path in files:
    try:
      with pa.memory_map(path) as source:
        rows += ipc.open_stream(source).read_all().to_pylist()
    except (OSError, pa.ArrowInvalid) as e:
      raise TaskDataError(f"cannot read {path}: {e}. It may be truncated; fetch the data "
                          "again.") from e
  return rows
