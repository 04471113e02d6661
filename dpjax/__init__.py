"""dpjax: decision readouts and layer pruning of LLMs, in JAX.

Public API: `load_model(path_or_id)` returns a `DecoderModel` with
`logits(input_ids, keep=None)` and `hidden_states(input_ids, keep=None)`;
`keep_mask(indices, num_layers)` and `KeepPlan` say which blocks run.
"""

import logging as _logging

# transformers says when imported without torch that "PyTorch was not found. Models won't be
# available": true of its PyTorch models, not of dpjax's (dpjax computes in JAX and never
# needs torch), so a default install's programs do not print it.
_logging.getLogger("transformers").addFilter(
    lambda record: "PyTorch was not found" not in str(record.msg))

from dpjax.model.config import ModelConfig
from dpjax.model.load import load_model
from dpjax.model.transformer import DecoderModel
from dpjax.model.plan import KeepPlan, keep_mask

__all__ = ["DecoderModel", "KeepPlan", "ModelConfig", "keep_mask", "load_model"]
