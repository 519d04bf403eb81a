"""One module per protocol; each has a VipHandler subclass whose `handle` serves one client."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import trio

from gateway.records.audit import DISABLED, AuditLog
from gateway.balancer import Member, Pool
from gateway.config import MemberConfig, VipConfig
from gateway.records.inventory import Inventory
from gateway.records.receipts import Receipts
from gateway.records.shadow import ShadowLog
from gateway.net.channel import Channel
from gateway.net.deadlines import Deadlines
from gateway.net.link import Link
from gateway.net.limits import ClientSlot
from gateway.net.peer import Peer
from gateway.net.relay import connect, strike
from gateway.net.tls import MemberTls, client_context, server_context
from gateway.vips.idle_pool import IdlePool, Leftover, Residue, leftover
from gateway.vips.shadow import Copy, Shadow
from protocols.proxy import encode_v2

log = logging.getLogger("medgate.vip")


@dataclass(frozen=True)
class Records:
    """What the gateway keeps of the traffic besides the audit log (DICOM: who sends what,
    and a receipt per C-STORE); None where not kept."""

    inventory: Inventory | None = None
    receipts: Receipts | None = None
    shadows: ShadowLog | None = None  # the differences shadow members showed


class VipHandler:
    """What every protocol's VIP holds: its config (replaced on reload), pool and audit log."""

    shadow_type: type[Shadow] | None = None  # a protocol that copies units to shadow members

    def __init__(self, vip: VipConfig, pool: Pool, audit: AuditLog = DISABLED,
                 records: Records | None = None) -> None:
        self.pool = pool
        self.audit = audit
        self.records = records or Records()
        # Work that outlives a client's connection (copies to shadow members) runs here: the
        # gateway's services nursery, set when it serves
        self.background: trio.Nursery | None = None
        # Time limits on the waits of its connections (the XDS VIP's): the gateway's one
        # set, bound to a nursery that outlives the connections, when it serves
        self.deadlines = Deadlines()
        self.reconfigure(vip)

    def reconfigure(self, vip: VipConfig) -> None:
        """Take a reloaded config: new clients use it, live ones finish with what they had.
        TLS contexts are built again here, so a reload re-reads certificate files."""
        self.vip = vip
        # Shadows are reached as members are (their TLS, connect timeout), never picked
        self.members: dict[str, MemberConfig] = {member.name: member
                                                 for member in (*vip.members, *vip.shadows)}
        self.server_tls = server_context(vip.tls) if vip.tls else None
        self.member_tls: dict[str, MemberTls] = {
            member.name: client_context(member.tls, member.address.host)
            for member in self.members.values() if member.tls}
        self._reconfigure_shadows(vip)

    def _reconfigure_shadows(self, vip: VipConfig) -> None:
        """Shadow members as the config says; a kept one keeps its counts and queue."""
        before: dict[str, Shadow] = getattr(self, "shadows", {})
        self.shadows: dict[str, Shadow] = {}
        for config in vip.shadows:
            assert self.shadow_type is not None  # the config loader allows shadows there only
            shadow = before.pop(config.name, None) or self.shadow_type(
                vip.name, config, lambda name: self.open_member(name, None),
                self.records.shadows)
            shadow.config, shadow.ack_timeout = config, vip.ack_timeout
            shadow.copies_everything = vip.shadow_writes or vip.shadow_side_effects
            self.shadows[config.name] = shadow
        for gone in before.values():
            gone.on = False  # its task stops after the copy under way
            gone.close()

    def _to_shadows(self, copy: Copy, shadows: Iterable[Shadow] | None = None) -> None:
        """A unit, answered (the client has its answer), to the queue of each of `shadows`
        (all of this VIP's by default); none before the gateway serves."""
        background = self.background
        if background is None:
            return
        for shadow in self.shadows.values() if shadows is None else shadows:
            shadow.offer(background, copy)

    async def open_member(self, name: str, peer: Peer | None) -> Link:
        """A connection to member `name` with its TLS and PROXY settings; MemberFailed if not."""
        config = self.members[name]
        header = encode_v2(peer.source, peer.local) if config.send_proxy and peer else b""
        source = peer.source if self.vip.transparent and peer else None
        return await connect(config.address, self.vip.connect_timeout,
                             tls=self.member_tls.get(name), proxy_header=header, source=source)

    async def handle(self, client: Link, slot: ClientSlot) -> None:
        """Serve one client until it is done, marking its idle waits with `slot.idle`;
        `slot.client` is its address, for the logs, `slot.peer` what else is known of it."""
        raise NotImplementedError  # pragma: no cover - every protocol defines it

    async def refuse(self, client: Link, client_name: str, why: str) -> None:
        """Over max_clients: answer in the protocol's words (bounded by the caller). Here: the
        close is the answer, as for a TCP VIP."""
        self.pool.count_refused()
        log.warning("vip=%s client=%s refused, closed: %s", self.vip.name, client_name, why)


class PooledVipHandler(VipHandler):
    """A VIP that keeps idle connections to its members for reuse (HL7, XDS) in `idle`; after
    a reload those of removed or re-addressed members are closed."""

    def reconfigure(self, vip: VipConfig) -> None:
        old = getattr(self, "members", {})
        super().reconfigure(vip)
        if not hasattr(self, "idle"):
            self.idle: IdlePool = IdlePool()
        self.idle.keep_members(set(self.members), {
            name for name, member in old.items()
            if name in self.members and member.address != self.members[name].address})

    def _clean(self, member: Member, upstream) -> bool:
        """Whether an idle connection may carry the next unit (each protocol says, using
        `_reusable` with what its parser has buffered)."""
        raise NotImplementedError  # pragma: no cover - every pooled protocol defines it

    def _take_idle(self, member: Member, origin: tuple[str, int] | None,
                   now: float | None = None):
        """A fresh, clean idle connection to `member` for a client at `origin`, or None."""
        return self.idle.take(member.name, origin,
                              trio.current_time() if now is None else now,
                              self.vip.server_timeout, partial(self._clean, member))

    def _origin(self, member: Member, peer: Peer | None) -> tuple[str, int] | None:
        """The client a pooled connection speaks for: its PROXY header named it, or it was
        opened from its address (transparent); None when it could carry anyone's."""
        if peer and (self.members[member.name].send_proxy or self.vip.transparent):
            return peer.source
        return None

    def _reusable(self, member: Member, stream: Link, buffered: int,
                  after: str) -> bool:
        """Whether the connection holds nothing after the last answer (`after`); stray bytes
        are logged and cost the member a passive-health strike (idle_pool says why)."""
        if not buffered and type(stream) is Channel and stream.unread() == 0:
            return True  # the usual answer, at every take: one look at the socket, no leftover
        left = leftover(stream, buffered)
        return left.residue is Residue.NOTHING or self._judge_leftover(member, left, after)

    def _judge_leftover(self, member: Member, left: Leftover, after: str) -> bool:
        """Whether `left` allows reuse; stray bytes are logged and struck (see `_reusable`)."""
        if left.residue is Residue.TLS_RECORDS:
            log.debug("vip=%s member=%s: %d bytes of TLS records after %s: not reused",
                      self.vip.name, member.name, left.size, after)
        elif left.residue is Residue.STRAY:
            detail = f"sent {left.size} bytes after {after}"
            log.warning("vip=%s member=%s %s: connection closed, not reused", self.vip.name,
                        member.name, detail)
            strike(self.pool, member, detail)
        return left.residue is Residue.NOTHING
