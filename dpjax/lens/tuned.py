"""The tuned lens: one affine translator per layer, read before the model's own final norm.

    z_l = W_U · norm_f(h_l + A_l h_l + b_l)        (Belrose et al., 2023)

`Translators` holds `A` `[L+1, d, d]` and `b` `[L+1, d]` for layers `0..L`
(layer 0 is `h_0`); with zero translators the tuned lens is the logit lens
exactly, and layer `L`'s translator stays zero (the last block's output is read
as the model reads it). For a pruned variant, each kept block's layer is read
with the translator trained for that layer on the unpruned model.

A trained lens is a directory: `translators/` (Orbax) and `lens.json` (the
model's name and a fingerprint of its weights, the corpus, the training
settings and the held-out KL per layer). Loading it for another model is
refused by the fingerprint. `dpjax-train-lens` trains one (`dpjax.lens.training`).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dpjax.engine.devices import fetch

LENS_FILE = "lens.json"
TRANSLATORS_DIR = "translators"


class Translators(NamedTuple):
  weight: jax.Array | np.ndarray  # [L+1, d, d]: h -> h @ weight[l]
  bias: jax.Array | np.ndarray    # [L+1, d]


def zero_translators(num_layers: int, hidden_size: int) -> Translators:
  return Translators(np.zeros((num_layers + 1, hidden_size, hidden_size), np.float32),
                     np.zeros((num_layers + 1, hidden_size), np.float32))


def translate(translators: Translators | None, h: jax.Array, layer) -> jax.Array:
  """`h + A_layer h + b_layer` in float32 (`h` `[..., d]`, `layer` a traced int); `h`
  itself without translators (the logit lens)."""
  h = h.astype(jnp.float32)
  if translators is None:
    return h
  weight = jnp.take(translators.weight, layer, axis=0)
  bias = jnp.take(translators.bias, layer, axis=0)
  return h + jnp.einsum("...d,de->...e", h, weight, precision=jax.lax.Precision.HIGHEST) + bias


def fingerprint(model) -> str:
  """SHA256 of a model's config and every weight's bytes (as stored)."""
  digest = hashlib.sha256(model.config.to_json().encode())
  for leaf in jax.tree.leaves(model.params()):  # one leaf on the host at a time
    digest.update(np.ascontiguousarray(fetch(leaf)).tobytes())
  return digest.hexdigest()


class TunedLensError(ValueError):
  """A trained lens that does not belong to this model, or is not a lens at all."""


def save_translators(directory: str, translators: Translators) -> None:
  """Writes the translators into `directory/translators` (Orbax; replaced if there). The
  lens is complete once `lens.json` is written beside them."""
  import shutil
  import orbax.checkpoint as ocp
  path = os.path.join(os.path.abspath(directory), TRANSLATORS_DIR)
  if os.path.isdir(path):
    shutil.rmtree(path)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(path, {"weight": np.asarray(translators.weight),
                             "bias": np.asarray(translators.bias)})
    checkpointer.wait_until_finished()


def load(directory: str, model=None) -> tuple[Translators, dict[str, Any]]:
  """A trained lens, refused unless it was trained on `model` (when given)."""
  import orbax.checkpoint as ocp
  path = os.path.join(directory, LENS_FILE)
  if not os.path.isfile(path):
    raise TunedLensError(f"{directory} is not a trained lens (no {LENS_FILE}); train one with "
                         "dpjax-train-lens.")
  with open(path) as f:
    record = json.load(f)
  if model is not None and record.get("fingerprint") != fingerprint(model):
    raise TunedLensError(
        f"the lens at {directory} was trained on {record.get('model')!r} (weights "
        f"{str(record.get('fingerprint'))[:12]}...), not on this model (weights "
        f"{fingerprint(model)[:12]}...); train a lens for this model with dpjax-train-lens.")
  with ocp.StandardCheckpointer() as checkpointer:
    tree = checkpointer.restore(os.path.join(os.path.abspath(directory), TRANSLATORS_DIR))
  weight, bias = np.array(tree["weight"]), np.array(tree["bias"])
  # Row L is the final layer: a model's (or a pruned variant's) own output, read through
  # its head alone. Readouts send every variant's last layer there.
  weight[-1], bias[-1] = 0.0, 0.0
  return Translators(weight, bias), record


def lens_spec(spec: str) -> str | None:
  """`--lens`: `logit` (None) or `tuned:PATH` (the lens directory)."""
  if spec in ("", "logit"):
    return None
  kind, _, path = spec.partition(":")
  if kind != "tuned" or not path:
    raise ValueError(f"lens={spec!r}; use 'logit' or 'tuned:PATH' (a lens trained with "
                     "dpjax-train-lens).")
  return path
