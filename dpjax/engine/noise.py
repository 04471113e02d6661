"""The noise probe's engine: final readouts of many noised variants of the unpruned model.

A variant is a per-block noise scale `[L]` (`eps` after each block, 0 for none) and a
noise seed; every block is kept. All variants of a study run as one batch, with the
noise an input of the block scan (`Transformer.scan_blocks(noise=...)`,
`ResidualNoise`), never a second copy of the model:

* Per item batch, the unpruned model's residual stream is computed once (the sweep's
  `stream` program). Up to its first noised block `b` a variant is the unpruned model,
  so it starts from the stream after block `b`, adds block `b`'s noise and runs only
  blocks `b+1..L` with theirs (a profile variant noised after block 15 of 16 runs one
  block), as the sweep's pruned variants resume from it.
* One program (`noise_tails_program`) runs a group of variants, vmapped (`in_flight` at
  a time, `readout.map_masks`), grouped by how many blocks they still run as the
  sweep groups its tails (`sweep.step_groups`, `--candidates_per_call` a call), so a
  group's loops are alike and a few compiled programs serve every group of every batch.
  It reads only the final layer's option logits through the sweep's lens, the last
  block's attention output and MLP only at the positions the lens reads.

The noise a row gets depends on the variant's seed, the row's item index (its place
in the item set, items.jsonl order), the block and the token's position only
(`noise_row_keys`, `noise_draw`), never on the batch size, the padding or the other
variants, so a variant's outcomes are reproducible and its noise can be regenerated
outside the engine. Batches run without a shared prefix (`Batch.unshared()`): a
prefix computed once for every row would get one row's noise. A batch whose rows
shared one then runs in parts of fewer rows (`unshared_parts`), so that no part holds
more tokens than the shared batch did (the fit step sized the programs for that).
"""

from __future__ import annotations

import dataclasses
import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from dpjax.engine.devices import fetch
from dpjax.engine.progress import Progress
from dpjax.engine.sweep import executed_steps, step_groups
from dpjax.lens.readout import Lens, Readout, Reads, map_masks, packing, read_rows
from dpjax.model.plan import KeepPlan, stacked_steps
from dpjax.model.transformer import ResidualNoise, add_residual_noise, noise_row_keys
from dpjax.tasks import Batch

# A batch's per-row fields (`[B, ...]`), sliced together when a batch runs in parts.
ROW_FIELDS = ("input_ids", "attention_mask", "letter_ids", "answer", "index", "positions",
              "segments", "read_index", "read_target", "read_option", "option_bytes")


def unshared_parts(batch: Batch, data_size: int = 1) -> list[Batch]:
  """`batch`'s rows as whole prompts (`Batch.unshared()`): the batch itself when it has no
  shared prefix, else in parts of equal rows (a divisor of its rows and a multiple of
  `data_size`, the devices along the data axis), the most rows whose tokens are no more
  than the shared batch's (its rows plus the prefix row)."""
  whole = batch.unshared()
  if batch.prefix_ids is None:
    return [whole]
  rows, width = whole.input_ids.shape
  budget = batch.input_ids.size + batch.prefix_ids.size
  sizes = [r for r in range(rows, 0, -1) if rows % r == 0 and r % data_size == 0] or [rows]
  size = next((r for r in sizes if r * width <= budget), sizes[-1])
  return [dataclasses.replace(whole, **{name: getattr(whole, name)[start:start + size]
                                        for name in ROW_FIELDS
                                        if getattr(whole, name) is not None})
          for start in range(0, rows, size)]


def row_positions(attention_mask, packed_positions=None):
  """`[B, T]` the position each column's noise is keyed by: the batch's own positions
  (packed cloze rows), else a left-padded row's real tokens counted from 0 (as
  `Transformer.attention_context` counts them; padding is keyed as position 0)."""
  if packed_positions is not None:
    return packed_positions
  return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)


def _noised_tails(graphdef, lens: Lens, in_flight, state, translators, stream, starts,
                  attention_mask, packed, reads: Reads, items, block_index, block_valid,
                  scales, seeds) -> Readout:
  """Final readouts `[C, B, K]` / `[C, B]` of variants resuming from the unpruned stream.

  Variant `c` starts from `stream[starts[c]]` (`stream` `[L+1, B, T, d]`: `h_0` and the
  output of every block), the output of its first noised block `starts[c]` (1-based;
  `L` for a variant without noise), adds that block's noise, then runs the steps
  `block_index[c]` `[C, n]` with its scales `scales[c]` `[L]` and seed `seeds[c]`.
  `items` `[B]`: the rows' item indices (-1: filler).
  """
  module = nnx.merge(graphdef, state)
  ctx = module.attention_context(attention_mask, *packed)
  unembed = lens.unembedding(module)
  num_layers = module.cfg.num_layers
  positions = row_positions(attention_mask, packed[0])
  rows, reads_in_rows = read_rows(lens, reads, attention_mask)
  h_start = jnp.take(stream, starts, axis=0)

  def one(h, start, index, valid, scale, seed):
    noise = ResidualNoise(scale, noise_row_keys(seed, items), positions)
    h = add_residual_noise(h, start, noise)
    h, _ = module.scan_blocks(h, ctx, index, valid, rows=rows, noise=noise)
    # The model's own output: its head (translator row L is zero), as every final readout.
    return lens(module, unembed, h, reads_in_rows, num_layers, translators)

  return map_masks(one, in_flight, h_start, starts, block_index, block_valid, scales, seeds)


@functools.lru_cache(maxsize=16)
def noise_tails_program(graphdef, lens: Lens, in_flight: int | None):
  """The jitted program of one group of variants on one batch (the same for the same
  arguments, so every probe of one model shares its compilations)."""
  return jax.jit(functools.partial(_noised_tails, graphdef, lens, in_flight))


def first_noised(scales: np.ndarray) -> np.ndarray:
  """`[V]` the first block (1-based) each variant of `scales` `[V, L]` noises; `L` for a
  variant without noise (it reads the unpruned model's output)."""
  noised = scales > 0
  return np.where(noised.any(1), np.argmax(noised, axis=1) + 1, scales.shape[1])


def noised_readouts(sweep, scales: np.ndarray, seeds, description: str = "noise probe"
                    ) -> Readout:
  """Final readouts `[V, N, K]` / `[V, N]` (cloze: with `option_logprob`) of noised
  variants of the unpruned model on `sweep`'s items.

  Args:
    sweep: a `dpjax.engine.sweep.Sweep` (its model, items, batches, lens, translators,
      placement, `candidates` per call and `in_flight`); its counters count the blocks
      run.
    scales: `[V, L]` `eps` after each block (0: no noise after it; `eps^2` is the
      level).
    seeds: `[V]` int noise seeds.
  """
  num_layers = sweep.num_layers
  scales = np.asarray(scales, np.float32)
  seeds = np.asarray(seeds, np.int32)
  if scales.ndim != 2 or scales.shape[1] != num_layers or seeds.shape != scales.shape[:1]:
    raise ValueError(f"scales must be [V, {num_layers}] and seeds [V]; got {scales.shape} and "
                     f"{seeds.shape}.")
  if not np.all(np.isfinite(scales)) or (scales < 0).any():
    raise ValueError(f"noise scales must be finite and >= 0; got values from {scales.min()} to "
                     f"{scales.max()}.")
  encoded = sweep.encoded
  v, n, k = len(scales), len(encoded.items), encoded.num_option_columns
  options = np.full((v, n, k), np.nan, np.float32)
  normalizers = np.full((v, n), np.nan, np.float32)
  logprobs = options.copy() if encoded.format == "cloze" else None
  starts = first_noised(scales)
  tails = [tuple(range(int(s), num_layers)) for s in starts]  # 0-based blocks after the start
  groups = step_groups(range(v), [len(t) for t in tails], num_layers, sweep.candidates,
                       pad=sweep.in_flight is not None)
  program = noise_tails_program(sweep.model.graphdef, sweep.lens, sweep.in_flight)
  stream_index, stream_valid = KeepPlan.full(num_layers).steps()
  zero = np.zeros(num_layers, np.float32)
  put = sweep._put
  data_size = 1 if sweep.placement is None else sweep.placement.data_size
  # A row's noise is its own: no prefix computed once for every row.
  parts = [part for batch in sweep.batches for part in unshared_parts(batch, data_size)]
  bar = Progress(len(parts), description, enabled=sweep.progress)
  for batch in parts:
    real = batch.index >= 0
    items = batch.index[real]
    rows = len(batch.index)
    mask = put(batch.attention_mask)
    packed, reads = packing(batch, put), Reads.of(batch, put)
    index_of_rows = put(batch.index.astype(np.int32))
    stream = sweep.programs.stream(sweep.model.state, put(batch.input_ids), mask, packed, None,
                                   stream_index, stream_valid)
    sweep.counters.executed += num_layers * rows
    sweep.counters.minimum += num_layers * rows
    for _, group in groups:
      index, valid = stacked_steps([() if m is None else tails[m] for m in group], num_layers)
      out = program(sweep.model.state, sweep.translators, stream,
                    np.array([num_layers if m is None else starts[m] for m in group], np.int32),
                    mask, packed, reads, index_of_rows, index, valid,
                    np.stack([zero if m is None else scales[m] for m in group]),
                    np.array([0 if m is None else seeds[m] for m in group], np.int32))
      lengths = [0 if m is None else len(tails[m]) for m in group]
      sweep.counters.executed += executed_steps(lengths, sweep.in_flight) * rows
      sweep.counters.minimum += sum(lengths) * rows
      sweep.counters.naive += num_layers * sum(m is not None for m in group) * rows
      chosen = [g for g, m in enumerate(group) if m is not None]  # not the filler members
      members = np.array([group[g] for g in chosen])
      for target, value in ((options, out.option_logits), (normalizers, out.log_normalizer),
                            (logprobs, out.option_logprob)):
        if target is None:
          continue
        value = fetch(value)[chosen][:, real]
        target[members[:, None], items[None, :]] = value[..., :k] if value.ndim == 3 else value
    bar.update()
  bar.close()
  return Readout(options, normalizers, logprobs)
