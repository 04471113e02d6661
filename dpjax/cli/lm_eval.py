"""The `dpjax-lm-eval` program: lm-evaluation-harness's own command line with the `dpjax`
model registered (`dpjax-lm-eval run --model dpjax --model_args 'keep=0-3;5' --tasks ...`).

lm-eval is an optional extra: without it the program says so in one line, before any work.
"""

from __future__ import annotations

import importlib.util
import sys

INSTALL = "pip install -e '.[lm_eval]' (or pip install 'lm_eval>=0.4.8')"


def run() -> None:
  if importlib.util.find_spec("lm_eval") is None:
    print(f"dpjax-lm-eval: error: needs lm-evaluation-harness: {INSTALL}.", file=sys.stderr)
    sys.exit(1)
  from dpjax.variants.lm_eval import main
  main()


if __name__ == "__main__":
  run()
