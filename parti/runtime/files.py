"""Atomic file writes: a killed job never leaves a half-written output behind.

Every writer puts the bytes in a temporary file beside the target, flushes and
fsyncs it, then renames it over the target. A rename within one folder is atomic
on POSIX file systems, so readers see the old file or the new one, never a part.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any

PathLike = str | os.PathLike[str]

# mkstemp creates files readable by their owner alone; outputs should get the
# permissions a plain open() would give. Read the umask once, at import, since
# reading it means setting it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_bytes(path: PathLike, data: bytes) -> pathlib.Path:
  """Writes `data` to `path` atomically, creating parent folders. Returns the path."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # The temporary name starts with "." and ends in ".tmp" so that globs for the
  # real outputs never match a file still being written.
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    os.chmod(tmp, 0o666 & ~_UMASK)
    with os.fdopen(fd, "wb") as handle:
      handle.write(data)
      handle.flush()
      os.fsync(handle.fileno())
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise
  return path


def atomic_write_text(path: PathLike, text: str) -> pathlib.Path:
  """Writes `text` (UTF-8) to `path` atomically."""
  return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: PathLike, value: Any) -> pathlib.Path:
  """Writes `value` as indented JSON to `path` atomically."""
  return atomic_write_text(path, json.dumps(value, indent=2, sort_keys=True) + "\n")
