"""Small scripted peers that misbehave on purpose (members that answer twice, clients that send
hostile bytes), for the hardening tests. Each runs in the test's nursery on 127.0.0.1:0."""

from __future__ import annotations

import re
import socket
from typing import Awaitable, Callable

import trio

from protocols.mllp import END, SB, build_ack, frame, peek_header

Handler = Callable[[trio.SocketStream], Awaitable[None]]


class ScriptedServer:
    """A TCP server whose every connection is served by `handler`; `.port` once started.
    With `tls` (a server-side ssl.SSLContext) the handler gets the TLS stream."""

    def __init__(self, handler: Handler, tls=None) -> None:
        self.handler = handler
        self.tls = tls
        self.port = 0
        self.connections = 0
        self._connected = trio.lowlevel.ParkingLot()

    async def start(self, nursery: trio.Nursery) -> ScriptedServer:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, self._handle, listeners)
        return self

    async def wait_connections(self, count: int, timeout: float = 10) -> None:
        """Until `count` connections have come (the gateway has relayed to this member)."""
        with trio.fail_after(timeout):
            while self.connections < count:
                await self._connected.park()

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        self._connected.unpark_all()
        try:
            if self.tls is not None:
                stream = trio.SSLStream(stream, self.tls, server_side=True, https_compatible=True)
            await self.handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)


async def read_http_request(stream: trio.SocketStream, buffer: bytearray) -> tuple[bytes, bytes] | None:
    """(head, body) of the next request (Content-Length framing), None at EOF."""
    while b"\r\n\r\n" not in buffer:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end])
    match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    length = int(match.group(1)) if match else 0
    while len(buffer) < end + length:
        data = await stream.receive_some(65536)
        if not data:
            return None
        buffer += data
    body = bytes(buffer[end:end + length])
    del buffer[:end + length]
    return head, body


def http_response(body: bytes, status: str = "200 OK", extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/soap+xml\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


class HttpRecorder:
    """An HTTP member that records each request it parses and answers `answer to <body>`;
    with `twice`, it answers every request two times (a buggy registry)."""

    def __init__(self, twice: bool = False) -> None:
        self.twice = twice
        self.requests: list[tuple[bytes, bytes]] = []

    async def __call__(self, stream: trio.SocketStream) -> None:
        buffer = bytearray()
        while (request := await read_http_request(stream, buffer)) is not None:
            self.requests.append(request)
            answer = http_response(b"answer to " + request[1])
            await stream.send_all(answer * (2 if self.twice else 1))


class StrayAckReceiver:
    """An MLLP receiver that ACKs each message, then at once sends a stray AA for the message
    it expects next (MSH-10 + 1): a late or made-up ACK that must never answer anything.
    With `separately`, the two go in two writes (over TLS: two records)."""

    def __init__(self, separately: bool = False) -> None:
        self.separately = separately
        self.received: list[str] = []

    async def __call__(self, stream: trio.SocketStream) -> None:
        buffer = bytearray()
        while True:
            while END not in buffer:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buffer += data
            end = buffer.index(END)
            payload = bytes(buffer[buffer.index(SB) + 1:end])
            del buffer[:end + 2]
            header = peek_header(payload)
            self.received.append(header.control_id)
            real = build_ack(header, "AA", control_id="R" + header.control_id, timestamp="20260101",
                             text="real")
            prefix, number = re.match(r"(\D*)(\d+)$", header.control_id).groups()
            stray_header = peek_header(payload.replace(header.control_id.encode(),
                                                       f"{prefix}{int(number) + 1:0{len(number)}d}".encode(), 1))
            stray = build_ack(stray_header, "AA", control_id="S", timestamp="20260101",
                              text="stray")
            if self.separately:
                # Two writes (two TLS records), corked into one TCP segment: both arrive in
                # the gateway's first read, the stray one not yet decrypted.
                sock = getattr(stream, "transport_stream", stream).socket
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
                await stream.send_all(frame(real))
                await stream.send_all(frame(stray))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
            else:
                await stream.send_all(frame(real) + frame(stray))
