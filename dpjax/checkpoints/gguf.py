"""Reading a GGUF file (llama.cpp's format): config, tokenizer and dequantized weights.

How the work is split, and why:

* The config and the tokenizer come from transformers (`AutoConfig` /
  `AutoTokenizer` with `gguf_file=`): it already knows how each family's GGUF
  metadata maps to an HF config, and the study's reference is that same
  transformers model, so both read the file the same way.
* The weights do not: transformers' GGUF loader dequantizes every tensor into
  torch at once (its peak was 1.6-3.2x the float32 size on the three real
  models). Here the `gguf` package's `GGUFReader` lists the tensors, then each
  tensor is dequantized (`gguf.quants.dequantize`) a few rows at a time
  straight into the preallocated, stacked dpjax arrays, in `--dtype`, and the
  file's pages are released after each tensor. Peak memory is about one copy
  of the model in the target dtype, so a 7B file converts to bfloat16 in
  about 14 GB.
* GGUF names map to HF names, and llama.cpp's storage conventions (q/k rows
  permuted for its rope on `llama` files, Gemma norms stored as `1 + w`) are
  undone, by the architecture table (`architectures.GGUF_FAMILIES`); the HF
  names then map to dpjax's through the same rules as a safetensors checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import mmap
import os
from typing import Any

import numpy as np

from dpjax.checkpoints import architectures
from dpjax.checkpoints import slices
from dpjax.checkpoints.slices import CheckpointError
from dpjax.model.config import ModelConfig

GGUF_SUFFIX = ".gguf"
# Rows of a quantized tensor dequantized at a time (bounded to about 16 MB of float32).
_CHUNK_ELEMENTS = 1 << 22


def is_gguf(path: str) -> bool:
  return path.lower().endswith(GGUF_SUFFIX) and not os.path.isdir(path)


_FLOAT_TYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64}


@functools.lru_cache(maxsize=None)
def supported_types() -> tuple[str, ...]:
  """The GGML tensor types dpjax dequantizes: plain floats, and every type the gguf
  package dequantizes (tried on one all-zero block)."""
  from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants
  names = set(_FLOAT_TYPES)
  for qtype in GGMLQuantizationType:
    if qtype.name in names or qtype not in GGML_QUANT_SIZES:
      continue
    try:
      quants.dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), np.uint8), qtype)
    except Exception:  # not implemented for this type
      continue
    names.add(qtype.name)
  return tuple(sorted(names))


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  name: str           # GGUF name, e.g. blk.0.attn_q.weight
  hf_name: str
  type_name: str      # GGML type, e.g. Q4_K
  shape: tuple[int, ...]  # numpy order (rows first): HF's layout
  offset: int         # absolute byte offset in the file
  nbytes: int


def _checked_reader(path: str):
  import gguf
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise CheckpointError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF').")
  try:
    reader = gguf.GGUFReader(path)
  except Exception as e:
    raise CheckpointError(f"cannot read GGUF file {path}: {type(e).__name__}: {e}. It may be "
                          "truncated or corrupt; download it again.") from e
  for t in reader.tensors:
    if int(t.data_offset) + int(t.n_bytes) > size:
      raise CheckpointError(f"GGUF file {path} is truncated: tensor {t.name} ends at byte "
                            f"{int(t.data_offset) + int(t.n_bytes)} of a {size}-byte file.")
  return reader


@dataclasses.dataclass
class GGUFCheckpoint:
  """A GGUF file, with the HF config transformers derives from it and dpjax's config."""
  path: str
  config: ModelConfig
  raw_config: dict[str, Any]
  hf_config: Any
  family: architectures.GGUFFamily
  tensors: list[TensorInfo]

  @property
  def source(self) -> str:
    """Where the weights come from (what `DecoderModel.source` records)."""
    return self.path

  @property
  def directory(self) -> str:
    return os.path.dirname(self.path)

  @classmethod
  def open(cls, path: str, dtype: str | None = None) -> "GGUFCheckpoint":
    path = os.path.abspath(path)
    if not os.path.isfile(path):
      raise CheckpointError(f"no GGUF file at {path}.")
    stat = os.stat(path)
    family, infos, hf_config = _parsed(path, stat.st_size, stat.st_mtime_ns)
    hf_config = copy.deepcopy(hf_config)
    config = architectures.model_config_from_hf(hf_config, dtype or "float32")
    raw = hf_config.to_dict()
    for key in ("_name_or_path", "_model_name_or_path", "transformers_version",
                "quantization_config"):
      raw.pop(key, None)
    raw["architectures"] = [architectures.HF_CLASSES[config.architecture]]
    return cls(path, config, raw, hf_config, family, list(infos))

  def reader(self) -> "GGUFReader":
    return GGUFReader(self)

  def read_params(self) -> dict[str, Any]:
    """The weights as dpjax's nested param dict of numpy arrays in the config's dtype."""
    with self.reader() as reader:
      return slices.host_params(self.config, reader)

  def place_params(self, placement) -> dict[str, Any]:
    """The weights on `placement`'s devices, each reading only its own slices, every
    tensor dequantized a few rows at a time."""
    with self.reader() as reader:
      return slices.place_params(self.config, reader, placement)

  def tokenizer(self):
    """The tokenizer transformers builds from the file's vocabulary (`gguf_tokenizer`)."""
    try:
      return gguf_tokenizer(self.path)
    except Exception as e:
      raise CheckpointError(f"cannot build a tokenizer from GGUF file {self.path}: "
                            f"{type(e).__name__}: {e}") from e


def gguf_tokenizer(path: str):
  """The tokenizer transformers builds from a GGUF file's vocabulary: built once per
  process for one version of the file (Gemma 3's 262k tokens take about 15 s of CPU),
  each caller given its own copy (a tokenizer holds state, such as its truncation)."""
  stat = os.stat(path)
  return copy.deepcopy(_tokenizer(os.path.abspath(path), stat.st_size, stat.st_mtime_ns))


def transformers_dense_kwargs(path: str) -> dict[str, Any]:
  """What `transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), ...)`
  takes to load the GGUF file at `path` as its dense model, every weight dequantized, as
  dpjax computes it. transformers 5.2x otherwise keeps quantized weights packed where it
  has kernels for them and computes through those float32 kernels, another model to
  compare with; before `GgufConfig` it always dequantized."""
  import transformers
  kwargs: dict[str, Any] = {"gguf_file": os.path.basename(path)}
  if hasattr(transformers, "GgufConfig"):
    kwargs["quantization_config"] = transformers.GgufConfig(dequantize=True)
  return kwargs


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str, size: int, mtime_ns: int):
  del size, mtime_ns  # the cache key: another version of the file is built again
  import transformers
  return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                    gguf_file=os.path.basename(path))


class GGUFReader:
  """A GGUF file's tensors as HF tensors (`slices.TensorReader`), dequantized on reading.

  A slice of a quantized tensor is dequantized a few rows at a time (a quantization
  block never spans rows), keeping only the slice's columns, and the file's pages are
  released after every read, so reading holds about the slice itself. Tensors whose
  rows move between each other on the way to HF's layout (the q/k rows llama.cpp
  permuted) and vectors are dequantized whole, the last one kept for the next slice.
  """

  def __init__(self, checkpoint: GGUFCheckpoint):
    self.checkpoint = checkpoint
    self.source = f"GGUF file {checkpoint.path}"
    self._by_name = {t.hf_name: t for t in checkpoint.tensors}
    with open(checkpoint.path, "rb") as f:
      self._mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    self._whole: tuple[str, np.ndarray] | None = None

  def __enter__(self) -> "GGUFReader":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    self._whole = None
    try:
      self._mapped.close()
    except BufferError:  # a view still refers to it (after an error): the GC closes it
      pass

  def shapes(self) -> dict[str, tuple[int, ...]]:
    return {name: info.shape for name, info in self._by_name.items()}

  def _raw(self, info: TensorInfo) -> np.ndarray:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[info.type_name]]
    raw = np.frombuffer(self._mapped, dtype=np.uint8, count=info.nbytes, offset=info.offset)
    rows = int(np.prod(info.shape[:-1], dtype=np.int64))
    return raw.reshape(rows, info.shape[-1] // block * type_size)  # a block never spans rows

  def _dequantize(self, info: TensorInfo, part: np.ndarray) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants
    if info.type_name in _FLOAT_TYPES:
      return part.view(_FLOAT_TYPES[info.type_name]).astype(np.float32)
    return quants.dequantize(part, GGMLQuantizationType[info.type_name]).astype(
        np.float32, copy=False)

  def read(self, name: str, index: slices.Index) -> np.ndarray:
    info = self._by_name[name]
    family, hf_config = self.checkpoint.family, self.checkpoint.hf_config
    whole = (len(info.shape) == 1 or (family.permute_qk and (".attn_q." in info.name
                                                            or ".attn_k." in info.name)))
    if whole:
      if self._whole is None or self._whole[0] != name:
        tensor = self._dequantize(info, self._raw(info)).reshape(info.shape)
        self._whole = (name, architectures.gguf_to_hf_values(tensor, info.name, family,
                                                             hf_config))
        self._mapped.madvise(mmap.MADV_DONTNEED)
      return self._whole[1][index]
    rows, cols = index[0], index[1:]
    raw = self._raw(info)
    out = np.empty((rows.stop - rows.start, *(c.stop - c.start for c in cols)), np.float32)
    step = max(1, _CHUNK_ELEMENTS // info.shape[-1])
    for start in range(rows.start, rows.stop, step):
      stop = min(rows.stop, start + step)
      part = self._dequantize(info, raw[start:stop]).reshape(stop - start, *info.shape[1:])
      part = architectures.gguf_to_hf_values(part, info.name, family, hf_config)
      out[start - rows.start:stop - rows.start] = part[(slice(None), *cols)]
    # The pages read are clean file cache: drop them so they do not add to the peak.
    self._mapped.madvise(mmap.MADV_DONTNEED)
    return out


@functools.lru_cache(maxsize=4)
def _parsed(path: str, size: int, mtime_ns: int):
  """(family, tensor infos, HF config) of a GGUF file: its metadata parsed once per process
  for one file version (the `gguf` reader and transformers' config each walk every
  vocabulary string of the header: tens of seconds for Gemma 3's 262k tokens)."""
  del size, mtime_ns  # the cache key: another version of the file is parsed again
  reader = _checked_reader(path)
  field = reader.fields.get("general.architecture")
  if field is None:
    raise CheckpointError(f"GGUF file {path} has no general.architecture; it is not a model.")
  family = architectures.gguf_family(field.contents())
  supported = set(supported_types())
  unsupported = sorted({t.tensor_type.name for t in reader.tensors} - supported)
  if unsupported:
    bad = [t.name for t in reader.tensors if t.tensor_type.name in unsupported][:4]
    raise architectures.UnsupportedModelError(
        f"GGUF file {path} holds tensors of types {unsupported} (e.g. {bad}), which dpjax "
        f"cannot dequantize; supported: {', '.join(sorted(supported))}.")
  infos, unknown = [], []
  for t in reader.tensors:
    hf_name = architectures.hf_name_of_gguf(t.name, family)
    if hf_name is None:
      unknown.append(t.name)
      continue
    infos.append(TensorInfo(t.name, hf_name, t.tensor_type.name,
                            tuple(int(x) for x in reversed(t.shape.tolist())),
                            int(t.data_offset), int(t.n_bytes)))
  sliding = layer_pattern(reader, field.contents())
  del reader  # its parsed vocabulary is large; the tensors are read through our own map
  if unknown:
    raise CheckpointError(f"GGUF file {path} has tensors dpjax does not know: {unknown[:8]}.")
  hf_config = _hf_config(path)
  if hf_config.model_type != family.model_type:
    raise CheckpointError(f"GGUF file {path}: transformers read it as "
                          f"{hf_config.model_type!r}, expected {family.model_type!r}.")
  if sliding is not None:
    if len(sliding) != hf_config.num_hidden_layers:
      raise CheckpointError(f"GGUF file {path}: {SLIDING_PATTERN_KEY} lists {len(sliding)} "
                            f"blocks, the file has {hf_config.num_hidden_layers}.")
    # transformers takes the layer kinds from their index; the file says them per layer.
    hf_config.layer_types = ["sliding_attention" if b else "full_attention" for b in sliding]
  return family, tuple(infos), hf_config


# llama.cpp's per-layer attention kinds (true: a sliding-window block), `{arch}.` prefixed.
# dpjax writes it where a kept set moves blocks off their family's index pattern.
SLIDING_PATTERN_KEY = "attention.sliding_window_pattern"


def layer_pattern(reader, architecture: str) -> list[bool] | None:
  """The file's per-layer sliding/full pattern, when it states one as an array."""
  from gguf import GGUFValueType
  field = reader.fields.get(f"{architecture}.{SLIDING_PATTERN_KEY}")
  if field is None or field.types[0] != GGUFValueType.ARRAY:
    return None
  return [bool(v) for v in field.contents()]


def _hf_config(path: str):
  """The HF config transformers derives from the file's metadata."""
  import transformers
  try:
    return transformers.AutoConfig.from_pretrained(os.path.dirname(path),
                                                   gguf_file=os.path.basename(path))
  except ImportError as e:
    raise CheckpointError(_missing_reader(e)) from e
  except Exception as e:
    raise CheckpointError(f"transformers cannot read the config of GGUF file {path}: "
                          f"{type(e).__name__}: {e}") from e


def _missing_reader(error: ImportError) -> str:
  """What to install when transformers cannot import its GGUF reader: the `gguf` package
  (a dependency of dpjax), or torch, which transformers' own GGUF reader imports in
  releases that read the metadata themselves (torch is optional in dpjax)."""
  import importlib.util
  import transformers
  from dpjax.checkpoints.hf import TORCH_INSTALL, torch_available
  if importlib.util.find_spec("gguf") is None:
    return f"reading GGUF files needs the gguf package: pip install gguf ({error})."
  if not torch_available():
    return (f"transformers {transformers.__version__} reads a GGUF file's config and "
            f"tokenizer with a reader that imports torch, which is not installed: "
            f"{TORCH_INSTALL}.")
  return f"transformers cannot import its GGUF reader: {error}"
