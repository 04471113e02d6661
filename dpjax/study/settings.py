"""Every setting of a study, defined once: `Settings` is both the Python API and the flags.

`dpjax` defines one flag per field (`dpjax.cli.flags`), with the default and help
given here, so `study.run(Settings(model=...))` and `dpjax --model=...` run the
same study. When no pruning method runs, no calibration items are set aside
(`calibration_items` becomes 0): every item is an evaluation item.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dpjax.study import metrics
from dpjax.bundled import BUNDLED_MODEL
from dpjax.engine.compilation import default_cache_dir
from dpjax.fields import setting
from dpjax.study.pruning import CRITERIA, PHASE_SELECTIONS, PHASE_SIZINGS
from dpjax.tasks.encoding import ANSWER_FORMATS, CLOZE_NORMS
from dpjax.lens.tuned import lens_spec
from dpjax.checkpoints.architectures import SUPPORTED_DTYPES
from dpjax.study.methods import METHODS as METHOD_REGISTRY

# The pruning methods a study can run, in the order it runs them (`dpjax.study.methods`
# owns the registry), those it runs by default (the screened search is asked for by
# name), and the weight dtypes (`dpjax.checkpoints.architectures`'s).
METHODS = tuple(METHOD_REGISTRY)
DEFAULT_METHODS = tuple(m for m in METHODS if m != "iterative_screened")
DTYPES = SUPPORTED_DTYPES
PHASE_KS = ("all", "doublings")

# Settings that cannot change a result beyond float rounding, or only which variants run
# (a saved curve, the noise probe, a screened search are keyed by their variants or
# settings): resuming does not require them equal.
_NOT_FINGERPRINTED = ("output_dir", "progress", "model_axis", "restart", "methods",
                      "mask_chunk", "masks_in_flight", "compilation_cache_dir", "phase_ks",
                      "share_prefix", "batch_size", "candidates_per_call", "fit_margin",
                      "margin", "noise_levels", "noise_seeds", "noise_profile_seeds",
                      "screen_items", "screen_keep")


@dataclasses.dataclass(frozen=True)
class Settings:
  """A study on one model and task. Each field is also the `dpjax` flag of that name."""
  model: str = setting(BUNDLED_MODEL, "Model: a dpjax checkpoint, an HF checkpoint directory, "
                       "or a hub id. Default: the small model bundled with dpjax.")
  task: str = setting("synthetic", "Task: a benchmark (arc_easy, arc_challenge, sciq, piqa, "
                      "openbookqa, csqa, hellaswag, winogrande, mmlu, nq_open, triviaqa; read "
                      "from --data_dir) | synthetic | disk:DIR | mmlu:DIR_OR_CSV | arc:FILE | "
                      "csqa:FILE | openbookqa:FILE | jsonl:FILE | csv:FILE | hub:NAME[:CONFIG] "
                      "(needs `datasets`).")
  format: str = setting("letter", "Answer format: letter (the option letters, the paper's), "
                        "cloze (each option's text scored as a continuation, lm-eval's "
                        "multiple-choice scoring), open (the gold answers' first tokens) or "
                        "generate (open-ended answers: every variant judged by its greedy "
                        "generation, exact match and token F1; every layer read as open).",
                        choices=ANSWER_FORMATS)
  lens: str = setting("logit", "The lens every layer is read through: logit (the model's own "
                      "final norm and unembedding) or tuned:PATH (a tuned lens trained with "
                      "dpjax-train-lens; the report then shows both).")
  cloze_norm: str = setting("none", "Cloze scores: the summed log-probability (none, lm-eval's "
                            "acc) or that sum over the option's length in bytes (bytes, "
                            "acc_norm).", choices=CLOZE_NORMS)
  data_dir: str = setting("", "Where benchmark tasks are read (HF save_to_disk directories, "
                          "filled by dpjax-data); empty: ~/.cache/dpjax/data.")
  split: str = setting("", "Split to evaluate (empty: the task's own: test for MMLU and the "
                       "synthetic suite, validation for the other benchmarks).")
  fewshot_split: str = setting("", "Split the k-shot examples come from (empty: the task's own: "
                               "MMLU dev, the synthetic suite's dev; for tasks without one, the "
                               "first k items of the evaluated split, kept out of the "
                               "evaluation).")
  k_shot: int = setting(0, "Examples before each question (the first k of its subject in "
                        "the few-shot split, as lm-eval's first_n sampler does).")
  num_items: int = setting(0, "Evaluation items (0: every item left after calibration; the "
                           "synthetic suite makes 400).")
  calibration_items: int = setting(64, "Calibration items, on which the pruning methods choose "
                                   "blocks (kept apart from evaluation; 0 when no method runs).")
  transition_items: int = setting(128, "Calibration items the transition l* (which the phase "
                                  "methods use) is read on, with its bootstrap interval; the "
                                  "pruning search uses the first --calibration_items of them "
                                  "(fewer where the task has too few items).")
  calibration_seed: int = setting(0, "Seed of the calibration/evaluation split.")
  seed: int = setting(0, "Seed of the synthetic suite.")
  batch_size: int = setting(0, "Items per forward pass (a multiple of the devices on the data "
                            "axis); 0: chosen before the study runs, from its programs' "
                            "memory compiled ahead of time (16 per device on the CPU, the "
                            "largest that fits up to 32 per device on an accelerator).")
  normalization: str = setting(
      "vocab", "Which Decision Margin the headline figures and the transition use: vocab "
      "(full-vocabulary probability of the letter token) or options (renormalized over the "
      "options).", choices=metrics.NORMALIZATIONS)
  transition_tau: float = setting(0.0, "Transition: mean DM above tau from l* on.")
  transition_rule: str = setting("margin", "Rule for the transition block.",
                                 choices=("margin", "accuracy"))
  accuracy_delta: float = setting(0.1, "Accuracy rule: above chance + delta from l* on.")
  truncation: str = setting("refuse", "A prompt longer than the model's context: refuse, or "
                            "drop its earliest tokens.", choices=("refuse", "left"))
  add_special_tokens: bool = setting(False, "Let the tokenizer add its special tokens (BOS); "
                                     "lm-eval's default is not to.")
  max_length: int = setting(0, "Context length (0: the model's max_position_embeddings).")
  dtype: str | None = setting(None, "Weight dtype (default: the checkpoint's).", choices=DTYPES)
  compute_dtype: str | None = setting(None, "Activation dtype (default: the weights').",
                                      choices=DTYPES)
  methods: tuple[str, ...] = setting(DEFAULT_METHODS, "Pruning methods to run (default: all "
                                     "but iterative_screened); empty: only the full-model "
                                     "profile.", choices=METHODS)
  criteria: tuple[str, ...] = setting(("accuracy",), "Iterative Pruning criteria.",
                                      choices=CRITERIA)
  min_layers: int = setting(1, "Iterative Pruning stops at this many blocks.")
  screen_items: int = setting(16, "iterative_screened: calibration items (the first ones) "
                              "every candidate is scored on before the exact evaluation.")
  screen_keep: int = setting(4, "iterative_screened: candidates evaluated on every "
                             "calibration item at each step (the best on the screen).")
  random_seeds: int = setting(3, "Seeds of the random baseline's pruning curves (their mean "
                              "and range are reported).")
  phase_seeds: int = setting(10, "Seeds of the phase experiment's random rule (its paired "
                             "comparisons resample seeds and items together).")
  phase_selections: tuple[str, ...] = setting(PHASE_SELECTIONS, "Phase-targeted selection "
                                              "rules.", choices=PHASE_SELECTIONS,
                                              flag="phase_selection")
  phase_max_k: int = setting(0, "Most blocks removed per phase arm (0: the smaller phase's "
                             "size).")
  phase_sizing: str = setting("count", "Size the phase arms by the same number of blocks "
                              "(count) or the same share of each phase (fraction: k/n of each, "
                              "n the smaller phase's size).", choices=PHASE_SIZINGS)
  margin: float = setting(0.05, "The claim's margin, in accuracy: the Decisive arm 'costs "
                          "little' when the upper 95% bound of its paired drop from the "
                          "unpruned model is at most this (non-inferiority), and the arms are "
                          "'equivalent' when the 90% interval of their difference lies "
                          "inside +-margin.")
  phase_min_gap: float = setting(0.0, "The phase experiment (and the noise probe) run only "
                                 "where the unpruned model's final accuracy on the "
                                 "evaluation items is at least chance plus this (a model "
                                 "near chance has no decision to lose); 0: always.")
  phase_ks: str = setting("all", "Which k the phase experiment runs: all (1 to its largest "
                          "k), or doublings (1, 2, 4, ... and its largest k: far fewer "
                          "variants on a deep model).", choices=PHASE_KS)
  noise_levels: tuple[float, ...] = setting(
      (0.02, 0.05, 0.1, 0.2), "Noise probe (method noise): the levels eps^2 of the Gaussian "
      "noise eps * sigma(h) * N(0, I) added to the residual stream after a block (sigma(h): "
      "the standard deviation of that position's residual over the hidden dimension).")
  noise_seeds: int = setting(3, "Noise probe: seeds of each phase arm (noise after every "
                             "block of the Silent Phase, or of the Decisive Phase) at each "
                             "level.")
  noise_profile_seeds: int = setting(1, "Noise probe: seeds of its profile (noise after one "
                                     "block at a time, every block, every level); 0: no "
                                     "profile.")
  curve_layers: str = setting("all", "Which pruning-curve points read every layer: all, or "
                              "iterative (Iterative Pruning's and the phase-aware method's; the "
                              "one-shot baselines' points read their last block only, which "
                              "costs one lens instead of one per layer).",
                              choices=("all", "iterative"))
  mask_chunk: int = setting(16, "Masks evaluated together in one vmapped call.")
  masks_in_flight: int = setting(0, "Masks (or drop-one candidates) whose activations are live "
                                 "at once inside one call; 0: one on the CPU, on an "
                                 "accelerator the most that fit. Lower it to bound memory.")
  candidates_per_call: int = setting(0, "Drop-one candidates (or pruned variants' tails) "
                                     "evaluated per call; 0: the most that fit, up to 8.")
  fit_margin: float = setting(0.15, "Share of each device's memory the fit step keeps free "
                              "(runtime buffers; on GPUs the library workspaces XLA's "
                              "analysis leaves out).")
  share_prefix: bool = setting(True, "Items whose prompts begin with the same 64 tokens or "
                               "more (few-shot shots of one subject) run that prefix once per "
                               "batch (letter and open formats; the same results up to float "
                               "rounding).")
  output_dir: str = setting("dpjax_out", "Where the report goes.")
  progress: bool = setting(True, "Show progress bars with an ETA.")
  model_axis: int = setting(1, "Devices along the mesh's model axis (weights split across "
                            "them); the rest form the data axis.")
  restart: bool = setting(False, "Discard saved state in --output_dir and start over.")
  compilation_cache_dir: str = setting(default_cache_dir(), "JAX's persistent compilation "
                                       "cache (a second identical run compiles nothing); empty: "
                                       "off. JAX_COMPILATION_CACHE_DIR in the environment wins.")

  def __post_init__(self):
    if not self.methods and self.calibration_items:
      object.__setattr__(self, "calibration_items", 0)  # nothing to calibrate
    for name in ("methods", "criteria", "phase_selections"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    object.__setattr__(self, "noise_levels", _noise_levels(self.noise_levels))
    lens_spec(self.lens)  # refuses a malformed --lens by name
    if self.format not in ANSWER_FORMATS:
      raise ValueError(f"format={self.format!r}; use one of {ANSWER_FORMATS}.")
    if self.cloze_norm not in CLOZE_NORMS:
      raise ValueError(f"cloze_norm={self.cloze_norm!r}; use one of {CLOZE_NORMS}.")
    if self.normalization not in metrics.NORMALIZATIONS:
      raise ValueError(f"normalization={self.normalization!r}; use one of {metrics.NORMALIZATIONS}.")
    if self.transition_rule not in ("margin", "accuracy"):
      raise ValueError(f"transition_rule={self.transition_rule!r}; use 'margin' or 'accuracy'.")
    if (self.k_shot < 0 or self.num_items < 0 or self.calibration_items < 0
        or self.batch_size < 0):
      raise ValueError(f"k_shot={self.k_shot}, num_items={self.num_items}, calibration_items="
                       f"{self.calibration_items} and batch_size={self.batch_size} must be "
                       ">= 0 (batch_size 0: chosen by the fit step).")
    if self.candidates_per_call < 0 or not 0 <= self.fit_margin < 1:
      raise ValueError(f"candidates_per_call={self.candidates_per_call} must be >= 0 and "
                       f"fit_margin={self.fit_margin} in [0, 1).")
    unknown = sorted(set(self.methods) - set(METHODS))
    if unknown:
      raise ValueError(f"unknown methods {unknown}; choose from {METHODS}.")
    bad = sorted(set(self.criteria) - set(CRITERIA))
    if bad or not self.criteria:
      raise ValueError(f"criteria {list(self.criteria)} must be some of {CRITERIA}.")
    bad = sorted(set(self.phase_selections) - set(PHASE_SELECTIONS))
    if bad:
      raise ValueError(f"phase selections {bad} must be some of {PHASE_SELECTIONS}.")
    if self.transition_items < 0:
      raise ValueError(f"transition_items={self.transition_items} must be >= 0.")
    if self.methods and self.calibration_items < 1:
      raise ValueError("the pruning methods need calibration items; set calibration_items >= 1.")
    if self.min_layers < 1:
      raise ValueError(f"min_layers={self.min_layers} must be at least 1.")
    if self.screen_items < 1 or self.screen_keep < 1:
      raise ValueError(f"screen_items={self.screen_items} and screen_keep={self.screen_keep} "
                       "must be at least 1.")
    if self.masks_in_flight < 0:
      raise ValueError(f"masks_in_flight={self.masks_in_flight} must be >= 0 (0: automatic).")
    if self.phase_sizing not in PHASE_SIZINGS:
      raise ValueError(f"phase_sizing={self.phase_sizing!r}; use one of {PHASE_SIZINGS}.")
    if self.phase_ks not in PHASE_KS:
      raise ValueError(f"phase_ks={self.phase_ks!r}; use one of {PHASE_KS}.")
    if self.noise_seeds < 1 or self.noise_profile_seeds < 0:
      raise ValueError(f"noise_seeds={self.noise_seeds} must be at least 1 and "
                       f"noise_profile_seeds={self.noise_profile_seeds} at least 0 (0: no "
                       "profile).")
    if self.random_seeds < 1 or self.phase_seeds < 1:
      raise ValueError(f"random_seeds={self.random_seeds} and phase_seeds={self.phase_seeds} "
                       "must be at least 1.")
    for name in ("dtype", "compute_dtype"):
      if getattr(self, name) not in (None, *DTYPES):
        raise ValueError(f"{name}={getattr(self, name)!r}; use one of {DTYPES}.")

  def replace(self, **changes: Any) -> "Settings":
    return dataclasses.replace(self, **changes)

  @classmethod
  def default_fingerprint(cls) -> dict[str, Any]:
    """The fingerprinted settings at their defaults (a setting added after a run began is
    compared with its default when the run resumes)."""
    return {f.name: f.default for f in dataclasses.fields(cls)
            if f.name not in _NOT_FINGERPRINTED}

  def fingerprint(self) -> dict[str, Any]:
    """The settings that can change a result (resuming requires them equal)."""
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_FINGERPRINTED}


def _noise_levels(levels) -> tuple[float, ...]:
  """`--noise_levels` as floats (the flag gives strings): distinct, positive, finite `eps^2`."""
  try:
    values = tuple(float(level) for level in levels)
  except (TypeError, ValueError):
    values = None
  if (not values or not all(0 < v < float("inf") for v in values)
      or len(set(values)) < len(values)):
    raise ValueError(f"noise_levels={tuple(levels)!r}: give one or more distinct positive "
                     "numbers (each the noise's variance relative to the row's, eps^2), e.g. "
                     "--noise_levels=0.02,0.05,0.1,0.2.")
  return values
