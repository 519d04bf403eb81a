"""Time limits on waits for a link's bytes, kept by one task for all of them (as HAProxy's
timers are): a wait past its limit has its link closed, which ends the wait with
ClosedResourceError, and the waiter, finding its limit `expired`, raises trio.TooSlowError.
Closing is what the waiter does to that link after a timeout anyway.

Why not trio's cancel scopes: a CancelScope with a deadline costs about 53,600 instructions
entered and left, a deadline moved 13,700 (cachegrind); an ITI-18 request waits two or three
times under a limit, and those scopes were 8 % of its instructions (bench/README.md, the
twelfth pass). A limit here costs a heap entry.

A wait whose bytes came as its limit passed (both in one pass of the scheduler) is not cut
off: its link is looked at again GRACE later, and closed then if the wait is still on. A
waiter that takes those bytes and waits again under the same, past deadline is closed at the
task's next look: the grace lengthens a wait by at most GRACE, and only for bytes that came.
"""

from __future__ import annotations

import logging
import math
from heapq import heapify, heappop, heappush

import trio

from gateway.net.link import Link

log = logging.getLogger("medgate.net")

GRACE = 0.5  # seconds a wait whose bytes came as its limit passed gets to read them
PRUNE_AT = 1024  # ended limits kept in the heap before it is rebuilt without them


class Limit:
    """One wait's time limit, given to `Deadlines.end` when the wait is over, however it
    ended; `expired` says the link was closed because the limit passed."""

    __slots__ = ("link", "expired", "graced")

    def __init__(self, link: Link) -> None:
        self.link: Link | None = link  # None once ended or expired
        self.expired = False
        self.graced = False


class Deadlines:
    """The limits of every wait of the VIPs that use them; their task runs in the nursery
    given to `bind` while any limit is in its heap, and is started again by the next one.

    The task wakes at the first deadline in the heap, ended or not: where limits come
    slowly, as each comes due (at most PRUNE_AT in a timeout); where they come fast, the
    heap is rebuilt without the ended ones (PRUNE_AT) long before they come due, and the
    task wakes about once a timeout."""

    def __init__(self) -> None:
        # (deadline, id, limit): the id breaks ties without comparing limits. An ended limit
        # stays until it comes due or the heap is rebuilt (PRUNE_AT): ending is a flag.
        self._heap: list[tuple[float, int, Limit]] = []
        self._ended = 0  # ended limits still in the heap
        self._nursery: trio.Nursery | None = None
        self._running = False
        self._sleep: trio.CancelScope | None = None  # the task's wait for the first deadline
        self._target = math.inf  # when that wait ends

    def bind(self, nursery: trio.Nursery) -> None:
        """Run the task in `nursery` (one that outlives every connection using the limits)."""
        self._nursery = nursery

    def limit(self, link: Link, deadline: float) -> Limit:
        """A limit for a wait on `link` that must end by `deadline` (trio's clock)."""
        limit = Limit(link)
        heappush(self._heap, (deadline, id(limit), limit))
        if deadline < self._target:
            self._target = deadline
            if self._sleep is not None:
                self._sleep.deadline = deadline
            elif not self._running:
                if self._nursery is None:
                    raise RuntimeError("time limits asked for before bind(): no task keeps them")
                self._running = True
                self._nursery.start_soon(self._run)
        return limit

    def end(self, limit: Limit) -> None:
        """The wait under `limit` is over (it may have expired)."""
        if limit.link is not None:
            limit.link = None
            self._ended += 1
            if self._ended >= PRUNE_AT and self._ended * 2 >= len(self._heap):
                self._heap = [entry for entry in self._heap if entry[2].link is not None]
                heapify(self._heap)
                self._ended = 0

    async def _run(self) -> None:
        try:
            while self._heap:
                self._target = self._heap[0][0]
                with trio.CancelScope(deadline=self._target) as self._sleep:
                    await trio.sleep_forever()
                self._sleep = None
                self._expire(trio.current_time())
        finally:
            self._running, self._sleep, self._target = False, None, math.inf

    def _expire(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            limit = heappop(heap)[2]
            link = limit.link
            if link is None:
                self._ended -= 1
                continue
            try:
                if not limit.graced and link.unread() != 0:
                    limit.graced = True  # its bytes are here: the waiter is about to read them
                    heappush(heap, (now + GRACE, id(limit), limit))
                    continue
                limit.link, limit.expired = None, True
                link.close()
            except Exception:  # one link's fault must not stop every limit
                log.exception("a time limit could not close its connection")
