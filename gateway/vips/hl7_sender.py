"""The sender side of an HL7 VIP connection: its next message, one way to send to it, a watch
on it while its message is tried, and how the connection ended (gateway/vips/hl7.py serves
the connection and decides what each message gets)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import trio

from gateway.config import VipConfig
from gateway.net.link import Link
from gateway.net.peer import Peer
from gateway.net.relay import describe_os_error
from protocols.mllp import Event, MllpReader


class Ending(StrEnum):
    """Why a sender's connection ended: its disconnect log line says so, with a detail."""

    CLOSED = "closed by the sender"
    IDLE = "idle for client_timeout"
    UNREAD = "the sender did not read its answer"  # its socket took none of it in time
    GONE = "the sender went away before its answer"
    BROKEN = "sender connection broken"
    CUT = "closed in the middle of a frame"
    JUNK = "bytes outside an MLLP frame, closed"
    OVERSIZE = "message over max_message_bytes, closed"
    UNREADABLE = "unreadable message, closed"
    NOT_DELIVERED = "not delivered: closed so that the sender knows"
    IN_DOUBT = "in doubt: closed so that the sender resends"


QUIET_ENDINGS = frozenset({Ending.CLOSED, Ending.IDLE, Ending.GONE})  # logged at INFO


@dataclass(frozen=True)
class SessionEnd:
    """How a sender's connection ended, and the detail its log line gives."""

    ending: Ending
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.ending}: {self.detail}" if self.detail else self.ending.value



async def first_event(client: Link, reader: MllpReader, vip: VipConfig) -> Event | SessionEnd:
    """A refused sender's first message (or what the reader made of its bytes), each read
    bounded by client_timeout; a SessionEnd when it closes, breaks the connection or idles.
    (A served sender's messages are read in HL7Vip.handle, on its own clock.)"""
    while (event := reader.next_event()) is None:
        with trio.move_on_after(vip.client_timeout):
            try:
                data = await client.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                return SessionEnd(Ending.BROKEN, describe_os_error(exc))
            if not data:
                return SessionEnd(Ending.CUT if reader.buffered else Ending.CLOSED)
            reader.feed(data)
            continue
        return SessionEnd(Ending.IDLE, f"{vip.client_timeout:g}s")
    return event


class Sender:
    """One sender connection: its stream, name and peer, what reads it while a message is
    tried, and the one way anything is sent to it (relayed ACKs, the gateway's NAKs and late
    answers to NE/ER messages may be sent at once, so one at a time)."""

    def __init__(self, client: Link, name: str, peer: Peer | None = None,
                 listening: trio.Nursery | None = None, limit: int = 16 * 1024 * 1024) -> None:
        self.client = client
        self.name = name
        self.peer = peer
        self.reader = MllpReader(limit)
        self.watch = SenderWatch(client, self.reader, limit)
        self.listening = listening  # where late answers are waited for
        self.late = 0  # connections read for a late answer now (MAX_LATE_WAITS)
        self._sending = False  # an answer is being sent; the others wait their turn
        self._turn = trio.lowlevel.ParkingLot()

    async def send(self, data: bytes) -> bool:
        """One send for the whole answer (python-hl7's client reads it with a single recv);
        False when the sender has gone. One at a time: a flag and a parking lot, where a
        trio.Lock would cost four function calls a message for the usual, uncontended send."""
        while self._sending:
            await self._turn.park()
        self._sending = True
        try:
            await self.client.send_all(data)
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        finally:
            self._sending = False
            if self._turn:  # someone waits its turn
                self._turn.unpark()

    def send_at_once(self, data: bytes) -> int | None:
        """What the socket takes of `data` now, without waiting: the bytes sent (0 while
        another answer is on its way: it goes first), None when the sender has gone. The rest,
        if any, must go next, with `send` (no other answer can start before: nothing waits in
        between)."""
        if self._sending:
            return 0
        try:
            return self.client.send_now(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return None


class SenderWatch:
    """Reads the sender's side while its message is tried: what arrives (a pipelined next
    message) is kept in the reader, up to a bound; end of stream or a reset cancels the try."""

    def __init__(self, client: Link, reader: MllpReader, limit: int) -> None:
        self.client = client
        self.reader = reader
        self.limit = limit
        self.gone = ""  # how the sender went: "closed the connection" or the error

    def gone_now(self) -> bool:
        """Whether the sender has closed, seen without waiting (before another try)."""
        if not self.gone and self.client.unread() is None:
            self.gone = "closed the connection"
        return bool(self.gone)

    async def run(self, trying: trio.CancelScope) -> None:
        while self.reader.buffered <= self.limit:
            try:
                data = await self.client.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self.gone = describe_os_error(exc)
            else:
                if data:
                    self.reader.feed(data)
                    continue
                self.gone = "closed the connection"
            trying.cancel()
            return
        await trio.sleep_forever()  # enough is buffered; the next read comes after this message
