"""The sender side of an HL7 VIP connection: one way to send to it, and a watch on it while
its message is tried (gateway/vips/hl7.py serves the connection)."""

from __future__ import annotations

import trio

from gateway.net.link import Link
from gateway.net.peer import Peer
from gateway.net.relay import describe_os_error
from protocols.mllp import MllpReader


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
        self._lock = trio.Lock()

    async def send(self, data: bytes) -> bool:
        """One send for the whole answer (python-hl7's client reads it with a single recv);
        False when the sender has gone."""
        try:
            self._lock.acquire_nowait()  # the usual case, without Lock.acquire's scheduler pass
        except trio.WouldBlock:
            await self._lock.acquire()
        try:
            await self.client.send_all(data)
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        finally:
            self._lock.release()


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
