"""Errors raised by qarm-features.

Every error derives from :class:`QarmError`, so a caller can catch the whole family
with one ``except``. Input errors also derive from :class:`ValueError`, so code that
already guards against bad values keeps working. Messages say what was wrong, with
which value, and what to do about it.
"""

from __future__ import annotations


class QarmError(Exception):
    """Root of every error this package raises on purpose."""


class InputError(QarmError, ValueError):
    """An argument or a table is malformed: wrong shape, NaN, unknown id, missing column."""


class ConfigError(QarmError, ValueError):
    """A configuration is invalid (unknown key, out-of-range value)."""


class NotFittedError(QarmError, RuntimeError):
    """An estimator was used before ``fit`` was called."""


class AlignmentFailed(QarmError):
    """The aligned space is not better than the frozen one and the build was told to refuse
    (``build.on_alignment_failure: error``)."""


class DatasetError(QarmError):
    """A data set could not be found, fetched or parsed."""


class BundleError(QarmError):
    """A bundle is missing, corrupt, tampered with or incompatible with this code."""


class BundleVersionMismatch(BundleError):
    """Rows or a registry were produced by another bundle version than the one loaded."""


class DependencyError(QarmError, ImportError):
    """An optional heavy dependency is missing; the message names the pip extra to install."""


class RepoLocked(QarmError):
    """Another run holds a feature repo's lock (``qarm materialize``, ``status --repair``).

    Attributes:
        holder: what the holder wrote in the lock file (``pid``, ``host``, ``what``,
            ``since``); empty when it could not be read.
    """

    def __init__(self, message: str, holder: dict | None = None):
        super().__init__(message)
        self.holder = holder or {}
