"""Log output that a peer cannot forge: wire values are escaped before they reach a line.

Every log line of medgate is one line: a calling AE, an MSH field or an HTTP path holding a
newline would otherwise start a line of the peer's choosing. The formatter escapes control
characters (and backslash, so an escape cannot be faked either) in the message; a traceback,
which is ours, keeps its lines. `log_format = "json"` writes the same as one JSON object a line
(time, level, logger, message, and each key=value of the message as a field of its own) for
log shippers.
"""

from __future__ import annotations

import datetime
import json
import logging
import re
import sys
from enum import StrEnum

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\\\u2028\u2029]")


def escape(text: str) -> str:
    """`text` with control characters and backslash written as \\xNN (or \\\\)."""
    return _UNSAFE.sub(lambda match: "\\\\" if match.group() == "\\" else
                       f"\\x{ord(match.group()):02x}", text)


class WireSafeFormatter(logging.Formatter):
    """A Formatter whose message part is always one line."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape(super().formatMessage(record))


_FIELD = re.compile(r"(?:^|\s)([a-z_]+)=(\S+)")
_RESERVED = {"time", "level", "logger", "message", "exception"}


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"  # one object a line, for log shippers


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


def _time(record: logging.LogRecord) -> str:
    """Local time to the millisecond, with its UTC offset (ISO 8601)."""
    moment = datetime.datetime.fromtimestamp(record.created).astimezone()
    return moment.isoformat(timespec="milliseconds")


class TextFormatter(WireSafeFormatter):
    """`2026-11-29T18:59:28.123+01:00 INFO    medgate.hl7: vip=hl7 client=...`"""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return _time(record)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, then the message's key=value
    pairs as fields (json.dumps escapes what came from the wire)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry = {"time": _time(record), "level": record.levelname, "logger": record.name,
                 "message": message}
        for key, value in _FIELD.findall(message):
            if key not in _RESERVED and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=True)


class _Prefix(logging.Filter):
    """Puts `prefix` ("worker=2 ") before each message: a worker's lines say whose they are."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self.prefix + str(record.msg)
        return True


def setup_logging(level: str = "info", log_format: str = "text", prefix: str = "") -> None:
    """Logs to stderr at `level` (debug, info, warning, error) as `log_format` (text, json),
    each message after `prefix`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    if prefix:
        handler.addFilter(_Prefix(prefix))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
