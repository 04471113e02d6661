"""Pruning methods: each proposes masks; the sweep evaluates them.

Definitions: the README's "Definitions" section. Block indices here are 0-based
(`block b` is the spec's block `b + 1`); reports convert.

* `iterative_prune`: greedy, one block a step, by the `accuracy`, `margin` or
  `nll` criterion on the calibration items, with the spec's tie-breaks.
* One-shot rankings: `block_influence_ranking` (ShortGPT), `angular_blocks`
  (Gromov et al.), `single_layer_ranking`, `reverse_ranking`,
  `random_ranking`.
* `phase_masks`: Silent-arm against Decisive-arm removals by a selection rule.
* `collapse_point` of a pruning curve.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import numpy as np

from dpjax.engine.sweep import FinalStats, Sweep

CRITERIA = ("accuracy", "margin", "nll")
# The phase experiment's selection rules: which blocks of each phase go first. The last
# two are controls: the adjacent rule with the model's last block kept in the Decisive
# arm, and with its first block kept in the Silent arm (at the largest k every other
# rule removes both), so a phase's cost can be told from that one block's.
PHASE_SELECTIONS = ("adjacent", "redundant", "random", "adjacent_keep_last",
                    "adjacent_keep_first")
PHASE_SIZINGS = ("count", "fraction")


def criterion_key(stats: FinalStats, block: int, criterion: str) -> tuple:
  """Larger is better. Accuracy ties go to the higher mean final DM (vocab), and
  every remaining tie to the higher block index."""
  n = max(int(stats.items), 1)
  if criterion == "accuracy":
    return (stats.correct / n, stats.margin_sum / n, block)
  if criterion == "margin":
    return (stats.margin_sum / n, block)
  if criterion == "nll":
    return (-stats.nll_sum / n, block)
  raise ValueError(f"criterion={criterion!r}; use one of {CRITERIA}.")


def choose(stats: dict[int, FinalStats], criterion: str) -> int:
  """The block whose removal scores best."""
  return max(stats, key=lambda b: criterion_key(stats[b], b, criterion))


def ranking(stats: dict[int, FinalStats], criterion: str) -> list[int]:
  """The candidates, best first (the order `choose` would take them in)."""
  return sorted(stats, key=lambda b: criterion_key(stats[b], b, criterion), reverse=True)


def iterative_prune(sweep: Sweep, *, criterion: str = "accuracy", min_layers: int = 1,
                    done: Sequence[int] = (),
                    allowed: Callable[[list[int]], Iterable[int]] | None = None,
                    on_step: Callable[[int, list[int], FinalStats], None] | None = None,
                    screen: Sweep | None = None, screen_keep: int = 4) -> list[int]:
  """Greedy pruning; returns the removed blocks in order.

  Args:
    sweep: evaluates candidates on the calibration items.
    criterion: `accuracy`, `margin` or `nll`.
    min_layers: stop when this many blocks remain.
    done: blocks already removed (a resumed run), in order.
    allowed: which kept blocks may be removed now (default: all); when it
      offers none, pruning stops.
    on_step: called after each new step with (removed block, kept blocks,
      the chosen candidate's calibration stats).
    screen: a screened search: each step first scores every candidate on `screen`'s
      items (a few of the calibration items: the cheap proxy), then evaluates only the
      best `screen_keep` of them on `sweep`'s and removes the best of those. With
      `screen_keep` at least the number of candidates it is the exact search.
  """
  if criterion not in CRITERIA:
    raise ValueError(f"criterion={criterion!r}; use one of {CRITERIA}.")
  num_layers = sweep.num_layers
  if not 1 <= min_layers <= num_layers:
    raise ValueError(f"min_layers={min_layers} must be between 1 and the model's {num_layers} "
                     "blocks.")
  removed = [int(b) for b in done]
  kept = [b for b in range(num_layers) if b not in removed]
  while len(kept) > min_layers:
    candidates = list(kept if allowed is None else allowed(kept))
    if not candidates:
      break
    if screen is not None and len(candidates) > screen_keep:
      proxy = screen.drop_one(kept, candidates)
      candidates = sorted(ranking(proxy, criterion)[:screen_keep])
    stats = sweep.drop_one(kept, candidates, stop_early=(criterion == "accuracy"))
    block = choose(stats, criterion)
    kept.remove(block)
    removed.append(block)
    if on_step is not None:
      on_step(block, list(kept), stats[block])
  return removed


# ----------------------------------------------------------------------------
# One-shot rankings (each: blocks in the order they are removed).


def block_influence(hidden: Iterable[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
  """ShortGPT's `BI_l = 1 - mean_tokens cos(h_{l-1}, h_l)` `[L]` (block 1..L).

  `hidden` yields `([L+1, B, T, d] residual streams, [B, T] attention mask)`;
  the mean runs over every non-pad token of every prompt.
  """
  total, count = None, 0
  for states, mask in hidden:
    states = np.asarray(states, np.float64)
    a, b = states[:-1], states[1:]
    real = np.broadcast_to(np.asarray(mask, bool)[None], a.shape[:-1])
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    # Pad positions (often a zero embedding) are excluded, not divided by.
    cos = np.divide((a * b).sum(-1), norms, out=np.zeros_like(norms), where=real)
    part = cos.sum(axis=(1, 2))
    total = part if total is None else total + part
    count += int(np.asarray(mask, bool).sum())
  return 1.0 - total / count


def block_influence_ranking(influence: np.ndarray) -> list[int]:
  """Lowest influence first (ties: higher block first)."""
  return sorted(range(len(influence)), key=lambda b: (influence[b], -b))


def angular_distances(answer_states: np.ndarray) -> np.ndarray:
  """`[L+1, L+1]` mean over items of `arccos(cos(h_i, h_j)) / pi` at the answer position.

  `answer_states` `[L+1, N, d]`.
  """
  h = np.asarray(answer_states, np.float64)
  h = h / np.linalg.norm(h, axis=-1, keepdims=True)
  cos = np.clip(np.einsum("ind,jnd->ijn", h, h), -1.0, 1.0)
  return (np.arccos(cos) / np.pi).mean(-1)


def angular_blocks(distances: np.ndarray, n: int) -> list[int]:
  """Gromov et al.: the `n` contiguous blocks `l..l+n-1` (1-based) minimizing
  `d(h_{l-1}, h_{l+n-1})`; returned 0-based. Ties: the later start."""
  num_layers = distances.shape[0] - 1
  starts = range(1, num_layers - n + 2)
  best = min(starts, key=lambda l: (distances[l - 1, l + n - 1], -l))
  return list(range(best - 1, best - 1 + n))


def single_layer_ranking(drop: dict[int, FinalStats]) -> list[int]:
  """Smallest accuracy drop when only that block is removed first (ties: higher
  mean final DM, then higher block), i.e. the best-scoring removal first."""
  return sorted(drop, key=lambda b: tuple(-x for x in criterion_key(drop[b], b, "accuracy")))


def reverse_ranking(num_layers: int) -> list[int]:
  return list(range(num_layers - 1, -1, -1))


def random_ranking(num_layers: int, seed: int) -> list[int]:
  return [int(b) for b in np.random.default_rng([seed, 4242]).permutation(num_layers)]


def masks_from_ranking(ranking: Sequence[int], num_layers: int) -> np.ndarray:
  """`[L-1, L]` masks removing the first n blocks of `ranking`, n = 1..L-1."""
  masks = np.ones((num_layers - 1, num_layers), bool)
  for n in range(1, num_layers):
    masks[n - 1, list(ranking[:n])] = False
  return masks


# ----------------------------------------------------------------------------
# Phase-targeted pruning.


def phase_removals(l_star: int, num_layers: int, selection: str, influence: np.ndarray,
                   seed: int = 0) -> dict[str, list[int]]:
  """For each arm, blocks (0-based) in the order the arm removes them.

  `l_star` is the 1-based transition block: Silent = blocks 1..l*-1, Decisive =
  l*..L. `adjacent` starts next to the boundary and moves away from it;
  `redundant` takes the lowest block influence first; `random` a seeded order;
  `adjacent_keep_last` / `adjacent_keep_first`: `adjacent` with the last block out of the
  Decisive arm / the first block out of the Silent arm (either arm may then be empty).
  """
  if selection not in PHASE_SELECTIONS:
    raise ValueError(f"phase_selection={selection!r}; use one of {PHASE_SELECTIONS}.")
  silent = list(range(0, l_star - 1))
  decisive = list(range(l_star - 1, num_layers))
  if selection == "adjacent_keep_last":
    decisive = decisive[:-1]
  elif selection == "adjacent_keep_first":
    silent = silent[1:]
  arms = {}
  for name, blocks in (("silent", silent), ("decisive", decisive)):
    if selection.startswith("adjacent"):
      order = sorted(blocks, reverse=(name == "silent"))
    elif selection == "redundant":
      order = sorted(blocks, key=lambda b: (influence[b], -b))
    else:
      rng = np.random.default_rng([seed, 77, 0 if name == "silent" else 1])
      order = [blocks[i] for i in rng.permutation(len(blocks))]
    arms[name] = order
  return arms


# ----------------------------------------------------------------------------
# Collapse point.


def phase_sizes(silent: int, decisive: int, sizing: str, max_k: int = 0
                ) -> list[tuple[int, int, int]]:
  """The (k, Silent blocks, Decisive blocks) the phase experiment removes, for arms of
  `silent` and `decisive` blocks. `count`: k blocks from each arm, k = 1 .. the smaller
  arm. `fraction`: the same share of each arm, k / n of it for k = 1 .. n (n the smaller
  arm's size), rounded, at least one block. `max_k` > 0 caps k."""
  if sizing not in PHASE_SIZINGS:
    raise ValueError(f"phase_sizing={sizing!r}; use one of {PHASE_SIZINGS}.")
  n = min(silent, decisive)
  if max_k:
    n = min(n, max_k)
  if sizing == "count":
    return [(k, k, k) for k in range(1, n + 1)]
  small = min(silent, decisive)
  return [(k, max(1, round(k / small * silent)), max(1, round(k / small * decisive)))
          for k in range(1, n + 1)]


def collapse_point(removed: Sequence[int], accuracy: Sequence[float], full: float,
                   chance: float) -> int | None:
  """Smallest number of removed blocks with accuracy below `chance + (full - chance) / 2`."""
  threshold = chance + 0.5 * (full - chance)
  below = [n for n, acc in zip(removed, accuracy) if acc < threshold]
  return min(below) if below else None
