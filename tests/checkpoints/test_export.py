"""dpjax-export: pruned variants back out as HF checkpoints that HF loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import dpjax
from dpjax.checkpoints.convert import convert, read_converted
from dpjax.checkpoints.export import export, pruned_hf_config
from dpjax.checkpoints.hf import HFCheckpoint
from tests.support import reference

ATOL = 1e-4


@pytest.mark.parametrize("variant,kept", [
    ("llama_bias", (0, 2, 3)),
    ("qwen2_bias_window_sharded", (0, 3)),
    ("qwen3_qk_norm", (1,)),
    ("mistral_window_head_dim", (0, 1, 2, 3)),
    ("gemma2_softcap_window", (0, 2, 3)),
    ("gemma3_qk_norm_local_rope", (1, 2)),
    ("phi3_fused_window", (0, 3)),
])
def test_exported_model_loads_in_hf_and_equals_masked_forward(hf_checkpoint_dir, tmp_path,
                                                              variant, kept):
  source = hf_checkpoint_dir(variant)
  converted = convert(source, str(tmp_path / "converted"))
  out = export(converted, str(tmp_path / "pruned"), kept_blocks=kept)
  model = dpjax.load_model(converted)
  keep = dpjax.keep_mask(kept, model.num_layers)
  ids, mask = reference.random_batch(model.config.vocab_size, 3, 10, seed=8, padding="left")
  hf = reference.load_hf(out)
  assert len(hf.model.layers) == len(kept)
  want, _ = reference.hf_forward(hf, ids, mask)
  got = np.asarray(model.logits(ids, keep=keep, attention_mask=mask))
  real = mask.astype(bool)
  assert np.abs(got - want)[real].max() <= ATOL
  for name in ("tokenizer.json", "tokenizer_config.json"):
    with open(os.path.join(source, name), "rb") as a, open(os.path.join(out, name), "rb") as b:
      assert a.read() == b.read(), name


def test_round_trip_dpjax_hf_dpjax_gives_identical_weights(hf_checkpoint_dir, tmp_path):
  source = hf_checkpoint_dir("qwen2_bias_window_sharded")
  converted = convert(source, str(tmp_path / "a"))
  config, params, _ = read_converted(converted)
  exported = export(converted, str(tmp_path / "hf"), max_shard_bytes=30_000)
  assert os.path.exists(os.path.join(exported, "model.safetensors.index.json"))
  again = HFCheckpoint.open(exported)
  assert again.config == config
  back = again.read_params()
  for key in ("embed", "final_norm"):
    np.testing.assert_array_equal(back[key], params[key])
  for key, value in params["blocks"].items():
    np.testing.assert_array_equal(back["blocks"][key], value, err_msg=key)

  # A pruned export holds exactly the kept blocks' weights, renumbered.
  pruned = export(converted, str(tmp_path / "pruned"), keep=np.array([True, False, False, True]))
  cut = HFCheckpoint.open(pruned)
  assert cut.config.num_layers == 2
  assert cut.config.sliding_layers == (False, True)
  cut_params = cut.read_params()
  for key, value in params["blocks"].items():
    np.testing.assert_array_equal(cut_params["blocks"][key], value[[0, 3]], err_msg=key)


def test_phi3_fused_tensors_split_and_fuse_back_exactly(hf_checkpoint_dir, tmp_path):
  """qkv_proj and gate_up_proj become q, k, v, gate, up on conversion and the exporter
  fuses them back: the round trip gives the checkpoint's own bytes."""
  from safetensors.numpy import load_file
  source = hf_checkpoint_dir("phi3_fused_window")
  out = export(source, str(tmp_path / "all"), kept_blocks=[0, 1, 2, 3])
  original = load_file(os.path.join(source, "model.safetensors"))
  exported = load_file(os.path.join(out, "model.safetensors"))
  assert sorted(exported) == sorted(original)
  for name in original:
    np.testing.assert_array_equal(exported[name], original[name], err_msg=name)
  params = HFCheckpoint.open(source).read_params()
  cfg = HFCheckpoint.open(source).config
  q = cfg.num_heads * cfg.head_dim
  fused = original["model.layers.2.self_attn.qkv_proj.weight"]
  np.testing.assert_array_equal(params["blocks"]["k"][2].T, fused[q:q + cfg.num_kv_heads * cfg.head_dim])
  np.testing.assert_array_equal(params["blocks"]["up"][2].T,
                                original["model.layers.2.mlp.gate_up_proj.weight"][cfg.intermediate_size:])


def test_pruned_config_cuts_every_per_layer_list():
  raw = {"num_hidden_layers": 4, "layer_types": ["a", "b", "c", "d"], "hidden_size": 8,
         "some_per_layer_list": [10, 11, 12, 13], "not_per_layer": [1, 2]}
  config = pruned_hf_config(raw, [1, 3], 4)
  assert config == {"num_hidden_layers": 2, "layer_types": ["b", "d"], "hidden_size": 8,
                    "some_per_layer_list": [11, 13], "not_per_layer": [1, 2]}
  assert raw["layer_types"] == ["a", "b", "c", "d"]  # the input is left alone
  # Without a layer_types list, Qwen's max_window_layers threshold is renumbered.
  qwen = {"num_hidden_layers": 6, "max_window_layers": 3}
  assert pruned_hf_config(qwen, [0, 2, 4, 5], 6)["max_window_layers"] == 2


def test_bfloat16_export_keeps_the_dtype(hf_checkpoint_dir, tmp_path):
  out = export(hf_checkpoint_dir("llama_bf16"), str(tmp_path / "bf16"), kept_blocks=[0, 1])
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["dtype"] == "bfloat16"
  original = HFCheckpoint.open(hf_checkpoint_dir("llama_bf16")).read_params()
  exported = HFCheckpoint.open(out).read_params()
  assert exported["blocks"]["gate"].dtype == original["blocks"]["gate"].dtype
  np.testing.assert_array_equal(exported["blocks"]["gate"], original["blocks"]["gate"][:2])


@pytest.mark.parametrize("kwargs,match", [
    (dict(keep=np.zeros(4, bool)), "removes every block"),
    (dict(kept_blocks=[0, 4]), r"indices \[4\] are out of range"),
    (dict(kept_blocks=[2, 2]), r"indices \[2\] are repeated"),
    (dict(keep=np.array([1, 0, 1, 1])), r"boolean vector of length 4"),
    (dict(keep=np.ones(3, bool)), r"boolean vector of length 4"),
])
def test_bad_keep_is_refused_and_writes_nothing(hf_checkpoint_dir, tmp_path, kwargs, match):
  parent = tmp_path / "out"
  parent.mkdir()
  with pytest.raises(ValueError, match=match):
    export(hf_checkpoint_dir("llama_mha"), str(parent / "pruned"), **kwargs)
  assert os.listdir(parent) == []


def test_command_line_exports(hf_checkpoint_dir, tmp_path):
  out = tmp_path / "cli"
  result = subprocess.run(
      [sys.executable, "-m", "checkpoints_convert.export_cli",
       f"--model={hf_checkpoint_dir('llama_mha')}", "--keep=0,3", f"--output_dir={out}"],
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert HFCheckpoint.open(str(out)).config.num_layers == 2
  # The old name of --model still works, and says it is old.
  old = subprocess.run(
      [sys.executable, "-m", "checkpoints_convert.export_cli",
       f"--checkpoint={hf_checkpoint_dir('llama_mha')}", "--keep=0,3",
       f"--output_dir={tmp_path / 'old'}"], capture_output=True, text=True, timeout=300)
  assert old.returncode == 0, old.stderr
  assert "--checkpoint is the old name of --model" in old.stderr
  # --help lists the program's own flags, one line each, and no other library's.
  shown = subprocess.run([sys.executable, "-m", "checkpoints_convert.export_cli", "-h"],
                         capture_output=True, text=True, timeout=300)
  assert shown.returncode == 0 and "--model=(the bundled model): " in shown.stdout
  assert "--keep=" in shown.stdout and "--xla_" not in shown.stdout
  assert "chex" not in shown.stdout and "orbax" not in shown.stdout.lower()
  bad = subprocess.run(
      [sys.executable, "-m", "checkpoints_convert.export_cli",
       f"--checkpoint={hf_checkpoint_dir('llama_mha')}", "--mask=1021",
       f"--output_dir={tmp_path / 'bad'}"],
      capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0
  assert "--mask takes one 0 or 1 per block" in bad.stderr
  assert not os.path.exists(tmp_path / "bad")


def test_command_line_writes_a_checked_gguf_file_beside_the_hf_checkpoint(hf_checkpoint_dir,
                                                                          tmp_path):
  """--gguf: model.gguf beside the HF checkpoint (dpjax-prune's layout), reloaded by transformers (its dense model) with
  the kept blocks' logits before success is printed; a source the GGUF writer cannot
  state is refused before anything is written."""
  import torch
  from dpjax.bundled import BUNDLED_MODEL
  out = tmp_path / "cli"
  result = subprocess.run(  # the bundled model: a Llama with a byte-level BPE tokenizer
      [sys.executable, "-m", "checkpoints_convert.export_cli", "--keep=0,3,9", "--gguf",
       f"--output_dir={out}"], capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert f"wrote HF checkpoint to {out / 'model'}\n" in result.stdout
  assert f"wrote {out / 'model.gguf'} (3 blocks; logits within " in result.stdout
  assert sorted(os.listdir(out)) == ["model", "model.gguf"]
  hf = reference.load_hf_gguf(str(out / "model.gguf"))
  assert hf.config.num_hidden_layers == 3
  ids = reference.random_batch(hf.config.vocab_size, 2, 10, seed=3)[0]
  want = np.asarray(dpjax.load_model(BUNDLED_MODEL, dtype="float32").logits(
      ids, keep=dpjax.keep_mask([0, 3, 9], 16)))
  with torch.no_grad():
    got = hf(input_ids=torch.as_tensor(ids)).logits.numpy()
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
  refused = subprocess.run(
      [sys.executable, "-m", "checkpoints_convert.export_cli",
       f"--model={hf_checkpoint_dir('gemma3_qk_norm_local_rope')}", "--keep=0,1", "--gguf",
       f"--output_dir={tmp_path / 'refused'}"], capture_output=True, text=True, timeout=300)
  assert refused.returncode == 1 and "gemma3" in refused.stderr.lower()
  assert len(refused.stderr.strip().splitlines()) == 1
  assert not os.path.exists(tmp_path / "refused")


def test_overwrite_replaces_only_an_earlier_output(hf_checkpoint_dir, tmp_path):
  """--overwrite onto a regular file, or onto a directory dpjax did not write: one line,
  exit 1, the file or directory untouched; onto an earlier export: replaced."""
  a_file = tmp_path / "notes.txt"
  a_file.write_text("mine")
  foreign = tmp_path / "photos"
  foreign.mkdir()
  (foreign / "cat.jpg").write_text("meow")
  for target, said in ((a_file, "is a file, not an earlier output directory"),
                       (foreign, "holds files dpjax did not write")):
    result = subprocess.run(
        [sys.executable, "-m", "checkpoints_convert.export_cli",
         f"--model={hf_checkpoint_dir('llama_mha')}", "--keep=0,3", f"--output_dir={target}",
         "--overwrite"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and said in lines[0], result.stderr[-2000:]
  assert a_file.read_text() == "mine" and os.listdir(foreign) == ["cat.jpg"]
  assert sorted(os.listdir(tmp_path)) == ["notes.txt", "photos"]
  earlier = tmp_path / "pruned"
  export(hf_checkpoint_dir("llama_mha"), str(earlier), kept_blocks=[0, 1, 2])
  export(hf_checkpoint_dir("llama_mha"), str(earlier), kept_blocks=[0, 3], overwrite=True)
  assert HFCheckpoint.open(str(earlier)).config.num_layers == 2
