"""The planner's table, and its prediction checked against measured times on this machine.

    python -m benchmarks.planning --part=calibrate     # local CPU: predicted / measured
    python -m benchmarks.planning --part=table         # the four rows (needs .[plan])

`calibrate`: `dpjax-plan --target=local`'s model of each program (its parts' costs from
XLA's cost analysis, times the parts a call runs, at this machine's measured matmul rate
and copy bandwidth) against the program run for real on the bundled model, one
representative call each (every block kept; 8 drop-one candidates), median of repeats.

`table`: Llama-3-8B on 1xH200 and v5p-8, Llama-3-70B on 8xH100 and v5p-64 (MMLU 5-shot,
letter format, prompts of 640 tokens, 300 evaluation items): each row compiled ahead of
time for the topology by `dpjax.engine.planner.plan`, in a process of its own.

Results go to `benchmarks/results/plan.json`; `--report_only` renders the Markdown.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any

from absl import app
from absl import flags

from benchmarks.calibration import calibrate
from benchmarks.measured import planning_markdown as markdown

from benchmarks import common

FLAGS = flags.FlagValues()  # this program's own flags (see common.run_program)

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "plan.json")

_PART = flags.DEFINE_enum("part", "calibrate", ["calibrate", "table", "both"], "What to run.",
                          flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", RESULTS, "The JSON file (updated, other parts kept).",
                           flag_values=FLAGS)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls of each program.", flag_values=FLAGS)
_ROWS = flags.DEFINE_string("rows", "", "Only these rows of the table (names, comma-separated).",
                            flag_values=FLAGS)

TABLE = (("llama3-8b", "1xH200"), ("llama3-8b", "v5p-8"), ("llama3-70b", "8xH100"),
         ("llama3-70b", "v5p-64"))


def table_row(model: str, target: str, num_items: int = 300) -> dict[str, Any]:
  """One row, planned in a fresh process (the topology's compiler is loaded once)."""
  code = ("import json, sys\n"
          "from dpjax.engine import planner\n"
          f"p = planner.plan({model!r}, {target!r}, num_items={num_items}, progress=lambda s: "
          "print(s, file=sys.stderr, flush=True))\n"
          "print(json.dumps(p))\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  started = time.perf_counter()
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=4 * 3600)
  if result.returncode != 0:
    raise RuntimeError(f"{model} on {target}: {result.stderr[-3000:]}")
  row = json.loads(result.stdout.strip().splitlines()[-1])
  row["wall_seconds"] = time.perf_counter() - started
  return row


def main(argv):
  del argv
  from dpjax import fileio
  results = {}
  if os.path.isfile(_OUT.value):
    with open(_OUT.value) as f:
      results = json.load(f)
  if _PART.value in ("calibrate", "both"):
    results["calibration"] = calibrate(repeats=_REPEATS.value)
    print(markdown({"calibration": results["calibration"]}))
  if _PART.value in ("table", "both"):
    wanted = set(_ROWS.value.split(",")) if _ROWS.value else None
    rows = {(r["model"], r["target"]): r for r in results.get("table", [])}
    for model, target in TABLE:
      if wanted and f"{model}@{target}" not in wanted:
        continue
      print(f"planning {model} on {target} ...", flush=True)
      rows[(model, target)] = table_row(model, target)
      results["table"] = [rows[k] for k in TABLE if k in rows]
      fileio.write_json(_OUT.value, results)
    print(markdown({"table": results["table"]}))
  fileio.write_json(_OUT.value, results)


if __name__ == "__main__":
  common.run_program(main, FLAGS)
