"""Idle connections to a VIP's members, kept for the next unit (an HL7 message, an XDS
request), and the one rule for reusing one: a pooled connection carries the next unit only
when its state is known to be clean.

Stray bytes after the last answer (a member that answers twice, a late answer, a smuggled
request's answer) would become the next client's answer; TLS records not yet whole cannot be
told from data without reading them; a member may have closed the connection while it was
idle, or closes each one after answering (hl7apy's MLLPServer does): a message written to a
connection whose FIN is on its way would be in doubt, so such a member's connections are
learned (`Habit`) and not pooled. No I/O here beyond asking a Link what it holds; the
handler says what a stray answer costs the member (a passive-health strike).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from collections.abc import Callable, Set
from typing import Generic, Protocol, TypeVar

from gateway.net.link import Link

# Idle connections kept per member: enough for 64 senders busy at once on two members (at
# 16, a third of their messages opened a connection of their own and closed one, which
# costs the member an accept and a connection each: bench/README.md), and bounded.
MAX_IDLE = 64
# A member's first connection to be reused waits this long idle first (s): long enough for
# the FIN of a member that closes after answering to arrive, paid once per member.
PROBATION = 0.25


class Pooled(Protocol):
    """What an idle connection carries besides its protocol state."""

    stream: Link
    idle_since: float  # when it went idle (0: never pooled)
    origin: tuple[str, int] | None  # the client it speaks for (PROXY, transparent), or None


class Residue(StrEnum):
    """What a connection holds after its last answer."""

    NOTHING = "nothing"  # clean: reusable
    CLOSED = "closed"  # the member closed it (or ended TLS): no fault, not reusable
    TLS_RECORDS = "TLS records"  # not yet whole: a late session ticket, or data; not reused
    STRAY = "stray bytes"  # data after the answer: the member's fault, not reused


class Habit(StrEnum):
    """What a member does with a connection once it has answered, learned by watching: a
    protocol without a way to say "closing" (MLLP) cannot be told in advance."""

    UNKNOWN = "unknown"  # none of its connections reused yet: the first waits PROBATION
    KEEPS = "keeps"  # a reused connection answered: reused at once from now on
    CLOSES = "closes"  # it closed one right after answering: none is pooled


# Tested on every unit: module globals, as balancer._UP (an enum member costs Python 3.11
# about 1,000 machine instructions through EnumType.__getattr__'s hook).
UNKNOWN_HABIT, KEEPS, CLOSES = Habit.UNKNOWN, Habit.KEEPS, Habit.CLOSES


@dataclass(frozen=True)
class Leftover:
    residue: Residue
    size: int = 0  # bytes, for TLS_RECORDS and STRAY


def leftover(stream: Link, buffered: int) -> Leftover:
    """What `stream` holds after an answer, with `buffered` bytes already read past it by
    the protocol's parser."""
    data = stream.data_buffered()  # TLS records already here, decrypted: data or not
    if data is None:
        return _CLOSED
    buffered += data
    waiting = stream.unread()
    if waiting is None and not buffered:
        return _CLOSED
    extra = buffered + (waiting or 0)
    if not extra:
        return _NOTHING  # the usual answer, at every take of a pooled connection: not made anew
    if stream.encrypted and not buffered:
        return Leftover(Residue.TLS_RECORDS, extra)
    return Leftover(Residue.STRAY, extra)


_NOTHING, _CLOSED = Leftover(Residue.NOTHING), Leftover(Residue.CLOSED)
U = TypeVar("U", bound=Pooled)


class IdlePool(Generic[U]):
    """Each member's idle connections, the most recently used last."""

    def __init__(self, limit: int = MAX_IDLE) -> None:
        self.limit = limit
        self._idle: dict[str, list[U]] = {}
        self._habits: dict[str, Habit] = {}

    def keep_members(self, members: set[str], moved: Set[str] = frozenset()) -> None:
        """After a reload: the connections of members no longer in `members`, or `moved`
        (re-addressed), are closed and their habits forgotten."""
        for name in list(self._idle):
            if name not in members or name in moved:
                for upstream in self._idle.pop(name):
                    upstream.stream.close()
        for name in list(self._habits):
            if name not in members or name in moved:
                del self._habits[name]

    def habit(self, member: str) -> Habit:
        return self._habits.get(member, UNKNOWN_HABIT)

    def learn(self, member: str, habit: Habit) -> bool:
        """Note what `member` was seen to do; True when that is news."""
        known = self._habits.get(member)
        self._habits[member] = habit
        return known is not habit

    def take(self, member: str, origin: tuple[str, int] | None, now: float,
             max_idle: float, clean: Callable[[U], bool]) -> U | None:
        """An idle connection to `member` for a client at `origin` (None unless the member
        gets PROXY headers or the VIP is transparent: such a connection speaks for its client
        only), idle less than `max_idle` seconds and `clean`; the most recently used first.
        What it passes over for age or dirt is closed."""
        idle = self._idle.get(member)
        if not idle:
            return None
        index = len(idle)
        while index:  # from the end, by index: no copy of the list, no search to remove
            index -= 1
            upstream = idle[index]
            fresh = now - upstream.idle_since < max_idle
            if fresh and upstream.origin != origin:
                continue
            del idle[index]
            if fresh and clean(upstream):
                return upstream
            upstream.stream.close()  # idle too long, closed or dirty; unused
        return None

    def put(self, member: str, upstream: U, now: float) -> None:
        """Keep `upstream` (clean after its answer, as the caller checked) from `now` on; it is
        closed instead when the member has `limit` idle already, or closes its own after
        answering."""
        idle = self._idle.setdefault(member, [])
        if len(idle) >= self.limit or self._habits.get(member) is CLOSES:
            upstream.stream.close()
            return
        upstream.idle_since = now
        idle.append(upstream)

    def count(self, member: str) -> int:
        return len(self._idle.get(member, ()))
