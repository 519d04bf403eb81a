"""The audit log: one JSON line per DICOM association, HL7 message and XDS request.

Identifiers only (AE titles, message control IDs, SOAP actions, member names): never message
bodies, patient names or patient IDs, so the file can be kept and shipped like any log.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import IO

log = logging.getLogger("medgate.audit")


class AuditLog:
    """Writes records to a file (appending, line-buffered) or to stdout for "-"; "" is off.

    Nothing is written before `open()`, which the gateway calls when it starts serving.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self._file: IO[str] | None = None

    def open(self) -> None:
        """Open the target; OSError says which file and why it cannot be written."""
        if self.target == "-":
            self._file = sys.stdout
        elif self.target:
            try:
                self._file = open(self.target, "a", encoding="utf-8", buffering=1)
            except OSError as exc:
                raise OSError(f"[gateway] audit: cannot write {self.target}: "
                              f"{exc.strerror or exc}") from None

    def record(self, kind: str, **fields) -> None:
        """One line: time, kind, then the fields as given."""
        if self._file is None:
            return
        line = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="milliseconds"), "kind": kind, **fields}
        try:
            self._file.write(json.dumps(line, separators=(",", ":")) + "\n")
            self._file.flush()
        except OSError as exc:  # a full disk must not stop the traffic; say so in the log
            log.error("audit log %s: cannot write: %s", self.target, exc)

    def close(self) -> None:
        if self._file is not None and self._file is not sys.stdout:
            self._file.close()
        self._file = None


DISABLED = AuditLog("")
