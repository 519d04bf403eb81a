"""One module per protocol; each has a VipHandler subclass whose `handle` serves one client."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from gateway.records.audit import DISABLED, AuditLog
from gateway.balancer import Member, Pool
from gateway.config import MemberConfig, VipConfig
from gateway.records.inventory import Inventory
from gateway.records.receipts import Receipts
from gateway.net.link import Link
from gateway.net.limits import ClientSlot
from gateway.net.peer import Peer
from gateway.net.relay import connect, strike
from gateway.net.tls import MemberTls, client_context, server_context
from protocols.proxy import encode_v2

log = logging.getLogger("medgate.vip")


@dataclass(frozen=True)
class Records:
    """What the gateway keeps of the traffic besides the audit log (DICOM: who sends what,
    and a receipt per C-STORE); None where not kept."""

    inventory: Inventory | None = None
    receipts: Receipts | None = None


class VipHandler:
    """What every protocol's VIP holds: its config (replaced on reload), pool and audit log."""

    def __init__(self, vip: VipConfig, pool: Pool, audit: AuditLog = DISABLED,
                 records: Records | None = None) -> None:
        self.pool = pool
        self.audit = audit
        self.records = records or Records()
        self.reconfigure(vip)

    def reconfigure(self, vip: VipConfig) -> None:
        """Take a reloaded config: new clients use it, live ones finish with what they had.
        TLS contexts are built again here, so a reload re-reads certificate files."""
        self.vip = vip
        self.members: dict[str, MemberConfig] = {member.name: member for member in vip.members}
        self.server_tls = server_context(vip.tls) if vip.tls else None
        self.member_tls: dict[str, MemberTls] = {
            member.name: client_context(member.tls, member.address.host)
            for member in vip.members if member.tls}

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
    """A VIP that keeps idle connections to its members for reuse (HL7, XDS).

    `_idle[member]` holds objects with a `.stream`; after a reload those of removed or
    re-addressed members are closed.
    """

    def reconfigure(self, vip: VipConfig) -> None:
        old = getattr(self, "members", {})
        super().reconfigure(vip)
        idle = getattr(self, "_idle", {})
        for name in list(idle):
            if name not in self.members or old[name].address != self.members[name].address:
                for upstream in idle.pop(name):
                    upstream.stream.close()
        self._idle: dict[str, list] = {name: idle.get(name, []) for name in self.members}

    def _clean(self, member: Member, upstream) -> bool:
        """Whether an idle connection may carry the next unit (each protocol says, using
        `_reusable` with what its parser has buffered)."""
        raise NotImplementedError  # pragma: no cover - every pooled protocol defines it

    def _take_idle(self, member: Member, origin: tuple[str, int] | None,
                   now: float | None = None):
        """A fresh, clean idle connection to `member` for a client at `origin` (None unless
        the member gets PROXY headers: such a connection speaks for its client only)."""
        idle = self._idle[member.name]
        now = trio.current_time() if now is None else now
        for upstream in reversed(idle.copy()):  # the most recently used first
            fresh = now - upstream.idle_since < self.vip.server_timeout
            if fresh and upstream.origin != origin:
                continue
            idle.remove(upstream)
            if fresh and self._clean(member, upstream):
                return upstream
            upstream.stream.close()  # idle too long, closed or dirty; unused
        return None

    def _origin(self, member: Member, peer: Peer | None) -> tuple[str, int] | None:
        """The client a pooled connection speaks for: its PROXY header named it, or it was
        opened from its address (transparent); None when it could carry anyone's."""
        if peer and (self.members[member.name].send_proxy or self.vip.transparent):
            return peer.source
        return None

    def _reusable(self, member: Member, stream: Link, buffered: int,
                  after: str) -> bool:
        """A pooled connection is clean when nothing is buffered or waiting after the last
        answer. Stray bytes (a member that answers twice, a late answer, a smuggled request's
        answer) would become the next client's answer: the connection is closed and the member
        gets a passive-health strike. A member that closed an idle connection is no fault."""
        data = stream.data_buffered()  # TLS records already here, decrypted: data or not
        if data is None:
            return False  # the member ended TLS: no fault, not reusable
        buffered += data
        waiting = stream.unread()
        if waiting is None and not buffered:
            return False
        extra = buffered + (waiting or 0)
        if not extra:
            return True
        if stream.encrypted and not buffered:
            # TLS records not yet whole, or still on the socket: a late session ticket is no
            # fault but cannot be told from data without reading it; closing costs a reconnect.
            log.debug("vip=%s member=%s: %d bytes of TLS records after %s: not reused",
                      self.vip.name, member.name, extra, after)
            return False
        detail = f"sent {extra} bytes after {after}"
        log.warning("vip=%s member=%s %s: connection closed, not reused", self.vip.name,
                    member.name, detail)
        strike(self.pool, member, detail)
        return False
