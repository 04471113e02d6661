"""The fit step: the study's programs compiled ahead of time, their memory against the device's."""

from __future__ import annotations

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
