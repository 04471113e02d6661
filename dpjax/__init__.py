"""dpjax: decision readouts and layer pruning of LLMs, in JAX.

Public API: `load_model(path_or_id)` returns a `DecoderModel` with
`logits(input_ids, keep=None)` and `hidden_states(input_ids, keep=None)`;
`keep_mask(indices, num_layers)` and `KeepPlan` say which blocks run.
"""

from dpjax.model.config import ModelConfig
from dpjax.model.load import load_model
from dpjax.model.transformer import DecoderModel
from dpjax.model.plan import KeepPlan, keep_mask

__all__ = ["DecoderModel", "KeepPlan", "ModelConfig", "keep_mask", "load_model"]
