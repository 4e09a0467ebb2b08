"""qdefend's one error root, importable on a device (standard library only).

A :class:`QdefendError` is a mistake the user can fix (a wrong name, missing data, a tampered file).
The CLI prints its message on one line and exits with status 2 instead of a traceback, so every
message must say what was wrong *and* what to type or do instead. :class:`ArtifactError` is the
edge's kind of it (a missing, corrupted or inconsistent artifact or manifest, or a wrong input to
one); it is also a ``ValueError``, so a device script that catches ValueError keeps working.

This file is copied as-is into device bundles with the rest of :mod:`qdefend.edge`.
"""


class QdefendError(Exception):
    """An error caused by user input; its message says how to fix it."""


class ArtifactError(QdefendError, ValueError):
    """A missing, corrupted or inconsistent artifact/manifest, or a wrong input to one.

    The message is one line saying what is wrong and what to do (the CLI prints it as-is)."""
