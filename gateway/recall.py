"""A bounded, time-limited memory of which member took what. Pure: times are passed in.

The workflow affinity of DICOM VIPs (which member took an MPPS N-CREATE, a calling AE's last
C-STORE) and the resend affinity of HL7 VIPs (which member took each message) are such
memories: at most `limit` entries, each answered for `keep_for` seconds after it was last put,
the oldest put out first when room is needed.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Hashable, Iterable

NEW_KEPT = 10_000  # entries put but not yet taken by the peers (taken every second)


def fresh_entries(pairs: Iterable[tuple[Hashable, tuple[str, float]]], now: float,
                  keep_for: float) -> list[tuple[Hashable, str, float]]:
    """(key, member, seconds since it was put) of the (key, (member, put at)) pairs still
    answered `keep_for` seconds after they were put (Recall.entries, or a copy's)."""
    return [(key, member, now - at) for key, (member, at) in pairs if now - at <= keep_for]


def told(key: Hashable, member: str, age: float) -> list[Any]:
    """An entry as the leader tells a starting worker: with its age, so that it lives there
    what is left of its time (made_at)."""
    return [key, member, round(age, 3)]


def made_at(now: float, age: list[float]) -> float:
    """When an entry another process told as [key, member, *age] was made: now (a worker's,
    made as it reports), or `age` seconds ago (`told`)."""
    return now - age[0] if age else now


class Recall:
    """key -> member name, oldest first (see the module)."""

    def __init__(self, limit: int, keep_for: float) -> None:
        self.limit = limit
        self.keep_for = keep_for
        self._entries: OrderedDict[Hashable, tuple[str, float]] = OrderedDict()
        self._new: dict[Hashable, str] = {}  # put here since the last `take_new` (peers)
        self.news: Callable[[], None] | None = None  # told of each (a worker's reporter)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, now: float) -> str | None:
        """The member `key` was put with, while it is fresh."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now - entry[1] > self.keep_for:
            del self._entries[key]
            return None
        return entry[0]

    def put(self, key: Hashable, member: str, now: float, *, tell: bool = True) -> None:
        """Remember `member` for `key` from `now`; `tell`: for the peers too (take_new)."""
        if self.limit <= 0:
            return
        entries = self._entries
        if key in entries:  # a new key goes last already: the call only for a known one
            entries.move_to_end(key)
        entries[key] = (member, now)
        if len(entries) > self.limit:  # a stale entry is never answered (get): only room counts
            entries.popitem(last=False)
        if tell:
            self._new[key] = member
            if len(self._new) > NEW_KEPT:  # nobody takes them (no peers): the oldest go
                self._new.pop(next(iter(self._new)))
            if self.news is not None:
                self.news()

    def take_new(self) -> list[tuple[Hashable, str]]:
        """What was put since the last call (a pair's peers get it)."""
        new, self._new = self._new, {}
        return list(new.items())

    def copy(self) -> tuple[list[Hashable], list[tuple[str, float]]]:
        """The keys and their (member, put at), stale ones too, oldest first: copied in two
        C calls (no pair made for each, a third of the time), for work elsewhere (a worker
        thread) on what the memory held now."""
        return list(self._entries), list(self._entries.values())

    def entries(self, now: float) -> list[tuple[Hashable, str, float]]:
        """(key, member, seconds since it was put) of every fresh entry, oldest first."""
        return fresh_entries(self._entries.items(), now, self.keep_for)

    def forget_member(self, member: str) -> None:
        """A member removed from the VIP (reload): nothing may wait for it any more."""
        for key in [k for k, (name, _) in self._entries.items() if name == member]:
            del self._entries[key]
