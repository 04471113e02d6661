"""The `dpjax-convert` program: `--hf_model=ID_OR_DIR --output_dir=DIR [--dtype=...]`."""

from __future__ import annotations

from absl import app
from absl import flags

from checkpoints_convert import architectures
from checkpoints_convert.convert import convert


_HF_MODEL = flags.DEFINE_string(
    "hf_model", None, "HF checkpoint to convert: a local directory (config.json + "
    "safetensors, sharded or not) or a hub model id.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where to write the dpjax checkpoint.")
_DTYPE = flags.DEFINE_enum(
    "dtype", None, list(architectures.SUPPORTED_DTYPES),
    "Weight dtype to store; default: the checkpoint's own.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace --output_dir if it exists.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; everything is a flag.")
  try:
    out = convert(_HF_MODEL.value, _OUTPUT_DIR.value, dtype=_DTYPE.value,
                  overwrite=_OVERWRITE.value)
  except (ValueError, FileExistsError) as e:
    raise SystemExit(f"dpjax-convert: error: {e}") from e
  print(f"wrote dpjax checkpoint to {out}")


def run() -> None:
  flags.mark_flags_as_required(["hf_model", "output_dir"])
  app.run(main)


if __name__ == "__main__":
  run()
