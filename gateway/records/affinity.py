"""What the balancer remembers of its clients, kept in [gateway] state_dir across restarts.

`state_dir/affinity.json` holds, per VIP: its table-persistence entries (a DICOM calling AE's
study affinity among them), its HL7 resend-affinity entries (which member took which message),
and, in failover mode, the member taking the new clients. A gateway that restarts in the middle
of a study sends the rest of it where the first part went, and a message resent after the
restart reaches the member that has it. Each entry keeps its age, so one that would have
expired meanwhile is not taken back. Written every 30 s and at stop (to a new file renamed
over the old one); a file that cannot be read is logged and the gateway starts without it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.balancer import RESEND_KEEP, Balancer
from gateway.recall import fresh_entries

log = logging.getLogger("medgate.affinity")

FILE_NAME = "affinity.json"


@dataclass(frozen=True)
class Taken:
    """What the balancer remembered at one moment (AffinityStore.take): per VIP, its name,
    whether it keeps a persistence table, the table's entries, the deliveries, the active
    member."""

    at: float  # the balancer's clock
    saved_at: float  # the wall clock
    pools: list[tuple[Any, ...]]


class AffinityStore:
    """Saves and loads the balancer's memory of its clients (see the module)."""

    def __init__(self, state_dir: str) -> None:
        self.path = Path(state_dir) / FILE_NAME if state_dir else None

    @staticmethod
    def take(balancer: Balancer, now: float) -> Taken:
        """What the balancer remembers at `now` (its clock), copied in C calls: on the event
        loop, where formatting it would hold every connection (200,000 deliveries took a
        few hundred milliseconds); `document` and `save` may run in a worker thread."""
        return Taken(now, time.time(), [
            (name, pool.persistence_method == "table", *pool.affinity_copy(now), pool.active)
            for name, pool in balancer.pools.items()])

    @staticmethod
    def document(taken: Taken) -> dict:
        """The document to save: each entry with its age at the time it was taken."""
        now, vips = taken.at, {}
        for name, table, sticky, deliveries, active in taken.pools:
            entry: dict[str, object] = {}
            if table:  # an entry used again since it was taken counts as used then
                entry["persistence"] = [
                    [key, kept.member, round(max(0.0, now - kept.last_used), 1)]
                    for key, kept in zip(*sticky)]
            fresh = fresh_entries(zip(*deliveries), now, RESEND_KEEP)
            if fresh:
                entry["deliveries"] = [[f"{unit:016x}", member, round(age, 1)]
                                       for unit, member, age in fresh]
            if active is not None:
                entry["active"] = active
            if entry:
                vips[name] = entry
        return {"saved_at": taken.saved_at, "vips": vips}

    def snapshot(self, balancer: Balancer, now: float) -> dict:
        """The document to save, as of `now` (the balancer's clock), in one step."""
        return self.document(self.take(balancer, now))

    def save(self, taken: Taken) -> None:
        """`document` and `write`: what a worker thread does with what `take` copied."""
        self.write(self.document(taken))

    def write(self, document: dict) -> None:
        """Write a snapshot (to a new file renamed over the old one: never half a file). A
        blocking call: the gateway runs it in a worker thread."""
        if self.path is None:
            return
        temporary = self.path.with_suffix(".json.new")
        try:
            temporary.write_text(json.dumps(document, separators=(",", ":")), encoding="utf-8")
            os.replace(temporary, self.path)
        except OSError as exc:
            log.error("affinity %s cannot be written: %s", self.path, exc.strerror or exc)

    def load(self, balancer: Balancer, now: float) -> int:
        """Take back what was saved, each entry as old as it was plus the time since; returns
        how many entries were taken. Entries of VIPs or members the config no longer has are
        dropped."""
        if self.path is None:
            return 0
        self.path.with_suffix(".json.new").unlink(missing_ok=True)  # half written by a crash
        if not self.path.exists():
            return 0
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
            since = max(0.0, time.time() - float(document["saved_at"]))
            taken = 0
            for name, entry in document["vips"].items():
                pool = balancer.pools.get(name)
                if pool is None:
                    continue
                for key, member, age in entry.get("persistence", []):
                    if float(age) + since <= pool.persistence_timeout:
                        taken += pool.adopt_persistence(str(key), str(member),
                                                        now - float(age) - since)
                for unit, member, age in entry.get("deliveries", []):
                    if float(age) + since <= RESEND_KEEP:
                        taken += pool.adopt_delivery(int(unit, 16), str(member),
                                                     now - float(age) - since)
                if "active" in entry:
                    pool.adopt_active(str(entry["active"]), now)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("affinity %s cannot be read (%s): starting without it", self.path, exc)
            return 0
        if taken:
            log.info("took %d affinity entries back from %s (saved %.0f s ago)", taken,
                     self.path, since)
        return taken
