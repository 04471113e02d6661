"""What the benchmark programs share: how they run, the machine they ran on, the FLOPs of a
block row."""

from __future__ import annotations

import os
import platform
import threading
import time
from typing import Any, Callable


def run_program(main: Callable[[list[str]], Any], flag_values) -> None:
  """`app.run(main)` for a benchmark program whose flags live on `flag_values`, its own
  `absl.flags.FlagValues`.

  The programs are modules the tests and the harness import side by side, and several
  share flag names (`--out`, `--items`, `--work_dir`) with different defaults: defined on
  the global FLAGS at import, the second import would raise DuplicateFlagError. So each
  defines its flags on its own FlagValues, and only the program being run hands them to
  the global FLAGS (where absl parses the command line and `--help` lists them).
  """
  import sys
  from absl import app
  from absl import flags
  for module_flags in flag_values.flags_by_module_dict().values():
    for flag in module_flags:  # `--help` lists the main module's flags
      flags.FLAGS.register_flag_by_module(sys.argv[0], flag)
  flags.FLAGS.append_flag_values(flag_values)

  def parsed_main(argv):
    flag_values.mark_as_parsed()  # the Flag objects are shared: parsed by the global FLAGS
    return main(argv)

  app.run(parsed_main)


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


class PeakMemory:
  """Peak memory over a `with` block, above its start: the device's own count on an
  accelerator, the process's anonymous resident memory (sampled every 2 ms) on the CPU."""

  def __init__(self):
    import jax
    self.device = jax.devices()[0]
    self.stats = self.device.platform != "cpu" and bool(self.device.memory_stats())

  @staticmethod
  def _rss() -> int:
    with open("/proc/self/status") as f:
      return 1024 * int(next(line for line in f if line.startswith("RssAnon")).split()[1])

  def __enter__(self):
    if self.stats:
      self.start = self.device.memory_stats().get("bytes_in_use", 0)
      return self
    self.start = self.peak = self._rss()
    self._stop = threading.Event()

    def sample():
      while not self._stop.is_set():
        self.peak = max(self.peak, self._rss())
        time.sleep(0.002)

    self._thread = threading.Thread(target=sample, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    if self.stats:
      self.peak = self.device.memory_stats().get("peak_bytes_in_use", 0)
    else:
      self._stop.set()
      self._thread.join()
      self.peak = max(self.peak, self._rss())

  @property
  def added_mb(self) -> float:
    return max(self.peak - self.start, 0) / 2**20
