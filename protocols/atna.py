"""ATNA audit messages (DICOM PS3.15 A.5, the IHE ITI-20 Record Audit Event payload) and their
syslog framing (RFC 5424 messages, RFC 5425 octet counting on TLS, RFC 5426 one per datagram).

Sans-IO: `encode_message` builds the XML, `syslog_message` the RFC 5424 line around it,
`octet_counted` the TLS framing, and `SyslogReader` takes framed bytes apart again (for an audit
record repository: the simulator's, and the tests').
"""

from __future__ import annotations

import base64
import datetime
import enum
from dataclasses import dataclass

from lxml import etree

MSGID = "IHE+RFC-3881"  # ITI-20 §3.20.4.1.2: the MSGID of every audit syslog message
FACILITY = 10  # security/authorization messages
BOM = b"\xef\xbb\xbf"  # RFC 5424 §6.4: a MSG in UTF-8 starts with it
MAX_MESSAGE = 65536  # larger frames are refused by the reader (PS3.15 A.6 asks for 32 KiB)


class SyslogError(Exception):
    """Framed bytes that are not an octet-counted syslog message; the text says why."""


@dataclass(frozen=True)
class Code:
    """A coded value: code, coding scheme, meaning (PS3.15 A.5.1 `csd-code` attributes)."""

    code: str
    system: str
    meaning: str


APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
SECURITY_ALERT = Code("110113", "DCM", "Security Alert")
USER_AUTHENTICATION = Code("110114", "DCM", "User Authentication")
APPLICATION_START = Code("110120", "DCM", "Application Start")
APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
LOGIN = Code("110122", "DCM", "Login")
NODE_AUTHENTICATION = Code("110126", "DCM", "Node Authentication")
NETWORK_CONFIGURATION = Code("110128", "DCM", "Network Configuration")
SOFTWARE_CONFIGURATION = Code("110131", "DCM", "Software Configuration")
ROLE_APPLICATION = Code("110150", "DCM", "Application")
ROLE_LAUNCHER = Code("110151", "DCM", "Application Launcher")


class Outcome(enum.IntEnum):
    """EventOutcomeIndicator."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: who took part, whether it asked for the event, from where."""

    user_id: str
    requestor: bool
    role: Code | None = None
    network_id: str = ""  # an IP address or host name
    alternative_user_id: str = ""
    user_name: str = ""


@dataclass(frozen=True)
class AlertSubject:
    """A ParticipantObject of a Security Alert: what the alert is about (a URI, a file), by
    ID and by name (A.5.1 asks for a ParticipantObjectName; the ID stands in without one)."""

    object_id: str
    detail: str = ""
    name: str = ""


@dataclass(frozen=True)
class AuditEvent:
    event_id: Code
    type_code: Code
    outcome: Outcome
    when: datetime.datetime
    participants: tuple[Participant, ...]
    source_id: str  # AuditSourceIdentification@AuditSourceID
    site_id: str = ""
    description: str = ""  # EventOutcomeDescription
    subjects: tuple[AlertSubject, ...] = ()
    action: str = "E"  # EventActionCode: E (execute) for every event medgate reports


def _code(parent: etree._Element, tag: str, code: Code) -> None:
    etree.SubElement(parent, tag, {"csd-code": code.code, "codeSystemName": code.system,
                                   "originalText": code.meaning})


def _text(value: str) -> str:
    """What XML 1.0 can carry (no control characters, surrogates or U+FFFE/U+FFFF), whatever
    a peer put in its name."""
    return "".join(c if c in "\t\n\r" or " " <= c <= "\ud7ff" or "\ue000" <= c <= "\ufffd"
                   or c >= "\U00010000" else "?" for c in value)


def encode_message(event: AuditEvent) -> bytes:
    """The AuditMessage XML (UTF-8, no declaration) for one event."""
    root = etree.Element("AuditMessage")
    identification = etree.SubElement(root, "EventIdentification", {
        "EventActionCode": event.action,
        "EventDateTime": event.when.isoformat(timespec="milliseconds"),
        "EventOutcomeIndicator": str(int(event.outcome))})
    _code(identification, "EventID", event.event_id)
    _code(identification, "EventTypeCode", event.type_code)
    if event.description:
        etree.SubElement(identification, "EventOutcomeDescription").text = _text(
            event.description)
    for participant in event.participants:
        attributes = {"UserID": _text(participant.user_id),
                      "UserIsRequestor": "true" if participant.requestor else "false"}
        if participant.alternative_user_id:
            attributes["AlternativeUserID"] = _text(participant.alternative_user_id)
        if participant.user_name:
            attributes["UserName"] = _text(participant.user_name)
        if participant.network_id:
            attributes["NetworkAccessPointID"] = _text(participant.network_id)
            attributes["NetworkAccessPointTypeCode"] = "2" if _is_ip(participant.network_id) else "1"
        element = etree.SubElement(root, "ActiveParticipant", attributes)
        if participant.role is not None:
            _code(element, "RoleIDCode", participant.role)
    source = {"AuditSourceID": _text(event.source_id)}
    if event.site_id:
        source["AuditEnterpriseSiteID"] = _text(event.site_id)
    source_element = etree.SubElement(root, "AuditSourceIdentification", source)
    etree.SubElement(source_element, "AuditSourceTypeCode", {"csd-code": "4"})  # app server
    for subject in event.subjects:
        element = etree.SubElement(root, "ParticipantObjectIdentification", {
            "ParticipantObjectID": _text(subject.object_id),
            "ParticipantObjectTypeCode": "2",  # system object
            "ParticipantObjectTypeCodeRole": "13"})  # security resource
        etree.SubElement(element, "ParticipantObjectIDTypeCode", {
            "csd-code": "12", "codeSystemName": "RFC-3881", "originalText": "URI"})
        etree.SubElement(element, "ParticipantObjectName").text = _text(
            subject.name or subject.object_id)
        if subject.detail:
            # A.5.1: every detail value is base64Binary, whatever text it carries
            etree.SubElement(element, "ParticipantObjectDetail", {
                "type": "Alert Description",
                "value": base64.b64encode(subject.detail.encode("utf-8", "replace")).decode()})
    encoded: bytes = etree.tostring(root, encoding="utf-8")
    return encoded


def _is_ip(value: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def syslog_message(xml: bytes, *, when: datetime.datetime, hostname: str, app_name: str,
                   procid: str, warning: bool = False) -> bytes:
    """An RFC 5424 message carrying one audit message: PRI <85> (notice) or <84> (warning)."""
    priority = FACILITY * 8 + (4 if warning else 5)

    def field(value: str, limit: int) -> str:  # printable US-ASCII, no spaces, or "-"
        value = "".join(c for c in value if "!" <= c <= "~")[:limit]
        return value or "-"

    header = (f"<{priority}>1 {when.isoformat(timespec='milliseconds')} {field(hostname, 255)} "
              f"{field(app_name, 48)} {field(procid, 128)} {MSGID} - ")
    return header.encode("ascii") + BOM + xml


def octet_counted(message: bytes) -> bytes:
    """RFC 5425 §4.3 framing: MSG-LEN SP SYSLOG-MSG."""
    return b"%d " % len(message) + message


class SyslogReader:
    """Takes octet-counted syslog messages out of a byte stream; bounded by `limit` each."""

    def __init__(self, limit: int = MAX_MESSAGE) -> None:
        self.limit = limit
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray) -> None:
        self._buffer += data

    def next_message(self) -> bytes | None:
        """The next whole message, or None until more bytes come; SyslogError on garbage."""
        end = frame_end(self._buffer, 0, self.limit)
        if end is None:
            return None
        message = bytes(self._buffer[self._buffer.index(b" ") + 1:end])
        del self._buffer[:end]
        return message


def frame_end(data: bytes | bytearray, start: int, limit: int = MAX_MESSAGE) -> int | None:
    """Where the octet-counted frame at `start` of `data` ends; None while it is cut short;
    SyslogError when the bytes there are not a frame (or one over `limit`)."""
    space = data.find(b" ", start, start + 8)
    if space < 0:
        rest = data[start:start + 8]
        if len(rest) >= 8 or (rest and not rest.isdigit()):
            raise SyslogError("a frame does not start with its length (RFC 5425 §4.3)")
        return None
    digits = bytes(data[start:space])
    if not digits.isdigit() or digits.startswith(b"0"):
        raise SyslogError(f"frame length {digits[:8]!r} is not a number")
    length = int(digits)
    if length > limit:
        raise SyslogError(f"frame of {length} bytes (at most {limit})")
    end = space + 1 + length
    return end if end <= len(data) else None


def whole_frames(data: bytes, start: int = 0, limit: int = MAX_MESSAGE) -> list[int]:
    """Where each whole frame from `start` on ends, up to the first one cut short or that is
    not a frame (a spool file a stop or a full disk cut in the middle of a write)."""
    ends = []
    while start < len(data):
        try:
            end = frame_end(data, start, limit)
        except SyslogError:
            break
        if end is None:
            break
        ends.append(end)
        start = end
    return ends


@dataclass(frozen=True)
class SyslogMessage:
    priority: int
    msgid: str
    xml: bytes


def parse_syslog(message: bytes) -> SyslogMessage:
    """The parts of an RFC 5424 message an audit repository needs; SyslogError otherwise."""
    if not message.startswith(b"<") or b">" not in message[:5]:
        raise SyslogError("no <PRI> at the start")
    close = message.index(b">")
    try:
        priority = int(message[1:close])
    except ValueError:
        raise SyslogError("PRI is not a number") from None
    fields = message[close + 1:].split(b" ", 6)
    if len(fields) < 7 or fields[0] != b"1":
        raise SyslogError("not an RFC 5424 (VERSION 1) message")
    structured, _, rest = fields[6].partition(b" ")
    if structured != b"-":
        raise SyslogError("structured data is not expected in an audit message")
    return SyslogMessage(priority, fields[5].decode("ascii", "replace"),
                         rest[len(BOM):] if rest.startswith(BOM) else rest)


__all__ = ["APPLICATION_ACTIVITY", "APPLICATION_START", "APPLICATION_STOP", "AlertSubject",
           "AuditEvent", "Code", "LOGIN", "MSGID", "NETWORK_CONFIGURATION",
           "NODE_AUTHENTICATION", "Outcome", "Participant", "ROLE_APPLICATION", "ROLE_LAUNCHER",
           "SECURITY_ALERT", "SOFTWARE_CONFIGURATION", "SyslogError", "SyslogMessage",
           "SyslogReader", "USER_AUTHENTICATION", "encode_message", "frame_end", "octet_counted",
           "parse_syslog", "syslog_message", "whole_frames"]
