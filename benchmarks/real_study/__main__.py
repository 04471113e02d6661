"""`python -m benchmarks.real_study`: see `benchmarks.real_study.study`."""

from benchmarks.real_study.study import run

if __name__ == "__main__":
  run()
