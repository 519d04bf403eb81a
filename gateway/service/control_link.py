"""One end of the leader-worker control channel: a Unix stream socket, protocols.control frames."""

from __future__ import annotations

import socket
from typing import Any

import trio

from protocols.control import FrameReader, encode

READ_SIZE = 256 * 1024
# How long a frame once begun may take to go out whatever cancels its sender; a peer that
# takes nothing so long is stuck, and the link is given up (closed) rather than garbled
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

        A sender cancelled once its frame has begun (an admin request's task, a stop) still
        finishes the frame: half of one would garble every frame after it, and the other end
        would take the link as broken."""
        frame = encode(message)
        async with self._sending:
            if self._cut:
                raise trio.BrokenResourceError("a control frame was cut short on this link")
            with trio.CancelScope(shield=True) as finishing:
                finishing.deadline = trio.current_time() + FINISH_FRAME
                await self.stream.send_all(frame)
            if finishing.cancelled_caught:
                self._cut = True
                await self.stream.aclose()
                raise trio.BrokenResourceError(
                    f"a control frame of {len(frame)} bytes was not taken in {FINISH_FRAME:g}s")
        await trio.lowlevel.checkpoint_if_cancelled()

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
