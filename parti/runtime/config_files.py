"""A run's config file: how the frozen architecture dataclasses save and load themselves.

Every training job writes its architecture beside its checkpoints (parti_config.json,
tokenizer_config.json, ...), and every reader rebuilds the dataclass from it, checking
the file rather than trusting it: fields this version does not know, and files that are
not JSON objects, are refused by name.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Self

from parti.runtime import files
from parti.runtime.errors import ConfigError


class JsonConfig:
  """Mixin for frozen config dataclasses: `save` to a JSON file, `load` it back."""

  def save(self, path: str | pathlib.Path) -> None:
    files.atomic_write_json(path, dataclasses.asdict(self))

  @classmethod
  def load(cls, path: str | pathlib.Path) -> Self:
    path = pathlib.Path(path)
    try:
      raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
      raise ConfigError(
        f"{path} is not valid JSON ({error}); the run's config is damaged."
      ) from error
    if not isinstance(raw, dict):
      raise ConfigError(f"{path} holds {type(raw).__name__}, not a config's fields.")
    unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ConfigError(f"{path} has fields this version does not know: {sorted(unknown)}.")
    return cls(**raw)
