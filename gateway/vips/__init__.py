"""One module per protocol; each has a VipHandler subclass whose `handle` serves one client."""

from __future__ import annotations

from gateway.audit import DISABLED, AuditLog
from gateway.balancer import Pool
from gateway.config import MemberConfig, VipConfig


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

    async def handle(self, client) -> None:  # pragma: no cover - every subclass defines it
        raise NotImplementedError


def prune_idle(idle: dict[str, list], old: dict[str, MemberConfig],
               new: dict[str, MemberConfig]) -> dict[str, list]:
    """Pooled member connections after a reload: those of removed or re-addressed members close."""
    for name in list(idle):
        if name not in new or old[name].address != new[name].address:
            for upstream in idle.pop(name):
                upstream.stream.socket.close()
    return {name: idle.get(name, []) for name in new}
