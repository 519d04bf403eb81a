"""DICOM Upper Layer (PS3.8 §9) codec, sans-IO: PDU framing, association PDUs, C-ECHO.

Rule: bytes in, events or bytes out. No sockets, no trio, no clocks. Everything malformed raises
`ProtocolError` with a reason and the A-ABORT (source, reason) a peer should be sent.

Offsets below are 0-based. PDU header (PS3.8 §9.3.1), big endian:

    0  PDU-type   1  reserved   2..5  PDU-length (bytes after this field)
"""

from __future__ import annotations

import enum
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

# PDU types (PS3.8 Table 9-10 and §9.3)
A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07
PDU_NAMES = {A_ASSOCIATE_RQ: "A-ASSOCIATE-RQ", A_ASSOCIATE_AC: "A-ASSOCIATE-AC",
             A_ASSOCIATE_RJ: "A-ASSOCIATE-RJ", P_DATA_TF: "P-DATA-TF",
             A_RELEASE_RQ: "A-RELEASE-RQ", A_RELEASE_RP: "A-RELEASE-RP", A_ABORT: "A-ABORT"}

# Variable item types (PS3.8 §9.3.2, Annex D)
ITEM_APPLICATION_CONTEXT = 0x10
ITEM_PRESENTATION_CONTEXT_RQ = 0x20
ITEM_PRESENTATION_CONTEXT_AC = 0x21
ITEM_ABSTRACT_SYNTAX = 0x30
ITEM_TRANSFER_SYNTAX = 0x40
ITEM_USER_INFORMATION = 0x50
SUBITEM_MAX_LENGTH = 0x51
SUBITEM_IMPLEMENTATION_CLASS_UID = 0x52
SUBITEM_IMPLEMENTATION_VERSION = 0x55

DICOM_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve Information Model - FIND
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
# medgate's implementation class UID: a UUID-derived UID (ISO/IEC 9834-8, root 2.25).
IMPLEMENTATION_CLASS_UID = "2.25.176745245290184416373012331209561381457"

HEADER = struct.Struct(">BBL")
MAX_ASSOCIATION_PDU = 1024 * 1024  # an RQ/AC beyond this is hostile: user identity fits in 64 KiB


class ProtocolError(Exception):
    """The peer broke PS3.8. `abort` is the A-ABORT (source, reason) to send it."""

    def __init__(self, reason: str, abort: tuple[int, int] = (2, 0)) -> None:
        super().__init__(reason)
        self.reason = reason
        self.abort = abort


# ---------------------------------------------------------------------------- reject / abort

class RejectResult(enum.IntEnum):
    PERMANENT = 1
    TRANSIENT = 2


REJECT_SOURCES = {1: "service-user", 2: "service-provider (ACSE)",
                  3: "service-provider (presentation)"}
REJECT_REASONS = {
    1: {1: "no-reason-given", 2: "application-context-name-not-supported",
        3: "calling-AE-title-not-recognized", 7: "called-AE-title-not-recognized"},
    2: {1: "no-reason-given", 2: "protocol-version-not-supported"},
    3: {1: "temporary-congestion", 2: "local-limit-exceeded"},
}
ABORT_SOURCES = {0: "service-user", 1: "reserved", 2: "service-provider"}
ABORT_REASONS = {0: "reason-not-specified", 1: "unrecognized-PDU", 2: "unexpected-PDU",
                 4: "unrecognized-PDU-parameter", 5: "unexpected-PDU-parameter",
                 6: "invalid-PDU-parameter-value"}


@dataclass(frozen=True)
class AssociateReject:
    """A-ASSOCIATE-RJ (PS3.8 §9.3.4, Table 9-21): 10 bytes, result/source/reason at 7/8/9."""

    result: int
    source: int
    reason: int

    def encode(self) -> bytes:
        return HEADER.pack(A_ASSOCIATE_RJ, 0, 4) + bytes([0, self.result, self.source, self.reason])

    @classmethod
    def decode(cls, pdu: bytes) -> AssociateReject:
        _require_fixed(pdu, A_ASSOCIATE_RJ)
        return cls(pdu[7], pdu[8], pdu[9])

    def describe(self) -> str:
        result = {1: "rejected-permanent", 2: "rejected-transient"}.get(self.result,
                                                                       f"result {self.result}")
        source = REJECT_SOURCES.get(self.source, f"source {self.source}")
        reason = REJECT_REASONS.get(self.source, {}).get(self.reason, f"reason {self.reason}")
        return f"{result}, {source}, {reason}"


# The gateway's own refusals (PS3.8 Table 9-21): transient ones make SCUs retry.
REJECT_NO_MEMBER = AssociateReject(RejectResult.TRANSIENT, 3, 1)  # temporary-congestion
REJECT_ALL_FULL = AssociateReject(RejectResult.TRANSIENT, 3, 2)  # local-limit-exceeded
REJECT_CALLING_AE = AssociateReject(RejectResult.PERMANENT, 1, 3)
REJECT_CALLED_AE = AssociateReject(RejectResult.PERMANENT, 1, 7)
REJECT_APPLICATION_CONTEXT = AssociateReject(RejectResult.PERMANENT, 1, 2)
REJECT_PROTOCOL_VERSION = AssociateReject(RejectResult.PERMANENT, 2, 2)
REJECT_NO_REASON = AssociateReject(RejectResult.PERMANENT, 1, 1)  # a malformed UID


@dataclass(frozen=True)
class Abort:
    """A-ABORT (PS3.8 §9.3.8, Table 9-26): source at 8, reason at 9."""

    source: int = 2
    reason: int = 0

    def encode(self) -> bytes:
        return HEADER.pack(A_ABORT, 0, 4) + bytes([0, 0, self.source, self.reason])

    @classmethod
    def decode(cls, pdu: bytes) -> Abort:
        _require_fixed(pdu, A_ABORT)
        return cls(pdu[8], pdu[9])

    def describe(self) -> str:
        source = ABORT_SOURCES.get(self.source, f"source {self.source}")
        if self.source != 2:
            return source
        return f"{source}, {ABORT_REASONS.get(self.reason, f'reason {self.reason}')}"


# Provider-initiated abort: tells an SCU its last operation is unconfirmed (PS3.8 §7.4).
ABORT_PROVIDER = Abort(2, 0)
RELEASE_RQ = HEADER.pack(A_RELEASE_RQ, 0, 4) + bytes(4)
RELEASE_RP = HEADER.pack(A_RELEASE_RP, 0, 4) + bytes(4)


def _require_fixed(pdu: bytes, pdu_type: int) -> None:
    if len(pdu) != 10 or pdu[0] != pdu_type:
        raise ProtocolError(f"malformed {PDU_NAMES[pdu_type]} ({len(pdu)} bytes, expected 10)",
                            (2, 6))


# ---------------------------------------------------------------------------- framing

class PduReader:
    """Splits a byte stream into whole PDUs: `feed(bytes)`, then `next_pdu()` until None.

    Every PDU is returned whole (header included) as bytes. Unknown PDU types and PDUs longer
    than `max_pdu_bytes` raise ProtocolError before their body is buffered.
    """

    def __init__(self, max_pdu_bytes: int = MAX_ASSOCIATION_PDU) -> None:
        self.max_pdu_bytes = max_pdu_bytes
        self._buffer = bytearray()

    def feed(self, data: bytes | bytearray) -> None:
        self._buffer += data

    def next_pdu(self) -> bytes | None:
        if len(self._buffer) < HEADER.size:
            return None
        pdu_type, _, length = HEADER.unpack_from(self._buffer)
        if pdu_type not in PDU_NAMES:
            raise ProtocolError(f"unrecognized PDU type 0x{pdu_type:02x}", (2, 1))
        if length > self.max_pdu_bytes:
            raise ProtocolError(f"{PDU_NAMES[pdu_type]} of {length} bytes is over the "
                                f"{self.max_pdu_bytes}-byte limit", (2, 6))
        end = HEADER.size + length
        if len(self._buffer) < end:
            return None
        pdu = bytes(self._buffer[:end])
        del self._buffer[:end]
        return pdu

    def leftover(self) -> bytes:
        """Bytes received after the last complete PDU (to pass on unchanged)."""
        return bytes(self._buffer)


# ---------------------------------------------------------------------------- association

@dataclass(frozen=True)
class PresentationContext:
    """A proposed (RQ) or answered (AC) presentation context."""

    id: int
    abstract_syntax: str = ""  # RQ only
    transfer_syntaxes: tuple[str, ...] = ()
    result: int | None = None  # AC only: 0 acceptance, 1 user-rejection, 2 no-reason, 3, 4


CONTEXT_RESULTS = {0: "acceptance", 1: "user-rejection", 2: "no-reason (provider rejection)",
                   3: "abstract-syntax-not-supported", 4: "transfer-syntaxes-not-supported"}


@dataclass(frozen=True)
class Association:
    """A decoded A-ASSOCIATE-RQ or -AC (PS3.8 Tables 9-11 and 9-17); `raw` is the PDU as received.

    Fixed part: 6..7 protocol-version, 10..25 called AE, 26..41 calling AE, 42..73 reserved,
    74.. variable items (application context 10H, presentation contexts 20H/21H, user info 50H).
    """

    pdu_type: int
    protocol_version: int
    called_ae: str
    calling_ae: str
    application_context: str
    presentation_contexts: tuple[PresentationContext, ...]
    max_pdu_length: int = 0  # 0 = unlimited
    implementation_class_uid: str = ""
    implementation_version: str = ""
    raw: bytes = field(default=b"", repr=False)

    @classmethod
    def decode(cls, pdu: bytes) -> Association:
        if len(pdu) < 74 or pdu[0] not in (A_ASSOCIATE_RQ, A_ASSOCIATE_AC):
            raise ProtocolError(f"not an A-ASSOCIATE-RQ/AC ({len(pdu)} bytes)", (2, 2))
        (length,) = struct.unpack_from(">L", pdu, 2)
        if length != len(pdu) - HEADER.size:
            raise ProtocolError("A-ASSOCIATE PDU length does not match its content", (2, 6))
        (version,) = struct.unpack_from(">H", pdu, 6)
        values: dict[str, Any] = {"application_context": "", "presentation_contexts": []}
        for item_type, body in _items(pdu, 74, 2):
            if item_type == ITEM_APPLICATION_CONTEXT:
                values["application_context"] = _uid(body)
            elif item_type in (ITEM_PRESENTATION_CONTEXT_RQ, ITEM_PRESENTATION_CONTEXT_AC):
                values["presentation_contexts"].append(_presentation_context(item_type, body))
            elif item_type == ITEM_USER_INFORMATION:
                for sub_type, sub in _items(body, 0, 2):
                    if sub_type == SUBITEM_MAX_LENGTH:
                        if len(sub) != 4:
                            raise ProtocolError("maximum length sub-item is not 4 bytes", (2, 6))
                        values["max_pdu_length"] = struct.unpack(">L", sub)[0]
                    elif sub_type == SUBITEM_IMPLEMENTATION_CLASS_UID:
                        values["implementation_class_uid"] = _uid(sub)
                    elif sub_type == SUBITEM_IMPLEMENTATION_VERSION:
                        values["implementation_version"] = sub.decode("ascii", "replace").strip()
            # other item types are skipped, as PS3.8 §9.3 requires
        contexts = values.pop("presentation_contexts")
        return cls(pdu[0], version, _ae(pdu[10:26]), _ae(pdu[26:42]),
                   presentation_contexts=tuple(contexts), raw=pdu, **values)

    def with_called_ae(self, title: str) -> bytes:
        """The raw PDU with bytes 10..25 replaced; the PDU length does not change."""
        return self.raw[:10] + encode_ae(title) + self.raw[26:]

    def with_calling_ae(self, title: str) -> bytes:
        """The raw PDU with bytes 26..41 replaced; the PDU length does not change."""
        return self.raw[:26] + encode_ae(title) + self.raw[42:]

    def context(self, context_id: int) -> PresentationContext | None:
        return next((c for c in self.presentation_contexts if c.id == context_id), None)


def _items(data: bytes, start: int, length_size: int) -> Iterator[tuple[int, bytes]]:
    """Yield (item type, body) for the variable items from `start`; lengths are big endian."""
    position = start
    header = 2 + length_size
    while position < len(data):
        if position + header > len(data):
            raise ProtocolError("truncated item header", (2, 6))
        item_type = data[position]
        item_length = int.from_bytes(data[position + 2:position + header], "big")
        body_start = position + header
        if body_start + item_length > len(data):
            raise ProtocolError(f"item 0x{item_type:02x} runs past the end of its PDU", (2, 6))
        yield item_type, data[body_start:body_start + item_length]
        position = body_start + item_length


def _presentation_context(item_type: int, body: bytes) -> PresentationContext:
    if len(body) < 4:
        raise ProtocolError("presentation context item shorter than 4 bytes", (2, 6))
    abstract, transfers = "", []
    for sub_type, sub in _items(body, 4, 2):
        if sub_type == ITEM_ABSTRACT_SYNTAX:
            abstract = _uid(sub)
        elif sub_type == ITEM_TRANSFER_SYNTAX:
            transfers.append(_uid(sub))
    if item_type == ITEM_PRESENTATION_CONTEXT_RQ:
        return PresentationContext(body[0], abstract, tuple(transfers))
    return PresentationContext(body[0], "", tuple(transfers), result=body[2])


def _uid(body: bytes) -> str:
    return body.rstrip(b"\x00 ").decode("ascii", "replace")


_UID_FORM = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*")


def uid_problem(uid: str) -> str:
    """Why a UID (as decoded: trailing NUL padding gone) is not one ('' when it is): PS3.5
    §9.1, digits and dots, components without leading zeros, at most 64 characters. The
    reason never quotes the value (a log must not carry what a peer sent)."""
    if not uid:
        return "it is empty"
    if len(uid) > 64:
        return f"it has {len(uid)} characters (at most 64)"
    if not _UID_FORM.fullmatch(uid):
        return "it is not digits and dots, without leading zeros (PS3.5 9.1)"
    return ""


def request_uid_problem(request: Association) -> str:
    """The first UID of an A-ASSOCIATE-RQ that is not one (PS3.8 Annex F: abstract and transfer
    syntaxes, the implementation class UID; the application context is checked by name), said
    by where it is; '' when every one is well formed. A member that meets such a request may
    abort it: the gateway refuses it first, so that no member is blamed for it."""
    for context in request.presentation_contexts:
        problem = uid_problem(context.abstract_syntax)
        if problem:
            return f"presentation context {context.id}: abstract syntax UID: {problem}"
        for number, syntax in enumerate(context.transfer_syntaxes, 1):
            problem = uid_problem(syntax)
            if problem:
                return f"presentation context {context.id}: transfer syntax {number}: {problem}"
    if request.implementation_class_uid:
        problem = uid_problem(request.implementation_class_uid)
        if problem:
            return f"implementation class UID: {problem}"
    return ""


def _ae(body: bytes) -> str:
    return body.decode("ascii", "replace").strip()


_NOT_AE = re.compile(rb"[^\x20-\x5b\x5d-\x7e]")  # not printable ASCII, or a backslash


def ae_title_problem(field_bytes: bytes) -> str:
    """Why a 16-byte AE title field is not a valid AE value ('' when it is).

    PS3.5 Table 6.2-1 (AE): the default character repertoire without backslash and control
    characters, not all spaces. Trailing NULs, which some SCUs pad with, are tolerated. The
    reason names positions, never the bytes (a log must not carry what a peer sent).
    """
    title = field_bytes.rstrip(b"\x00")
    outside = _NOT_AE.search(title)  # one C call where a loop over the bytes took 300 bytecodes
    if outside is not None:
        return f"byte {outside.start() + 1} is outside the DICOM default character repertoire"
    if not title.strip(b" "):
        return "it is empty"
    return ""


def encode_ae(title: str) -> bytes:
    """An AE title as the 16 space-padded bytes of the fixed part."""
    data = title.strip().encode("ascii")
    if not 0 < len(data) <= 16:
        raise ValueError(f"AE title {title!r} must be 1 to 16 ASCII characters")
    return data.ljust(16, b" ")


def _item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def _uid_bytes(uid: str) -> bytes:
    return uid.encode("ascii")  # UIDs in items are not padded (PS3.8 Annex F)


def encode_associate_rq(called_ae: str, calling_ae: str,
                        contexts: list[tuple[int, str, list[str]]],
                        max_pdu_length: int = 16384,
                        implementation_version: str = "MEDGATE") -> bytes:
    """An A-ASSOCIATE-RQ proposing `contexts` [(id, abstract syntax, [transfer syntaxes])];
    `implementation_version`: the Implementation Version Name (1-16 characters, PS3.7
    D.3.3.2)."""
    items = _item(ITEM_APPLICATION_CONTEXT, _uid_bytes(DICOM_APPLICATION_CONTEXT))
    for context_id, abstract, transfers in contexts:
        body = bytes([context_id, 0, 0, 0]) + _item(ITEM_ABSTRACT_SYNTAX, _uid_bytes(abstract))
        body += b"".join(_item(ITEM_TRANSFER_SYNTAX, _uid_bytes(t)) for t in transfers)
        items += _item(ITEM_PRESENTATION_CONTEXT_RQ, body)
    user = (_item(SUBITEM_MAX_LENGTH, struct.pack(">L", max_pdu_length))
            + _item(SUBITEM_IMPLEMENTATION_CLASS_UID, _uid_bytes(IMPLEMENTATION_CLASS_UID))
            + _item(SUBITEM_IMPLEMENTATION_VERSION, implementation_version.encode("ascii")))
    items += _item(ITEM_USER_INFORMATION, user)
    fixed = struct.pack(">HH", 1, 0) + encode_ae(called_ae) + encode_ae(calling_ae) + bytes(32)
    body = fixed + items
    return HEADER.pack(A_ASSOCIATE_RQ, 0, len(body)) + body


def encode_associate_ac(request: Association, max_pdu_length: int = 16384) -> bytes:
    """An A-ASSOCIATE-AC accepting every proposed context with its first transfer syntax.

    What a permissive SCP answers; the gateway never sends one itself (tests' fake members do).
    """
    items = _item(ITEM_APPLICATION_CONTEXT, _uid_bytes(DICOM_APPLICATION_CONTEXT))
    for context in request.presentation_contexts:
        body = bytes([context.id, 0, 0, 0]) + _item(ITEM_TRANSFER_SYNTAX,
                                                     _uid_bytes(context.transfer_syntaxes[0]))
        items += _item(ITEM_PRESENTATION_CONTEXT_AC, body)
    items += _item(ITEM_USER_INFORMATION,
                   _item(SUBITEM_MAX_LENGTH, struct.pack(">L", max_pdu_length))
                   + _item(SUBITEM_IMPLEMENTATION_CLASS_UID, _uid_bytes(IMPLEMENTATION_CLASS_UID)))
    body = request.raw[6:74] + items  # PS3.8 §9.3.3: the fixed part echoes the RQ's
    return HEADER.pack(A_ASSOCIATE_AC, 0, len(body)) + body


# ---------------------------------------------------------------------------- P-DATA and DIMSE

@dataclass(frozen=True)
class Pdv:
    """One presentation data value (PS3.8 §9.3.5, Annex E): control header bit 0 command, bit 1 last."""

    context_id: int
    is_command: bool
    is_last: bool
    data: bytes


def decode_p_data(pdu: bytes) -> list[Pdv]:
    """The PDVs of one whole P-DATA-TF PDU (as PduReader gives it); ProtocolError when an
    item does not fit."""
    if len(pdu) < HEADER.size or pdu[0] != P_DATA_TF:
        raise ProtocolError("not a P-DATA-TF PDU", (2, 2))
    pdvs, position = [], HEADER.size
    while position < len(pdu):
        if position + 6 > len(pdu):
            raise ProtocolError("a PDV item header runs past its P-DATA-TF", (2, 6))
        length, context, control = struct.unpack_from(">LBB", pdu, position)
        if length < 2 or position + 4 + length > len(pdu):
            raise ProtocolError("a PDV item length does not fit its P-DATA-TF", (2, 6))
        pdvs.append(Pdv(context, bool(control & 1), bool(control & 2),
                        pdu[position + 6:position + 4 + length]))
        position += 4 + length
    return pdvs


def encode_p_data(pdvs: list[Pdv]) -> bytes:
    body = b""
    for pdv in pdvs:
        control = (1 if pdv.is_command else 0) | (2 if pdv.is_last else 0)
        body += struct.pack(">LBB", len(pdv.data) + 2, pdv.context_id, control) + pdv.data
    return HEADER.pack(P_DATA_TF, 0, len(body)) + body


# Command elements (PS3.7 §9.3, Annex E), always Implicit VR Little Endian.
TAG_AFFECTED_SOP_CLASS = 0x00000002
TAG_COMMAND_FIELD = 0x00000100
TAG_MESSAGE_ID = 0x00000110
TAG_MESSAGE_ID_RESPONDED = 0x00000120
TAG_DATA_SET_TYPE = 0x00000800
TAG_STATUS = 0x00000900
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
NO_DATA_SET = 0x0101


def _element(tag: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\x00"
    return struct.pack("<HHL", tag >> 16, tag & 0xFFFF, len(value)) + value


def encode_command(elements: dict[int, bytes | int | str]) -> bytes:
    """A command set: ints as US, strings as UIDs, with the (0000,0000) group length first."""
    body = b""
    for tag in sorted(elements):
        value = elements[tag]
        if isinstance(value, int):
            value = struct.pack("<H", value)
        elif isinstance(value, str):
            value = value.encode("ascii")
        body += _element(tag, value)
    return _element(0, struct.pack("<L", len(body))) + body


def encode_c_echo_rq(context_id: int, message_id: int) -> bytes:
    """A P-DATA-TF carrying a whole C-ECHO-RQ command (PS3.7 Table 9.3-12)."""
    command = encode_command({TAG_AFFECTED_SOP_CLASS: VERIFICATION_SOP_CLASS,
                              TAG_COMMAND_FIELD: C_ECHO_RQ, TAG_MESSAGE_ID: message_id,
                              TAG_DATA_SET_TYPE: NO_DATA_SET})
    return encode_p_data([Pdv(context_id, True, True, command)])


C_FIND_RQ = 0x0020
TAG_PRIORITY = 0x00000700


def encode_c_find_rq(context_id: int, message_id: int, identifier: bytes) -> bytes:
    """P-DATA-TFs carrying a C-FIND-RQ (PS3.7 §9.1.2) and its identifier."""
    command = encode_command({TAG_AFFECTED_SOP_CLASS: STUDY_ROOT_FIND,
                              TAG_COMMAND_FIELD: C_FIND_RQ, TAG_MESSAGE_ID: message_id,
                              TAG_PRIORITY: 0, TAG_DATA_SET_TYPE: 0x0000})
    return (encode_p_data([Pdv(context_id, True, True, command)])
            + encode_p_data([Pdv(context_id, False, True, identifier)]))


def encode_study_query(patient_id: str) -> bytes:
    """An Implicit VR LE identifier: STUDY level, this Patient ID, Study Instance UID asked."""
    def text(value: str) -> bytes:
        data = value.encode("ascii", "replace")
        return data + b" " if len(data) % 2 else data
    return (_element(0x00080052, text("STUDY")) + _element(0x00100020, text(patient_id))
            + _element(0x0020000D, b""))


def encode_c_echo_rsp(context_id: int, message_id: int, status: int = 0) -> bytes:
    """A P-DATA-TF carrying a C-ECHO-RSP (PS3.7 Table 9.3-13)."""
    command = encode_command({TAG_AFFECTED_SOP_CLASS: VERIFICATION_SOP_CLASS,
                              TAG_COMMAND_FIELD: C_ECHO_RSP, TAG_MESSAGE_ID_RESPONDED: message_id,
                              TAG_DATA_SET_TYPE: NO_DATA_SET, TAG_STATUS: status})
    return encode_p_data([Pdv(context_id, True, True, command)])
