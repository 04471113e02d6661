"""Figures for the foundation: HF parity per variant, conversion memory, forward speed,
and the same for the three real GGUF models.

    python -m benchmarks.foundation [--quick] [--noreal]

1. Parity: for every supported variant (a tiny random HF checkpoint written with
   `save_pretrained`), the largest |logit difference| and the largest KL between
   dpjax and HF PyTorch in float32, on a left-padded batch.
2. Conversion memory: peak resident memory added by `dpjax-convert` (sampled
   every 2 ms in a fresh subprocess, over its resident size before the
   conversion started) against the checkpoint's size on disk, for a random
   Llama of about 100 MB, single-file and sharded.
3. Forward speed: one full forward pass (logits), dpjax against HF PyTorch on
   the same batch in the same process, warm, median of repeats; plus a pruned
   variant (gather form, half the blocks) against HF with those blocks deleted.
4. Real models (`tests.support.real_models`: SmolLM2-135M, Gemma 3 270M,
   Qwen2.5-Coder-0.5B, GGUF): logits against transformers' loading of the same
   file (max |diff| and its ratio to the largest |logit|), conversion time and
   peak memory of `dpjax-convert` against the model's float32 size, and one
   forward pass against HF PyTorch on the same batch.

`--quick`: two variants' parity, a smaller model, two repeats. It needs torch (every
checkpoint is written, and every figure but the conversion's taken, against HF
PyTorch). Writes `benchmarks/results/foundation.json` and prints a Markdown table.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from benchmarks import common
from dpjax.checkpoints import gguf

FLAGS = flags.FlagValues()  # this program's own flags (see common.run_program)

# A smoke run's parity: a Llama (GQA, tied, sharded) and a Gemma 3 (q/k norms, local RoPE).
QUICK_VARIANTS = ("llama_gqa_tied_sharded", "gemma3_qk_norm_local_rope")

_QUICK = flags.DEFINE_bool("quick", False, "Smaller model and fewer repeats (a smoke run).",
                           flag_values=FLAGS)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats per measurement (median reported).",
                                flag_values=FLAGS)
_VARIANTS = flags.DEFINE_list("variants", None, "The variants whose parity is measured "
                              "(default: every one; with --quick, "
                              f"{', '.join(QUICK_VARIANTS)}).", flag_values=FLAGS)
_REAL = flags.DEFINE_bool("real", True, "Measure the three real GGUF models too.",
                          flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results",
                                               "foundation.json"), "Where to write the figures.",
                           flag_values=FLAGS)


def _kl_max(p_logits, q_logits):
  def logsoftmax(x):
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
  lp, lq = logsoftmax(p_logits), logsoftmax(q_logits)
  return float((np.exp(lp) * (lp - lq)).sum(-1).max())


def parity(variants=None) -> list[dict]:
  import dpjax
  from tests.support import reference
  rows = []
  for name in variants or sorted(reference.VARIANTS):
    with tempfile.TemporaryDirectory() as d:
      reference.save_variant(name, d, seed=11)
      model = dpjax.load_model(d, dtype="float32")
      ref = reference.load_hf(d)
      ids, mask = reference.random_batch(model.config.vocab_size, 4, 24, seed=3, padding="left")
      want, hidden = reference.hf_forward(ref, ids, mask)
      got = np.asarray(model.logits(ids, attention_mask=mask))
      ours_hidden = np.asarray(model.hidden_states(ids, attention_mask=mask))
      real = mask.astype(bool)
      n = model.num_layers
      rows.append(dict(
          variant=name,
          max_abs_logit_diff=float(np.abs(got - want)[real].max()),
          max_kl=_kl_max(want[real], got[real]),
          max_abs_hidden_diff=float(np.abs(ours_hidden[:n] - hidden[:n])[:, real].max()),
          logit_scale=float(np.abs(want[real]).max())))
  return rows


_MEMORY_PROBE = r"""
import json, os, sys, threading, time
import dpjax, dpjax.checkpoints.convert as c, jax, transformers, orbax.checkpoint

def rss():
  # Anonymous resident memory: what the process allocated. File pages mapped
  # from the safetensors files are page cache, reclaimable, and not counted.
  with open("/proc/self/status") as f:
    return 1024 * int(next(l for l in f if l.startswith("RssAnon")).split()[1])

# Parsing the config imports transformers' model modules: a fixed cost, paid
# before the weights are touched, so it is excluded.
c.open_source(sys.argv[1])
before = rss()
peak = [before]
done = threading.Event()

def sample():
  while not done.is_set():
    peak[0] = max(peak[0], rss())
    time.sleep(0.002)

thread = threading.Thread(target=sample)
thread.start()
t = time.perf_counter()
c.convert(sys.argv[1], sys.argv[2])
seconds = time.perf_counter() - t
done.set()
thread.join()
print(json.dumps({"rss_before": before, "rss_peak": max(peak[0], rss()), "seconds": seconds}))
"""


def _dir_bytes(directory: str) -> int:
  return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
             if f.endswith(".safetensors"))


def conversion_memory(quick: bool) -> list[dict]:
  from tests.support import reference
  config = dict(vocab_size=16000, hidden_size=384, intermediate_size=1024,
                num_hidden_layers=8, num_attention_heads=6, num_key_value_heads=2,
                max_position_embeddings=512, tie_word_embeddings=False)
  if quick:
    config.update(num_hidden_layers=2, vocab_size=4000)
  model = reference.build_hf_model("llama", config)
  rows = []
  with tempfile.TemporaryDirectory() as d:
    for layout, kwargs in (("single file", {}), ("sharded 20MB", {"max_shard_size": "20MB"})):
      src = os.path.join(d, layout.replace(" ", "_"))
      model.save_pretrained(src, **kwargs)
      out = os.path.join(d, "out_" + layout.replace(" ", "_"))
      proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, src, out],
                            capture_output=True, text=True, check=True)
      probe = json.loads(proc.stdout.strip().splitlines()[-1])
      size = _dir_bytes(src)
      added = probe["rss_peak"] - probe["rss_before"]
      rows.append(dict(layout=layout, checkpoint_mb=size / 1e6, peak_added_mb=added / 1e6,
                       peak_over_size=added / size, seconds=probe["seconds"]))
  return rows


def _median_time(fn, repeats: int) -> tuple[float, float]:
  fn()  # warm-up (and compilation) excluded
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times)), float(np.max(times) - np.min(times))


def forward_speed(quick: bool, repeats: int) -> list[dict]:
  import jax
  import torch
  import dpjax
  from tests.support import reference
  config = dict(vocab_size=8000, hidden_size=512, intermediate_size=1408, num_hidden_layers=16,
                num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
  batch, length = 8, 128
  if quick:
    config.update(num_hidden_layers=4)
    batch, length = 2, 32
  rows = []
  with tempfile.TemporaryDirectory() as d:
    hf = reference.build_hf_model("llama", config)
    hf.save_pretrained(d)
    model = dpjax.load_model(d, dtype="float32")
    hf = reference.load_hf(d)
    hf.config._attn_implementation = "sdpa"  # HF's default, the fair opponent
    ids, _ = reference.random_batch(config["vocab_size"], batch, length, seed=0)
    ids_t = torch.as_tensor(ids, dtype=torch.long)
    n = config["num_hidden_layers"]
    for label, keep in (("full model", np.ones(n, bool)),
                        ("half the blocks kept", np.arange(n) % 2 == 0)):
      ref = hf if keep.all() else reference.delete_blocks(reference.load_hf(d), keep)
      ref.config._attn_implementation = "sdpa"

      def run_hf():
        with torch.no_grad():
          ref(input_ids=ids_t, use_cache=False).logits.numpy()

      def run_dpjax():
        jax.block_until_ready(model.logits(ids, keep=keep))

      hf_s, hf_spread = _median_time(run_hf, repeats)
      jx_s, jx_spread = _median_time(run_dpjax, repeats)
      rows.append(dict(case=label, batch=batch, tokens=length, hf_seconds=hf_s,
                       hf_spread=hf_spread, dpjax_seconds=jx_s, dpjax_spread=jx_spread,
                       speedup=hf_s / jx_s))
  return rows


PROMPTS = ("The capital of France is",
           "Question: Which gas do plants take in from the air to make food?\nAnswer:",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")


def real_model_rows(quick: bool, repeats: int) -> list[dict]:
  """Parity, conversion and forward time of each real GGUF model (see the docstring)."""
  import jax
  import torch
  import transformers
  import dpjax
  from tests.support import real_models
  rows = []
  for key, spec in real_models.MODELS.items():
    path = real_models.fetch(key)
    directory, name = os.path.dirname(path), os.path.basename(path)
    row = {"model": key, "file": name, "architecture": spec.architecture,
           "layers": spec.num_layers}
    with tempfile.TemporaryDirectory() as d:
      proc = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, path, os.path.join(d, "out")],
                            capture_output=True, text=True, check=True)
      probe = json.loads(proc.stdout.strip().splitlines()[-1])
    model = dpjax.load_model(path)
    f32_bytes = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(model.params()))
    row.update(file_mb=os.path.getsize(path) / 1e6, float32_mb=f32_bytes / 1e6,
               convert_seconds=probe["seconds"],
               convert_peak_added_mb=(probe["rss_peak"] - probe["rss_before"]) / 1e6,
               convert_peak_over_float32=(probe["rss_peak"] - probe["rss_before"]) / f32_bytes)
    tokenizer = real_models.tokenizer(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(  # dense, as dpjax computes it
        directory, dtype=torch.float32, **gguf.transformers_dense_kwargs(path)).eval()
    rows_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    length = max(map(len, rows_ids))
    ids = np.zeros((len(rows_ids), length), np.int64)
    mask = np.zeros_like(ids)
    for r, t in enumerate(rows_ids):
      ids[r, length - len(t):], mask[r, length - len(t):] = t, 1
    from tests.support import reference
    want, _ = reference.hf_forward(hf, ids, mask)
    got = np.asarray(model.logits(ids, attention_mask=mask))
    real = mask.astype(bool)
    diff = float(np.abs(got - want)[real].max())
    row.update(max_abs_logit_diff=diff, logit_scale=float(np.abs(want[real]).max()),
               relative_diff=diff / float(np.abs(want[real]).max()))
    batch, tokens = (2, 32) if quick else (8, 128)
    fwd_ids = np.random.default_rng(0).integers(100, 1000, size=(batch, tokens))
    ids_t = torch.as_tensor(fwd_ids)
    hf.config._attn_implementation = "sdpa"

    def run_hf():
      with torch.no_grad():
        hf(input_ids=ids_t, use_cache=False).logits.numpy()

    hf_s, _ = _median_time(run_hf, repeats)
    jx_s, _ = _median_time(lambda: jax.block_until_ready(model.logits(fwd_ids)), repeats)
    row.update(forward_batch=batch, forward_tokens=tokens, hf_forward_seconds=hf_s,
               dpjax_forward_seconds=jx_s, forward_speedup=hf_s / jx_s)
    print(f"real model {key}: {row}", flush=True)
    rows.append(row)
    del model, hf
  return rows


def main(argv):
  del argv
  if not common.has_torch():
    raise SystemExit("benchmarks.foundation measures dpjax against HF PyTorch, and torch is "
                     "not installed: pip install torch")
  import jax
  import torch
  quick = _QUICK.value
  repeats = 2 if quick else _REPEATS.value
  variants = _VARIANTS.value or (QUICK_VARIANTS if quick else None)
  results = dict(
      machine=dict(platform=platform.platform(), processor=platform.processor(),
                   cpu_count=os.cpu_count(), jax_backend=jax.default_backend(),
                   jax_devices=[str(dev) for dev in jax.devices()],
                   torch_threads=torch.get_num_threads()),
      quick=quick,
      parity=parity(variants),
      conversion_memory=conversion_memory(quick),
      forward_speed=forward_speed(quick, repeats),
      real_models=real_model_rows(quick, repeats) if _REAL.value else [])
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  from dpjax.fileio import atomic_write_text
  atomic_write_text(_OUT.value, json.dumps(results, indent=2))

  print(f"machine: {results['machine']}\n")
  print("| variant | max abs logit diff | max KL | max abs hidden diff |")
  print("|---|---|---|---|")
  for r in results["parity"]:
    print(f"| {r['variant']} | {r['max_abs_logit_diff']:.2e} | {r['max_kl']:.2e} | "
          f"{r['max_abs_hidden_diff']:.2e} |")
  print("\n| checkpoint | size MB | peak added MB | peak / size | seconds |")
  print("|---|---|---|---|---|")
  for r in results["conversion_memory"]:
    print(f"| {r['layout']} | {r['checkpoint_mb']:.1f} | {r['peak_added_mb']:.1f} | "
          f"{r['peak_over_size']:.2f} | {r['seconds']:.2f} |")
  print("\n| forward | batch x tokens | HF s | dpjax s | HF / dpjax |")
  print("|---|---|---|---|---|")
  for r in results["forward_speed"]:
    print(f"| {r['case']} | {r['batch']}x{r['tokens']} | {r['hf_seconds']:.3f} | "
          f"{r['dpjax_seconds']:.3f} | {r['speedup']:.2f} |")
  if results["real_models"]:
    print("\n| real model | max abs logit diff | / max logit | convert s | convert peak MB "
          "(/ float32) | forward HF s | dpjax s | HF / dpjax |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["real_models"]:
      print(f"| {r['model']} ({r['architecture']}, {r['layers']} blocks) | "
            f"{r['max_abs_logit_diff']:.2e} | {r['relative_diff']:.1e} | "
            f"{r['convert_seconds']:.1f} | {r['convert_peak_added_mb']:.0f} "
            f"({r['convert_peak_over_float32']:.2f}) | {r['hf_forward_seconds']:.3f} | "
            f"{r['dpjax_forward_seconds']:.3f} | {r['forward_speedup']:.2f} |")


if __name__ == "__main__":
  common.run_program(main, FLAGS)
