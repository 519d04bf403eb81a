"""The audit log: one JSON line per DICOM association, HL7 message and XDS request; and, when
[gateway] atna is set, the security events an ATNA audit record repository wants (gateway.records.atna).

Identifiers only (AE titles, message control IDs, SOAP actions, member names): never message
bodies, patient names or patient IDs, so the file can be kept and shipped like any log.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from json.encoder import c_make_encoder  # type: ignore[attr-defined]
from json.encoder import encode_basestring_ascii as _quote  # C; escapes wire values

from gateway.records.atna import Actor, AtnaSender
from protocols import atna

log = logging.getLogger("medgate.audit")
# The json module's C encoder, called directly: one call per record, where json.dumps
# passes through three Python functions first. Compact separators, ASCII, as before.
_ENCODER = (c_make_encoder(None, None, _quote, None, ":", ",", False, False, True)
            if c_make_encoder is not None else
            lambda fields, _level: [json.dumps(fields, separators=(",", ":"))])


class AuditLog:
    """Writes records to a file or to stdout for "-"; "" is off.

    Each record is one write(2) of one line to a file opened for appending, unbuffered: once
    `record` returns, the line is the kernel's and survives the gateway being killed, so the
    VIPs write a unit's record before they answer it. Nothing is written before `open()`,
    which the gateway calls when it starts serving.
    """

    def __init__(self, target: str, events: AtnaSender | None = None) -> None:
        self.target = target
        self.events = events  # ATNA: security events go there as well
        self._fd: int | None = None  # the file, while open
        self._write: Callable[[str], object] | None = None  # or this writer (stdout), while open
        self._second = -1
        self._second_text = ""
        self.lost = 0  # records that could not be written (a full disk)
        self._failing = 0  # of those, since the last record that was written

    def open(self) -> None:
        """Open the target; OSError says which file and why it cannot be written."""
        if self.target == "-":
            self._write = _to_stdout
        elif self.target:
            try:
                self._fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            except OSError as exc:
                raise OSError(f"[gateway] audit: cannot write {self.target}: "
                              f"{exc.strerror or exc}") from None

    def opened_elsewhere(self, target: str) -> AuditLog:
        """A log of this one's events, open on `target` (a reload changed [gateway] audit);
        OSError as `open`'s. `take_over` then makes this one write there."""
        other = AuditLog(target, self.events)
        other.open()
        return other

    def take_over(self, other: AuditLog) -> None:
        """Write to `other`'s target from now on (its descriptor), closing this one's."""
        old = self._fd
        self.target, self._fd, self._write = other.target, other._fd, other._write
        if old is not None:
            os.close(old)

    def reopen(self) -> str:
        """Open the file again by its name (after logrotate moved it away): new records go to
        the new file, none is lost between. '' when done, else why the old file stays."""
        if self._fd is None:
            return ""
        try:
            fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            return f"[gateway] audit: cannot reopen {self.target}: {exc.strerror or exc}"
        old, self._fd = self._fd, fd  # the writer reads self._fd at each record
        os.close(old)
        return ""

    def _time(self) -> str:
        """UTC now to the millisecond, ISO 8601; the seconds part is formatted once a second."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = datetime.datetime.fromtimestamp(
                second, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._second_text}.{int((now - second) * 1000):03d}+00:00"

    def record(self, kind: str, **fields) -> None:
        """One JSON line: time, kind, then the fields as given (str, int, float, bool, None,
        or a list of those); strings are escaped, so a value from the wire is never a line."""
        if self._fd is None and self._write is None:
            return
        self._emit(f'{{"time":"{self._time()}","kind":{_quote(kind)}'
                   + (f",{_encode_fields(fields)[1:]}\n" if fields else "}\n"))

    def layout(self, kind: str, *names: str) -> Layout:
        """A writer of `kind` records whose fields are `names`, in that order (see Layout)."""
        return Layout(self, kind, names)

    def _emit(self, line: str) -> None:
        fd = self._fd
        try:
            if fd is not None:  # written here, not by a writer of its own: a call less a record
                os.write(fd, line.encode())
            elif self._write is not None:
                self._write(line)
            else:  # the callers check first: nothing is formatted while closed
                return
        except OSError as exc:
            # A full disk must not stop the traffic: the record is lost, counted (lost,
            # medgate_audit_records_lost_total) and said once per burst, not once per record.
            self.lost += 1
            self._failing += 1
            if self._failing == 1:
                log.error("audit log %s: cannot write (%s): records are lost until it can "
                          "again; the traffic goes on", self.target, exc.strerror or exc)
            return
        if self._failing:
            log.warning("audit log %s: written again; %d record(s) were lost meanwhile",
                        self.target, self._failing)
            self._failing = 0

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
        if self._fd is not None:
            os.close(self._fd)
        self._fd = self._write = None


class Layout:
    """Records of one kind whose fields are known in advance (one per HL7 message): the
    line's head is built once, and the fields are encoded in one call of the C encoder."""

    def __init__(self, audit: AuditLog, kind: str, names: tuple[str, ...]) -> None:
        self.audit, self.kind, self.names = audit, kind, names
        self._head = '{"time":"%s","kind":' + _quote(kind) + ","

    def record(self, *values, **extra) -> None:
        """One record: `values` for the layout's fields (str, int, float, bool or None),
        then any `extra` fields, as AuditLog.record takes them."""
        audit = self.audit
        if audit._fd is None and audit._write is None:
            return
        fields = dict(zip(self.names, values))
        if extra:
            fields.update(extra)
        # _encode_fields, inline: once a message
        audit._emit(self._head % audit._time() + "".join(_ENCODER(fields, 0))[1:] + "\n")


def _encode_fields(fields: dict) -> str:
    """`fields` as a JSON object, compact, ASCII (a value from the wire is escaped)."""
    return "".join(_ENCODER(fields, 0))


def _to_stdout(line: str) -> None:
    sys.stdout.write(line)
    sys.stdout.flush()


DISABLED = AuditLog("")
