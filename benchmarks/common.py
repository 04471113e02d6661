"""What the benchmark programs share: how they run, the machine they ran on, whether the
HF-PyTorch reference can run, the models a smoke run measures, the FLOPs of a block row."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import platform
import threading
import time
from typing import Any, Callable

import numpy as np

# The reference every ratio is taken against is HF transformers on PyTorch; torch is in the
# test extra, not in the default install.
NO_TORCH = ("torch is not installed: dpjax's side of each suite runs alone, without the "
            "HF-PyTorch reference and its ratios (`pip install torch` for them).")


def run_program(main: Callable[[list[str]], Any], flag_values) -> None:
  """`app.run(main)` for a benchmark program whose flags live on `flag_values`, its own
  `absl.flags.FlagValues`.

  The programs are modules the tests and the harness import side by side, and several
  share flag names (`--out`, `--items`, `--work_dir`) with different defaults: defined on
  the global FLAGS at import, the second import would raise DuplicateFlagError. So each
  defines its flags on its own FlagValues, and only the program being run hands them to
  the global FLAGS (where absl parses the command line and `--help` lists them).
  """
  import sys
  from absl import app
  from absl import flags
  for module_flags in flag_values.flags_by_module_dict().values():
    for flag in module_flags:  # `--help` lists the main module's flags
      flags.FLAGS.register_flag_by_module(sys.argv[0], flag)
  flags.FLAGS.append_flag_values(flag_values)

  def parsed_main(argv):
    flag_values.mark_as_parsed()  # the Flag objects are shared: parsed by the global FLAGS
    return main(argv)

  app.run(parsed_main)


def has_torch() -> bool:
  """Whether torch, and so the HF-PyTorch reference, can be imported."""
  return importlib.util.find_spec("torch") is not None


def machine() -> dict[str, Any]:
  """The machine and the libraries a measurement ran with (torch's fields None without it)."""
  import jax
  out = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
         "cpu_count": os.cpu_count(), "jax": jax.__version__,
         "jax_backend": jax.default_backend(),
         "jax_devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
         "torch": None, "torch_threads": None}
  if has_torch():
    import torch
    out.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
  return out


# ----------------------------------------------------------------------------
# The model a side benchmark measures: SmolLM2-135M on ARC-Easy (the committed runs), or
# the bundled model on the synthetic suite (a smoke run: offline, seconds).

MODELS = ("smollm2", "bundled")


@dataclasses.dataclass
class Measured:
  """A model to measure, its tokenizer, and the items it is measured on."""
  key: str
  path: str        # what `dpjax.load_model` takes: a GGUF file or an HF directory
  label: str       # for the results
  task: str        # the items' source, for the results
  tokenizer: Any

  def items(self, num_items: int, split: str = "test"):
    """The first `num_items` items: ARC-Easy validation, or the synthetic suite's `split`."""
    if self.key == "bundled":
      from dpjax.tasks import synthetic
      return synthetic.generate(split, num_items, seed=0)
    from tests.support import real_models
    return real_models.arc_easy_items(num_items)

  def hf(self, **kwargs):
    """The same checkpoint through HF transformers (PyTorch, float32, eval mode; a GGUF
    file as its dense model, as dpjax computes it)."""
    import torch
    import transformers
    if os.path.isdir(self.path):
      where, extra = self.path, {}
    else:
      from dpjax.checkpoints.gguf import transformers_dense_kwargs
      where, extra = os.path.dirname(self.path), transformers_dense_kwargs(self.path)
    return transformers.AutoModelForCausalLM.from_pretrained(
        where, dtype=torch.float32, **extra, **kwargs).eval()


def measured(key: str) -> Measured:
  """`smollm2` (`tests.support.real_models`, fetched once) or `bundled` (dpjax's own)."""
  if key == "bundled":
    import transformers
    from dpjax.bundled import BUNDLED_MODEL
    return Measured(key, BUNDLED_MODEL, "the bundled model (16 blocks, hidden 64)",
                    "synthetic suite, test split",
                    transformers.AutoTokenizer.from_pretrained(BUNDLED_MODEL))
  if key != "smollm2":
    raise ValueError(f"model {key!r}; the side benchmarks measure {MODELS}.")
  from tests.support import real_models
  path = real_models.fetch(key)
  return Measured(key, path, "SmolLM2-135M-Instruct (GGUF)", "ARC-Easy validation",
                  real_models.tokenizer(path))


def random_llama_checkpoint(directory: str, config: dict[str, Any], seed: int = 0,
                            shard_mb: float | None = None) -> str:
  """A random float32 HF Llama checkpoint written with numpy alone (no torch): HF's tensor
  names and `config.json`, weights N(0, 0.02) as HF initializes them, norms at 1;
  safetensors shards of at most `shard_mb` MB (with HF's index) or one file."""
  from safetensors.numpy import save_file
  c = dict(dict(rms_norm_eps=1e-5, tie_word_embeddings=False, max_position_embeddings=512,
                bos_token_id=1, eos_token_id=2, pad_token_id=0), **config)
  d, f, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
  heads = c["num_attention_heads"]
  kv = c.get("num_key_value_heads", heads)
  hd = c.get("head_dim", d // heads)
  rng = np.random.default_rng(seed)

  def normal(*shape):
    return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)

  tensors = {"model.embed_tokens.weight": normal(v, d)}
  for i in range(c["num_hidden_layers"]):
    p = f"model.layers.{i}."
    tensors.update({
        p + "self_attn.q_proj.weight": normal(heads * hd, d),
        p + "self_attn.k_proj.weight": normal(kv * hd, d),
        p + "self_attn.v_proj.weight": normal(kv * hd, d),
        p + "self_attn.o_proj.weight": normal(d, heads * hd),
        p + "mlp.gate_proj.weight": normal(f, d), p + "mlp.up_proj.weight": normal(f, d),
        p + "mlp.down_proj.weight": normal(d, f),
        p + "input_layernorm.weight": np.ones(d, np.float32),
        p + "post_attention_layernorm.weight": np.ones(d, np.float32)})
  tensors["model.norm.weight"] = np.ones(d, np.float32)
  if not c["tie_word_embeddings"]:
    tensors["lm_head.weight"] = normal(v, d)
  os.makedirs(directory, exist_ok=True)
  shards, size = [{}], 0
  for name, tensor in tensors.items():
    if shard_mb and shards[-1] and size + tensor.nbytes > shard_mb * 1e6:
      shards.append({})
      size = 0
    shards[-1][name] = tensor
    size += tensor.nbytes
  if len(shards) == 1:
    save_file(shards[0], os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  else:
    weight_map = {}
    for n, shard in enumerate(shards, start=1):
      name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
      save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
      weight_map.update(dict.fromkeys(shard, name))
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as out:
      json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
                 "weight_map": weight_map}, out, indent=2)
  with open(os.path.join(directory, "config.json"), "w") as out:
    json.dump(dict(c, architectures=["LlamaForCausalLM"], model_type="llama",
                   hidden_act="silu", head_dim=hd, num_key_value_heads=kv,
                   rope_theta=10000.0, dtype="float32"), out, indent=2)
  return directory


def block_row_flops(cfg, tokens: int) -> float:
  """FLOPs of one block on one item row of `tokens` tokens (matmuls; attention over all
  `tokens` keys, as the masked implementation computes it)."""
  d, hd, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
  q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
  projections = 2 * tokens * (d * (q + 2 * kv) + q * d + 3 * d * f)
  attention = 2 * 2 * tokens * tokens * q
  return float(projections + attention)


class PeakMemory:
  """Peak memory over a `with` block, above its start: the device's own count on an
  accelerator, the process's anonymous resident memory (sampled every 2 ms) on the CPU."""

  def __init__(self):
    import jax
    self.device = jax.devices()[0]
    self.stats = self.device.platform != "cpu" and bool(self.device.memory_stats())

  @staticmethod
  def _rss() -> int:
    with open("/proc/self/status") as f:
      return 1024 * int(next(line for line in f if line.startswith("RssAnon")).split()[1])

  def __enter__(self):
    if self.stats:
      self.start = self.device.memory_stats().get("bytes_in_use", 0)
      return self
    self.start = self.peak = self._rss()
    self._stop = threading.Event()

    def sample():
      while not self._stop.is_set():
        self.peak = max(self.peak, self._rss())
        time.sleep(0.002)

    self._thread = threading.Thread(target=sample, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    if self.stats:
      self.peak = self.device.memory_stats().get("peak_bytes_in_use", 0)
    else:
      self._stop.set()
      self._thread.join()
      self.peak = max(self.peak, self._rss())

  @property
  def added_mb(self) -> float:
    return max(self.peak - self.start, 0) / 2**20
