"""TLS over a Channel: the standard library's SSLObject between two memory buffers, driven
directly. trio's SSLStream does the same with a lock, conflict detectors and a pass through the
scheduler on every call; per HL7 message over TLS that was most of the gateway's extra CPU.

Semantics as trio's SSLStream with https_compatible=True (what every TLS connection here used
before): an end of stream without close_notify reads as the end of the stream; errors are
BrokenResourceError with the ssl.SSLError as their cause; `transport_stream` is the stream
underneath.

Unlike SSLStream, a read cancelled while it waits loses nothing, as a Channel's: the records
received stay in the TLS buffer, and the bytes TLS has to send (a key update's answer) wait in
`unsent` until a send takes them, in order. So a caller's deadline may cut a TLS read short
and read again, as HL7's per-message loop does with a plain one.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable

import trio

from gateway.net.channel import READ_SIZE, receive_when_ready
from gateway.net.link import Link


class TlsChannel(Link):
    """One TLS connection over `transport` (a Channel, or any other Link), itself a Link."""

    encrypted = True

    def __init__(self, transport: Link, context: ssl.SSLContext, *,
                 server_side: bool = False, server_hostname: str | None = None) -> None:
        self.transport_stream = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl_object = context.wrap_bio(self._incoming, self._outgoing,
                                            server_side=server_side,
                                            server_hostname=server_hostname)
        self._closed = False
        # Records taken from TLS, not yet on the wire: they go first. A view: what the socket
        # takes is cut off without copying the rest (a 256 KiB C-STORE chunk goes in pieces).
        self.unsent: bytes | memoryview = b""
        self._sending = False
        self._send_done = trio.lowlevel.ParkingLot()

    async def do_handshake(self, heard: Callable[[], None] | None = None) -> None:
        """Shake hands; BrokenResourceError caused by the ssl.SSLError on failure (an end of
        stream is SSLEOFError), after the alert that says why has been offered to the peer.
        `heard` is called once the peer has sent its first bytes."""
        while True:
            try:
                self._ssl_object.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                self._send_alert()
                raise trio.BrokenResourceError(f"TLS handshake: {exc}") from exc
            await self._flush()
            # at the end of the stream, the next try says so
            if await self._fill() and heard is not None:
                heard()
                heard = None
        await self._flush()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to `max_bytes` bytes of plaintext, from every whole record already received
        (OpenSSL returns one record, at most 16 KiB, per read: relaying record by record would
        halve bulk throughput); b"" at the end of the TLS stream."""
        if self._closed:
            raise trio.ClosedResourceError("the connection was closed")
        size = max_bytes or READ_SIZE
        data = b""
        while True:
            try:
                data = self._ssl_object.read(size)
            except ssl.SSLWantReadError:
                if (self._outgoing.pending or self.unsent) and not self._sending:
                    await self._flush()  # what the peer may wait for (a sending task sends it)
                # _fill, inline: a coroutine frame less on every read and every wake from it
                received = await self.transport_stream.receive_some(READ_SIZE)
                if received:
                    self._incoming.write(received)
                    continue
                self._incoming.write_eof()
                data = b""  # the transport ended without close_notify: the end, as https does
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                data = b""
            except ssl.SSLError as exc:
                raise trio.BrokenResourceError(f"TLS: {exc}") from exc
            break
        if data and len(data) < size and self._incoming.pending:
            parts, _ = self._decrypt_buffered(size - len(data))
            data = b"".join([data, *parts])
        if self._outgoing.pending and not self._sending:  # a key update's answer: what goes
            self._send_what_goes()  # now, the rest with the next send (a wait here could
        return data  # lose `data` to a cancellation)

    async def receive_answer(self, max_bytes: int | None = None) -> bytes:
        """receive_some for the answer to what was just sent (channel.receive's `answer`):
        with none of it received and nothing to send, the transport is awaited first (TLS,
        asked now, would want bytes, and the socket has none: two exceptions for nothing)."""
        if (not self._closed and not self._incoming.pending and not self._ssl_object.pending()
                and not self._outgoing.pending and not self.unsent):
            received = await receive_when_ready(self.transport_stream, READ_SIZE)
            if received:
                self._incoming.write(received)
            else:
                self._incoming.write_eof()
        return await self.receive_some(max_bytes)

    def _decrypt_buffered(self, limit: int) -> tuple[list[bytes], bool]:
        """Decrypt, without waiting, up to `limit` bytes of the records already received:
        (the plaintext pieces, whether TLS ended or failed on the way; that is left for the
        next read to report)."""
        parts: list[bytes] = []
        size = 0
        while size < limit and (self._ssl_object.pending() or self._incoming.pending):
            try:
                data = self._ssl_object.read(limit - size)
            except ssl.SSLWantReadError:  # the rest of a record is still on its way
                break
            except ssl.SSLError:
                return parts, True
            if not data:
                return parts, True
            parts.append(data)
            size += len(data)
        return parts, False

    def close(self) -> None:
        """Close at once, without close_notify (as trio.aclose_forcefully, without its pass
        through the scheduler)."""
        self._closed = True
        self.transport_stream.close()

    def send_now(self, data: bytes | bytearray | memoryview) -> int:
        """All of `data`, as records, with what of them the socket takes now; the rest waits
        in `unsent` for the next send_all (of b"" if nothing else). 0 while records wait
        already (or another task sends): send_all keeps the order."""
        if self._closed:
            raise trio.ClosedResourceError("the connection was closed")
        if self._sending or self.unsent:
            return 0
        self._encrypt(data)
        self._send_what_goes()
        return len(data)

    def unread(self) -> int | None:
        """Bytes received and not read: plaintext, records not yet decrypted, and what waits
        on the socket (see Link.unread)."""
        held = self.held()
        raw = self.transport_stream.unread()
        return held + raw if raw is not None else (held or None)

    def unacknowledged(self) -> int | None:
        """Of the TLS records sent, the bytes not yet acknowledged (see Link.unacknowledged)."""
        return self.transport_stream.unacknowledged()

    def held(self) -> int:
        """Bytes received and not yet read: plaintext and records not yet decrypted."""
        return self._ssl_object.pending() + self._incoming.pending

    def data_buffered(self) -> int | None:
        """Application bytes received and not yet read, found by decrypting the whole records
        already buffered (and dropping them: only for a connection about to be judged and, if
        there are any, closed); session tickets and key updates are taken on the way. None
        when the peer ended TLS or sent an alert; a partial record stays (see `held`)."""
        parts, ended = self._decrypt_buffered(1 << 62)
        return None if ended else sum(map(len, parts))

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the connection was closed")
        if data:
            self._encrypt(data)
        await self._flush()

    def _encrypt(self, data: bytes | bytearray | memoryview) -> None:
        try:
            written = self._ssl_object.write(data)  # all of it, into memory
            while written < len(data):  # should OpenSSL ever take part (partial writes)
                written += self._ssl_object.write(data[written:])
        except ssl.SSLError as exc:  # renegotiation is off: nothing to wait for
            raise trio.BrokenResourceError(f"TLS: {exc}") from exc

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport_stream.wait_send_all_might_not_block()

    def getpeercert(self, binary_form: bool = False):
        return self._ssl_object.getpeercert(binary_form)

    async def aclose(self) -> None:
        """Send close_notify if the socket takes it at once, and close (no wait for the
        peer's close_notify, as trio's SSLStream does not wait for it either)."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        try:
            self._ssl_object.unwrap()
        except ssl.SSLError:
            pass  # SSLWantReadError: ours is sent, the peer's is not awaited
        self._send_alert()
        await self.transport_stream.aclose()

    async def _fill(self) -> bool:
        """Move what the transport received into the TLS buffer; False at its end."""
        data = await self.transport_stream.receive_some(READ_SIZE)
        if not data:
            self._incoming.write_eof()
            return False
        self._incoming.write(data)
        return True

    async def _flush(self) -> None:
        """Send what TLS has written, `unsent` first. One task sends at a time (a reader may
        have TLS bytes to send while a writer waits on a full socket): another waits until
        that send is done, which has taken its bytes too, or sends what is left. Cancelled
        while it waits, it loses nothing: the rest stays in `unsent`."""
        while self._sending:
            await self._send_done.park()
        self._sending = True
        try:
            while self._send_what_goes():
                await self.transport_stream.wait_send_all_might_not_block()
        finally:
            self._sending = False
            if self._send_done:
                self._send_done.unpark_all()

    def _send_what_goes(self) -> bool:
        """Send what the socket takes now of `unsent` and of what TLS has written since;
        whether some is left (in `unsent`). Only where no other task sends (`_sending`)."""
        while True:
            if not self.unsent:
                if not self._outgoing.pending:
                    return False
                self.unsent = memoryview(self._outgoing.read())
            sent = self.transport_stream.send_now(self.unsent)
            self.unsent = self.unsent[sent:]
            if self.unsent:
                return True

    def _send_alert(self) -> None:
        """Whatever TLS wants to say before an end (an alert, close_notify), if the socket
        takes it at once; never waits."""
        if self._outgoing.pending or self.unsent:
            try:
                self.transport_stream.send_now(bytes(self.unsent) + self._outgoing.read())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
