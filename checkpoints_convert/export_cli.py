"""The `dpjax-export` program: `--model=ID_OR_DIR --keep=3,4,7 --output_dir=DIR`."""

from __future__ import annotations

import dataclasses

import numpy as np

from dpjax.bundled import BUNDLED_MODEL
from dpjax.cli.program import run_program
from dpjax.checkpoints.export import DEFAULT_MAX_SHARD_BYTES, export
from dpjax.fields import setting


@dataclasses.dataclass(frozen=True)
class ExportSettings:
  model: str = setting(BUNDLED_MODEL, "Model to export: a dpjax checkpoint, an HF "
                            "directory or a hub id. Default: the small model bundled with "
                            "dpjax.")
  output_dir: str = setting("dpjax_export", "Where to write the HF checkpoint.")
  keep: tuple[str, ...] | None = setting(None, "0-based indices of the blocks to keep, e.g. "
                                         "0,1,5 (default: all).")
  mask: str | None = setting(None, "Alternative to --keep: one 0/1 character per block, "
                             "e.g. 110101.")
  overwrite: bool = setting(False, "Replace --output_dir if it exists.")
  max_shard_mb: int = setting(DEFAULT_MAX_SHARD_BYTES // 1024**2, "Largest safetensors shard, "
                              "in MiB.")


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


def export_checkpoint(s: ExportSettings) -> None:
  if s.keep is not None and s.mask is not None:
    raise ValueError("give --keep or --mask, not both.")
  out = export(
      s.model, s.output_dir,
      kept_blocks=_parse_indices(s.keep) if s.keep is not None else None,
      keep=_parse_mask(s.mask) if s.mask is not None else None,
      overwrite=s.overwrite, max_shard_bytes=s.max_shard_mb * 1024**2)
  print(f"wrote HF checkpoint to {out}")


def run() -> None:
  run_program("dpjax-export", [ExportSettings], export_checkpoint,
              aliases={"checkpoint": "model"})


if __name__ == "__main__":
  run()
