"""Pruned GGUF files: the kept blocks' stored tensors renumbered, every per-layer metadata
array cut, and the file reloaded by transformers' GGUF loading with dpjax's kept-block
logits; on tiny Llama and Gemma 3 files (the real Gemma 3 270M's pruned file is checked in
test_real_models.py, where that model is loaded once)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import transformers

import dpjax
from dpjax.checkpoints.gguf_export import check_index_pattern, prune_gguf, stated_pattern
from dpjax.variants import export as variant_export
from tests.support import reference


def _with_per_layer_array(source: str, output: str) -> None:
  """`source` again, with one more metadata key: a per-layer array (0, 1, ..., L-1)."""
  from gguf import GGUFReader, GGUFValueType, GGUFWriter
  reader = GGUFReader(source)
  arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
  layers = int(reader.fields[f"{arch}.block_count"].contents())
  writer = GGUFWriter(output, arch)
  for key, field in reader.fields.items():
    if key.startswith("GGUF.") or key == "general.architecture":
      continue
    sub = field.types[-1] if field.types[0] == GGUFValueType.ARRAY else None
    writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
  writer.add_key_value(f"{arch}.test_per_layer", list(range(layers)), GGUFValueType.ARRAY,
                       sub_type=GGUFValueType.UINT32)
  for t in reader.tensors:
    writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def _hf_logits(directory: str, ids: np.ndarray, gguf_file: str | None = None) -> np.ndarray:
  if gguf_file:  # the dense model, as dpjax dequantizes
    hf = reference.load_hf_gguf(os.path.join(directory, gguf_file), torch.float32)
  else:
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
  with torch.no_grad():
    return hf(input_ids=torch.as_tensor(ids)).logits.double().numpy(), hf.config


def _relative(got, want) -> float:
  return float(np.abs(got - want).max() / np.abs(want).max())


def test_a_pruned_tiny_llama_gguf_reloads_with_the_kept_blocks_logits(tmp_path):
  source = str(tmp_path / "tiny.gguf")
  reference.write_gguf("llama_gqa_tied_sharded", str(tmp_path / "plain.gguf"), seed=5)
  _with_per_layer_array(str(tmp_path / "plain.gguf"), source)
  model = dpjax.load_model(source, dtype="float32")
  kept = [0, 2]
  assert model.num_layers > len(kept)
  out = tmp_path / "out"
  out.mkdir()
  prune_gguf(source, str(out / "pruned.gguf"), kept)
  from gguf import GGUFReader
  fields = GGUFReader(str(out / "pruned.gguf")).fields
  assert int(fields["llama.block_count"].contents()) == 2
  assert list(fields["llama.test_per_layer"].contents()) == kept  # the kept layers' entries
  ids = reference.random_batch(model.config.vocab_size, 2, 12, seed=1)[0]
  want = np.asarray(model.logits(ids, keep=dpjax.keep_mask(kept, model.num_layers)), np.float64)
  got, config = _hf_logits(str(out), ids, gguf_file="pruned.gguf")
  assert config.num_hidden_layers == 2
  assert _relative(got, want) <= 1e-5
  # dpjax reads the pruned file back to the same numbers, bit for bit.
  again = np.asarray(dpjax.load_model(str(out / "pruned.gguf"), dtype="float32").logits(ids))
  assert np.array_equal(again, want.astype(np.float32))
  # Dequantized: every tensor float32, the same numbers (dpjax dequantizes on loading).
  prune_gguf(source, str(out / "f32.gguf"), kept, dequantize=True)
  reader = GGUFReader(str(out / "f32.gguf"))
  assert {t.tensor_type.name for t in reader.tensors} == {"F32"}
  assert {t.tensor_type.name for t in GGUFReader(str(out / "pruned.gguf")).tensors} != {"F32"}
  assert int(reader.fields["general.file_type"].contents()) == 0
  dense = np.asarray(dpjax.load_model(str(out / "f32.gguf"), dtype="float32").logits(ids))
  assert np.array_equal(dense, want.astype(np.float32))


def test_a_kept_set_that_moves_attention_kinds_is_stated_for_gemma3_and_refused_for_gemma2():
  """Gemma 3 files can state each block's kind (llama.cpp's per-layer
  sliding_window_pattern): the kept blocks' own kinds are written where their new
  indices would give others. Gemma 2's kinds come from the index in every reader: a kept
  set that moves them is refused, naming the blocks."""
  without_5 = [i for i in range(18) if i != 5]
  check_index_pattern("gemma3", without_5)  # stated, not refused
  assert stated_pattern("gemma3", without_5) == [(k + 1) % 6 != 0 for k in without_5]
  assert stated_pattern("gemma3", [i for i in range(18) if not 6 <= i <= 11]) is None
  # A source that already states its kinds: they come from it, not from its indices.
  source = [True, False, True, True]
  assert stated_pattern("gemma3", [0, 1, 3], source) == [True, False, True]
  assert stated_pattern("gemma3", [0, 2, 3], [True, True, True, True]) is None
  with pytest.raises(ValueError, match=r"block 1 \(full\) would load as block 0 \(sliding\)"):
    check_index_pattern("gemma2", [1, 2, 3])
  check_index_pattern("gemma2", [2, 3])  # a whole period
  check_index_pattern("llama", [3, 9])  # no index pattern: anything goes


def test_a_gemma3_kept_set_that_moves_a_global_block_states_the_kinds_and_reloads(tmp_path,
                                                                                 monkeypatch):
  """A 7-block Gemma 3 file (block 5 global, by index) without block 2: block 5 moves to
  index 4, which the index pattern makes sliding. The pruned file states every block's
  kind (`gemma3.attention.sliding_window_pattern`), dpjax's reader reads them back to the
  kept blocks' logits bit for bit, transformers reads the kinds by index (and gets other
  logits), and dpjax-prune's export step checks the file with dpjax's reader, saying why."""
  from gguf import GGUFReader
  types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(7)]
  source = str(tmp_path / "g3.gguf")
  reference.write_gguf("gemma3_qk_norm_local_rope", source, seed=4,
                       config_overrides=dict(num_hidden_layers=7, layer_types=types))
  model = dpjax.load_model(source, dtype="float32")
  assert model.config.sliding_layers == tuple(t == "sliding_attention" for t in types)
  kept = [0, 1, 3, 4, 5, 6]
  prune_gguf(source, str(tmp_path / "shifted.gguf"), kept)
  field = GGUFReader(str(tmp_path / "shifted.gguf")).fields[
      "gemma3.attention.sliding_window_pattern"]
  assert [bool(v) for v in field.contents()] == [True, True, True, True, False, True]
  ids = reference.random_batch(model.config.vocab_size, 2, 16, seed=5)[0]
  want = np.asarray(model.logits(ids, keep=dpjax.keep_mask(kept, 7)))
  reloaded = dpjax.load_model(str(tmp_path / "shifted.gguf"), dtype="float32")
  assert reloaded.config.sliding_layers == (True, True, True, True, False, True)
  assert np.array_equal(np.asarray(reloaded.logits(ids)), want)
  by_index, _ = _hf_logits(str(tmp_path), ids, gguf_file="shifted.gguf")
  assert _relative(by_index, want) > 1e-3  # the kinds matter: read by index, other logits
  out = tmp_path / "out"
  out.mkdir()
  # The tiny word vocabulary has no unknown token: no text encodes, so the tokenizer
  # check (tested on Llama files above) is recorded here, not run.
  compared = []
  monkeypatch.setattr(variant_export, "_same_tokenization",
                      lambda *args: compared.append(args) or {"same_ids": True})
  record = variant_export.export_variant(source, str(out), kept, gguf=True)
  assert compared == [(str(out / "model"), str(out), "model.gguf")]
  check = record["gguf"]["verification"]
  assert record["gguf"]["attention_kinds"] == "stated per layer"
  assert check["transformers_check"].startswith("not possible: transformers ")
  assert check["blocks_loaded"] == 6 and check["max_relative_difference"] == 0.0
  assert check["tokenizer"]["same_ids"]


def test_dpjax_prune_exports_a_gguf_source_as_hf_and_gguf_and_checks_both(tmp_path):
  """dpjax-prune's export step on a GGUF source: the HF checkpoint and the pruned GGUF
  file, each reloaded by transformers and checked (logits; the GGUF file's tokenizer
  against the HF export's), with the checks recorded."""
  source = str(tmp_path / "tiny.gguf")
  reference.write_gguf("llama_gqa_tied_sharded", source, seed=2)
  out = tmp_path / "out"
  out.mkdir()
  record = variant_export.export_variant(source, str(out), [0, 3], gguf=True)
  assert sorted(os.listdir(out)) == ["model", "model.gguf"]
  assert record["verification"]["blocks_loaded"] == 2
  check = record["gguf"]["verification"]
  assert check["blocks_loaded"] == 2 and check["max_relative_difference"] <= 1e-5
  assert check["tokenizer"]["same_ids"]
