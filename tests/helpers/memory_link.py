"""A memory double of gateway.net.link.Link, and VIP handlers served over it: no sockets, so a
test runs on trio's MockClock (a VIP's 30 s timeouts cost no wall-clock time).

The double behaves as a TCP connection does where the VIPs can tell: bytes arrive in order,
in chunks of at most `max_bytes`; `send_eof` is a FIN (the peer reads b"" once the rest is
read); `close` is an abrupt close (the peer reads what was sent, then b"", and its sends
fail with BrokenResourceError); `unread` peeks as the socket's ioctl does. An end given an
`inbox_limit` is a peer that reads slowly or not at all: sends to it wait while that many bytes
are unread, as they do once a socket's buffers are full.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

import trio
from trio.lowlevel import ParkingLot, checkpoint

from gateway.balancer import Pool
from gateway.config import parse_config
from gateway.net.limits import ClientSlot, Evicted
from gateway.net.link import Link
from gateway.net.peer import Peer
from gateway.net.relay import MemberFailed
from gateway.service.server import build_pool
from gateway.vips import VipHandler

READ_SIZE = 65536


class MemoryLink(trio.abc.HalfCloseableStream, Link):
    """One end of a connection held in memory; `memory_link_pair` makes the two ends."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.peer: MemoryLink | None = None
        self._inbox = bytearray()
        self._ended = False  # the peer sent its FIN, or closed
        self._sent_eof = False
        self._closed = False
        self._arrived = ParkingLot()
        self.inbox_limit: int | None = None  # unread bytes past which sends here wait
        self._drained = ParkingLot()

    def __repr__(self) -> str:
        return f"<MemoryLink {self.name}>"

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await checkpoint()
        while True:
            if self._closed:
                raise trio.ClosedResourceError(f"{self.name} was closed")
            if self._inbox:
                data = bytes(self._inbox[:max_bytes or READ_SIZE])
                del self._inbox[:len(data)]
                self._drained.unpark_all()
                return data
            if self._ended:
                return b""
            await self._arrived.park()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await checkpoint()
        rest = bytes(data)
        while rest := rest[self.send_now(rest):]:
            assert self.peer is not None
            await self.peer._drained.park()

    def send_now(self, data: bytes | bytearray | memoryview) -> int:
        if self._closed or self._sent_eof:
            raise trio.ClosedResourceError(f"{self.name} was closed for sending")
        peer = self.peer
        assert peer is not None
        if peer._closed:
            raise trio.BrokenResourceError(f"{peer.name} has closed: connection reset")
        taken = (len(data) if peer.inbox_limit is None
                 else max(0, min(len(data), peer.inbox_limit - len(peer._inbox))))
        peer._inbox += data[:taken]
        peer._arrived.unpark_all()
        return taken

    async def wait_send_all_might_not_block(self) -> None:
        await checkpoint()

    async def send_eof(self) -> None:
        await checkpoint()
        self._sent_eof = True
        self._end_peer()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._arrived.unpark_all()  # a task waiting here gets ClosedResourceError
            self._drained.unpark_all()  # a peer's send waiting here gets BrokenResourceError
            self._end_peer()
            assert self.peer is not None
            self.peer._drained.unpark_all()  # a send of this end's gets ClosedResourceError

    async def aclose(self) -> None:
        self.close()
        await checkpoint()

    def unread(self) -> int | None:
        if self._closed or (self._ended and not self._inbox):
            return None
        return len(self._inbox)

    def data_buffered(self) -> int | None:
        return 0

    @property
    def closed(self) -> bool:
        """This end was closed (what a test asks of the gateway's end)."""
        return self._closed

    def _end_peer(self) -> None:
        assert self.peer is not None
        self.peer._ended = True
        self.peer._arrived.unpark_all()


def memory_link_pair(name: str) -> tuple[MemoryLink, MemoryLink]:
    """Two joined ends: what one sends, the other receives."""
    near, far = MemoryLink(f"{name} (near)"), MemoryLink(f"{name} (far)")
    near.peer, far.peer = far, near
    return near, far


Member = Callable[[MemoryLink], Awaitable[None]]  # serves one connection from the gateway


def memory_vip(handler_class: type[VipHandler], config_text: str,
               members: Mapping[str, Member | None], nursery: trio.Nursery) -> VipHandler:
    """The config's first VIP as a `handler_class`, every member up, whose connections to
    member `name` are served by `members[name]` in `nursery` (None: the connect is refused).
    `handler.opened` counts the connections per member."""
    vip = parse_config(config_text).vips[0]
    pool: Pool = build_pool(vip)
    for member in vip.members:
        pool.record_check(member.name, True, "a memory member", 0.0, trio.current_time())
    handler = handler_class(vip, pool)
    handler.deadlines.bind(nursery)
    opened: dict[str, int] = {name: 0 for name in members}

    async def open_member(name: str, peer: Peer | None) -> Link:
        serve = members[name]
        if serve is None:
            raise MemberFailed(f"connect to {name}: connection refused")
        opened[name] += 1
        ours, theirs = memory_link_pair(f"gateway to {name}")
        nursery.start_soon(serve, theirs)
        return ours

    handler.open_member = open_member  # type: ignore[method-assign]
    handler.opened = opened  # type: ignore[attr-defined]
    return handler


def connect_client(handler: VipHandler, nursery: trio.Nursery,
                   address: tuple[str, int] = ("198.51.100.7", 40000),
                   slot: ClientSlot | None = None) -> MemoryLink:
    """A client connection to `handler`, served in `nursery` as the gateway serves one (in
    `slot`, if given: a test may evict it); the client's end."""
    client, served = memory_link_pair(f"client {address[0]}:{address[1]}")
    slot = slot or ClientSlot(f"{address[0]}:{address[1]}")
    slot.peer = Peer(address[0], address[1], ("192.0.2.1", 2575))

    async def serve() -> None:
        try:
            await handler.handle(served, slot)
        except Evicted:
            pass  # as admission takes it: logged where it was decided
        finally:
            served.close()  # as admission does once a handler is done

    nursery.start_soon(serve)
    return client
