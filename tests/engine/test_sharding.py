"""The large-model path on 8 (fake CPU) devices: weights loaded straight onto the mesh, each
device holding only its slice; the vocabulary split; results equal to one device's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from benchmarks import loading
from tests.support import reference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_on_eight_devices(code: str) -> dict:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=env, timeout=900, cwd=ROOT)
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """A sharded HF checkpoint whose split dimensions divide by 8, the same converted by
  dpjax-convert, and two tiny GGUF files (llama: q/k rows permuted; Gemma 3)."""
  from dpjax.checkpoints.convert import convert
  root = tmp_path_factory.mktemp("sharding")
  hf = str(root / "hf")
  loading.save_checkpoint(hf, loading.llama_config(hidden=128, layers=3, vocab=512), shard_mb=1)
  reference.tiny_tokenizer(512).save_pretrained(hf)
  converted = convert(hf, str(root / "converted"))
  ggufs = {}
  for variant in ("llama_gqa_tied_sharded", "gemma3_qk_norm_local_rope"):
    ggufs[variant] = str(root / f"{variant}.gguf")
    reference.write_gguf(variant, ggufs[variant], seed=3)
  return {"hf": hf, "converted": converted, **ggufs}


def test_every_source_loads_onto_the_mesh_with_the_weights_of_one_device(sources):
  """HF safetensors shards, a converted (Orbax) checkpoint and GGUF files, on meshes of 8
  devices with the model axis at 2 and 8: every device holds only its slice of each split
  weight (the embedding and the head along the vocabulary), the values are exactly the
  one-device load's, and the logits agree."""
  out = _run_on_eight_devices(f"""
    import json
    import jax, numpy as np
    import dpjax
    from dpjax.engine.devices import Placement
    sources = {sources!r}
    report = {{}}
    ids = np.random.default_rng(0).integers(3, 90, (8, 12)).astype(np.int32)
    for name, path in sources.items():
      one = dpjax.load_model(path)
      want = {{k: np.asarray(v) for k, v in
               jax.tree_util.tree_leaves_with_path(one.params())}}
      logits = np.asarray(one.logits(ids))
      for axis in (2, 8):
        placement = Placement.create(axis)
        model = dpjax.load_model(path, placement=placement)
        got = dict(jax.tree_util.tree_leaves_with_path(model.params()))
        split, exact = [], True
        for key, leaf in got.items():
          name_ = jax.tree_util.keystr(key)
          exact &= bool(np.array_equal(np.asarray(leaf), want[key]))
          shard = leaf.addressable_shards[0].data.shape
          if shard != leaf.shape:
            split.append(name_)
          assert all(s.data.shape == shard for s in leaf.addressable_shards)
        diff = float(np.abs(np.asarray(model.logits(ids)) - logits).max())
        report[f"{{name}}/{{axis}}"] = dict(exact=exact, split=split, logits=diff,
                                            scale=float(np.abs(logits).max()))
    print(json.dumps(report))
  """)
  for key, r in out.items():
    assert r["exact"], key
    assert r["logits"] <= 1e-5 * max(1.0, r["scale"]), (key, r)
  for axis in (2, 8):  # every weight the rules split is split (the dimensions divide by 8)
    split = set(out[f"hf/{axis}"]["split"])
    for name in ("embed", "lm_head", "q", "k", "v", "o", "gate", "up", "down"):
      assert any(f"'{name}'" in s for s in split), (axis, name, split)
    assert set(out[f"converted/{axis}"]["split"]) == split
  # The tiny GGUF models' vocabulary (97) does not divide: the embedding stays whole.
  assert not any("'embed'" in s for s in out["llama_gqa_tied_sharded/2"]["split"])
  assert any("'q'" in s for s in out["gemma3_qk_norm_local_rope/8"]["split"])


def test_loading_splits_the_weights_evenly_and_holds_little_else(tmp_path):
  """A multi-shard checkpoint on 8 devices with the model axis at 8: each device holds its
  share within 5% of the ideal, and loading needs less host memory beside the weights
  than two of the checkpoint's largest tensors."""
  directory = str(tmp_path / "ckpt")
  loading.save_checkpoint(directory, loading.llama_config(hidden=512, layers=4, vocab=32768),
                          shard_mb=40)
  assert len([n for n in os.listdir(directory) if n.endswith(".safetensors")]) >= 3
  out = loading.measure(directory, devices=8, model_axis=8)
  assert out["mesh"] == {"data": 1, "model": 8}
  assert len(out["per_device_bytes"]) == 8
  assert out["worst_device_over_ideal"] <= 1.05
  assert 0 < out["largest_tensor_bytes"] and out["transient_bytes"] < 2 * out["largest_tensor_bytes"]


def test_the_split_vocabulary_reduces_as_the_whole_one():
  """The lens's one pass over a vocabulary split over 4 and 8 devices (chunks that overlap
  at a shard's end) gives the logits of the asked ids, the log-normalizer and the best
  other logit that numpy gives in float64."""
  out = _run_on_eight_devices("""
    import json
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import dpjax.lens.readout as readout
    rng = np.random.default_rng(0)
    V, d, N = 1000, 64, 5
    ids = np.array([[3, 7, -1]] * N); ids[1] = -1; ids[2] = [999, 0, 500]; ids[3] = [124, 125, 126]
    worst = 0.0
    for axis in (0, 1):
      w = rng.normal(size=(V, d)).astype(np.float32)
      x = rng.normal(size=(N, d)).astype(np.float32)
      z = x.astype(np.float64) @ w.T.astype(np.float64)
      lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
      other = z.copy()
      for n in range(N):
        other[n, ids[n][ids[n] >= 0]] = -np.inf
      at = np.take_along_axis(z, ids.clip(0), 1)
      for shards in (1, 4, 8):
        for chunk in (96, 4096):
          readout.VOCAB_CHUNK = chunk
          mesh = Mesh(np.array(jax.devices()[:shards]).reshape(1, shards), ("data", "model"))
          stored = w if axis == 0 else w.T.copy()
          spec = P("model", None) if axis == 0 else P(None, "model")
          weight = jax.device_put(stored, NamedSharding(mesh, spec))
          read = jax.jit(lambda weight, x, ids: readout.Unembedding(weight, axis, None, shards)
                         .read(x, ids, rival=True))
          got = read(weight, x, ids)
          assert bool(np.all(np.isneginf(np.asarray(got.at_ids)) == (ids < 0)))
          errors = [np.abs(np.asarray(got.log_normalizer) - lse).max(),
                    np.abs(np.asarray(got.rival) - other.max(1)).max(),
                    np.abs(np.where(ids >= 0, np.asarray(got.at_ids) - at, 0)).max()]
          worst = max(worst, float(max(errors)))
    print(json.dumps({"worst": worst}))
  """)
  assert out["worst"] < 2e-5
