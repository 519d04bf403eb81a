"""gateway.net.deadlines: time limits on waits, kept by one task, on trio's MockClock."""

from __future__ import annotations

import logging

import pytest
import trio

from gateway.net.deadlines import GRACE, PRUNE_AT, Deadlines
from tests.helpers.memory_link import MemoryLink, memory_link_pair


async def test_a_wait_past_its_limit_has_its_link_closed_at_the_deadline(autojump_clock):
    async with trio.open_nursery() as nursery:
        deadlines = Deadlines()
        deadlines.bind(nursery)
        near, far = memory_link_pair("member")
        limit = deadlines.limit(near, trio.current_time() + 5)
        started = trio.current_time()
        with pytest.raises(trio.ClosedResourceError):
            await near.receive_some()
        assert trio.current_time() - started == 5
        assert limit.expired and near.closed
        deadlines.end(limit)


async def test_an_ended_limit_closes_nothing_and_the_task_stops_when_none_is_left(
        autojump_clock):
    async with trio.open_nursery() as nursery:  # ends by itself: the task stopped
        deadlines = Deadlines()
        deadlines.bind(nursery)
        near, far = memory_link_pair("client")
        limit = deadlines.limit(near, trio.current_time() + 5)
        far.send_now(b"GET")
        assert await near.receive_some() == b"GET"
        deadlines.end(limit)
        await trio.sleep(10)
        assert not limit.expired and not near.closed
    # and a limit later starts it again
    async with trio.open_nursery() as nursery:
        deadlines.bind(nursery)
        limit = deadlines.limit(near, trio.current_time() + 1)
        await trio.sleep(1)
        await trio.testing.wait_all_tasks_blocked()  # the limits' task, woken at the same time
        assert limit.expired and near.closed


async def test_a_wait_whose_bytes_came_as_its_limit_passed_gets_one_grace(autojump_clock):
    """Bytes that wait unread when the limit passes were for the waiter, which the scheduler
    has not run yet: the link stays open GRACE more, then closes if the wait is still on."""
    async with trio.open_nursery() as nursery:
        deadlines = Deadlines()
        deadlines.bind(nursery)
        near, far = memory_link_pair("client")
        started = trio.current_time()
        limit = deadlines.limit(near, started + 5)
        far.send_now(b"POST")  # there, and nobody reads it
        await trio.sleep(5 + GRACE / 2)
        assert not near.closed and not limit.expired
        await trio.sleep(GRACE / 2)
        await trio.testing.wait_all_tasks_blocked()
        assert near.closed and limit.expired


async def test_an_earlier_limit_wakes_the_task_sooner(autojump_clock):
    async with trio.open_nursery() as nursery:
        deadlines = Deadlines()
        deadlines.bind(nursery)
        idle, _ = memory_link_pair("idle client")
        answer, _ = memory_link_pair("member")
        started = trio.current_time()
        later = deadlines.limit(idle, started + 30)
        await trio.testing.wait_all_tasks_blocked()  # the task sleeps until +30
        sooner = deadlines.limit(answer, started + 5)
        await trio.sleep(5)
        await trio.testing.wait_all_tasks_blocked()
        assert (answer.closed, idle.closed) == (True, False)
        await trio.sleep(25)
        await trio.testing.wait_all_tasks_blocked()
        assert idle.closed and later.expired and sooner.expired


async def test_ended_limits_do_not_pile_up(autojump_clock):
    """Ending is a flag; the heap is rebuilt without the ended ones, so a busy VIP's limits
    (thousands a second, each ending long before its deadline) take bounded memory."""
    async with trio.open_nursery() as nursery:
        deadlines = Deadlines()
        deadlines.bind(nursery)
        near, _ = memory_link_pair("client")
        for _ in range(10 * PRUNE_AT):
            deadlines.end(deadlines.limit(near, trio.current_time() + 30))
            assert len(deadlines._heap) <= 2 * PRUNE_AT
        live = deadlines.limit(near, trio.current_time() + 30)
        await trio.sleep(30)
        await trio.testing.wait_all_tasks_blocked()
        assert live.expired and not deadlines._heap


class _Broken(MemoryLink):
    def unread(self) -> int | None:
        raise RuntimeError("a link at fault")


async def test_one_link_at_fault_does_not_stop_the_others(autojump_clock, caplog):
    caplog.set_level(logging.ERROR, logger="medgate")
    async with trio.open_nursery() as nursery:
        deadlines = Deadlines()
        deadlines.bind(nursery)
        broken, sound = _Broken("broken"), MemoryLink("sound")
        deadlines.limit(broken, trio.current_time() + 1)
        limit = deadlines.limit(sound, trio.current_time() + 2)
        await trio.sleep(2)
        await trio.testing.wait_all_tasks_blocked()
        assert limit.expired and sound.closed
    assert "a time limit could not close its connection" in caplog.text


async def test_a_limit_before_bind_is_refused():
    with pytest.raises(RuntimeError, match="bind"):
        Deadlines().limit(MemoryLink("client"), trio.current_time() + 1)
