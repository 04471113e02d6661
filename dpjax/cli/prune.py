"""`dpjax-prune`: the smallest variant within a quality budget, exported as a verified HF
checkpoint with its provenance (`dpjax.variants.budget`).

    dpjax-prune --max_drop=0.05                       # the bundled model, Iterative Pruning
    dpjax-prune --max_drop=0.05 --max_ppl_ratio=1.5   # and a perplexity gate
    dpjax-prune --method=reverse --target_blocks=10 --heal_steps=200 --heal_method=last_blocks
    dpjax-prune --model=PATH --task=sciq --format=cloze --target_blocks=20
    dpjax-prune --study=dpjax_out --max_drop=0.02     # the curve of an existing study
    dpjax-prune --model=PATH --keep=0,1,2,5,7 --gguf  # a given kept set: no search
    dpjax-prune --plan=dpjax_pruned/pruning_plan.json --output_dir=again   # reproduce
"""

from __future__ import annotations

import os

from dpjax.checkpoints.hf import TORCH_INSTALL
from dpjax.cli.program import run_program
from dpjax.variants.budget import PLAN_FILE, TRANSFORMERS_SKIPPED, PruneSettings, prune


def prune_and_report(s: PruneSettings) -> None:
  plan = prune(s)
  acc = plan["accuracy"]
  held = acc["drop"]["heldout"]
  print(f"kept {len(plan['kept_blocks'])} of {plan['source']['num_layers']} blocks "
        f"(0-based: {','.join(map(str, plan['kept_blocks']))})")
  print(f"held-out accuracy {acc['pruned']['heldout']['accuracy']:.3f} against "
        f"{acc['unpruned']['heldout']['accuracy']:.3f} unpruned: drop {held['drop']:+.3f} "
        f"[{held['ci95'][0]:+.3f}, {held['ci95'][1]:+.3f}]")
  if plan.get("perplexity"):
    r = plan["perplexity"]["ratio"]["heldout"]
    print(f"held-out perplexity {plan['perplexity']['pruned']['heldout']['perplexity']:.3f} "
          f"against {plan['perplexity']['unpruned']['heldout']['perplexity']:.3f} unpruned: "
          f"ratio {r['ratio']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]")
  check = plan["export"]["verification"]
  if check:
    print(f"export verified with {check['loader']}: logits within "
          f"{check['max_relative_difference']:.1e} of dpjax's")
  if check and check.get("transformers_check") == TRANSFORMERS_SKIPPED:
    also = (" and the throughput's token check against HF generate"
            if plan.get("throughput") else "")
    print(f"transformers' check of the export{also} skipped: torch is not installed "
          f"({TORCH_INSTALL} enables it)")
  if plan["export"].get("gguf"):
    g = plan["export"]["gguf"]
    line = f"GGUF export {g['file']}"
    if g["verification"]:
      line += (f" verified with {g['verification']['loader']}: logits within "
               f"{g['verification']['max_relative_difference']:.1e} of dpjax's")
    print(line)
  if plan.get("healing"):
    h = plan["healing"]
    g = h["gain_heldout"]
    print(f"healed ({h['settings']['steps']} LoRA steps, {h['settings']['objective']} loss "
          f"{h['loss_first']:.3f} -> {h['loss_last']:.3f}): held-out accuracy "
          f"{h['accuracy']['heldout']['accuracy']:.3f}, gain {g['gain']:+.3f} "
          f"[{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}]; written to {h['export']['directory']}/")
  if plan.get("throughput"):
    for row in plan["throughput"]["rows"]:
      print(f"{row['variant']:>9}: {row['blocks']} blocks, held-out accuracy "
            f"{row['heldout_accuracy']:.3f}, decode {row['decode_tokens_per_second']:.0f} "
            f"tokens/s ({row['decode_speedup']:.2f}x), prefill "
            f"{row['prefill_tokens_per_second']:.0f} tokens/s ({row['prefill_speedup']:.2f}x)")
  print(f"wrote {os.path.abspath(os.path.join(s.output_dir, plan['export']['directory']))} "
        f"and {PLAN_FILE}")


def run() -> None:
  run_program("dpjax-prune", [PruneSettings], prune_and_report)


if __name__ == "__main__":
  run()
