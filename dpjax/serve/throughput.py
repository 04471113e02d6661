"""`dpjax-throughput`: how much faster pruned variants serve, next to what they cost.

    dpjax-throughput                       # the bundled model's default run (below)
    dpjax-throughput --model=PATH --keep="0,1,2,5;0,2,4,6"
    dpjax-throughput --model=PATH --study=dpjax_out --above_collapse --reference=hf

For the unpruned model and each variant (`--keep` lists, `;`-separated, or
every curve point of a study's results.json with `--study`, `--methods` to
choose among them), at each
`--batch_size` x `--prompt_len` x `--new_tokens`: prefill tokens/s (a prompt
batch through the KV-cache server, `dpjax.serve.server`) and greedy decode tokens/s
(`B * (N - 1)` tokens over the time of generating `N` minus generating 1), the
median of `--repeats` after a warm-up, the compile time apart, and the memory
of the kept weights and of the KV cache. `--reference=hf` measures the same
through HF PyTorch `generate` with the same blocks deleted. Before any time is
reported, the first variant's tokens are checked against HF `generate`
(greedy; `--check_tokens`).

With no flags, the variants come from the study a researcher has in front of
them, the committed default run of the bundled model
(`dpjax/bundled_model/default_run`, what `dpjax` with no flags writes): its
Iterative Pruning points with a quarter, a half and three quarters of the
blocks removed, where they are above the collapse threshold, with their
accuracies: `--study` of that directory with `--methods=iterative
--removed=4,8,12 --above_collapse`. Three points show how throughput grows
with the blocks removed, and the run stays short (each point is compiled
apart: all 13 points above the collapse threshold took minutes on two CPU
cores); the results go to `./dpjax_throughput`, never into the committed run.

torch is optional (dpjax never needs it): without it the token check is
skipped with a note naming `pip install torch`, and `--reference=hf` is
refused before any work.

Writes `throughput.json`, `throughput.csv` and `accuracy_throughput.png` (with
`--study`: accuracy against decode throughput, each method a line, the Pareto
front marked) to `--output_dir` (default: the study directory, whose summary
then links to it, or `./dpjax_throughput`). On several devices the batch is
split along the mesh's data axis; the output says what the mesh was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import numpy as np

from dpjax.bundled import BUNDLED_MODEL, DEFAULT_RUN, RECORDED_NAME
from dpjax.checkpoints.hf import TORCH_INSTALL, torch_available
from dpjax.fields import setting
from dpjax.model.plan import keep_mask

RESULTS_FILE = "throughput.json"
CSV_FILE = "throughput.csv"
FIGURE_FILE = "accuracy_throughput.png"


@dataclasses.dataclass(frozen=True)
class ThroughputSettings:
  model: str = setting(BUNDLED_MODEL, "The model: a dpjax checkpoint, an HF directory or a "
                       "GGUF file. Default: the small model bundled with dpjax.")
  keep: str = setting("", "Variants as 0-based kept-block lists, ';' between variants "
                      "(e.g. '0,1,2,5;0,2,4,6').")
  study: str = setting("", "A study's output directory whose curve points are measured; with "
                       "neither --keep nor --study, on the bundled model, its committed "
                       "default run (dpjax/bundled_model/default_run) with "
                       "--methods=iterative --removed=4,8,12 --above_collapse: Iterative "
                       "Pruning's points with a quarter, a half and three quarters of the "
                       "blocks removed, where above the collapse threshold.")
  methods: tuple[str, ...] = setting((), "With --study: only the curve points of these methods "
                                     "(a study method such as iterative, or a method name in "
                                     "its results.json); default: every method.")
  removed: tuple[str, ...] = setting((), "With --study: only the points with these numbers "
                                     "of blocks removed; default: every point.")
  above_collapse: bool = setting(False, "With --study: only the points whose accuracy is above "
                                 "the collapse threshold.")
  batch_size: tuple[str, ...] = setting(("8",), "Batch sizes.")
  prompt_len: tuple[str, ...] = setting(("128",), "Prompt lengths in tokens.")
  new_tokens: tuple[str, ...] = setting(("32",), "Tokens generated per prompt.")
  repeats: int = setting(3, "Timed repeats (the median is reported) after one warm-up.")
  reference: str = setting("none", "Also measure HF PyTorch generate with the blocks deleted "
                           "(needs torch: pip install torch).", choices=("none", "hf"))
  check_tokens: bool = setting(True, "Check the first variant's greedy tokens against HF "
                               "generate before reporting a time (HF generate needs torch: "
                               "without it the check is skipped, with a note).")
  dtype: str | None = setting(None, "Weight dtype (default: the checkpoint's).",
                              choices=("float32", "bfloat16", "float16"))
  output_dir: str = setting("", "Where the results go (default: the study directory, else "
                            "./dpjax_throughput).")
  seed: int = setting(0, "Seed of the random prompts.")

  def ints(self, name: str) -> list[int]:
    values = getattr(self, name)
    try:
      out = [int(v) for v in values]
    except ValueError as e:
      raise ValueError(f"--{name} takes integers, got {list(values)}.") from e
    if not out or min(out) < 1:
      raise ValueError(f"--{name}={list(values)}: give values of at least 1.")
    return out


@dataclasses.dataclass
class Variant:
  """A kept set (0-based) and where it came from."""
  kept: tuple[int, ...]
  method: str = "given"
  removed: int = 0
  accuracy: float | None = None


def parse_keep(text: str, num_layers: int) -> list[Variant]:
  from dpjax.model.plan import KeepPlan
  variants = []
  for part in [p for p in text.split(";") if p.strip()]:
    try:
      kept = [int(x) for x in part.split(",") if x.strip()]
    except ValueError as e:
      raise ValueError(f"--keep takes comma-separated block indices, got {part!r}.") from e
    plan = KeepPlan.from_kept(kept, num_layers)  # refuses empty, out of range, repeated
    variants.append(Variant(plan.kept, "given", num_layers - plan.num_kept))
  return variants


def default_study(s: ThroughputSettings) -> str:
  """The study whose variants are measured: `--study`, or with neither --keep nor --study,
  on the bundled model, its committed default run (empty when there is none)."""
  if s.study or s.keep:
    return s.study
  if os.path.abspath(s.model) == BUNDLED_MODEL and os.path.isfile(
      os.path.join(DEFAULT_RUN, "results.json")):
    return DEFAULT_RUN
  return ""


def _chosen(name: str, methods) -> bool:
  """Whether the study's method `name` (e.g. iterative_accuracy) is among `methods`."""
  return not methods or any(name == m or name.startswith(m + "_") for m in methods)


def study_variants(directory: str, model, above_collapse: bool, methods=(), removed=()
                   ) -> tuple[list[Variant], dict]:
  """Every method's curve points of a study (`methods`: those methods' only; `removed`:
  the points with those numbers of blocks removed only), refused when it studied another
  model."""
  from dpjax.lens import tuned as tuned_lens
  path = os.path.join(directory, "results.json")
  if not os.path.isfile(path):
    raise ValueError(f"--study={directory}: no results.json there; run dpjax first.")
  with open(path) as f:
    results = json.load(f)
  recorded = results["model"].get("fingerprint")
  if recorded is None or recorded != tuned_lens.fingerprint(model):
    raise ValueError(f"--study={directory} studied another model (weights "
                     f"{str(recorded)[:12]}..., this model {tuned_lens.fingerprint(model)[:12]}...); "
                     "give the study of this model.")
  full = results["full_model"]
  threshold = full["chance"] + 0.5 * (full["accuracy"][-1] - full["chance"])
  chosen = [name for name in results["methods"] if _chosen(name, methods)]
  if not chosen:
    raise ValueError(f"--methods={','.join(methods)}: {directory} has curves of "
                     f"{sorted(results['methods'])}.")
  variants, seen = [], set()
  for name in chosen:
    for point in results["methods"][name].get("curve", []):
      if "kept" not in point or point["removed"] == 0:
        continue
      if removed and point["removed"] not in removed:
        continue
      if above_collapse and point["accuracy"] < threshold:
        continue
      kept = tuple(b - 1 for b in point["kept"])
      variants.append(Variant(kept, name, point["removed"], point["accuracy"]))
      seen.add(kept)
  return variants, results


def _median_seconds(fn, repeats: int) -> tuple[float, float]:
  """(median of `repeats` timed calls, seconds of the first, warm-up call)."""
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times)), first


def _memory(model, kept: tuple[int, ...], batch: int, length: int) -> dict[str, float]:
  """Bytes of the weights a variant runs and of its KV cache for `batch` x `length` slots."""
  import jax
  cfg = model.config
  params = model.params()
  blocks = sum(np.prod(x.shape[1:]) * x.dtype.itemsize for x in jax.tree.leaves(params["blocks"]))
  rest = sum(np.prod(x.shape) * x.dtype.itemsize for k, x in params.items() if k != "blocks")
  itemsize = np.dtype(model.compute_dtype).itemsize
  kv = 2 * len(kept) * batch * length * cfg.num_kv_heads * cfg.head_dim * itemsize
  return {"weights_mb": float(blocks * len(kept) + rest) / 1e6, "kv_cache_mb": float(kv) / 1e6}


def measure(settings: ThroughputSettings, unpruned_only: bool = False) -> dict[str, Any]:
  """The report of `dpjax-throughput` (`unpruned_only`: the model alone, no variants)."""
  import jax
  from dpjax.model.load import load_model
  from dpjax.engine import devices as distributed
  from dpjax.serve import server as serve
  s = settings
  if s.reference == "hf" and not torch_available():  # refused before any work
    raise ValueError(f"--reference=hf measures HF PyTorch generate, which needs torch: "
                     f"{TORCH_INSTALL}.")
  study = "" if unpruned_only else default_study(s)
  model = load_model(s.model, dtype=s.dtype)
  n = model.num_layers
  if study and not s.study:
    s = dataclasses.replace(s, study=study, methods=s.methods or ("iterative",),
                            removed=s.removed or tuple(str(n * q // 4) for q in (1, 2, 3)),
                            above_collapse=True)
    print(f"no --keep or --study: the unpruned bundled model and the points of its committed "
          f"default run (as --study={os.path.join(RECORDED_NAME, os.path.basename(DEFAULT_RUN))} "
          f"--methods={','.join(s.methods)} --removed={','.join(s.removed)} "
          "--above_collapse)", flush=True)
  variants = [Variant(tuple(range(n)), "unpruned", 0)]
  results: dict[str, Any] | None = None
  if s.study:
    found, results = study_variants(s.study, model, s.above_collapse, s.methods,
                                    s.ints("removed") if s.removed else ())
    variants[0].accuracy = results["full_model"]["accuracy"][-1]
    variants += found
  if s.keep:
    variants += parse_keep(s.keep, n)
  if len(variants) == 1 and not unpruned_only:
    raise ValueError("give the variants: --keep=... (0-based kept blocks, ';' between "
                     "variants) or --study=DIR.")
  limit = model.config.max_position_embeddings
  configs = [(b, p, t) for b in s.ints("batch_size") for p in s.ints("prompt_len")
             for t in s.ints("new_tokens")]
  for b, p, t in configs:
    if p + t > limit:
      raise ValueError(f"--prompt_len={p} + --new_tokens={t} exceed the model's context of "
                       f"{limit} positions.")
  placement = distributed.Placement.create() if len(jax.devices()) > 1 else None
  mesh = ({"data": int(placement.data_size), "devices": len(jax.devices())}
          if placement else {"data": 1, "devices": 1})
  put = (lambda x: x) if placement is None else placement.items
  rng = np.random.default_rng(s.seed)
  vocab = model.config.vocab_size
  hf_model = None

  def hf():
    nonlocal hf_model
    if hf_model is None:
      hf_model = _hf_model(model)
    return hf_model

  token_check = "off"
  if s.check_tokens and not torch_available():
    token_check = "skipped: torch is not installed"
    print(f"the token check against HF generate skipped: torch is not installed "
          f"({TORCH_INSTALL} enables it)", flush=True)
  elif s.check_tokens:
    check = variants[1] if len(variants) > 1 else variants[0]
    _check_tokens(model, hf(), check.kept, rng.integers(3, vocab, size=(2, 16)))
    token_check = f"passed: {[k + 1 for k in check.kept]}"
  rows = []
  for variant in variants:
    keep = keep_mask(variant.kept, n)
    server = serve.Server(model, keep)
    for b, p, t in configs:
      if placement is not None:
        placement.check_batch_size(b)
      ids = rng.integers(3, vocab, size=(b, p)).astype(np.int32)
      prefill, prefill_first = _median_seconds(
          lambda: jax.block_until_ready(server.prefill(put(ids))), s.repeats)
      generate, generate_first = _median_seconds(
          lambda: jax.block_until_ready(server.generate(put(ids), max_new_tokens=t)), s.repeats)
      one, _ = _median_seconds(
          lambda: jax.block_until_ready(server.generate(put(ids), max_new_tokens=1)), s.repeats)
      row = {"method": variant.method, "removed": n - len(variant.kept),
             "kept": [k + 1 for k in variant.kept], "accuracy": variant.accuracy,
             "batch_size": b, "prompt_len": p, "new_tokens": t,
             "prefill_tokens_per_second": b * p / prefill,
             "decode_tokens_per_second": (b * (t - 1) / max(generate - one, 1e-9)
                                          if t > 1 else None),
             "prefill_seconds": prefill, "generate_seconds": generate,
             "compile_seconds": max(prefill_first - prefill, 0.0)
             + max(generate_first - generate, 0.0),
             **_memory(model, variant.kept, b, p + t)}
      if s.reference == "hf":
        row.update(_hf_rates(hf(), variant.kept, ids, t, s.repeats))
      rows.append(row)
      print(_row_text(row, n), flush=True)
  full = {(r["batch_size"], r["prompt_len"], r["new_tokens"]): r for r in rows
          if r["method"] == "unpruned"}
  for row in rows:
    base = full[(row["batch_size"], row["prompt_len"], row["new_tokens"])]
    row["ideal_speedup"] = n / (n - row["removed"])
    row["prefill_speedup"] = row["prefill_tokens_per_second"] / base["prefill_tokens_per_second"]
    if row["decode_tokens_per_second"]:
      row["decode_speedup"] = row["decode_tokens_per_second"] / base["decode_tokens_per_second"]
    if "hf_decode_tokens_per_second" in row and row["decode_tokens_per_second"]:
      row["decode_over_hf"] = row["decode_tokens_per_second"] / row["hf_decode_tokens_per_second"]
      row["prefill_over_hf"] = (row["prefill_tokens_per_second"]
                                / row["hf_prefill_tokens_per_second"])
  return {"model": {"path": s.model, "num_layers": n, "architecture": model.config.architecture},
          "backend": jax.default_backend(), "mesh": mesh, "settings": dataclasses.asdict(s),
          "token_check": token_check, "rows": rows, "study_collapse_threshold": None if results is None else (
              results["full_model"]["chance"] + 0.5 * (results["full_model"]["accuracy"][-1]
                                                        - results["full_model"]["chance"]))}


def _row_text(row: dict, n: int) -> str:
  decode = row["decode_tokens_per_second"]
  text = (f"{row['method']:>20} {n - row['removed']:3d}/{n} blocks  B={row['batch_size']} "
          f"P={row['prompt_len']} N={row['new_tokens']}: prefill "
          f"{row['prefill_tokens_per_second']:9.0f} tok/s, decode "
          f"{'-' if decode is None else f'{decode:8.1f}'} tok/s")
  if "hf_decode_tokens_per_second" in row:
    text += (f" | HF prefill {row['hf_prefill_tokens_per_second']:9.0f}, decode "
             f"{row['hf_decode_tokens_per_second']:8.1f}")
  return text


def _hf_device() -> str:
  """Where HF PyTorch runs: the GPU when torch sees one, else the CPU."""
  import torch
  return "cuda" if torch.cuda.is_available() else "cpu"


def _sync() -> None:
  import torch
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def _hf_model(model):
  """The same weights in HF PyTorch (exported in memory through the architecture table), on
  the GPU when there is one."""
  import tempfile
  import transformers
  try:
    import torch  # noqa: F401  (HF PyTorch is optional: only this comparison needs it)
  except ImportError as e:
    raise ValueError("the token check and --reference=hf run HF PyTorch: pip install torch, "
                     "or pass --nocheck_tokens without --reference=hf.") from e
  from dpjax.checkpoints.convert import load_checkpoint
  from dpjax.checkpoints.export import write_hf_checkpoint
  loaded = load_checkpoint(model.source)
  with tempfile.TemporaryDirectory() as tmp:
    write_hf_checkpoint(tmp, loaded.config, loaded.raw_config, loaded.params,
                        list(range(model.num_layers)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype="float32").eval()
  return hf.to(_hf_device())


def _hf_with(hf, kept):
  """`hf` running only the blocks `kept` (its blocks deleted from `model.model.layers`; the
  full list is kept aside, so any later variant can be made from the same model)."""
  import torch
  if not hasattr(hf, "dpjax_all_layers"):
    hf.dpjax_all_layers = list(hf.model.layers)
    hf.dpjax_layer_types = getattr(hf.config, "layer_types", None)
  hf.model.layers = torch.nn.ModuleList([hf.dpjax_all_layers[i] for i in kept])
  hf.config.num_hidden_layers = len(kept)
  if hf.dpjax_layer_types is not None:
    hf.config.layer_types = [hf.dpjax_layer_types[i] for i in kept]
  for new, layer in enumerate(hf.model.layers):
    layer.self_attn.layer_idx = new
  return hf


def _greedy_config(hf, new_tokens: int):
  """Greedy decoding of exactly `new_tokens` tokens, end-of-text included (no early stop,
  and no `min_new_tokens`, which would forbid the end-of-text token)."""
  import copy
  config = copy.deepcopy(hf.generation_config)
  config.eos_token_id = []  # None is filled in from the model's config, which stops early
  config.min_new_tokens = None
  config.max_new_tokens = new_tokens
  config.do_sample = False
  config.pad_token_id = 0
  return config


def _hf_generate(hf, kept, ids, new_tokens):
  import torch
  with torch.no_grad():
    out = _hf_with(hf, kept).generate(torch.as_tensor(ids, dtype=torch.long, device=hf.device),
                                      generation_config=_greedy_config(hf, new_tokens))
  return out[:, ids.shape[1]:].cpu().numpy()


def _check_tokens(model, hf, kept, ids) -> None:
  from dpjax.serve import server as serve
  got = np.asarray(serve.Server(model, keep_mask(kept, model.num_layers)).generate(
      ids.astype(np.int32), max_new_tokens=8))
  want = _hf_generate(hf, kept, ids, 8)
  if not np.array_equal(got, want):
    raise RuntimeError(f"dpjax generated {got.tolist()}, HF generate {want.tolist()} for the "
                       f"variant keeping {[k + 1 for k in kept]}; no time is reported.")


def _hf_rates(hf, kept, ids, new_tokens, repeats) -> dict[str, float]:
  import torch
  pruned = _hf_with(hf, kept)
  tokens = torch.as_tensor(ids, dtype=torch.long, device=hf.device)

  def prefill():
    with torch.no_grad():
      pruned(input_ids=tokens, use_cache=True)
    _sync()

  def generate(n):
    with torch.no_grad():
      pruned.generate(tokens, generation_config=_greedy_config(pruned, n))
    _sync()

  pre, _ = _median_seconds(prefill, repeats)
  gen, _ = _median_seconds(lambda: generate(new_tokens), repeats)
  one, _ = _median_seconds(lambda: generate(1), repeats)
  b, p = ids.shape
  return {"hf_prefill_tokens_per_second": b * p / pre,
          "hf_decode_tokens_per_second": (b * (new_tokens - 1) / max(gen - one, 1e-9)
                                          if new_tokens > 1 else None)}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
  """Indices of the points no other point beats on both throughput and accuracy."""
  front = []
  for i, (x, y) in enumerate(points):
    if not any((x2 >= x and y2 >= y) and (x2 > x or y2 > y) for x2, y2 in points):
      front.append(i)
  return front


def plot(path: str, report: dict[str, Any]) -> None:
  """Accuracy (from the study) against decode throughput, each method a line, the Pareto
  front marked (the first batch/prompt/new-token configuration)."""
  from dpjax.fileio import save_figure
  from dpjax.report.figures import pyplot
  plt = pyplot()
  rows = [r for r in report["rows"] if r["accuracy"] is not None and r["decode_tokens_per_second"]]
  config = (rows[0]["batch_size"], rows[0]["prompt_len"], rows[0]["new_tokens"]) if rows else None
  rows = [r for r in rows if (r["batch_size"], r["prompt_len"], r["new_tokens"]) == config]
  fig, ax = plt.subplots(figsize=(7, 4.5))
  unpruned = [r for r in rows if r["method"] == "unpruned"]
  for method in sorted({r["method"] for r in rows} - {"unpruned"}):
    mine = sorted([r for r in rows if r["method"] == method] + unpruned,
                  key=lambda r: r["decode_tokens_per_second"])
    ax.plot([r["decode_tokens_per_second"] for r in mine], [r["accuracy"] for r in mine],
            marker="o", ms=3, label=method)
  front = pareto_front([(r["decode_tokens_per_second"], r["accuracy"]) for r in rows])
  front_rows = sorted((rows[i] for i in front), key=lambda r: r["decode_tokens_per_second"])
  ax.plot([r["decode_tokens_per_second"] for r in front_rows],
          [r["accuracy"] for r in front_rows], color="black", lw=2, alpha=0.3,
          label="Pareto front")
  if report.get("study_collapse_threshold") is not None:
    ax.axhline(report["study_collapse_threshold"], color="grey", ls="-.", lw=0.8,
               label="collapse threshold")
  ax.set_xlabel(f"decode tokens/s (batch {config[0] if config else '-'}, "
                f"{report['backend']})")
  ax.set_ylabel("accuracy (the study's evaluation items)")
  ax.set_title("What each removed block buys, next to what it costs")
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  save_figure(fig, path)


def write(out: str, report: dict[str, Any], study: str = "") -> None:
  from dpjax.fileio import write_csv, write_json
  from dpjax.study.results import to_plain
  os.makedirs(out, exist_ok=True)
  write_json(os.path.join(out, RESULTS_FILE), to_plain(report))
  header = ["method", "removed", "batch_size", "prompt_len", "new_tokens", "accuracy",
            "prefill_tokens_per_second", "decode_tokens_per_second", "prefill_speedup",
            "decode_speedup", "ideal_speedup", "hf_prefill_tokens_per_second",
            "hf_decode_tokens_per_second", "compile_seconds", "weights_mb", "kv_cache_mb"]
  write_csv(os.path.join(out, CSV_FILE), header,
            [[("" if r.get(h) is None else r.get(h, "")) for h in header] for r in report["rows"]])
  if any(r["accuracy"] is not None for r in report["rows"]):
    plot(os.path.join(out, FIGURE_FILE), report)
  if study and os.path.abspath(study) == os.path.abspath(out):
    _link_from_summary(study)


def _link_from_summary(study: str) -> None:
  """The study's summary gains a section pointing at the throughput results."""
  from dpjax.fileio import atomic_write_text
  from dpjax.report.summary import summary_html
  from dpjax.report import figures
  path = os.path.join(study, "summary.md")
  if not os.path.isfile(path):
    return
  with open(path) as f:
    text = f.read().split("\n## Throughput", 1)[0].rstrip() + "\n"
  text += ("\n## Throughput\n\n- Decode throughput of the variants against their accuracy: "
           f"`{FIGURE_FILE}` (table: `{CSV_FILE}`, `{RESULTS_FILE}`; dpjax-throughput).\n")
  atomic_write_text(path, text)
  shown = [f for f in figures.FIGURES + (FIGURE_FILE,) if os.path.exists(os.path.join(study, f))]
  atomic_write_text(os.path.join(study, "summary.html"), summary_html(text, study, shown))
