"""llama.cpp serves dpjax's pruned GGUF files: each family's file with blocks removed, loaded
by llama.cpp's own loader and kernels (its Python bindings, `llama-cpp-python`), against
dpjax's kept-block logits and greedy tokens, beside the unpruned file's own distance.

    python -m benchmarks.llama_cpp_check          # SmolLM2, Gemma 3 and Qwen2.5 (real GGUFs)

Not part of the default suite or of `python -m benchmarks`: llama-cpp-python builds from
source (about 30 minutes on two cores; build it once into a wheel cache, e.g. `pip wheel
llama-cpp-python==0.3.36 -w ~/.cache/dpjax/wheels`, then `pip install --find-links
~/.cache/dpjax/wheels llama-cpp-python`).

For each family (`tests.support.real_models`: SmolLM2-135M, Gemma 3 270M, Qwen2.5-0.5B,
4-bit files) and each of two weight forms:

* `F32`: the file with every tensor dequantized to float32
  (`dpjax.checkpoints.gguf_export.prune_gguf(..., dequantize=True)`), unpruned and pruned:
  llama.cpp then computes with the weights dpjax computes with (its KV cache set to float32),
  so the logits should agree within 2e-3 of the largest logit and greedy decoding should
  match;
* `quantized`: the 4-bit file as published and its pruned copy (quantized bytes
  untouched): llama.cpp's quantized kernels (activations rounded to 8 bits for the dot
  products) against dpjax's float32 computation on the dequantized weights, so the
  distance is the kernels', and the question is whether the pruned file is as close as
  the unpruned one.

The pruned kept sets: SmolLM2 without blocks 10 and 15 (0-based), Qwen2.5 without 8 and
12, and Gemma 3 without block 2, which moves global block 5 to index 4, where Gemma 3's
index pattern says sliding: the file states every kept block's kind
(`gemma3.attention.sliding_window_pattern`, per layer), which llama.cpp reads.

Per file: the block count llama.cpp loaded, the largest absolute logit difference over
every position of `--prompts` real prompts (ARC-Easy questions) and the whole vocabulary,
the share of positions whose top token agrees, and `--new_tokens` greedy tokens per
prompt from both (llama.cpp: its logits' argmax, token by token; dpjax: the KV-cache
server). Writes `benchmarks/results/llama_cpp.json`; `python -m benchmarks.run
--report_only` puts its table in RESULTS.md.
"""

from __future__ import annotations

import json
import os
import tempfile
import time

from absl import flags
import numpy as np

from benchmarks import common

FLAGS = flags.FlagValues()  # this program's own flags (see common.run_program)

_FAMILIES = flags.DEFINE_list("families", ["smollm2", "gemma3", "qwen25"], "Real models "
                              "checked (tests.support.real_models keys).", flag_values=FLAGS)
_PROMPTS = flags.DEFINE_integer("prompts", 4, "ARC-Easy questions fed to both.",
                                flag_values=FLAGS)
_NEW = flags.DEFINE_integer("new_tokens", 16, "Greedy tokens per prompt.", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "results",
                                               "llama_cpp.json"), "Where the figures go.",
                           flag_values=FLAGS)

# Blocks removed per family (0-based); Gemma 3's moves global block 5 to a sliding index.
REMOVED = {"smollm2": (10, 15), "gemma3": (2,), "qwen25": (8, 12)}
# The F32 files' bound on the largest logit difference, relative to the largest logit
# (llama.cpp's own CPU kernels round some functions in float16: Gemma's GELU, through a
# float16 table, puts its unpruned file 0.017 from dpjax on logits up to 31, 5e-4 of
# them; SmolLM2's SiLU model agrees to 5e-5).
F32_TOLERANCE = 2e-3


def _llama_layers(llm) -> int | None:
  import llama_cpp
  for name in ("llama_model_n_layer", "llama_n_layer"):
    fn = getattr(llama_cpp, name, None)
    if fn is not None:
      try:
        return int(fn(llm._model.model))
      except Exception:  # an older binding's signature
        continue
  return None


def llama_cpp_run(path: str, prompts: list[list[int]], new_tokens: int) -> dict:
  """Every position's logits `[T, V]` per prompt and `new_tokens` greedy tokens, from
  llama.cpp on the CPU."""
  import llama_cpp
  longest = max(len(p) for p in prompts) + new_tokens + 8
  # The KV cache in float32 (llama.cpp's default is float16): the F32 files then compute
  # in float32 throughout, as dpjax does.
  llm = llama_cpp.Llama(model_path=path, n_ctx=max(256, longest),
                        n_threads=os.cpu_count() or 2, logits_all=True, verbose=False,
                        n_gpu_layers=0, type_k=llama_cpp.GGML_TYPE_F32,
                        type_v=llama_cpp.GGML_TYPE_F32)
  logits, greedy = [], []
  for prompt in prompts:
    llm.reset()
    llm.eval(prompt)
    logits.append(np.array(llm.scores[:len(prompt)], np.float64))
    tokens = []
    for _ in range(new_tokens):
      token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
      tokens.append(token)
      llm.eval([token])
    greedy.append(tokens)
  layers = _llama_layers(llm)
  if hasattr(llm, "close"):
    llm.close()
  return {"logits": logits, "greedy": greedy, "layers": layers}


def dpjax_run(model, keep, prompts: list[list[int]], new_tokens: int) -> dict:
  from dpjax.serve import server as serve
  server = serve.Server(model, keep)
  logits, greedy = [], []
  for prompt in prompts:
    ids = np.array([prompt], np.int32)
    logits.append(np.asarray(model.logits(ids, keep=keep), np.float64)[0])
    greedy.append([int(t) for t in np.asarray(server.generate(ids, max_new_tokens=new_tokens))[0]])
  return {"logits": logits, "greedy": greedy}


def compare(ours: dict, theirs: dict) -> dict:
  diff = max(float(np.abs(a - b).max()) for a, b in zip(ours["logits"], theirs["logits"]))
  scale = max(float(np.abs(a).max()) for a in ours["logits"])
  top = np.concatenate([a.argmax(-1) == b.argmax(-1)
                        for a, b in zip(ours["logits"], theirs["logits"])])
  same = sum(a == b for a, b in zip(ours["greedy"], theirs["greedy"]))
  agreed = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
            for a, b in zip(ours["greedy"], theirs["greedy"])]
  return {"max_abs_logit_difference": diff, "max_abs_logit": scale,
          "top1_agreement": float(top.mean()), "positions": int(top.size),
          "greedy_identical": int(same), "greedy_prompts": len(ours["greedy"]),
          "greedy_tokens_agreed": agreed}


def check_family(key: str, prompts_text: list[str], new_tokens: int, work: str) -> list[dict]:
  import dpjax
  from dpjax.checkpoints.gguf import gguf_tokenizer
  from dpjax.checkpoints.gguf_export import prune_gguf, stated_pattern, gguf_architecture
  from tests.support import real_models
  source = real_models.fetch(key)
  model = dpjax.load_model(source, dtype="float32")
  tokenizer = gguf_tokenizer(source)
  prompts = [tokenizer(t, add_special_tokens=True)["input_ids"] for t in prompts_text]
  L = model.num_layers
  kept = [b for b in range(L) if b not in REMOVED[key]]
  architecture = gguf_architecture(source)
  states_kinds = stated_pattern(architecture, kept) is not None
  rows = []
  for weights in ("F32", "quantized"):
    files = {}
    if weights == "F32":
      files["unpruned"] = prune_gguf(source, os.path.join(work, f"{key}_f32.gguf"),
                                     list(range(L)), dequantize=True)
      files["pruned"] = prune_gguf(source, os.path.join(work, f"{key}_f32_pruned.gguf"), kept,
                                   dequantize=True)
    else:
      files["unpruned"] = source
      files["pruned"] = prune_gguf(source, os.path.join(work, f"{key}_pruned.gguf"), kept)
    for variant, path in files.items():
      keep = None if variant == "unpruned" else dpjax.keep_mask(kept, L)
      started = time.perf_counter()
      theirs = llama_cpp_run(path, prompts, new_tokens)
      ours = dpjax_run(model, keep, prompts, new_tokens)
      row = {"family": key, "weights": weights, "variant": variant,
             "blocks": L if keep is None else len(kept), "llama_cpp_layers": theirs["layers"],
             "removed": [] if keep is None else list(REMOVED[key]),
             "states_kinds": bool(states_kinds and keep is not None),
             "file_mb": round(os.path.getsize(path) / 2 ** 20, 1),
             "seconds": round(time.perf_counter() - started, 1), **compare(ours, theirs)}
      print(json.dumps({k: v for k, v in row.items() if k != "greedy_tokens_agreed"}),
            flush=True)
      rows.append(row)
    for path in files.values():
      if path != source:
        os.remove(path)
  return rows


def main(argv):
  del argv
  try:
    import llama_cpp
  except ImportError as e:
    raise SystemExit(f"llama-cpp-python is not installed ({e}); build it once (see this "
                     "module's docstring).") from e
  from tests.support import real_models
  items = real_models.arc_easy_items(_PROMPTS.value)
  prompts_text = [f"Question: {item.question}\nAnswer:" for item in items]
  rows = []
  with tempfile.TemporaryDirectory() as work:
    for key in _FAMILIES.value:
      rows += check_family(key, prompts_text, _NEW.value, work)
  f32 = [r for r in rows if r["weights"] == "F32"]
  result = {"machine": common.machine(), "llama_cpp_python": llama_cpp.__version__,
            "prompts": len(prompts_text), "new_tokens": _NEW.value,
            "f32_tolerance": F32_TOLERANCE, "rows": rows,
            "f32_within_tolerance": all(
                r["max_abs_logit_difference"] <= F32_TOLERANCE * r["max_abs_logit"] for r in f32),
            "f32_greedy_identical": all(r["greedy_identical"] == r["greedy_prompts"]
                                        for r in f32),
            "layers_loaded": all(r["llama_cpp_layers"] in (None, r["blocks"]) for r in rows)}
  from dpjax.fileio import atomic_write_text
  os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
  atomic_write_text(_OUT.value, json.dumps(result, indent=2) + "\n")
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  common.run_program(main, FLAGS)
