"""Perplexity of kept-block variants on a text corpus, and its paired ratio to the unpruned
model's: `dpjax-prune`'s perplexity gate (`--max_ppl_ratio`).

The corpus (`text:FILE`, `task:SPEC@SPLIT` or `synthetic`, as healing's) is one token
stream, documents joined by end-of-text; the gate's windows are the last
`num_windows * seq_len` tokens of it, so healing on the same corpus takes only the
tokens before them (`split_stream`). A window's NLL is the mean next-token negative
log-likelihood over its `seq_len - 1` predictions; every window has the same length, so
the perplexity is `exp` of the mean window NLL. Unpruned and variant are read on the same
windows, and the ratio `ppl_variant / ppl_unpruned = exp(mean(nll_variant - nll_unpruned))`
gets its 95% interval from the paired bootstrap of the per-window differences.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.study import statistics

ROWS_PER_CALL = 4


def split_stream(stream: np.ndarray, num_windows: int, seq_len: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """`(windows [num_windows, seq_len], the tokens before them)` of a token stream."""
  need = num_windows * seq_len
  if num_windows < 2 or seq_len < 2:
    raise ValueError(f"perplexity needs at least 2 windows of 2 tokens; got --ppl_windows="
                     f"{num_windows}, --ppl_seq_len={seq_len}.")
  if len(stream) < need + seq_len:
    raise ValueError(f"the perplexity corpus has {len(stream)} tokens; --ppl_windows="
                     f"{num_windows} of --ppl_seq_len={seq_len} need {need} and leave "
                     "too little for healing: give a larger corpus or fewer windows.")
  return np.asarray(stream[-need:], np.int32).reshape(num_windows, seq_len), stream[:-need]


@jax.jit
def _window_nll(logits: jax.Array, ids: jax.Array) -> jax.Array:
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
  return -jnp.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0].mean(-1)


def window_nll(model, windows: np.ndarray, keep=None) -> np.ndarray:
  """`[n]` mean next-token NLL of each window under `model` with the blocks `keep` run."""
  out = []
  for start in range(0, len(windows), ROWS_PER_CALL):
    ids = np.asarray(windows[start:start + ROWS_PER_CALL])
    out.append(np.asarray(_window_nll(model.logits(ids, keep=keep), ids), np.float64))
  return np.concatenate(out)


def summary(nll: np.ndarray, seed: int = 0) -> dict[str, Any]:
  """Perplexity of per-window NLLs with its bootstrap 95% interval (over windows)."""
  from dpjax.study.results import bootstrap_ci
  low, high = bootstrap_ci(nll, seed=seed)
  return {"perplexity": round(math.exp(float(np.mean(nll))), 6),
          "ci95": [round(math.exp(low), 6), round(math.exp(high), 6)], "windows": int(len(nll))}


def ratio(variant: np.ndarray, unpruned: np.ndarray, seed: int = 0) -> dict[str, Any]:
  """`ppl_variant / ppl_unpruned` on the same windows, with its paired 95% interval."""
  d, (low, high) = statistics.paired_bootstrap(variant, unpruned, seed=seed)
  return {"ratio": round(math.exp(d), 6), "ci95": [round(math.exp(low), 6),
                                                     round(math.exp(high), 6)],
          "upper95": round(math.exp(high), 6)}
