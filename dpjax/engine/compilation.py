"""Counting XLA compilations through `jax.monitoring`, JAX's public event hooks.

`CompileCounter()` starts counting when made; its properties read what the
process compiled since:

* `programs`: executables JAX had to produce (each new jitted shape or
  function, whether XLA compiled it or the persistent cache supplied it);
* `cache_hits`: those the persistent compilation cache supplied;
* `compiled`: `programs - cache_hits`, those XLA actually compiled;
* `seconds`: the time spent producing them.

Counts are process-wide (every thread, every jitted function), which is what a
user waits for. `enable_persistent_cache` turns on JAX's on-disk cache, which
the programs use by default (`--compilation_cache_dir`).
"""

from __future__ import annotations

import os
import threading

from jax import monitoring

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT = "/jax/compilation_cache/cache_hits"

_lock = threading.Lock()
_totals = {"programs": 0, "cache_hits": 0, "seconds": 0.0}
_installed = False


def _on_event(name: str, **_) -> None:
  if name == _CACHE_HIT:
    with _lock:
      _totals["cache_hits"] += 1


def _on_duration(name: str, seconds: float, **_) -> None:
  if name == _BACKEND_COMPILE:
    with _lock:
      _totals["programs"] += 1
      _totals["seconds"] += seconds


def _install() -> None:
  global _installed
  with _lock:
    if _installed:
      return
    _installed = True
  monitoring.register_event_listener(_on_event)
  monitoring.register_event_duration_secs_listener(_on_duration)


class CompileCounter:
  """Compilations in this process since the counter was made (see the module docstring)."""

  def __init__(self):
    _install()
    with _lock:
      self._start = dict(_totals)

  def _since(self, key: str):
    with _lock:
      return _totals[key] - self._start[key]

  @property
  def programs(self) -> int:
    return self._since("programs")

  @property
  def cache_hits(self) -> int:
    return self._since("cache_hits")

  @property
  def compiled(self) -> int:
    return self.programs - self.cache_hits

  @property
  def seconds(self) -> float:
    return self._since("seconds")


def default_cache_dir() -> str:
  from dpjax.fileio import cache_root
  return cache_root("xla")


def enable_persistent_cache(directory: str) -> str | None:
  """JAX's persistent compilation cache in `directory` (every program, however quick to
  compile), so a second identical run compiles nothing. An empty `directory` leaves it
  off; a cache the environment already set (`JAX_COMPILATION_CACHE_DIR`) wins.
  Returns the directory in use."""
  import jax
  current = jax.config.jax_compilation_cache_dir
  if current or not directory:
    return current or None
  os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return directory
