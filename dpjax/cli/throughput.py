"""`dpjax-throughput`: prefill and decode throughput of pruned variants
(`dpjax.serve.throughput`); with no flags, the bundled model and three Iterative Pruning
variants of its committed default run (see --study)."""

from __future__ import annotations

import os

from dpjax.cli.program import USER_ERRORS, run_program
from dpjax.serve.throughput import RESULTS_FILE, ThroughputSettings, measure, write


def measure_and_write(s: ThroughputSettings) -> None:
  try:
    report = measure(s)
  except RuntimeError as e:
    raise ValueError(str(e)) from e
  out = s.output_dir or s.study or "dpjax_throughput"
  write(out, report, s.study)
  print(f"wrote {os.path.abspath(os.path.join(out, RESULTS_FILE))} (mesh {report['mesh']})")


def run() -> None:
  # Leaves without the interpreter's teardown (see `run_program`): everything this
  # program writes is written atomically before it returns.
  run_program("dpjax-throughput", [ThroughputSettings], measure_and_write, USER_ERRORS,
              hard_exit=True)


if __name__ == "__main__":
  run()
