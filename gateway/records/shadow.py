"""The differences shadow members showed (gateway.vips.shadow): one JSON line each in
`state_dir/shadow-differences.jsonl`, read back by `gateway shadow report`.

A line names the VIP, the shadow, what differed and both answers' codes, and the unit by its
message type and its identifier as a keyed hash (gateway.privacy): never message content. Each
line is one write(2) on an O_APPEND descriptor, as the audit log's.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import logging
import os
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path

from gateway.privacy import KeyedHash

log = logging.getLogger("medgate.shadow")

FILE_NAME = "shadow-differences.jsonl"
REPORT_MAX_LINES = 1_000_000  # read at most this many (the newest are at the end)


class DifferenceKind(StrEnum):
    """What differed between the member's answer and the shadow's."""

    ACK_CODE = "ack-code"  # HL7 MSA-1
    ERROR_CODE = "error-code"  # HL7 ERR-3 (MSA-1 alike)
    HTTP_STATUS = "http-status"  # XDS
    REGISTRY_STATUS = "registry-status"  # XDS: RegistryResponse status (or a SOAP Fault)
    RESULT_COUNT = "result-count"  # XDS ITI-18: how many entries were found
    DOCUMENT_IDS = "document-ids"  # XDS ITI-18: as many, not the same
    ASSOCIATION = "association"  # DICOM: A-ASSOCIATE result (and reason)
    CONTEXTS = "contexts"  # DICOM: presentation contexts accepted (or their transfer syntax)
    DIMSE_STATUS = "dimse-status"  # DICOM: a response's final status (C-STORE, C-FIND, C-ECHO)
    MATCH_COUNT = "match-count"  # DICOM C-FIND: how many matches (pending responses)


@dataclass(frozen=True)
class Difference:
    time: str  # UTC, ISO 8601
    vip: str
    shadow: str
    kind: str  # a DifferenceKind
    unit: str  # the unit's type (an HL7 MSH-9)
    unit_id: str  # its identifier (MSH-10) as a keyed hash
    member: str  # the member that served it
    member_answer: str
    shadow_answer: str


class ShadowLog:
    """Appends differences to state_dir's file ('' state_dir: none kept, only counted)."""

    def __init__(self, state_dir: str, hasher: KeyedHash) -> None:
        self.path = Path(state_dir) / FILE_NAME if state_dir else None
        self.hasher = hasher
        self._fd: int | None = None
        self.lost = 0  # lines that could not be written

    def open(self) -> None:
        if self.path is not None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def write(self, vip: str, shadow: str, kind: DifferenceKind, unit: str, unit_id: str,
              member: str, member_answer: str, shadow_answer: str) -> Difference:
        """Keep one difference (its identifier hashed); returns it."""
        difference = Difference(
            datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            vip, shadow, str(kind), unit, self.hasher(unit_id), member, member_answer,
            shadow_answer)
        if self._fd is not None:
            try:
                os.write(self._fd, (json.dumps(asdict(difference), separators=(",", ":"))
                                    + "\n").encode())
            except OSError as exc:
                self.lost += 1
                if self.lost == 1:
                    log.error("shadow differences %s: cannot write (%s): counted, not kept",
                              self.path, exc.strerror or exc)
        return difference


def read_differences(state_dir: str, since: datetime.datetime | None = None
                     ) -> list[Difference]:
    """The differences kept in `state_dir`, oldest first (from `since` on); a line that is not
    one (a crash cut it) is left out."""
    path = Path(state_dir) / FILE_NAME
    if not path.exists():
        return []
    found: list[Difference] = []
    with open(path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines):
            if number >= REPORT_MAX_LINES:
                break
            try:
                difference = Difference(**json.loads(line))
                at = datetime.datetime.fromisoformat(difference.time)
            except (ValueError, TypeError):
                continue
            if since is None or at >= since:
                found.append(difference)
    return found


def as_csv(differences: list[Difference]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(Difference.__dataclass_fields__)
    for difference in differences:
        writer.writerow(asdict(difference).values())
    return out.getvalue()
