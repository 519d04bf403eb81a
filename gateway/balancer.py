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
from typing import Any, Callable, Hashable, Sequence

from gateway.privacy import is_hashed
from gateway.recall import Recall


class Health(enum.Enum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


class AdminState(enum.Enum):
    READY = "ready"
    DRAIN = "drain"
    MAINT = "maint"


# The members the hot paths test, as module globals: on Python 3.11 `Health.UP` goes through
# the hook of EnumType.__getattr__, about 1,000 machine instructions where a global is 50
# (a message tests three or four).
_UP, _READY, _MAINT = Health.UP, AdminState.READY, AdminState.MAINT


class Signal(enum.StrEnum):
    """A worker's passive signal about a member, for the leader (Pool.outbox)."""

    FAILURE = "failure"  # report_failure: detail, unit
    UNWELL = "unwell"  # report_status, unwell: detail, unit, source
    SUCCESS = "success"  # report_success
    FINE = "fine"  # report_status, not unwell
    ANSWERED = "answered"  # answered_well


class NoMemberReason(enum.Enum):
    """Why no member could be picked; protocols map these to their own refusals."""

    NONE_HEALTHY = "no member is up"
    ALL_FULL = "every available member is at max_connections"
    ALL_TRIED = "every available member was tried and failed"
    # The client's member (persistence, study affinity) is up and ready but failed this try:
    # the client is refused and retries there, never moved (hold_persisted).
    HELD = "its member is up and keeps it (affinity): refused, not moved"


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
    """A health change worth a log line: member went from `old` to `new` because of `detail`.
    `held`: passive signals would have taken it down, but min_up keeps it up (old == new)."""

    pool: str
    member: str
    old: Health
    new: Health
    detail: str
    held: bool = False


@dataclass(frozen=True)
class Switch:
    """Failover mode: `member` takes the new clients now instead of `previous` (None at
    start), because of `why`."""

    pool: str
    previous: str | None
    member: str
    why: str


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str
    latency: float
    at: float


# The counters a worker's pool reports to the leader, in this order (Pool.counters)
POOL_COUNTERS = ("relayed", "refused", "retried", "held_back")
MEMBER_COUNTERS = ("total", "failed", "bytes_in", "bytes_out")  # after `active`
RESEND_KEEP = 24 * 3600.0  # seconds a delivery is remembered for its resend
COUNTED_UNITS = 1024  # per member: units whose failure already counted (a resend counts once)
UNWELL_SOURCES = 64  # per member: recent (time, source) of statuses that said it is unwell
CHECK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds
HISTORY = 30  # recent points kept per member for the status page: traffic samples, checks


@dataclass(eq=False)  # compared by identity: names are unique within a pool
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
    up_since: float = math.inf  # when its health last became up (failback_after counts from it)
    floor_held: str = ""  # why passive signals would have taken it down, while min_up keeps it
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
    traffic: deque[int] = field(default_factory=lambda: deque(maxlen=HISTORY))
    check_history: deque[float] = field(default_factory=lambda: deque(maxlen=HISTORY))
    _total_sampled: int = 0
    # Units (an HL7 message's sender and control ID) whose failure already counted: a resend
    # of the same unit does not count again. Oldest first, bounded.
    _counted: OrderedDict[Hashable, None] = field(default_factory=OrderedDict)
    _unwell_sources: deque[tuple[float, str]] = field(default_factory=lambda: deque(maxlen=UNWELL_SOURCES))
    # A worker's (`[gateway] workers` > 1), with max_connections: the connections the other
    # workers hold to it, and where this one's count goes (shared memory: the limit is the
    # gateway's, not each worker's)
    held_elsewhere: Callable[[], int] | None = None
    publish_active: Callable[[int], None] | None = None
    # Its part of every rendezvous score (method "hash"): mixed with the key's hash, so that
    # a pick hashes the key once, not once per member.
    rendezvous_seed: int = field(init=False)

    def __post_init__(self) -> None:
        self.rendezvous_seed = stable_hash(self.name)

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
        return 0 < self.max_connections and self._at_limit()

    def _at_limit(self) -> bool:
        held = self.active
        if self.held_elsewhere is not None:
            held += self.held_elsewhere()
        return self.max_connections <= held

    @property
    def accepts_new(self) -> bool:
        """May take a client that has no persistence entry."""
        return (self.health is _UP and self.admin is _READY and self.weight > 0
                and not (self.max_connections and self._at_limit()))  # full, inline

    @property
    def accepts_persisted(self) -> bool:
        """May take a client persisted to it (draining members still serve those)."""
        return (self.health is _UP and self.admin is not _MAINT
                and self.weight > 0 and not self.full)


@dataclass(slots=True)
class _Sticky:
    member: str
    last_used: float
    served: bool = False  # a unit of this key completed on `member` (hold_persisted holds it)


@dataclass
class Pool:
    """The members behind one VIP and the rules for picking one.

    mode "balance": smooth weighted round robin (or least connections) among members that accept
    new clients; mode "failover": the member that is active now, in listed order. When a later
    member has taken over, an earlier one takes new clients back only once it has been up for
    `failback_after` seconds, or, with `failback_manual`, when an operator says so
    (`fail_back`).
    Persistence (both modes): method "table" remembers key -> member for `persistence_timeout`
    seconds after last use; method "hash" picks by weighted rendezvous hashing, the same in
    every process, and keeps the table only so that draining members go on serving keys they
    already had. With `hold_persisted` (DICOM study affinity) a key whose member is up and
    ready but failed this try is refused (NoMemberReason.HELD) rather than moved: it moves only
    once its member is down, drained, in maintenance or weighted 0.
    Passive health (live failures, unwell statuses) marks a member down after `error_limit` in
    a row; statuses only once they came from `status_sources` different sources within
    `status_window`; and never below `min_up` members up (the active checks still can).
    """

    name: str
    members: list[Member]
    mode: str = "balance"
    algorithm: str = "roundrobin"
    persistence_method: str | None = None  # None, "table" or "hash"
    persistence_timeout: float = 3600.0
    persistence_max_entries: int = 1_000_000  # bounds memory under a flood of distinct keys
    hold_persisted: bool = False
    failback_after: float = 0.0  # failover: seconds an earlier member must be up to take over
    failback_manual: bool = False  # failover: only fail_back() hands new clients back
    rise: int = 2
    fall: int = 3
    error_limit: int = 3
    status_sources: int = 1  # different sources of unwell statuses needed to mark a member down
    status_window: float = 600.0  # seconds within which those sources count
    min_up: int = 1  # passive signals never leave fewer members up than this
    resend_memory: int = 0  # units (HL7 messages) whose member is remembered for their resend
    shared: bool = False  # a pair's peers take new table entries and deliveries (new_*)
    # method "table": a key not in the table goes where rendezvous hashing puts it, as with
    # "hash" (a worker's pool: see report_to_leader); False: the balancing decides
    new_keys_by_hash: bool = False
    # method "table": the keys it keeps and tells its peers are this hash of the persistence
    # key (a keyed hash: no PID-3 or AE title in affinity.json or on the wire); None: as given
    key_hash: Callable[[str], str] | None = None
    relayed: int = 0  # associations / messages / requests / connections a member took
    refused: int = 0  # answered by the gateway itself (RJ, NAK, 503, close): nothing could take it
    retried: int = 0  # moved to another member after one failed
    held_back: int = 0  # refused rather than moved: their member is up (hold_persisted)
    active: str | None = None  # failover: the member taking new clients now
    active_since: float = 0.0
    _sticky: OrderedDict[str, _Sticky] = field(default_factory=OrderedDict)
    _new_sticky: set[str] = field(default_factory=set)  # keys to tell the peers (pairs)
    _next_expiry: float = 0.0  # when _remember next drops expired entries
    _rotation: int = 0
    switch: Switch | None = None  # the last change of `active`, until taken (logged)
    _active_changed: bool = False  # `active` changed here since the peers were told
    _deliveries: Recall = field(default_factory=lambda: Recall(0, RESEND_KEEP))
    # A worker's pool (`[gateway] workers` > 1): passive signals go here for the leader, which
    # counts them over all workers and alone takes a member down (see `follow`).
    outbox: list[tuple[Any, ...]] | None = None
    # ... and `news` is told whenever something is queued for others: the leader (a worker's
    # reporter wakes), or a pair's peers (new entries, a failover switch: `tell_news`)
    news: Callable[[], None] | None = None
    _told: set[tuple[str, str]] = field(default_factory=set)  # good news in the outbox
    _by_name: dict[str, Member] = field(init=False, repr=False)  # `members` by name

    def __post_init__(self) -> None:
        self._deliveries.limit = self.resend_memory
        self._by_name = {member.name: member for member in self.members}

    @classmethod
    def from_specs(cls, name: str, specs: Sequence[MemberSpec], **settings: Any) -> Pool:
        members = [Member(s.name, s.weight, s.max_connections, s.weight) for s in specs]
        return cls(name=name, members=members, **settings)

    def reconfigure(self, specs: Sequence[MemberSpec], **settings: Any) -> None:
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
            self._deliveries.forget_member(name)
            if self.active == name:
                self.active = None
        self.members = members
        self._by_name = {member.name: member for member in members}
        for key, value in settings.items():
            setattr(self, key, value)
        self._deliveries.limit = self.resend_memory

    def member(self, name: str) -> Member:
        member = self._named(name)
        if member is None:
            raise KeyError(f"pool {self.name!r} has no member {name!r}")
        return member

    def _named(self, name: str) -> Member | None:
        return self._by_name.get(name)

    # -- picking

    def pick(self, key: str | None = None, now: float = 0.0,
             exclude: frozenset[str] | set[str] = frozenset(),
             among: Sequence[str] | None = None, place: int | None = None) -> Member:
        """Choose a member for a new connection, association or message.

        `key` is the persistence key (source IP, calling AE, patient ID...), `exclude` the members
        already tried for this client, `among` restricts the choice to those member names (routes).
        `place`: the unit's own stable 64-bit hash (an HL7 message's sender and MSH-10), by which
        a worker's pool (new_keys_by_hash) places a unit no persistence key decides, so that
        its resend is placed alike by whichever worker takes it.
        Raises NoMemberAvailable with the reason when none can take it.
        """
        if (not exclude and among is None and self.mode == "balance"
                and self.algorithm == "roundrobin" and not (key is not None
                                                            and self.persistence_method)
                and (place is None or not self.new_keys_by_hash)):
            # The usual pick (no retry, route or persistence): no lists built per message.
            chosen = _smooth_weighted(self.members)
            if chosen is not None:
                return chosen
        candidates = (self.members if not exclude and among is None else  # the usual pick
                      [m for m in self.members
                       if m.name not in exclude and (among is None or m.name in among)])
        persistent = key is not None and self.persistence_method is not None
        kept = chosen = None
        if key is not None and persistent:  # _kept_key, inline: on every message
            kept = (self.key_hash(key) if self.key_hash is not None
                    and self.persistence_method == "table" else key)
            sticky = self._sticky.get(kept)
            if sticky is not None:  # a key seen before (most are new: no call for them)
                chosen = self._persisted(candidates, kept, sticky, now, exclude)
        if chosen is None:
            if self.mode == "failover":
                chosen = self._failover_choice(candidates, now, retry=bool(exclude) or
                                               among is not None)
            else:
                chosen = self._pick_balanced(candidates, key if persistent else (
                    place if self.new_keys_by_hash else None))
        if chosen is None:
            raise NoMemberAvailable(self.name, self._why_none(candidates, exclude))
        if kept is not None:
            self._remember(kept, chosen.name, now)
        return chosen

    def _kept_key(self, key: str) -> str:
        """The table's key for persistence key `key` (hashed for method "table")."""
        if self.key_hash is not None and self.persistence_method == "table":
            return self.key_hash(key)
        return key

    def _persisted(self, candidates: list[Member], key: str, sticky: _Sticky, now: float,
                   exclude: frozenset[str] | set[str]) -> Member | None:
        """The member `key` is persisted to (its table entry `sticky`), when it may take it;
        None to pick afresh. NoMemberAvailable when it must wait for that member
        (hold_persisted)."""
        member = self._named(sticky.member)
        if member is None or now - sticky.last_used > self.persistence_timeout:
            del self._sticky[key]
            return None
        if member in candidates and member.accepts_persisted:
            return member
        if member.health is not _UP or member.admin is _MAINT:
            del self._sticky[key]  # its member went away: pick afresh
            return None
        if (self.hold_persisted and sticky.served and member.admin is AdminState.READY
                and member.weight > 0 and (member.name in exclude or member.full)):
            # Up and ready, but it failed this try or is full: the client retries there later.
            self.held_back += 1
            raise NoMemberAvailable(self.name, NoMemberReason.ALL_FULL if member.full
                                    else NoMemberReason.HELD)
        return None  # drained, weighted 0, or outside `among`: picked afresh

    def _remember(self, key: str, member: str, now: float) -> None:
        if self.shared and self.persistence_method == "table":  # hash: the peers pick alike
            old = self._sticky.get(key)
            if old is None or old.member != member:
                self._new_sticky.add(key)
                if len(self._new_sticky) > self.persistence_max_entries:
                    self._new_sticky.pop()  # bounded like the table: the peer re-picks that one
                if self.news is not None:
                    self.news()
        self._store(key, member, now)
        if now >= self._next_expiry:  # a pass a second at most: the size cap holds meanwhile
            self._next_expiry = now + 1.0
            self.expire(now)

    def _store(self, key: str, member: str, now: float, served: bool = False) -> None:
        # Least recently used first, so expiry and the size cap only ever look at the front.
        entry = self._sticky.get(key)
        if entry is None:
            self._sticky[key] = _Sticky(member, now, served)  # a new key goes last already
        else:
            if entry.member == member:  # the usual case: refreshed
                entry.last_used = now
                entry.served = entry.served or served
            else:
                self._sticky[key] = _Sticky(member, now, served)
            self._sticky.move_to_end(key)
        while len(self._sticky) > self.persistence_max_entries:
            self._sticky.popitem(last=False)

    def _pick_balanced(self, candidates: list[Member], key: str | int | None) -> Member | None:
        if key is not None and (self.persistence_method == "hash" or self.new_keys_by_hash):
            # Weighted rendezvous (highest random weight), the same choice in every process:
            # the highest score among the members that take new clients (the first of
            # equals), without sorting them all. Between equal weights the score grows with
            # the hash, so the hashes are compared as they are (no logarithm a member).
            # A member's hash is the key's, mixed with the member's seed by the splitmix64
            # finalizer (Steele et al., "Fast splittable pseudorandom number generators",
            # OOPSLA 2014), inline: a hash (four calls) for the key, none per member.
            key_hash = key if isinstance(key, int) else stable_hash(key)  # int: hashed already
            best, best_hash = None, 0
            for member in candidates:
                if member.accepts_new:  # a weight above 0
                    digest = key_hash ^ member.rendezvous_seed
                    digest = (digest ^ (digest >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
                    digest = (digest ^ (digest >> 27)) * 0x94D049BB133111EB & _MASK64
                    digest ^= digest >> 31
                    if best is None or (digest > best_hash if member.weight == best.weight else
                                        _rendezvous_score(digest, member.weight)
                                        > _rendezvous_score(best_hash, best.weight)):
                        best, best_hash = member, digest
            return best
        eligible = [m for m in candidates if m.accepts_new]
        if not eligible:
            return None
        if self.algorithm == "leastconn":
            return self._least_connections(eligible)
        return _smooth_weighted(eligible)

    def hash_choice(self, key: str) -> Member | None:
        """The member rendezvous hashing gives `key` now (method "hash"), or None."""
        return (self._pick_balanced(self.members, key) if self.persistence_method == "hash"
                else None)

    def _failover_choice(self, candidates: list[Member], now: float,
                         retry: bool) -> Member | None:
        """The active member, unless an earlier one may take over again (failback); the first
        that accepts new clients when the active one cannot. A retry of one client, or a pick
        within a route, does not change which member is active."""
        accepting = [m for m in candidates if m.accepts_new]
        if not accepting:
            return None
        active = next((m for m in accepting if m.name == self.active), None)
        chosen = accepting[0] if active is None else next(
            m for m in accepting if m is active or self._may_fail_back(m, now))
        if not retry and chosen.name != self.active:
            self._switch_to(chosen, now)
        return chosen

    def _may_fail_back(self, member: Member, now: float) -> bool:
        return not self.failback_manual and now - member.up_since >= self.failback_after

    def _switch_to(self, member: Member, now: float, why: str = "") -> None:
        previous = self._named(self.active) if self.active is not None else None
        if not why:
            if previous is None:
                why = "the first member in order that takes clients"
            elif previous.accepts_new:
                why = (f"failback: up for {now - member.up_since:.0f}s "
                       f"(failback_after {self.failback_after:g}s)")
            else:
                why = f"{previous.name} is {previous.state}"
        self.switch = Switch(self.name, self.active, member.name, why)
        self.active, self.active_since = member.name, now
        self._active_changed = True
        if self.news is not None:
            self.news()

    def take_switch(self) -> Switch | None:
        """The last change of the active member (failover) since the last call, for the log."""
        switch, self.switch = self.switch, None
        return switch

    def fail_back(self, now: float) -> str:
        """An operator's failback (failback = "manual"): new clients go to the first member in
        order that takes them; clients persisted elsewhere stay until their window runs out.
        Returns that member's name; NoMemberAvailable when none takes clients."""
        accepting = [m for m in self.members if m.accepts_new]
        if not accepting:
            raise NoMemberAvailable(self.name, self._why_none(self.members, frozenset()))
        if accepting[0].name != self.active:
            self._switch_to(accepting[0], now, "failback asked by an operator")
        return accepting[0].name

    def failback_at(self, now: float) -> float | None:
        """When (on the `now` clock) an earlier member than the active one takes new clients
        back: now or later; None when none is waiting for it (or failback is manual)."""
        if self.mode != "failover" or self.active is None or self.failback_manual:
            return None
        for member in self.members:
            if member.name == self.active:
                return None
            if member.accepts_new:
                return max(now, member.up_since + self.failback_after)
        return None

    def standby_active(self) -> bool:
        """Failover: a later member than the first in order is taking the new clients."""
        return (self.mode == "failover" and self.active is not None
                and self.active != self.members[0].name)

    def new_active(self) -> str | None:
        """The active member when it changed here since the last call (for the peers)."""
        if not self._active_changed:
            return None
        self._active_changed = False
        return self.active

    def adopt_active(self, member: str, now: float) -> bool:
        """A peer's active member (failover): taken, so a node that takes the VIP over does not
        fail back on its own before failback_after (or the operator) says so."""
        if self.mode != "failover" or self._named(member) is None or member == self.active:
            return False
        self.active, self.active_since = member, now
        return True

    def _least_connections(self, eligible: list[Member]) -> Member:
        self._rotation += 1
        count = len(eligible)
        rotated = eligible[self._rotation % count:] + eligible[:self._rotation % count]
        return min(rotated, key=lambda m: m.active / m.weight)

    def _why_none(self, candidates: list[Member],
                  exclude: frozenset[str] | set[str]) -> NoMemberReason:
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

    def adopt_persistence(self, key: str, member: str, now: float, tell: bool = False) -> bool:
        """A peer's entry, or one kept in state_dir: kept as if picked here (not told back to
        the peers); `tell`: a worker's, which the peers hear of (the leader's pool)."""
        if self.persistence_method != "table" or self._named(member) is None:
            return False
        if self.key_hash is not None and not is_hashed(key):
            key = self.key_hash(key)  # an older node's or file's clear key: kept hashed
        self._store(key, member, now, served=True)
        if tell and self.shared:
            self._new_sticky.add(key)
            if self.news is not None:
                self.news()
        return True

    def persistence_entries(self, now: float) -> list[tuple[str, str, float]]:
        """(key, member, seconds since last use) of every live table entry, oldest first
        (kept in state_dir across restarts)."""
        self.expire(now)
        return [(key, entry.member, now - entry.last_used)
                for key, entry in self._sticky.items()]

    # -- resend affinity (HL7: a resent message goes where the first copy went)

    def delivered(self, unit: Hashable, member: str, now: float) -> None:
        """`unit` (an HL7 message: sender and control ID) was written to `member`."""
        self._deliveries.put(unit, member, now, tell=self.shared)

    def resend_member(self, unit: Hashable, now: float) -> str | None:
        """The member that took `unit` before, while it is up and not in maintenance: a resend
        must go there (it can tell a duplicate), whatever the balancing says. None when there
        is none, or it is down: the balancing decides."""
        name = self._deliveries.get(unit, now)
        member = self._named(name) if name is not None else None
        if member is None or member.health is not _UP or (
                member.admin is _MAINT or member.weight <= 0):
            return None
        return name

    def new_deliveries(self) -> list[tuple[Hashable, str]]:
        """The (unit, member) entries made since the last call (for the peers)."""
        return self._deliveries.take_new()

    def adopt_delivery(self, unit: Hashable, member: str, now: float,
                       tell: bool = False) -> bool:
        """A peer's entry, or one kept in state_dir (not told back to the peers; `tell`: a
        worker's, which the peers hear of)."""
        if self.resend_memory <= 0 or self._named(member) is None:
            return False
        self._deliveries.put(unit, member, now, tell=tell and self.shared)
        return True

    def affinity_copy(self, now: float) -> tuple[tuple[list[str], list[_Sticky]],
                                                 tuple[list[Hashable], list[tuple[str, float]]]]:
        """What state_dir keeps, copied in C calls: method "table"'s live entries (keys,
        entries; none for "hash", whose table is not kept) and the remembered deliveries
        (units, (member, at)). The caller reads them in a worker thread: an entry's `member`
        never changes, its `last_used` only grows."""
        table: tuple[list[str], list[_Sticky]] = ([], [])
        if self.persistence_method == "table":
            self.expire(now)
            table = list(self._sticky), list(self._sticky.values())
        return table, self._deliveries.copy()

    def delivery_entries(self, now: float) -> list[tuple[Hashable, str, float]]:
        """(unit, member, seconds since) of every remembered delivery, oldest first."""
        return self._deliveries.entries(now)

    def remembered(self) -> dict[str, int]:
        """How many clients and units are kept on their member: persistence entries, HL7
        deliveries (expired ones until they are next looked at)."""
        return {"persistence_entries": len(self._sticky), "deliveries": len(self._deliveries)}

    def persisted_member(self, key: str) -> str | None:
        entry = self._sticky.get(self._kept_key(key))
        return entry.member if entry else None

    # -- connection accounting

    # -- what became of the units (for the status page, the metrics and the summaries)

    def count_refused(self) -> None:
        """The gateway answered a unit itself (RJ, NAK, 503, close): nothing could take it."""
        self.refused += 1

    def count_retried(self) -> None:
        """A unit moved to another member after one failed."""
        self.retried += 1

    def count_elsewhere(self, name: str, held: Callable[[], int],
                        publish: Callable[[int], None]) -> None:
        """Member `name`'s max_connections counts the connections held to it elsewhere
        (`held`: a worker's, the other workers'), and this pool's go to `publish`."""
        member = self.member(name)
        member.held_elsewhere, member.publish_active = held, publish

    def take_conn(self, member: Member) -> None:
        member.active += 1
        member.total += 1
        if member.publish_active is not None:
            member.publish_active(member.active)

    def drop_conn(self, member: Member, bytes_in: int = 0, bytes_out: int = 0) -> None:
        member.active -= 1
        if member.publish_active is not None:
            member.publish_active(member.active)
        member.bytes_in += bytes_in
        member.bytes_out += bytes_out
        if self.news is not None:  # a worker's counters go soon (`ctl drain --wait` reads them)
            self.news()

    # -- health

    def record_check(self, name: str, ok: bool, detail: str, latency: float,
                     now: float, certificate_expires: float | None = None) -> Transition | None:
        """A health check result; returns the transition when the member's health changed.
        A result for a member the pool no longer has (a reload removed it while its check ran)
        is dropped."""
        member = self._named(name)
        if member is None:
            return None
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
        return self._set_health(member, new, detail if not ok else f"check passed: {detail}",
                                now)

    def report_failure(self, member: Member, detail: str,
                       unit: Hashable | None = None) -> Transition | None:
        """A live connection to this member failed (refused, reset, timeout). `unit` names
        what failed (an HL7 message): a unit that already counted against it counts once."""
        if unit is not None and not self._count_once(member, unit):
            return None
        member.failed += 1
        if self.outbox is not None:
            self._tell(Signal.FAILURE, member, detail, unit)
            return None
        member.live_failures += 1
        if member.health is Health.UP and member.live_failures >= self.error_limit:
            return self._passive_down(
                member, f"{member.live_failures} consecutive live failures, last: {detail}")
        return None

    def report_success(self, member: Member, key: str | None = None,
                       relayed: bool = True) -> None:
        """A live connection to this member worked: it took a unit, counted in `relayed`
        (not for a worker's signal, which the worker counted), for the client with
        persistence `key` (its entry now holds it there, see hold_persisted)."""
        if relayed:
            self.relayed += 1
        member.live_failures = 0
        if member.floor_held:  # tested here: a call less on every unit
            self._release_floor(member)
        if key is not None and self.hold_persisted:
            entry = self._sticky.get(self._kept_key(key))
            if entry is not None and entry.member == member.name:
                entry.served = True
        if self.outbox is not None:
            self._tell_good(Signal.SUCCESS, member)

    def answered_well(self, member: Member, now: float) -> None:
        """Live traffic got a positive answer (an HL7 AA/CA) from `member` at `now`."""
        member.answered_well_at = now
        member.status_failures = 0  # _status_fine, inline: on every message
        if member.floor_held:
            self._release_floor(member)
        if self.outbox is not None:
            self._tell_good(Signal.ANSWERED, member)

    def _status_fine(self, member: Member) -> None:
        """An answer that says the member works: its run of unwell statuses ends."""
        member.status_failures = 0
        self._release_floor(member)

    def _release_floor(self, member: Member) -> None:
        """The min_up hold ends once neither run of passive signals is at error_limit."""
        if member.floor_held and max(member.live_failures,
                                     member.status_failures) < self.error_limit:
            member.floor_held = ""

    def proven_alive(self, name: str, now: float, within: float) -> bool:
        """Up, and answered live traffic positively within the last `within` seconds: a
        heartbeat would tell nothing more (skip_when_live)."""
        member = self.member(name)
        return member.health is Health.UP and now - member.answered_well_at < within

    def report_status(self, member: Member, unwell: bool, detail: str, *, now: float = 0.0,
                      source: str = "", unit: Hashable | None = None) -> Transition | None:
        """A response status from inside a unit (a DIMSE status, an HL7 NAK): one that says
        the member is in trouble counts like a live failure, `error_limit` in a row mark it
        down once they came from `status_sources` different `source`s (calling AEs) within
        `status_window`; a `unit` already counted (a resent message) counts once; any other
        status ends the run. Kept apart from connection outcomes, which succeed meanwhile."""
        if not unwell:
            self._status_fine(member)
            if self.outbox is not None:
                self._tell_good(Signal.FINE, member)
            return None
        if unit is not None and not self._count_once(member, unit):
            return None
        member.failed += 1
        if self.outbox is not None:
            self._tell(Signal.UNWELL, member, detail, unit, source)
            return None
        member.status_failures += 1
        member._unwell_sources.append((now, source))
        if member.health is not Health.UP or member.status_failures < self.error_limit:
            return None
        sources = len({source for at, source in member._unwell_sources
                       if now - at <= self.status_window})
        if sources >= self.status_sources:
            transition = self._passive_down(
                member, f"{member.status_failures} failure statuses in a row"
                        + (f" from {sources} senders" if self.status_sources > 1 else "")
                        + f", last: {detail}")
            if transition is not None and not transition.held:
                member.status_failures = 0
            return transition
        return None

    def _tell(self, signal: Signal, member: Member, *details: Any) -> None:
        """A worker's passive signal, in order, for the leader."""
        assert self.outbox is not None
        self.outbox.append((signal, member.name, *details))
        self._told.difference_update([(Signal.SUCCESS, member.name), (Signal.FINE, member.name),
                                      (Signal.ANSWERED, member.name)])
        if self.news is not None:
            self.news()

    def _tell_good(self, signal: Signal, member: Member) -> None:
        """Good news once per batch and member (a unit a message would flood the leader)."""
        told = (signal, member.name)
        if told not in self._told:
            self._told.add(told)
            assert self.outbox is not None
            self.outbox.append(told)
            if self.news is not None:
                self.news()

    def report_to_leader(self, news: Callable[[], None] | None = None) -> None:
        """This pool is a worker's: its passive signals are the leader's to count (outbox);
        `news` is told whenever a signal or an entry is queued for the leader. A new
        persistence key goes where rendezvous hashing puts it: the other workers learn of a
        table entry only some 150 ms after it is made, and a study's associations opened at
        once, accepted by several workers, went to different members (4 workers, 4
        associations at once: 9 studies of 10 split over two PACS)."""
        self.outbox = []
        self.new_keys_by_hash = True
        self.tell_news(news)

    def tell_news(self, news: Callable[[], None] | None) -> None:
        """`news` is told whenever something is queued for others (see `news`)."""
        self.news = self._deliveries.news = news

    def counters(self) -> dict[str, Any]:
        """A worker's counters, as plain data (the leader sums them: show_counters)."""
        return {"pool": [getattr(self, name) for name in POOL_COUNTERS],
                "members": {m.name: [m.active, *(getattr(m, name) for name in MEMBER_COUNTERS)]
                            for m in self.members}}

    def show_counters(self, counts: dict[str, Any]) -> None:
        """The leader's pool, which relays nothing, shows its workers' counters summed."""
        for name, value in zip(POOL_COUNTERS, counts["pool"]):
            setattr(self, name, value)
        for member in self.members:
            values = counts["members"].get(member.name)
            if values is not None:
                member.active = values[0]
                for name, value in zip(MEMBER_COUNTERS, values[1:]):
                    setattr(member, name, value)

    def take_outbox(self) -> list[tuple[Any, ...]]:
        """A worker's signals since the last call."""
        signals, self.outbox = self.outbox or [], []
        self._told.clear()
        return signals

    def follow(self, name: str, health: Health, detail: str, admin: AdminState, weight: int,
               up_since: float, floor_held: str) -> None:
        """A worker's member takes the leader's word for its health and admin state."""
        member = self._named(name)
        if member is None:
            return
        if member.health is not health:
            self._set_health(member, health, detail, up_since)
        member.health_detail, member.floor_held = detail, floor_held
        if member.admin is not admin:
            self.set_admin_state(name, admin)
        member.weight = weight

    @staticmethod
    def _count_once(member: Member, unit: Hashable) -> bool:
        """Whether `unit` has not counted against `member` yet (and now has)."""
        counted = member._counted
        if unit in counted:
            return False
        counted[unit] = None
        if len(counted) > COUNTED_UNITS:
            counted.popitem(last=False)
        return True

    def _passive_down(self, member: Member, why: str) -> Transition | None:
        """Live failures or statuses would mark `member` down: done, unless that leaves fewer
        than min_up members up; then it stays up and says so (once, until it works again)."""
        others_up = sum(1 for m in self.members if m is not member and m.health is Health.UP
                        and m.admin is AdminState.READY and m.weight > 0)
        if others_up < self.min_up:
            if member.floor_held:
                return None
            member.floor_held = why
            return Transition(self.name, member.name, Health.UP, Health.UP,
                              f"kept up by min_up = {self.min_up} (passive signals never take "
                              f"the VIP below it; its checks still can): {why}", held=True)
        member.check_successes = 0  # must pass `rise` checks again
        return self._set_health(member, Health.DOWN, why)

    def _set_health(self, member: Member, new: Health, detail: str,
                    now: float = math.inf) -> Transition:
        """`now`: when it became up (only the checks bring a member up)."""
        old = member.health
        member.health = new
        member.health_detail = detail
        member.floor_held = ""
        if new is Health.UP:
            member.live_failures = 0
            member.up_since = now
        else:
            member.up_since = math.inf
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


_MASK64 = 2**64 - 1


def _rendezvous_score(digest: int, weight: int) -> float:
    """A member's weighted rendezvous score from the stable hash of its key and name."""
    return -weight / math.log((digest + 1) / (2**64 + 1))  # the hash as a number in (0, 1)


_BLAKE2B_8 = hashlib.blake2b(digest_size=8)  # copied: its parameters are parsed once


def stable_hash(text: str) -> int:
    """A 64-bit hash of `text`, the same in every process, on every node and after a restart
    (Python's hash() of a str is not): blake2b with an 8-byte digest."""
    hasher = _BLAKE2B_8.copy()
    hasher.update(text.encode("utf-8", "surrogateescape"))
    return int.from_bytes(hasher.digest(), "big")


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
