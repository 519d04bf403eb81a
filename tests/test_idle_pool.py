"""The idle pool's rule: a pooled connection carries the next unit only when its state is known
to be clean, fresh, and for the same client where it speaks for one. Over memory links."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.vips.idle_pool import IdlePool, Leftover, Residue, leftover
from tests.helpers.memory_link import MemoryLink, memory_link_pair


@dataclass(eq=False)
class Up:
    stream: MemoryLink
    idle_since: float = 0.0
    origin: tuple[str, int] | None = None


def connection(origin: tuple[str, int] | None = None) -> tuple[Up, MemoryLink]:
    ours, member = memory_link_pair("to a member")
    return Up(ours, origin=origin), member


def clean(upstream: Up) -> bool:
    return leftover(upstream.stream, 0).residue is Residue.NOTHING


async def test_the_most_recent_clean_connection_is_taken_and_the_stale_ones_closed():
    pool: IdlePool[Up] = IdlePool()
    old, _ = connection()
    recent, _ = connection()
    pool.put("ris1", old, now=0.0)
    pool.put("ris1", recent, now=50.0)
    assert pool.take("ris1", None, now=65.0, max_idle=60.0, clean=clean) is recent
    # idle 65 s of the 60 allowed: closed, never reused
    assert pool.take("ris1", None, now=65.0, max_idle=60.0, clean=clean) is None
    assert old.stream.closed and pool.count("ris1") == 0


async def test_a_connection_with_stray_bytes_or_closed_by_its_member_is_closed_not_reused():
    pool: IdlePool[Up] = IdlePool()
    stray, stray_member = connection()
    closed, closed_member = connection()
    await stray_member.send_all(b"MSA|AA|late answer")  # a late answer to the last message
    await closed_member.aclose()
    assert leftover(stray.stream, 0) == Leftover(Residue.STRAY, 18)
    assert leftover(closed.stream, 0) == Leftover(Residue.CLOSED)
    assert leftover(closed.stream, 3) == Leftover(Residue.STRAY, 3)  # the parser's leftovers
    tls, tls_member = connection()
    tls.stream.encrypted = True  # as TlsChannel: records on the socket may be a session ticket
    await tls_member.send_all(b"\x16\x03\x03")
    assert leftover(tls.stream, 0) == Leftover(Residue.TLS_RECORDS, 3)
    pool.put("ris1", stray, now=0.0)
    pool.put("ris1", closed, now=1.0)
    assert pool.take("ris1", None, now=2.0, max_idle=60.0, clean=clean) is None
    assert stray.stream.closed and closed.stream.closed


async def test_a_connection_that_speaks_for_one_client_serves_that_client_only():
    pool: IdlePool[Up] = IdlePool()
    for_a, _ = connection(origin=("10.0.0.1", 4000))
    pool.put("pacs1", for_a, now=0.0)
    assert pool.take("pacs1", ("10.0.0.2", 4000), 1.0, 60.0, clean) is None
    assert not for_a.stream.closed  # kept for its own client
    assert pool.take("pacs1", None, 1.0, 60.0, clean) is None
    assert pool.take("pacs1", ("10.0.0.1", 4000), 1.0, 60.0, clean) is for_a


async def test_the_pool_is_bounded_and_a_reload_closes_what_removed_or_moved_members_held():
    pool: IdlePool[Up] = IdlePool(limit=2)
    kept = [connection()[0] for _ in range(3)]
    for upstream in kept:
        pool.put("ris1", upstream, now=0.0)
    assert pool.count("ris1") == 2 and kept[2].stream.closed  # over the limit: closed
    other, _ = connection()
    moved, _ = connection()
    pool.put("ris2", other, now=0.0)
    pool.put("ris3", moved, now=0.0)
    pool.keep_members({"ris1", "ris3"}, moved={"ris3"})
    assert other.stream.closed and moved.stream.closed
    assert (pool.count("ris1"), pool.count("ris2"), pool.count("ris3")) == (2, 0, 0)
