"""The project's user-facing error types.

A `ConfigError` is a mistake in what the user asked for (a gin binding, a mesh
that does not fit the devices, a batch that does not split), as opposed to a bug.
Jobs launched through `gin_utils.run` report it as one line and exit with
status 2, without a traceback.
"""


class ConfigError(ValueError):
  """A configuration that cannot work, with the reason and the fix in words."""


# The exit status of a job stopped by SIGTERM after saving a checkpoint: EX_TEMPFAIL of
# sysexits.h, "try again later", so that a scheduler tells it from a finished job (0).
PREEMPTED_EXIT_CODE = 75


class Preempted(Exception):
  """Raised by the training loop once a SIGTERM's checkpoint is saved: rerun the job."""

  def __init__(self, step: int, directory):
    super().__init__(f"Stopped at step {step} after SIGTERM; checkpoint saved in {directory}. "
                     "Rerun the same command to resume.")  # fmt: skip
    self.step = step
