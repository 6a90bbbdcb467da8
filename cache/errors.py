"""Errors that reach the user as one line of text.

Every failure a user can cause or meet (bad arguments, missing data, a damaged cache) is raised as a
:class:`RepaError` subclass with a message written for that user; the CLI prints the message and
exits with ``exit_code``. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence


def quiet_unraisable() -> None:
    """Send "Exception ignored in ..." reports (raised in finalizers, e.g. of an object-store
    client's coroutines while a failing command shuts down) to the debug log instead of stderr, so
    a failure reads as its one line."""
    import logging
    import sys

    log = logging.getLogger("repa.unraisable")
    sys.unraisablehook = lambda u: log.debug("ignored in %r: %r", u.object, u.exc_value)


def one_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type name when the message is empty), cut to
    at most ``limit`` characters: the part of a library's error worth showing in ours."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def user_message(exc: BaseException) -> str:
    """The message of a user-facing error. One raised in a DataLoader worker reaches the main
    process wrapped by torch ("Caught CacheError in DataLoader worker process 0.", the worker's
    traceback, then "<module>.CacheError: <message>"): that last line's message is returned."""
    text = str(exc)
    if not (text.startswith("Caught ") and "\nOriginal Traceback" in text):
        return text
    last = text.rstrip().splitlines()[-1]
    name = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    return last[len(name):] if last.startswith(name) else last


class RepaError(Exception):
    """Base class: a failure explained by its message alone."""

    exit_code: int = 1


class UsageError(RepaError):
    """The user asked for something that cannot work (bad path, unknown name, bad value)."""

    exit_code = 2


class CacheError(RepaError):
    """A cache is missing, uncommitted, damaged or does not match what was asked for."""

    exit_code = 2


class FingerprintMismatch(CacheError):
    """A resume or an added group would mix data made under different settings."""


def unknown_name(kind: str, name: str, known: Sequence[str], more: str = "") -> UsageError:
    """The error for a ``kind`` called ``name`` that is not one of ``known``: one line naming the
    closest known name when one is close (a typo), then every known name (``more`` appended)."""
    lowered = {k.lower(): k for k in known}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.75)
    hint = f" (did you mean '{lowered[close[0]]}'?)" if close else ""
    return UsageError(f"unknown {kind} '{name}'{hint}; known {kind}s: {', '.join(known)}{more}")
