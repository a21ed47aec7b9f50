"""Exception types users can catch.

Every error taskmoe raises on bad input derives from :class:`TaskmoeError`, and its message
names the offending file, field or value so the user can act on it without a traceback.
"""

from __future__ import annotations


class TaskmoeError(Exception):
    """Base class of every error raised on bad input or state."""


class ConfigError(TaskmoeError, ValueError):
    """A configuration value is missing, of the wrong type, or out of range."""


class CheckpointError(TaskmoeError):
    """A component or training checkpoint on disk is missing, corrupt or incompatible."""


class DataError(TaskmoeError, ValueError):
    """A corpus source is empty, unreadable, or in the wrong format."""


class TrainingError(TaskmoeError, RuntimeError):
    """Training cannot go on (for example a NaN/inf loss); the last good checkpoint is kept."""


class RequestError(TaskmoeError, ValueError):
    """A generation request is malformed or exceeds a limit."""
