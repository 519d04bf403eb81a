"""Workflow affinity for DICOM VIPs: MPPS (N-CREATE, then N-SET on a later association) must
reach the member that got the N-CREATE.

The gateway never answers an A-ASSOCIATE-RQ itself, so it must choose the member before it sees
any DIMSE command: an association that proposes only workflow SOP classes (MPPS, and
Verification beside it) goes to the member that took this calling AE's last MPPS N-CREATE; when
that member cannot take it, the modality gets a transient reject and retries later rather than
reaching a member that never saw the N-CREATE. Which member created which MPPS instance is kept
too, so an N-SET that still reaches another one (the memory expired, a reload) is logged.
Bounded and time-limited; pure (times are passed in).
"""

from __future__ import annotations

from collections import OrderedDict

MPPS = "1.2.840.10008.3.1.2.3.3"  # Modality Performed Procedure Step SOP Class
VERIFICATION = "1.2.840.10008.1.1"
KEEP_FOR = 24 * 3600.0  # seconds: a procedure step runs for hours, not days
MAX_ENTRIES = 100_000  # instances, and calling AEs, remembered per VIP


class WorkflowAffinity:
    """Which member took each calling AE's and each MPPS instance's N-CREATE (see the module)."""

    def __init__(self) -> None:
        self._by_calling: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._by_instance: OrderedDict[str, tuple[str, float]] = OrderedDict()

    @staticmethod
    def is_workflow(sop_classes: list[str]) -> bool:
        """An association for MPPS only (Verification may be proposed beside it)."""
        return MPPS in sop_classes and set(sop_classes) <= {MPPS, VERIFICATION}

    def member_for(self, calling_ae: str, now: float) -> str | None:
        return self._get(self._by_calling, calling_ae, now)

    def created_on(self, instance: str, now: float) -> str | None:
        return self._get(self._by_instance, instance, now)

    def created(self, calling_ae: str, instance: str, member: str, now: float) -> None:
        """An MPPS N-CREATE that `member` accepted."""
        for table, key in ((self._by_calling, calling_ae), (self._by_instance, instance)):
            if key:
                table[key] = (member, now)
                table.move_to_end(key)
                while len(table) > MAX_ENTRIES:
                    table.popitem(last=False)

    def forget_member(self, member: str) -> None:
        """A member removed from the VIP (reload): nothing may wait for it any more."""
        for table in (self._by_calling, self._by_instance):
            for key in [k for k, (name, _) in table.items() if name == member]:
                del table[key]

    @staticmethod
    def _get(table: OrderedDict, key: str, now: float) -> str | None:
        entry = table.get(key)
        if entry is None:
            return None
        if now - entry[1] > KEEP_FOR:
            del table[key]
            return None
        return entry[0]
