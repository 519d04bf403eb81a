"""How the commands end on Ctrl-C: exit status 130 and no traceback."""

from __future__ import annotations

import trio

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def run(main, *args):
    """trio.run(main, *args), a Ctrl-C coming out as KeyboardInterrupt itself even when trio
    wrapped it in an exception group (so a command catches it with one except clause)."""
    try:
        return trio.run(main, *args)
    except BaseExceptionGroup as group:
        _, rest = group.split(KeyboardInterrupt)
        if rest is None:  # nothing in it but Ctrl-C
            raise KeyboardInterrupt from None
        raise
