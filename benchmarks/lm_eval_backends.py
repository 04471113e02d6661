"""lm-evaluation-harness's two backends on the same requests: dpjax's (`--model dpjax`,
`dpjax.variants.lm_eval.DpjaxLM`) against lm-eval's own HF backend (`HFLM`, PyTorch,
float32, CPU), on the same model, unpruned and with blocks removed.

    python -m benchmarks.lm_eval_backends      # SmolLM2-135M, 32 ARC-Easy items, 8 generations
    python -m benchmarks.lm_eval_backends --model=bundled --items=4 --generations=2 \
        --repeats=1                            # a smoke run: the bundled model, synthetic items

The requests are lm-eval `Instance`s, as an lm-eval task makes them:

* `loglikelihood`: the multiple-choice requests of `--items` items in ARC-Easy's cloze
  style (context `Question: ...\\nAnswer:`, continuation `" " + option`, one request per
  option), scored with every block kept and with `--removed` blocks removed (default:
  blocks L//3 and L//2, 0-based: 10 and 15 of SmolLM2's 30, 5 and 8 of the bundled
  model's 16);
* `generate_until`: greedy continuations of the first `--generations` questions, each
  after one answered question (the last item's, in the same style), `until=["\\n"]`,
  `max_gen_toks=--max_gen_toks`, with the same two kept sets.

The HF backend gets the checkpoint through transformers (a GGUF file as its dense,
dequantized model, which is what dpjax computes) and, for the pruned set, the same
model with the blocks deleted from `model.model.layers`
(`tests.support.reference.delete_blocks`). Both take `--batch_size` rows a call.

Checked before any time is reported: per-request log-likelihoods within 2e-4 (float32
sums over an answer's tokens; see tests/variants/test_lm_eval_real.py), the same
highest-scoring option of every item, the same generated texts. Each backend is called
once first (dpjax's time for it, compilation included, is recorded apart), then the two
alternate for `--repeats` timed calls; the times are the medians. The ratio is HF's
seconds over dpjax's. torch's OpenMP threads sleep while they wait
(`OMP_WAIT_POLICY=PASSIVE`, unless set): by default they spin, and on cores another job
shares, spinning made HF's calls here two to five times slower. The load average before
and after the run is recorded with the machine. Writes `benchmarks/results/lm_eval.json`.
Needs torch and lm-eval (the test extra).
"""

from __future__ import annotations

import json
import os
import time

from absl import flags
import numpy as np

from benchmarks import common

FLAGS = flags.FlagValues()  # this program's own flags (see common.run_program)

_MODEL = flags.DEFINE_enum("model", "smollm2", list(common.MODELS), "The model measured: "
                           "SmolLM2-135M on ARC-Easy, or the bundled model on synthetic items.",
                           flag_values=FLAGS)
_ITEMS = flags.DEFINE_integer("items", 32, "Items whose multiple-choice requests are scored.",
                              flag_values=FLAGS)
_GENERATIONS = flags.DEFINE_integer("generations", 8, "Questions generated from (the first "
                                    "items).", flag_values=FLAGS)
_MAX_GEN_TOKS = flags.DEFINE_integer("max_gen_toks", 16, "Tokens a generation may make.",
                                     flag_values=FLAGS)
_REMOVED = flags.DEFINE_list("removed", None, "Blocks removed in the pruned case, 0-based "
                             "(default: L//3 and L//2).", flag_values=FLAGS)
_BATCH = flags.DEFINE_integer("batch_size", 16, "Both backends' batch_size (HF: requests a "
                              "forward; dpjax: packed rows a call).", flag_values=FLAGS)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls of each backend after its first.",
                                flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results", "lm_eval.json"), "Output file.",
                           flag_values=FLAGS)

# Summed float32 log-likelihoods of a continuation (tests/variants/test_lm_eval_real.py).
LOGLIKELIHOOD_TOLERANCE = 2e-4
NEEDS = ("this benchmark needs torch and lm-evaluation-harness: pip install -e '.[test]' (or "
         "pip install torch 'lm_eval>=0.4.8').")


def _instances(kind: str, args: list[tuple]) -> list:
  from lm_eval.api.instance import Instance
  return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _context(item) -> str:
  return f"Question: {item.question}\nAnswer:"


def _generation_context(item, shot) -> str:
  """One answered question first (`shot`, an item not asked), so the model answers on the
  answer line instead of ending it at once (zero-shot, SmolLM2 mostly did: empty texts)."""
  return f"{_context(shot)} {shot.options[shot.answer]}\n\n{_context(item)}"


def _check(kind: str, kept: str, items, want: list, got: list) -> dict:
  """What the two backends' answers agree on; SystemExit where they do not."""
  if kind == "generate_until":
    differ = [i for i, (w, g) in enumerate(zip(want, got)) if w != g]
    if len(want) != len(got) or differ:
      i = differ[0] if differ else 0
      raise SystemExit(f"generate_until, {kept}: {len(differ)} of {len(want)} generations "
                       f"differ; the first, request {i}: HF {want[i]!r}, dpjax {got[i]!r}.")
    # SmolLM2 often ends its answer line at once (an empty text): how many say something.
    return {"generations_equal": True, "nonempty_generations": sum(bool(w) for w in want),
            "generated_chars": sum(len(w) for w in want)}
  theirs, ours = np.array([w[0] for w in want]), np.array([g[0] for g in got])
  worst = float(np.abs(theirs - ours).max())
  if worst > LOGLIKELIHOOD_TOLERANCE:
    raise SystemExit(f"loglikelihood, {kept}: the backends' log-likelihoods differ by {worst:.2e} "
                     f"(allowed {LOGLIKELIHOOD_TOLERANCE:.0e}).")
  picks, start = {"hf": [], "dpjax": []}, 0
  for item in items:
    end = start + len(item.options)
    picks["hf"].append(int(np.argmax(theirs[start:end])))
    picks["dpjax"].append(int(np.argmax(ours[start:end])))
    start = end
  if picks["hf"] != picks["dpjax"]:
    which = [i for i, (a, b) in enumerate(zip(picks["hf"], picks["dpjax"])) if a != b]
    raise SystemExit(f"loglikelihood, {kept}: the backends pick different options on items "
                     f"{which}.")
  greedy_same = [w[1] for w in want] == [g[1] for g in got]
  accuracy = float(np.mean([p == item.answer for p, item in zip(picks["hf"], items)]))
  return {"max_loglikelihood_difference": worst, "same_choices": True,
          "same_is_greedy": greedy_same, "accuracy": accuracy}


def main(argv):
  del argv
  if not common.has_torch():
    raise SystemExit(NEEDS)
  # Before torch is first imported (see the module docstring).
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  try:
    from lm_eval.models.huggingface import HFLM
    from dpjax.variants.lm_eval import DpjaxLM
  except ImportError as e:
    raise SystemExit(f"{NEEDS} ({e})") from None
  import torch

  from benchmarks.common import machine
  from dpjax.fileio import atomic_write_text
  from tests.support import reference

  torch.set_num_threads(os.cpu_count() or 1)
  measured = common.measured(_MODEL.value)
  items = measured.items(_ITEMS.value)
  asked = items[:min(_GENERATIONS.value, len(items) - 1)]  # the last item is the shot
  loglikelihood = [(_context(i), " " + option) for i in items for option in i.options]
  gen_kwargs = {"until": ["\n"], "max_gen_toks": _MAX_GEN_TOKS.value, "do_sample": False}
  shot = items[-1]  # the generations ask the first items; their one shot is the last
  generate = [(_generation_context(i, shot), dict(gen_kwargs)) for i in asked]
  work = {"loglikelihood": (_instances("loglikelihood", loglikelihood), items),
          "generate_until": (_instances("generate_until", generate), asked)}

  start = time.perf_counter()
  hf_model = measured.hf()
  hf_load_s = time.perf_counter() - start
  layers = list(hf_model.model.layers)
  types = getattr(hf_model.config, "layer_types", None)  # restored with the blocks
  L = len(layers)
  removed = sorted({int(b) for b in _REMOVED.value} if _REMOVED.value else {L // 3, L // 2})
  if not removed or any(not 0 <= b < L for b in removed) or len(removed) >= L:
    raise SystemExit(f"--removed={_REMOVED.value}: give blocks in 0..{L - 1}, not all of them.")
  kept_sets = {"unpruned": list(range(L)),
               "pruned": [b for b in range(L) if b not in removed]}
  hf = HFLM(pretrained=hf_model, tokenizer=measured.tokenizer, batch_size=_BATCH.value)
  out = {"model": measured.label, "task": measured.task, "items": len(items),
         "generations": len(asked), "max_gen_toks": _MAX_GEN_TOKS.value,
         "batch_size": _BATCH.value, "repeats": _REPEATS.value, "layers": L,
         "removed_blocks": removed, "hf_load_s": hf_load_s, "machine": machine(),
         "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
         "load_average_before": list(os.getloadavg()),
         "loglikelihood_tolerance": LOGLIKELIHOOD_TOLERANCE, "cases": []}

  def save():
    os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
    atomic_write_text(_OUT.value, json.dumps(out, indent=2) + "\n")

  for name, kept in kept_sets.items():
    start = time.perf_counter()
    ours = DpjaxLM(pretrained=measured.path, dtype="float32", batch_size=_BATCH.value,
                   keep=None if name == "unpruned" else ";".join(map(str, kept)))
    dpjax_load_s = time.perf_counter() - start
    reference.delete_blocks(hf_model, np.isin(np.arange(L), kept), all_layers=layers,
                           layer_types=types)
    try:
      for kind, (requests, these) in work.items():
        if not requests:
          continue
        calls = {"hf": lambda: getattr(hf, kind)(requests, disable_tqdm=True),
                 "dpjax": lambda: getattr(ours, kind)(requests, disable_tqdm=True)}
        first, answers = {}, {}
        for who, call in calls.items():
          start = time.perf_counter()
          answers[who] = call()
          first[who] = time.perf_counter() - start
        case = {"request": kind, "kept": name, "kept_blocks": kept,
                "requests": len(requests), "items": len(these),
                **_check(kind, name, these, answers["hf"], answers["dpjax"])}
        times = {"hf": [], "dpjax": []}
        for _ in range(_REPEATS.value):
          for who, call in calls.items():
            start = time.perf_counter()
            call()
            times[who].append(time.perf_counter() - start)
        case.update(hf_s=float(np.median(times["hf"])), dpjax_s=float(np.median(times["dpjax"])),
                    hf_first_call_s=first["hf"], dpjax_first_call_s=first["dpjax"],
                    hf_times=times["hf"], dpjax_times=times["dpjax"],
                    dpjax_load_s=dpjax_load_s)
        case["ratio"] = case["hf_s"] / case["dpjax_s"]
        case["ratio_with_compilation"] = case["hf_first_call_s"] / case["dpjax_first_call_s"]
        out["cases"].append(case)
        print(f"{kind}, {name} ({len(kept)} of {L} blocks, {len(requests)} requests): HF "
              f"{case['hf_s']:.2f} s, dpjax {case['dpjax_s']:.2f} s ({case['ratio']:.2f}x); "
              f"dpjax's first call {case['dpjax_first_call_s']:.2f} s", flush=True)
        save()  # after every case, so a run that is stopped keeps what it has
    finally:
      reference.delete_blocks(hf_model, np.ones(L, bool), all_layers=layers, layer_types=types)
    del ours
  out["load_average_after"] = list(os.getloadavg())
  save()
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  common.run_program(main, FLAGS)
