"""The gin edge shared by every job: flags, search paths, parsing, the operative config.

Jobs are plain typed Python functions. A job module registers its function with
`gin.external_configurable` (which leaves the function itself untouched) and ends with

    if __name__ == "__main__":
      gin_utils.run(configured_job)

so it launches in t5x style:

    python -m parti.device_check --gin_file=gin/runs/device_check.gin --gin.MODEL_DIR=/tmp/x

`--gin.KEY=VALUE` is shorthand for `--gin_bindings=KEY=VALUE`. Unlike t5x, a value
that is not a gin literal (a bare path, say) is taken as a string, so
`--gin.MODEL_DIR=/tmp/x` needs no escaped quotes.
"""

from __future__ import annotations

import ast
import os
import pathlib
import re
import sys
from collections.abc import Callable, Sequence

import gin
from absl import app, flags, logging

from parti import partitioning
from parti.modeling.config import PartiConfig
from parti.runtime import files, multihost
from parti.runtime.errors import PREEMPTED_EXIT_CODE, ConfigError, Preempted
from parti.training import optim

_GIN_FILES = flags.DEFINE_multi_string(
  "gin_file",
  [],
  "Gin config files, read in order; relative paths are looked up in the "
  "current folder, then in the gin search paths.",
)
_GIN_BINDINGS = flags.DEFINE_multi_string(
  "gin_bindings", [], "Extra gin bindings, applied after the files. `--gin.K=V` is shorthand."
)
_GIN_SEARCH_PATHS = flags.DEFINE_multi_string(
  "gin_search_paths", [], "Extra folders in which to look up --gin_file and gin `include`s."
)

OPERATIVE_CONFIG = "config.gin"

# Dataclasses that every job's gin files may build (`@partitioning.MeshConfig()`).
# Registering returns a gin-aware copy and leaves the class itself plain Python.
gin.external_configurable(partitioning.MeshConfig, module="partitioning")
gin.external_configurable(optim.AdamConfig, module="optim")
gin.external_configurable(optim.AdafactorConfig, module="optim")
gin.external_configurable(PartiConfig, module="parti")


class GinConfigError(ConfigError):
  """A gin file or binding that cannot be used, with the reason in words."""


def _tolerate_namespace_packages() -> None:
  """Makes gin's package-resource lookup of `include`s safe beside namespace folders.

  For `include "runs/pretrain.gin"` gin tries, after the plain file, the package
  `runs` on sys.path; a folder `runs/` (or `data/`, `models/`) without an
  __init__.py in the working directory is a namespace package with no origin, and
  gin's check raises TypeError instead of moving on to the next search path. gin
  offers no hook to replace that check, so each registered one is wrapped to read
  such a failure as "not there".
  """
  import gin.config

  def safe(exists):
    if getattr(exists, "_parti_safe", False):
      return exists

    def check(path):
      try:
        return exists(path)
      except TypeError:
        return False

    check._parti_safe = True
    return check

  gin.config._FILE_READERS[:] = [(read, safe(exists)) for read, exists in gin.config._FILE_READERS]


def default_search_paths() -> list[str]:
  """Folders that hold the project's gin files, in the order they are searched.

  A checkout (or an editable install) keeps them in `gin/` beside `parti/`; an
  installed wheel ships them as package data in `parti/gin/`.
  """
  package = pathlib.Path(__file__).resolve().parents[1]  # parti/, above runtime/
  candidates = [package.parent / "gin", package / "gin"]
  return [str(path) for path in candidates if path.is_dir()]


def rewrite_gin_args(argv: Sequence[str]) -> list[str]:
  """Turns t5x-style `--gin.KEY=VALUE` arguments into `--gin_bindings=KEY=VALUE`."""
  rewritten = []
  for arg in argv:
    if arg.startswith("--gin.") and "=" in arg:
      key, value = arg[len("--gin.") :].split("=", 1)
      rewritten.append(f"--gin_bindings={key} = {_as_gin_value(value)}")
    else:
      rewritten.append(arg)
  return rewritten


def _as_gin_value(value: str) -> str:
  """`value` as gin source: literals, references and macros as given, the rest quoted."""
  stripped = value.strip()
  if stripped[:1] in ("@", "%"):
    return stripped
  try:
    ast.literal_eval(stripped)
  except (ValueError, SyntaxError):
    return repr(value)
  return stripped


def _resolve(path: str, search_paths: Sequence[str]) -> str:
  if os.path.exists(path):
    return path
  for folder in search_paths:
    candidate = os.path.join(folder, path)
    if os.path.exists(candidate):
      return candidate
    # `gin/runs/x.gin` written from the checkout root, found in an installed package.
    if path.startswith("gin/") and os.path.exists(os.path.join(folder, path[4:])):
      return os.path.join(folder, path[4:])
  raise GinConfigError(
    f"Gin file {path!r} not found in the current folder or in the search paths {list(search_paths)}."
  )


_INCLUDE = re.compile(r"""^\s*include\s+(['"])(.+?)\1""", re.MULTILINE)


def config_files(gin_file: str, search_paths: Sequence[str] = ()) -> list[pathlib.Path]:
  """`gin_file` and every file it includes, recursively, each once, in the order read.

  What a job's configuration is made of, for a stage's fingerprint: gin itself
  resolves includes only while parsing, which needs the job's configurables.
  """
  paths = [*search_paths, *default_search_paths()]
  found: list[pathlib.Path] = []

  def visit(path: str) -> None:
    resolved = pathlib.Path(_resolve(path, paths)).resolve()
    if resolved in found:
      return
    found.append(resolved)
    for match in _INCLUDE.finditer(resolved.read_text()):
      visit(match.group(2))

  visit(gin_file)
  return found


def parse(
  gin_files: Sequence[str],
  bindings: Sequence[str] = (),
  search_paths: Sequence[str] = (),
  finalize: bool = True,
) -> None:
  """Parses gin files then bindings, with the project's search paths.

  Raises:
    GinConfigError: a missing file, unknown configurable or parameter, or a syntax
      error, with the file or binding that caused it.
  """
  _tolerate_namespace_packages()
  paths = [*search_paths, *default_search_paths()]
  for folder in paths:
    gin.add_config_file_search_path(folder)
  resolved = [_resolve(path, paths) for path in gin_files]
  try:
    gin.parse_config_files_and_bindings(
      resolved, list(bindings), finalize_config=False, skip_unknown=False
    )
    if finalize:
      gin.finalize()
  except (OSError, ValueError, TypeError, SyntaxError) as error:
    raise GinConfigError(
      f"Bad gin configuration ({error.__class__.__name__}): {error}\n"
      f"  files: {resolved}\n  bindings: {list(bindings)}"
    ) from error


def write_operative_config(output_dir: str | os.PathLike[str] | None) -> None:
  """Writes the parameters the job actually used to `output_dir/config.gin`.

  Rerunning with `--gin_file=<output_dir>/config.gin` reproduces the job.
  """
  if output_dir is None:
    return
  text = gin.operative_config_str()
  files.atomic_write_text(pathlib.Path(output_dir) / OPERATIVE_CONFIG, text)
  logging.info("Wrote the operative gin config to %s", pathlib.Path(output_dir) / OPERATIVE_CONFIG)


def run(job: Callable[[], object]) -> None:
  """Parses flags and gin, then calls `job()`; the `__main__` of every job module.

  A bad configuration (a `ConfigError`, raised while parsing or by the job at
  start-up) exits with its message and status 2, without a traceback. A training job
  stopped by SIGTERM, its checkpoint saved, exits with status 75
  (`errors.PREEMPTED_EXIT_CODE`): rerun it to resume.
  """

  def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {list(argv[1:])}")
    try:
      multihost.initialize_from_flags()
      parse(_GIN_FILES.value, _GIN_BINDINGS.value, _GIN_SEARCH_PATHS.value)
      logging.info("Gin config:\n%s", gin.config_str())
      job()
    except ConfigError as error:
      print(f"error: {error}", file=sys.stderr)  # Once: not also through logging.
      sys.exit(2)
    except Preempted as error:
      print(f"preempted: {error}", file=sys.stderr)
      sys.exit(PREEMPTED_EXIT_CODE)

  app.run(main, argv=rewrite_gin_args(sys.argv))
