"""`dpjax-plan`: what a study needs on a machine, known before renting it.

    dpjax-plan --model=llama3-8b --target=v5p-8 --num_items=300
    dpjax-plan --model=./my-hf-model --target=8xH100 --num_items=14042 --tokens=640
    dpjax-plan --target=local            # the bundled model on this machine's devices

Compiles every program of the study ahead of time with abstract weights (nothing is
downloaded or read) for the target's devices, chooses rows per data shard, masks in
flight and candidates per call from the compiled memory, and prints per program the
per-device argument, temporary and output bytes, the flops and bytes of one call, and
its predicted time; then the predicted wall time of the whole study. Exits with status
0 only when every program fits. TPU targets need libtpu and GPU targets JAX's CUDA
plugin (no CUDA libraries): `pip install -e '.[plan]'`.
"""

from __future__ import annotations

import json
import os

import dataclasses
import os

from dpjax.bundled import BUNDLED_MODEL
from dpjax.cli.program import run_program
from dpjax.fields import setting

TARGETS_HELP = "local (this machine's devices) or v5p-8, v5p-64, v6e-16, 8xH100, 1xH200."


@dataclasses.dataclass(frozen=True)
class PlanSettings:
  """What `dpjax-plan` plans. Each field is also its flag."""
  model: str = setting(BUNDLED_MODEL, "A preset (llama3-8b, llama3-70b, qwen2.5-72b), an HF "
                       "checkpoint directory or a config.json file. Default: the bundled model.")
  target: str = setting("local", TARGETS_HELP)
  num_items: int = setting(300, "Evaluation items of the study.")
  calibration_items: int = setting(64, "Calibration items.")
  format: str = setting("letter", "Answer format.", choices=("letter", "cloze", "open"))
  tokens: int = setting(640, "Tokens per prompt (a batch's width; 640: MMLU 5-shot, padded).")
  options: int = setting(4, "Options per item.")
  reads: int = setting(0, "Cloze: continuation tokens read per row.")
  dtype: str | None = setting(None, "Weight dtype (default: bfloat16, float32 for the local "
                              "target).", choices=("float32", "bfloat16", "float16"))
  model_axis: int = setting(0, "Devices along the model axis (0: the fewest that leave room "
                            "for the activations).")
  batch_size: int = setting(0, "Fix the batch (0: the fit chooses).")
  masks_in_flight: int = setting(0, "Fix the masks in flight (0: fit).")
  candidates_per_call: int = setting(0, "Fix candidates per call (0: fit).")
  fit_margin: float = setting(0.15, "Share of each device's memory kept free.")
  out: str = setting("", "Also write the plan as JSON here.")


def table(plan: dict) -> str:
  """The plan as text: a line per program, then the study."""
  lines = [f"{plan['model']} ({plan['num_layers']} blocks, {plan['parameters_gb']:.1f} GB in "
           f"{plan['dtype']}) on {plan['target']}: {plan['devices']} devices, mesh data "
           f"{plan['mesh']['data']} x model {plan['mesh']['model']}, "
           f"{plan['device_memory_gb']:.1f} GB each ({plan['budget_gb']:.1f} GB usable)",
           f"chosen: {plan['chosen']['rows_per_shard']} rows per data shard, "
           f"{plan['chosen']['masks_in_flight'] or 'all'} masks in flight, "
           f"{plan['chosen']['candidates_per_call']} candidates per call",
           f"{'program':<14} {'args GB':>8} {'temp GB':>8} {'out GB':>8} {'peak GB':>8} "
           f"{'fits':>4} {'calls':>7} {'TFLOP/call':>10} {'GB/call':>8} {'s/call':>8} "
           f"{'total s':>9}"]
  for name, p in plan["programs"].items():
    m = p["memory"]
    lines.append(f"{name:<14} {m['arguments_gb']:8.2f} {m['temporaries_gb']:8.2f} "
                 f"{m['outputs_gb']:8.2f} {m['peak_gb']:8.2f} {'yes' if p['fits'] else 'NO':>4} "
                 f"{p['calls']:7d} {p['flops_per_call'] / 1e12:10.3f} "
                 f"{p['bytes_per_call'] / 1e9:8.2f} {p['seconds_per_call']:8.3f} "
                 f"{p['seconds']:9.1f}")
  lines.append(f"predicted wall time of the whole study on {plan['num_items']} items: "
               f"{plan['predicted_study_hours']:.2f} h (compiling the plan took "
               f"{plan['compile_seconds']:.0f} s)")
  if not plan["fits"]:
    lines.append(f"DOES NOT FIT: {plan['why_not']}")
  return "\n".join(lines)


def plan_study(s: PlanSettings) -> None:
  if s.target != "local":
    # Compile-only devices of the target come from their compiler alone: this process runs
    # nothing but the CPU (no accelerator plugin is initialized, none is needed).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from dpjax.engine import planner
  dtype = s.dtype or ("float32" if s.target == "local" else "bfloat16")
  try:
    plan = planner.plan(s.model, s.target, num_items=s.num_items,
                        calibration_items=s.calibration_items, fmt=s.format, tokens=s.tokens,
                        options=s.options, reads=s.reads, dtype=dtype,
                        model_axis=s.model_axis, batch_size=s.batch_size,
                        masks_in_flight=s.masks_in_flight, candidates=s.candidates_per_call,
                        margin=s.fit_margin)
  except RuntimeError as e:
    raise ValueError(str(e)) from e
  print(table(plan))
  if s.out:
    from dpjax import fileio
    os.makedirs(os.path.dirname(os.path.abspath(s.out)), exist_ok=True)
    fileio.write_json(s.out, plan)
  if not plan["fits"]:
    raise SystemExit(1)


def run() -> None:
  run_program("dpjax-plan", [PlanSettings], plan_study)


if __name__ == "__main__":
  run()
