"""Settings declared once: a dataclass field that is also a command-line flag.

A settings dataclass declares each field with `setting(default, help, choices=...)`.
The dataclass is the only place a default lives, so a run started from Python and the
same run started from the command line (`dpjax.cli.flags` defines one absl flag per
field) are the same run. `command_line` writes the command that reruns a settings value.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence


def setting(default: Any = dataclasses.MISSING, help: str = "", *,
            choices: Sequence[str] | None = None, required: bool = False,
            flag: str | None = None) -> Any:
  """A dataclass field that is also a flag (`help` and `choices` become the flag's;
  `flag` names the flag when it differs from the field)."""
  metadata = {"help": help, "choices": tuple(choices) if choices else None,
              "required": required, "flag": flag}
  return dataclasses.field(default=default, metadata=metadata)


def _kind(field: dataclasses.Field) -> str:
  annotation = str(field.type).replace(" ", "")
  if annotation.startswith("tuple["):
    return "list"
  base = annotation.replace("|None", "").replace("None|", "")
  if base not in ("bool", "int", "float", "str"):
    raise TypeError(f"setting {field.name} has type {field.type}; flags support bool, int, "
                    "float, str (optionally | None) and tuple[str, ...].")
  return base


def flag_name(field: dataclasses.Field) -> str:
  return field.metadata.get("flag") or field.name


def command_line(program: str, settings, skip: Sequence[str] = ()) -> str:
  """The shell command that reruns `settings` with every setting spelled out."""
  import shlex
  parts = program.split()
  for field in dataclasses.fields(settings):
    if field.name in skip:
      continue
    value, name = getattr(settings, field.name), flag_name(field)
    if isinstance(value, bool):
      parts.append(f"--{name}" if value else f"--no{name}")
    elif isinstance(value, tuple):
      parts.append(f"--{name}={','.join(str(v) for v in value)}")
    elif value is not None:
      parts.append(f"--{name}={value}")
  return " ".join(shlex.quote(p) for p in parts)
