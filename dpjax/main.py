"""`dpjax`: the study on one model and task, driven by absl flags.

    dpjax                                  # bundled model, synthetic suite
    dpjax --model=./llama-1b --task=mmlu:data/ --k_shot=5 --output_dir=out

`dpjax --helpfull` documents every flag.
"""

from __future__ import annotations

import os

from absl import app
from absl import flags
from absl import logging
import jax

from dpjax import distributed, metrics, pruning, study, tasks

BUNDLED_MODEL = os.path.join(os.path.dirname(__file__), "bundled_model")

_MODEL = flags.DEFINE_string(
    "model", BUNDLED_MODEL, "Model: a dpjax checkpoint, an HF checkpoint directory, or a hub id. "
    "Default: the small model bundled with dpjax.")
_TASK = flags.DEFINE_string(
    "task", "synthetic", "Task: synthetic | mmlu:DIR_OR_CSV | arc:FILE | csqa:FILE | "
    "openbookqa:FILE | jsonl:FILE | csv:FILE | hub:NAME[:CONFIG] (needs `datasets`).")
_SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate.")
_FEWSHOT_SPLIT = flags.DEFINE_string("fewshot_split", "dev", "Split the k-shot examples come from.")
_K_SHOT = flags.DEFINE_integer("k_shot", 0, "Examples before each question (the first k of its "
                               "subject in --fewshot_split, as lm-eval does).")
_NUM_ITEMS = flags.DEFINE_integer("num_items", 0, "Evaluation items (0: every item left after "
                                  "calibration; the synthetic suite makes 400).")
_CAL_ITEMS = flags.DEFINE_integer("calibration_items", 64, "Calibration items, on which the "
                                  "pruning methods choose blocks (kept apart from evaluation).")
_CAL_SEED = flags.DEFINE_integer("calibration_seed", 0, "Seed of the calibration/evaluation split.")
_METHODS = flags.DEFINE_list("methods", list(study.METHODS), "Pruning methods to run, of "
                             f"{', '.join(study.METHODS)}; empty: only the full-model profile.")
_CRITERIA = flags.DEFINE_list("criteria", ["accuracy"], "Iterative Pruning criteria, of "
                              f"{', '.join(pruning.CRITERIA)}.")
_MIN_LAYERS = flags.DEFINE_integer("min_layers", 1, "Iterative Pruning stops at this many blocks.")
_RANDOM_SEEDS = flags.DEFINE_integer("random_seeds", 3, "Seeds for the random baseline and the "
                                     "random phase selection.")
_PHASE_SELECTION = flags.DEFINE_list("phase_selection", list(pruning.PHASE_SELECTIONS),
                                     "Phase-targeted selection rules, of "
                                     f"{', '.join(pruning.PHASE_SELECTIONS)}.")
_PHASE_MAX_K = flags.DEFINE_integer("phase_max_k", 0, "Most blocks removed per phase arm (0: the "
                                    "smaller phase's size).")
_MASK_CHUNK = flags.DEFINE_integer("mask_chunk", 16, "Masks evaluated together in one vmapped call.")
_RESTART = flags.DEFINE_bool("restart", False, "Discard saved state in --output_dir and start over.")
_MODEL_AXIS = flags.DEFINE_integer("model_axis", 1, "Devices along the mesh's model axis (weights "
                                   "split across them); the rest form the data axis.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of "
                                   "process 0 (jax.distributed.initialize).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 1, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", 0, "Multi-host: this process's index.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic suite.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Items per forward pass.")
_NORMALIZATION = flags.DEFINE_enum(
    "normalization", "vocab", list(metrics.NORMALIZATIONS),
    "Which Decision Margin the headline figures and the transition use: vocab (full-vocabulary "
    "probability of the letter token) or options (renormalized over the options).")
_TAU = flags.DEFINE_float("transition_tau", 0.0, "Transition: mean DM above tau from l* on.")
_RULE = flags.DEFINE_enum("transition_rule", "margin", ["margin", "accuracy"],
                          "Rule for the transition block.")
_DELTA = flags.DEFINE_float("accuracy_delta", 0.1, "Accuracy rule: above chance + delta from l* on.")
_TRUNCATION = flags.DEFINE_enum("truncation", "refuse", ["refuse", "left"],
                                "A prompt longer than the model's context: refuse, or drop its "
                                "earliest tokens.")
_ADD_SPECIAL = flags.DEFINE_bool("add_special_tokens", False, "Let the tokenizer add its special "
                                 "tokens (BOS); lm-eval's default is not to.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 0, "Context length (0: the model's "
                                   "max_position_embeddings).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Weight dtype (default: the checkpoint's).")
_COMPUTE_DTYPE = flags.DEFINE_enum("compute_dtype", None, ["float32", "bfloat16", "float16"],
                                   "Activation dtype (default: the weights').")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "dpjax_out", "Where the report goes.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars with an ETA.")


def settings_from_flags() -> study.Settings:
  return study.Settings(
      model=_MODEL.value, task=_TASK.value, split=_SPLIT.value,
      fewshot_split=_FEWSHOT_SPLIT.value, k_shot=_K_SHOT.value, num_items=_NUM_ITEMS.value,
      seed=_SEED.value, batch_size=_BATCH_SIZE.value,
      calibration_items=_CAL_ITEMS.value if _METHODS.value else 0,
      calibration_seed=_CAL_SEED.value, methods=tuple(_METHODS.value),
      criteria=tuple(_CRITERIA.value), min_layers=_MIN_LAYERS.value,
      random_seeds=_RANDOM_SEEDS.value, phase_selections=tuple(_PHASE_SELECTION.value),
      phase_max_k=_PHASE_MAX_K.value, mask_chunk=_MASK_CHUNK.value, restart=_RESTART.value,
      model_axis=_MODEL_AXIS.value, normalization=_NORMALIZATION.value,
      transition_tau=_TAU.value, transition_rule=_RULE.value, accuracy_delta=_DELTA.value,
      truncation=_TRUNCATION.value, add_special_tokens=_ADD_SPECIAL.value,
      max_length=_MAX_LENGTH.value, dtype=_DTYPE.value, compute_dtype=_COMPUTE_DTYPE.value,
      output_dir=_OUTPUT_DIR.value, progress=_PROGRESS.value)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; everything is a flag.")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  if _MODEL.value == BUNDLED_MODEL and not os.path.isdir(BUNDLED_MODEL):
    raise SystemExit("dpjax: error: the bundled model is not in this installation; pass "
                     "--model=PATH_OR_HUB_ID.")
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    settings = settings_from_flags()
    placement = None
    if len(jax.devices()) > 1 or _MODEL_AXIS.value > 1:
      placement = distributed.Placement.create(_MODEL_AXIS.value)
    results = study.run(settings, placement)
  except (ValueError, FileExistsError, tasks.TaskDataError) as e:
    raise SystemExit(f"dpjax: error: {e}") from e
  if not distributed.is_main_process():
    return
  full = results["full_model"]
  print(f"wrote the report to {os.path.abspath(_OUTPUT_DIR.value)}")
  print(f"final-layer accuracy {full['accuracy'][-1]:.3f} (chance {full['chance']:.3f}); "
        f"transition block {full['transition_block']}")
  for name, result in results["methods"].items():
    print(f"{name}: collapse point {result.get('collapse_point', result.get('skipped'))}")


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
