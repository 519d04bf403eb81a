"""How many clients the gateway holds, and what it does at the limit (no one VIP may starve the
others, the health checks or the admin server of file descriptors).

Rules kept here:
- Each client holds a slot of its VIP's table and of the gateway-wide count; a client over
  either limit is refused in its protocol's words by the VIP handler (`refuse`), within
  REFUSE_TIMEOUT, and at most REFUSALS_AT_ONCE of those at a time: beyond that it is closed at
  once, never by holding up accept for everyone.
- The gateway-wide default derives from the open-files limit, keeping a reserve for member
  connections, pooled connections, health checks, the audit log and the admin server.
- A VIP past EVICT_AT of its limit closes, for each new client, first the oldest connection
  still opening (in its TLS handshake, or that has sent no A-ASSOCIATE-RQ yet) that has sent
  nothing at all, then the oldest one still opening, then its
  longest-idle connection that has no unit in progress (an MLLP link between messages, an HTTP
  keep-alive between requests): silent connections and idle links make room instead of
  refusing work. Past EVICT_AT a TLS handshake gets PRESSED_HANDSHAKE_TIMEOUT, not the usual.
- One client address holds at most `max_clients_per_source` of a VIP's slots (a quarter by
  default; trusted proxies are not counted), so one host cannot hold a VIP.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Iterator

import trio

from gateway.config import Config
from gateway.net.shared_counts import SharedCounts, source_bucket

if TYPE_CHECKING:
    from gateway.net.peer import Peer

log = logging.getLogger("medgate.limits")

FDS_PER_CLIENT = 2  # the client's socket and its member connection
BASE_RESERVE = 48  # stdio, epoll, listeners, audit log, the admin server's own connections
POOLED_PER_MEMBER = 16 + 1  # idle pooled connections (HL7, XDS) and one health check
REFUSALS_AT_ONCE = 16  # refusals in progress (each holds one descriptor for REFUSE_TIMEOUT)
REFUSE_TIMEOUT = 2.0  # to read the unit a refusal answers (RQ, MSH-10, request head)
EVICT_AT = 0.8
PRESSED_HANDSHAKE_TIMEOUT = 2.0  # seconds for a TLS handshake while a VIP is past EVICT_AT
# What an evicted client was doing (the metric's label) and how the log line says it
EVICTION_WORDS = {"tls-handshake": "still in its TLS handshake",
                  "first-unit": "has sent no first request", "idle": "idle"}
ADMIN_MAX_CLIENTS = 32
ADMIN_PROBE_SLOTS = 4  # admin connections beyond ADMIN_MAX_CLIENTS for /healthz and /readyz only
SHORTAGE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}  # ours, not a peer's


def reserve_for(config: Config) -> int:
    """Descriptors kept back from clients for everything else the gateway opens."""
    members = sum(len(vip.members) for vip in config.vips)
    return (BASE_RESERVE + REFUSALS_AT_ONCE + ADMIN_MAX_CLIENTS + ADMIN_PROBE_SLOTS
            + members * POOLED_PER_MEMBER)


def gateway_max_clients(config: Config, open_files: int) -> int:
    """[gateway] max_clients, or what fits in `open_files` beside the reserve."""
    if config.gateway.max_clients:
        return config.gateway.max_clients
    return max((open_files - reserve_for(config)) // FDS_PER_CLIENT, 1)


def vip_max_clients(config: Config, total: int) -> dict[str, int]:
    """Each VIP's max_clients, or an equal share of the gateway-wide limit."""
    share = max(total // len(config.vips), 1)
    return {vip.name: vip.max_clients or share for vip in config.vips}


def per_source_limit(max_clients_per_source: int, limit: int) -> int:
    """The slots one client address may hold: the VIP's setting, or a quarter of its slots."""
    return max_clients_per_source or max(limit // 4, 1)


class Full(StrEnum):
    """The limit a client is refused over."""

    VIP = "max_clients"
    GATEWAY = "[gateway] max_clients"
    SOURCE = "max_clients_per_source"


class Evicted(Exception):
    """An idle client was closed to make room; its handler ends quietly."""


@dataclass(eq=False)
class ClientSlot:
    """One admitted client. Handlers mark the wait for the client's next unit with `idle()`,
    the only place an eviction can reach them: a unit in progress is never cut off. (HL7's
    per-message loop sets `idle_scope` and `idle_since` itself, and clears both after the
    wait: a call less each way, on the way of every message.)"""

    client: str
    source: str | None = None  # the address counted against max_clients_per_source
    _peer: Peer | None = field(default=None, repr=False)
    idle_since: float | None = None  # when its idle wait started
    idle_scope: trio.CancelScope | None = field(default=None, repr=False)  # what evict cancels
    _evicted: bool = False
    # While opening: (what it is doing, an EVICTION_WORDS key; since when; the scope an
    # eviction cancels)
    _opening: tuple[str, float, trio.CancelScope] | None = field(default=None, repr=False)
    # Whether the client has sent anything in its opening: a silent one goes first (a new
    # client's handshake under a flood of silent connections would else come to be the
    # oldest, and be closed for them).
    _heard: bool = field(default=False, repr=False)

    @property
    def peer(self) -> Peer:
        """Who the client is: set by the server once PROXY header and TLS are done, before
        any VIP handler sees the slot."""
        assert self._peer is not None, f"{self.client}: the peer is read before it is known"
        return self._peer

    @peer.setter
    def peer(self, peer: Peer) -> None:
        self._peer = peer

    @contextlib.contextmanager
    def opening(self, kind: str, deadline: float = math.inf) -> Iterator[trio.CancelScope]:
        """Mark the block (`kind` "tls-handshake", or "first-unit": the wait for it) as this
        client's opening: under pressure it is evicted first; the block then raises Evicted.
        `deadline`: the opening's own bound, in the same scope (one scope, not two, on the
        way of every association); the scope, yielded, says whether it passed."""
        now = trio.current_time()
        scope = trio.CancelScope(deadline=deadline)
        self._opening = (kind, now, scope)
        self._heard = False
        try:
            with scope:
                yield scope
        finally:
            self._opening = None
        if scope.cancelled_caught and self._evicted:
            raise Evicted

    def heard(self) -> None:
        """The client has sent its first bytes in its opening."""
        self._heard = True

    def idle(self, waiting: trio.CancelScope, now: float | None = None) -> _IdleWait:
        """Mark the wait under `waiting` (the caller's timeout scope around it) as idle (from
        `now`, when the caller has read the clock): an eviction cancels that scope, and the
        block then raises Evicted."""
        return _IdleWait(self, waiting, now)

    @property
    def evicted(self) -> bool:
        """An eviction cancelled this client's idle wait."""
        return self._evicted

    @property
    def evictable(self) -> bool:
        """Idle now, and not already being closed."""
        return self.idle_scope is not None and not self._evicted

    def evict(self) -> None:
        if self._opening is not None:
            self._evicted = True
            self._opening[2].cancel()
        elif self.idle_scope is not None:
            self._evicted = True
            self.idle_scope.cancel()


class _IdleWait:
    """The context of `ClientSlot.idle` (a plain class: it is entered once per message)."""

    __slots__ = ("slot", "waiting", "now")

    def __init__(self, slot: ClientSlot, waiting: trio.CancelScope, now: float | None) -> None:
        self.slot = slot
        self.waiting = waiting
        self.now = now

    def __enter__(self) -> None:
        self.slot.idle_scope = self.waiting
        self.slot.idle_since = trio.current_time() if self.now is None else self.now

    def __exit__(self, *exc_info: object) -> None:
        self.slot.idle_scope = self.slot.idle_since = None
        if self.slot._evicted:
            raise Evicted


class ClientTable:
    """The live clients of one VIP, counted against its limit and the gateway-wide one; with
    workers (`share`), the other workers' clients count too (gateway.net.shared_counts)."""

    def __init__(self, vip: str, limit: int, total: Total, per_source: int = 0) -> None:
        self.vip = vip
        self.limit = limit
        self.total = total
        self.per_source = per_source  # slots one client address may hold (0: no bound)
        self.slots: set[ClientSlot] = set()
        self._by_source: dict[str, int] = {}
        self.evicted: dict[str, int] = {}  # evictions by what the client was doing
        self._leaving = 0  # evicted, not gone yet: their slots are as good as free
        self._shared: SharedCounts | None = None
        self._vip_slot = 0

    def share(self, counts: SharedCounts, vip_slot: int) -> None:
        """Count this VIP's clients with the other workers' (this one's row in `counts`)."""
        self._shared, self._vip_slot = counts, vip_slot

    @property
    def in_use(self) -> int:
        """Clients held, by this process and (with workers) the others."""
        shared = self._shared
        return len(self.slots) + (shared.vip_elsewhere(self._vip_slot) if shared else 0)

    @property
    def pressed(self) -> bool:
        """Past EVICT_AT of the limit: openings are short and evicted first."""
        return self.in_use - self._leaving >= EVICT_AT * self.limit

    def _held_by(self, source: str) -> int:
        shared = self._shared
        return self._by_source.get(source, 0) + (
            shared.source_elsewhere(source_bucket(self._vip_slot, source)) if shared else 0)

    def source_full(self, source: str | None) -> bool:
        """Whether the client address `source` holds all the slots it may (None: exempt)."""
        return (source is not None and self.per_source > 0
                and self._held_by(source) >= self.per_source)

    def full(self, source: str | None) -> Full | None:
        """Which limit a new client from `source` is over, if any. Evicted clients not gone
        yet count as gone, for every limit alike."""
        if self.in_use - self._leaving >= self.limit:
            return Full.VIP
        shared = self._shared
        if (self.total.count - self._leaving + (shared.total_elsewhere() if shared else 0)
                >= self.total.limit):
            return Full.GATEWAY
        if self.source_full(source):
            return Full.SOURCE
        return None

    def _publish(self, source: str | None, change: int) -> None:
        """This worker's counts, for the others to read."""
        shared = self._shared
        if shared is None:
            return
        shared.publish_vip(self._vip_slot, len(self.slots))
        shared.publish_total(self.total.count)
        if source is not None:
            shared.add_source(source_bucket(self._vip_slot, source), change)

    @contextlib.contextmanager
    def admit(self, client: str, source: str | None = None) -> Iterator[ClientSlot | None]:
        """A slot for `client` (from the address `source`, None for a trusted proxy) for the
        duration of the block, or None when it is over a limit."""
        if self.pressed:
            self._evict_one()
        if self.full(source) is not None:
            yield None
            return
        slot = ClientSlot(client, source)
        self.slots.add(slot)
        self.total.count += 1
        if source is not None:
            self._by_source[source] = self._by_source.get(source, 0) + 1
        self._publish(source, 1)
        try:
            yield slot
        finally:
            self.slots.discard(slot)
            self.total.count -= 1
            if slot.evicted:
                self._leaving -= 1
                self._publish(None, 0)
            else:
                self._release_source(slot)

    def _release_source(self, slot: ClientSlot) -> None:
        if slot.source is not None:
            left = self._by_source[slot.source] - 1
            if left:
                self._by_source[slot.source] = left
            else:
                del self._by_source[slot.source]
        self._publish(slot.source, -1)

    def _evict_one(self) -> None:
        """Close the oldest silent opening connection, else the oldest opening one, else the
        longest idle one (see the module)."""
        now = trio.current_time()
        opening = [(slot._heard, slot._opening, slot) for slot in self.slots
                   if slot._opening is not None and not slot.evicted]
        if opening:
            _, (kind, since, _), slot = min(opening, key=lambda each: (each[0], each[1][1]))
        else:
            idle = [slot for slot in self.slots if slot.evictable]
            if not idle:
                return
            slot = min(idle, key=lambda s: s.idle_since or 0.0)
            kind, since = "idle", slot.idle_since or 0.0
        self.evicted[kind] = self.evicted.get(kind, 0) + 1
        log.warning("vip=%s client=%s %s for %.1fs, closed to make room (%d of max_clients "
                    "%d in use)", self.vip, slot.client, EVICTION_WORDS[kind], now - since,
                    len(self.slots), self.limit)
        self._evict(slot)

    def _evict(self, slot: ClientSlot) -> None:
        """Close `slot`'s client where it waits; it counts as gone from now on."""
        self._leaving += 1
        # Its address gets the slot back now, as the VIP does: else one busy address (a
        # router, a NAT) is refused over max_clients_per_source by clients already closed.
        self._release_source(slot)
        slot.evict()

    def close_idle(self, why: str = "the gateway is draining") -> int:
        """Close each client that has nothing in progress (idle between units, or in its
        opening: a TLS handshake, the wait for its first unit), logged with `why`; how many.
        A unit in progress is never cut off: its client is closed once it is idle again."""
        now = trio.current_time()
        closed = 0
        for slot in list(self.slots):
            if slot.evicted:
                continue
            if slot._opening is not None:
                kind, since = slot._opening[0], slot._opening[1]
            elif slot.idle_scope is not None:
                kind, since = "idle", slot.idle_since or now
            else:
                continue
            log.info("vip=%s client=%s %s for %.1fs, closed: %s", self.vip, slot.client,
                     EVICTION_WORDS[kind], now - since, why)
            self._evict(slot)
            closed += 1
        return closed


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


@dataclass(eq=False)
class AdminSlot:
    """One admin connection: `proven` once it has completed a request; `probes_only` when it
    came in on a slot kept for /healthz and /readyz."""

    since: float
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    proven: bool = False
    probes_only: bool = False


class AdminTable:
    """The admin server's connections: at most ADMIN_MAX_CLIENTS, then ADMIN_PROBE_SLOTS more
    that answer only the probes, so a load balancer's or keepalived's /readyz is answered
    while slow clients hold the rest. When full, the oldest connection that has completed no
    request yet (a slow or silent one: no token seen) is closed to make room."""

    def __init__(self, limit: int = ADMIN_MAX_CLIENTS, probes: int = ADMIN_PROBE_SLOTS) -> None:
        self.limit = limit
        self.probes = probes
        self.slots: set[AdminSlot] = set()
        self.evicted = 0

    @contextlib.contextmanager
    def admit(self) -> Iterator[AdminSlot | None]:
        """A slot for a new admin connection for the duration of the block, or None."""
        general = [slot for slot in self.slots if not slot.probes_only]
        probes_only = False
        if len(general) >= self.limit:
            waiting = [slot for slot in general
                       if not slot.proven and not slot.scope.cancel_called]
            if waiting:
                oldest = min(waiting, key=lambda slot: slot.since)
                oldest.scope.cancel()
                self.evicted += 1
                log.warning("admin: a connection that sent no whole request in %.1fs was "
                            "closed to make room", trio.current_time() - oldest.since)
            elif len(self.slots) - len(general) < self.probes:
                probes_only = True
            else:
                yield None
                return
        slot = AdminSlot(trio.current_time(), probes_only=probes_only)
        self.slots.add(slot)
        try:
            with slot.scope:
                yield slot
        finally:
            self.slots.discard(slot)
