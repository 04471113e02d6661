"""`dpjax-plan`: what a study needs on a machine, known before renting it.

    dpjax-plan                           # the study `dpjax` runs, on this machine's devices
    dpjax-plan --model=llama3-8b --target=v5p-8
    dpjax-plan --model=./my-hf-model --target=8xH100 --task=mmlu --k_shot=5

With no flags it plans the study `dpjax` with no flags runs: the bundled model, the
same task, items, prompts and methods (every study flag here has `dpjax`'s default).
The items are made as the study makes them and their prompts encoded with the model's
tokenizer (a preset has none: they are estimated), so the plan compiles the shapes the
study will. Compiles every program of the study ahead of time with abstract weights
(nothing is downloaded or read) for the target's devices, each distinct program shape
once, chooses rows per data shard, masks in flight and candidates per call from the
compiled memory, and prints per program the per-device argument, temporary and output
bytes, the flops and bytes of one call, and its predicted time (on the local CPU, its
parts timed there; on a named target, the chip's peak figures); then the predicted time
of the whole study. Exits with status 0 only when every program fits. TPU targets need
libtpu and GPU targets JAX's CUDA plugin (no CUDA libraries): `pip install -e '.[plan]'`.
What those libraries print while they start (and JAX's warnings) is kept out of the
output unless `--verbosity=1` or more asks for it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile

from absl import flags

from dpjax.bundled import BUNDLED_MODEL, recorded_path
from dpjax.cli.program import run_program
from dpjax.fields import setting
from dpjax.study.settings import Settings

TARGETS_HELP = "local (this machine's devices) or v5p-8, v5p-64, v6e-16, 8xH100, 1xH200."


def as_in_dpjax(name: str) -> object:
  """The field of `dpjax`'s setting `name` (its default, help and choices): the plan's
  study is the one `dpjax` runs unless a flag says otherwise."""
  field = Settings.__dataclass_fields__[name]
  return setting(field.default, field.metadata["help"], choices=field.metadata["choices"])


@dataclasses.dataclass(frozen=True)
class PlanSettings:
  """What `dpjax-plan` plans. Each field is also its flag."""
  model: str = setting(BUNDLED_MODEL, "A preset (llama3-8b, llama3-70b, qwen2.5-72b), an HF "
                       "checkpoint directory or a config.json file. Default: the bundled model.")
  target: str = setting("local", TARGETS_HELP)
  task: str = as_in_dpjax("task")
  format: str = as_in_dpjax("format")
  k_shot: int = as_in_dpjax("k_shot")
  data_dir: str = as_in_dpjax("data_dir")
  num_items: int = as_in_dpjax("num_items")
  calibration_items: int = as_in_dpjax("calibration_items")
  transition_items: int = as_in_dpjax("transition_items")
  methods: tuple[str, ...] = as_in_dpjax("methods")
  tokens: int = setting(0, "Tokens per prompt, a batch's width (0: the widest batch of the "
                        "task's prompts, encoded with the model's tokenizer; a model without "
                        "one, a preset: estimated).")
  options: int = setting(0, "Options per item (0: the task's).")
  reads: int = setting(0, "Cloze: continuation tokens read per row (0: the task's).")
  transition_block: int = setting(0, "The transition block l* (1-based) the phase methods "
                                  "and the noise probe are planned at; it is known only once "
                                  "the unpruned model has run (0: the last block but one, "
                                  "where the studies run so far found it or one block later; "
                                  "an earlier l* costs the phase methods more).")
  dtype: str | None = setting(None, "Weight dtype (default: bfloat16, float32 for the local "
                              "target).", choices=("float32", "bfloat16", "float16"))
  model_axis: int = setting(0, "Devices along the model axis (0: the fewest that leave room "
                            "for the activations).")
  batch_size: int = setting(0, "Fix the batch (0: the fit chooses).")
  masks_in_flight: int = setting(0, "Fix the masks in flight (0: fit).")
  candidates_per_call: int = setting(0, "Fix candidates per call (0: fit).")
  fit_margin: float = setting(0.15, "Share of each device's memory kept free.")
  out: str = setting("", "Also write the plan as JSON here.")

  def study(self) -> Settings:
    """The `dpjax` settings of the study planned."""
    return Settings(model=self.model, task=self.task, format=self.format, k_shot=self.k_shot,
                    data_dir=self.data_dir, num_items=self.num_items,
                    calibration_items=self.calibration_items,
                    transition_items=self.transition_items, methods=self.methods)


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
  how = ("its parts timed on this machine" if plan["time_from"] == "measured"
         else "the chip's peak figures")
  seconds = plan["predicted_study_seconds"]
  took = f"{seconds:.0f} s" if seconds < 3600 else f"{seconds / 3600:.2f} h"
  lines.append(f"predicted time of the whole study on {plan['num_items']} items: {took} "
               f"({how}; l* assumed at block {plan['transition_block']}; compiling "
               f"{plan['compilations']} programs took {plan['compile_seconds']:.0f} s)")
  if not plan["fits"]:
    lines.append(f"DOES NOT FIT: {plan['why_not']}")
  return "\n".join(lines)


def verbose() -> bool:
  """Whether `--verbosity` asks for the libraries' own output (1 or more)."""
  verbosity = flags.FLAGS["verbosity"]
  return verbosity.present and verbosity.value >= 1


def quiet_libraries() -> None:
  """The log levels of XLA's C++ code and of libtpu set to errors only, before JAX starts
  a backend (an environment that sets them wins), and JAX's Python warnings off."""
  import logging
  import warnings
  for name, value in (("TF_CPP_MIN_LOG_LEVEL", "3"), ("TPU_STDERR_LOG_LEVEL", "3"),
                      ("TPU_MIN_LOG_LEVEL", "3"), ("GRPC_VERBOSITY", "ERROR")):
    os.environ.setdefault(name, value)
  logging.getLogger("jax").setLevel(logging.CRITICAL)
  warnings.filterwarnings("ignore")


@contextlib.contextmanager
def held_stderr(enabled: bool = True):
  """What anything writes to the standard error while the block runs, C++ libraries
  included (file descriptor 2: the CUDA plugin's probe, libtpu's start-up warnings),
  held in a temporary file; written out after all if the block fails with something
  other than a user's error (`ValueError`: its message says what to change)."""
  if not enabled:
    yield
    return
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    failed = False
    try:
      yield
    except ValueError:
      raise
    except BaseException:
      failed = True
      raise
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      if failed:
        held.seek(0)
        os.write(2, held.read())


def plan_study(s: PlanSettings) -> None:
  quiet = not verbose()
  if quiet:
    quiet_libraries()
  model = recorded_path(s.model)
  print(f"dpjax-plan: the study of {model} on {s.target} (task {s.task}, methods "
        f"{', '.join(s.methods) or 'none'})", flush=True)
  if s.target != "local":
    # Compile-only devices of the target come from their compiler alone: this process runs
    # nothing but the CPU (no accelerator plugin is initialized, none is needed).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  with held_stderr(quiet):
    from dpjax.engine import fit
    from dpjax.engine import planner
    dtype = s.dtype or ("float32" if s.target == "local" else "bfloat16")
    study = s.study()
    rows = fit.CPU_ROWS if s.target == "local" else fit.ACCELERATOR_ROWS
    items = planner.study_items(s.model, study, planner.model_config(s.model, dtype),
                                tokens=s.tokens, options=s.options, reads=s.reads, rows=rows)
    print(f"  {items.describe()}", flush=True)
    progress = lambda text: print(text, flush=True)
    try:
      plan = planner.plan(s.model, s.target, dtype=dtype, study=study, items=items,
                          transition_block=s.transition_block, model_axis=s.model_axis,
                          batch_size=s.batch_size, masks_in_flight=s.masks_in_flight,
                          candidates=s.candidates_per_call, margin=s.fit_margin,
                          progress=progress)
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
