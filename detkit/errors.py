"""User-facing errors.

Everything a user can cause (a bad config, a missing file, an unknown plugin)
is raised as a :class:`DetkitError`; the CLI prints its message on one line and
exits with ``exit_code`` instead of showing a traceback.
"""

from __future__ import annotations


class DetkitError(Exception):
    """An error caused by the user's input, reported without a traceback."""

    exit_code = 1


class ConfigError(DetkitError):
    """A config file or override is missing, unreadable or invalid."""

    exit_code = 2


class RegistryError(DetkitError):
    """An unknown, duplicate or misdeclared component."""

    exit_code = 2


class PluginLoadError(DetkitError):
    """A plugin's code raised while it was imported."""

    exit_code = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, ``docker stop``) ended the run; handled like Ctrl-C, exit code 128 + 15."""

    exit_code = 143


class RunDirectoryError(DetkitError):
    """The run directory already holds a run that this command would overwrite."""

    exit_code = 2


class DataError(DetkitError):
    """A data set, annotation or image file is missing or malformed."""

    exit_code = 1


class CheckpointError(DetkitError):
    """A checkpoint is missing, unreadable (truncated, corrupt) or does not fit the model: an input error."""

    exit_code = 2


class OutputError(DetkitError):
    """An output path (``--out``) that cannot be written: a directory where a file goes, a file where a
    directory goes, a path under a regular file, or no permission.  A usage error: exit 2."""

    exit_code = 2
