"""The errors a user's input (a config, files, data, the processes of a launch) can cause.

Each is raised with a message that names what is wrong and what to do, and the CLI prints it as
one line (`USER_ERRORS`); anything else is a bug and keeps its traceback. They live here, apart
from the modules that raise them, so that a module can raise one without importing another's
machinery (say, `distributed` raising a `ConfigError` without importing the config reader).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot run: the message names the key and what to do."""


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged, or not one this program wrote."""


class DataError(RuntimeError):
    """A dataset split that cannot be loaded (missing, corrupt, misplaced files)."""


class RunError(RuntimeError):
    """A run directory that cannot be used as asked (exists, nothing to resume, other config)."""


class DivergedError(RuntimeError):
    """Training produced a non-finite loss; the last good checkpoint is kept."""


class DistributedError(RuntimeError):
    """A launch environment that cannot work, or processes that disagree on where they are."""


class ReportError(RuntimeError):
    """A run directory without the files a report needs."""


class TaskModelError(ValueError):
    """A task model that cannot be made or read, or images it cannot take."""


USER_ERRORS = (
    ConfigError,
    CheckpointError,
    RunError,
    DataError,
    DivergedError,
    DistributedError,
    ReportError,
    TaskModelError,
)
"""What a user's input (config, files, data) can cause; the CLI reports them in one line."""
