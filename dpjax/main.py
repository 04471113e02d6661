"""`dpjax`: the study on one model and task, driven by absl flags.

    dpjax                                  # bundled model, synthetic suite
    dpjax --model=./llama-1b --task=mmlu:data/ --k_shot=5 --output_dir=out

Every flag is a field of `dpjax.settings.Settings` (or, for multi-host runs,
`dpjax.distributed.Launch`), with the default defined there. `dpjax --helpfull`
documents every flag.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging
import jax

from dpjax import distributed, flagdefs, study, tasks
from dpjax.bundled import BUNDLED_MODEL
from dpjax.settings import Settings


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; everything is a flag.")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  try:
    launch = flagdefs.from_flags(distributed.Launch)
    distributed.initialize(launch.coordinator_address, launch.num_processes, launch.process_id)
    settings = flagdefs.from_flags(Settings)
    if not os.path.isdir(settings.model) and settings.model == BUNDLED_MODEL:
      raise ValueError("the bundled model is not in this installation; pass "
                       "--model=PATH_OR_HUB_ID.")
    placement = None
    if len(jax.devices()) > 1 or settings.model_axis > 1:
      placement = distributed.Placement.create(settings.model_axis)
    results = study.run(settings, placement)
  except (ValueError, FileExistsError, tasks.TaskDataError) as e:
    raise SystemExit(f"dpjax: error: {e}") from e
  if not distributed.is_main_process():
    return
  full = results.full_model
  print(f"wrote the report to {os.path.abspath(settings.output_dir)}")
  print(f"final-layer accuracy {full.final_accuracy:.3f} (chance {full.chance:.3f}); "
        f"transition block {full.transition_block}")
  for name, result in results.methods.items():
    said = result.skipped if result.skipped is not None else result.collapse_point
    print(f"{name}: collapse point {said}")


def run() -> None:
  flagdefs.define_flags(Settings)
  flagdefs.define_flags(distributed.Launch)
  app.run(main)


if __name__ == "__main__":
  run()
