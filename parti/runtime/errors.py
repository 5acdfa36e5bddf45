"""The project's user-facing error types.

A `ConfigError` is a mistake in what the user asked for (a gin binding, a mesh
that does not fit the devices, a batch that does not split), as opposed to a bug.
Jobs launched through `gin_utils.run` report it as one line and exit with
status 2, without a traceback.
"""


class ConfigError(ValueError):
  """A configuration that cannot work, with the reason and the fix in words."""
