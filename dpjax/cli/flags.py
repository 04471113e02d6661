"""absl flags generated from a settings dataclass (`dpjax.fields`): every setting defined once.

`define_flags(cls)` defines one flag per field with the same name, default, help and
choices, and `from_flags(cls)` builds the dataclass from the parsed flags.

Field types map to flags: `bool` -> DEFINE_bool, `int` -> DEFINE_integer,
`float` -> DEFINE_float, `str` (or `str | None`) -> DEFINE_string, or
DEFINE_enum with `choices`, and `tuple[str, ...]` -> DEFINE_list (its
`choices` check every element).
"""

from __future__ import annotations

from typing import Any
import dataclasses

from absl import flags

from dpjax.fields import _kind, flag_name


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
