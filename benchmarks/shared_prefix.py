"""Few-shot prompts that share their shots: dpjax with and without the shared prefix,
against the HF-PyTorch reference, on a real model.

    python -m benchmarks.shared_prefix     # SmolLM2-135M, MMLU 5-shot, 2 subjects x 16 items
    python -m benchmarks.shared_prefix --model=bundled --subjects=1 --per_subject=4 \
        --batch_size=4 --k_shot=2          # a smoke run: the bundled model, synthetic items

MMLU-shaped work: the first `--per_subject` test items of `--subjects` subjects
(evenly spaced in alphabetical order), each prompt the subject's five dev-split shots and the
question (lm-eval's layout), in the letter format. The work is the per-layer lens
readout of `--masks` variants (the unpruned model, then 1, 2, ... blocks removed
in reverse order), as a pruning curve reads them. Three implementations on the
same items and masks:

* dpjax with the shared prefix (`Sweep(share_prefix=True)`, the default): each
  batch of one subject runs its shots once;
* dpjax without it (every row its whole prompt);
* the reference: HF transformers (PyTorch, float32, eager attention), blocks
  deleted, `output_hidden_states` through the final norm and the head, one
  forward per variant on the unshared batches.

Checked before any time is reported: the shared readouts equal the unshared
ones within 1e-4 (logits), and the reference's within 1e-3. dpjax's times are
the first call (compilation included) and the median of `--repeats` after it;
the reference's is one pass (it compiles nothing). `--model=bundled`: the bundled model
on the synthetic suite (its families as subjects, its dev split for the shots). Without
torch, dpjax's two runs alone (no reference, no ratio). Writes
`benchmarks/results/shared_prefix.json`.
"""

from __future__ import annotations

import json
import os
import time

from absl import app
from absl import flags
import numpy as np

from benchmarks import common

FLAGS = flags.FlagValues()  # this program's own flags (see common.run_program)

_MODEL = flags.DEFINE_enum("model", "smollm2", list(common.MODELS), "The model measured: "
                           "SmolLM2-135M on MMLU, or the bundled model on synthetic items.",
                           flag_values=FLAGS)
_SUBJECTS = flags.DEFINE_integer("subjects", 2, "MMLU subjects, evenly spaced in alphabetical "
                                  "order (the first, then every 57/n-th).", flag_values=FLAGS)
_BATCH = flags.DEFINE_integer("batch_size", 16, "Items per batch.", flag_values=FLAGS)
_PER_SUBJECT = flags.DEFINE_integer("per_subject", 16, "Test items per subject.", flag_values=FLAGS)
_K_SHOT = flags.DEFINE_integer("k_shot", 5, "Shots per prompt (the subject's dev items).",
                               flag_values=FLAGS)
_MASKS = flags.DEFINE_integer("masks", 3, "Variants read: unpruned, then reverse order.",
                              flag_values=FLAGS)
_REPEATS = flags.DEFINE_integer("repeats", 1, "Timed repeats of dpjax after its first call.",
                                flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results", "shared_prefix.json"), "Output file.",
                           flag_values=FLAGS)


def _test_and_dev(key: str):
  """The test and dev items: MMLU's, or the synthetic suite's (a family per subject)."""
  from dpjax import tasks
  if key == "bundled":
    from dpjax.tasks import synthetic
    per_family = len(synthetic.FAMILIES)
    return (synthetic.generate("test", per_family * _PER_SUBJECT.value),
            synthetic.generate("dev", per_family * max(_K_SHOT.value, 1)))
  from dpjax.tasks.benchmarks import default_data_dir
  from dpjax.tasks.fetch import fetch_benchmarks
  fetch_benchmarks(default_data_dir(), ["mmlu"])
  return (tasks.load_task("mmlu", "test", data_dir=default_data_dir()),
          tasks.load_task("mmlu", "dev", data_dir=default_data_dir()))


def main(argv):
  del argv
  import jax

  import dpjax
  from benchmarks.common import machine
  from dpjax import tasks
  from dpjax.fileio import atomic_write_text
  from dpjax.engine.sweep import Sweep

  measured = common.measured(_MODEL.value)
  path, tokenizer = measured.path, measured.tokenizer
  test, dev = _test_and_dev(measured.key)
  every = sorted({item.subject for item in test})
  subjects = every[::max(1, len(every) // _SUBJECTS.value)][:_SUBJECTS.value]
  items = [item for s in subjects for item in [i for i in test if i.subject == s][
      :_PER_SUBJECT.value]]
  shots = tasks.shots_for(items, dev, _K_SHOT.value)
  encoded = tasks.encode(tokenizer, items, [tasks.prompt(i, s) for i, s in zip(items, shots)])
  model = dpjax.load_model(path)
  L = model.num_layers
  masks = np.ones((_MASKS.value, L), bool)
  for m in range(1, _MASKS.value):
    masks[m, L - m:] = False
  pad = tokenizer.pad_token_id or 0
  sweeps = {share: Sweep(model, encoded, batch_size=_BATCH.value, pad_id=pad, share_prefix=share)
            for share in (True, False)}
  tokens = {share: int(sum(b.input_ids.size + (0 if b.prefix_ids is None else b.prefix_ids.size)
                           for b in s.batches)) for share, s in sweeps.items()}
  out = {"model": measured.label,
         "work": f"{'MMLU' if measured.key == 'smollm2' else 'synthetic suite'} "
                 f"{_K_SHOT.value}-shot, letter format, {len(items)} test items of "
                 f"{len(subjects)} subjects ({', '.join(subjects)}); per-layer readouts of "
                 f"{len(masks)} variants (unpruned, then blocks removed from the last)",
         "items": len(items), "masks": len(masks), "batch_size": _BATCH.value,
         "machine": machine(),
         "mean_prompt_tokens": float(np.mean([len(t) for t in encoded.tokens])),
         "batch_tokens_shared": tokens[True], "batch_tokens_unshared": tokens[False]}

  def save():
    os.makedirs(os.path.dirname(_OUT.value), exist_ok=True)
    atomic_write_text(_OUT.value, json.dumps(out, indent=2) + "\n")

  readouts = {}
  for share, sweep in sweeps.items():
    key = "shared" if share else "unshared"
    start = time.perf_counter()
    readouts[share] = jax.block_until_ready(sweep.readouts(masks))
    out[f"dpjax_{key}_first_call_s"] = time.perf_counter() - start
    times = []
    for _ in range(_REPEATS.value):
      start = time.perf_counter()
      jax.block_until_ready(sweep.readouts(masks))
      times.append(time.perf_counter() - start)
    out[f"dpjax_{key}_s"] = float(np.median(times))
    print(f"dpjax {key}: {out[f'dpjax_{key}_first_call_s']:.1f} s first call, "
          f"{out[f'dpjax_{key}_s']:.1f} s after", flush=True)
    save()
  worst = float(np.nanmax(np.abs(readouts[True].option_logits - readouts[False].option_logits)))
  out["shared_vs_unshared_max_logit_difference"] = worst
  if worst > 1e-4:
    raise SystemExit(f"shared and unshared readouts differ by {worst}.")
  if not common.has_torch():
    save()
    print(json.dumps(out, indent=2))
    print("HF PyTorch reference: not run (torch is not installed)")
    return

  import torch
  from tests.support import reference
  torch.set_num_threads(os.cpu_count() or 1)
  hf = measured.hf(attn_implementation="eager")
  ref = reference.HFIterativeReference(hf, sweeps[False].batches)
  start = time.perf_counter()
  worst_ref = 0.0
  order = np.concatenate([b.index[b.index >= 0] for b in sweeps[False].batches])
  for m, mask in enumerate(masks):
    kept = [int(b) for b in np.flatnonzero(mask)]
    options, _, _ = ref.readouts(kept)  # [n+1, N, K] over kept layers, in batch order
    ours = readouts[True].option_logits[m][[0] + [b + 1 for b in kept]][:, order]
    live = np.isfinite(options)
    worst_ref = max(worst_ref, float(np.abs(options[live] - ours[live]).max()))
  out["reference_s"] = time.perf_counter() - start
  out["reference_max_logit_difference"] = worst_ref
  if worst_ref > 1e-3:
    raise SystemExit(f"dpjax and the reference differ by {worst_ref} in option logits.")
  for key in ("shared", "unshared"):
    out[f"ratio_{key}_warm"] = out["reference_s"] / out[f"dpjax_{key}_s"]
    out[f"ratio_{key}_with_compilation"] = out["reference_s"] / out[f"dpjax_{key}_first_call_s"]
  save()
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  common.run_program(main, FLAGS)
