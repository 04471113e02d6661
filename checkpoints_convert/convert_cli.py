"""The `dpjax-convert` program: `--hf_model=ID_OR_DIR --output_dir=DIR [--dtype=...]`."""

from __future__ import annotations

import dataclasses

from absl import app

from dpjax import flagdefs
from dpjax.checkpoints import architectures
from dpjax.checkpoints.convert import convert
from dpjax.flagdefs import setting


@dataclasses.dataclass(frozen=True)
class ConvertSettings:
  hf_model: str = setting(help="HF checkpoint to convert: a local directory (config.json + "
                          "safetensors, sharded or not) or a hub model id.", required=True)
  output_dir: str = setting(help="Where to write the dpjax checkpoint.", required=True)
  dtype: str | None = setting(None, "Weight dtype to store; default: the checkpoint's own.",
                              choices=architectures.SUPPORTED_DTYPES)
  overwrite: bool = setting(False, "Replace --output_dir if it exists.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; everything is a flag.")
  s = flagdefs.from_flags(ConvertSettings)
  try:
    out = convert(s.hf_model, s.output_dir, dtype=s.dtype, overwrite=s.overwrite)
  except (ValueError, FileExistsError) as e:
    raise SystemExit(f"dpjax-convert: error: {e}") from e
  print(f"wrote dpjax checkpoint to {out}")


def run() -> None:
  flagdefs.define_flags(ConvertSettings)
  app.run(main)


if __name__ == "__main__":
  run()
