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
from json.encoder import encode_basestring_ascii as _quote  # C; escapes wire values

from gateway.records.atna import Actor, AtnaSender
from protocols import atna

log = logging.getLogger("medgate.audit")
_LITERALS = {None: "null", True: "true", False: "false"}


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
        self._fd: int | None = None
        self._write: Callable[[str], object] | None = None  # one line out; None while closed
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
            self._write = self._to_file

    def _to_file(self, line: str) -> None:
        assert self._fd is not None  # open() set it
        os.write(self._fd, line.encode())

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
        if self._write is None:
            return
        parts = [f'{{"time":"{self._time()}","kind":{_quote(kind)}']
        for key, value in fields.items():
            if type(value) is str:
                parts.append(f',"{key}":{_quote(value)}')
            elif type(value) is int or type(value) is float:
                parts.append(f',"{key}":{value!r}')
            elif value is None or value is True or value is False:
                parts.append(f',"{key}":{_LITERALS[value]}')
            else:
                parts.append(f',"{key}":{json.dumps(value, separators=(",", ":"))}')
        parts.append("}\n")
        self._emit("".join(parts))

    def layout(self, kind: str, *names: str) -> Layout:
        """A writer of `kind` records whose fields are `names`, in that order (see Layout)."""
        return Layout(self, kind, names)

    def _emit(self, line: str) -> None:
        write = self._write
        if write is None:  # the callers check first: nothing is formatted while closed
            return
        try:
            write(line)
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
    line's layout is built once, so a record costs one format and one write."""

    def __init__(self, audit: AuditLog, kind: str, names: tuple[str, ...]) -> None:
        self.audit, self.kind, self.names = audit, kind, names
        self._pattern = ('{"time":"%s","kind":' + _quote(kind)
                         + "".join(f',"{name}":%s' for name in names) + "}\n")

    def record(self, *values, **extra) -> None:
        """One record: `values` for the layout's fields (str, int, float, bool or None),
        then any `extra` fields, as AuditLog.record takes them."""
        audit = self.audit
        if extra:
            audit.record(self.kind, **dict(zip(self.names, values)), **extra)
        elif audit._write is not None:
            audit._emit(self._pattern % (audit._time(), *map(_json_value, values)))


def _json_value(value) -> str:
    if type(value) is str:
        return _quote(value)
    if value is None or value is True or value is False:
        return _LITERALS[value]
    return repr(value)  # int or float


def _to_stdout(line: str) -> None:
    sys.stdout.write(line)
    sys.stdout.flush()


DISABLED = AuditLog("")
