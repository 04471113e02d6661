"""dpjax-convert: HF checkpoints in, Orbax checkpoints out, bad input refused cleanly."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import huggingface_hub
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import dpjax
from dpjax.checkpoints import architectures
from dpjax.checkpoints.convert import convert, read_converted
from dpjax.checkpoints.hf import CheckpointError, HFCheckpoint
from tests.support import reference


def _flat(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}/"))
    else:
      out[prefix + key] = np.asarray(value)
  return out


def _assert_same_params(a, b):
  fa, fb = _flat(a), _flat(b)
  assert sorted(fa) == sorted(fb)
  for key in fa:
    assert fa[key].dtype == fb[key].dtype, key
    np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)


def test_stacked_params_hold_each_hf_tensor(hf_checkpoint_dir):
  directory = hf_checkpoint_dir("qwen2_bias_window_sharded")
  params = HFCheckpoint.open(directory).read_params()
  ref = reference.load_hf(directory)
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  np.testing.assert_array_equal(params["blocks"]["q"][2], sd["model.layers.2.self_attn.q_proj.weight"].T)
  np.testing.assert_array_equal(params["blocks"]["k_bias"][1], sd["model.layers.1.self_attn.k_proj.bias"])
  np.testing.assert_array_equal(params["blocks"]["down"][3], sd["model.layers.3.mlp.down_proj.weight"].T)
  np.testing.assert_array_equal(params["embed"], sd["model.embed_tokens.weight"])
  assert "lm_head" not in params  # tied
  assert params["blocks"]["q"].shape == (4, 64, 64)


def test_sharded_and_single_file_checkpoints_convert_identically(tmp_path):
  variant = reference.VARIANTS["llama_gqa_tied_sharded"]
  model = reference.build_hf_model(variant.family, variant.config, seed=3)
  model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
  model.save_pretrained(tmp_path / "single")
  assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
  assert len([f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors")]) > 5
  _assert_same_params(HFCheckpoint.open(str(tmp_path / "sharded")).read_params(),
                      HFCheckpoint.open(str(tmp_path / "single")).read_params())


def test_converted_checkpoint_round_trips_through_orbax(hf_checkpoint_dir, tmp_path):
  directory = hf_checkpoint_dir("qwen3_qk_norm")
  out = convert(directory, str(tmp_path / "converted"))
  copied = {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}
  assert copied <= set(os.listdir(directory))
  assert sorted(os.listdir(out)) == sorted({"dpjax_config.json", "hf_config.json", "params"} | copied)
  config, params, raw = read_converted(out)
  checkpoint = HFCheckpoint.open(directory)
  assert config == checkpoint.config
  assert raw == checkpoint.raw_config
  _assert_same_params(params, checkpoint.read_params())
  # The converted directory loads like the HF one and computes the same logits.
  ids, _ = reference.random_batch(config.vocab_size, 2, 7, seed=0)
  np.testing.assert_array_equal(np.asarray(dpjax.load_model(out).logits(ids)),
                                np.asarray(dpjax.load_model(directory).logits(ids)))
  import transformers
  assert transformers.AutoTokenizer.from_pretrained(out)("w5 w7")["input_ids"] == [5, 7]


def test_dtype_flag_casts_weights(hf_checkpoint_dir, tmp_path):
  directory = hf_checkpoint_dir("llama_mha")
  out = convert(directory, str(tmp_path / "bf16"), dtype="bfloat16")
  config, params, _ = read_converted(out)
  assert config.param_dtype == "bfloat16"
  fp32 = HFCheckpoint.open(directory).read_params()
  assert params["blocks"]["up"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(params["blocks"]["up"], fp32["blocks"]["up"].astype(ml_dtypes.bfloat16))


def test_command_line_converts(hf_checkpoint_dir, tmp_path):
  out = tmp_path / "cli"
  result = subprocess.run(
      [sys.executable, "-m", "checkpoints_convert.convert_cli",
       f"--hf_model={hf_checkpoint_dir('llama_kv1')}", f"--output_dir={out}"],
      capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert "wrote dpjax checkpoint" in result.stdout
  assert dpjax.load_model(str(out)).config.num_kv_heads == 1
  again = subprocess.run(
      [sys.executable, "-m", "checkpoints_convert.convert_cli",
       f"--hf_model={hf_checkpoint_dir('llama_kv1')}", f"--output_dir={out}"],
      capture_output=True, text=True, timeout=300)
  assert again.returncode != 0
  assert "already exists" in again.stderr and "--overwrite" in again.stderr


# ----------------------------------------------------------------------------
# Bad input: a clear error, and nothing left behind.


@pytest.fixture
def broken(hf_checkpoint_dir, tmp_path):
  """A writable copy of the single-file llama_mha checkpoint, and helpers."""
  source = tmp_path / "source"
  shutil.copytree(hf_checkpoint_dir("llama_mha"), source)
  out_parent = tmp_path / "out"
  out_parent.mkdir()

  class Broken:
    dir = str(source)
    output = str(out_parent / "converted")

    @staticmethod
    def edit_tensors(fn):
      path = source / "model.safetensors"
      tensors = load_file(path)
      save_file(fn(tensors), path, metadata={"format": "pt"})

    @staticmethod
    def edit_config(**changes):
      path = source / "config.json"
      config = json.loads(path.read_text())
      config.update(changes)
      path.write_text(json.dumps(config))

    @staticmethod
    def convert_fails(match):
      with pytest.raises((ValueError, FileExistsError), match=match):
        convert(str(source), Broken.output)
      assert os.listdir(out_parent) == [], "a failed conversion left files behind"

  return Broken


def test_refuses_unsupported_architecture(broken):
  broken.edit_config(model_type="gpt2")
  broken.convert_fails(r"model_type='gpt2'.*llama, mistral, qwen2, qwen3, gemma2, gemma3_text, "
                       r"phi3")


@pytest.mark.parametrize("attribute,value,match", [
    ("rope_parameters", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64},
     r"rope_parameters.rope_type='yarn' is not supported"),
    ("hidden_act", "gelu", r"hidden_act='gelu' is not supported"),
    ("quantization_config", {"quant_method": "bitsandbytes"}, r"quantization_config"),
])
def test_refuses_config_attributes_it_does_not_implement(broken, attribute, value, match):
  broken.edit_config(**{attribute: value})
  broken.convert_fails(match)


def test_refuses_missing_tensor(broken):
  broken.edit_tensors(lambda t: {k: v for k, v in t.items()
                                 if k != "model.layers.2.mlp.up_proj.weight"})
  broken.convert_fails(r"missing tensors \['model.layers.2.mlp.up_proj.weight'\]")


def test_refuses_extra_tensor(broken):
  broken.edit_tensors(lambda t: {**t, "model.layers.0.self_attn.mystery.weight": np.ones(3, np.float32)})
  broken.convert_fails(r"does not know: \['model.layers.0.self_attn.mystery.weight'\]")


def test_refuses_wrong_shape(broken):
  broken.edit_tensors(lambda t: {**t, "model.layers.1.self_attn.k_proj.weight": np.ones((32, 64), np.float32)})
  broken.convert_fails(r"model.layers.1.self_attn.k_proj.weight has shape \(32, 64\), expected \(64, 64\)")


def test_refuses_truncated_safetensors(broken):
  path = os.path.join(broken.dir, "model.safetensors")
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.truncate(size // 2)
  broken.convert_fails(r"cannot read safetensors file .*model.safetensors.*truncated")


def test_refuses_garbage_safetensors(broken):
  with open(os.path.join(broken.dir, "model.safetensors"), "wb") as f:
    f.write(b"this is not a safetensors file at all")
  broken.convert_fails(r"cannot read safetensors file")


def test_refuses_index_naming_absent_shard(hf_checkpoint_dir, tmp_path):
  source = tmp_path / "source"
  shutil.copytree(hf_checkpoint_dir("llama_gqa_tied_sharded"), source)
  shard = sorted(f for f in os.listdir(source) if f.endswith(".safetensors"))[1]
  os.remove(source / shard)
  with pytest.raises(CheckpointError, match=f"shard files that are not in .*{shard}"):
    convert(str(source), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def test_refuses_checkpoint_without_safetensors(broken):
  os.remove(os.path.join(broken.dir, "model.safetensors"))
  broken.convert_fails(r"neither model.safetensors nor model.safetensors.index.json")


def test_refuses_existing_output_unless_overwrite(broken, hf_checkpoint_dir):
  os.makedirs(broken.output)
  marker = os.path.join(broken.output, "config.json")  # an earlier output's
  open(marker, "w").close()
  with pytest.raises(FileExistsError, match="already exists.*--overwrite"):
    convert(broken.dir, broken.output)
  assert os.path.exists(marker)
  # A failed overwrite leaves the old output as it was.
  broken.edit_config(model_type="gpt2")
  with pytest.raises(ValueError, match="unsupported architecture"):
    convert(broken.dir, broken.output, overwrite=True)
  assert os.listdir(broken.output) == ["config.json"]
  convert(hf_checkpoint_dir("llama_mha"), broken.output, overwrite=True)
  assert "dpjax_config.json" in os.listdir(broken.output)
  assert os.listdir(os.path.dirname(broken.output)) == ["converted"]


def test_unreachable_hub_id_says_what_to_do(tmp_path, monkeypatch):
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
  with pytest.raises(CheckpointError, match=r"'some-org/no-such-model' is not a local directory "
                     r"and could not be fetched.*Pass a local checkpoint directory"):
    convert("some-org/no-such-model", str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")


def test_missing_local_directory_is_named(tmp_path):
  with pytest.raises(CheckpointError, match="no checkpoint directory at"):
    convert(str(tmp_path / "nowhere" / "model"), str(tmp_path / "out"))


def test_every_architecture_has_a_complete_table():
  """Each supported family's table covers every tensor HF's model has, nothing more."""
  for name, variant in reference.VARIANTS.items():
    model = reference.build_hf_model(variant.family, variant.config)
    hf = model.config
    cfg = architectures.model_config_from_hf(hf, "float32")
    names = set(architectures.expected_hf_tensors(cfg))
    state = set(model.state_dict())
    if cfg.tie_word_embeddings:
      state.discard("lm_head.weight")
    assert names == state, name


def test_new_families_refuse_what_they_do_not_implement_by_name():
  import transformers
  base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2)
  longrope = transformers.Phi3Config(
      **base, max_position_embeddings=64, original_max_position_embeddings=8,
      rope_parameters=dict(rope_type="longrope", rope_theta=1e4, long_factor=[1.0] * 8,
                           short_factor=[1.0] * 8))
  with pytest.raises(architectures.UnsupportedModelError,
                     match=r"rope_type='longrope' is not supported.*Phi-3"):
    architectures.model_config_from_hf(longrope, "float32")
  gelu_exact = transformers.Gemma2Config(**base, head_dim=16, hidden_activation="gelu")
  with pytest.raises(architectures.UnsupportedModelError,
                     match=r"hidden_activation='gelu' is not supported"):
    architectures.model_config_from_hf(gelu_exact, "float32")
  bidirectional = transformers.Gemma3TextConfig(**base, head_dim=16,
                                                use_bidirectional_attention=True)
  with pytest.raises(architectures.UnsupportedModelError, match="use_bidirectional_attention"):
    architectures.model_config_from_hf(bidirectional, "float32")
  with pytest.raises(architectures.UnsupportedModelError,
                     match=r"model_type='gemma3'.*Gemma3ForCausalLM"):
    architectures.check_model_type({"model_type": "gemma3"})


def test_gemma_configs_map_to_the_model_settings():
  """What the converter reads from each Gemma config, field by field."""
  from tests.support.reference import VARIANTS, _CONFIG_CLASSES
  g2 = VARIANTS["gemma2_softcap_window"]
  cfg = architectures.model_config_from_hf(_CONFIG_CLASSES["gemma2"](**g2.config), "float32")
  assert (cfg.embed_scale, cfg.norm_kind, cfg.post_norms, cfg.mlp_activation) == (
      True, "gemma", True, "gelu_tanh")
  assert cfg.query_pre_attn_scalar == 24 and cfg.attn_logit_softcap == 5.0
  assert cfg.final_logit_softcap == 3.0 and cfg.sliding_layers == (True, False, False, True)
  assert cfg.local_rope_theta is None and not cfg.qk_norm
  g3 = VARIANTS["gemma3_qk_norm_local_rope"]
  cfg = architectures.model_config_from_hf(_CONFIG_CLASSES["gemma3_text"](**g3.config), "float32")
  assert cfg.qk_norm and cfg.attn_logit_softcap is None  # Gemma 3 ignores it, as HF does
  assert (cfg.rope_type, cfg.rope_factor, cfg.rope_theta, cfg.local_rope_theta) == (
      "linear", 8.0, 1e6, 1e4)
