"""Every program the README lists runs from the README's default install (`pip install -e .`:
no torch, no test extra), with no flags or with the README's flags, on the bundled model.

Each run hides the test extra's packages (`tests.support.default_install`) and, to keep the
suite short, adds only flags that make it smaller (fewer steps, shorter prompts). The
programs run elsewhere with torch hidden too: `dpjax` (tests/serve/test_throughput.py's
study), `dpjax-plan` (tests/engine/test_planner.py) and `dpjax-prune --max_drop=0.05`
(tests/variants/test_budget.py's perplexity gate).
"""

from __future__ import annotations

import json
import os

from dpjax.bundled import DEFAULT_RUN
from dpjax.serve import throughput
from tests.support import default_install

# transformers' import-time line when torch is missing, which dpjax's programs do not show.
NO_TORCH_ADVICE = "PyTorch was not found"
FAST = ["--batch_size=2", "--prompt_len=8", "--new_tokens=3", "--repeats=1"]


def _run(args, tmp_path, cwd=None):
  return default_install.run(args, str(tmp_path), cwd=str(cwd or tmp_path), timeout=600)


def test_convert_with_no_flags_and_export_with_the_readmes_flags(tmp_path):
  converted = _run(["-m", "checkpoints_convert.convert_cli"], tmp_path)
  assert converted.returncode == 0, converted.stderr[-3000:]
  assert "wrote dpjax checkpoint to" in converted.stdout
  assert os.path.isfile(tmp_path / "dpjax_converted" / "dpjax_config.json")
  exported = _run(["-m", "checkpoints_convert.export_cli", "--keep=0,1,5"], tmp_path)
  assert exported.returncode == 0, exported.stderr[-3000:]
  with open(tmp_path / "dpjax_export" / "config.json") as f:
    assert json.load(f)["num_hidden_layers"] == 3
  assert NO_TORCH_ADVICE not in converted.stderr + exported.stderr


def test_data_with_no_flags(tmp_path):
  """Into the default data directory, as a user's first run (the benchmark tests read the
  same copies; a later run finds them there)."""
  result = _run(["-m", "dpjax.cli.data"], tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "arc_easy: " in result.stdout and "mmlu: " in result.stdout


def test_train_lens_with_no_flags_but_fewer_steps(tmp_path):
  result = _run(["-m", "dpjax.cli.train_lens", "--steps=2", "--eval_every=1",
                 "--corpus_items=64", "--heldout_positions=256", "--noprogress"], tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "wrote the lens to" in result.stdout and NO_TORCH_ADVICE not in result.stderr
  assert os.path.isdir(tmp_path / "dpjax_lens")


def test_throughput_with_no_flags_measures_the_default_runs_variants(tmp_path):
  """No --keep or --study: the unpruned bundled model and the committed default run's
  Iterative Pruning points with 4, 8 and 12 of 16 blocks removed, with their accuracies;
  the token check against HF generate is skipped with one line naming the install."""
  result = _run(["-m", "dpjax.cli.throughput", *FAST], tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  assert ("the token check against HF generate skipped: torch is not installed "
          "(pip install torch enables it)") in result.stdout
  assert "--methods=iterative --removed=4,8,12 --above_collapse" in result.stdout
  with open(tmp_path / "dpjax_throughput" / throughput.RESULTS_FILE) as f:
    report = json.load(f)
  with open(os.path.join(DEFAULT_RUN, "results.json")) as f:
    study = json.load(f)
  curve = {p["removed"]: p for p in study["methods"]["iterative_accuracy"]["curve"]}
  rows = report["rows"]
  assert [r["removed"] for r in rows] == [0, 4, 8, 12]
  assert rows[0]["accuracy"] == study["full_model"]["accuracy"][-1]
  for row in rows[1:]:
    assert row["method"] == "iterative_accuracy"
    assert row["kept"] == curve[row["removed"]]["kept"]
    assert row["accuracy"] == curve[row["removed"]]["accuracy"]
  assert report["token_check"] == "skipped: torch is not installed"
  assert os.path.getsize(tmp_path / "dpjax_throughput" / throughput.FIGURE_FILE) > 1000
  assert NO_TORCH_ADVICE not in result.stderr


def test_what_needs_torch_when_asked_for_is_refused_in_one_line_before_any_work(tmp_path):
  result = _run(["-m", "dpjax.cli.throughput", "--reference=hf"], tmp_path)
  assert result.returncode == 1 and result.stdout == ""
  assert result.stderr.strip() == ("dpjax-throughput: error: --reference=hf measures HF "
                                   "PyTorch generate, which needs torch: pip install torch.")
  assert not os.path.exists(tmp_path / "dpjax_throughput")
  result = _run(["-m", "dpjax.cli.prune", "--max_drop=0.05", "--gguf"], tmp_path)
  assert result.returncode == 1 and result.stdout == ""
  assert result.stderr.strip().splitlines() == [
      "dpjax-prune: error: --gguf checks the GGUF file with transformers' GGUF loading, "
      "which needs torch: pip install torch (or pass --noverify to write it unchecked)."]
  assert not os.path.exists(tmp_path / "dpjax_pruned")


def test_a_gguf_file_converts_or_names_what_to_install(tmp_path):
  """gguf is a default dependency. transformers reads the file's config and tokenizer;
  releases whose GGUF reader imports torch cannot without it, and then the program says
  so in one line (never a traceback)."""
  from tests.support import reference
  path = str(tmp_path / "tiny.gguf")
  reference.write_gguf("llama_gqa_tied_sharded", path, seed=3)
  result = _run(["-m", "checkpoints_convert.convert_cli", f"--model={path}"], tmp_path)
  if result.returncode == 0:
    assert "wrote dpjax checkpoint to" in result.stdout
    return
  assert result.returncode == 1 and "Traceback" not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("dpjax-convert: error: ")
  assert lines[0].endswith("imports torch, which is not installed: pip install torch.")
