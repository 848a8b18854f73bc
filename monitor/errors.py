"""Errors that carry their own exit code, so the CLI can print one line instead of a traceback."""

from __future__ import annotations


class HarkenError(Exception):
    """A failure the user can act on; `str()` is the one line the CLI prints."""

    exit_code = 1


class UsageError(HarkenError):
    """Bad arguments, bad configuration, missing or unusable input files: exit code 2."""

    exit_code = 2


class AudioError(UsageError):
    """An audio file or buffer that cannot be used (not audio, truncated, empty, NaN)."""


class ArtifactError(UsageError):
    """A model artifact that is missing, corrupted or incompatible."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's first non-empty line (or its type's name), for one-line messages."""
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]
