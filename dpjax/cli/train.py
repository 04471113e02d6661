"""`python -m dpjax.train`: train the bundled model (or another) from flags
(`dpjax.train.loop`)."""

from __future__ import annotations

from dpjax.cli.program import run_program
from dpjax.train.loop import train
from dpjax.train.settings import TrainSettings


def run() -> None:
  run_program("dpjax.train", [TrainSettings], train)


if __name__ == "__main__":
  run()
