"""Type checks of config dataclasses, for values that come from gin or JSON.

`--gin.optim.AdafactorConfig.learning_rate=fast` reaches a dataclass as the string
"fast": Python does not check annotations, so without this the job would fail deep
inside a jitted step, or after writing its first files. `check_types` turns such a
value into one `ConfigError` naming the field, at construction, before any work.
Written here because the dataclasses are plain (frozen) dataclasses, not a validation
library's models, and the checks need only the few types our configs use.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing

from parti.runtime.errors import ConfigError


def check_types(config) -> None:
  """Raises ConfigError for the first field of dataclass `config` whose value does not
  have its annotated type (int, float, bool, str, tuples and lists of them, unions with
  None); fields of other types are not checked."""
  hints = _hints(type(config))
  for field in dataclasses.fields(config):
    value = getattr(config, field.name)
    expected = hints.get(field.name)
    if expected is not None and not _matches(value, expected):
      raise ConfigError(
        f"{type(config).__name__}.{field.name} = {value!r} should be {_describe(expected)}."
      )


@functools.cache
def _hints(cls) -> dict:
  return typing.get_type_hints(cls)


def _matches(value, expected) -> bool:
  origin, args = typing.get_origin(expected), typing.get_args(expected)
  if origin in (typing.Union, types.UnionType):
    return any(_matches(value, arg) for arg in args)
  if expected is type(None):
    return value is None
  if expected is bool:
    return isinstance(value, bool)
  if expected is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if expected is float:
    return isinstance(value, int | float) and not isinstance(value, bool)
  if expected is str:
    return isinstance(value, str)
  if origin in (tuple, list):
    if not isinstance(value, tuple | list):
      return False
    items = [a for a in args if a is not Ellipsis]
    return not items or all(_matches(v, items[0]) for v in value)
  return True  # A type these configs do not need checked.


def _describe(expected) -> str:
  origin, args = typing.get_origin(expected), typing.get_args(expected)
  if origin in (typing.Union, types.UnionType):
    return " or ".join(_describe(a) for a in args)
  if expected is type(None):
    return "None"
  names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
  if expected in names:
    return names[expected]
  if origin in (tuple, list):
    item = next((a for a in args if a is not Ellipsis), None)
    return "a sequence" + (f" ({_describe(item)} each)" if item is not None else "")
  return str(expected)
