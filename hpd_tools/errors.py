"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class HPDError(Exception):
    """A problem with the user's input or environment, not a bug.

    The message is one line: what was wrong, where, and what to do.
    """


class DataError(HPDError):
    """A record of the input data is unusable (malformed, missing fields, empty)."""


class CacheError(HPDError):
    """A path or URL does not hold a usable cache."""


class CacheCorruptError(CacheError):
    """A cache's stored content violates the cache contract (found by ``verify``)."""


class TeacherUnavailable(HPDError):
    """An online teacher did not answer (connection refused, timeouts, 5xx) after retries."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (cut at ``limit`` characters), for the
    one-line errors that name what a library refused."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"
