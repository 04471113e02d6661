"""FLOPs of the engine's unit of work, shared by the benchmarks and the cost model."""

from __future__ import annotations


def block_row_flops(cfg, tokens: int) -> float:
  """FLOPs of one block on one item row of `tokens` tokens (matmuls; attention over all
  `tokens` keys, as the masked implementation computes it)."""
  d, hd, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
  q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
  projections = 2 * tokens * (d * (q + 2 * kv) + q * d + 3 * d * f)
  attention = 2 * 2 * tokens * tokens * q
  return float(projections + attention)
