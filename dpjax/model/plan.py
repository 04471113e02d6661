"""The kept-block plan: which blocks a pruned variant runs, written once.

Everything that runs a pruned variant (the model's forward, the lens readout,
the sweep's drop-one candidates, the KV-cache server, the exporter) builds a
`KeepPlan` from a mask or from kept indices and asks it for what it needs:

* `kept`: 0-based indices of the blocks that run, in order;
* `steps()`: the gathered loop's inputs, `index` `[L]` int32 and `valid` `[L]`
  bool (the kept blocks first, then padding that never runs: the loop's trip
  count is the number of valid steps), one shape for every mask;
* `hidden_source`: for every layer `0..L`, which entry of `[h_0, step outputs]`
  holds its residual stream (a removed block repeats its input).

`layers_from_steps` is the device-side counterpart: it places per-step values
at their layers (`1 + index`) and fills removed layers. Buckets of kept counts
(`keep_buckets`, `bucket_size`) group masks of similar cost into one vmapped
batch (a vmapped loop runs as long as its longest member); that rule lives
here and nowhere else.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# How many buckets of kept counts masks are grouped into for vmapping (the waste
# of a group is below L/16 blocks a member).
NUM_KEEP_BUCKETS = 16


def keep_buckets(num_layers: int) -> tuple[int, ...]:
  """The kept-count buckets masks are grouped by (ascending, at least 1)."""
  return tuple(sorted({math.ceil(num_layers * i / NUM_KEEP_BUCKETS)
                       for i in range(1, NUM_KEEP_BUCKETS + 1)} - {0}))


def bucket_size(count: int, num_layers: int) -> int:
  """The smallest bucket that holds `count` steps (0 stays 0: an empty tail)."""
  if count == 0:
    return 0
  for size in keep_buckets(num_layers):
    if size >= count:
      return size
  raise ValueError(f"{count} steps exceed the model's {num_layers} blocks.")


def padded_steps(blocks: Sequence[int], size: int) -> tuple[np.ndarray, np.ndarray]:
  """`blocks` as scan steps: `index` `[size]` int32 and `valid` `[size]` bool."""
  if len(blocks) > size:
    raise ValueError(f"{len(blocks)} blocks do not fit in {size} steps.")
  index = np.zeros(size, np.int32)
  index[:len(blocks)] = blocks
  return index, np.arange(size) < len(blocks)


def stacked_steps(block_lists: Sequence[Sequence[int]], size: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Several block lists as steps `[M, size]` (one vmapped batch of variants)."""
  pairs = [padded_steps(blocks, size) for blocks in block_lists]
  if not pairs:
    return np.zeros((0, size), np.int32), np.zeros((0, size), bool)
  return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


@dataclasses.dataclass(frozen=True)
class KeepPlan:
  """The blocks a variant keeps (0-based, ascending) out of `num_layers`."""
  num_layers: int
  kept: tuple[int, ...]

  @classmethod
  def full(cls, num_layers: int) -> "KeepPlan":
    return cls(num_layers, tuple(range(num_layers)))

  @classmethod
  def from_mask(cls, keep, num_layers: int | None = None) -> "KeepPlan":
    """From a boolean vector over blocks (None keeps every block of `num_layers`)."""
    if keep is None:
      if num_layers is None:
        raise ValueError("keep=None needs num_layers.")
      return cls.full(num_layers)
    arr = np.asarray(keep)
    n = arr.shape[0] if num_layers is None and arr.ndim == 1 else num_layers
    if arr.dtype != bool or arr.shape != (n,):
      raise ValueError(
          f"keep must be a boolean vector of length {n} (one entry per block), got "
          f"dtype {arr.dtype} and shape {arr.shape}. To keep blocks by index, pass "
          "dpjax.keep_mask(indices, num_layers).")
    if not arr.any():
      raise ValueError("keep removes every block; keep at least one block.")
    return cls(int(n), tuple(int(b) for b in np.flatnonzero(arr)))

  @classmethod
  def from_kept(cls, kept_blocks: Sequence[int], num_layers: int) -> "KeepPlan":
    """From 0-based kept block indices (any order; checked for range and repeats)."""
    kept = [int(i) for i in kept_blocks]
    bad = [i for i in kept if not 0 <= i < num_layers]
    if bad:
      raise ValueError(f"kept block indices {bad} are out of range for a model with "
                       f"{num_layers} blocks (valid: 0..{num_layers - 1}).")
    repeated = sorted({i for i in kept if kept.count(i) > 1})
    if repeated:
      raise ValueError(f"kept block indices {repeated} are repeated; list each block once.")
    if not kept:
      raise ValueError("the kept set is empty; keep at least one block.")
    return cls(num_layers, tuple(sorted(kept)))

  @property
  def mask(self) -> np.ndarray:
    """`[L]` bool keep vector."""
    mask = np.zeros(self.num_layers, bool)
    mask[list(self.kept)] = True
    return mask

  @property
  def num_kept(self) -> int:
    return len(self.kept)

  @property
  def removed(self) -> tuple[int, ...]:
    return tuple(b for b in range(self.num_layers) if b not in set(self.kept))

  @property
  def is_full(self) -> bool:
    return self.num_kept == self.num_layers

  @property
  def bucket(self) -> int:
    """The kept-count bucket this plan is grouped into."""
    return bucket_size(self.num_kept, self.num_layers)

  def steps(self, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Gathered-loop inputs `index`, `valid` `[size]` (default size: every block, one
    shape for every plan)."""
    return padded_steps(self.kept, self.num_layers if size is None else size)

  def tail(self, position: int) -> tuple[int, ...]:
    """The kept blocks after the one at `position` (what a drop-one candidate still runs)."""
    return self.kept[position + 1:]

  def without(self, block: int) -> "KeepPlan":
    if block not in self.kept:
      raise ValueError(f"block {block} is not in the kept set {list(self.kept)}.")
    return KeepPlan(self.num_layers, tuple(b for b in self.kept if b != block))

  @property
  def hidden_source(self) -> np.ndarray:
    """`[L+1]` int32: layer `l`'s residual is entry `hidden_source[l]` of
    `[h_0, output of step 1, ...]` (the last kept block at or before `l`)."""
    return np.concatenate([[0], np.cumsum(self.mask)]).astype(np.int32)


def keep_mask(kept_blocks: Sequence[int], num_layers: int) -> np.ndarray:
  """`[layers]` bool keep vector from 0-based kept block indices (checked)."""
  return KeepPlan.from_kept(kept_blocks, num_layers).mask


def layers_from_steps(first, per_step, index, valid, num_layers: int, fill=jnp.nan):
  """Per-layer values `[L+1, ...]` from `first` (layer 0) and `per_step` `[n, ...]`.

  Step `s` lands at layer `1 + index[s]` when valid; every other block layer
  holds `fill` (a removed block, or padding). Runs under jit and vmap.
  """
  # Invalid steps are written past the end, where mode="drop" discards them.
  target = jnp.where(valid, 1 + index, num_layers + 1)

  def place(f, s):
    out = jnp.full((num_layers + 1, *f.shape), fill, s.dtype).at[0].set(f)
    return out.at[target].set(s, mode="drop")

  return jax.tree.map(place, first, per_step)
