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


def run_script(main, prog: str) -> None:
    """Exit with main()'s return code; a HarkenError (a user mistake: a bad --out, a data set in
    the way) becomes one `prog: error: ...` line on stderr and its exit code, no traceback.
    For the `python -m` benchmarks, which run outside `harken`'s own CLI."""
    import sys

    try:
        code = main()
    except HarkenError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        code = exc.exit_code
    sys.exit(code)
