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
USER_ERRORS = (ValueError, FileExistsError, FileNotFoundError, TaskDataError,
               PermissionError, NotADirectoryError, IsADirectoryError)


def quiet_logs() -> None:
  """Library INFO logs off unless `--verbosity` was given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


HELP_FLAGS = ("-h", "-help", "--help", "--helpshort", "-?")


def _summary(text: str) -> str:
  """A help text's first sentence."""
  text = " ".join(text.split())
  end = text.find(". ")
  return text if end < 0 else text[:end + 1]


def program_help(name: str, settings: Sequence[type], doc: str | None,
                 full: bool = False) -> str:
  """The program's own flags, one line each (`full`: each flag's whole help), after the
  first paragraph of its module docstring; no other library's flags."""
  import dataclasses
  from dpjax.fields import flag_name
  lines = [f"usage: {name} [--flag=value ...]"]
  if doc:
    lines += ["", doc.strip().split("\n\n")[0].strip()]
  lines += ["", "flags:"]
  for cls in settings:
    for field in dataclasses.fields(cls):
      flag = flags.FLAGS[flag_name(field)]
      default = flag.default_as_str or "''"
      from dpjax.bundled import BUNDLED_MODEL
      if flag.value == BUNDLED_MODEL or flag.default == BUNDLED_MODEL:
        default = "(the bundled model)"
      text = " ".join(flag.help.split()) if full else _summary(flag.help)
      lines.append(f"  --{flag.name}={default.strip(chr(39)) or chr(39) * 2}: {text}")
  if full:
    lines += ["", "  --verbosity=-1: library logging (0 INFO, -1 WARNING); INFO logs are off "
              "unless given."]
  else:
    lines += ["", f"{name} --helpfull gives each flag's whole help."]
  return "\n".join(lines)


def _rename_old_flags(name: str, aliases: dict[str, str]) -> None:
  """Old flag names in `sys.argv` replaced by their new ones, each with a note."""
  for i, arg in enumerate(sys.argv[1:], start=1):
    for old, new in aliases.items():
      for prefix in (f"--{old}=", f"-{old}="):
        if arg.startswith(prefix):
          sys.argv[i] = f"--{new}=" + arg[len(prefix):]
          print(f"{name}: --{old} is the old name of --{new}; use --{new}.", file=sys.stderr)


def run_program(name: str, settings: Sequence[type], body: Callable[..., Any],
                errors: tuple = USER_ERRORS, hard_exit: bool = False,
                aliases: dict[str, str] | None = None) -> None:
  """Runs the program `name`: `body(*parsed)` with one parsed value per class of `settings`.
  `aliases` maps old flag names to their new ones (accepted with a note).

  `hard_exit` leaves without the interpreter's teardown (JAX's CPU client, destroyed
  there, can wait forever on one of its own threads after an early refusal); everything
  a program writes is written atomically before it returns.
  """
  for cls in settings:
    flagdefs.define_flags(cls)
  _rename_old_flags(name, aliases or {})
  asked = set(sys.argv[1:])
  if asked & set(HELP_FLAGS) or "--helpfull" in asked:
    doc = getattr(sys.modules.get(body.__module__), "__doc__", None)
    print(program_help(name, settings, doc, full="--helpfull" in asked))
    sys.stdout.flush()
    os._exit(0) if hard_exit else sys.exit(0)

  def main(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}; everything is a flag.")
    quiet_logs()
    try:
      body(*(flagdefs.from_flags(cls) for cls in settings))
    except errors as e:
      raise SystemExit(f"{name}: error: {e}") from e
    except KeyboardInterrupt:
      raise SystemExit(f"{name}: interrupted; what finished is saved: rerun the same "
                       "command to resume.") from None

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
