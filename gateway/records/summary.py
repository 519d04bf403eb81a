"""The periodic INFO line per VIP: what each unit's own line (DEBUG) would have said, counted.

One line per VIP and interval, only for VIPs that had traffic, from the balancer's counters:
`vip=hl7 last 60s: 5234 messages (ris1 2617, ris2 2617), 3 retried, 0 refused by the gateway,
bytes_in=... bytes_out=...`.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.balancer import Pool

SUMMARY_EVERY = 60.0  # seconds between summaries
UNITS = {"dicom": "associations", "hl7": "messages", "xds": "requests", "tcp": "connections"}


class TrafficSummary:
    """Counts since the last summary, from the pools' running totals."""

    def __init__(self) -> None:
        self._seen: dict[tuple, int] = {}

    def _delta(self, key: tuple, total: int) -> int:
        previous, self._seen[key] = self._seen.get(key, 0), total
        return max(total - previous, 0)  # a member removed and added again starts at 0

    def lines(self, pools: Sequence[tuple[Pool, str]], interval: float) -> list[str]:
        """One line per pool that had traffic since the last call; `str` is its protocol."""
        out = []
        for pool, protocol in pools:
            name = pool.name
            relayed = self._delta((name, "relayed"), pool.relayed)
            retried = self._delta((name, "retried"), pool.retried)
            refused = self._delta((name, "refused"), pool.refused)
            members, bytes_in, bytes_out = [], 0, 0
            for member in pool.members:
                key = (name, "member:" + member.name)
                members.append((member.name, self._delta(key, member.total)))
                bytes_in += self._delta(key + ("in",), member.bytes_in)
                bytes_out += self._delta(key + ("out",), member.bytes_out)
            if not (relayed or retried or refused):
                continue
            by_member = ", ".join(f"{member} {count}" for member, count in members if count)
            out.append(f"vip={name} last {round(interval, 1):g}s: {relayed} "
                       f"{UNITS.get(protocol, 'units')}{f' ({by_member})' if by_member else ''}, "
                       f"{retried} retried, {refused} refused by the gateway, bytes_in={bytes_in} "
                       f"bytes_out={bytes_out}")
        return out
