"""The `dpjax-convert` program: `--model=ID_OR_DIR --output_dir=DIR [--dtype=...]`."""

from __future__ import annotations

import dataclasses


from dpjax.bundled import BUNDLED_MODEL
from dpjax.cli.program import run_program
from dpjax.checkpoints import architectures
from dpjax.checkpoints.convert import convert
from dpjax.fields import setting


@dataclasses.dataclass(frozen=True)
class ConvertSettings:
  model: str = setting(BUNDLED_MODEL, "HF checkpoint to convert: a local directory "
                          "(config.json + safetensors, sharded or not) or a hub model id. "
                          "Default: the small model bundled with dpjax.")
  output_dir: str = setting("dpjax_converted", "Where to write the dpjax checkpoint.")
  dtype: str | None = setting(None, "Weight dtype to store; default: the checkpoint's own.",
                              choices=architectures.SUPPORTED_DTYPES)
  overwrite: bool = setting(False, "Replace --output_dir if it exists.")


def convert_checkpoint(s: ConvertSettings) -> None:
  out = convert(s.model, s.output_dir, dtype=s.dtype, overwrite=s.overwrite)
  print(f"wrote dpjax checkpoint to {out}")


def run() -> None:
  run_program("dpjax-convert", [ConvertSettings], convert_checkpoint,
              aliases={"hf_model": "model"})


if __name__ == "__main__":
  run()
