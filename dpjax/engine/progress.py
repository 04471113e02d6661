"""Progress bars with an ETA for long loops (tqdm), quiet when disabled."""

from __future__ import annotations

import time


class Progress:
  """A progress bar with an ETA (tqdm), quiet when disabled."""

  def __init__(self, total: int, description: str, enabled: bool = True, unit: str = "batch"):
    self._bar = None
    self.start = time.perf_counter()
    if enabled:
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True)

  def update(self, n: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(n)

  def set_postfix(self, **values) -> None:
    if self._bar is not None:
      self._bar.set_postfix(**values, refresh=False)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
