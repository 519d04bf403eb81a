"""The audit log: one JSON line per DICOM association, HL7 message and XDS request; and, when
[gateway] atna is set, the security events an ATNA audit record repository wants (gateway.atna).

Identifiers only (AE titles, message control IDs, SOAP actions, member names): never message
bodies, patient names or patient IDs, so the file can be kept and shipped like any log.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import IO

from gateway.atna import Actor, AtnaSender
from protocols import atna

log = logging.getLogger("medgate.audit")


class AuditLog:
    """Writes records to a file (appending, line-buffered) or to stdout for "-"; "" is off.

    Nothing is written before `open()`, which the gateway calls when it starts serving.
    """

    def __init__(self, target: str, events: AtnaSender | None = None) -> None:
        self.target = target
        self.events = events  # ATNA: security events go there as well
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

    def node_refused(self, vip: str, actor: Actor, detail: str) -> None:
        """A client whose certificate or calling AE was refused (ATNA: Node Authentication)."""
        self.record("security", vip=vip, client=actor.address, user=actor.name,
                    event="node-authentication", outcome="refused", detail=detail)
        if self.events is not None:
            self.events.security_alert(atna.NODE_AUTHENTICATION, False, actor, detail,
                                       f"vip:{vip}")

    def configuration_changed(self, network: bool, ok: bool, actor: Actor, detail: str,
                              subject: str) -> None:
        """ATNA only (the JSON log has its own "admin" record): a member's state or weight
        (`network`) or the whole config (a reload) changed, or a reload was refused."""
        if self.events is not None:
            kind = atna.NETWORK_CONFIGURATION if network else atna.SOFTWARE_CONFIGURATION
            self.events.security_alert(kind, ok, actor, detail, subject)

    def login(self, ok: bool, actor: Actor, detail: str) -> None:
        """An admin token accepted for a change, or refused (ATNA: User Authentication)."""
        if not ok:
            self.record("security", client=actor.address, user=actor.name, event="login",
                        outcome="refused", detail=detail)
        if self.events is not None:
            self.events.user_authentication(ok, actor, detail)

    def application(self, started: bool) -> None:
        """ATNA Application Activity: the gateway started or stopped."""
        if self.events is not None:
            self.events.application(started)

    def close(self) -> None:
        if self._file is not None and self._file is not sys.stdout:
            self._file.close()
        self._file = None


DISABLED = AuditLog("")
