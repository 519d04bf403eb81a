"""What every VIP shares: socket tuning, connecting to a member with redispatch, and the byte pump.

Error handling: a member that refuses, times out or breaks before it has served the client is
reported to the balancer (passive health) and the next member is tried; the caller only sees
`NoMemberAvailable` when every member is unavailable or has failed this client.
"""

from __future__ import annotations

import enum
import errno
import functools
import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Awaitable, Callable, Hashable, Sequence, TypeVar

import trio

from gateway.net import channel
from gateway.balancer import Member, NoMemberAvailable, Pool, Transition
from gateway.net.channel import Channel
from gateway.net.link import Link
from gateway.config import Address
from gateway.net.limits import SHORTAGE_ERRNOS
from gateway.net.tls import MemberTls, TlsFailed

log = logging.getLogger("medgate.relay")

CHUNK = 262144  # bytes per receive: fewer wakeups for bulk DICOM; trio allocates per call
# A chunk under this is most often a whole request or answer (a DIMSE command, an A-RELEASE),
# after which its sender waits for the other side: the next read of that side waits on epoll
# first, not a read that meets EAGAIN. Bulk comes in larger reads, each tried at once.
QUIET_BELOW = 4096
T = TypeVar("T")


class MemberFailed(Exception):
    """This member could not serve the client; try the next one. `detail` says why;
    `member_at_fault` is False when the gateway itself was short (of descriptors, memory)."""

    def __init__(self, detail: str, *, member_at_fault: bool = True) -> None:
        super().__init__(detail)
        self.detail = detail
        self.member_at_fault = member_at_fault


def tune_socket(sock: socket.socket | trio.socket.SocketType) -> None:
    """Keepalive for links that live for days (MLLP, idle DICOM archives).

    TCP_NODELAY needs no call: every Channel sets it. Accepted sockets
    inherit these options from their listener on Linux, so listeners are tuned once.
    """
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)
    except OSError as exc:  # the peer may already be gone; the first read will say so
        log.debug("socket options not set: %s", exc)


def describe_os_error(exc: BaseException) -> str:
    """A short reason for a failed connect or read, as an engineer would say it."""
    if isinstance(exc, BaseExceptionGroup):  # trio tried several addresses: name each reason once
        return "; ".join(dict.fromkeys(describe_os_error(e) for e in exc.exceptions))
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if exc.__cause__ is not None and isinstance(exc, (OSError, trio.BrokenResourceError)):
        return describe_os_error(exc.__cause__)
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


async def connect(address: Address, timeout: float, *, tls: MemberTls | None = None,
                  proxy_header: bytes = b"",
                  source: tuple[str, int] | None = None, local_host: str = "") -> Link:
    """Open a tuned TCP connection (from the client's address and port `source` in
    transparent mode; from this host's `local_host` where it can), send the PROXY header if
    one is given, then shake hands if `tls` is; all within `timeout`. MemberFailed says what
    went wrong."""
    stream: Link | None = None
    try:
        with trio.move_on_after(timeout) as waiting:
            stream = await _open_tcp(address, source, local_host)
            if proxy_header:
                await stream.send_all(proxy_header)
            if tls is not None:
                stream = await tls.wrap(stream)
    except TlsFailed as exc:
        _discard(stream)
        raise MemberFailed(f"TLS to {address}: {exc}") from None
    except (OSError, trio.BrokenResourceError) as exc:
        _discard(stream)
        errno_ = getattr(exc, "errno", None)
        if source and errno_ in (errno.EPERM, errno.EACCES, errno.EADDRNOTAVAIL, errno.EINVAL):
            raise MemberFailed(f"connect to {address} from the client's address {source[0]} "
                               f"(transparent): {describe_os_error(exc)}",
                               member_at_fault=False) from None
        raise MemberFailed(f"connect to {address}: {describe_os_error(exc)}",
                           member_at_fault=errno_ not in SHORTAGE_ERRNOS) from None
    if waiting.cancelled_caught:
        _discard(stream)
        step = "TLS handshake with" if stream is not None and tls else "connect to"
        raise MemberFailed(f"{step} {address} timed out after {timeout:g}s")
    assert stream is not None  # opened, or one of the raises above
    return stream


def _tune_from(host: str, sock: socket.socket) -> None:
    """Tune `sock` and bind it to this host's `host` (any port) before it connects."""
    tune_socket(sock)
    sock.bind((host, 0))


def _discard(stream: Link | None) -> None:
    if stream is not None:
        stream.close()


@functools.lru_cache(maxsize=1024)  # the members' addresses: parsed once, not per connection
def _literal_family(host: str) -> int:
    """AF_INET or AF_INET6 for an IP literal; ValueError for a name."""
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


async def _open_tcp(address: Address, source: tuple[str, int] | None = None,
                    local_host: str = "") -> Channel:
    # Members are mostly IP literals: connect directly, without the resolver and the
    # happy-eyeballs nursery of trio.open_tcp_stream (a third of a short association's cost).
    try:
        family = _literal_family(address.host)
    except ValueError:
        if source:  # transparent mode takes IP literals (checked at config load)
            raise OSError(errno.EINVAL, "transparent mode needs the member's IP address")
        opened = await channel.open_tcp(address.host, address.port)
        tune_socket(opened.socket)
        return opened
    if local_host and not source:
        try:
            return await channel.connect(family, (address.host, address.port),
                                         functools.partial(_tune_from, local_host))
        except OSError as exc:
            if exc.errno not in (errno.EADDRNOTAVAIL, errno.EINVAL, errno.EAFNOSUPPORT):
                raise  # else: that address is not this host's (yet): from any address
    if not source:
        return await channel.connect(family, (address.host, address.port), tune_socket)
    host = _same_family(source[0], family)
    try:
        return await channel.connect(family, (address.host, address.port), tune_socket,
                                     (host, source[1]))
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
            raise
        # That client port to that member is taken (a connection in TIME_WAIT, or an MSH-15
        # NE message's fresh one): the client's address with another port.
        return await channel.connect(family, (address.host, address.port), tune_socket,
                                     (host, 0))


def _same_family(source: str, family: int) -> str:
    """The client's address as the member's family takes it: an IPv4 client that came in
    on a dual-stack listener (::ffff:a.b.c.d) to an IPv4 member; EINVAL when it cannot."""
    client = ipaddress.ip_address(source)
    if family == socket.AF_INET and client.version == 6 and client.ipv4_mapped:
        return str(client.ipv4_mapped)
    if (family == socket.AF_INET) != (client.version == 4):
        raise OSError(errno.EINVAL, f"the client's address {source} and the member's are not "
                                    "of one family")
    return source


async def dispatch(pool: Pool, key: str | None, attempt: Callable[[Member], Awaitable[T]],
                   *, among: Sequence[str] | None = None, unit: str = "",
                   once: Hashable | None = None, now: float | None = None,
                   first: Member | None = None,
                   failed: tuple[Member, MemberFailed] | None = None,
                   place: int | None = None) -> tuple[Member, T]:
    """Pick members until `attempt(member)` succeeds; returns the member and its result.

    The member's connection is counted (take_conn) on return; the caller must `drop_conn` it.
    Raises NoMemberAvailable when nothing is left to try (or the client's member holds it:
    NoMemberReason.HELD). `unit` names the client's unit in the log lines (a calling AE, an
    MSH-10); `once` identifies it for passive health: a unit that already counted against a
    member (a resent message) counts once. `now`: the caller's time, for the first pick.
    `first`: the member the caller picked (`choose`), tried first; `failed`: a try the caller
    made itself (counted with take_conn) that failed: dropped, counted against its member and
    logged with what follows, as a try of dispatch's own. `place`: see Pool.pick.
    """
    tried: set[str] = set()
    if failed is not None:
        _failed_try(pool, *failed, once)
        tried.add(failed[0].name)
    while True:
        if first is not None:
            member, first = first, None
        else:
            try:
                member = choose(pool, key, now if now is not None and not tried
                                else trio.current_time(), tried, among, place)
            except NoMemberAvailable as exc:
                if failed is not None:
                    _log_failed_try(pool, *failed, unit, f"not moved: {exc.reason.value}")
                raise
            if failed is not None:
                pool.count_retried()
                _log_failed_try(pool, *failed, unit, f"moved to {member.name}")
        tried.add(member.name)
        pool.take_conn(member)
        try:
            result = await attempt(member)
        except MemberFailed as failure:
            _failed_try(pool, member, failure, once)
            failed = member, failure
            continue
        except BaseException:
            pool.drop_conn(member)
            raise
        pool.report_success(member, key)
        return member, result


def choose(pool: Pool, key: str | None, now: float,
           exclude: frozenset[str] | set[str] = frozenset(),
           among: Sequence[str] | None = None, place: int | None = None) -> Member:
    """`pool.pick`, with a change of the active member (failover) logged; NoMemberAvailable
    is counted as a refusal."""
    try:
        member = pool.pick(key, now=now, exclude=exclude, among=among, place=place)
    except NoMemberAvailable:
        pool.count_refused()
        raise
    switch = pool.take_switch() if pool.switch is not None else None  # seldom: no call
    if switch is not None:
        log.warning("vip=%s failover: %s takes the new clients now (was %s): %s", pool.name,
                    switch.member, switch.previous or "none", switch.why)
    return member


def _failed_try(pool: Pool, member: Member, failure: MemberFailed,
                once: Hashable | None) -> None:
    pool.drop_conn(member)
    if failure.member_at_fault:
        strike(pool, member, failure.detail, once)


def _log_failed_try(pool: Pool, member: Member, failure: MemberFailed, unit: str,
                    then: str) -> None:
    log.warning("vip=%s member=%s%s failed: %s; %s", pool.name, member.name,
                f" {unit}" if unit else "", failure.detail, then)


def strike(pool: Pool, member: Member, detail: str, once: Hashable | None = None) -> None:
    """Count a live failure against `member` (passive health) and log a health change;
    `once`: the unit that failed, counted once however often it is resent."""
    log_change(pool, member, pool.report_failure(member, detail, once))


def unwell(pool: Pool, member: Member, detail: str, *, now: float = 0.0, source: str = "",
           once: Hashable | None = None) -> None:
    """An answer from inside a unit that says the member is in trouble (a DIMSE failure
    status, an HL7 AR): logged, and counted against its passive health (report_status)."""
    log.warning("vip=%s member=%s %s", pool.name, member.name, detail)
    log_change(pool, member, pool.report_status(member, True, detail, now=now, source=source,
                                                 unit=once))


def log_change(pool: Pool, member: Member, transition: Transition | None) -> None:
    if transition is None:
        return
    if transition.held:
        log.warning("vip=%s member=%s stays up: %s", pool.name, member.name, transition.detail)
    else:
        log.warning("vip=%s member=%s health %s -> %s: %s", pool.name, member.name,
                    transition.old.value, transition.new.value, transition.detail)


def clock_reader() -> Callable[[], float]:
    """`trio.current_time` of the running trio run, as its clock's own method: two Python
    calls a read instead of four (trio's wrapper and the runner's method are skipped), for
    the reads made once a unit. Taken again in each run (each test's MockClock)."""
    return trio.lowlevel.current_clock().current_time


def move_deadline(scope: trio.CancelScope, timeout: float, now: float | None = None) -> None:
    """Make `scope` end `timeout` seconds from now (`now` when the caller has it), unless it
    already ends within a tenth of `timeout` (at most a second) of that: a move costs more
    than the read or chunk it bounds, and a timeout of minutes need not be exact to the ms."""
    deadline = (trio.current_time() if now is None else now) + timeout
    slack = 1.0 if timeout >= 10.0 else timeout / 10  # min() and abs() without their calls
    if not -slack <= scope.deadline - deadline <= slack:
        scope.deadline = deadline


FAREWELL_TIMEOUT = 2.0  # a peer that does not take a 10-byte goodbye is not waited for


async def send_within(stream: Link, data: bytes, timeout: float) -> bool:
    """Send `data`, bounded by `timeout`; False when the peer did not take it all in time
    (trio's Broken/ClosedResourceError when it has gone). What a plain socket takes at once (a
    PDU, an ITI-18 request or answer) costs no timer."""
    sent = stream.send_now(data)
    if sent == len(data) and not stream.unsent:
        return True
    data = data[sent:]
    with trio.CancelScope(deadline=trio.current_time() + timeout) as waiting:
        await stream.send_all(data)
    return not waiting.cancelled_caught


async def send_quietly(stream: Link, data: bytes) -> None:
    """Send a few bytes to a peer that may already have gone (an RJ, an A-ABORT): bounded by
    FAREWELL_TIMEOUT, and its absence is not an error here; the caller logs the outcome."""
    if not data:
        return
    try:
        await send_within(stream, data, FAREWELL_TIMEOUT)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


@dataclass
class Traffic:
    """Bytes moved on one relayed connection."""

    from_client: int = 0
    from_member: int = 0


class SpliceEnd(enum.Enum):
    """How a splice ended; Splice.detail says more."""

    CLOSED = "closed"  # both sides closed cleanly
    IDLE = "idle timeout"
    CLIENT = "client side ended it"  # broke, or closed early with a farewell to the member
    MEMBER = "member side ended it"  # broke, or closed early: a live failure of the member


class Splice:
    """Copy bytes both ways until both sides have closed, one breaks, or it is idle too long.

    Half-close is passed on (EOF from one side becomes a shutdown(SHUT_WR) on the other), so
    request/response protocols that close their sending side first still get their answer.
    Protocol relays subclass it: `observe` sees every chunk, and `farewell` may give bytes to
    send to the other side when one side ends (DICOM's A-ABORT); when it does, the whole
    connection ends there instead of half-closing.
    """

    def __init__(self, client: Link, member: Link,
                 idle_timeout: float, traffic: Traffic) -> None:
        self.client = client
        self.member = member
        self.idle_timeout = idle_timeout
        self.traffic = traffic
        self.end = SpliceEnd.CLOSED
        self.detail = "closed"
        # Set by `observe` when the protocol says the exchange is over (DICOM: the release
        # answered): the splice ends once that chunk is forwarded, without waiting for each
        # side to close (a side that never does would hold both connections until idle).
        self.complete = False
        self._stopped = False  # the nursery was cancelled on purpose, not at idle_timeout
        self._clock: Callable[[], float] = trio.current_time  # run: the run's clock_reader

    def observe(self, source: str, chunk: bytes | bytearray) -> None:
        """Called with every chunk before it is forwarded; `source` is 'client' or 'member'."""

    def farewell(self, ended: str, why: str) -> bytes:
        """Bytes for the other side when `ended` ('client' or 'member') has gone; b"" for none."""
        return b""

    async def run(self) -> tuple[SpliceEnd, str]:
        """Relay until done; how it ended, and the detail ('client connection reset', ...)."""
        # The nursery's own scope bounds the idle time too (a scope fewer a connection); a
        # cancel on purpose says so in _stopped.
        clock = self._clock = clock_reader()  # read again at each chunk
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.cancel_scope.deadline = clock() + self.idle_timeout
            # One direction in a task of its own, the other in this one: a spawn fewer.
            nursery.start_soon(self._pump, self.member, self.client, "member", "client")
            await self._pump(self.client, self.member, "client", "member")
        if nursery.cancel_scope.cancelled_caught and not self._stopped:
            self.end, self.detail = SpliceEnd.IDLE, f"idle timeout after {self.idle_timeout:g}s"
            why = self.detail
            with trio.move_on_after(FAREWELL_TIMEOUT):
                for ended, other in (("client", self.member), ("member", self.client)):
                    await send_quietly(other, self.farewell(ended, why))
        return self.end, self.detail

    def _finish(self, side: str, detail: str) -> None:
        """Side `side` ended the splice early (the first to do so is the one reported)."""
        if self.end is SpliceEnd.CLOSED:
            self.end = SpliceEnd.CLIENT if side == "client" else SpliceEnd.MEMBER
            self.detail = f"{side} {detail}"
        self._stop()

    def _stop(self) -> None:
        self._stopped = True
        self._nursery.cancel_scope.cancel()

    async def _end(self, ended: str, other: Link, why: str | None) -> None:
        """Side `ended` has closed cleanly (why None) or broken (why says how); tell `other`."""
        goodbye = self.farewell(ended, why or "closed")
        if goodbye:
            await send_quietly(other, goodbye)
            self._finish(ended, f"{why or 'closed'} before the end, the other side was told")
        elif why:
            self._finish(ended, why)
        elif not isinstance(other, trio.abc.HalfCloseableStream):
            # TLS cannot close one direction: the whole connection ends here, as the end of a
            # TLS session (close_notify) does.
            self._stop()
        else:
            try:
                await other.send_eof()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the other side is already gone; its own pump reports it

    async def _pump(self, source: Link, sink: Link,
                    source_name: str, sink_name: str) -> None:
        from_client, traffic = source_name == "client", self.traffic
        quiet = False  # the last chunk was small: its sender now waits (QUIET_BELOW)
        while True:
            try:
                chunk = await (channel.receive_when_ready(source, CHUNK) if quiet
                               else source.receive_some(CHUNK))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                await self._end(source_name, sink, describe_os_error(exc))
                return
            if not chunk:
                await self._end(source_name, sink, None)
                return
            self.observe(source_name, chunk)
            quiet = len(chunk) < QUIET_BELOW
            try:
                await sink.send_all(chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                await self._end(sink_name, source, describe_os_error(exc))
                return
            if from_client:
                traffic.from_client += len(chunk)
            else:
                traffic.from_member += len(chunk)
            if self.complete:
                self._stop()
                return
            move_deadline(self._nursery.cancel_scope, self.idle_timeout, self._clock())


__all__ = ["CHUNK", "MemberFailed", "NoMemberAvailable", "Splice", "SpliceEnd", "Traffic",
           "choose", "connect", "dispatch", "describe_os_error", "move_deadline", "send_quietly",
           "send_within", "strike", "tune_socket", "unwell"]
