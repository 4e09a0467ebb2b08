"""User-facing errors: the one root :class:`QdefendError` (defined in :mod:`qdefend.edge.errors`,
so device code raises the same class) and its kinds.

A :class:`QdefendError` is a mistake the user can fix (a wrong name, missing data, a tampered file).
The CLI prints its message on one line and exits with status 2 instead of a traceback, so every
message must say what was wrong *and* what to type or do instead.
"""

from qdefend.edge.errors import ArtifactError, QdefendError

__all__ = ["QdefendError", "ArtifactError", "NonFiniteLossError"]


class NonFiniteLossError(QdefendError):
    """Training produced a NaN/Inf loss; the last good checkpoint is kept on disk."""
