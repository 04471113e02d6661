"""Every benchmark through one harness: `python -m benchmarks [SUITE ...]`.

    python -m benchmarks                 # every suite, results into benchmarks/results/
    python -m benchmarks core formats    # those suites
    python -m benchmarks --quick         # a smoke run of every suite, into a temporary directory
    python -m benchmarks --list          # the registry

Each suite is one module of `benchmarks/`, run in a process of its own in a full run (a
suite sets XLA's and torch's threads for itself, and its peak memory is its own), with
its output going to `--out_dir` (default `benchmarks/results/`; with `--quick`, a new
temporary directory unless `--out_dir` is given, so a smoke run never touches the
committed results). Every suite compares dpjax with the straightforward HF-PyTorch way
in the same process and records the machine it ran on (`benchmarks.common.machine`).
Then `RESULTS.md` is rendered from what `--out_dir` holds.

`--quick` runs every suite at a smoke size (a few minutes on two CPU cores): the bundled
model or tiny random Llamas, one batch of a few items, one step or a few, one repeat.
The suites measured on SmolLM2-135M run on the bundled model and the synthetic suite
(`--model=bundled`), so a smoke run needs no download. Each still checks dpjax against
the reference and prints its ratio, at sizes too small for the ratio to mean much. A
smoke run runs the suites one after another in the harness's own process, sharing the
imports, the loaded models and the compiled programs (a figure "with compilation" is
then lower than a fresh process's), except `end_to_end`, whose figure that is: it keeps
a process of its own. And it lets torch's OpenMP threads sleep while they wait
(`OMP_WAIT_POLICY=PASSIVE`, unless set): by default they spin, and on cores another job
shares, one HF forward of the bundled model took 12 s instead of 0.13 s.

Without torch (the default install; torch is in the test extra), the harness says so in
one line before any work and runs dpjax's side of every suite that has one (dpjax's
timings alone, no reference, no ratio); the suites that are nothing but a comparison
with HF PyTorch (`foundation`, `interleaved`, `lm_eval`) are skipped with one line each,
naming the command. It exits 0 unless a suite that ran failed. `pip install torch` brings
the ratios back.
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
  needs_torch: str = ""   # why the suite cannot run without torch ("": its dpjax side can)
  own_process: bool = False  # a smoke run, too, runs it in a fresh process


SUITES = {
    "core": Suite("run", "Iterative Pruning against HF PyTorch, work efficiency, serving, "
                  "scaling with masks, compile counts", "", ("--quick",), (), "--out_dir"),
    "foundation": Suite("foundation", "HF parity, conversion memory, forward speed",
                        "foundation.json", ("--quick", "--noreal"),
                        needs_torch="HF parity and speed against HF PyTorch"),
    "end_to_end": Suite("end_to_end", "Iterative Pruning with compilation, end to end",
                        "end_to_end.json", ("--items=16", "--min_layers=15"),
                        own_process=True),
    "formats": Suite("formats", "the cloze and open formats: what each reads, what packing "
                     "saves", "formats.json", ("--model=bundled", "--items=8")),
    "read_positions": Suite("read_positions", "reading only the answer positions",
                            "read_positions.json", ("--model=bundled", "--items=8",
                                                    "--repeats=1")),
    "shared_prefix": Suite("shared_prefix", "few-shot prompts sharing their shots",
                           "shared_prefix.json", ("--model=bundled", "--subjects=1",
                                                  "--per_subject=4", "--batch_size=4",
                                                  "--k_shot=2")),
    "resume": Suite("resume", "masks resumed from the unpruned stream", "resume.json",
                    ("--model=bundled", "--items=4")),
    "bf16": Suite("bf16", "bfloat16 against float32", "bf16.json",
                  ("--model=bundled", "--items=8", "--steps=1", "--repeats=1")),
    "loading": Suite("loading", "loading a sharded checkpoint straight onto 8 devices",
                     "loading.json", ("--hidden=256", "--layers=4", "--vocab=4096",
                                      "--shard_mb=2")),
    "planning": Suite("planning", "the planner's prediction against measured times (and, "
                      "with the plan extra, the accelerator table)", "plan.json",
                      ("--part=calibrate", "--repeats=1")),
    "interleaved": Suite("interleaved", "dpjax and HF interleaved, on an idle and a busy "
                         "machine", "interleaved.json",
                         ("--model=bundled", "--rounds=1", "--items=4", "--loads=0",
                          "--threads=default"),
                         needs_torch="dpjax against HF PyTorch, round by round"),
    "lm_eval": Suite("lm_eval_backends", "lm-evaluation-harness: the dpjax backend against "
                     "lm-eval's HF backend, on the same requests", "lm_eval.json",
                     ("--model=bundled", "--items=4", "--generations=2", "--repeats=1"),
                     needs_torch="lm-eval's dpjax backend against its HF backend"),
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


def _cpu_seconds() -> float:
  """CPU time of this process and its finished children (on a busy machine, what a suite
  cost beside how long it waited)."""
  t = os.times()
  return t.user + t.system + t.children_user + t.children_system


def in_process(args: list[str]) -> int:
  """`python -m args...` run in this process: the module's `main`, its own flags parsed
  from `args`; its exit status."""
  import importlib
  import traceback
  module = importlib.import_module(args[0])
  try:
    module.FLAGS.unparse_flags()
    module.FLAGS(args)
    module.main(args[:1])
  except SystemExit as e:  # a failed check, or a suite's own exit
    if e.code in (None, 0):
      return 0
    print(e.code, file=sys.stderr, flush=True)
    return e.code if isinstance(e.code, int) else 1
  except Exception:  # pylint: disable=broad-except
    traceback.print_exc()
    return 1
  return 0


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
  if args.quick:  # before torch is imported (see the docstring)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  from benchmarks import common
  torch = common.has_torch()  # checked before any work
  if not torch:
    print(common.NO_TORCH, flush=True)
  out_dir = args.out_dir or (tempfile.mkdtemp(prefix="dpjax_benchmarks_") if args.quick
                             else RESULTS_DIR)
  os.makedirs(out_dir, exist_ok=True)
  failed, skipped = [], []
  begun = time.perf_counter()
  for name in args.suites or list(SUITES):
    if not torch and SUITES[name].needs_torch:
      print(f"[{name}] skipped: needs torch ({SUITES[name].needs_torch}): pip install torch",
            flush=True)
      skipped.append(name)
      continue
    started, cpu = time.perf_counter(), _cpu_seconds()
    print(f"[{name}] {' '.join(command(name, out_dir, args.quick)[1:])}", flush=True)
    if args.quick and not SUITES[name].own_process:
      code = in_process(command(name, out_dir, quick=True)[2:])
    else:
      code = subprocess.run(command(name, out_dir, args.quick)).returncode
    print(f"[{name}] {'ok' if code == 0 else f'FAILED ({code})'} in "
          f"{time.perf_counter() - started:.0f} s ({_cpu_seconds() - cpu:.0f} s of CPU)",
          flush=True)
    if code:
      failed.append(name)
  core = HERE if os.path.abspath(out_dir) == RESULTS_DIR else out_dir
  if os.path.isfile(os.path.join(core, "results.json")):
    report = ["benchmarks.run", "--report_only", f"--out_dir={core}", f"--results_dir={out_dir}"]
    if args.quick:
      in_process(report)
    else:
      subprocess.run([sys.executable, "-m", *report], check=False)
  print(f"results in {out_dir} ({time.perf_counter() - begun:.0f} s)"
        + (f"; skipped without torch: {', '.join(skipped)}" if skipped else "")
        + (f"; failed: {', '.join(failed)}" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
