"""dpjax-prune: the smallest variant within a budget, judged on held-out items, exported,
reloaded by transformers, and reproduced bit for bit from its plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dpjax.study import statistics
from dpjax.variants import budget
from dpjax.variants import export as variant_export


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("pruned"))
  result = subprocess.run([sys.executable, "-m", "dpjax.cli.prune", "--max_drop=0.05",
                           "--num_items=128", "--calibration_items=32", "--nothroughput",
                           "--gguf", f"--output_dir={out}"],
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(out, budget.PLAN_FILE)) as f:
    return out, json.load(f)


def test_the_export_has_fewer_blocks_and_transformers_loads_it(pruned):
  import torch
  import transformers
  from tests.support import reference
  out, plan = pruned
  kept = plan["kept_blocks"]
  assert 0 < len(kept) < plan["source"]["num_layers"] == 16
  hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(out, "model"),
                                                         dtype=torch.float32)
  assert hf.config.num_hidden_layers == len(kept) == len(hf.model.layers)
  # The export's logits are the source model's with only the kept blocks (dpjax's own,
  # recomputed here, not read from the plan).
  import dpjax
  model = dpjax.load_model(dpjax.bundled.BUNDLED_MODEL)
  ids = np.array([[1, 17, 40, 99, 3, 250, 8]])
  want = np.asarray(model.logits(ids, keep=dpjax.keep_mask(kept, 16)))
  with torch.no_grad():
    got = hf(input_ids=torch.as_tensor(ids)).logits.numpy()
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
  assert plan["export"]["verification"]["max_relative_difference"] <= 1e-5  # recorded
  # The GGUF file beside it (written from the exported weights): transformers' GGUF loading
  # reads the same logits, and the same tokenizer.
  gguf = plan["export"]["gguf"]
  assert gguf["file"] == "model.gguf" and gguf["verification"]["tokenizer"]["same_ids"]
  from_gguf = reference.load_hf_gguf(os.path.join(out, "model.gguf"))  # dense, as dpjax
  assert from_gguf.config.num_hidden_layers == len(kept)
  with torch.no_grad():
    got = from_gguf(input_ids=torch.as_tensor(ids)).logits.numpy()
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_the_choice_and_the_held_out_drop_recompute_from_variants_jsonl(pruned):
  out, plan = pruned
  study = os.path.join(out, plan["method"]["study"])
  with open(os.path.join(study, "items.jsonl")) as f:
    ids = [json.loads(line)["id"] for line in f]
  with open(os.path.join(study, "variants.jsonl")) as f:
    records = [json.loads(line) for line in f]
  full = next(r for r in records if r["method"] == "unpruned")
  curve = [r for r in records if r["method"] == "iterative_accuracy"]
  sel = [ids.index(i) for i in plan["items"]["selection_ids"]]
  held = [ids.index(i) for i in plan["items"]["heldout_ids"]]
  assert not set(sel) & set(held) and len(sel) + len(held) == len(ids) == 128
  outcome = lambda r, idx: np.array([r["correct"][i] == "1" for i in idx], float)
  # The walk from the fewest blocks removed, stopping at the first point whose paired upper
  # bound (Tango's score interval) on the selection items passes 0.05.
  walk = sorted(curve, key=lambda r: -len(r["kept"]))
  passed = []
  for r in walk:
    if statistics.paired_interval(outcome(full, sel), outcome(r, sel))[1][1] > 0.05:
      break
    passed.append(r)
  assert passed and plan["kept_blocks"] == passed[-1]["kept"]
  variant = next(r for r in curve if r["kept"] == plan["kept_blocks"])
  drop = outcome(full, held).mean() - outcome(variant, held).mean()
  assert plan["accuracy"]["drop"]["heldout"]["drop"] == pytest.approx(drop, abs=1e-6)
  assert plan["accuracy"]["pruned"]["heldout"]["accuracy"] == pytest.approx(
      outcome(variant, held).mean(), abs=1e-6)
  # Within the budget on the held-out items too (the plan says whether it is).
  assert plan["budget"]["holds_on_heldout"] == (plan["accuracy"]["drop"]["heldout"]["upper95"]
                                                <= 0.05)
  assert drop <= 0.05


def test_the_plan_records_provenance(pruned):
  _, plan = pruned
  assert plan["source"]["fingerprint"] and len(plan["source"]["fingerprint"]) == 64
  assert plan["removed_blocks"] == sorted(set(range(16)) - set(plan["kept_blocks"]))
  assert len(plan["items"]["calibration_ids"]) == 128 and plan["items"]["task"] == "synthetic"
  assert plan["command"].startswith("dpjax-prune ") and "--max_drop=0.05" in plan["command"]
  assert set(plan["export"]["files"]) >= {"config.json", "model.safetensors"}


def test_a_second_run_from_the_plan_alone_gives_identical_weights(pruned, tmp_path):
  out, plan = pruned
  result = subprocess.run([sys.executable, "-m", "dpjax.cli.prune",
                           f"--plan={os.path.join(out, budget.PLAN_FILE)}",
                           f"--output_dir={tmp_path}"], capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  for name, digest in plan["export"]["files"].items():
    import hashlib
    with open(tmp_path / "model" / name, "rb") as f:
      assert hashlib.sha256(f.read()).hexdigest() == digest, name


def test_the_walk_stops_at_the_first_failure_where_skipping_would_go_deeper():
  """A curve whose third point fails the budget and whose fourth passes: the fixed-sequence
  walk chooses the second point; taking the fewest blocks among all that pass (the old
  rule) would have chosen the fourth, favoured by chance past a failure."""
  n = 60
  full = np.ones(n, int)
  def point(blocks, wrong):
    outcomes = np.ones(n, int)
    outcomes[:wrong] = 0
    return {"kept": list(range(blocks)), "correct": "".join(map(str, outcomes)),
            "method": "iterative_accuracy"}
  curve = [point(15, 0), point(14, 0), point(13, 4), point(12, 0)]
  unpruned = {"kept": list(range(16)), "correct": "1" * n, "method": "unpruned"}
  s = budget.PruneSettings(max_drop=0.08)
  chosen, table = budget.choose(unpruned, curve, np.arange(n), s)
  assert [row["upper95"] <= 0.08 for row in table] == [True, True, False, True]
  assert chosen["kept"] == list(range(14))
  assert [row["walk"] for row in table] == ["within", "within",
                                            "first failure: the walk stops", "not tested"]
  # 0 and 1 discordant of 60 still bound the drop away from 0 (a percentile bootstrap
  # gave 0 and 0.05).
  assert 0.05 < table[0]["upper95"] < 0.07
  assert 0.08 < budget._drop(full, np.r_[0, np.ones(n - 1, int)], 0)["upper95"] < 0.1


def test_a_bad_budget_is_refused_with_what_to_do(tmp_path):
  result = subprocess.run([sys.executable, "-m", "dpjax.cli.prune",
                           f"--output_dir={tmp_path / 'out'}"], capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 1 and "dpjax-prune: error: give one budget" in result.stderr
  assert not os.path.exists(tmp_path / "out")
  with pytest.raises(ValueError, match="give one budget"):
    budget.PruneSettings(max_drop=0.05, target_blocks=8)
  from tests.support import reference
  gemma2 = reference.save_variant("gemma2_softcap_window", str(tmp_path / "gemma2"))
  with pytest.raises(ValueError, match="HF 'gemma2' checkpoint is not built"):
    budget.prune(budget.PruneSettings(model=gemma2, max_drop=0.05, gguf=True,
                                      output_dir=str(tmp_path / "g")))
  assert not os.path.exists(tmp_path / "g")  # refused before the study
  with pytest.raises(ValueError, match="--max_drop=5 is a fraction"):
    budget.PruneSettings(max_drop=5)
  with pytest.raises(ValueError, match="--max_ppl_ratio=0.9 needs a ratio of at least 1"):
    budget.PruneSettings(max_ppl_ratio=0.9)
  with pytest.raises(ValueError, match="give one budget"):
    budget.PruneSettings(max_ppl_ratio=1.5, target_blocks=8)


def test_split_items_is_a_seeded_partition():
  a, b = budget.split_items(10, 0.5, seed=3)
  assert sorted(np.concatenate([a, b]).tolist()) == list(range(10)) and len(a) == 5
  assert np.array_equal(budget.split_items(10, 0.5, seed=3)[0], a)
  with pytest.raises(ValueError, match="cannot be split"):
    budget.split_items(1, 0.5, seed=0)


def test_the_perplexity_gate_picks_the_fewest_blocks_within_both_budgets(pruned, tmp_path):
  """--max_ppl_ratio on the same curve (--study), run as the default install runs it (no
  torch: the export is checked by dpjax's reload, one line says transformers' check and the
  throughput's token check were skipped): the chosen variant is the smallest within the
  accuracy budget whose perplexity ratio's paired upper bound is within the gate; the
  perplexities recompute in torch from the HF export and the bundled model."""
  import torch
  import transformers
  from dpjax.bundled import BUNDLED_MODEL
  from dpjax.lens.training import corpus_texts
  from tests.support import default_install
  out, first = pruned
  again = str(tmp_path / "gated")
  result = default_install.run(
      ["-m", "dpjax.cli.prune", "--max_drop=0.05", "--max_ppl_ratio=1.2", "--ppl_windows=16",
       "--ppl_seq_len=64", "--throughput_batch_size=1", "--throughput_prompt_len=8",
       "--throughput_new_tokens=3", f"--study={os.path.join(out, first['method']['study'])}",
       f"--output_dir={again}"], str(tmp_path), timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert ("transformers' check of the export and the throughput's token check against HF "
          "generate skipped: torch is not installed (pip install torch enables it)"
          in result.stdout.splitlines())
  with open(os.path.join(again, budget.PLAN_FILE)) as f:
    plan = json.load(f)
  check = plan["export"]["verification"]
  assert check["loader"].startswith("dpjax ") and check["max_relative_difference"] <= 1e-5
  assert check["transformers_check"] == variant_export.TRANSFORMERS_SKIPPED
  assert [row["variant"] for row in plan["throughput"]["rows"]] == ["unpruned", "pruned"]
  table = plan["curve_on_selection"]
  within = sorted((row["blocks"], i) for i, row in enumerate(table) if row["upper95"] <= 0.05)
  asked = [i for _, i in within if "ppl_ratio" in table[i]]
  assert asked == [i for _, i in within][:len(asked)]  # fewest blocks first
  assert all(table[i]["ppl_ratio"]["upper95"] > 1.2 for i in asked[:-1])
  assert table[asked[-1]]["ppl_ratio"]["upper95"] <= 1.2
  assert plan["kept_blocks"] == table[asked[-1]]["kept"]
  assert len(plan["kept_blocks"]) >= len(first["kept_blocks"])  # a second gate can only add
  # Recomputed: the last 16 windows of 64 tokens of the synthetic corpus's token stream.
  tokenizer = transformers.AutoTokenizer.from_pretrained(BUNDLED_MODEL)
  stream = []
  for ids in tokenizer(corpus_texts("synthetic"), add_special_tokens=False)["input_ids"]:
    stream += list(ids) + [tokenizer.eos_token_id]
  windows = torch.tensor(stream[-16 * 64:]).reshape(16, 64)

  def nll(path):
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    with torch.no_grad():
      logp = torch.log_softmax(hf(input_ids=windows).logits[:, :-1], -1)
    return -logp.gather(-1, windows[:, 1:, None])[..., 0].mean(-1).numpy()

  full, variant = nll(BUNDLED_MODEL), nll(os.path.join(again, "model"))
  held = budget.split_items(16, 0.5, 0)[1]
  ppl = plan["perplexity"]
  assert ppl["unpruned"]["heldout"]["perplexity"] == pytest.approx(
      np.exp(full[held].mean()), rel=1e-5)
  assert ppl["pruned"]["heldout"]["perplexity"] == pytest.approx(
      np.exp(variant[held].mean()), rel=1e-5)
  assert ppl["ratio"]["heldout"]["ratio"] == pytest.approx(
      np.exp(variant[held].mean() - full[held].mean()), rel=1e-5)
  low, high = ppl["ratio"]["heldout"]["ci95"]
  assert low <= ppl["ratio"]["heldout"]["ratio"] <= high
  # A gate no variant meets is refused, naming the flag.
  result = subprocess.run([sys.executable, "-m", "dpjax.cli.prune", "--max_ppl_ratio=1.0001",
                           "--ppl_windows=16", "--ppl_seq_len=64", "--noverify",
                           f"--study={os.path.join(out, first['method']['study'])}",
                           f"--output_dir={tmp_path / 'none'}"], capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 1 and "--max_ppl_ratio" in result.stderr
  assert not os.path.exists(tmp_path / "none" / budget.PLAN_FILE)


def test_a_given_kept_set_is_scored_on_the_same_items_as_hf_scores_it(pruned):
  """--keep: a kept set the study evaluated takes the study's outcomes; one it did not is
  evaluated on the study's items, and each item's outcome is HF PyTorch's (blocks deleted,
  the top answer letter at the prompt's last position)."""
  import torch
  import transformers
  from dpjax import tasks
  from dpjax.bundled import BUNDLED_MODEL
  from dpjax.study.run import select_items
  from dpjax.study.settings import Settings
  out, plan = pruned
  study = os.path.join(out, plan["method"]["study"])
  with open(os.path.join(study, "results.json")) as f:
    ran = json.load(f)["settings"]
  settings = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in ran.items()})
  with open(os.path.join(study, "items.jsonl")) as f:
    ids = [json.loads(line)["id"] for line in f]
  kept = [0, 2, 5, 9, 12, 15]  # not on the Iterative Pruning curve
  with open(os.path.join(study, "variants.jsonl")) as f:
    assert all(json.loads(line)["kept"] != kept for line in f)
  unpruned, curve, record = budget._given(study, ",".join(map(str, kept)), 16, settings, ids)
  assert curve == [] and record["method"] == "given" and unpruned["method"] == "unpruned"
  evaluation = select_items(settings)[4]
  assert [item.id for item in evaluation] == ids
  tokenizer = transformers.AutoTokenizer.from_pretrained(BUNDLED_MODEL)
  hf = transformers.AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL, dtype=torch.float64)
  hf.model.layers = torch.nn.ModuleList([hf.model.layers[b] for b in kept])
  hf.config.num_hidden_layers = len(kept)
  letters = [tokenizer(" " + c, add_special_tokens=False)["input_ids"][0] for c in "ABCD"]
  want = []
  with torch.no_grad():
    for item in evaluation:
      ids_ = tokenizer(tasks.prompt(item), add_special_tokens=False)["input_ids"]
      logits = hf(input_ids=torch.tensor([ids_]), use_cache=False).logits[0, -1]
      options = logits[torch.tensor(letters[:len(item.options)])]
      want.append("1" if int(torch.argmax(options)) == item.answer else "0")
  assert sum(a != b for a, b in zip(record["correct"], want)) <= 1  # a float32 near tie
  # The study's own variant is taken from variants.jsonl.
  _, _, found = budget._given(study, ",".join(map(str, plan["kept_blocks"])), 16, settings,
                              ids)
  assert found["method"] == "iterative_accuracy" and found["kept"] == plan["kept_blocks"]


def test_the_reload_check_refuses_an_export_with_two_blocks_swapped_or_q_unpermuted(
    pruned, tmp_path, monkeypatch):
  """The check's 1e-3 (which float32 noise on real checkpoints needs) still refuses the
  exports that are wrong: two blocks' weights swapped in the HF checkpoint, and a GGUF file
  whose q/k rows were not permuted for llama.cpp's rope."""
  import shutil
  from safetensors.numpy import load_file, save_file
  from dpjax.bundled import BUNDLED_MODEL
  from dpjax.checkpoints import gguf_from_hf
  out, plan = pruned
  kept = plan["kept_blocks"]
  broken = tmp_path / "swapped"
  shutil.copytree(os.path.join(out, "model"), broken / "model")
  for name in os.listdir(broken / "model"):
    if name.endswith(".safetensors"):
      path = str(broken / "model" / name)
      tensors = load_file(path)
      swapped = {k.replace("layers.0.", "layers.#.").replace("layers.1.", "layers.0.")
                 .replace("layers.#.", "layers.1."): v for k, v in tensors.items()}
      save_file(swapped, path, metadata={"format": "pt"})
  with pytest.raises(ValueError, match="the export is not usable"):
    variant_export.verify_export(BUNDLED_MODEL, str(broken / "model"), kept)
  variant_export.verify_export(BUNDLED_MODEL, os.path.join(out, "model"), kept)  # the real one passes
  # The check without torch (dpjax's own reload of the safetensors) refuses it too.
  with pytest.raises(ValueError, match="under dpjax's reload .* the export is not usable"):
    variant_export._verify_with_dpjax(BUNDLED_MODEL, str(broken / "model"), kept, 0)
  monkeypatch.setattr(gguf_from_hf, "_permute", lambda w, heads: w)
  gguf_from_hf.write_gguf_from_hf(os.path.join(out, "model"), str(broken / "model.gguf"))
  with pytest.raises(ValueError, match="the export is not usable"):
    variant_export.verify_export(BUNDLED_MODEL, str(broken), kept, gguf_file="model.gguf")


def test_a_given_kept_set_runs_no_search_no_profile_and_is_still_verified(tmp_path, monkeypatch):
  """--keep without --study does only what a given kept set needs: no study, no search
  (drop-one), no per-layer profile; the model loaded once (the evaluation's model is the
  export's check's, its weights written without reading the checkpoint again); exactly
  two readouts, each of its last block: the unpruned model's and the kept set's. The
  export is still written and verified (HF and GGUF), its outcomes recorded, and the plan
  reproduces it bit for bit from the checkpoint on disk."""
  from dpjax.checkpoints import convert
  from dpjax.engine.sweep import Sweep
  from dpjax.model import load
  from dpjax.study import pruning
  from dpjax.study import run as study

  def refuse(name):
    def ran(*args, **kwargs):
      raise AssertionError(f"dpjax-prune --keep ran {name}")
    return ran

  for owner, name in ((study, "run"), (study, "recorded_profile"), (study, "full_profile"),
                      (pruning, "iterative_prune"), (Sweep, "drop_one"),
                      (convert, "read_converted")):
    monkeypatch.setattr(owner, name, refuse(name))
  loads, reads = [], []
  load_model, readouts = load.load_model, Sweep.readouts

  def counted_load(*args, **kwargs):
    loads.append(args[0])
    return load_model(*args, **kwargs)

  def counted_readouts(self, masks, *args, **kwargs):
    reads.append((np.flatnonzero(np.asarray(masks)[0]).tolist(), len(masks),
                  kwargs.get("final_only")))
    return readouts(self, masks, *args, **kwargs)

  monkeypatch.setattr(load, "load_model", counted_load)
  monkeypatch.setattr(study, "load_model", counted_load)
  monkeypatch.setattr(Sweep, "readouts", counted_readouts)
  kept = [0, 1, 2, 5, 9, 15]
  out = tmp_path / "given"
  plan = budget.prune(budget.PruneSettings(keep=",".join(map(str, kept)), num_items=24,
                                           calibration_items=8, gguf=True, throughput=False,
                                           ppl_windows=0, output_dir=str(out)))
  assert len(loads) == 1
  assert reads == [(list(range(16)), 1, True), (kept, 1, True)]
  assert plan["kept_blocks"] == kept and plan["method"]["name"] == "given"
  assert plan["method"]["study"] is None and not (out / "study").exists()
  # The export, verified (transformers is installed with the test extra).
  check, gguf = plan["export"]["verification"], plan["export"]["gguf"]
  assert check["loader"].startswith("transformers") and check["max_relative_difference"] <= 1e-5
  assert check["blocks_loaded"] == len(kept) and (out / "model" / "config.json").exists()
  assert gguf["verification"]["max_relative_difference"] <= 1e-5
  assert gguf["verification"]["tokenizer"]["same_ids"] and (out / "model.gguf").exists()
  # The two variants' outcomes, as a study records them; the plan's accuracies are theirs.
  with open(out / "variants.jsonl") as f:
    unpruned, given = [json.loads(line) for line in f]
  with open(out / "items.jsonl") as f:
    ids = [json.loads(line)["id"] for line in f]
  assert unpruned["method"] == "unpruned" and unpruned["kept"] == list(range(16))
  assert given["method"] == "given" and given["kept"] == kept
  assert len(ids) == len(unpruned["correct"]) == len(given["correct"]) == 24
  held = [ids.index(i) for i in plan["items"]["heldout_ids"]]
  for record, key in ((unpruned, "unpruned"), (given, "pruned")):
    assert plan["accuracy"][key]["heldout"]["accuracy"] == pytest.approx(
        np.mean([record["correct"][i] == "1" for i in held]), abs=1e-6)
  monkeypatch.undo()
  again = budget.prune(budget.PruneSettings(plan=str(out / budget.PLAN_FILE),
                                            output_dir=str(tmp_path / "again")))
  assert again["export"]["files"] == plan["export"]["files"]  # read from disk: the same bytes
  assert again["export"]["gguf"]["sha256"] == gguf["sha256"]


def test_a_given_kept_set_without_a_study_scores_as_the_study_did(pruned, tmp_path):
  """--keep without --study evaluates the items the study with the same settings takes,
  and gets the study's outcomes: the unpruned model's (the study read them from its
  per-layer profile) and the kept set's (a point of its curve)."""
  out, first = pruned
  study = os.path.join(out, first["method"]["study"])
  with open(os.path.join(study, "variants.jsonl")) as f:
    records = [json.loads(line) for line in f]
  kept = first["kept_blocks"]
  plan = budget.prune(budget.PruneSettings(keep=",".join(map(str, kept)), num_items=128,
                                           calibration_items=32, throughput=False,
                                           ppl_windows=0, output_dir=str(tmp_path / "given")))
  with open(tmp_path / "given" / "variants.jsonl") as f:
    unpruned, given = [json.loads(line) for line in f]
  assert unpruned["correct"] == next(r for r in records if r["method"] == "unpruned")["correct"]
  assert given["correct"] == next(r for r in records if r["kept"] == kept)["correct"]
  assert plan["items"] == first["items"] and plan["accuracy"] == first["accuracy"]
  assert plan["export"]["files"] == first["export"]["files"]
