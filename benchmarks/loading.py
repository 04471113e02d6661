"""Loading straight onto the mesh: per-device weight bytes and the host's peak while loading.

    python -m benchmarks.loading            # a 1.0 GB multi-shard Llama on 8 fake devices
    python -m benchmarks.loading --hidden=256 --layers=4 --vocab=4096 --shard_mb=2  # smoke

A random Llama checkpoint saved as several safetensors shards (written with numpy,
`benchmarks.common.random_llama_checkpoint`: no torch needed) is loaded by
`dpjax.load_model` with the model axis at 8 on 8 devices (CPU devices faked with
`--xla_force_host_platform_device_count=8`, in a fresh process). Reported:

* each device's weight bytes against the ideal split (the whole model over 8);
* the host's anonymous resident memory (sampled every 2 ms) above the process's
  baseline, less the bytes the devices hold at the end (CPU devices live in host
  memory), against the largest tensor of the checkpoint: what loading needs on its
  own, beside what it loads.

Writes `benchmarks/results/loading.json`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

from absl import app
from absl import flags

from benchmarks import common

FLAGS = flags.FlagValues()  # this program's own flags (see common.run_program)

HERE = os.path.dirname(os.path.abspath(__file__))

_OUT = flags.DEFINE_string("out", os.path.join(HERE, "results", "loading.json"),
                           "Where the JSON goes.", flag_values=FLAGS)
_HIDDEN = flags.DEFINE_integer("hidden", 1024, "The model's hidden size (a multiple of 8).",
                               flag_values=FLAGS)
_LAYERS = flags.DEFINE_integer("layers", 16, "Its blocks.", flag_values=FLAGS)
_VOCAB = flags.DEFINE_integer("vocab", 32768, "Its vocabulary (a multiple of 8).",
                              flag_values=FLAGS)
_SHARD_MB = flags.DEFINE_integer("shard_mb", 200, "The largest safetensors shard, MB.",
                                 flag_values=FLAGS)


def llama_config(hidden: int, layers: int, vocab: int) -> dict[str, Any]:
  """A Llama config whose every split dimension divides by 8."""
  return dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2,
              num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
              max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)


def save_checkpoint(directory: str, config: dict[str, Any], shard_mb: int) -> str:
  """A random HF Llama in float32, in shards of at most `shard_mb` MB."""
  return common.random_llama_checkpoint(directory, config, seed=0, shard_mb=shard_mb)


_MEASURE = r"""
import json, sys
import jax, numpy as np
sys.path.insert(0, {root!r})
from benchmarks.common import PeakMemory
import dpjax
from dpjax.engine.devices import Placement
from safetensors import safe_open
from dpjax.checkpoints.hf import weight_files

largest = 0
for path in weight_files({directory!r}):
  with safe_open(path, framework="numpy") as f:
    for name in f.keys():
      shape = f.get_slice(name).get_shape()
      largest = max(largest, int(np.prod(shape)) * 4)
placement = Placement.create({model_axis})
# The config is parsed (transformers imported) before the baseline: a fixed cost, not
# memory the weights need.
from dpjax.checkpoints.hf import HFCheckpoint
HFCheckpoint.open({directory!r})
import gc; gc.collect()
with PeakMemory() as memory:
  model = dpjax.load_model({directory!r}, placement=placement)
  jax.block_until_ready(jax.tree.leaves(model.params()))
per_device = {{}}
for leaf in jax.tree.leaves(model.params()):
  for shard in leaf.addressable_shards:
    per_device[str(shard.device.id)] = per_device.get(str(shard.device.id), 0) + shard.data.nbytes
total = sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(model.params()))
on_devices = sum(per_device.values())
print(json.dumps(dict(devices=len(jax.devices()), model_axis={model_axis},
    mesh=dict(placement.mesh.shape), total_bytes=total, ideal_bytes=total / len(jax.devices()),
    per_device_bytes=per_device, largest_tensor_bytes=largest, host_start_bytes=memory.start,
    host_peak_bytes=memory.peak, device_bytes=on_devices,
    transient_bytes=memory.peak - memory.start - on_devices)))
"""


def measure(directory: str, devices: int = 8, model_axis: int = 8) -> dict[str, Any]:
  """Loads `directory` in a fresh process with `devices` CPU devices; the figures above."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  code = _MEASURE.format(root=os.path.dirname(HERE), directory=directory, model_axis=model_axis)
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=1800)
  if result.returncode != 0:
    raise RuntimeError(f"loading failed: {result.stderr[-3000:]}")
  out = json.loads(result.stdout.strip().splitlines()[-1])
  worst = max(out["per_device_bytes"].values())
  out["worst_device_over_ideal"] = worst / out["ideal_bytes"]
  out["transient_over_largest_tensor"] = out["transient_bytes"] / out["largest_tensor_bytes"]
  return out


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    config = llama_config(hidden=_HIDDEN.value, layers=_LAYERS.value, vocab=_VOCAB.value)
    save_checkpoint(tmp, config, shard_mb=_SHARD_MB.value)
    shards = len([n for n in os.listdir(tmp) if n.endswith(".safetensors")])
    out = measure(tmp)
  out.update(config=config, shards=shards)
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  with open(_OUT.value, "w") as f:
    json.dump(out, f, indent=1)
  print(f"{shards} shards, {out['total_bytes'] / 1e9:.2f} GB on {out['devices']} devices "
        f"(model axis {out['model_axis']}): the fullest device holds "
        f"{out['worst_device_over_ideal']:.3f}x the ideal share; loading needed "
        f"{out['transient_bytes'] / 1e6:.0f} MB of host memory beside the weights "
        f"({out['transient_over_largest_tensor']:.2f}x the largest tensor, "
        f"{out['largest_tensor_bytes'] / 1e6:.0f} MB)")


if __name__ == "__main__":
  common.run_program(main, FLAGS)
