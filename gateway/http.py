"""HTTP/1.1 over trio with h11: the few helpers the XDS VIP, the checks and the simulators share."""

from __future__ import annotations

from dataclasses import dataclass

import h11
import trio

from gateway.relay import describe_os_error

MAX_HEAD = 65536  # request/response line plus headers; h11 refuses bigger heads
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
              b"upgrade", b"expect", b"proxy-authenticate", b"proxy-authorization"}


class PeerGone(Exception):
    """The peer closed or broke the connection; the message says how."""


async def next_event(stream: trio.abc.Stream, connection: h11.Connection,
                     chunk: int = 65536) -> object:
    """The next h11 event, receiving as needed. PeerGone on reset; h11 errors propagate."""
    while True:
        event = connection.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await stream.receive_some(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PeerGone(describe_os_error(exc)) from None
        if (not data and connection.their_role is h11.SERVER
                and connection.their_state is h11.SEND_RESPONSE
                and not connection.trailing_data[0]):
            raise PeerGone("connection closed before an HTTP response")
        connection.receive_data(data)


async def send(stream: trio.abc.Stream, connection: h11.Connection, event) -> None:
    """Send one h11 event; PeerGone when the peer has gone."""
    data = connection.send(event)
    if data:
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PeerGone(describe_os_error(exc)) from None


def header(headers, name: bytes) -> str:
    """First value of a header (names compared lower-case), '' when absent."""
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


@dataclass(frozen=True)
class Reply:
    status: int
    reason: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    truncated: bool = False


async def request(stream: trio.abc.Stream, method: str, target: str, host: str,
                  headers: list[tuple[str, str]] = (), body: bytes = b"",
                  max_body: int = 1024 * 1024) -> Reply:
    """One request on a fresh connection; the reply body is read up to `max_body` bytes."""
    connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
    all_headers = [("Host", host), ("User-Agent", "medgate"), ("Connection", "close"),
                   *headers]
    if body or method == "POST":
        all_headers.append(("Content-Length", str(len(body))))
    await send(stream, connection, h11.Request(method=method, target=target, headers=all_headers))
    if body:
        await send(stream, connection, h11.Data(data=body))
    await send(stream, connection, h11.EndOfMessage())
    response = None
    received = bytearray()
    while True:
        event = await next_event(stream, connection)
        if isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            received += event.data
            if len(received) > max_body:
                break
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            break
    if response is None:
        raise PeerGone("connection closed before an HTTP response")
    return Reply(response.status_code, response.reason.decode("latin-1"), list(response.headers),
                 bytes(received[:max_body]), truncated=len(received) > max_body)
