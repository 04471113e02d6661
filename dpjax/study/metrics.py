"""The paper's metrics, exactly as the README's "Definitions" section states them.

Pure, jit-able functions of the readout arrays. Shapes: leading axes `...`
(masks, steps) are carried through; `L1 = layers + 1` (h_0 and every block),
`N` items, `K` options. A removed block's layer is NaN in the readouts and
stays NaN (missing) in every per-layer metric; an item's options past its own
count are -inf logits and never win or count.

* `option_probabilities`: `p_l(k)` under `vocab` (full-vocabulary softmax,
  not renormalized) or `options` (softmax over the item's options).
* `decision_margin`: `DM_l = p_l(y) - max_{k != y} p_l(k)`, per item.
* `top_option`, `option_frequency`, `layer_accuracy`.
* `transition_block` (margin rule), `accuracy_transition_block` (accuracy
  rule), `phases`, `sharpness`, and `summary` (mean, median, 10/90% quantiles).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NORMALIZATIONS = ("vocab", "options")
NO_TRANSITION = -1


def option_probabilities(option_logits, log_normalizer, normalization: str = "vocab",
                         option_logprob=None):
  """`p_l(k)` `[..., L1, N, K]`; 0 past an item's options, NaN at removed layers.

  `vocab`: `exp(z_k - log_normalizer)`, or `exp(option_logprob_k)` when the
  options' log-probabilities are given (the cloze format: a multi-token
  option's probability, not renormalized). `options`: `softmax_k(z)`.
  """
  if normalization == "vocab":
    p = jnp.exp(option_logits - log_normalizer[..., None] if option_logprob is None
                else option_logprob)
  elif normalization == "options":
    p = jax.nn.softmax(option_logits, axis=-1)
  else:
    raise ValueError(f"normalization={normalization!r}; use one of {NORMALIZATIONS}.")
  return jnp.where(jnp.isneginf(option_logits), 0.0, p)


def decision_margin(p, answer):
  """`[..., L1, N]`: `p(y) - max_{k != y} p(k)` over the item's own options.

  Args:
    p: `[..., L1, N, K]` option probabilities (0 past an item's options).
    answer: `[N]` correct option indices.
  """
  k = p.shape[-1]
  is_answer = jnp.arange(k) == answer[:, None]  # [N, K]
  correct = jnp.sum(jnp.where(is_answer, p, 0.0), axis=-1)
  # Probabilities are >= 0, so the padding's 0 never beats a real rival.
  rival = jnp.max(jnp.where(is_answer, -jnp.inf, p), axis=-1)
  return correct - rival


def top_option(option_logits):
  """`[..., L1, N]` int: `argmax_k z[c_k]` (ties to the lower index); -1 where missing."""
  top = jnp.argmax(option_logits, axis=-1)
  missing = jnp.isnan(option_logits).any(axis=-1)
  return jnp.where(missing, -1, top)


def option_frequency(top, num_options: int):
  """`[..., L1, K]`: the fraction of items whose top option is `k`; NaN where missing."""
  counts = (top[..., None] == jnp.arange(num_options)).mean(axis=-2)
  missing = (top < 0).any(axis=-1)
  return jnp.where(missing[..., None], jnp.nan, counts)


def layer_accuracy(top, answer):
  """`[..., L1]`: fraction of items whose top option is the correct one; NaN where missing."""
  accuracy = (top == answer).mean(axis=-1)
  return jnp.where((top < 0).any(axis=-1), jnp.nan, accuracy)


def chance_accuracy(num_options):
  """Expected accuracy of a uniform guess: the mean of `1/K_i` over items."""
  return jnp.mean(1.0 / num_options)


def transition_from(condition, present):
  """Smallest present block `l >= 1` with `condition` at `l` and every later present block.

  Args:
    condition: `[..., L1]` bool (its value at missing layers is ignored).
    present: `[..., L1]` bool, False at removed blocks.
  Returns `[...]` int, `NO_TRANSITION` (-1) when the last present block fails.
  """
  holds = condition | ~present
  # holds_from[l]: holds at l and at every later layer (reverse cumulative AND).
  holds_from = jnp.flip(jnp.cumprod(jnp.flip(holds, -1), axis=-1), -1).astype(bool)
  layers = jnp.arange(condition.shape[-1])
  candidate = holds_from & present & (layers >= 1)
  first = jnp.argmax(candidate, axis=-1)
  return jnp.where(candidate.any(axis=-1), first, NO_TRANSITION)


def answered_profile(top, margin, chosen, tau: float = 0.0) -> dict:
  """The open format's transition, read on the items the model answers.

  With open answers most items are never answered, so the mean DM over all of them
  stays negative at every layer and the margin rule finds no `l*`. Read instead on
  `chosen` `[N]` (items the unpruned model answers, top token a gold first token at
  its last layer): their mean DM by layer, `l*` by the margin rule on that mean, and
  each item's own decision layer (the first layer from which its top token stays a
  gold one).

  Args: `top` `[L1, N]` (0 where the top token is a gold one), `margin` `[L1, N]`.
  """
  top, margin, chosen = np.asarray(top), np.asarray(margin), np.asarray(chosen, bool)
  if not chosen.any():
    return {"items": 0, "mean_margin": None, "transition_block": None,
            "decision_layers": [], "median_decision_layer": None}

  mean = margin[:, chosen].mean(axis=1)
  l_star = int(first_of_last_run(mean > tau))
  layers = first_of_last_run(top[:, chosen].T == 0)
  return {"items": int(chosen.sum()), "mean_margin": mean.tolist(),
          "transition_block": None if l_star == NO_TRANSITION else l_star,
          "decision_layers": layers.tolist(),
          "median_decision_layer": float(np.median(layers))}


def first_of_last_run(holds: np.ndarray) -> np.ndarray:
  """numpy's `transition_from` with every layer present (nothing compiled per shape): the
  smallest `l >= 1` from which `holds` `[..., L1]` holds at every later layer."""
  holds_from = np.flip(np.cumprod(np.flip(holds, -1), axis=-1), -1).astype(bool)
  holds_from[..., 0] = False
  return np.where(holds_from.any(-1), holds_from.argmax(-1), NO_TRANSITION)


def transition_block(mean_margin, tau: float = 0.0):
  """`l*` by the margin rule: mean DM above `tau` at `l*` and every later block."""
  present = ~jnp.isnan(mean_margin)
  return transition_from(mean_margin > tau, present)


def accuracy_transition_block(accuracy, chance, delta: float = 0.1):
  """`l*` by the accuracy rule: accuracy above `chance + delta` from `l*` on."""
  present = ~jnp.isnan(accuracy)
  return transition_from(accuracy > chance + delta, present)


def phases(l_star, num_layers: int):
  """Silent `[..., L]` (blocks 1..l*-1) and Decisive (l*..L) membership, by block 1..L.

  Without a transition every block is Silent and none Decisive.
  """
  blocks = jnp.arange(1, num_layers + 1)
  l_star = jnp.asarray(l_star)[..., None]
  none = l_star == NO_TRANSITION
  decisive = (blocks >= l_star) & ~none
  return ~decisive, decisive


class Sharpness(NamedTuple):
  rise: jax.Array   # [...] largest one-block rise of the mean DM
  block: jax.Array  # [...] the block where it happens (its input is the layer before)


def sharpness(mean_margin):
  """Largest rise `mean_DM[l] - mean_DM[previous present layer]` over blocks `l >= 1`.

  A removed block is skipped: the rise is measured from the last present layer
  before it, which is what the pruned model's residual stream does.
  """
  present = ~jnp.isnan(mean_margin)
  layers = jnp.arange(mean_margin.shape[-1])
  # previous present layer of each layer (h_0 is always present).
  last_seen = jax.lax.cummax(jnp.where(present, layers, 0), axis=mean_margin.ndim - 1)
  previous = jnp.concatenate([jnp.zeros_like(last_seen[..., :1]), last_seen[..., :-1]], axis=-1)
  prev_value = jnp.take_along_axis(mean_margin, previous, axis=-1)
  rise = jnp.where(present & (layers >= 1), mean_margin - prev_value, -jnp.inf)
  block = jnp.argmax(rise, axis=-1)
  return Sharpness(jnp.max(rise, axis=-1), block)


class Summary(NamedTuple):
  mean: jax.Array
  median: jax.Array
  q10: jax.Array
  q90: jax.Array


def summary(values):
  """Mean, median and 10/90% quantiles over the last (items) axis; NaN stays NaN."""
  return Summary(jnp.mean(values, axis=-1), jnp.median(values, axis=-1),
                 jnp.quantile(values, 0.1, axis=-1), jnp.quantile(values, 0.9, axis=-1))


class Profile(NamedTuple):
  """Everything per layer for one model (or a batch of masks) on one item set."""
  margin: dict          # normalization -> [..., L1, N] Decision Margin per item
  margin_summary: dict  # normalization -> Summary of [..., L1]
  top: jax.Array        # [..., L1, N]
  option_frequency: jax.Array  # [..., L1, K]
  accuracy: jax.Array   # [..., L1]
  chance: jax.Array     # []
  transition: jax.Array           # [...] margin rule, on `normalization`
  accuracy_transition: jax.Array  # [...]
  sharpness: Sharpness


def profile(option_logits, log_normalizer, answer, num_options, *, normalization: str = "vocab",
            tau: float = 0.0, delta: float = 0.1, option_logprob=None,
            chance=None) -> Profile:
  """All metrics of readouts `[..., L1, N, K]` for items with `answer`, `num_options` `[N]`.

  `chance` overrides the uniform guess's accuracy (the open format's is its best
  constant guess, `EncodedTask.chance`: its two "options" are the gold set and
  everything else).
  """
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"normalization={normalization!r}; use one of {NORMALIZATIONS}.")
  margins = {norm: decision_margin(option_probabilities(option_logits, log_normalizer, norm,
                                                        option_logprob), answer)
             for norm in NORMALIZATIONS}
  summaries = {norm: summary(margin) for norm, margin in margins.items()}
  top = top_option(option_logits)
  accuracy = layer_accuracy(top, answer)
  chance = chance_accuracy(num_options) if chance is None else jnp.asarray(chance, jnp.float32)
  return Profile(
      margin=margins, margin_summary=summaries, top=top,
      option_frequency=option_frequency(top, option_logits.shape[-1]),
      accuracy=accuracy, chance=chance,
      transition=transition_block(summaries[normalization].mean, tau),
      accuracy_transition=accuracy_transition_block(accuracy, chance, delta),
      sharpness=sharpness(summaries[normalization].mean))



# `profile` as one compiled program per input shape, for readouts on the host: run
# eagerly, its few dozen operations would each be compiled on their own (about 480
# small compilations in a default study of the bundled model).
profile_jit = jax.jit(profile, static_argnames=("normalization", "tau", "delta"))

# A transition counts as sharp when its largest one-block rise of the mean DM is
# at least this share of the whole rise from the lowest layer to the final one.
SHARP_SHARE = 0.5


class TransitionShape(NamedTuple):
  total_rise: float  # mean DM at the final layer minus its lowest value over layers
  share: float       # the largest one-block rise as a share of `total_rise` (NaN if none)
  sharp: bool        # share >= SHARP_SHARE


def transition_shape(mean_margin, largest_rise: float) -> TransitionShape:
  """Is the transition sharp or gradual? From the mean DM per layer `[L1]` (NaN at
  removed layers) and its largest one-block rise (`sharpness(...).rise`)."""
  import numpy as np
  mean = np.asarray(mean_margin, float)
  total = float(mean[-1] - np.nanmin(mean))
  share = largest_rise / total if total > 0 else float("nan")
  return TransitionShape(total, share, bool(share >= SHARP_SHARE))
