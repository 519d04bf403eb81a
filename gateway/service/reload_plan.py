"""What a reload changes, worked out before anything changes: a pure diff of two configs and
the listeners open now (no I/O), which `Gateway.reload` then applies."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace

from gateway.config import Address, Config, GatewaySettings, VipConfig
from gateway.service.listeners import ListenKey, wanted_keys

# [gateway] keys read once, at start: a reload keeps the running values (and says so). Each
# is held by something made once per process: the admin server's socket, the worker
# processes, the receipts and hash key in state_dir, the ATNA sender, the peers' links, the
# log handler. Every other key (the audit log's path included) takes effect at the reload.
AT_RESTART = ("admin", "workers", "state_dir", "hash_key_file", "receipt_days",
              "receipt_hash_uids", "atna", "peers", "log_format", "log_level")
# Of those, what a worker reads itself (the others are the leader's, or told in its hello)
WORKER_AT_RESTART = ("state_dir", "hash_key_file", "receipt_days", "receipt_hash_uids",
                     "log_format")


@dataclass(frozen=True)
class ReloadPlan:
    reconfigured: tuple[VipConfig, ...]  # same name and protocol: pools and handlers keep state
    replaced: tuple[VipConfig, ...]  # new VIPs, or a protocol changed: a new pool and handler
    removed: tuple[str, ...]  # VIPs no longer in the config
    to_bind: tuple[tuple[str, Address], ...]  # (VIP, address) not listened on yet
    to_close: tuple[ListenKey, ...]  # listeners no VIP wants any more
    kept_for_restart: tuple[str, ...]  # [gateway] keys that take effect only at restart

    def describe(self) -> str:
        """One line for the log: what the reload does to VIPs and listeners."""
        parts = [f"{label} {', '.join(names)}" for label, names in (
            ("reconfigured", [vip.name for vip in self.reconfigured]),
            ("new", [vip.name for vip in self.replaced]), ("removed", list(self.removed)),
            ("new listeners", [str(address) for _, address in self.to_bind]),
            ("closed listeners", [str(address) for _, address in self.to_close])) if names]
        return "; ".join(parts) or "no change to VIPs or listeners"


def plan_reload(old: Config, new: Config, listening: Collection[ListenKey],
                admin_tls_on: bool) -> ReloadPlan:
    """`listening`: the listeners open now; `admin_tls_on`: whether the admin server speaks
    HTTPS now (a reload cannot turn it on or off)."""
    old_vips = {vip.name: vip for vip in old.vips}
    kept = tuple(vip for vip in new.vips if vip.name in old_vips
                 and old_vips[vip.name].protocol == vip.protocol)
    wanted = wanted_keys(new)
    restart = [key for key in AT_RESTART
               if getattr(new.gateway, key) != getattr(old.gateway, key)]
    if bool(new.gateway.admin_tls) != admin_tls_on:
        restart.append("admin_tls")  # on or off; new files for the same are read at once
    return ReloadPlan(
        reconfigured=kept,
        replaced=tuple(vip for vip in new.vips if vip.name not in {v.name for v in kept}),
        removed=tuple(name for name in old_vips if name not in {v.name for v in new.vips}),
        to_bind=tuple(pair for key, pair in wanted.items() if key not in listening),
        to_close=tuple(key for key in listening if key not in wanted),
        kept_for_restart=tuple(restart))


def in_force(running: GatewaySettings, new: GatewaySettings) -> GatewaySettings:
    """The [gateway] settings a reload to `new` runs with: its own, but for AT_RESTART's,
    which stay `running`'s."""
    return replace(new, **{key: getattr(running, key) for key in AT_RESTART})
