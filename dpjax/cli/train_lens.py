"""`dpjax-train-lens`: a tuned lens for a model (`dpjax.lens.training`); the bundled model
by default."""

from __future__ import annotations

from dpjax.cli.program import run_program
from dpjax.lens.training import LensSettings, train


def run() -> None:
  run_program("dpjax-train-lens", [LensSettings], train)


if __name__ == "__main__":
  run()
