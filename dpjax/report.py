"""The report: results.json, per-item arrays, CSV tables, figures, items.jsonl.

Every file is written under a temporary name and renamed into place, so a
reader never sees half a file. Figures use matplotlib's Agg backend (no
display needed).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from typing import Any, Sequence

import numpy as np

from dpjax import metrics
from dpjax.fileio import atomic_write_text
from dpjax.tasks import LETTERS, EncodedTask

RESULTS_FILE = "results.json"
ARRAYS_FILE = "readouts.npz"
ITEMS_FILE = "items.jsonl"
PROFILE_CSV = "layer_profile.csv"
MARGIN_FIGURE = "decision_margin.png"
FREQUENCY_FIGURE = "option_frequency.png"


def _clean(value: Any) -> Any:
  """JSON-ready: arrays to lists, NaN to None, numpy scalars to Python."""
  if isinstance(value, dict):
    return {str(k): _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
    return _clean(np.asarray(value).tolist())
  if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
    return None
  return value


def write_json(path: str, data: dict[str, Any]) -> None:
  atomic_write_text(path, json.dumps(_clean(data), indent=2) + "\n")


def write_npz(path: str, **arrays: np.ndarray) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".readouts.tmp-", suffix=".npz", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez_compressed(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(header)
  for row in rows:
    writer.writerow(["" if isinstance(v, float) and math.isnan(v) else v for v in row])
  atomic_write_text(path, buffer.getvalue())


def write_items(path: str, encoded: EncodedTask) -> None:
  """One JSON line per item: everything needed to recompute its numbers elsewhere."""
  lines = []
  for i, item in enumerate(encoded.items):
    lines.append(json.dumps({
        "id": item.id,
        "subject": item.subject,
        "prompt": encoded.prompts[i],
        "options": list(item.options),
        "letters": list(LETTERS[:item.num_options]),
        "letter_token_ids": [int(t) for t in encoded.letter_ids[i, :item.num_options]],
        "answer": item.answer,
        "num_prompt_tokens": len(encoded.tokens[i]),
        "left_truncated": bool(encoded.truncated[i]),
    }))
  atomic_write_text(path, "\n".join(lines) + "\n")


def profile_json(prof: metrics.Profile, num_layers: int) -> dict[str, Any]:
  """The per-layer profile of one model as plain JSON (layers 0..L, 0 = h_0)."""
  l_star = int(prof.transition)
  silent, decisive = metrics.phases(l_star, num_layers)
  return {
      "layers": list(range(num_layers + 1)),
      "decision_margin": {
          norm: {"mean": s.mean, "median": s.median, "q10": s.q10, "q90": s.q90}
          for norm, s in prof.margin_summary.items()},
      "accuracy": prof.accuracy,
      "chance": float(prof.chance),
      "option_frequency": prof.option_frequency,
      "transition_block": None if l_star == metrics.NO_TRANSITION else l_star,
      "accuracy_transition_block": (None if int(prof.accuracy_transition) == metrics.NO_TRANSITION
                                    else int(prof.accuracy_transition)),
      "silent_phase": [b + 1 for b in np.flatnonzero(np.asarray(silent))],
      "decisive_phase": [b + 1 for b in np.flatnonzero(np.asarray(decisive))],
      "sharpness": {"rise": float(prof.sharpness.rise), "block": int(prof.sharpness.block)},
  }


def write_profile_csv(path: str, prof: dict[str, Any]) -> None:
  num_options = len(prof["option_frequency"][0])
  header = (["layer", "accuracy"]
            + [f"dm_{norm}_{stat}" for norm in metrics.NORMALIZATIONS
               for stat in ("mean", "median", "q10", "q90")]
            + [f"of_{LETTERS[k]}" for k in range(num_options)])
  rows = []
  for layer in prof["layers"]:
    row = [layer, float(prof["accuracy"][layer])]
    for norm in metrics.NORMALIZATIONS:
      for stat in ("mean", "median", "q10", "q90"):
        row.append(float(prof["decision_margin"][norm][stat][layer]))
    row += [float(x) for x in prof["option_frequency"][layer]]
    rows.append(row)
  write_csv(path, header, rows)


# ----------------------------------------------------------------------------
# Figures.


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _integer_ticks():
  from matplotlib.ticker import MaxNLocator
  return MaxNLocator(integer=True)


def save_figure(fig, path: str) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".figure.tmp-", suffix=".png", dir=directory)
  os.close(fd)
  try:
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
    _pyplot().close(fig)


def plot_decision_margin(path: str, prof: dict[str, Any], headline: str, title: str) -> None:
  """Mean Decision Margin against layer, both normalizations, the transition marked."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  layers = np.array(prof["layers"])
  colours = {"vocab": "tab:blue", "options": "tab:orange"}
  for norm in metrics.NORMALIZATIONS:
    stats = prof["decision_margin"][norm]
    mean = np.array(stats["mean"], dtype=float)
    ax.plot(layers, mean, marker="o", ms=3, color=colours[norm],
            label=f"mean DM ({norm}){' (headline)' if norm == headline else ''}")
    if norm == headline:
      ax.fill_between(layers, np.array(stats["q10"], float), np.array(stats["q90"], float),
                      color=colours[norm], alpha=0.15, label=f"10-90% of items ({norm})")
  l_star = prof["transition_block"]
  if l_star is not None:
    ax.axvspan(0.5, l_star - 0.5, color="grey", alpha=0.12, label="Silent Phase")
    ax.axvline(l_star, color="black", ls="--", lw=1, label=f"transition l* = {l_star}")
  ax.axhline(0, color="black", lw=0.5)
  ax.xaxis.set_major_locator(_integer_ticks())
  ax.set_xlabel("layer (0 = embeddings, l = after block l)")
  ax.set_ylabel("Decision Margin")
  ax.set_title(title)
  ax.legend(fontsize=8, loc="upper left")
  save_figure(fig, path)


def plot_option_frequency(path: str, prof: dict[str, Any], title: str) -> None:
  """Option Frequency as stacked bars per layer, with the correct-option share."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4))
  layers = np.array(prof["layers"])
  freq = np.nan_to_num(np.array(prof["option_frequency"], dtype=float))
  bottom = np.zeros(len(layers))
  cmap = plt.get_cmap("tab10")
  for k in range(freq.shape[1]):
    ax.bar(layers, freq[:, k], bottom=bottom, color=cmap(k), width=0.8, label=LETTERS[k])
    bottom += freq[:, k]
  ax.plot(layers, np.array(prof["accuracy"], dtype=float), color="black", marker="o", ms=3,
          label="correct option")
  ax.axhline(prof["chance"], color="black", ls=":", lw=1, label="chance")
  ax.set_xlabel("layer (0 = embeddings, l = after block l)")
  ax.set_ylabel("fraction of items whose top option is ...")
  ax.set_ylim(0, 1.02)
  ax.xaxis.set_major_locator(_integer_ticks())
  ax.set_title(title)
  ax.legend(fontsize=8, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  save_figure(fig, path)
