"""`dpjax`: the study on one model and task, driven by absl flags.

    dpjax                                  # bundled model, synthetic suite
    dpjax --model=./llama-1b --task=mmlu:data/ --k_shot=5 --output_dir=out

Every flag is a field of `dpjax.study.settings.Settings` (or, for multi-host runs,
`dpjax.engine.devices.Launch`), with the default defined there. `dpjax --helpfull`
documents every flag.
"""

from __future__ import annotations

import os

import jax

from dpjax.bundled import BUNDLED_MODEL
from dpjax.cli.program import run_program
from dpjax.engine import devices
from dpjax.report import headline
from dpjax.report.files import SUMMARY_HTML
from dpjax.study import run as study
from dpjax.study.settings import Settings


def run_study(settings: Settings, launch: devices.Launch) -> None:
  devices.initialize(launch.coordinator_address, launch.num_processes, launch.process_id)
  if not os.path.isdir(settings.model) and settings.model == BUNDLED_MODEL:
    raise ValueError("the bundled model is not in this installation; pass "
                     "--model=PATH_OR_HUB_ID.")
  placement = None
  if len(jax.devices()) > 1 or settings.model_axis > 1:
    placement = devices.Placement.create(settings.model_axis)
  results = study.run(settings, placement)
  if not devices.is_main_process():
    return
  full = results.full_model
  print(f"final-layer accuracy {full.final_accuracy:.3f} (chance {full.chance:.3f}); "
        f"transition block {full.transition_block}")
  if full.judged_by_generation:
    print(f"greedy answers: exact match {full.exact_match:.3f} (best constant answer "
          f"{full.generation_chance:.3f}), token F1 {full.token_f1:.3f}")
  for name, result in results.methods.items():
    said = result.skipped if result.skipped is not None else result.collapse_point
    print(f"{name}: collapse point {said}")
  # The last lines: the verdict in one sentence, and where to read the rest.
  verdict = headline.verdict_sentence(results.to_json())
  if verdict:
    print(verdict.replace("**", ""))
  print(f"report: {os.path.join(os.path.abspath(settings.output_dir), SUMMARY_HTML)}")


def run() -> None:
  run_program("dpjax", [Settings, devices.Launch], run_study)


if __name__ == "__main__":
  run()
