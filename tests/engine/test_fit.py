"""The fit step: the study's programs compiled ahead of time, their memory against the device's."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import transformers

import dpjax
from dpjax import tasks
from dpjax.engine import fit
from dpjax.lens.readout import Lens
from dpjax.tasks import synthetic


@pytest.fixture(scope="module")
def setup(synthetic_model_dir):
  model = dpjax.load_model(synthetic_model_dir)
  tokenizer = transformers.AutoTokenizer.from_pretrained(synthetic_model_dir)
  items = synthetic.generate("test", 40)
  return model, tasks.encode(tokenizer, items, [tasks.prompt(item) for item in items])


def test_a_lower_memory_limit_gets_a_smaller_chunking(setup):
  """With room to spare the fit takes the top of every accelerator ladder (all masks of a
  call vmapped, 8 candidates, 32 rows); below that program's memory it walks down, and
  what it picks fits."""
  model, encoded = setup
  lens = Lens("letter")
  roomy = fit.fit_study(model, None, [encoded], lens, None, platform="gpu", budget=10**12,
                        mask_chunk=4)
  assert roomy.chunking == fit.Chunking(32, None, 8, 4) and roomy.tried == []
  peaks = {name: m.peak for name, m in roomy.memory.items()}
  assert set(peaks) == set(fit.PROGRAMS) and min(peaks.values()) > 0
  budget = int(max(peaks.values()) * 0.4)
  tight = fit.fit_study(model, None, [encoded], lens, None, platform="gpu", budget=budget,
                        mask_chunk=4)
  chosen = tight.chunking
  assert max(m.peak for m in tight.memory.values()) <= budget
  assert (chosen.masks_in_flight is not None or chosen.candidates < 8
          or chosen.rows_per_shard < 32)
  assert tight.tried and tight.tried[0].startswith("32 rows per data shard, all masks")
  # The largest program of the roomy chunking needs more than the tight one allows.
  assert max(peaks.values()) > budget


def test_nothing_fits_names_the_setting_to_change(setup):
  model, encoded = setup
  with pytest.raises(fit.DoesNotFit, match=r"You fixed --batch_size=32, --masks_in_flight=1, "
                                          r"--candidates_per_call=1; lower it"):
    fit.fit_study(model, None, [encoded], Lens("letter"), None, platform="gpu",
                  batch_size=32, masks_in_flight=1, candidates=1, budget=10_000)


def test_the_cpu_walks_rows_and_candidates_only():
  rows, in_flight, candidates, fixed = fit.ladders("cpu", batch_size=0, masks_in_flight=0,
                                                   candidates=0, data_size=2)
  assert rows[0] == fit.CPU_ROWS and in_flight == (1,) and candidates[0] == 8 and fixed == {}
  rows, in_flight, candidates, fixed = fit.ladders("tpu", batch_size=64, masks_in_flight=4,
                                                   candidates=0, data_size=4)
  assert rows == (16,) and in_flight == (4,) and candidates == fit.CANDIDATES_LADDER
  assert fixed == {"batch_size": 64, "masks_in_flight": 4}


def _ladder_walk(rows, in_flight, candidates):
  """Every rung in the order the search walks them (masks in flight, then candidates with
  the fewest masks in flight, then rows)."""
  for r in rows:
    yield from ((r, f, candidates[0]) for f in in_flight)
    yield from ((r, in_flight[-1], c) for c in candidates[1:])


def test_the_search_compiles_what_it_must_and_chooses_what_the_full_walk_chooses():
  """A chunking is refused by its first program that does not fit (none of its others is
  compiled); a program holding several masks that refuses the top of the masks-in-flight
  ladder is compiled at its bottom and the rungs between are predicted from the two, not
  compiled. The choice is the full walk's (every rung, every program)."""
  gb = 10**9

  def memory(name, chunking):  # the weights, and activations linear in masks and rows
    per_member = {"readout": 1.0, "readout_final": 0.8, "tails": 1.5, "tails_layers": 1.6}
    live = fit.live_members(name, chunking)
    activations = (0.5 + per_member.get(name, 0.0) * live) * chunking.rows_per_shard / 8
    return fit.ProgramMemory(2 * gb, 0, int(activations * gb))

  compiled = []

  def measure(name, chunking):
    compiled.append(fit.program_key(name, chunking))
    return memory(name, chunking)

  budget = 10 * gb
  rows, in_flight, candidates, _ = fit.ladders("gpu", batch_size=0, masks_in_flight=0,
                                               candidates=0, data_size=1)
  found = fit.search(measure, budget, rows=rows, in_flight=in_flight, candidates=candidates,
                     mask_chunk=16, fixed={})
  walk = [fit.Chunking(r, f, c, 16) for r, f, c in _ladder_walk(rows, in_flight, candidates)]
  first = next(ch for ch in walk if all(memory(n, ch).peak <= budget for n in fit.PROGRAMS))
  assert found.chunking == first == fit.Chunking(16, 2, 8, 16)
  walked = walk[:walk.index(first) + 1]
  assert len(walked) == 12 and len(set(compiled)) == 16  # the full walk: 12 x 6 programs
  # 16 rows: all masks in flight refused, then 1 compiled, then 2 predicted to fit.
  assert ("tails_layers", 16, 1, 8) in compiled and ("tails_layers", 16, 8, 8) not in compiled
  assert any("predicted at" in line and "not compiled" in line for line in found.tried)


def test_the_fit_compiles_each_program_shape_once(setup):
  """Walking down the ladders compiles a program again only where its shapes change (the
  stream program once per rows) and no other program of a chunking one has refused:
  every compilation the process makes is one the fit step counts, far fewer than every
  program at every chunking compiled."""
  from dpjax.engine import compilation
  model, encoded = setup
  lens = Lens("letter")
  roomy = fit.fit_study(model, None, [encoded], lens, None, platform="gpu", budget=10**12,
                        mask_chunk=4)
  assert roomy.compilations == len(fit.PROGRAMS)
  budget = int(max(m.peak for m in roomy.memory.values()) * 0.4)
  jax.clear_caches()  # what an earlier fit compiled at these shapes is compiled again
  counter = compilation.CompileCounter()
  tight = fit.fit_study(model, None, [encoded], lens, None, platform="gpu", budget=budget,
                        mask_chunk=4)
  assert counter.programs == tight.compilations
  chunkings = sum(1 for line in tight.tried if "not compiled" not in line) + 1
  assert chunkings > 1 and tight.compilations < chunkings * len(fit.PROGRAMS)
