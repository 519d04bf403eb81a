"""How many clients the gateway holds, and what it does at the limit (no one VIP may starve the
others, the health checks or the admin server of file descriptors).

Rules kept here:
- Each client holds a slot of its VIP's table and of the gateway-wide count; a client over
  either limit is refused in its protocol's words by the VIP handler (`refuse`), within
  REFUSE_TIMEOUT, and at most REFUSALS_AT_ONCE of those at a time: beyond that it is closed at
  once, never by holding up accept for everyone.
- The gateway-wide default derives from the open-files limit, keeping a reserve for member
  connections, pooled connections, health checks, the audit log and the admin server.
- A VIP past EVICT_AT of its limit closes its longest-idle connection that has no unit in
  progress (an MLLP link between messages, an HTTP keep-alive between requests) for each new
  client, so idle links make room instead of refusing work.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import trio

from gateway.config import Config

if TYPE_CHECKING:
    from gateway.peer import Peer

log = logging.getLogger("medgate.limits")

FDS_PER_CLIENT = 2  # the client's socket and its member connection
BASE_RESERVE = 48  # stdio, epoll, listeners, audit log, the admin server's own connections
POOLED_PER_MEMBER = 16 + 1  # idle pooled connections (HL7, XDS) and one health check
REFUSALS_AT_ONCE = 16  # refusals in progress (each holds one descriptor for REFUSE_TIMEOUT)
REFUSE_TIMEOUT = 2.0  # to read the unit a refusal answers (RQ, MSH-10, request head)
EVICT_AT = 0.8
ADMIN_MAX_CLIENTS = 32
SHORTAGE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}  # ours, not a peer's


def reserve_for(config: Config) -> int:
    """Descriptors kept back from clients for everything else the gateway opens."""
    members = sum(len(vip.members) for vip in config.vips)
    return BASE_RESERVE + REFUSALS_AT_ONCE + ADMIN_MAX_CLIENTS + members * POOLED_PER_MEMBER


def gateway_max_clients(config: Config, open_files: int) -> int:
    """[gateway] max_clients, or what fits in `open_files` beside the reserve."""
    if config.gateway.max_clients:
        return config.gateway.max_clients
    return max((open_files - reserve_for(config)) // FDS_PER_CLIENT, 1)


def vip_max_clients(config: Config, total: int) -> dict[str, int]:
    """Each VIP's max_clients, or an equal share of the gateway-wide limit."""
    share = max(total // len(config.vips), 1)
    return {vip.name: vip.max_clients or share for vip in config.vips}


class Evicted(Exception):
    """An idle client was closed to make room; its handler ends quietly."""


@dataclass(eq=False)
class ClientSlot:
    """One admitted client. Handlers mark the wait for the client's next unit with `idle()`,
    the only place an eviction can reach them: a unit in progress is never cut off."""

    client: str
    peer: Peer | None = None  # set by the server once PROXY header and TLS are done
    idle_since: float | None = None
    _waiting: trio.CancelScope | None = field(default=None, repr=False)
    _evicted: bool = False

    def idle(self, waiting: trio.CancelScope) -> _IdleWait:
        """Mark the wait under `waiting` (the caller's timeout scope around it) as idle: an
        eviction cancels that scope, and the block then raises Evicted."""
        return _IdleWait(self, waiting)

    def wait_idle(self, waiting: trio.CancelScope, now: float | None = None) -> None:
        """`idle` without a context manager: the wait starts (at `now` when the caller has
        it); `wait_over` must follow."""
        self._waiting, self.idle_since = waiting, trio.current_time() if now is None else now

    def wait_over(self) -> None:
        self._waiting = self.idle_since = None

    @property
    def evicted(self) -> bool:
        """An eviction cancelled this client's idle wait."""
        return self._evicted

    @property
    def evictable(self) -> bool:
        """Idle now, and not already being closed."""
        return self._waiting is not None and not self._evicted

    def evict(self) -> None:
        if self._waiting is not None:
            self._evicted = True
            self._waiting.cancel()


class _IdleWait:
    """The context of `ClientSlot.idle` (a plain class: it is entered once per message)."""

    __slots__ = ("slot", "waiting")

    def __init__(self, slot: ClientSlot, waiting: trio.CancelScope) -> None:
        self.slot = slot
        self.waiting = waiting

    def __enter__(self) -> None:
        self.slot.wait_idle(self.waiting)

    def __exit__(self, *exc_info) -> bool:
        self.slot.wait_over()
        if self.slot.evicted:
            raise Evicted
        return False


class ClientTable:
    """The live clients of one VIP, counted against its limit and the gateway-wide one."""

    def __init__(self, vip: str, limit: int, total: Total) -> None:
        self.vip = vip
        self.limit = limit
        self.total = total
        self.slots: set[ClientSlot] = set()

    @contextlib.contextmanager
    def admit(self, client: str) -> Iterator[ClientSlot | None]:
        """A slot for `client` for the duration of the block, or None when it is over a limit."""
        if len(self.slots) >= EVICT_AT * self.limit:
            self._evict_longest_idle()
        if len(self.slots) >= self.limit or self.total.count >= self.total.limit:
            yield None
            return
        slot = ClientSlot(client)
        self.slots.add(slot)
        self.total.count += 1
        try:
            yield slot
        finally:
            self.slots.discard(slot)
            self.total.count -= 1

    def _evict_longest_idle(self) -> None:
        idle = [slot for slot in self.slots if slot.evictable]
        if not idle:
            return
        slot = min(idle, key=lambda s: s.idle_since)
        log.warning("vip=%s client=%s idle for %.0fs, closed to make room (%d of max_clients "
                    "%d in use)", self.vip, slot.client, trio.current_time() - slot.idle_since,
                    len(self.slots), self.limit)
        slot.evict()


@dataclass
class Total:
    """The gateway-wide count of clients and refusals in progress."""

    limit: int
    count: int = 0
    refusing: int = 0


class AcceptTrouble:
    """Backs off while accept() fails for lack of descriptors or memory, and logs once per
    burst (trio's own loop logs every 100 ms with a traceback). A burst ends after QUIET
    seconds without a failure."""

    QUIET = 2.0

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.consecutive = 0  # failures since the last success: sets the backoff
        self.in_burst = 0
        self.last_failure = float("-inf")

    async def failed(self, exc: OSError) -> None:
        if exc.errno not in SHORTAGE_ERRNOS:
            raise exc
        if not self.in_burst:
            log.error("%s: accept failed (%s); backing off until descriptors are free",
                      self.owner, errno.errorcode.get(exc.errno, exc.errno))
        self.in_burst += 1
        self.consecutive += 1
        self.last_failure = trio.current_time()
        await trio.sleep(min(0.05 * 2 ** min(self.consecutive, 5), 1.0))

    def succeeded(self) -> None:
        self.consecutive = 0
        if self.in_burst and trio.current_time() - self.last_failure >= self.QUIET:
            log.warning("%s: accepting again after %d failed accept(s)", self.owner,
                        self.in_burst)
            self.in_burst = 0
