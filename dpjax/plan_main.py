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

from absl import app
from absl import flags
from absl import logging

from dpjax.bundled import BUNDLED_MODEL

_MODEL = flags.DEFINE_string("model", BUNDLED_MODEL, "A preset (llama3-8b, llama3-70b, "
                             "qwen2.5-72b), an HF checkpoint directory or a config.json file. "
                             "Default: the bundled model.")
_TARGET = flags.DEFINE_string("target", "local", "local (this machine's devices) or v5p-8, "
                              "v5p-64, v6e-16, 8xH100, 1xH200.")
_NUM_ITEMS = flags.DEFINE_integer("num_items", 300, "Evaluation items of the study.")
_CAL = flags.DEFINE_integer("calibration_items", 64, "Calibration items.")
_FORMAT = flags.DEFINE_enum("format", "letter", ["letter", "cloze", "open"], "Answer format.")
_TOKENS = flags.DEFINE_integer("tokens", 640, "Tokens per prompt (a batch's width; 640: "
                               "MMLU 5-shot, padded).")
_OPTIONS = flags.DEFINE_integer("options", 4, "Options per item.")
_READS = flags.DEFINE_integer("reads", 0, "Cloze: continuation tokens read per row.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Weight dtype (default: bfloat16, float32 for the local target).")
_MODEL_AXIS = flags.DEFINE_integer("model_axis", 0, "Devices along the model axis (0: the "
                                   "fewest that leave room for the activations).")
_BATCH = flags.DEFINE_integer("batch_size", 0, "Fix the batch (0: the fit chooses).")
_IN_FLIGHT = flags.DEFINE_integer("masks_in_flight", 0, "Fix the masks in flight (0: fit).")
_CANDIDATES = flags.DEFINE_integer("candidates_per_call", 0, "Fix candidates per call (0: fit).")
_MARGIN = flags.DEFINE_float("fit_margin", 0.15, "Share of each device's memory kept free.")
_OUT = flags.DEFINE_string("out", "", "Also write the plan as JSON here.")


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; everything is a flag.")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  if _TARGET.value != "local":
    # Compile-only devices of the target come from their compiler alone: this process runs
    # nothing but the CPU (no accelerator plugin is initialized, none is needed).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from dpjax import planner
  dtype = _DTYPE.value or ("float32" if _TARGET.value == "local" else "bfloat16")
  try:
    plan = planner.plan(_MODEL.value, _TARGET.value, num_items=_NUM_ITEMS.value,
                        calibration_items=_CAL.value, fmt=_FORMAT.value, tokens=_TOKENS.value,
                        options=_OPTIONS.value, reads=_READS.value, dtype=dtype,
                        model_axis=_MODEL_AXIS.value, batch_size=_BATCH.value,
                        masks_in_flight=_IN_FLIGHT.value, candidates=_CANDIDATES.value,
                        margin=_MARGIN.value)
  except (ValueError, RuntimeError) as e:
    raise SystemExit(f"dpjax-plan: error: {e}") from e
  print(table(plan))
  if _OUT.value:
    from dpjax import fileio
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    fileio.write_json(_OUT.value, plan)
  if not plan["fits"]:
    raise SystemExit(1)


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
