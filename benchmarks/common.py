"""What the benchmark programs share: the machine they ran on, the FLOPs of a block row."""

from __future__ import annotations

import os
import platform
from typing import Any


def machine() -> dict[str, Any]:
  import jax
  import torch
  return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "jax_backend": jax.default_backend(),
          "jax_devices": [f"{d.platform}:{d.device_kind}" for d in jax.devices()],
          "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def block_row_flops(cfg, tokens: int) -> float:
  """FLOPs of one block on one item row of `tokens` tokens (matmuls; attention over all
  `tokens` keys, as the masked implementation computes it)."""
  d, hd, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
  q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
  projections = 2 * tokens * (d * (q + 2 * kv) + q * d + 3 * d * f)
  attention = 2 * 2 * tokens * tokens * q
  return float(projections + attention)
