"""gateway.net.relay.Splice over memory links on trio's MockClock: how a relayed connection
ends, and what each side is told, decided exactly at its idle timeout."""

from __future__ import annotations

import trio
import trio.testing

from gateway.net.relay import Splice, SpliceEnd, Traffic
from tests.helpers.memory_link import MemoryLink, memory_link_pair


class _Told(Splice):
    """A splice that says goodbye to the side left (as DICOM's A-ABORT) and ends once a
    chunk reading b"DONE" has gone through (as DICOM's release answered)."""

    def observe(self, source: str, chunk: bytes | bytearray) -> None:
        if chunk == b"DONE":
            self.complete = True

    def farewell(self, ended: str, why: str) -> bytes:
        return b"BYE"


def _splice(cls: type[Splice] = Splice) -> tuple[Splice, MemoryLink, MemoryLink]:
    """A splice between a client and a member; (splice, the client's end, the member's)."""
    client, client_far = memory_link_pair("client")
    member, member_far = memory_link_pair("member")
    return cls(client_far, member, 30.0, Traffic()), client, member_far


async def _read_all(link: MemoryLink) -> bytes:
    data = b""
    while chunk := await link.receive_some():
        data += chunk
    return data


async def test_a_silent_connection_ends_at_its_idle_timeout_and_both_sides_are_told(
        autojump_clock):
    splice, client, member = _splice(_Told)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, b"hello")
        started = trio.current_time()
        assert await splice.run() == (SpliceEnd.IDLE, "idle timeout after 30s")
        assert trio.current_time() - started == 30.0
        splice.client.close()
        splice.member.close()
        assert await _read_all(member) == b"helloBYE"
        assert await _read_all(client) == b"BYE"
    assert splice.traffic.from_client == 5


async def test_traffic_moves_the_idle_timeout_on(autojump_clock):
    splice, client, member = _splice()

    async def chatty() -> None:
        for _ in range(3):
            await trio.sleep(20)
            await client.send_all(b"x")
        await client.send_eof()
        assert await _read_all(member) == b"xxx"
        await member.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(chatty)
        started = trio.current_time()
        assert (await splice.run())[0] is SpliceEnd.CLOSED  # both closed: not idle
        assert trio.current_time() - started == 60.0


async def test_a_complete_exchange_ends_at_once_and_is_not_an_idle_timeout(autojump_clock):
    splice, client, member = _splice(_Told)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_all, b"DONE")
        started = trio.current_time()
        assert (await splice.run())[0] is SpliceEnd.CLOSED
        assert trio.current_time() == started
        assert member.unread() == 4  # forwarded, no goodbye


async def test_a_side_that_breaks_is_reported_and_the_other_told(autojump_clock):
    splice, client, member = _splice(_Told)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(member.aclose)
        end, detail = await splice.run()
        assert end is SpliceEnd.MEMBER and detail.startswith("member closed")
        splice.client.close()
        assert await _read_all(client) == b"BYE"
