"""RESULTS.md's sections on the side measurements (`benchmarks/bf16.py`,
`benchmarks/shared_prefix.py`, `benchmarks/resume.py`, `benchmarks/lm_eval_backends.py`,
...), from the JSON files they write.

Kept apart from those scripts so that `benchmarks.run` can import it without their flags.
"""

from __future__ import annotations

import json
import os



def _read(path: str) -> dict | None:
  """A measurement's JSON file, or None where it has not been run."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)

def shared_prefix_markdown(path: str) -> str:
  """RESULTS.md's section on the measurement in `path` (empty if it has not been run)."""
  r = _read(path)
  if r is None or "dpjax_unshared_s" not in r:
    return ""
  m = r["machine"]
  ran = "reference_s" in r  # not without torch: dpjax's two runs alone

  def ratios(key):
    if not ran:
      return "- | -"
    return f"{r[f'ratio_{key}_with_compilation']:.1f}x | {r[f'ratio_{key}_warm']:.1f}x"

  return "\n".join([
      "## Shared few-shot prefixes (`benchmarks/shared_prefix.py`)", "",
      f"{r['model']}; {r['work']}; {m['cpu_count']} CPU cores, JAX {m['jax']} on the "
      f"{m['jax_backend']} backend. Prompts average {r['mean_prompt_tokens']:.0f} tokens; the "
      f"batches hold {r['batch_tokens_shared']:,} token positions with the prefix shared, "
      f"{r['batch_tokens_unshared']:,} without (batches of {r.get('batch_size', 16)} items).", "",
      "| | seconds (first call, compilation included) | seconds (warm) | reference / dpjax "
      "(first call) | (warm) |", "|---|---|---|---|---|",
      f"| dpjax, shared prefix | {r['dpjax_shared_first_call_s']:.1f} | {r['dpjax_shared_s']:.1f} | "
      f"{ratios('shared')} |",
      f"| dpjax, whole prompts | {r['dpjax_unshared_first_call_s']:.1f} | "
      f"{r['dpjax_unshared_s']:.1f} | {ratios('unshared')} |",
      f"| HF PyTorch reference | {r['reference_s']:.1f} | | | |" if ran else
      "| HF PyTorch reference | not run (torch is not installed) | | | |", "",
      f"Largest option-logit difference, shared against whole prompts: "
      f"{r['shared_vs_unshared_max_logit_difference']:.1e}"
      + (f"; against the reference: {r['reference_max_logit_difference']:.1e}." if ran
         else "."), ""])


def bf16_markdown(path: str) -> str:
  """RESULTS.md's section on the measurement in `path` (empty if it has not been run)."""
  r = _read(path)
  if r is None:
    return ""
  m = r["machine"]
  lines = ["## bfloat16 against float32 (`benchmarks/bf16.py`)", "",
           f"{r['model']}, {r['task']}, {r['items']} items; {m['cpu_count']} CPU cores, JAX "
           f"{m['jax']} on the {m['jax_backend']} backend. Iterative Pruning times include "
           "compilation. l* = -1: no transition.", "",
           "| | float32 | bfloat16 |", "|---|---|---|",
           f"| unpruned per-layer readout, s | {r['readout_seconds_float32']:.2f} | "
           f"{r['readout_seconds_bfloat16']:.2f} |",
           f"| final accuracy | {r['final_accuracy']['float32']:.3f} | "
           f"{r['final_accuracy']['bfloat16']:.3f} |",
           f"| mean DM at the last layer (options) | {r['mean_dm_final_options']['float32']:.4f} | "
           f"{r['mean_dm_final_options']['bfloat16']:.4f} |",
           f"| l* (options) | {r['transition_block_options']['float32']} | "
           f"{r['transition_block_options']['bfloat16']} |"]
  if "iterative_orders_agree" in r:
    order = r["iterative_removed_order"]
    lines.append(f"| Iterative Pruning, first {len(order['float32'])} removals | "
                 f"{order['float32']} ({r['iterative_seconds_float32']:.0f} s) | "
                 f"{order['bfloat16']} ({r['iterative_seconds_bfloat16']:.0f} s) |")
  lines += ["", f"Largest per-item DM difference at any layer: "
            f"{r['max_item_dm_difference_options']:.4f} (options normalization), "
            f"{r['max_item_dm_difference_vocab']:.2e} (vocab); of the per-layer mean DM: "
            f"{r['max_mean_dm_difference_options']:.4f} / {r['max_mean_dm_difference_vocab']:.2e}. "
            f"Top option agrees on {100 * r['top_option_agreement_final']:.1f}% of items at the "
            f"last layer, {100 * r['top_option_agreement_all_layers']:.1f}% over every layer."]
  return "\n".join(lines) + "\n"


def resume_markdown(path: str) -> str:
  """RESULTS.md's section on `benchmarks/resume.py`'s measurement (empty if not run)."""
  r = _read(path)
  if r is None:
    return ""
  m = r["machine"]
  lines = ["## Masks resumed from the unpruned stream (`benchmarks/resume.py`)", "",
           f"{r['model']}, {r['task']}, {r['items']} items; {m['cpu_count']} CPU cores, JAX "
           f"{m['jax']} on the {m['jax_backend']} backend. Each mask set read by a fresh forward "
           "per mask and resumed from the unpruned model's stream at the mask's first removed "
           "block; block evaluations from the engine's counters (rows times blocks), times "
           "after a warm-up." + (f" {r['note']}" if r.get("note") else ""), "",
           "| masks | readout | block evaluations, fresh / resumed | seconds, fresh / resumed "
           "| speedup | largest difference |", "|---|---|---|---|---|---|"]
  for row in r["rows"]:
    lines.append(f"| {row['masks']} ({row['count']}) | {row['readout']} | "
                 f"{row['fresh_block_rows']:,} / {row['resumed_block_rows']:,} | "
                 f"{row['fresh_s']:.2f} / {row['resumed_s']:.2f} | {row['speedup']:.2f}x | "
                 f"{row['max_difference']:.1e} |")
  return "\n".join(lines) + "\n"


def end_to_end_markdown(path: str) -> str:
  """RESULTS.md's section on `benchmarks/end_to_end.py`'s measurement (empty if not run)."""
  r = _read(path)
  if r is None:
    return ""
  m = r["machine"]
  lines = ["## Iterative Pruning end to end, compilation included (`benchmarks/end_to_end.py`)",
           "", f"{m['cpu_count']} CPU cores, JAX {m['jax']} on the {m['jax_backend']} backend; "
           "a fresh process, no persistent compilation cache. Same sequence, accuracy and "
           "Decision Margin as the reference at every step, checked before the times."
           + (f" {r['note']}" if r.get("note") else ""), "",
           "| model | items | steps | HF s | dpjax s with compilation (programs, compile s) "
           "| speedup with compilation (goal) | dpjax s compiled | speedup compiled |",
           "|---|---|---|---|---|---|---|---|"]
  for c in r["cases"]:
    ratio, goal = c["speedup_with_compilation"], c.get("goal", 2.0)
    if ratio is None:  # no torch: dpjax's side alone
      hf, with_compile, compiled = "-", "- (no reference)", "-"
    else:
      hf, compiled = f"{c['hf_seconds']:.1f}", f"{c['speedup']:.2f}x"
      with_compile = f"{ratio:.2f}x (>= {goal:g}x: {'met' if ratio >= goal else 'missed'})"
    lines.append(f"| {c['case']} ({c['layers']} blocks) | {c['items']} | "
                 f"{len(c['removed_order'])} | {hf} | "
                 f"{c['dpjax_seconds_with_compilation']:.1f} ({c['compiled_programs']}, "
                 f"{c['compile_seconds']:.1f}) | {with_compile} | {c['dpjax_seconds']:.1f} | "
                 f"{compiled} |")
  with_reference = [c for c in r["cases"] if c["hf_seconds"] is not None]
  if not with_reference:
    return "\n".join(lines) + "\n"
  lines += ["", "Where the ratio comes from (block evaluations: blocks run times item rows; the "
            "rest of the ratio is speed per block evaluation):", ""]
  for c in with_reference:
    b = c["block_evaluations"]
    fewer = b["hf_reference"] / b["executed"]
    lines.append(f"- {c['case']}: dpjax ran {b['executed']:,} block evaluations (executed / "
                 f"minimum {b['executed_over_minimum']:.2f}), the reference {b['hf_reference']:,}"
                 f": {fewer:.2f}x fewer; per block evaluation dpjax was "
                 f"{c['speedup'] / fewer:.2f}x faster; candidate evaluations stopped early: "
                 f"{c['candidates_stopped_early']}."
                 + ("" if c.get("dpjax_seconds_all") else " Its compiled time is the cold run's "
                    "less its compile time (no compiled rerun)."))
  return "\n".join(lines) + "\n"


def planning_markdown(results: dict) -> str:
  """RESULTS.md's section on the planner (`benchmarks/planning.py`'s JSON)."""
  lines = ["## The planner (`dpjax-plan`, `benchmarks/planning.py`)", ""]
  rows = results.get("table", [])
  if rows:
    lines += ["Every program of a whole study compiled ahead of time for the topology "
              "(abstract bf16 weights, MMLU 5-shot in the letter format: prompts of 640 "
              "tokens, 300 evaluation items and 64 calibration items). Memory is XLA's "
              "per-device analysis of each compiled program (arguments + outputs + "
              "temporaries); the TPU compiler also checks HBM itself, the GPU compile-only "
              "figures leave out cuBLAS/cuDNN/NCCL workspaces, so 15% of each device is kept "
              "free. Time: each program's parts (one block on a shard's rows, the last "
              "block at the read positions, one lens readout) from XLA's cost analysis at "
              "the per-device shapes, at the chip's peak bf16 rate or HBM bandwidth "
              "(whichever binds), times the calls of a whole study counted as the engine "
              "makes them (no early stop: an upper bound).", "",
              "| model | target | mesh (data x model) | chosen | program | args GB | temp GB "
              "| peak GB | of GB | calls | s/call |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
      ch = row["chosen"]
      chosen = (f"{ch['rows_per_shard']} rows/shard, {ch['masks_in_flight'] or 'all'} masks "
                f"in flight, {ch['candidates_per_call']} candidates/call")
      for name, p in row["programs"].items():
        m = p["memory"]
        lines.append(f"| {row['model']} | {row['target']} | {row['mesh']['data']} x "
                     f"{row['mesh']['model']} | {chosen} | {name} | {m['arguments_gb']:.1f} | "
                     f"{m['temporaries_gb']:.1f} | {m['peak_gb']:.1f} | {row['budget_gb']:.1f} "
                     f"| {p['calls']} | {p['seconds_per_call']:.3f} |")
    lines += ["", "| model | target | every program fits | predicted study, 300 items | "
              "planning took |", "|---|---|---|---|---|"]
    for row in rows:
      lines.append(f"| {row['model']} | {row['target']} | {'yes' if row['fits'] else 'NO'} | "
                   f"{row['predicted_study_hours']:.2f} h | {row['wall_seconds']:.0f} s |")
  cal = results.get("calibration")
  if cal:
    lines += ["", f"Checked on this machine (`--target=local`, the bundled model, "
              f"{cal['rows']} rows x {cal['tokens']} tokens, one call of each program, "
              f"median of repeats; matmul rate {cal['target']['flops'] / 1e9:.0f} GFLOP/s, copy "
              f"bandwidth {cal['target']['bandwidth'] / 1e9:.1f} GB/s):", "",
              "| program | predicted s | measured s | predicted / measured |",
              "|---|---|---|---|"]
    for name, p in cal["programs"].items():
      lines.append(f"| {name} | {p['predicted_s']:.4f} | {p['measured_s']:.4f} | "
                   f"{p['ratio']:.2f} |")
  return "\n".join(lines) + "\n"


def interleaved_markdown(path: str) -> str:
  """RESULTS.md's section on `benchmarks/interleaved.py` (empty if it has not been run)."""
  r = _read(path)
  if r is None or not r.get("configurations"):
    return ""
  m = r["machine"]
  rows = r["configurations"]
  lines = ["## An Iterative Pruning step against the reference, idle and busy "
           "(`benchmarks/interleaved.py`)", "",
           f"{rows[0].get('model', 'SmolLM2-135M')}, the first {rows[0]['items']} "
           f"{rows[0].get('task', 'ARC-Easy validation')} items (letter "
           f"format, batches of 16): one step (every block's candidate) through `Sweep` and "
           f"through the HF reference, in {rows[0]['rounds']} interleaved rounds (ABBA), both "
           f"warm; {m['cpu_count']} CPU cores, JAX {m['jax']}, torch {m['torch']} "
           f"({m['torch_threads']} threads). A busy machine: spinning processes beside the "
           "run, one core each.", "",
           "| XLA threading | busy processes | dpjax s (min-max) | reference s (min-max) | "
           "reference / dpjax, median (min-max) |", "|---|---|---|---|---|"]
  for c in rows:
    d, h = c["times"]["dpjax"], c["times"]["reference"]
    lines.append(f"| {c['threads']} | {c['load']} | {min(d):.1f}-{max(d):.1f} | "
                 f"{min(h):.1f}-{max(h):.1f} | {c['ratio_median']:.2f} "
                 f"({c['ratio_min']:.2f}-{c['ratio_max']:.2f}) |")
  return "\n".join(lines) + "\n"


def lm_eval_markdown(path: str) -> str:
  """RESULTS.md's section on `benchmarks/lm_eval_backends.py` (empty if it has not been
  run)."""
  r = _read(path)
  if r is None or not r.get("cases"):
    return ""
  m = r["machine"]
  load = ""
  if r.get("load_average_before") and r.get("load_average_after"):
    load = (f"; load average (1 min) {r['load_average_before'][0]:.1f} before, "
            f"{r['load_average_after'][0]:.1f} after")
  worst = max((c["max_loglikelihood_difference"] for c in r["cases"]
               if "max_loglikelihood_difference" in c), default=None)
  lines = ["## lm-evaluation-harness: the `dpjax` backend against lm-eval's HF backend "
           "(`benchmarks/lm_eval_backends.py`)", "",
           f"{r['model']}, {r['task']}: the multiple-choice requests of {r['items']} items "
           f"(ARC-Easy's cloze style, one `loglikelihood` request per option) and greedy "
           f"`generate_until` on {r['generations']} of the questions (until a newline, at "
           f"most {r['max_gen_toks']} tokens), the same lm-eval `Instance`s to both backends, "
           f"`batch_size={r['batch_size']}`; pruned: blocks {r['removed_blocks']} (0-based) "
           f"of {r['layers']} removed (HF: deleted from the model). `DpjaxLM` against "
           f"`HFLM` (PyTorch float32, {m['torch_threads']} threads, torch {m['torch']}, "
           f"OMP_WAIT_POLICY={r.get('omp_wait_policy') or 'unset'}); {m['cpu_count']} CPU "
           f"cores, JAX {m['jax']} on the {m['jax_backend']} backend{load}. Checked before "
           f"the times: log-likelihoods within {r['loglikelihood_tolerance']:g}"
           + (f" (largest difference {worst:.1e})" if worst is not None else "")
           + ", the same chosen option for every item, identical generations. Seconds: the "
           f"median of {r['repeats']} calls after a first one; dpjax's first call "
           "(compilation included) apart (the pruned log-likelihoods reuse the unpruned "
           "programs: the kept blocks are an input of one shape).", "",
           "| request | kept blocks | requests | HF s | dpjax s | HF / dpjax | dpjax first "
           "call s | HF / dpjax first call |", "|---|---|---|---|---|---|---|---|"]
  for c in r["cases"]:
    said = (f" ({c['nonempty_generations']} non-empty)" if "nonempty_generations" in c
            else f" (accuracy {c['accuracy']:.2f})" if "accuracy" in c else "")
    lines.append(f"| `{c['request']}` | {c['kept']} ({len(c['kept_blocks'])} of {r['layers']}) "
                 f"| {c['requests']}{said} | {c['hf_s']:.2f} | {c['dpjax_s']:.2f} | "
                 f"{c['ratio']:.2f}x | {c['dpjax_first_call_s']:.2f} | "
                 f"{c['ratio_with_compilation']:.2f}x |")
  return "\n".join(lines) + "\n"


def llama_cpp_markdown(path: str) -> str:
  """RESULTS.md's section on `benchmarks/llama_cpp_check.py` (empty if it has not been run)."""
  r = _read(path)
  if r is None or not r.get("rows"):
    return ""
  m = r["machine"]
  lines = ["## llama.cpp serves the pruned GGUF files (`benchmarks/llama_cpp_check.py`)", "",
           f"Each family's GGUF file and its pruned copy (`dpjax-export --gguf`'s writer) loaded "
           f"by llama.cpp (llama-cpp-python {r['llama_cpp_python']}, CPU) against dpjax's "
           f"kept-block computation, on {r['prompts']} ARC-Easy prompts: the largest absolute "
           "logit difference over every position and the whole vocabulary, the share of "
           f"positions whose top token agrees, and {r['new_tokens']} greedy tokens per prompt "
           "(prompts whose greedy tokens are identical). F32: every tensor dequantized, the "
           "weights dpjax computes with (bound: "
           f"{r['f32_tolerance']:g} of the largest logit); quantized: the 4-bit file as published, llama.cpp's "
           "quantized kernels against dpjax's float32 computation, the pruned file beside the "
           f"unpruned one's own distance. {m['cpu_count']} CPU cores, JAX {m['jax']}.", "",
           "| family | weights | file | blocks (llama.cpp loaded) | max abs logit difference "
           "(of max abs logit) | pruned / unpruned distance | top-1 agreement | greedy "
           "identical |", "|---|---|---|---|---|---|---|---|"]
  unpruned = {(row["family"], row["weights"]): row["max_abs_logit_difference"]
              for row in r["rows"] if row["variant"] == "unpruned"}
  for row in r["rows"]:
    base = unpruned.get((row["family"], row["weights"]))
    ratio = ("-" if row["variant"] == "unpruned" or not base
             else f"{row['max_abs_logit_difference'] / base:.2f}")
    what = ("unpruned" if not row["removed"] else
            f"without {', '.join(map(str, row['removed']))}"
            + (" (kinds stated per layer)" if row.get("states_kinds") else ""))
    loaded = "-" if row["llama_cpp_layers"] is None else row["llama_cpp_layers"]
    lines.append(f"| {row['family']} | {row['weights']} | {what} | {row['blocks']} ({loaded}) | "
                 f"{row['max_abs_logit_difference']:.2e} ({row['max_abs_logit']:.1f}) | "
                 f"{ratio} | {row['top1_agreement']:.3f} of {row['positions']} | "
                 f"{row['greedy_identical']} of {row['greedy_prompts']} |")
  f32 = [row for row in r["rows"] if row["weights"] == "F32"]
  within = all(row["max_abs_logit_difference"] <= r["f32_tolerance"] * row["max_abs_logit"]
               for row in f32)
  greedy = all(row["greedy_identical"] == row["greedy_prompts"] for row in f32)
  loaded = all(row["llama_cpp_layers"] == row["blocks"] for row in r["rows"])
  lines += ["", f"F32 within {r['f32_tolerance']:g} of the largest logit everywhere: "
            f"{'yes' if within else 'no'}; F32 greedy tokens identical everywhere: "
            f"{'yes' if greedy else 'no'}; every file loaded by llama.cpp with its block "
            f"count: {'yes' if loaded else 'no'}."]
  return "\n".join(lines) + "\n"
