"""The `dpjax-export` program: `--checkpoint=ID_OR_DIR --keep=3,4,7 --output_dir=DIR`."""

from __future__ import annotations

from absl import app
from absl import flags
import numpy as np

from checkpoints_convert.export import DEFAULT_MAX_SHARD_BYTES, export


_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Model to export: a dpjax checkpoint, an HF directory or a hub id.")
_KEEP = flags.DEFINE_list(
    "keep", None, "0-based indices of the blocks to keep, e.g. 0,1,5 (default: all).")
_MASK = flags.DEFINE_string(
    "mask", None, "Alternative to --keep: one 0/1 character per block, e.g. 110101.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where to write the HF checkpoint.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --output_dir if it exists.")
_MAX_SHARD_MB = flags.DEFINE_integer(
    "max_shard_mb", DEFAULT_MAX_SHARD_BYTES // 1024**2, "Largest safetensors shard, in MiB.")


def _parse_indices(values: list[str]) -> list[int]:
  try:
    return [int(v) for v in values]
  except ValueError as e:
    raise ValueError(f"--keep takes comma-separated block indices, got {values}.") from e


def _parse_mask(text: str) -> np.ndarray:
  text = text.replace(",", "").strip()
  if not text or set(text) - {"0", "1"}:
    raise ValueError(f"--mask takes one 0 or 1 per block (e.g. 1101), got {text!r}.")
  return np.array([c == "1" for c in text])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; everything is a flag.")
  try:
    if _KEEP.value is not None and _MASK.value is not None:
      raise ValueError("give --keep or --mask, not both.")
    out = export(
        _CHECKPOINT.value, _OUTPUT_DIR.value,
        kept_blocks=_parse_indices(_KEEP.value) if _KEEP.value is not None else None,
        keep=_parse_mask(_MASK.value) if _MASK.value is not None else None,
        overwrite=_OVERWRITE.value, max_shard_bytes=_MAX_SHARD_MB.value * 1024**2)
  except (ValueError, FileExistsError) as e:
    raise SystemExit(f"dpjax-export: error: {e}") from e
  print(f"wrote HF checkpoint to {out}")


def run() -> None:
  flags.mark_flags_as_required(["checkpoint", "output_dir"])
  app.run(main)


if __name__ == "__main__":
  run()
