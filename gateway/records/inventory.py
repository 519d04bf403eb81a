"""The interface inventory: per DICOM VIP, every calling AE and source address that sent an
A-ASSOCIATE-RQ, with the called AE titles, SOP classes and transfer syntaxes it proposed, counts,
and when it was first and last seen. No patient data: AE titles, addresses and UIDs of classes.

Kept in memory, bounded, and (with `[gateway] state_dir`) saved as JSON now and then by the
server and at stop, and read back at start, so it survives restarts.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger("medgate.inventory")

MAX_SENDERS = 10_000  # entries kept; past it the one seen longest ago makes room
MAX_VALUES = 256  # distinct called AEs, SOP classes or transfer syntaxes kept per entry
FILE_NAME = "inventory.json"


def _now() -> str:
    return _second(int(time.time()))


@functools.lru_cache(maxsize=1)  # formatted once a second, not once per association
def _second(second: int) -> str:
    return datetime.datetime.fromtimestamp(second, datetime.timezone.utc).isoformat()


@dataclass
class Sender:
    """One calling AE from one address on one VIP."""

    vip: str
    calling_ae: str
    address: str
    associations: int = 0
    rejected: int = 0  # refused by the gateway or a member
    called_aes: dict[str, int] = field(default_factory=dict)
    sop_classes: dict[str, int] = field(default_factory=dict)
    transfer_syntaxes: dict[str, int] = field(default_factory=dict)
    first_seen: str = ""
    last_seen: str = ""


@functools.lru_cache(maxsize=4096)  # the same few classes and syntaxes, association after association
def _uid(value: str) -> str:
    """A UID as sent, or '?' for one that is not (it came off the wire)."""
    return value if len(value) <= 64 and re.fullmatch(r"[0-9.]+", value) else "?"


def _count(counts: dict[str, int], value: str) -> None:
    if value in counts or len(counts) < MAX_VALUES:
        counts[value] = counts.get(value, 0) + 1


class Inventory:
    """Who sends what to each DICOM VIP (see the module)."""

    def __init__(self, folder: str = "") -> None:
        self.path = Path(folder) / FILE_NAME if folder else None
        self.senders: dict[tuple[str, str, str], Sender] = {}
        self.changed = False

    def record(self, vip: str, calling_ae: str, address: str, called_ae: str,
               contexts: list[tuple[str, tuple[str, ...]]], accepted: bool) -> None:
        """One A-ASSOCIATE-RQ: its contexts as (abstract syntax, transfer syntaxes)."""
        key = (vip, calling_ae, address)
        now = _now()
        sender = self.senders.get(key)
        if sender is None:
            if len(self.senders) >= MAX_SENDERS:
                oldest = min(self.senders, key=lambda k: self.senders[k].last_seen)
                del self.senders[oldest]
            sender = self.senders[key] = Sender(vip, calling_ae, address, first_seen=now)
        sender.associations += 1
        sender.rejected += 0 if accepted else 1
        sender.last_seen = now
        _count(sender.called_aes, called_ae)
        for abstract_syntax, transfer_syntaxes in contexts:
            _count(sender.sop_classes, _uid(abstract_syntax))
            for syntax in transfer_syntaxes:
                _count(sender.transfer_syntaxes, _uid(syntax))
        self.changed = True

    def entries(self, vip: str | None = None) -> list[dict]:
        """Plain data, by VIP then calling AE then address."""
        return [asdict(sender) for key, sender in sorted(self.senders.items())
                if vip is None or sender.vip == vip]

    # -- persistence

    def load(self) -> None:
        """Read the saved inventory; a missing file is an empty one, a broken one is logged.
        A new file a crash left half written is removed (the old one is whole)."""
        if self.path is None:
            return
        self.path.with_suffix(".json.new").unlink(missing_ok=True)
        if not self.path.exists():
            return
        try:
            for item in json.loads(self.path.read_text(encoding="utf-8"))["senders"]:
                sender = Sender(**item)
                self.senders[(sender.vip, sender.calling_ae, sender.address)] = sender
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("inventory %s cannot be read (%s): starting a new one", self.path, exc)
            self.senders.clear()

    def save(self) -> None:
        """Write it (to a new file, then renamed over the old one: never half a file)."""
        if self.path is None or not self.changed:
            return
        temporary = self.path.with_suffix(".json.new")
        try:
            temporary.write_text(json.dumps({"saved": _now(), "senders": self.entries()}),
                                 encoding="utf-8")
            os.replace(temporary, self.path)
            self.changed = False
        except OSError as exc:
            log.error("inventory %s cannot be written: %s", self.path, exc.strerror or exc)


__all__ = ["Inventory", "Sender"]
