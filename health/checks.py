"""Negotiate health checks: each one talks to a member and returns a pass/fail with a reason.

Every check runs under its own timeout and never raises for a member's misbehaviour: the result's
`detail` is the one line an engineer needs ("connection refused", "HTTP 503 Service Unavailable",
"timeout after 4s").
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Awaitable, Callable

import h11
import trio

from gateway.config import Address, HealthConfig
from gateway.relay import describe_os_error

MAX_HTTP_BODY = 1024 * 1024  # a status page bigger than this is not read to the end


class CheckFailed(Exception):
    """The member answered wrongly or not at all; the message is the reason."""


@dataclass(frozen=True)
class CheckOutcome:
    ok: bool
    detail: str
    latency: float  # seconds


CheckFn = Callable[[Address, HealthConfig], Awaitable[str]]


async def _open(address: Address) -> trio.SocketStream:
    try:
        return await trio.open_tcp_stream(address.host, address.port)
    except OSError as exc:
        raise CheckFailed(describe_os_error(exc)) from None


async def check_tcp(address: Address, health: HealthConfig) -> str:
    """Passes when a TCP connection opens."""
    stream = await _open(address)
    await trio.aclose_forcefully(stream)
    return "connected"


async def check_http(address: Address, health: HealthConfig) -> str:
    """GET `path`; passes on status 2xx/3xx and, if `expect` is set, that text in the body."""
    stream: trio.abc.Stream = await _open(address)
    try:
        if health.tls:
            context = ssl.create_default_context()
            # Hospital back ends mostly carry certificates from an internal CA the gateway does
            # not have; the check is about the service answering, not about trust.
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            stream = trio.SSLStream(stream, context, server_hostname=address.host)
        return await _http_get(stream, address, health)
    except (trio.BrokenResourceError, ssl.SSLError, OSError) as exc:
        raise CheckFailed(f"connection broken: {describe_os_error(exc)}") from None
    finally:
        await trio.aclose_forcefully(stream)


async def _http_get(stream: trio.abc.Stream, address: Address, health: HealthConfig) -> str:
    connection = h11.Connection(h11.CLIENT)
    request = h11.Request(method="GET", target=health.path, headers=[
        ("Host", str(address)), ("User-Agent", "medgate-check"), ("Connection", "close")])
    await stream.send_all(connection.send(request) + connection.send(h11.EndOfMessage()))
    status = 0
    reason = ""
    body = bytearray()
    received = 0
    while True:
        try:
            event = connection.next_event()
        except h11.RemoteProtocolError as exc:
            raise CheckFailed(f"not a valid HTTP response: {exc}") from None
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            if not data and not received:
                raise CheckFailed("connection closed before an HTTP response")
            received += len(data)
            connection.receive_data(data)  # b"" tells h11 about EOF: it judges what came
        elif isinstance(event, h11.Response):
            status, reason = event.status_code, event.reason.decode("latin-1")
            if not health.expect:
                break
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_HTTP_BODY:
                break
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            break
    line = f"HTTP {status} {reason}".rstrip()
    if not 200 <= status < 400:
        raise CheckFailed(line)
    if health.expect:
        if health.expect.encode() not in body:
            raise CheckFailed(f"{line}, but the body does not contain {health.expect!r}")
        return f"{line}, {health.expect!r} found"
    return line


CHECKS: dict[str, CheckFn] = {
    "tcp": check_tcp,
    "http": check_http,
}


async def run_check(address: Address, health: HealthConfig) -> CheckOutcome:
    """Run the configured check once against `address` (the check port already applied)."""
    check = CHECKS[health.check]
    started = trio.current_time()
    try:
        with trio.fail_after(health.timeout):
            detail = await check(address, health)
    except trio.TooSlowError:
        return CheckOutcome(False, f"timeout after {health.timeout:g}s",
                            trio.current_time() - started)
    except CheckFailed as exc:
        return CheckOutcome(False, str(exc), trio.current_time() - started)
    return CheckOutcome(True, detail, trio.current_time() - started)


def check_address(member_address: Address, health: HealthConfig) -> Address:
    """Where the check connects: the member's host, with the check port when one is set."""
    if health.port is None:
        return member_address
    return Address(member_address.host, health.port)
