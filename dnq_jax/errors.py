"""Every error a run can end with on purpose, and the exit status the CLIs give it.

Expected failures carry a one-paragraph message for the user; anything else is a bug and
keeps its traceback. This module imports nothing, so the CLIs can map errors to exit codes
without loading JAX.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is out of range, unknown, or contradicts another."""


class DataError(ValueError):
    """A data file is missing, truncated, has the wrong checksum or the wrong layout."""


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, or does not fit the model/config."""


class Diverged(RuntimeError):
    """A non-finite loss or gradient; the last good checkpoint is kept."""


class Preempted(Exception):
    """The run was asked to stop (SIGTERM/SIGINT) and saved a checkpoint to resume from."""


# Exit status of the CLIs. 0 also covers a preempted run: its checkpoint is saved.
EXIT_OK = 0
EXIT_CODES: dict[type[BaseException], int] = {
    ConfigError: 2,  # also bad flags
    DataError: 3,
    CheckpointError: 4,  # bad checkpoint or workdir contents
    PermissionError: 5,  # workdir not writable
    Diverged: 6,
}
USAGE_EXIT = EXIT_CODES[ConfigError]


def exit_code(error: BaseException) -> int | None:
    """The exit status for an expected error, or None for a bug."""
    for kind, code in EXIT_CODES.items():
        if isinstance(error, kind):
            return code
    return None
