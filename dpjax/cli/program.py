"""The one wrapper every dpjax program runs through.

A program is a name, the settings dataclasses its flags come from, and a body that
takes the parsed settings. The wrapper defines the flags (`dpjax.cli.flags`), refuses
positional arguments, keeps library INFO logs (Orbax logs every save) out of the
output unless `--verbosity` asks for them, and turns the errors a user can cause into
`NAME: error: ...` and exit status 1.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
from absl import logging

from dpjax.cli import flags as flagdefs
from dpjax.tasks.schema import TaskDataError

# The errors a user's input can cause: reported in one line, without a traceback.
USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError, TaskDataError)


def quiet_logs() -> None:
  """Library INFO logs off unless `--verbosity` was given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def run_program(name: str, settings: Sequence[type], body: Callable[..., Any],
                errors: tuple = USER_ERRORS, hard_exit: bool = False) -> None:
  """Runs the program `name`: `body(*parsed)` with one parsed value per class of `settings`.

  `hard_exit` leaves without the interpreter's teardown (JAX's CPU client, destroyed
  there, can wait forever on one of its own threads after an early refusal); everything
  a program writes is written atomically before it returns.
  """
  for cls in settings:
    flagdefs.define_flags(cls)

  def main(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}; everything is a flag.")
    quiet_logs()
    try:
      body(*(flagdefs.from_flags(cls) for cls in settings))
    except errors as e:
      raise SystemExit(f"{name}: error: {e}") from e

  if not hard_exit:
    app.run(main)
    return
  import traceback
  try:
    app.run(main)
    code = 0
  except SystemExit as exit_:
    code = exit_.code
    if isinstance(code, str):
      print(code, file=sys.stderr)
      code = 1
    code = 0 if code is None else int(code)
  except BaseException:  # pylint: disable=broad-except
    traceback.print_exc()
    code = 1
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)
