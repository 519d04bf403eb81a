"""HTTP/1.1 over trio with h11: the few helpers the XDS VIP, the checks and the simulators share."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from typing import cast
from contextlib import nullcontext
from dataclasses import dataclass

import h11
import trio

from gateway.net.channel import receive_ready, receive_when_ready
from gateway.net.deadlines import Deadlines
from gateway.net.link import Link
from gateway.net.peer import trusted as is_trusted
from gateway.net import relay
from gateway.net.relay import describe_os_error

MAX_HEAD = 65536  # request/response line plus headers; h11 refuses bigger heads
# RFC 9110 §7.6.1: never forwarded (with `Proxy-*` and whatever `Connection` names).
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
              b"upgrade", b"expect"}
_OBS_FOLD = re.compile(rb"\n[ \t]")  # RFC 9112 §5.2: a header line continued on the next


class PeerGone(Exception):
    """The peer closed or broke the connection; the message says how."""


class SlowHead(Exception):
    """A request head that did not arrive whole within header_timeout (a slow-loris client)."""


def bad_request(reason: str, status: int = 400) -> h11.RemoteProtocolError:
    return h11.RemoteProtocolError(reason, error_status_hint=status)


def _not_idle(waiting: trio.CancelScope, now: float | None = None):
    return nullcontext()


async def next_request(stream: trio.abc.Stream, connection: h11.Connection, *,
                       idle_timeout: float, header_timeout: float, idle=_not_idle,
                       deadlines: Deadlines | None = None,
                       within: trio.CancelScope | None = None,
                       clock: Callable[[], float] = trio.current_time, answer: bool = False,
                       ) -> tuple[object, list[tuple[bytes, bytes]]]:
    """The next request head (h11.Request) or h11.ConnectionClosed, as a server, with the
    request's headers as a list (`header_list`; empty for ConnectionClosed).

    Error handling: trio.TooSlowError when no byte came within `idle_timeout`; SlowHead when
    the head was not whole `header_timeout` after its first byte; h11.RemoteProtocolError for a
    head h11 refuses, or one with obs-fold (which h11 would quietly join), or with framing an
    intermediary must not forward (see `framing_problem`).

    `deadlines`: the waits are bounded by its limits, not by a cancel scope of their own
    (which costs about 45 Python calls); `within` is then the caller's cancel scope, the one
    `idle` marks for an eviction to cancel. `clock`: the run's clock (clock_reader).
    `answer`: a response was just sent, and the client waits for it before its next request
    (no pipelined bytes are here): no read before the first wait (see `receive`).
    """
    raw = bytearray(connection.trailing_data[0])  # a pipelined head may be here already
    started = bool(raw)
    answer = answer and not started
    # Set at the first wait, not before (a head read without waiting needs none): idle_timeout,
    # or header_timeout once the head has begun (a wait after its first bytes starts it anew).
    deadline: float | None = None
    now: float | None = None  # when that deadline was set (the idle wait's start)
    while (event := connection.next_event()) is h11.NEED_DATA:
        try:
            ready = None if answer else receive_ready(stream, 65536)
            answer = False
            if ready is not None:
                data: bytes | bytearray = ready
            else:
                if deadline is None:
                    now = clock()
                    deadline = now + (header_timeout if started else idle_timeout)
                if deadlines is not None:
                    assert within is not None, "an evictable wait needs the caller's scope"
                    limit = deadlines.limit(cast(Link, stream), deadline)
                    try:
                        with nullcontext() if started else idle(within, now):
                            data = await receive_when_ready(stream, 65536)
                    except trio.ClosedResourceError:
                        if limit.expired:
                            raise _too_slow(started, header_timeout) from None
                        raise
                    finally:
                        deadlines.end(limit)
                else:
                    with trio.move_on_at(deadline) as scope, \
                            (nullcontext() if started else idle(scope, now)):
                        data = await receive_when_ready(stream, 65536)
                    if scope.cancelled_caught:
                        raise _too_slow(started, header_timeout)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PeerGone(describe_os_error(exc)) from None
        if data and not started:
            started, deadline = True, None
        if len(raw) <= MAX_HEAD:
            raw += data
        connection.receive_data(bytes(data))
    if not isinstance(event, h11.Request):
        return event, []
    # The head is what h11 took: `raw` holds every byte it was given (a head it takes is
    # under MAX_HEAD), less what it still holds (a body's first bytes, a pipelined request).
    # (A search for the blank line would try a match at each of the head's bytes.)
    if _OBS_FOLD.search(raw, 0, len(raw) - len(connection.trailing_data[0])):
        raise bad_request("obs-fold (a header value continued on the next line) is not "
                          "accepted (RFC 9112 section 5.2)")
    fields = header_list(event.headers)
    problem = framing_problem(fields)
    if problem:
        raise bad_request(problem)
    return event, fields


def _too_slow(started: bool, header_timeout: float) -> Exception:
    """What a wait for a request that ran out of time raises: SlowHead once the head began."""
    if started:
        return SlowHead(f"request head not complete after {header_timeout:g}s")
    return trio.TooSlowError()


def header_list(headers) -> list[tuple[bytes, bytes]]:
    """h11's Headers as a list of (lower-case name, value), to be looked through many times:
    from raw_items, in one call, where iterating the Headers (a Sequence) costs two Python
    calls a header and an IndexError at its end."""
    return [(name.lower(), value) for name, value in headers.raw_items()]


def reason_of(exc: h11.ProtocolError) -> str:
    """h11's reason without the bytes it quotes (they may be message content)."""
    return re.split(r":?\s*(?:bytearray\(|b['\"])", str(exc), maxsplit=1)[0] or "malformed"


def peer_failure(failure: Exception | str) -> str:
    """What a peer's HTTP did wrong, for a log, a member's health or a Fault: an h11 error
    by its reason_of, anything else as it reads."""
    return reason_of(failure) if isinstance(failure, h11.ProtocolError) else str(failure)


def framing_problem(headers) -> str:
    """Why a request's framing could smuggle a second request past a member, '' if it can't.

    RFC 9112 §6.3: Content-Length beside Transfer-Encoding is how request smuggling works; an
    intermediary must not forward both. (h11 already refuses codings other than chunked.)
    """
    chunked = length = False
    for name, _ in headers:  # lower-case, as h11 gives them
        if name == b"transfer-encoding":
            chunked = True
        elif name == b"content-length":
            length = True
    if chunked and length:
        return "both Content-Length and Transfer-Encoding (RFC 9112 section 6.3)"
    return ""


def client_cert_header(subject: str, names: tuple[str, ...]) -> bytes:
    """X-Forwarded-Client-Cert (as Envoy writes it): the verified client certificate's subject
    and DNS/URI names, quoted where the format needs it."""
    def quoted(value: str) -> str:
        value = "".join(c if c.isprintable() else "?" for c in value)  # no CR/LF into a header
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    parts = [f"Subject={quoted(subject)}"]
    parts += [f"{kind}={quoted(value)}" for name in names
              for kind, sep, value in [name.partition(":")] if sep and kind in ("DNS", "URI")]
    return ";".join(parts).encode("utf-8", "replace")


def end_to_end(headers: Sequence[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The headers a proxy may forward: no hop-by-hop ones, none that `Connection` names
    (`headers` as h11 gives them: names lower-case)."""
    kept = [(name, value) for name, value in headers
            if name not in HOP_BY_HOP and name[:6] != b"proxy-"]
    if len(kept) == len(headers):  # nothing dropped, so no Connection header naming others
        return kept
    named = {token.strip().lower() for name, value in headers if name == b"connection"
             for token in value.split(b",")}
    return [(name, value) for name, value in kept if name not in named] if named else kept


def forwarded_for(headers, client_ip: str,
                  trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bytes:
    """The X-Forwarded-For to send: the client's address, after the chain it brought only
    when the client is a trusted proxy (anyone else could forge the chain)."""
    chain = header(headers, b"x-forwarded-for").strip()
    if chain and is_trusted(client_ip, trusted):
        return f"{chain}, {client_ip}".encode("latin-1")
    return client_ip.encode("latin-1")


async def next_event(stream: trio.abc.Stream, connection: h11.Connection,
                     chunk: int = 65536, timeout: float | None = None,
                     deadline: float | None = None, answer: bool = False,
                     deadlines: Deadlines | None = None,
                     ) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
    """The next h11 event, receiving as needed. PeerGone on reset; h11 errors propagate;
    trio.TooSlowError when it is not whole by `deadline`, or when `timeout` is given, that long
    after the first receive it needed (an event already buffered costs no timer). `answer`:
    the event answers what was just sent; `deadlines`: what bounds the waits (see `receive`)."""
    while True:
        event = connection.next_event()
        if event is not h11.NEED_DATA:
            return event
        if timeout is not None:
            deadline = deadline or trio.current_time() + timeout
        data = await receive(stream, chunk, deadline, answer, deadlines)
        answer = False
        if (not data and connection.their_role is h11.SERVER
                and connection.their_state is h11.SEND_RESPONSE
                and not connection.trailing_data[0]):
            raise PeerGone("connection closed before an HTTP response")
        connection.receive_data(bytes(data))


async def receive(stream: trio.abc.Stream, size: int, deadline: float | None = None,
                  answer: bool = False, deadlines: Deadlines | None = None,
                  ) -> bytes | bytearray:
    """Up to `size` bytes (b"" at the end of the stream); PeerGone on a reset, TooSlowError
    when none came by `deadline`. `answer`: what is read answers what was just sent, and
    cannot be there yet: no read before the wait (it would meet EAGAIN). `deadlines`: the wait
    is bounded by one of its limits (which closes `stream` when it passes), not by a cancel
    scope (a VIP's, for the waits of every request)."""
    try:
        if deadline is None:
            return await stream.receive_some(size)
        ready = None if answer else receive_ready(stream, size)
        if ready is not None:
            return ready
        if deadlines is not None:
            limit = deadlines.limit(cast(Link, stream), deadline)
            try:
                return await receive_when_ready(stream, size)
            except trio.ClosedResourceError:
                if limit.expired:
                    raise trio.TooSlowError from None
                raise
            finally:
                deadlines.end(limit)
        with trio.CancelScope(deadline=deadline) as waiting:
            data = await receive_when_ready(stream, size)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise PeerGone(describe_os_error(exc)) from None
    if waiting.cancelled_caught:
        raise trio.TooSlowError
    return data


def whole_response(connection: h11.Connection, status: int, reason: str,
                   headers: list[tuple[str, str]], body: bytes) -> bytes:
    """A response with its body, as h11 frames it: sent in one write."""
    return (connection.send(h11.Response(status_code=status, headers=headers, reason=reason))
            + connection.send(h11.Data(data=body)) + connection.send(h11.EndOfMessage()))


async def send(stream: trio.abc.Stream, connection: h11.Connection, event) -> None:
    """Send one h11 event; PeerGone when the peer has gone."""
    await send_bytes(stream, connection.send(event))


async def send_bytes(stream: trio.abc.Stream, data: bytes) -> None:
    """Send what h11 gave for one or more events; PeerGone when the peer has gone."""
    if data:
        try:
            await stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PeerGone(describe_os_error(exc)) from None


async def send_within(stream: Link, data: bytes, timeout: float) -> bool:
    """relay.send_within for what h11 gave: False when the peer did not take it all within
    `timeout`, PeerGone when it has gone."""
    try:
        return await relay.send_within(stream, data, timeout)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise PeerGone(describe_os_error(exc)) from None


def header(headers, name: bytes) -> str:
    """First value of header `name` (lower-case, as h11 gives the names), '' when absent."""
    for key, value in headers:
        if key == name:
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
                  headers: Sequence[tuple[str, str]] = (), body: bytes = b"",
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
    return Reply(response.status_code, response.reason.decode("latin-1"),
                 header_list(response.headers), bytes(received[:max_body]),
                 truncated=len(received) > max_body)
