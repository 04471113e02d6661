"""`python -m dpjax.train`: train the bundled model (or another) from flags."""

from __future__ import annotations

from absl import app

from dpjax import flagdefs, tasks
from dpjax.train.loop import train
from dpjax.train.settings import Settings


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; everything is a flag.")
  try:
    train(flagdefs.from_flags(Settings))
  except (ValueError, FileExistsError, tasks.TaskDataError) as e:
    raise SystemExit(f"dpjax.train: error: {e}") from e


def run() -> None:
  flagdefs.define_flags(Settings)
  app.run(main)


if __name__ == "__main__":
  run()
