"""Held-out accuracy during training, read out exactly as the `dpjax` study reads it."""

from __future__ import annotations

import time
from typing import Any

import jax
from flax import nnx
import numpy as np

from dpjax import tasks
from dpjax.study import metrics
from dpjax.model.config import ModelConfig
from dpjax.model.transformer import DecoderModel
from dpjax.lens.readout import DecisionReader
from dpjax.tasks import synthetic
from dpjax.train.settings import TrainSettings


class HeldOut:
  """Accuracy on the test split, 0-shot, read out as the `dpjax` study reads it."""

  def __init__(self, cfg: ModelConfig, tokenizer, settings: TrainSettings):
    self.cfg = cfg
    self.settings = settings
    self.pad_id = tokenizer.pad_token_id
    items = synthetic.generate("test", settings.num_eval_items, seed=settings.seed)
    prompts = [tasks.prompt(item) for item in items]
    self.encoded = tasks.encode(tokenizer, items, prompts,
                                max_length=cfg.max_position_embeddings)
    self.batches = tasks.batches(self.encoded, settings.eval_batch_size, self.pad_id)
    self.subjects = np.array([item.subject for item in items])
    self.reader: DecisionReader | None = None

  def __call__(self, params: dict[str, Any]) -> dict[str, Any]:
    """`{"accuracy": float, "per_family": {family: float}}` of the weights `params`."""
    model = DecoderModel(self.cfg, params)
    if self.reader is None:
      self.reader = DecisionReader(model)
    else:
      # Same graph, new weights: the reader's compiled readout is reused.
      self.reader.model = model
    readout = self.reader.run(self.encoded, prepared=self.batches, progress=False)
    top = metrics.top_option(readout.option_logits[0])[-1]  # [N], the last layer
    answer = self.encoded.answer
    accuracy = float(metrics.layer_accuracy(top[None], answer)[0])
    per_family = {}
    for family in synthetic.FAMILIES:
      rows = self.subjects == family
      if rows.any():
        per_family[family] = float(metrics.layer_accuracy(top[None, rows], answer[rows])[0])
    return {"accuracy": accuracy, "per_family": per_family}


def pure_numpy(state) -> dict[str, Any]:
  """The weights as host numpy copies (copies: the train step donates `state`'s buffers)."""
  return jax.tree.map(lambda x: np.array(x, copy=True), nnx.to_pure_dict(state))


def evaluate(held_out: HeldOut, state, step: int) -> dict[str, Any]:
  """Held-out accuracy of the current weights, printed and returned with the step."""
  start = time.perf_counter()
  result = held_out(pure_numpy(state))
  families = "  ".join(f"{k} {v:.3f}" for k, v in result["per_family"].items())
  print(f"step {step:6d}  held-out accuracy {result['accuracy']:.3f}  ({families})  "
        f"[{time.perf_counter() - start:.1f}s]", flush=True)
  return dict(step=step, **result)
