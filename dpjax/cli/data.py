"""`dpjax-data`: the common benchmarks into a local data directory (`dpjax.tasks.fetch`)."""

from __future__ import annotations

from dpjax.cli.program import run_program
from dpjax.tasks.fetch import DataSettings, fetch_benchmarks


def fetch(s: DataSettings) -> None:
  for name, directory in fetch_benchmarks(s.data_dir, s.benchmarks).items():
    print(f"{name}: {directory}")


def run() -> None:
  run_program("dpjax-data", [DataSettings], fetch)


if __name__ == "__main__":
  run()
