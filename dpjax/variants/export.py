"""A pruned variant written out and checked: its kept blocks exported as an HF checkpoint
(and a GGUF file), reloaded by transformers (or, without torch, by dpjax's own reader)
and compared with dpjax's kept-block logits before it counts as written; the GGUF file's
tokenizer checked against the HF export's. Used by `dpjax-prune`, `dpjax-export` and the
healing stage."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dpjax import fileio

MODEL_DIR = "model"
GGUF_FILE = "model.gguf"
# Logits of the export, reloaded by transformers, against dpjax's for the kept blocks:
# the largest difference relative to the largest logit. The check is for a usable export
# (a block out of place, a weight unpermuted, a norm off by one differ by more than 1e-1),
# run in float32 on real checkpoints, where HF float32's own distance from HF float64
# reaches 6.6e-5 (SmolLM2 without blocks 10 and 15, random ids; dpjax's is 7.0e-6 there):
# 1e-5 refused exports that were exact. The tests pin exactness at 1e-5 on small models;
# the plan records the difference measured.
LOGIT_TOLERANCE = 1e-3


def file_hashes(directory: str) -> dict[str, str]:
  return {name: fileio.sha256_file(os.path.join(directory, name))
          for name in sorted(os.listdir(directory))
          if os.path.isfile(os.path.join(directory, name))}


def check_verifiable(gguf: bool, verify: bool) -> None:
  """Refuses, before any work, a check that needs torch where it is missing: the GGUF
  file's, which is transformers' GGUF loading (the HF export's falls back to dpjax's
  own reader)."""
  from dpjax.checkpoints.hf import TORCH_INSTALL, torch_available
  if gguf and verify and not torch_available():
    raise ValueError(f"--gguf checks the GGUF file with transformers' GGUF loading, which "
                     f"needs torch: {TORCH_INSTALL} (or pass --noverify to write it "
                     "unchecked).")


def _logits_check(want: np.ndarray, got: np.ndarray, who: str) -> float:
  """The largest difference of `got` from `want` relative to the largest logit, refused
  past LOGIT_TOLERANCE."""
  relative = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))
  if not relative <= LOGIT_TOLERANCE:
    raise ValueError(f"the export's logits under {who} differ from dpjax's kept-block "
                     f"logits by {relative:.2e} of the largest logit (tolerance "
                     f"{LOGIT_TOLERANCE}); the export is not usable.")
  return relative


def verify_export(source: str, export_dir: str, kept: list[int], seed: int = 0,
                  gguf_file: str | None = None, model=None,
                  kinds_stated: bool = False, hf_dir: str | None = None) -> dict[str, Any]:
  """The export (an HF directory, or `gguf_file` in it) reloaded by transformers against
  dpjax's logits for the kept blocks (of `model`, the source loaded in float32, when
  given). Without torch, an HF directory is reloaded by dpjax's own reader instead
  (`transformers_check` then says it was skipped); a GGUF file is refused.
  `kinds_stated`: the GGUF file states its blocks' attention kinds per layer, which
  transformers does not read; the file is reloaded by dpjax's reader (which does, as
  llama.cpp does) and its tokenizer still checked by transformers. `hf_dir`: the HF
  export whose tokenizer the GGUF file's must match (default: `export_dir`/model)."""
  from dpjax.checkpoints.gguf import transformers_dense_kwargs
  from dpjax.checkpoints.hf import TORCH_INSTALL, torch_available
  from dpjax.model.load import load_model
  from dpjax.model.plan import keep_mask
  if not torch_available():
    if gguf_file:
      raise ValueError(f"checking the GGUF export needs transformers' GGUF loading, which "
                       f"needs torch: {TORCH_INSTALL} (or pass --noverify).")
    return _verify_with_dpjax(source, export_dir, kept, seed, model)
  if gguf_file and kinds_stated:
    import transformers
    check = _verify_with_dpjax(source, os.path.join(export_dir, gguf_file), kept, seed, model)
    check.update(
        loader=f"dpjax {version()} (the written GGUF file reloaded, its per-layer "
               "attention kinds read)",
        transformers_check=KINDS_STATED.format(transformers.__version__),
        tokenizer=_same_tokenization(hf_dir or os.path.join(export_dir, MODEL_DIR), export_dir,
                                     gguf_file))
    return check
  import torch
  import transformers
  model = model if model is not None else load_model(source, dtype="float32")
  extra = (transformers_dense_kwargs(os.path.join(export_dir, gguf_file)) if gguf_file
           else {})  # a GGUF file as its dense model, as dpjax computes it
  hf = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32,
                                                         **extra)
  if hf.config.num_hidden_layers != len(kept):
    raise ValueError(f"transformers loaded {hf.config.num_hidden_layers} blocks from "
                     f"{export_dir}, not the {len(kept)} kept.")
  ids = _check_ids(model, seed)
  want = np.asarray(model.logits(ids, keep=keep_mask(kept, model.num_layers)), np.float64)
  with torch.no_grad():
    got = hf(input_ids=torch.as_tensor(ids)).logits.double().numpy()
  relative = _logits_check(want, got, "transformers")
  tokenizer = None
  if gguf_file:  # the file carries its own tokenizer: it must encode as the HF export's
    tokenizer = _same_tokenization(hf_dir or os.path.join(export_dir, MODEL_DIR), export_dir, gguf_file)
  return {"loader": f"transformers {transformers.__version__} AutoModelForCausalLM"
                    + (" (GGUF)" if gguf_file else ""),
          "blocks_loaded": int(hf.config.num_hidden_layers), "max_relative_difference": relative,
          "same_argmax": bool((got.argmax(-1) == want.argmax(-1)).all()),
          **({"tokenizer": tokenizer} if tokenizer else {})}


def _check_ids(model, seed: int) -> np.ndarray:
  """The token ids both sides of a check read: random, seeded."""
  return np.random.default_rng([seed, 11]).integers(3, min(model.config.vocab_size, 32000),
                                                    size=(2, 24))


TRANSFORMERS_SKIPPED = "skipped: torch is not installed"
KINDS_STATED = ("not possible: transformers {} takes Gemma 3's attention kinds from the block "
                "index, and this file states them per layer (attention.sliding_window_pattern, "
                "read by llama.cpp and dpjax)")


def _verify_with_dpjax(source: str, export_dir: str, kept: list[int], seed: int,
                       model=None) -> dict[str, Any]:
  """The HF export reloaded by dpjax's own reader (its config.json and safetensors, through
  the architecture table, as any HF checkpoint is read) against the kept blocks of the
  source in memory: the check of an export where transformers cannot run (no torch). It
  catches what the transformers check catches in the written files (a block out of place,
  a tensor misnamed or mis-shaped, a config not cut to the kept blocks); it does not
  catch a mistake that dpjax's reader and writer would share."""
  from dpjax.model.load import load_model
  from dpjax.model.plan import keep_mask
  model = model if model is not None else load_model(source, dtype="float32")
  reloaded = load_model(export_dir, dtype="float32")  # a directory, or a GGUF file
  if reloaded.num_layers != len(kept):
    raise ValueError(f"dpjax loaded {reloaded.num_layers} blocks from {export_dir}, not the "
                     f"{len(kept)} kept.")
  ids = _check_ids(model, seed)
  want = np.asarray(model.logits(ids, keep=keep_mask(kept, model.num_layers)), np.float64)
  got = np.asarray(reloaded.logits(ids), np.float64)
  relative = _logits_check(want, got, "dpjax's reload")
  return {"loader": f"dpjax {version()} (the written safetensors reloaded)",
          "transformers_check": TRANSFORMERS_SKIPPED,
          "blocks_loaded": int(reloaded.num_layers), "max_relative_difference": relative,
          "same_argmax": bool((got.argmax(-1) == want.argmax(-1)).all())}


PROBE_TEXTS = ("Question: Which gas do plants take in from the air?\nAnswer: carbon dioxide",
               "  two spaces, tabs\tand\nnew lines; digits 12345 and caf\u00e9 \u2014 ok",
               "def f(x):\n    return x ** 2  # squares")


def _same_tokenization(hf_dir: str, gguf_dir: str, gguf_file: str) -> dict[str, Any]:
  """The GGUF file's tokenizer (as transformers builds it) against the HF export's, on
  probe texts (spaces, tabs, new lines, digits, accents, code): the same ids and the same
  BOS and EOS tokens."""
  import transformers
  want = transformers.AutoTokenizer.from_pretrained(hf_dir)
  got = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
  for text in PROBE_TEXTS:
    a = want(text, add_special_tokens=False)["input_ids"]
    b = got(text, add_special_tokens=False)["input_ids"]
    if a != b:
      raise ValueError(f"the GGUF file's tokenizer encodes {text!r} as {b[:12]}..., the HF "
                       f"export's as {a[:12]}...; the GGUF file is not usable.")
  for name in ("bos_token_id", "eos_token_id"):
    if getattr(want, name) is not None and getattr(got, name) != getattr(want, name):
      raise ValueError(f"the GGUF file's tokenizer has {name} {getattr(got, name)}, the HF "
                       f"export's {getattr(want, name)}; the GGUF file is not usable.")
  return {"probe_texts": len(PROBE_TEXTS), "same_ids": True}


def check_gguf_writable(source: str, kept: list[int] | None) -> None:
  """Refuses `--gguf` for a source (and kept set) whose GGUF form would not load back the
  same: a Gemma GGUF source's kept blocks that change attention kind; an HF source of a
  family or setting the written file cannot state."""
  from dpjax.checkpoints.gguf import is_gguf
  if is_gguf(source):
    if kept is not None:
      from dpjax.checkpoints.gguf_export import check_index_pattern, gguf_architecture
      check_index_pattern(gguf_architecture(source), kept)
  elif os.path.isfile(os.path.join(source, "config.json")):  # (else: the export is checked)
    from dpjax.checkpoints.gguf_from_hf import check_writable
    check_writable(source)


def export_variant(source: str, out: str, kept: list[int], *, gguf: bool = False,
                   verify: bool = True, seed: int = 0, overwrite: bool = False, model=None,
                   params: dict[str, Any] | None = None) -> dict[str, Any]:
  """Writes the kept blocks of `source` to `out`/model (and `out`/model.gguf with `gguf`)
  and, with `verify`, checks them against `model` (the source in float32; loaded when
  None). `params`: the source's weights already in memory in its own dtype (else read
  from it again). Returns the record of what was written and checked; on a failed check
  nothing written stays."""
  from dpjax.checkpoints.export import export
  check_verifiable(gguf, verify)
  if gguf:
    check_gguf_writable(source, kept)  # refused before anything is written
  model_dir = os.path.join(out, MODEL_DIR)
  gguf_path = os.path.join(out, GGUF_FILE)
  export(source, model_dir, kept_blocks=kept, overwrite=overwrite, params=params)
  try:
    check = verify_export(source, model_dir, kept, seed, model=model) if verify else None
    gguf_record = (write_gguf(source, out, kept, hf_dir=model_dir, verify=verify, seed=seed,
                              model=model) if gguf else None)
  except Exception:
    import shutil
    shutil.rmtree(model_dir, ignore_errors=True)  # nothing half-made stays behind
    if os.path.exists(gguf_path):
      os.remove(gguf_path)
    raise
  return {"directory": MODEL_DIR, "files": file_hashes(model_dir), "verification": check,
          "gguf": gguf_record}


def write_gguf(source: str, out: str, kept: list[int], hf_dir: str, *, verify: bool = True,
               seed: int = 0, model=None) -> dict[str, Any]:
  """Writes `out`/model.gguf with the kept blocks of `source` (a GGUF source: its stored
  tensors copied, quantized as they are; an HF source: the HF export at `hf_dir`,
  unquantized) and, with `verify`, checks it (logits against the kept blocks of `model`,
  the source in float32, loaded when None; the tokenizer against `hf_dir`'s). Returns the
  file's record; a file that fails its check is removed."""
  from dpjax.checkpoints.gguf import is_gguf
  gguf_path = os.path.join(out, GGUF_FILE)
  kinds_stated = False
  try:
    if is_gguf(source):
      from dpjax.checkpoints.gguf_export import gguf_architecture, prune_gguf, stated_pattern
      prune_gguf(source, gguf_path, kept)  # the stored (quantized) tensors, copied
      kinds_stated = stated_pattern(gguf_architecture(source), kept) is not None
    else:
      from dpjax.checkpoints.gguf_from_hf import write_gguf_from_hf
      write_gguf_from_hf(hf_dir, gguf_path)  # the exported weights, unquantized
    check = (verify_export(source, out, kept, seed, gguf_file=GGUF_FILE, model=model,
                           kinds_stated=kinds_stated, hf_dir=hf_dir) if verify else None)
  except Exception:
    if os.path.exists(gguf_path):
      os.remove(gguf_path)
    raise
  return {"file": GGUF_FILE, "sha256": fileio.sha256_file(gguf_path), "verification": check,
          **({"attention_kinds": "stated per layer"} if kinds_stated else {})}


def version() -> str:
  from importlib import metadata
  try:
    return metadata.version("dpjax")
  except metadata.PackageNotFoundError:
    return "unknown"
