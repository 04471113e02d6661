"""The straightforward HF-PyTorch way of running the study, as a careful researcher writes it.

Per candidate of every Iterative Pruning step: point `model.model.layers` at the
kept blocks, run the model with `output_hidden_states=True`, `use_cache=False`
under `torch.no_grad()`, and read every hidden state at the answer position
through HF's own final norm and `lm_head` (the logit lens). The same items, in
the same left-padded batches and with the same position ids as dpjax; the
metrics are computed here in numpy from those readouts, independently of
`dpjax.metrics`. The benchmark checks that this picks the same sequence as
dpjax, with the same numbers, before it reports any time.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from dpjax.tasks import Batch


class HFIterativeReference:
  """Iterative Pruning (accuracy criterion) of an HF model on prepared item batches."""

  def __init__(self, model, batches: Sequence[Batch]):
    self.model = model.eval()
    self.layers = list(model.model.layers)
    self.layer_types = getattr(model.config, "layer_types", None)
    self.batches = list(batches)
    self.block_rows = 0
    # transformers 5 collects hidden states with hooks it installs on the blocks
    # present at the first call: make that call with every block (also a warm-up).
    self.readouts(list(range(len(self.layers))))
    self.block_rows = 0    # blocks run x item rows (filler rows included)

  def _use(self, kept: Sequence[int]) -> None:
    """Deletes the other blocks from `model.model.layers` (the weights are shared, not copied)."""
    self.model.model.layers = torch.nn.ModuleList([self.layers[b] for b in kept])
    self.model.config.num_hidden_layers = len(kept)
    if self.layer_types is not None:
      self.model.config.layer_types = [self.layer_types[b] for b in kept]

  def readouts(self, kept: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lens readouts of the model keeping `kept`: option logits `[n+1, N, K]`, log
    normalizers `[n+1, N]` (layers h_0 and after each kept block) and answers `[N]`."""
    self._use(kept)
    norm, head = self.model.model.norm, self.model.lm_head
    options, normalizers, answers = [], [], []
    for batch in self.batches:
      ids = torch.as_tensor(batch.input_ids, dtype=torch.long)
      mask = torch.as_tensor(batch.attention_mask, dtype=torch.long)
      positions = torch.clamp(mask.cumsum(-1) - 1, min=0)
      with torch.no_grad():
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                         output_hidden_states=True, use_cache=False)
        # HF's last hidden state is already normed; the others get the final norm.
        states = [norm(h[:, -1]) for h in out.hidden_states[:-1]] + [out.hidden_states[-1][:, -1]]
        logits = head(torch.stack(states)).double()  # [n+1, B, V]
      if len(out.hidden_states) != len(kept) + 1:
        raise RuntimeError(f"HF returned {len(out.hidden_states)} hidden states for {len(kept)} "
                           "blocks; transformers hooks the blocks present at the model's first "
                           "call, so make that call with every block.")
      self.block_rows += len(kept) * ids.shape[0]
      rows = batch.index >= 0
      letters = np.where(batch.letter_ids >= 0, batch.letter_ids, 0)
      z = np.take_along_axis(logits.numpy(), letters[None], axis=-1)
      z = np.where(batch.letter_ids[None] >= 0, z, -np.inf)
      lse = torch.logsumexp(logits, dim=-1).numpy()
      options.append(z[:, rows])
      normalizers.append(lse[:, rows])
      answers.append(batch.answer[rows])
    return (np.concatenate(options, 1), np.concatenate(normalizers, 1),
            np.concatenate(answers))

  @staticmethod
  def final_scores(option_logits: np.ndarray, log_normalizer: np.ndarray,
                   answer: np.ndarray) -> tuple[float, float]:
    """Accuracy and mean Decision Margin (vocab) of the last readout."""
    z, lse = option_logits[-1], log_normalizer[-1]
    top = np.argmax(z, axis=-1)  # ties to the lower index
    p = np.exp(z - lse[:, None])
    rows = np.arange(len(answer))
    rival = np.where(np.arange(z.shape[1]) == answer[:, None], -np.inf, p).max(-1)
    return float(np.mean(top == answer)), float(np.mean(p[rows, answer] - rival))

  def iterative_prune(self, num_layers: int, min_layers: int = 1, on_step=None) -> list[dict]:
    """Greedy removal by final accuracy (ties: higher mean DM, then the higher block).

    Returns one record per step: `removed` (0-based block), `accuracy`, `margin`.
    """
    kept = list(range(num_layers))
    steps = []
    while len(kept) > min_layers:
      best = None
      for block in kept:
        candidate = [b for b in kept if b != block]
        acc, margin = self.final_scores(*self.readouts(candidate))
        key = (acc, margin, block)
        if best is None or key > best[0]:
          best = (key, block)
      (acc, margin, _), block = best
      kept.remove(block)
      steps.append({"removed": block, "accuracy": acc, "margin": margin})
      if on_step is not None:
        on_step(steps[-1])
    return steps
