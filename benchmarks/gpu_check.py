"""The prepared GPU check: one run on a machine with one GPU, inside 10 minutes.

    python benchmarks/gpu_check.py --out=OUT/gpu_check.json     # on the GPU machine
    python benchmarks/gpu_check.py --small --out=/tmp/check.json  # the same steps, tiny, CPU

The machine reaches no package registry; it has JAX with CUDA, flax, optax, orbax,
transformers and torch. The script

0. installs this project with `pip install -e . --no-deps` (unless `--noinstall`);
1. builds a random-weight Llama of about 1B parameters from its config (hidden 2048,
   16 blocks, vocabulary 32000; nothing over 64 MB is brought along) and saves it;
2. checks parity against HF PyTorch in float32 on the GPU (both at full float32
   precision: TF32 off), the unpruned model and one with a quarter of its blocks removed;
3. times two Iterative Pruning steps through `Sweep` against the HF reference
   (`tests.support.reference.HFIterativeReference`) on CUDA, the same removals checked;
4. times the throughput program (`dpjax.serve.throughput.measure`, a variant with a quarter of
   the blocks removed) against HF's CUDA `generate`;
5. runs the bundled study (`dpjax` with no flags) and records its wall time;
6. compares `dpjax-plan --target=local`'s predicted time of each program with its
   measured time (`benchmarks.planning.calibrate` on the 1B model);

and writes everything to one JSON, step by step (a step that fails records its error
and the rest still run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import common  # noqa: E402

FLAGS = flags.FlagValues()  # this program's own flags (see common.run_program)

_OUT = flags.DEFINE_string("out", "gpu_check.json", "Where the JSON goes.", flag_values=FLAGS)
_SMALL = flags.DEFINE_bool("small", False, "Tiny shapes (the test runs this on the CPU).",
                           flag_values=FLAGS)
_INSTALL = flags.DEFINE_bool("install", True, "pip install -e . --no-deps first.",
                             flag_values=FLAGS)
_ITEMS = flags.DEFINE_integer("items", 64, "Items of the Iterative Pruning comparison.",
                              flag_values=FLAGS)


def shapes(small: bool) -> dict[str, Any]:
  if small:
    return dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2)
  return dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
              num_attention_heads=32, num_key_value_heads=8)


def build_model(directory: str, small: bool) -> dict[str, Any]:
  """A random Llama saved with its tokenizer (a BPE trained on the synthetic suite)."""
  import torch
  import transformers
  from dpjax.tasks import synthetic
  config = dict(shapes(small), max_position_embeddings=512, rms_norm_eps=1e-5,
                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).float()
  with torch.no_grad():  # a spread of norms, as trained models have
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
  model.save_pretrained(directory)
  tokenizer = synthetic.build_tokenizer(synthetic.training_text(synthetic.generate("train", 400)),
                                        min(400, config["vocab_size"]))
  tokenizer.save_pretrained(directory)
  return {"parameters": sum(p.numel() for p in model.parameters()), "config": config}


def parity(directory: str) -> dict[str, Any]:
  import numpy as np
  import torch
  import dpjax
  from tests.support import reference
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  device = "cuda" if torch.cuda.is_available() else "cpu"
  model = dpjax.load_model(directory)
  hf = reference.load_hf(directory).to(device)
  ids, mask = reference.random_batch(model.config.vocab_size, 4, 64, seed=1, padding="left")
  out = {}
  L = model.num_layers
  for name, kept in (("unpruned", list(range(L))), ("quarter_removed", list(range(L - L // 4)))):
    keep = dpjax.keep_mask(kept, model.num_layers)
    want, _ = reference.hf_forward(reference.delete_blocks(hf, keep), ids, mask)
    got = np.asarray(model.logits(ids, keep=keep, attention_mask=mask))
    real = mask.astype(bool)
    log_softmax = lambda z: z - z.max(-1, keepdims=True) - np.log(
        np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp, logq = log_softmax(want.astype(np.float64)), log_softmax(got.astype(np.float64))
    kl = float(np.max(np.sum(np.exp(logp) * (logp - logq), -1)[real]))
    out[name] = {"max_abs_logit_diff": float(np.abs(got - want)[real].max()),
                 "max_kl": kl, "logit_scale": float(np.abs(want[real]).max()),
                 "top1_agree": float(np.mean((got.argmax(-1) == want.argmax(-1))[real]))}
  del hf
  return {"device": device, "backend": jax_backend(), **out}


def jax_backend() -> str:
  import jax
  return jax.default_backend()


def iterative(directory: str, items: int, steps: int = 2) -> dict[str, Any]:
  import jax
  import torch
  import transformers
  import dpjax
  from tests.support import reference
  from dpjax import tasks
  from dpjax.study import pruning
  from dpjax.engine.sweep import Sweep
  from dpjax.tasks import synthetic
  device = "cuda" if torch.cuda.is_available() else "cpu"
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  chosen = synthetic.generate("test", items)
  encoded = tasks.encode(tokenizer, chosen, [tasks.prompt(item) for item in chosen])
  model = dpjax.load_model(directory)
  L = model.num_layers
  sweep = Sweep(model, encoded, batch_size=16, progress=False, in_flight="auto")
  start = time.perf_counter()
  order = pruning.iterative_prune(sweep, min_layers=L - steps)
  jax.block_until_ready(model.state)
  dpjax_seconds = time.perf_counter() - start
  hf = reference.load_hf(directory).to(device)
  ref = reference.HFIterativeReference(hf, sweep.batches)
  if device == "cuda":
    torch.cuda.synchronize()
  start = time.perf_counter()
  steps_ref = ref.iterative_prune(L, min_layers=L - steps, follow=order)
  if device == "cuda":
    torch.cuda.synchronize()
  reference_seconds = time.perf_counter() - start
  same = [s["choice"] == b or abs(s["choice_accuracy"] - s["accuracy"]) < 1e-9
          for s, b in zip(steps_ref, order)]
  return {"device": device, "items": items, "steps": steps, "removed": [int(b) for b in order],
          "reference_choices": [s["choice"] for s in steps_ref], "same_choices": all(same),
          "dpjax_seconds_with_compilation": dpjax_seconds, "reference_seconds": reference_seconds,
          "ratio_with_compilation": reference_seconds / dpjax_seconds}


def throughput(directory: str, small: bool) -> dict[str, Any]:
  from dpjax.serve import throughput as tp
  layers = shapes(small)["num_hidden_layers"]
  keep = ",".join(str(b) for b in range(layers - layers // 4))
  settings = tp.ThroughputSettings(model=directory, keep=keep, reference="hf",
                                   batch_size=("8",), prompt_len=("128",),
                                   new_tokens=("8",) if small else ("32",),
                                   repeats=2 if small else 3)
  report = tp.measure(settings)
  return {"backend": report["backend"], "rows": report["rows"]}


def bundled_study(out_dir: str, small: bool) -> dict[str, Any]:
  args = [sys.executable, "-m", "dpjax.cli.study", f"--output_dir={out_dir}", "--noprogress"]
  if small:
    args += ["--num_items=16", "--calibration_items=4", "--methods=reverse"]
  start = time.perf_counter()
  result = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)
  seconds = time.perf_counter() - start
  if result.returncode != 0:
    raise RuntimeError(result.stderr[-3000:])
  with open(os.path.join(out_dir, "results.json")) as f:
    results = json.load(f)
  return {"seconds": seconds, "timings": results["timings"], "engine": results.get("engine"),
          "final_accuracy": results["full_model"]["accuracy"][-1],
          "transition_block": results["full_model"]["transition_block"]}


def plan_against_measured(directory: str, small: bool) -> dict[str, Any]:
  from benchmarks.calibration import calibrate
  return calibrate(directory, rows=16 if small else 8, tokens=96 if small else 128,
                            repeats=3)


def main(argv):
  del argv
  started = time.perf_counter()
  report: dict[str, Any] = {"small": _SMALL.value, "steps": {}}

  def save():
    report["seconds"] = time.perf_counter() - started
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "w") as f:
      json.dump(report, f, indent=1, default=str)

  def step(name: str, fn: Callable[[], Any]) -> None:
    t = time.perf_counter()
    try:
      report["steps"][name] = {"result": fn(), "seconds": time.perf_counter() - t}
    except Exception as e:  # recorded; the other steps still run
      report["steps"][name] = {"error": f"{type(e).__name__}: {e}",
                               "traceback": traceback.format_exc()[-3000:],
                               "seconds": time.perf_counter() - t}
    print(f"{name}: {time.perf_counter() - t:.1f} s", flush=True)
    save()

  if _INSTALL.value:
    step("install", lambda: subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "-e", ROOT, "--no-deps"],
        check=True, capture_output=True, text=True).returncode)
  import jax
  report["devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
  with tempfile.TemporaryDirectory() as tmp:
    model_dir = os.path.join(tmp, "llama")
    step("build", lambda: build_model(model_dir, _SMALL.value))
    step("parity", lambda: parity(model_dir))
    step("iterative", lambda: iterative(model_dir, 16 if _SMALL.value else _ITEMS.value))
    step("throughput", lambda: throughput(model_dir, _SMALL.value))
    step("bundled_study", lambda: bundled_study(os.path.join(tmp, "study"), _SMALL.value))
    step("plan", lambda: plan_against_measured(model_dir, _SMALL.value))
  save()
  failed = [name for name, s in report["steps"].items() if "error" in s]
  print(f"wrote {_OUT.value} in {report['seconds']:.0f} s" +
        (f"; failed: {failed}" if failed else ""))


if __name__ == "__main__":
  common.run_program(main, FLAGS)
