"""absl flags generated from a settings dataclass: every setting defined once.

A settings dataclass declares each field with `setting(default, help, choices=...)`;
`define_flags(cls)` defines one flag per field with the same name, default,
help and choices, and `from_flags(cls)` builds the dataclass from the parsed
flags. The dataclass is the only place a default lives, so a run started from
Python and the same run started from the command line are the same run.

Field types map to flags: `bool` -> DEFINE_bool, `int` -> DEFINE_integer,
`float` -> DEFINE_float, `str` (or `str | None`) -> DEFINE_string, or
DEFINE_enum with `choices`, and `tuple[str, ...]` -> DEFINE_list (its
`choices` check every element).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from absl import flags


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


def define_flags(cls, flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines one absl flag per field of the settings dataclass `cls`."""
  for field in dataclasses.fields(cls):
    meta = field.metadata
    name = flag_name(field)
    default = None if field.default is dataclasses.MISSING else field.default
    help_text = meta.get("help") or field.name
    choices = meta.get("choices")
    kind = _kind(field)
    if kind == "list":
      default = None if default is None else list(default)
      if choices:
        help_text += f" Choices: {', '.join(choices)}."
      flags.DEFINE_list(name, default, help_text, flag_values=flag_values)
    elif kind == "bool":
      flags.DEFINE_bool(name, default, help_text, flag_values=flag_values)
    elif kind == "int":
      flags.DEFINE_integer(name, default, help_text, flag_values=flag_values)
    elif kind == "float":
      flags.DEFINE_float(name, default, help_text, flag_values=flag_values)
    elif choices:
      flags.DEFINE_enum(name, default, list(choices), help_text, flag_values=flag_values)
    else:
      flags.DEFINE_string(name, default, help_text, flag_values=flag_values)
    if meta.get("required"):
      flags.mark_flag_as_required(name, flag_values=flag_values)


def from_flags(cls, flag_values: flags.FlagValues = flags.FLAGS, **overrides: Any):
  """The settings dataclass `cls` from parsed flags (lists become tuples)."""
  values = {}
  for field in dataclasses.fields(cls):
    value = flag_values[flag_name(field)].value
    if _kind(field) == "list" and value is not None:
      value = tuple(value)
    values[field.name] = value
  values.update(overrides)
  return cls(**values)


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
