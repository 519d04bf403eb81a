"""Pools, member states, algorithms and persistence. Pure: no I/O, no clocks, no trio.

Rule: everything that decides which member gets a client lives here. The health monitor reports
check results (`record_check`), the relays report live outcomes (`report_failure`,
`report_success`) and connection counts (`take_conn`, `drop_conn`), the admin API sets admin
state (`set_admin_state`, `set_weight`). Time is passed in as `now` (seconds, any monotonic
origin), so every rule can be tested with plain numbers.

Member state is two separate fields, as in HAProxy: *health* (unknown / up / down, from checks
and live failures) and *admin* (ready / drain / maint, from operators). A member starts with
health "unknown" and gets no traffic until its first check passes; the first result decides at
once, then `rise` / `fall` consecutive results are needed to change it.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Sequence


class Health(enum.Enum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


class AdminState(enum.Enum):
    READY = "ready"
    DRAIN = "drain"
    MAINT = "maint"


class NoMemberReason(enum.Enum):
    """Why no member could be picked; protocols map these to their own refusals."""

    NONE_HEALTHY = "no member is up"
    ALL_FULL = "every available member is at max_connections"
    ALL_TRIED = "every available member was tried and failed"


class NoMemberAvailable(Exception):
    """No member can take this client now."""

    def __init__(self, pool: str, reason: NoMemberReason) -> None:
        super().__init__(f"pool {pool!r}: {reason.value}")
        self.pool = pool
        self.reason = reason


@dataclass(frozen=True)
class MemberSpec:
    """What the balancer needs to know about a member from the config."""

    name: str
    weight: int = 100
    max_connections: int = 0


@dataclass(frozen=True)
class Transition:
    """A health change worth a log line: member went from `old` to `new` because of `detail`."""

    pool: str
    member: str
    old: Health
    new: Health
    detail: str


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str
    latency: float
    at: float


CHECK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds
HISTORY = 30  # recent points kept per member for the status page: traffic samples, checks


@dataclass
class Member:
    """A member's live state and counters (mutated only through Pool methods)."""

    name: str
    weight: int
    max_connections: int
    configured_weight: int = -1  # the config's weight; `weight` may be changed at run time
    health: Health = Health.UNKNOWN
    admin: AdminState = AdminState.READY
    health_detail: str = "not checked yet"
    check_successes: int = 0  # consecutive
    check_failures: int = 0  # consecutive
    live_failures: int = 0  # consecutive
    status_failures: int = 0  # consecutive responses whose status said the member is unwell
    last_check: CheckResult | None = None
    certificate_expires: float | None = None  # Unix time, from the last TLS check that saw it
    answered_well_at: float = -math.inf  # when live traffic last got a positive answer from it
    admin_changed_at: float = 0.0  # wall clock of the last admin change (peers: last wins)
    active: int = 0
    total: int = 0
    failed: int = 0  # live failures: the client's unit went to the next member, or was refused
    check_latency: list[int] = field(default_factory=lambda: [0] * (len(CHECK_BUCKETS) + 1))
    check_latency_sum: float = 0.0
    bytes_in: int = 0  # from clients towards the member
    bytes_out: int = 0  # from the member back to clients
    current_weight: int = 0  # smooth weighted round robin state
    # The last HISTORY points, oldest first: units routed per sample (sample_traffic), and
    # check latencies in seconds.
    traffic: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    check_history: deque = field(default_factory=lambda: deque(maxlen=HISTORY))
    _total_sampled: int = 0

    @property
    def state(self) -> str:
        """One word for people: maint, down, drain or up (maint and down win)."""
        if self.admin is AdminState.MAINT:
            return "maint"
        if self.health is not Health.UP:
            return "down" if self.health is Health.DOWN else "unknown"
        return "drain" if self.admin is AdminState.DRAIN else "up"

    @property
    def full(self) -> bool:
        return 0 < self.max_connections <= self.active

    @property
    def accepts_new(self) -> bool:
        """May take a client that has no persistence entry."""
        return (self.health is Health.UP and self.admin is AdminState.READY
                and self.weight > 0 and not self.full)

    @property
    def accepts_persisted(self) -> bool:
        """May take a client persisted to it (draining members still serve those)."""
        return (self.health is Health.UP and self.admin is not AdminState.MAINT
                and self.weight > 0 and not self.full)


@dataclass
class _Sticky:
    member: str
    last_used: float


@dataclass
class Pool:
    """The members behind one VIP and the rules for picking one.

    mode "balance": smooth weighted round robin (or least connections) among members that accept
    new clients; mode "failover": the first member in listed order that accepts new clients.
    Persistence (balance mode only; in failover mode the order already sends every key to the
    same member): method "table" remembers key -> member for `persistence_timeout` seconds after
    last use; method "hash" picks by weighted rendezvous hashing, the same in every process, and
    keeps the table only so that draining members go on serving keys they already had.
    """

    name: str
    members: list[Member]
    mode: str = "balance"
    algorithm: str = "roundrobin"
    persistence_method: str | None = None  # None, "table" or "hash"
    persistence_timeout: float = 3600.0
    persistence_max_entries: int = 1_000_000  # bounds memory under a flood of distinct keys
    rise: int = 2
    fall: int = 3
    error_limit: int = 3
    relayed: int = 0  # associations / messages / requests / connections a member took
    refused: int = 0  # answered by the gateway itself (RJ, NAK, 503, close): nothing could take it
    retried: int = 0  # moved to another member after one failed
    _sticky: OrderedDict[str, _Sticky] = field(default_factory=OrderedDict)
    _new_sticky: set[str] = field(default_factory=set)  # keys to tell the peers (pairs)
    _rotation: int = 0

    @classmethod
    def from_specs(cls, name: str, specs: Sequence[MemberSpec], **settings) -> Pool:
        members = [Member(s.name, s.weight, s.max_connections, s.weight) for s in specs]
        return cls(name=name, members=members, **settings)

    def reconfigure(self, specs: Sequence[MemberSpec], **settings) -> None:
        """Take a reloaded config: members that keep their name keep their health, admin state,
        counters and run-time weight (unless the config's weight changed); new members start
        unknown; removed ones go (their live connections finish on the objects they hold)."""
        current = {member.name: member for member in self.members}
        members = []
        for spec in specs:
            member = current.get(spec.name)
            if member is None:
                member = Member(spec.name, spec.weight, spec.max_connections, spec.weight)
            else:
                if spec.weight != member.configured_weight:
                    member.weight = member.configured_weight = spec.weight
                member.max_connections = spec.max_connections
            members.append(member)
        for name in set(current) - {spec.name for spec in specs}:
            self._forget_member(name)
        self.members = members
        for key, value in settings.items():
            setattr(self, key, value)

    def member(self, name: str) -> Member:
        for member in self.members:
            if member.name == name:
                return member
        raise KeyError(f"pool {self.name!r} has no member {name!r}")

    # -- picking

    def pick(self, key: str | None = None, now: float = 0.0,
             exclude: frozenset[str] | set[str] = frozenset(),
             among: Sequence[str] | None = None) -> Member:
        """Choose a member for a new connection, association or message.

        `key` is the persistence key (source IP, calling AE, patient ID...), `exclude` the members
        already tried for this client, `among` restricts the choice to those member names (routes).
        Raises NoMemberAvailable with the reason when none can take it.
        """
        if (not exclude and among is None and self.mode == "balance"
                and self.algorithm == "roundrobin" and not (key is not None
                                                            and self.persistence_method)):
            # The usual pick (no retry, route or persistence): no lists built per message.
            chosen = _smooth_weighted(self.members)
            if chosen is not None:
                return chosen
        candidates = [m for m in self.members
                      if m.name not in exclude and (among is None or m.name in among)]
        if self.mode == "failover":
            chosen = next((m for m in candidates if m.accepts_new), None)
        else:
            chosen = self._pick_balanced(candidates, key, now)
        if chosen is None:
            raise NoMemberAvailable(self.name, self._why_none(candidates, exclude))
        if key is not None and self.persistence_method and self.mode == "balance":
            self._remember(key, chosen.name, now)
        return chosen

    def _remember(self, key: str, member: str, now: float) -> None:
        old = self._sticky.get(key)
        if old is None or old.member != member:
            self._new_sticky.add(key)
            if len(self._new_sticky) > self.persistence_max_entries:
                self._new_sticky.pop()  # bounded like the table: the peer re-picks that one
        self._store(key, member, now)
        self.expire(now)

    def _store(self, key: str, member: str, now: float) -> None:
        # Least recently used first, so expiry and the size cap only ever look at the front.
        self._sticky[key] = _Sticky(member, now)
        self._sticky.move_to_end(key)
        while len(self._sticky) > self.persistence_max_entries:
            self._sticky.popitem(last=False)

    def _pick_balanced(self, candidates: list[Member], key: str | None, now: float) -> Member | None:
        use_persistence = key is not None and self.persistence_method is not None
        sticky = self._sticky.get(key) if use_persistence else None
        if sticky is not None:
            member = next((m for m in self.members if m.name == sticky.member), None)
            if now - sticky.last_used > self.persistence_timeout or member is None:
                del self._sticky[key]
            elif member in candidates and member.accepts_persisted:
                return member
            elif member.health is not Health.UP or member.admin is AdminState.MAINT:
                del self._sticky[key]  # its member went away: pick afresh
        if use_persistence and self.persistence_method == "hash":
            ranked = sorted(candidates, key=lambda m: _rendezvous_score(key, m), reverse=True)
            return next((m for m in ranked if m.accepts_new), None)
        eligible = [m for m in candidates if m.accepts_new]
        if not eligible:
            return None
        if self.algorithm == "leastconn":
            return self._least_connections(eligible)
        return _smooth_weighted(eligible)

    def _least_connections(self, eligible: list[Member]) -> Member:
        self._rotation += 1
        count = len(eligible)
        rotated = eligible[self._rotation % count:] + eligible[:self._rotation % count]
        return min(rotated, key=lambda m: m.active / m.weight)

    def _why_none(self, candidates: list[Member], exclude) -> NoMemberReason:
        usable = [m for m in candidates if m.health is Health.UP
                  and m.admin is AdminState.READY and m.weight > 0]
        if usable:
            return NoMemberReason.ALL_FULL
        if exclude and any(m.name in exclude for m in self.members):
            return NoMemberReason.ALL_TRIED
        return NoMemberReason.NONE_HEALTHY

    def why_none(self, among: Sequence[str]) -> NoMemberReason:
        """Why none of the members named in `among` can take a new client."""
        return self._why_none([m for m in self.members if m.name in among], frozenset())

    def sample_traffic(self) -> None:
        """One traffic point per member: the units routed to it since the last sample."""
        for member in self.members:
            member.traffic.append(member.total - member._total_sampled)
            member._total_sampled = member.total

    def expire(self, now: float) -> int:
        """Drop persistence entries unused for longer than the timeout; returns how many."""
        dropped = 0
        while self._sticky:
            oldest = next(iter(self._sticky.values()))
            if now - oldest.last_used <= self.persistence_timeout:
                break
            self._sticky.popitem(last=False)
            dropped += 1
        return dropped

    def new_persistence(self) -> list[tuple[str, str]]:
        """The (key, member) entries made or changed since the last call (for the peers of a
        pair: a failover then keeps clients on their member)."""
        entries = [(key, self._sticky[key].member) for key in self._new_sticky
                   if key in self._sticky]
        self._new_sticky.clear()
        return entries

    def adopt_persistence(self, key: str, member: str, now: float) -> bool:
        """A peer's entry: kept as if picked here (not told back to the peers)."""
        if self.persistence_method != "table" or member not in {m.name for m in self.members}:
            return False
        self._store(key, member, now)
        return True

    def persisted_member(self, key: str) -> str | None:
        entry = self._sticky.get(key)
        return entry.member if entry else None

    # -- connection accounting

    def take_conn(self, member: Member) -> None:
        member.active += 1
        member.total += 1

    def drop_conn(self, member: Member, bytes_in: int = 0, bytes_out: int = 0) -> None:
        member.active -= 1
        member.bytes_in += bytes_in
        member.bytes_out += bytes_out

    # -- health

    def record_check(self, name: str, ok: bool, detail: str, latency: float,
                     now: float, certificate_expires: float | None = None) -> Transition | None:
        """A health check result; returns the transition when the member's health changed."""
        member = self.member(name)
        member.last_check = CheckResult(ok, detail, latency, now)
        if certificate_expires is not None:
            member.certificate_expires = certificate_expires
        member.check_latency[bisect.bisect_left(CHECK_BUCKETS, latency)] += 1
        member.check_history.append(latency)
        member.check_latency_sum += latency
        if ok:
            member.check_successes += 1
            member.check_failures = 0
        else:
            member.check_failures += 1
            member.check_successes = 0
        old = member.health
        if old is Health.UNKNOWN:
            new = Health.UP if ok else Health.DOWN
        elif old is Health.UP and member.check_failures >= self.fall:
            new = Health.DOWN
        elif old is Health.DOWN and member.check_successes >= self.rise:
            new = Health.UP
        else:
            return None
        return self._set_health(member, new, detail if not ok else f"check passed: {detail}")

    def report_failure(self, member: Member, detail: str) -> Transition | None:
        """A live connection to this member failed (refused, reset, timeout)."""
        member.failed += 1
        member.live_failures += 1
        if member.health is Health.UP and member.live_failures >= self.error_limit:
            member.check_successes = 0  # must pass `rise` checks again
            return self._set_health(
                member, Health.DOWN,
                f"{member.live_failures} consecutive live failures, last: {detail}")
        return None

    def report_success(self, member: Member) -> None:
        """A live connection to this member worked."""
        member.live_failures = 0

    def answered_well(self, member: Member, now: float) -> None:
        """Live traffic got a positive answer (an HL7 AA/CA) from `member` at `now`."""
        member.answered_well_at = now
        member.status_failures = 0

    def proven_alive(self, name: str, now: float, within: float) -> bool:
        """Up, and answered live traffic positively within the last `within` seconds: a
        heartbeat would tell nothing more (skip_when_live)."""
        member = self.member(name)
        return member.health is Health.UP and now - member.answered_well_at < within

    def report_status(self, member: Member, unwell: bool, detail: str) -> Transition | None:
        """A response status from inside a unit (a DIMSE status): one that says the member is
        in trouble counts like a live failure, `error_limit` in a row mark it down; any other
        status ends the run. Kept apart from connection outcomes, which succeed meanwhile."""
        if not unwell:
            member.status_failures = 0
            return None
        member.failed += 1
        member.status_failures += 1
        if member.health is Health.UP and member.status_failures >= self.error_limit:
            member.check_successes = 0  # must pass `rise` checks again
            member.status_failures = 0
            return self._set_health(
                member, Health.DOWN,
                f"{self.error_limit} failure statuses in a row, last: {detail}")
        return None

    def _set_health(self, member: Member, new: Health, detail: str) -> Transition:
        old = member.health
        member.health = new
        member.health_detail = detail
        if new is Health.UP:
            member.live_failures = 0
        else:
            self._forget_member(member.name)
        return Transition(self.name, member.name, old, new, detail)

    def _forget_member(self, name: str) -> None:
        for key in [k for k, s in self._sticky.items() if s.member == name]:
            del self._sticky[key]

    # -- admin

    def set_admin_state(self, name: str, state: AdminState, stamp: float | None = None) -> None:
        member = self.member(name)
        member.admin = state
        if stamp is not None:
            member.admin_changed_at = stamp
        if state is AdminState.MAINT:
            self._forget_member(name)

    def set_weight(self, name: str, weight: int, stamp: float | None = None) -> None:
        if not 0 <= weight <= 1000:
            raise ValueError(f"weight {weight} is not from 0 to 1000")
        self.member(name).weight = weight
        if stamp is not None:
            self.member(name).admin_changed_at = stamp


def _smooth_weighted(members: list[Member]) -> Member | None:
    """nginx's smooth weighted round robin over the members that accept new clients:
    proportional and evenly interleaved; None when none does."""
    total = 0
    best: Member | None = None
    for member in members:
        if not member.accepts_new:
            continue
        member.current_weight += member.weight
        total += member.weight
        if best is None or member.current_weight > best.current_weight:
            best = member
    if best is not None:
        best.current_weight -= total
    return best


def _rendezvous_score(key: str, member: Member) -> float:
    """Weighted rendezvous (highest random weight) score; identical in every process."""
    if member.weight <= 0:
        return -math.inf
    digest = hashlib.blake2b(f"{key}\x00{member.name}".encode(), digest_size=8).digest()
    unit = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)  # in (0, 1)
    return -member.weight / math.log(unit)


class Balancer:
    """Every VIP's pool, by VIP name: the one object the monitor and admin API talk to."""

    def __init__(self, pools: Sequence[Pool] = ()) -> None:
        self.pools: dict[str, Pool] = {pool.name: pool for pool in pools}

    def pool(self, vip: str) -> Pool:
        try:
            return self.pools[vip]
        except KeyError:
            raise KeyError(f"no VIP named {vip!r}") from None

    def set_admin_state(self, vip: str, member: str, state: AdminState,
                        stamp: float | None = None) -> None:
        self.pool(vip).set_admin_state(member, state, stamp)

    def set_weight(self, vip: str, member: str, weight: int, stamp: float | None = None) -> None:
        self.pool(vip).set_weight(member, weight, stamp)
