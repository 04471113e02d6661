"""Smoke test of `python -m benchmarks --quick`: every suite runs, its correctness checks
pass and it computes its ratio against HF PyTorch; without torch (the default install), the
dpjax side runs alone and one line says what the ratios need.

No timing is asserted: the figures belong in benchmarks/RESULTS.md, not in tests.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.support.reference import HFIterativeReference
from tests.support import default_install
from tests.support import reference
from dpjax.tasks import synthetic
from dpjax import tasks


def test_quick_run_checks_dpjax_against_the_reference(tmp_path):
  """The whole smoke run: every suite ok, each with its ratio against HF PyTorch."""
  from benchmarks import __main__ as harness
  result = subprocess.run([sys.executable, "-m", "benchmarks", "--quick",
                           f"--out_dir={tmp_path}"], capture_output=True, text=True, timeout=1800)
  assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
  for name in harness.SUITES:
    assert f"[{name}] ok in " in result.stdout, (name, result.stdout[-3000:])
  assert "torch is not installed" not in result.stdout

  def read(name):
    with open(tmp_path / name) as f:
      return json.load(f)

  # The suites with a reference computed their ratio against it.
  assert read("end_to_end.json")["cases"][0]["speedup_with_compilation"] > 0
  assert read("shared_prefix.json")["ratio_shared_warm"] > 0
  assert all(r["speedup"] > 0 for r in read("foundation.json")["forward_speed"])
  assert read("interleaved.json")["configurations"][0]["same_pick"]
  lm_eval_cases = read("lm_eval.json")["cases"]  # lm-eval's dpjax backend against HFLM
  assert {(c["request"], c["kept"]) for c in lm_eval_cases} == {
      (r, k) for r in ("loglikelihood", "generate_until") for k in ("unpruned", "pruned")}
  assert all(c["ratio"] > 0 for c in lm_eval_cases)
  for name in ("formats.json", "read_positions.json", "resume.json", "bf16.json",
               "loading.json", "plan.json"):
    assert (tmp_path / name).is_file(), name
  results = read("results.json")
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
  # A program's working memory grows with the masks it runs together (each brings its own
  # activations), which is what bounds a sweep's peak whatever the number of masks.
  temp = {(r["masks_per_program"], r["final_only"]): r["temp_mb"]
          for r in results["scaling"]["program_memory"]}
  for final_only in (False, True):
    assert 0 < temp[(1, final_only)] < temp[(4, final_only)] < temp[(16, final_only)]
    assert temp[(16, final_only)] < 16 * temp[(1, final_only)] + 1
  markdown = (tmp_path / "RESULTS.md").read_text()
  assert "Iterative Pruning against HF PyTorch" in markdown and "random Llama" in markdown
  assert "| masks per program |" in markdown
  assert "Shared few-shot prefixes" in markdown and "end to end" in markdown
  assert "the `dpjax` backend against lm-eval's HF backend" in markdown


def test_without_torch_a_smoke_run_runs_dpjax_alone_and_says_what_the_ratios_need(tmp_path):
  """The default install has no torch: the harness says so in one line before any work,
  runs a suite's dpjax side (no reference, no ratio), skips a suite that is only a
  comparison with HF PyTorch naming the install command, and exits 0."""
  from benchmarks import common
  out = tmp_path / "out"
  result = default_install.run(["-m", "benchmarks", "interleaved", "shared_prefix", "--quick",
                                f"--out_dir={out}"], str(tmp_path), timeout=600)
  assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
  lines = result.stdout.splitlines()
  assert lines[0] == common.NO_TORCH and result.stdout.count(common.NO_TORCH) == 1
  assert "pip install torch" in common.NO_TORCH
  skipped = [line for line in lines if line.startswith("[interleaved] skipped")]
  assert len(skipped) == 1 and "pip install torch" in skipped[0], lines
  assert "[shared_prefix] ok in " in result.stdout
  assert "ModuleNotFoundError" not in result.stderr
  with open(out / "shared_prefix.json") as f:
    shared = json.load(f)
  assert shared["machine"]["torch"] is None and "reference_s" not in shared
  assert shared["dpjax_shared_s"] > 0 and shared["shared_vs_unshared_max_logit_difference"] < 1e-4
  assert not (out / "interleaved.json").exists()
  from benchmarks import measured
  markdown = measured.shared_prefix_markdown(str(out / "shared_prefix.json"))
  assert "not run (torch is not installed)" in markdown


def test_the_report_renders_a_run_without_the_reference(tmp_path):
  """RESULTS.md from a core run without torch: dpjax's figures, dashes for the ratios."""
  import copy
  import os
  from benchmarks import run
  with open(os.path.join(os.path.dirname(run.__file__), "results.json")) as f:
    committed = json.load(f)
  results = copy.deepcopy(committed)
  results["machine"].update(torch=None, torch_threads=None)
  for case in results["iterative"]:
    case.update(hf_seconds=None, speedup=None, speedup_with_compilation=None,
                reference_removed_order=None, max_mean_margin_difference=None)
    case["block_evaluations"]["hf_reference"] = None
  run.FLAGS([run.__name__, f"--results_dir={tmp_path}"])  # no side measurements there
  try:
    markdown = run.results_markdown(results)
  finally:
    run.FLAGS.unparse_flags()
  assert "no torch (the HF-PyTorch reference did not run)" in markdown
  row = next(line for line in markdown.splitlines() if line.startswith("| bundled model"))
  assert "| - |" in row and f"{committed['iterative'][0]['dpjax_seconds']:.1f}" in row


def test_a_smoke_run_never_writes_into_the_committed_results():
  """`--quick` without `--out_dir` sends every suite's output into a new temporary
  directory; the full run sends them to benchmarks/results/ (the core suite beside it)."""
  import os
  import tempfile
  from benchmarks import __main__ as harness
  temp = tempfile.mkdtemp(prefix="dpjax_benchmarks_")
  for name, suite in harness.SUITES.items():
    quick = harness.command(name, temp, quick=True)
    outs = [a.split("=", 1)[1] for a in quick if a.startswith(suite.out_flag + "=")]
    assert len(outs) == 1 and outs[0].startswith(temp), (name, quick)
    full = harness.command(name, harness.RESULTS_DIR, quick=False)
    target = [a.split("=", 1)[1] for a in full if a.startswith(suite.out_flag + "=")][0]
    assert os.path.dirname(target) in (harness.RESULTS_DIR, os.path.dirname(harness.HERE)) or \
        target == harness.HERE, (name, target)
    assert os.path.isfile(os.path.join(harness.HERE, f"{suite.module}.py")), name


def _tiny_hf_llama():
  """A synthetic-suite tokenizer, a random 4-block HF Llama over it and its config."""
  tokenizer = synthetic.build_tokenizer(synthetic.training_text(synthetic.generate("train", 200)),
                                        300)
  config = dict(reference.VARIANTS["llama_gqa_tied_sharded"].config, vocab_size=len(tokenizer))
  return tokenizer, config, reference.build_hf_model("llama", config, seed=2).eval()


def test_reference_readouts_are_hf_hidden_states_through_the_lens(tmp_path):
  """The reference's lens equals HF's own logits at the last layer, and norm + lm_head of
  the returned hidden states elsewhere (computed here from `hf_forward`)."""
  import torch
  tokenizer, config, model = _tiny_hf_llama()
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


def test_reference_following_another_order_still_scores_every_candidate():
  """With `follow`, the reference removes the given blocks but records its own pick and
  that pick's scores, which equal an unforced run's at the first step (same kept set)."""
  tokenizer, config, model = _tiny_hf_llama()
  items = synthetic.generate("test", 8)
  encoded = tasks.encode(tokenizer, items, [tasks.prompt(i) for i in items])
  ref = HFIterativeReference(model, tasks.batches(encoded, 4, tokenizer.pad_token_id))
  own = ref.iterative_prune(4, 1)
  assert [s["removed"] for s in own] == [s["choice"] for s in own]
  # Follow an order that starts with a block the reference does not pick first.
  first = next(b for b in range(4) if b != own[0]["choice"])
  follow = [first] + [b for b in range(4) if b != first][:2]
  forced = ref.iterative_prune(4, 1, follow=follow)
  assert [s["removed"] for s in forced] == follow
  assert forced[0]["choice"] == own[0]["choice"] != forced[0]["removed"]
  assert forced[0]["choice_accuracy"] == own[0]["accuracy"]
  assert forced[0]["choice_margin"] == own[0]["margin"]
  # The followed block's own scores: those of the kept set without it, read afresh.
  acc, margin = ref.final_scores(*ref.readouts([b for b in range(4) if b != first]))
  assert (forced[0]["accuracy"], forced[0]["margin"]) == (acc, margin)


def test_every_benchmark_program_imports_beside_the_others_and_runs_its_own_flags():
  """The programs share flag names (`--out`, `--items`, `--work_dir`) with different
  defaults, and the tests import them side by side: each keeps its flags on its own
  FlagValues, and only the program being run hands them to absl's global FLAGS."""
  code = (
      "import importlib, pkgutil\n"
      "from absl import flags\n"
      "import benchmarks, benchmarks.real_study\n"
      "names = [m.name for p, pre in ((benchmarks, 'benchmarks.'), (benchmarks.real_study,"
      " 'benchmarks.real_study.')) for m in pkgutil.iter_modules(p.__path__, pre)"
      " if not m.name.endswith('__main__')]\n"
      "mods = [importlib.import_module(n) for n in names]\n"
      "own = sorted(n for m in mods if hasattr(m, 'FLAGS') for n in m.FLAGS)\n"
      "print(len(names), 'items' in own, 'work_dir' in own,"
      " [n for n in ('items', 'out', 'work_dir') if n in flags.FLAGS])\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  count, has_items, has_work_dir, in_global = result.stdout.split(maxsplit=3)
  assert int(count) >= 15 and has_items == "True" and has_work_dir == "True"
  assert in_global.strip() == "[]"
  # Run as a program, a script's own flags parse from the command line.
  listed = subprocess.run([sys.executable, "-m", "benchmarks.real_study", "--dry_run",
                           "--only=smollm2_arc_easy_cloze"], capture_output=True, text=True,
                          timeout=300)
  assert listed.returncode == 0, listed.stderr[-3000:]
  units = [line.split()[0] for line in listed.stdout.splitlines()[1:]
           if line.startswith("smollm2_arc_easy_cloze:")]
  assert units == ["smollm2_arc_easy_cloze:phase", "smollm2_arc_easy_cloze:noise",
                   "smollm2_arc_easy_cloze:iterative", "smollm2_arc_easy_cloze:screened",
                   "smollm2_arc_easy_cloze:baselines"]


def test_the_llama_cpp_table_is_written_from_its_figures(tmp_path):
  """RESULTS.md's llama.cpp section: each file's row, the pruned file's distance over the
  unpruned one's of the same family and weights, and the summary computed from the rows."""
  import json
  from benchmarks import measured
  row = lambda weights, variant, diff, removed: {
      "family": "gemma3", "weights": weights, "variant": variant, "blocks": 18 - len(removed),
      "llama_cpp_layers": 18 - len(removed), "removed": removed, "states_kinds": bool(removed),
      "max_abs_logit_difference": diff, "max_abs_logit": 30.0, "top1_agreement": 1.0,
      "positions": 40, "greedy_identical": 4, "greedy_prompts": 4}
  figures = {"machine": {"cpu_count": 2, "jax": "0"}, "llama_cpp_python": "0.3.36",
             "prompts": 4, "new_tokens": 16, "f32_tolerance": 2e-3,
             "rows": [row("F32", "unpruned", 1e-4, []), row("F32", "pruned", 3e-4, [2]),
                      row("quantized", "unpruned", 1.0, []), row("quantized", "pruned", 0.5, [2])],
             "f32_within_tolerance": True, "f32_greedy_identical": True, "layers_loaded": True}
  (tmp_path / "llama_cpp.json").write_text(json.dumps(figures))
  text = measured.llama_cpp_markdown(str(tmp_path / "llama_cpp.json"))
  assert ("| gemma3 | F32 | without 2 (kinds stated per layer) | 17 (17) | 3.00e-04 (30.0) | "
          "3.00 | 1.000 of 40 | 4 of 4 |") in text
  assert "| gemma3 | quantized | without 2 (kinds stated per layer) | 17 (17) | 5.00e-01 (30.0) | 0.50 |" in text
  assert "F32 within 0.002 of the largest logit everywhere: yes" in text
  figures["rows"][1]["max_abs_logit_difference"] = 0.07  # above 2e-3 of 30
  (tmp_path / "llama_cpp.json").write_text(json.dumps(figures))
  assert "everywhere: no; F32 greedy" in measured.llama_cpp_markdown(
      str(tmp_path / "llama_cpp.json"))
  assert measured.llama_cpp_markdown(str(tmp_path / "absent.json")) == ""
