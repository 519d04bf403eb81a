"""How the commands end on Ctrl-C: exit status 130 and no traceback."""

from __future__ import annotations

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def interrupted(exc: BaseException) -> bool:
    """A Ctrl-C: KeyboardInterrupt, alone or as all of a trio exception group."""
    if isinstance(exc, BaseExceptionGroup):
        return all(interrupted(inner) for inner in exc.exceptions)
    return isinstance(exc, KeyboardInterrupt)
