"""One end of the leader-worker control channel: a Unix stream socket, protocols.control frames."""

from __future__ import annotations

import socket
from typing import Any

import trio

from protocols.control import FrameReader, encode

READ_SIZE = 256 * 1024
# How long a frame begun by a sender since cancelled (a stop, an admin request's task) may
# take to go out; a peer that takes nothing so long is stuck, and the link is given up
# (closed) rather than garbled. A sender not cancelled waits as long as the peer takes.
FINISH_FRAME = 15.0


class ControlLink:
    """Messages out (`send`, from any task) and in (`receive`, from one task)."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._reader = FrameReader()
        self._sending = trio.Lock()  # whole frames: several tasks send
        self._cut = False

    async def send(self, message: dict[str, Any]) -> None:
        """Send one message (trio.BrokenResourceError: the other end has gone, or a frame
        could not be finished).

        A sender cancelled once its frame has begun still finishes the frame, within
        FINISH_FRAME: half of one would garble every frame after it, and the other end
        would take the link as broken."""
        await self.send_frame(encode(message))

    async def send_frame(self, encoded: bytes) -> None:
        """`send` for a message encoded already (protocols.control.encode: one encoding
        for every worker a message goes to)."""
        frame = memoryview(encoded)
        async with self._sending:
            if self._cut:
                raise trio.BrokenResourceError("a control frame was cut short on this link")
            sent = 0
            try:
                while sent < len(frame):
                    sent += await self._send_some(frame[sent:])
            except trio.Cancelled:
                if sent:
                    await self._finish(frame, sent)
                raise

    async def _finish(self, frame: memoryview, sent: int) -> None:
        """The rest of a frame whose sender was cancelled; the link closed if the peer does
        not take it within FINISH_FRAME (later sends: BrokenResourceError)."""
        with trio.CancelScope(shield=True) as finishing:
            finishing.deadline = trio.current_time() + FINISH_FRAME
            while sent < len(frame):
                sent += await self._send_some(frame[sent:])
        if finishing.cancelled_caught:
            self._cut = True
            self.stream.socket.close()  # what waits on it hears so (receive: None)

    async def _send_some(self, data: memoryview) -> int:
        try:
            return await self.stream.socket.send(data)
        except OSError as exc:
            raise trio.BrokenResourceError(f"the control link has gone: {exc}") from exc

    async def receive(self) -> dict[str, Any] | None:
        """The next message; None once the other end has closed (ControlError: a bad frame)."""
        while True:
            message = self._reader.next_message()
            if message is not None:
                return message
            try:
                data = await self.stream.receive_some(READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None  # closed here too: a frame not taken in time (send)
            if not data:
                return None
            self._reader.feed(data)

    async def aclose(self) -> None:
        await self.stream.aclose()
