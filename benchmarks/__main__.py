"""Every benchmark through one harness: `python -m benchmarks [SUITE ...]`.

    python -m benchmarks                 # every suite, results into benchmarks/results/
    python -m benchmarks core formats    # those suites
    python -m benchmarks --quick         # a smoke run of every suite, into a temporary directory
    python -m benchmarks --list          # the registry

Each suite is one module of `benchmarks/`, run in a process of its own (a suite sets
XLA's and torch's threads for itself, and its peak memory is its own), with its output
going to `--out_dir` (default `benchmarks/results/`; with `--quick`, a new temporary
directory unless `--out_dir` is given, so a smoke run never touches the committed
results). Every suite compares dpjax with the straightforward HF-PyTorch way in the
same process and records the machine it ran on (`benchmarks.common.machine`). Then
`RESULTS.md` is rendered from what `--out_dir` holds.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_DIR = os.path.join(HERE, "results")


@dataclasses.dataclass(frozen=True)
class Suite:
  module: str             # benchmarks.<module>
  what: str
  output: str             # its file under the results directory ("" : a directory of its own)
  quick: tuple = ()       # its flags for a smoke run
  full: tuple = ()        # its flags for the committed run
  out_flag: str = "--out"


SUITES = {
    "core": Suite("run", "Iterative Pruning against HF PyTorch, work efficiency, serving, "
                  "scaling with masks, compile counts", "", ("--quick",), (), "--out_dir"),
    "foundation": Suite("foundation", "HF parity, conversion memory, forward speed",
                        "foundation.json", ("--quick", "--noreal")),
    "end_to_end": Suite("end_to_end", "Iterative Pruning with compilation, end to end",
                        "end_to_end.json", ("--items=16",)),
    "formats": Suite("formats", "the cloze and open formats against lm-eval's scoring in HF",
                     "formats.json", ("--items=8",)),
    "read_positions": Suite("read_positions", "reading only the answer positions",
                            "read_positions.json", ("--items=8", "--repeats=1")),
    "shared_prefix": Suite("shared_prefix", "few-shot prompts sharing their shots",
                           "shared_prefix.json", ("--subjects=1", "--per_subject=4",
                                                  "--batch_size=4", "--k_shot=1")),
    "resume": Suite("resume", "the cost of saving and resuming state", "resume.json",
                    ("--items=4",)),
    "bf16": Suite("bf16", "bfloat16 against float32", "bf16.json",
                  ("--items=8", "--steps=1", "--repeats=1")),
    "loading": Suite("loading", "loading a sharded checkpoint straight onto 8 devices",
                     "loading.json"),
    "planning": Suite("planning", "the planner's prediction against measured times (and, "
                      "with the plan extra, the accelerator table)", "plan.json",
                      ("--part=calibrate", "--repeats=1")),
    "interleaved": Suite("interleaved", "dpjax and HF interleaved, on an idle and a busy "
                         "machine", "interleaved.json", ("--rounds=1", "--items=4",
                                                         "--loads=0", "--threads=default")),
}


def command(name: str, out_dir: str, quick: bool) -> list[str]:
  suite = SUITES[name]
  if not suite.output:  # the core suite: results.json and RESULTS.md beside the results folder
    target = HERE if os.path.abspath(out_dir) == RESULTS_DIR else out_dir
  else:
    target = os.path.join(out_dir, suite.output)
  flags = suite.quick if quick else suite.full
  return [sys.executable, "-m", f"benchmarks.{suite.module}", f"{suite.out_flag}={target}",
          *flags]


def main(argv: list[str]) -> int:
  import argparse
  parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("suites", nargs="*", help=f"Suites to run (default: all): "
                      f"{', '.join(SUITES)}.")
  parser.add_argument("--quick", action="store_true", help="A smoke run of each suite.")
  parser.add_argument("--out_dir", default=None, help="Where the results go (default: "
                      "benchmarks/results/, or a temporary directory with --quick).")
  parser.add_argument("--list", action="store_true", help="List the suites and stop.")
  args = parser.parse_args(argv)
  if args.list:
    for name, suite in SUITES.items():
      print(f"{name:<15} {suite.what}")
    return 0
  unknown = [s for s in args.suites if s not in SUITES]
  if unknown:
    parser.error(f"unknown suites {unknown}; the suites are {', '.join(SUITES)}.")
  out_dir = args.out_dir or (tempfile.mkdtemp(prefix="dpjax_benchmarks_") if args.quick
                             else RESULTS_DIR)
  os.makedirs(out_dir, exist_ok=True)
  failed = []
  for name in args.suites or list(SUITES):
    started = time.perf_counter()
    print(f"[{name}] {' '.join(command(name, out_dir, args.quick)[1:])}", flush=True)
    code = subprocess.run(command(name, out_dir, args.quick)).returncode
    print(f"[{name}] {'ok' if code == 0 else f'FAILED ({code})'} in "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    if code:
      failed.append(name)
  core = HERE if os.path.abspath(out_dir) == RESULTS_DIR else out_dir
  if os.path.isfile(os.path.join(core, "results.json")):
    subprocess.run([sys.executable, "-m", "benchmarks.run", "--report_only",
                    f"--out_dir={core}", f"--results_dir={out_dir}"], check=False)
  print(f"results in {out_dir}" + (f"; failed: {', '.join(failed)}" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
