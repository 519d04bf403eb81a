"""Log output that a peer cannot forge: wire values are escaped before they reach a line.

Every log line of medgate is one line: a calling AE, an MSH field or an HTTP path holding a
newline would otherwise start a line of the peer's choosing. The formatter escapes control
characters (and backslash, so an escape cannot be faked either) in the message; a traceback,
which is ours, keeps its lines.
"""

from __future__ import annotations

import logging
import re

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\\\u2028\u2029]")


def escape(text: str) -> str:
    """`text` with control characters and backslash written as \\xNN (or \\\\)."""
    return _UNSAFE.sub(lambda match: "\\\\" if match.group() == "\\" else
                       f"\\x{ord(match.group()):02x}", text)


class WireSafeFormatter(logging.Formatter):
    """A Formatter whose message part is always one line."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape(super().formatMessage(record))
