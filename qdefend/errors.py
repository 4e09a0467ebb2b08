"""User-facing errors.

A :class:`QdefendError` is a mistake the user can fix (a wrong name, missing data, a tampered file).
The CLI prints its message on one line and exits with status 2 instead of a traceback, so every
message must say what was wrong *and* what to type or do instead.
"""


class QdefendError(Exception):
    """An error caused by user input; its message says how to fix it."""


class NonFiniteLossError(QdefendError):
    """Training produced a NaN/Inf loss; the last good checkpoint is kept on disk."""
