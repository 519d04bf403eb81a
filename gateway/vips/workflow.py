"""Workflow affinity for DICOM VIPs: MPPS (N-CREATE, then N-SET on a later association) must
reach the member that got the N-CREATE; a storage commitment request (N-ACTION) the member that
stored the images.

The gateway never answers an A-ASSOCIATE-RQ itself, so it must choose the member before it sees
any DIMSE command: an association that proposes only MPPS (Verification may be beside it) goes
to the member that took this calling AE's last MPPS N-CREATE, one that proposes only Storage
Commitment to the member that took its last C-STORE; when that member cannot take it, the
modality gets a transient reject and retries later rather than reaching a member that never saw
its work. Which member created which MPPS instance is kept too, so an N-SET that still reaches
another one (the memory expired, a reload) is logged. Bounded and time-limited; pure (times are
passed in).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gateway.recall import Recall, made_at, told

MPPS = "1.2.840.10008.3.1.2.3.3"  # Modality Performed Procedure Step SOP Class
COMMITMENT = "1.2.840.10008.1.20.1"  # Storage Commitment Push Model SOP Class
VERIFICATION = "1.2.840.10008.1.1"
KEEP_FOR = 24 * 3600.0  # seconds: a procedure step runs for hours, not days
MAX_ENTRIES = 100_000  # instances, and calling AEs, remembered per VIP


class WorkflowAffinity:
    """Which member took each calling AE's and each MPPS instance's N-CREATE (see the module)."""

    def __init__(self) -> None:
        self._by_calling = Recall(MAX_ENTRIES, KEEP_FOR)
        self._by_instance = Recall(MAX_ENTRIES, KEEP_FOR)
        self._stores_by_calling = Recall(MAX_ENTRIES, KEEP_FOR)
        self.shared = False  # a worker's (`[gateway] workers`): new entries go to the others

    def share(self, news: Callable[[], None]) -> None:
        """A worker's: new entries go to the others, `news` told of each."""
        self.shared = True
        for table in self._tables().values():
            table.news = news

    def _tables(self) -> dict[str, Recall]:
        return {"mpps": self._by_calling, "instances": self._by_instance,
                "stores": self._stores_by_calling}

    def take_new(self) -> dict[str, list[tuple[str, str]]]:
        """A worker's entries since the last call, by table (empty tables left out)."""
        new = {name: table.take_new() for name, table in self._tables().items()}
        return {name: entries for name, entries in new.items() if entries}  # type: ignore[misc]

    def entries(self, now: float) -> dict[str, list[list[Any]]]:
        """Every fresh entry, by table, with its age (what a worker that starts is told)."""
        return {name: [told(*entry) for entry in table.entries(now)]
                for name, table in self._tables().items()}

    def adopt(self, entries: dict[str, list[list[Any]]], now: float, tell: bool = False) -> None:
        """Another worker's entries (`tell`: the leader's, which passes them on), each
        [key, member] (made now) or [key, member, age] (a starting worker's)."""
        tables = self._tables()
        for name, held in entries.items():
            if name in tables:
                for key, member, *age in held:
                    tables[name].put(key, member, made_at(now, age), tell=tell)

    @staticmethod
    def kind(sop_classes: list[str]) -> str | None:
        """'mpps' or 'commitment' for an association proposing only that workflow class
        (and Verification), else None."""
        for kind, sop_class in (("mpps", MPPS), ("commitment", COMMITMENT)):
            if sop_class in sop_classes and set(sop_classes) <= {sop_class, VERIFICATION}:
                return kind
        return None

    def member_for(self, kind: str, calling_ae: str, now: float) -> str | None:
        """The member this calling AE's `kind` association must reach, if one is remembered."""
        table = self._by_calling if kind == "mpps" else self._stores_by_calling
        return table.get(calling_ae, now)

    def stored(self, calling_ae: str, member: str, now: float) -> None:
        """A C-STORE from `calling_ae` that `member` took (for its storage commitment)."""
        self._stores_by_calling.put(calling_ae, member, now, tell=self.shared)

    def created_on(self, instance: str, now: float) -> str | None:
        return self._by_instance.get(instance, now)

    def created(self, calling_ae: str, instance: str, member: str, now: float) -> None:
        """An MPPS N-CREATE that `member` accepted."""
        for table, key in ((self._by_calling, calling_ae), (self._by_instance, instance)):
            if key:
                table.put(key, member, now, tell=self.shared)

    def forget_member(self, member: str) -> None:
        """A member removed from the VIP (reload): nothing may wait for it any more."""
        for table in (self._by_calling, self._by_instance, self._stores_by_calling):
            table.forget_member(member)
