"""A GGUF file with only the kept blocks: tensors copied as they are stored (quantized
bytes untouched, renumbered `blk.0..K-1`), every per-layer metadata array cut to the kept
blocks and `block_count` set, the tokenizer and the rest of the metadata copied.

Some families take a layer's attention kind from its index: Gemma 3's sliding/global
pattern is every sixth block global, Gemma 2's every second. A kept set can move a block
to an index of the other kind. For Gemma 3 the file then states each kept block's kind in
`gemma3.attention.sliding_window_pattern`, a per-layer array (true: sliding), which
llama.cpp reads and dpjax's reader honours; transformers (5.2x) still takes the kinds
from the index, so such a file is checked with dpjax's reader and the plan says why.
Gemma 2 has no such key in any reader: a kept set that moves its kinds is refused,
naming the blocks.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Sequence

import numpy as np

# Families whose layer kinds follow from the layer's index: the kind of index i.
_INDEX_PATTERNS = {
    "gemma3": lambda i: "full" if (i + 1) % 6 == 0 else "sliding",
    "gemma2": lambda i: "sliding" if i % 2 == 0 else "full",
}
# Those whose files can state the kinds per layer (read by llama.cpp and dpjax).
_STATED_PATTERNS = ("gemma3",)
_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")


def _string(field) -> str:
  return bytes(field.parts[field.data[0]]).decode()


def gguf_architecture(path: str) -> str:
  """The file's `general.architecture` (llama.cpp's family name: llama, gemma3, qwen2...),
  read once per process for one version of the file (the `gguf` reader walks every
  vocabulary string of the header: about 10 s of CPU for Gemma 3's 262k tokens)."""
  stat = os.stat(path)
  return _architecture(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _architecture(path: str, size: int, mtime_ns: int) -> str:
  del size, mtime_ns  # the cache key: another version of the file is read again
  from gguf import GGUFReader
  return _string(GGUFReader(path).fields["general.architecture"])


def _kinds(architecture: str, count: int, stated: Sequence[bool] | None) -> list[str]:
  """Each of `count` blocks' attention kind: as the file states them, else by index."""
  if stated is not None:
    return ["sliding" if b else "full" for b in stated]
  return [_INDEX_PATTERNS[architecture](i) for i in range(count)]


def moved_blocks(architecture: str, kept: Sequence[int],
                 stated: Sequence[bool] | None = None) -> list[tuple[int, int, str, str]]:
  """(old index, new index, its kind, the kind its new index gives) of each kept block
  whose kind the index pattern would change when renumbered; `stated`: the source file's
  own per-layer pattern, if it states one. None for a family without an index pattern."""
  pattern = _INDEX_PATTERNS.get(architecture)
  if pattern is None:
    return []
  kinds = _kinds(architecture, max(kept) + 1 if stated is None else len(stated), stated)
  return [(old, new, kinds[old], pattern(new)) for new, old in enumerate(kept)
          if kinds[old] != pattern(new)]


def check_index_pattern(architecture: str, kept: Sequence[int],
                        stated: Sequence[bool] | None = None) -> None:
  """Refuses a kept set whose blocks would change attention kind when renumbered, in a
  family whose files cannot state the kinds per layer."""
  moved = moved_blocks(architecture, kept, stated)
  if not moved or architecture in _STATED_PATTERNS:
    return
  shown = ", ".join(f"block {old} ({kind}) would load as block {new} ({now})"
                    for old, new, kind, now in moved[:4])
  raise ValueError(f"a {architecture} GGUF file takes each block's attention kind from its "
                   f"index in llama.cpp and in transformers, and neither reads a key to say "
                   f"otherwise: {shown}. Export this variant as an HF checkpoint (its config "
                   "lists layer_types), or keep blocks whose kinds line up (remove whole "
                   "periods of the pattern).")


def stated_pattern(architecture: str, kept: Sequence[int],
                   stated: Sequence[bool] | None = None) -> list[bool] | None:
  """The per-layer sliding pattern (true: sliding) a pruned file must state for its kept
  blocks to keep their kinds, or None where the index pattern gives them."""
  if not moved_blocks(architecture, kept, stated) or architecture not in _STATED_PATTERNS:
    return None
  kinds = _kinds(architecture, max(kept) + 1 if stated is None else len(stated), stated)
  return [kinds[old] == "sliding" for old in kept]


def prune_gguf(source: str, output: str, kept: Sequence[int], *,
               dequantize: bool = False) -> str:
  """Writes `output` (a .gguf file, atomically): `source` with only blocks `kept`; with
  `dequantize`, every tensor stored as float32 (the weights dpjax computes with: a
  quantized file's reference for a reader's own kernels)."""
  from gguf import GGUFReader, GGUFValueType, GGUFWriter
  from gguf import quants
  reader = GGUFReader(source)
  fields = reader.fields
  architecture = _string(fields["general.architecture"])
  count_key = f"{architecture}.block_count"
  num_layers = int(fields[count_key].parts[fields[count_key].data[0]][0])
  kept = [int(k) for k in kept]
  if not kept or sorted(set(kept)) != kept or not 0 <= kept[0] <= kept[-1] < num_layers:
    raise ValueError(f"kept blocks {kept} are not increasing indices of the file's "
                     f"{num_layers} blocks.")
  from dpjax.checkpoints.gguf import SLIDING_PATTERN_KEY, layer_pattern
  source_pattern = layer_pattern(reader, architecture)
  check_index_pattern(architecture, kept, source_pattern)
  pattern_key = f"{architecture}.{SLIDING_PATTERN_KEY}"
  stated = stated_pattern(architecture, kept, source_pattern)
  tmp = output + ".tmp"
  writer = GGUFWriter(tmp, architecture)
  for key, field in fields.items():
    if key.startswith("GGUF.") or key == "general.architecture":
      continue
    if key == pattern_key:
      continue  # written below for the kept blocks, where the index pattern is not theirs
    vtype = field.types[0]
    value: Any = field.contents()
    sub_type = field.types[-1] if vtype == GGUFValueType.ARRAY else None
    if key == count_key:
      value = len(kept)
    elif key == "general.file_type" and dequantize:
      value = 0  # llama.cpp's LLAMA_FTYPE_ALL_F32
    elif (vtype == GGUFValueType.ARRAY and key.startswith(architecture + ".")
          and len(field.data) == num_layers):
      value = [value[i] for i in kept]  # a per-layer array: the kept layers' entries
    writer.add_key_value(key, value, vtype, sub_type=sub_type)
  if stated is not None:
    writer.add_key_value(pattern_key, stated, GGUFValueType.ARRAY, sub_type=GGUFValueType.BOOL)
  if dequantize and "general.file_type" not in fields:
    writer.add_key_value("general.file_type", 0, GGUFValueType.UINT32)
  renumber = {old: new for new, old in enumerate(kept)}
  for tensor in reader.tensors:
    match = _BLOCK.match(tensor.name)
    if match and int(match.group(1)) not in renumber:
      continue
    name = (f"blk.{renumber[int(match.group(1))]}.{match.group(2)}" if match else tensor.name)
    if dequantize:
      writer.add_tensor(name, np.ascontiguousarray(
          quants.dequantize(np.asarray(tensor.data), tensor.tensor_type), np.float32))
      continue
    # The stored bytes as they are (a quantized tensor's rows of blocks; the writer reads
    # the element shape back from the byte shape and the type).
    writer.add_tensor(name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  os.replace(tmp, output)
  return output
