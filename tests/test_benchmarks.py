"""Smoke test of `python -m benchmarks.run --quick`: it runs, and its correctness checks pass.

No timing is asserted: the figures belong in benchmarks/RESULTS.md, not in tests.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from benchmarks.reference import HFIterativeReference
from benchmarks import reference
from dpjax.tasks import synthetic
from dpjax import tasks


def test_quick_run_checks_dpjax_against_the_reference(tmp_path):
  result = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick",
                           f"--out_dir={tmp_path}"], capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  cases = {c["case"]: c for c in results["iterative"]}
  # Both models ran, and each matched the HF reference's sequence and margins.
  assert set(cases) == {"bundled model", "random Llama"}
  for case in cases.values():
    assert case["removed_order"] == case["reference_removed_order"]
    assert case["max_mean_margin_difference"] <= 1e-4
    assert len(case["removed_order"]) == case["layers"] - case["min_layers"]
    assert case["block_evaluations"]["executed"] >= case["block_evaluations"]["minimum"]
  assert [r["blocks_removed"] for r in results["serving"]["rows"]] == [0, 1, 2]
  assert [r["masks"] for r in results["scaling"]["by_masks"]] == [1, 4, 16]
  markdown = (tmp_path / "RESULTS.md").read_text()
  assert "Iterative Pruning against HF PyTorch" in markdown and "random Llama" in markdown


def test_reference_readouts_are_hf_hidden_states_through_the_lens(tmp_path):
  """The reference's lens equals HF's own logits at the last layer, and norm + lm_head of
  the returned hidden states elsewhere (computed here from `hf_forward`)."""
  import torch
  tokenizer = synthetic.build_tokenizer(synthetic.training_text(synthetic.generate("train", 200)),
                                        300)
  config = dict(reference.VARIANTS["llama_gqa_tied_sharded"].config, vocab_size=len(tokenizer))
  model = reference.build_hf_model("llama", config, seed=2).eval()
  items = synthetic.generate("test", 6)
  encoded = tasks.encode(tokenizer, items, [tasks.prompt(i) for i in items])
  batch_list = tasks.batches(encoded, 4, tokenizer.pad_token_id)
  ref = HFIterativeReference(model, batch_list)
  kept = [0, 2]
  z, lse, answer = ref.readouts(kept)
  assert z.shape == (3, 6, 4) and np.array_equal(np.sort(answer), np.sort(encoded.answer))

  pruned = reference.delete_blocks(reference.build_hf_model("llama", config, seed=2),
                                      np.array([True, False, True, False]))
  batch = batch_list[0]
  logits, hidden = reference.hf_forward(pruned.eval(), batch.input_ids, batch.attention_mask)
  with torch.no_grad():
    h = torch.as_tensor(hidden[:, :, -1])
    lens = pruned.lm_head(torch.cat([pruned.model.norm(h[:-1]), h[-1:]])).double().numpy()
  lens[-1] = logits[:, -1]
  want = np.take_along_axis(lens, batch.letter_ids[None], axis=-1)
  np.testing.assert_allclose(z[:, :4], want, atol=1e-4)
