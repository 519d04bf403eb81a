"""The leader-worker control channel's framing (`[gateway] workers` > 1), sans-IO.

A frame: a 4-byte big-endian length, then that many bytes of UTF-8 JSON holding one object.
Both ends are processes of one gateway, but a frame is still checked (length bound, JSON, an
object with a string "type") so that a bug on one side is an error on the other, not a hang
or a misread stream.
"""

from __future__ import annotations

import json
import struct
from typing import Any

MAX_FRAME = 16 * 1024 * 1024  # a state snapshot of thousands of members fits many times
_LENGTH = struct.Struct(">I")


class ControlError(Exception):
    """A frame the other side should never have sent; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode(message: dict[str, Any]) -> bytes:
    """One frame; `message` must have a string "type"."""
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ControlError(f"a {message.get('type')!r} message of {len(body)} bytes is over "
                           f"the control frame limit ({MAX_FRAME})")
    return _LENGTH.pack(len(body)) + body


class FrameReader:
    """Bytes in (`feed`), messages out (`next_message`: a dict, or None until one is whole)."""

    def __init__(self, limit: int = MAX_FRAME) -> None:
        self._buffer = bytearray()
        self.limit = limit

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_message(self) -> dict[str, Any] | None:
        buffer = self._buffer
        if len(buffer) < _LENGTH.size:
            return None
        (length,) = _LENGTH.unpack_from(buffer)
        if length > self.limit:
            raise ControlError(f"a control frame of {length} bytes is over the limit "
                               f"({self.limit})")
        end = _LENGTH.size + length
        if len(buffer) < end:
            return None
        body = bytes(buffer[_LENGTH.size:end])
        del buffer[:end]
        try:
            message = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ControlError(f"a control frame is not JSON: {exc}") from None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise ControlError("a control frame is not an object with a string \"type\"")
        return message
