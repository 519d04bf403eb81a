"""One end of the leader-worker control channel: a Unix stream socket, protocols.control frames."""

from __future__ import annotations

import socket
from typing import Any

import trio

from protocols.control import FrameReader, encode

READ_SIZE = 256 * 1024


class ControlLink:
    """Messages out (`send`, from any task) and in (`receive`, from one task)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._reader = FrameReader()
        self._sending = trio.Lock()  # whole frames: several tasks send

    async def send(self, message: dict[str, Any]) -> None:
        """Send one message (trio.BrokenResourceError: the other end has gone)."""
        frame = encode(message)
        async with self._sending:
            await self.stream.send_all(frame)

    async def receive(self) -> dict[str, Any] | None:
        """The next message; None once the other end has closed (ControlError: a bad frame)."""
        while True:
            message = self._reader.next_message()
            if message is not None:
                return message
            try:
                data = await self.stream.receive_some(READ_SIZE)
            except trio.BrokenResourceError:
                return None
            if not data:
                return None
            self._reader.feed(data)

    async def aclose(self) -> None:
        await self.stream.aclose()
