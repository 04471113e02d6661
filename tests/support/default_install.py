"""Run a program as a user with only the default install has it: the test extra's packages
(torch, pytest, accelerate) cannot be imported.

A `sitecustomize` module on the subprocess's PYTHONPATH marks those packages absent in
`sys.modules`: `import torch` raises `ModuleNotFoundError` as where torch was never
installed, and `importlib.util.find_spec("torch")` (how transformers asks) returns None.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from typing import Sequence

# What the test extra adds to the default install (setup.cfg), less gguf, which the default
# install carries.
EXTRA_ONLY = ("torch", "torchvision", "pytest", "xdist", "accelerate")

_SITECUSTOMIZE = textwrap.dedent("""\
    import sys

    for _name in {hidden!r}:
      sys.modules[_name] = None  # import raises ModuleNotFoundError, find_spec gives None
    """)


def environment(tmp_dir: str, hidden: Sequence[str] = EXTRA_ONLY,
                env: dict | None = None) -> dict:
  """An environment whose Python cannot import `hidden` (written under `tmp_dir`)."""
  site = os.path.join(tmp_dir, "default_install_site")
  os.makedirs(site, exist_ok=True)
  with open(os.path.join(site, "sitecustomize.py"), "w") as f:
    f.write(_SITECUSTOMIZE.format(hidden=tuple(hidden)))
  out = dict(os.environ if env is None else env)
  out["PYTHONPATH"] = os.pathsep.join([site] + [p for p in [out.get("PYTHONPATH")] if p])
  return out


def run(args: Sequence[str], tmp_dir: str, cwd: str | None = None, timeout: float = 900,
        hidden: Sequence[str] = EXTRA_ONLY, env: dict | None = None
        ) -> subprocess.CompletedProcess:
  """`python args...` (a `-m module` or a script) with `hidden` unimportable."""
  return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                        timeout=timeout, env=environment(tmp_dir, hidden, env))
