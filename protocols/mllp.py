"""MLLP framing and an HL7 v2 MSH/MSA peek and ACK builder, sans-IO.

Rule: bytes in, events or bytes out. No sockets, no trio, no clocks (the ACK builder is given
its timestamp and control ID). The relay path never parses a whole message: it splits the MSH
and, for persistence by patient, the PID segment (a full parse costs ~3 ms a message).

MLLP Release 1 frame: SB payload EB CR, with SB = 0x0B, EB = 0x1C, CR = 0x0D.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NamedTuple

SB = b"\x0b"  # start block (VT)
EB = b"\x1c"  # end block (FS)
CR = b"\r"  # carriage return: ends the frame, and separates segments inside it
END = EB + CR
COMMIT_ACK = b"\x06"  # MLLP Release 2 commit acknowledgement payload
COMMIT_NAK = b"\x15"  # MLLP Release 2 negative commit acknowledgement payload
HEAD_KEPT = 4096  # of an oversize frame, enough to read its MSH for the NAK
# ERR-3 codes (HL7 table 0357)
SEGMENT_SEQUENCE_ERROR = "100^Segment sequence error^HL70357"
REQUIRED_FIELD_MISSING = "101^Required field missing^HL70357"
APPLICATION_ERROR = "207^Application internal error^HL70357"


class HL7Error(Exception):
    """A frame or message the gateway cannot handle; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class MissingControlId(HL7Error):
    """A message whose MSH reads but has no MSH-10: `header` (its control ID empty) is enough
    to answer it (HL7 v2 §2.9.2: a message whose MSH fails validation is rejected, AR)."""

    def __init__(self, header: Header) -> None:
        super().__init__("MSH-10 (message control ID) is empty")
        self.header = header


@dataclass(frozen=True)
class Message:
    """One whole frame's payload (without SB/EB/CR)."""

    payload: bytes


@dataclass(frozen=True)
class Oversize:
    """A frame longer than the limit: its first bytes (for MSH-10) and its size when seen (the
    whole frame's, or what had come when it passed the limit)."""

    head: bytes
    size: int


@dataclass(frozen=True)
class Junk:
    """Bytes outside any frame (before an SB), which MLLP does not allow."""

    data: bytes


Event = Message | Oversize | Junk


class MllpReader:
    """Splits a byte stream into frames: `feed(bytes)`, then `next_event()` until None.

    Buffers at most `max_message_bytes` of one frame: once a frame passes it, an Oversize event
    (its first bytes, for the MSH-10 of a NAK, and the size seen so far) comes at once, without
    waiting for the end block, and the rest of that frame is dropped as it arrives. CR/LF
    between frames (some engines end frames with EB CR LF) is tolerated; anything else outside a
    frame is Junk. Work per byte fed is bounded: the end block is searched for only once.
    """

    def __init__(self, max_message_bytes: int = 16 * 1024 * 1024) -> None:
        self.max_message_bytes = max_message_bytes
        self._buffer = bytearray()
        self._in_frame = False
        self._scanned = 0  # frame bytes already searched for EB CR
        self._dropping = False  # the rest of an oversize frame is being dropped
        # The bytes fed and not yet taken as events, for a caller's `if reader.pending`
        # (a relay asks at every message; `buffered` costs two calls): read, never change.
        self.pending: bytes | bytearray = self._buffer

    def feed(self, data: bytes | bytearray) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def next_event(self) -> Event | None:
        buffer = self._buffer
        if not buffer:
            return None  # asked at each wait: nothing to scan
        if not self._in_frame and buffer[:1] == SB:  # the usual case: a frame from its start
            end = buffer.find(END, 1)
            if 0 < end <= self.max_message_bytes:
                payload = bytes(buffer[1:end])
                del buffer[:end + 2]
                return Message(payload)
        while True:
            if not self._in_frame:
                start = self._buffer.find(SB)
                if start == -1:
                    return self._junk(len(self._buffer))
                if start:
                    junk = self._junk(start)
                    if junk is not None:
                        return junk
                del self._buffer[:1]  # the SB
                self._in_frame, self._scanned = True, 0
                continue
            end = self._buffer.find(END, max(self._scanned - 1, 0))
            if end == -1:
                if self._dropping:
                    del self._buffer[:max(len(self._buffer) - 1, 0)]  # an EB may meet its CR
                    self._scanned = len(self._buffer)
                    return None
                self._scanned = len(self._buffer)
                if len(self._buffer) > self.max_message_bytes:
                    return self._too_big(len(self._buffer))
                return None
            payload = bytes(self._buffer[:end])
            del self._buffer[:end + 2]
            self._in_frame = False
            if self._dropping:
                self._dropping = False
                continue
            if len(payload) > self.max_message_bytes:
                return Oversize(payload[:HEAD_KEPT], len(payload))
            return Message(payload)

    def _too_big(self, size: int) -> Oversize:
        event = Oversize(bytes(self._buffer[:HEAD_KEPT]), size)
        self._dropping = True
        del self._buffer[:max(size - 1, 0)]
        self._scanned = len(self._buffer)
        return event

    def _junk(self, count: int) -> Junk | None:
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        if not data.strip(b"\r\n"):
            return None
        return Junk(data)


def frame(payload: bytes) -> bytes:
    """Wrap one message in SB ... EB CR."""
    return SB + payload + END


# ---------------------------------------------------------------------------- MSH / MSA peek

class Header(NamedTuple):
    """The MSH fields the gateway routes and answers by (HL7 v2 ch. 2; MSH-n is parts[n-1]).
    A named tuple: built once per relayed message, where a frozen dataclass costs 3 us."""

    field_separator: str
    encoding_characters: str
    sending_application: str  # MSH-3
    sending_facility: str  # MSH-4
    receiving_application: str  # MSH-5
    receiving_facility: str  # MSH-6
    message_type: str  # MSH-9, e.g. ADT^A01^ADT_A01
    control_id: str  # MSH-10
    processing_id: str  # MSH-11
    version: str  # MSH-12
    accept_ack_type: str  # MSH-15 (present: enhanced acknowledgment mode)
    application_ack_type: str  # MSH-16
    patient_id: str  # PID-3, first repetition ("" when there is no PID)
    prior_patient_id: str = ""  # MRG-1, first repetition, of an ADT message (merges, moves)

    @property
    def enhanced_mode(self) -> bool:
        return bool(self.accept_ack_type or self.application_ack_type)

    @property
    def trigger_event(self) -> str:
        parts = self.message_type.split(self.encoding_characters[:1] or "^")
        return parts[1] if len(parts) > 1 else ""


def _segments(payload: bytes) -> list[bytes]:
    # Segments end in CR; tolerate LF and CRLF from sloppy senders.
    return [s for s in payload.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(CR) if s]


def _field(parts: list[str], index: int) -> str:
    return parts[index] if index < len(parts) else ""


def _segment_at(payload: bytes, start: int) -> bytes:
    """The segment starting at `start`, up to the next CR or LF."""
    end = payload.find(CR, start)
    newline = payload.find(b"\n", start, end if end != -1 else len(payload))
    if newline != -1:
        end = newline
    return payload[start:] if end == -1 else payload[start:end]


def _segment_named(payload: bytes, name: bytes, separator: str) -> bytes | None:
    """The first segment after MSH called `name` (`name`+separator right after CR or LF)."""
    tag = name + separator.encode("latin-1")
    at = payload.find(tag, 1)
    while at != -1:
        if payload[at - 1] in (13, 10):
            return _segment_at(payload, at)
        at = payload.find(tag, at + 1)
    return None


def _first_repetition(segment: bytes, separator: str, index: int, encoding: str) -> str:
    """Field `index` of a segment (its first repetition), e.g. PID-3 or MRG-1."""
    repetition = encoding[1:2] or "~"
    return _field(segment.decode("latin-1").split(separator, index + 1), index).split(
        repetition)[0]


MSH_FIELDS = 16  # MSH-1 .. MSH-16: all the header reads (parts[n - 1] is MSH-n)
_NO_FIELDS = [""] * MSH_FIELDS


def peek_header(payload: bytes) -> Header:
    """Read the MSH (and PID-3) of a message; HL7Error when there is no usable MSH.

    Only the MSH and the first PID are looked at: the rest of a large message is never split.
    """
    size = len(payload)
    if payload[:1] in (b"\r", b"\n"):  # empty segments first: skipped, as everywhere
        payload = CR.join(_segments(payload))
    first = _segment_at(payload, 0)
    if not first.startswith(b"MSH") or len(first) < 8:
        raise HL7Error(f"message of {size} bytes does not start with an MSH segment")
    msh = first.decode("latin-1")
    separator = msh[3]
    parts = msh.split(separator, MSH_FIELDS)  # what follows MSH-16 stays in one piece
    if len(parts) < MSH_FIELDS:
        parts += _NO_FIELDS[len(parts):]
    # parts[0] = "MSH", parts[1] = MSH-2, so MSH-n = parts[n - 1]
    control_id = parts[9]
    encoding = parts[1]
    patient_id = prior = ""
    pid = _segment_named(payload, b"PID", separator)
    if pid is not None:
        patient_id = _first_repetition(pid, separator, 3, encoding)
    if parts[8].startswith("ADT"):  # merges and moves: the MRG names the prior patient
        mrg = _segment_named(payload, b"MRG", separator)
        if mrg is not None:
            prior = _first_repetition(mrg, separator, 1, encoding)
    header = Header(separator, encoding, parts[2], parts[3], parts[4], parts[5], parts[8],
                    control_id, parts[10], parts[11], parts[14], parts[15], patient_id, prior)
    if not control_id:
        raise MissingControlId(header)
    return header


class Acknowledgment(NamedTuple):
    """MSA-1 code, MSA-2 control ID it answers, MSA-3 text and the ERR text if any, and the
    error code (HL7 table 0357) from ERR-3, MSA-6 or ERR-1 ("" when none is given)."""

    code: str
    control_id: str
    text: str = ""
    error_code: str = ""

    @property
    def positive(self) -> bool:
        return self.code in ("AA", "CA")


def peek_ack(payload: bytes) -> Acknowledgment:
    """Read MSA (and ERR) of an ACK; HL7Error when there is no MSA."""
    segments = _segments(payload)
    if not segments or not segments[0].startswith(b"MSH") or len(segments[0]) < 4:
        raise HL7Error(f"answer of {len(payload)} bytes does not start with an MSH segment")
    separator = segments[0][3:4]
    msa_tag, err_tag = b"MSA" + separator, b"ERR" + separator
    msa = err = None
    for segment in segments[1:]:
        if msa is None and segment.startswith(msa_tag):
            msa = segment.decode("latin-1").split(chr(separator[0]))
        elif err is None and segment.startswith(err_tag):
            err = segment.decode("latin-1").split(chr(separator[0]))
    if msa is None:
        raise HL7Error("answer has no MSA segment")
    msa += _NO_FIELDS[len(msa):4]
    detail = msa[3]
    encoding = segments[0][4:8].decode("latin-1")
    component, subcomponent = encoding[:1] or "^", encoding[3:4] or "&"
    # The error code: ERR-3's identifier from v2.5 on; MSA-6's, or ERR-1's fourth component
    # (a CE in subcomponents), before. A receiver may fill either: all are read.
    code = _field(msa, 6).split(component)[0]
    if err is not None:
        err_text = _field(err, 8) or _field(err, 7) or _field(err, 3) or _field(err, 1)
        if err_text and err_text != detail:
            detail = f"{detail}; {err_text}" if detail else err_text
        code = (_field(err, 3).split(component)[0] or code or _field(
            _field(err, 1).split(component), 3).split(subcomponent)[0])
    return Acknowledgment(msa[1], msa[2], detail, code.strip())


# ---------------------------------------------------------------------------- batches

BATCH_STARTS = (b"FHS", b"BHS")  # HL7 v2.5 §2.10.3: a file or batch header starts the frame


def is_batch(payload: bytes) -> bool:
    return payload[:3] in BATCH_STARTS


@dataclass(frozen=True)
class Batch:
    """A batch (FHS/BHS ... BTS/FTS) sent as one frame: relayed whole, answered once."""

    first: Header  # the first message's MSH (routes and persistence go by it)
    control_id: str  # BHS-11 (else FHS-11): what a response batch's BHS-12 refers to; "" none
    message_ids: tuple[str, ...]  # MSH-10 of each message inside

    @property
    def header(self) -> Header:
        """What the gateway's NAK, logs and audit record name: the batch id as MSH-10."""
        return self.first._replace(control_id=self.control_id or self.first.control_id,
                       message_type="batch")

    def answered_by(self, ack: Acknowledgment) -> bool:
        """Whether `ack` (a response batch's BHS-12, or an ACK's MSA-2) answers this batch."""
        if not self.control_id or not ack.control_id:
            return True  # nothing to correlate by: the one answer on the connection is its
        return ack.control_id == self.control_id or ack.control_id in self.message_ids


def _header_fields(segment: bytes) -> list[str]:
    """An MSH, BHS or FHS segment split so that field n is at index n - 1."""
    text = segment.decode("latin-1")
    return text.split(text[3]) if len(text) > 3 else [text]


def peek_batch(payload: bytes) -> Batch:
    """Read a batch's header and the MSH of each message; HL7Error if it holds none."""
    first = _segment_at(payload, 0)
    fields = _header_fields(first)
    control_id = _field(fields, 10)
    if first.startswith(b"FHS"):  # a file: its batch header, when there is one, comes next
        second = _segment_at(payload, len(first) + 1)
        if second.startswith(b"BHS"):
            control_id = _field(_header_fields(second), 10) or control_id
    separator = re.escape(first[3:4] or b"|")
    starts = [match.start(1) for match in re.finditer(rb"[\r\n](MSH" + separator + b")", payload)]
    if not starts:
        raise HL7Error(f"batch of {len(payload)} bytes holds no MSH segment")
    ids = tuple(_field(_header_fields(_segment_at(payload, start)), 9) for start in starts)
    # The first message alone, so that its PID (for persistence) is not taken from another.
    end = starts[1] if len(starts) > 1 else len(payload)
    return Batch(peek_header(payload[starts[0]:end]), control_id, ids)


def peek_batch_answer(payload: bytes) -> Acknowledgment:
    """A response batch: its BHS-12 (else FHS-12) as the control ID it answers, and the first
    MSA's code and text ("batch" when it holds none: no message was refused)."""
    segments = _segments(payload)
    reference = ""
    for segment in segments[:2]:
        if segment[:3] in BATCH_STARTS:
            reference = _field(_header_fields(segment), 11) or reference
    for segment in segments:
        if segment.startswith(b"MSA"):
            msa = _header_fields(segment)
            return Acknowledgment(_field(msa, 1), reference, _field(msa, 3))
    return Acknowledgment("batch", reference)


def _clean(text: str, header: Header) -> str:
    """Text safe inside one field: no separators, no escape character, no segment breaks."""
    for char in header.field_separator + header.encoding_characters + "\r\n":
        text = text.replace(char, " ")
    return text


def version_number(version: str) -> tuple[int, ...]:
    """MSH-12 as numbers ("2.3.1" -> (2, 3, 1)); (2, 5) when it cannot be read."""
    number = version.split("^")[0].strip()
    try:
        return tuple(int(part) for part in number.split(".")) if number else (2, 5)
    except ValueError:
        return (2, 5)


def build_ack(header: Header, code: str, *, control_id: str, timestamp: str,
              text: str = "", error_code: str = APPLICATION_ERROR,
              sender: tuple[str, str] | None = None) -> bytes:
    """An ACK for the message with `header`: MSH with sender and receiver swapped, MSA, ERR.

    MSA-2 = the message's MSH-10, so the sender can match it. When `code` is not AA/CA the
    error code (table 0357) and the reason say why: ERR-3 and ERR-8 from v2.5 on; before, where
    ERR-3 is not defined, MSA-6 and ERR-1's fourth component (MSH-12 decides). `sender`
    (application, facility) answers as someone other than the application the message was
    written to: the gateway's own NAKs say they are the gateway's.
    """
    sep = header.field_separator
    encoding = header.encoding_characters or "^~\\&"
    component = encoding[0]
    trigger = header.trigger_event
    application, facility = (header.receiving_application, header.receiving_facility) if (
        sender is None) else (_clean(sender[0], header), _clean(sender[1], header))
    msh = sep.join([
        "MSH", encoding,
        application,  # MSH-3: as the application it wrote to, or the gateway
        facility,  # MSH-4
        header.sending_application,  # MSH-5: back to whoever sent it
        header.sending_facility,  # MSH-6
        timestamp,  # MSH-7
        "",  # MSH-8 security
        component.join(["ACK", trigger, "ACK"]) if trigger else "ACK",  # MSH-9
        control_id,  # MSH-10: our own, new
        header.processing_id or "P",  # MSH-11
        header.version or "2.5",  # MSH-12
    ])
    msa = ["MSA", code, header.control_id, _clean(text, header)[:80]]
    if code in ("AA", "CA"):
        segments = [msh, sep.join(msa)]
    elif version_number(header.version) >= (2, 5):
        segments = [msh, sep.join(msa), sep.join(["ERR", "", "", error_code.replace(
            "^", component), "E", "", "", "", _clean(text, header)])]
    else:  # MSA-6 error condition; ERR-1 error code and location, the code in its 4th part
        subcomponent = encoding[3:4] or "&"
        segments = [msh, sep.join(msa + ["", "", error_code.replace("^", component)]),
                    sep.join(["ERR", component * 3 + error_code.replace("^", subcomponent)])]
    return ("\r".join(segments) + "\r").encode("latin-1", "replace")
