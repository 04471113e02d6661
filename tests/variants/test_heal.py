"""LoRA healing: the merged weights against the unmerged adapters run independently (torch
hooks on HF's layers), resuming, and a collapsed variant of the bundled model healed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import dpjax
from dpjax.bundled import BUNDLED_MODEL
from dpjax.checkpoints.export import export
from dpjax.variants import heal

KEPT = [0, 3, 7, 11, 15]


@pytest.fixture(scope="module")
def pruned_export(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("pruned") / "model")
  export(BUNDLED_MODEL, out, kept_blocks=KEPT)
  return out


def test_merged_weights_equal_the_unmerged_adapters_run_in_torch(pruned_export):
  import torch
  import transformers
  healing = heal.Healing(steps=1, rank=4, alpha=8.0)
  pruned = dpjax.load_model(pruned_export, dtype="float32")
  adapters = heal.init_adapters(pruned.params(), healing)
  rng = np.random.default_rng(0)
  adapters = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape,
                                                                               np.float32),
                          adapters)  # B nonzero, so the adapters change the output
  merged = jax.tree.map(np.asarray, heal.merge(pruned.params(), adapters, healing))
  ids = np.array([[1, 17, 40, 99, 3, 250, 8, 61], [5, 9, 33, 2, 400, 7, 7, 12]])
  got = np.asarray(dpjax.DecoderModel(pruned.config, merged).logits(ids), np.float64)
  # Unmerged, in torch: each adapted Linear's output plus scale * (x @ A) @ B.
  hf = transformers.AutoModelForCausalLM.from_pretrained(pruned_export,
                                                         dtype=torch.float32).eval()
  scale = healing.alpha / healing.rank
  names = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
  for layer, block in enumerate(hf.model.layers):
    for name, ab in adapters.items():
      a = torch.as_tensor(ab["a"][layer])
      b = torch.as_tensor(ab["b"][layer])
      getattr(block.mlp, names[name]).register_forward_hook(
          lambda mod, inp, out, a=a, b=b: out + scale * (inp[0] @ a) @ b)
  with torch.no_grad():
    want = hf(input_ids=torch.as_tensor(ids)).logits.double().numpy()
  base = np.asarray(pruned.logits(ids), np.float64)
  assert np.abs(want - base).max() > 1e-2  # the adapters matter
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_a_killed_healing_resumes_to_the_same_adapters(pruned_export, tmp_path):
  pruned = dpjax.load_model(pruned_export, dtype="float32")
  teacher = dpjax.load_model(BUNDLED_MODEL, dtype="float32")
  data = np.random.default_rng(1).integers(3, 500, size=(40, 16))
  short = heal.Healing(steps=4, batch_size=4, seq_len=16, checkpoint_every=2)
  heal.heal(pruned, teacher, None, data, short, state_dir=str(tmp_path / "s"), progress=False)
  longer = heal.Healing(steps=6, batch_size=4, seq_len=16, checkpoint_every=2)
  resumed, losses = heal.heal(pruned, teacher, None, data, longer,
                              state_dir=str(tmp_path / "s"), progress=False)
  fresh, fresh_losses = heal.heal(pruned, teacher, None, data, longer, progress=False)
  assert len(losses) == 6 and losses[0] > 0
  np.testing.assert_allclose(losses, fresh_losses, rtol=1e-5)
  for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(fresh)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)


def test_healing_a_collapsed_variant_raises_its_held_out_accuracy(tmp_path):
  result = subprocess.run([sys.executable, "-m", "dpjax.cli.prune", "--target_blocks=3",
                           "--num_items=96", "--calibration_items=16", "--heal_steps=120",
                           f"--output_dir={tmp_path}"], capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / "pruning_plan.json") as f:
    plan = json.load(f)
  before = plan["accuracy"]["pruned"]["heldout"]["accuracy"]
  after = plan["healing"]["accuracy"]["heldout"]["accuracy"]
  unpruned = plan["accuracy"]["unpruned"]["heldout"]["accuracy"]
  assert before < unpruned - 0.2  # collapsed: 3 of 16 blocks kept
  assert after > before
  # Recomputed from the healed model's per-item outcomes (the study's evaluation items).
  with open(tmp_path / "healed_outcomes.jsonl") as f:
    healed = {r["id"]: r["correct"] for r in map(json.loads, f)}
  with open(tmp_path / "study" / "items.jsonl") as f:
    assert list(healed) == [json.loads(line)["id"] for line in f]
  assert after == pytest.approx(np.mean([healed[i] for i in plan["items"]["heldout_ids"]]),
                                abs=1e-6)
  assert plan["healing"]["loss_last"] < plan["healing"]["loss_first"]
  assert os.path.isfile(tmp_path / "healed" / "config.json")
  assert plan["healing"]["export"]["verification"]["blocks_loaded"] == 3
  # The accuracy-throughput table: the three models, their held-out accuracies as above,
  # throughput measured for each (the healed weights on their own).
  rows = {r["variant"]: r for r in plan["throughput"]["rows"]}
  assert sorted(rows) == ["healed", "pruned", "unpruned"]
  assert [rows[v]["blocks"] for v in ("unpruned", "pruned", "healed")] == [16, 3, 3]
  assert [rows[v]["heldout_accuracy"] for v in ("unpruned", "pruned", "healed")] == [
      unpruned, before, after]
  assert rows["unpruned"]["decode_speedup"] == 1.0
  assert all(r["decode_tokens_per_second"] > 0 and r["prefill_tokens_per_second"] > 0
             for r in rows.values())
  assert rows["pruned"]["weights_mb"] == rows["healed"]["weights_mb"] < rows["unpruned"][
      "weights_mb"]
  import csv
  with open(tmp_path / "accuracy_throughput.csv") as f:
    table = list(csv.DictReader(f))
  assert [r["variant"] for r in table] == ["unpruned", "pruned", "healed"]
  assert float(table[2]["decode_tokens_per_second"]) == pytest.approx(
      rows["healed"]["decode_tokens_per_second"])
  assert os.path.getsize(tmp_path / "accuracy_throughput.png") > 5000


def test_last_blocks_healing_trains_the_head_and_the_last_blocks_only(pruned_export):
  """The "Reassessing Layer Pruning" baseline: the head and the last 3 kept blocks move,
  every other weight is the pruned model's, bit for bit; the loss falls; the composed
  weights run by the plain model give the logits training saw."""
  pruned = dpjax.load_model(pruned_export, dtype="float32")
  teacher = dpjax.load_model(BUNDLED_MODEL, dtype="float32")
  data = np.random.default_rng(2).integers(3, 500, size=(64, 16))
  healing = heal.Healing(steps=12, batch_size=8, seq_len=16, method="last_blocks",
                         learning_rate=3e-3)
  assert heal.Healing(steps=1, method="last_blocks").learning_rate == 1e-4
  trained, losses = heal.heal(pruned, teacher, None, data, healing, progress=False)
  assert losses[-1] < losses[0]
  before = pruned.params()
  after = jax.tree.map(np.asarray, heal.compose(before, trained, healing))
  K = len(KEPT)
  for name, w in before["blocks"].items():
    np.testing.assert_array_equal(after["blocks"][name][:K - 3], np.asarray(w)[:K - 3])
    assert np.abs(after["blocks"][name][K - 3:] - np.asarray(w)[K - 3:]).max() > 0, name
  for name in ("final_norm", "lm_head"):
    assert np.abs(after[name] - np.asarray(before[name])).max() > 0, name
  np.testing.assert_array_equal(after["embed"], np.asarray(before["embed"]))  # untied: frozen
  ids = data[:2]
  got = np.asarray(dpjax.DecoderModel(pruned.config, after).logits(ids), np.float64)
  want = np.asarray(heal.adapted_logits(pruned, before, trained, healing, ids,
                                        np.ones(ids.shape, np.int32)), np.float64)
  assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
  with pytest.raises(ValueError, match="heal_last_blocks=9"):
    heal.init_trainable(before, heal.Healing(steps=1, method="last_blocks", last_blocks=9))
