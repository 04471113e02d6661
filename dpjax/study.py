"""The study on one model and task, from settings to the report on disk.

`run(settings)` loads the model and task, reads out every layer of the
unpruned model on the evaluation items, computes the metrics, and writes the
report into `settings.output_dir`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import numpy as np

from dpjax import metrics, report, tasks
from dpjax.load import load_model
from dpjax.readout import DecisionReader, Readout


@dataclasses.dataclass(frozen=True)
class Settings:
  model: str
  task: str = "synthetic"
  split: str = "test"
  fewshot_split: str = "dev"
  k_shot: int = 0
  num_items: int = 0
  seed: int = 0
  batch_size: int = 16
  normalization: str = "vocab"
  transition_tau: float = 0.0
  transition_rule: str = "margin"
  accuracy_delta: float = 0.1
  truncation: str = "refuse"
  add_special_tokens: bool = False
  max_length: int = 0
  dtype: str | None = None
  compute_dtype: str | None = None
  output_dir: str = "dpjax_out"
  progress: bool = True

  def __post_init__(self):
    if self.normalization not in metrics.NORMALIZATIONS:
      raise ValueError(f"normalization={self.normalization!r}; use one of {metrics.NORMALIZATIONS}.")
    if self.transition_rule not in ("margin", "accuracy"):
      raise ValueError(f"transition_rule={self.transition_rule!r}; use 'margin' or 'accuracy'.")
    if self.k_shot < 0 or self.num_items < 0 or self.batch_size < 1:
      raise ValueError(f"k_shot={self.k_shot}, num_items={self.num_items} and "
                       f"batch_size={self.batch_size} must be >= 0, >= 0 and >= 1.")


@dataclasses.dataclass
class Context:
  """What every stage of the study shares."""
  settings: Settings
  model: Any
  tokenizer: Any
  encoded: tasks.EncodedTask
  reader: DecisionReader
  pad_id: int


def _tokenizer(model) -> Any:
  import transformers
  try:
    return transformers.AutoTokenizer.from_pretrained(model.source_dir)
  except Exception as e:
    raise ValueError(f"the model at {model.source_dir} has no usable tokenizer files ({e}); "
                     "dpjax needs the checkpoint's tokenizer to build prompts.") from e


def prepare(settings: Settings) -> Context:
  model = load_model(settings.model, dtype=settings.dtype, compute_dtype=settings.compute_dtype)
  tokenizer = _tokenizer(model)
  items = tasks.load_task(settings.task, settings.split, num_items=settings.num_items,
                          seed=settings.seed)
  if not items:
    raise ValueError(f"task {settings.task!r} split {settings.split!r} has no items.")
  shots = [[] for _ in items]
  if settings.k_shot:
    dev = tasks.load_task(settings.task, settings.fewshot_split, seed=settings.seed,
                          num_items=0 if settings.task != "synthetic" else 200)
    shots = tasks.shots_for(items, dev, settings.k_shot)
  prompts = [tasks.prompt(item, s) for item, s in zip(items, shots)]
  max_length = settings.max_length or model.config.max_position_embeddings
  encoded = tasks.encode(tokenizer, items, prompts, max_length=max_length,
                         truncation=settings.truncation,
                         add_special_tokens=settings.add_special_tokens)
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  return Context(settings, model, tokenizer, encoded, DecisionReader(model), pad_id)


def full_profile(ctx: Context) -> tuple[Readout, metrics.Profile]:
  """Readouts and metrics of the unpruned model on the evaluation items."""
  s = ctx.settings
  readout = ctx.reader.run(ctx.encoded, batch_size=s.batch_size, pad_id=ctx.pad_id,
                           progress=s.progress, description="full-model readout")
  prof = metrics.profile(readout.option_logits[0], readout.log_normalizer[0], ctx.encoded.answer,
                         ctx.encoded.num_options, normalization=s.normalization,
                         tau=s.transition_tau, delta=s.accuracy_delta)
  if s.transition_rule == "accuracy":
    prof = prof._replace(transition=prof.accuracy_transition)
  return readout, prof


def run(settings: Settings) -> dict[str, Any]:
  """The whole study; returns what it wrote to `results.json`."""
  timings = {}
  start = time.perf_counter()
  ctx = prepare(settings)
  timings["prepare_seconds"] = time.perf_counter() - start
  out = settings.output_dir
  os.makedirs(out, exist_ok=True)

  start = time.perf_counter()
  readout, prof = full_profile(ctx)
  timings["full_profile_seconds"] = time.perf_counter() - start
  num_layers = ctx.model.num_layers
  full = report.profile_json(prof, num_layers)

  cfg = ctx.model.config
  results = {
      "model": {"path": settings.model, "architecture": cfg.architecture,
                "num_layers": num_layers, "hidden_size": cfg.hidden_size,
                "vocab_size": cfg.vocab_size, "param_dtype": cfg.param_dtype,
                "compute_dtype": str(ctx.model.compute_dtype)},
      "task": {"spec": settings.task, "split": settings.split, "k_shot": settings.k_shot,
               "num_items": len(ctx.encoded.items),
               "num_options": ctx.encoded.num_options.tolist(),
               "subjects": sorted({it.subject for it in ctx.encoded.items}),
               "left_truncated_items": int(ctx.encoded.truncated.sum())},
      "settings": dataclasses.asdict(settings),
      "full_model": full,
      "timings": timings,
  }
  report.write_items(os.path.join(out, report.ITEMS_FILE), ctx.encoded)
  report.write_npz(
      os.path.join(out, report.ARRAYS_FILE),
      item_ids=np.array([it.id for it in ctx.encoded.items]),
      answer=ctx.encoded.answer, num_options=ctx.encoded.num_options,
      letter_ids=ctx.encoded.letter_ids,
      option_logits=readout.option_logits[0], log_normalizer=readout.log_normalizer[0],
      decision_margin_vocab=np.asarray(prof.margin["vocab"]),
      decision_margin_options=np.asarray(prof.margin["options"]),
      top_option=np.asarray(prof.top))
  report.write_profile_csv(os.path.join(out, report.PROFILE_CSV), full)
  title = f"{os.path.basename(os.path.normpath(settings.model))} on {settings.task}"
  report.plot_decision_margin(os.path.join(out, report.MARGIN_FIGURE), full,
                              settings.normalization, title)
  report.plot_option_frequency(os.path.join(out, report.FREQUENCY_FIGURE), full, title)
  report.write_json(os.path.join(out, report.RESULTS_FILE), results)
  return results
