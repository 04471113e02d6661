"""The `dpjax-export` program: `--model=ID_OR_DIR --keep=3,4,7 --output_dir=DIR [--gguf]`."""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from dpjax import fileio
from dpjax.bundled import BUNDLED_MODEL
from dpjax.cli.program import run_program
from dpjax.checkpoints.export import DEFAULT_MAX_SHARD_BYTES, export
from dpjax.fields import setting
from dpjax.variants import export as variant_export
from dpjax.variants.export import GGUF_FILE, MODEL_DIR


@dataclasses.dataclass(frozen=True)
class ExportSettings:
  model: str = setting(BUNDLED_MODEL, "Model to export: a dpjax checkpoint, an HF "
                            "directory or a hub id. Default: the small model bundled with "
                            "dpjax.")
  output_dir: str = setting("dpjax_export", "Where to write the HF checkpoint (with --gguf: "
                           "OUTPUT_DIR/model and OUTPUT_DIR/model.gguf, as dpjax-prune).")
  keep: tuple[str, ...] | None = setting(None, "0-based indices of the blocks to keep, e.g. "
                                         "0,1,5 (default: all).")
  mask: str | None = setting(None, "Alternative to --keep: one 0/1 character per block, "
                             "e.g. 110101.")
  overwrite: bool = setting(False, "Replace --output_dir if it exists.")
  max_shard_mb: int = setting(DEFAULT_MAX_SHARD_BYTES // 1024**2, "Largest safetensors shard, "
                              "in MiB.")
  gguf: bool = setting(False, f"Also write {GGUF_FILE}, for llama.cpp (the HF checkpoint then "
                       f"goes to OUTPUT_DIR/{MODEL_DIR}): a GGUF "
                       "source's stored (quantized) tensors of the kept blocks, or the HF "
                       "export's weights (Llama, Mistral, Qwen2) unquantized.")
  verify: bool = setting(True, "With --gguf, reload the GGUF file (transformers, or dpjax's "
                         "reader where the file states per-layer attention kinds) and "
                         "compare its logits and tokenizer with the kept blocks' before "
                         "reporting success; needs torch.")


def _parse_indices(values) -> list[int]:
  try:
    return [int(v) for v in values]
  except ValueError as e:
    raise ValueError(f"--keep takes comma-separated block indices, got {list(values)}.") from e


def _parse_mask(text: str) -> np.ndarray:
  text = text.replace(",", "").strip()
  if not text or set(text) - {"0", "1"}:
    raise ValueError(f"--mask takes one 0 or 1 per block (e.g. 1101), got {text!r}.")
  return np.array([c == "1" for c in text])


def _exported_blocks(directory: str) -> int:
  import json
  with open(os.path.join(directory, "config.json")) as f:
    config = json.load(f)
  return int(config.get("text_config", config)["num_hidden_layers"])


def export_checkpoint(s: ExportSettings) -> None:
  if s.keep is not None and s.mask is not None:
    raise ValueError("give --keep or --mask, not both.")
  kept = _parse_indices(s.keep) if s.keep is not None else None
  mask = _parse_mask(s.mask) if s.mask is not None else None
  if s.gguf:  # refused before anything is written
    variant_export.check_verifiable(gguf=True, verify=s.verify)
    variant_export.check_gguf_writable(
        s.model, kept if mask is None else [int(i) for i in np.flatnonzero(mask)])
  if not s.gguf:
    out = export(s.model, s.output_dir, kept_blocks=kept, keep=mask, overwrite=s.overwrite,
                 max_shard_bytes=s.max_shard_mb * 1024**2)
    print(f"wrote HF checkpoint to {out}")
    return
  # dpjax-prune's layout: OUTPUT_DIR/model (HF) and OUTPUT_DIR/model.gguf beside it (not
  # inside: transformers would read the HF tokenizer files with the GGUF file's).
  with fileio.atomic_directory(s.output_dir, overwrite=s.overwrite) as tmp:
    hf_dir = export(s.model, os.path.join(tmp, MODEL_DIR), kept_blocks=kept, keep=mask,
                    max_shard_bytes=s.max_shard_mb * 1024**2)
    if kept is None:  # a mask, or every block
      kept = ([int(i) for i in np.flatnonzero(mask)] if mask is not None else
              list(range(_exported_blocks(hf_dir))))
    record = variant_export.write_gguf(s.model, tmp, kept, hf_dir=hf_dir, verify=s.verify)
  out = os.path.abspath(s.output_dir)
  check = record["verification"]
  print(f"wrote HF checkpoint to {os.path.join(out, MODEL_DIR)}")
  print(f"wrote {os.path.join(out, GGUF_FILE)}" + (
      f" ({check['blocks_loaded']} blocks; logits within "
      f"{check['max_relative_difference']:.1e} of the kept blocks' by {check['loader']})"
      if check else " (not checked: --noverify)"))


def run() -> None:
  run_program("dpjax-export", [ExportSettings], export_checkpoint,
              aliases={"checkpoint": "model"})


if __name__ == "__main__":
  run()
