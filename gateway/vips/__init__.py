"""One module per protocol; each has a VipHandler subclass whose `handle` serves one client."""

from __future__ import annotations

import logging

import trio

from gateway.audit import DISABLED, AuditLog
from gateway.balancer import Member, Pool
from gateway.config import MemberConfig, VipConfig
from gateway.limits import ClientSlot
from gateway.relay import strike, unread_bytes

log = logging.getLogger("medgate.vip")


class VipHandler:
    """What every protocol's VIP holds: its config (replaced on reload), pool and audit log."""

    def __init__(self, vip: VipConfig, pool: Pool, audit: AuditLog = DISABLED) -> None:
        self.pool = pool
        self.audit = audit
        self.reconfigure(vip)

    def reconfigure(self, vip: VipConfig) -> None:
        """Take a reloaded config: new clients use it, live ones finish with what they had."""
        self.vip = vip
        self.members: dict[str, MemberConfig] = {member.name: member for member in vip.members}

    async def handle(self, client: trio.SocketStream, slot: ClientSlot) -> None:
        """Serve one client until it is done, marking its idle waits with `slot.idle`;
        `slot.client` is its address, for the logs."""
        raise NotImplementedError  # pragma: no cover - every protocol defines it

    async def refuse(self, client: trio.SocketStream, client_name: str, why: str) -> None:
        """Over max_clients: answer in the protocol's words (bounded by the caller). Here: the
        close is the answer, as for a TCP VIP."""
        self.pool.refused += 1
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
                    upstream.stream.socket.close()
        self._idle: dict[str, list] = {name: idle.get(name, []) for name in self.members}

    def _reusable(self, member: Member, stream: trio.SocketStream, buffered: int,
                  after: str) -> bool:
        """A pooled connection is clean when nothing is buffered or waiting after the last
        answer. Stray bytes (a member that answers twice, a late answer, a smuggled request's
        answer) would become the next client's answer: the connection is closed and the member
        gets a passive-health strike. A member that closed an idle connection is no fault."""
        waiting = unread_bytes(stream.socket)
        if waiting is None and not buffered:
            return False
        extra = buffered + (waiting or 0)
        if not extra:
            return True
        detail = f"sent {extra} bytes after {after}"
        log.warning("vip=%s member=%s %s: connection closed, not reused", self.vip.name,
                    member.name, detail)
        strike(self.pool, member, detail)
        return False
