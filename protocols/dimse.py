"""DIMSE command peek (PS3.7 §9/§10 command sets in PS3.8 §9.3.5 P-DATA-TF PDVs), sans-IO.

`CommandPeek` follows one direction of an association's byte stream after the A-ASSOCIATE-AC:
PDU and PDV boundaries are tracked, command PDVs (control header bit 0 set: a few hundred bytes)
are reassembled per presentation context and decoded into `Command`s, and data set PDVs (the
images) are counted and skipped, never copied or parsed, except on the contexts named in
`keep_data` (a storage commitment result's: kept whole, up to MAX_DATA_SET, for the caller to
read). Commands are always Implicit VR Little Endian (PS3.7 §6.3.1).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

P_DATA_TF = 0x04
_PDU_HEADER = struct.Struct(">BBL")
_PDV_HEADER = struct.Struct(">LBB")
MAX_COMMAND = 65536  # a command set larger than this is not reassembled (real ones: < 1 KiB)
MAX_DATA_SET = 8 * 1024 * 1024  # a kept data set larger than this is dropped (an error says so)

# Command Field values (PS3.7 Annex E)
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_GET_RQ, C_GET_RSP = 0x0010, 0x8010
C_FIND_RQ, C_FIND_RSP = 0x0020, 0x8020
C_MOVE_RQ, C_MOVE_RSP = 0x0021, 0x8021
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
N_EVENT_REPORT_RQ, N_EVENT_REPORT_RSP = 0x0100, 0x8100
N_SET_RQ, N_SET_RSP = 0x0120, 0x8120
N_ACTION_RQ, N_ACTION_RSP = 0x0130, 0x8130
N_CREATE_RQ, N_CREATE_RSP = 0x0140, 0x8140
C_CANCEL_RQ = 0x0FFF
PENDING = (0xFF00, 0xFF01)  # statuses of a response with more to come (PS3.7 Annex C.4)
COMMAND_NAMES = {
    C_STORE_RQ: "C-STORE-RQ", C_STORE_RSP: "C-STORE-RSP", C_GET_RQ: "C-GET-RQ",
    C_GET_RSP: "C-GET-RSP", C_FIND_RQ: "C-FIND-RQ", C_FIND_RSP: "C-FIND-RSP",
    C_MOVE_RQ: "C-MOVE-RQ", C_MOVE_RSP: "C-MOVE-RSP", C_ECHO_RQ: "C-ECHO-RQ",
    C_ECHO_RSP: "C-ECHO-RSP", N_EVENT_REPORT_RQ: "N-EVENT-REPORT-RQ",
    N_EVENT_REPORT_RSP: "N-EVENT-REPORT-RSP", N_SET_RQ: "N-SET-RQ", N_SET_RSP: "N-SET-RSP",
    N_ACTION_RQ: "N-ACTION-RQ", N_ACTION_RSP: "N-ACTION-RSP", N_CREATE_RQ: "N-CREATE-RQ",
    N_CREATE_RSP: "N-CREATE-RSP", C_CANCEL_RQ: "C-CANCEL-RQ",
}

_AFFECTED_CLASS, _REQUESTED_CLASS = 0x00000002, 0x00000003
_COMMAND_FIELD, _MESSAGE_ID, _RESPONDED_TO = 0x00000100, 0x00000110, 0x00000120
_MOVE_DESTINATION, _STATUS = 0x00000600, 0x00000900
_AFFECTED_INSTANCE, _REQUESTED_INSTANCE = 0x00001000, 0x00001001


class DimseError(Exception):
    """A command set that cannot be read; the relay carries on (it only peeks)."""


@dataclass(frozen=True)
class Command:
    """The fields of one command set the gateway acts on; None where absent."""

    context_id: int
    field: int
    message_id: int | None = None
    responded_to: int | None = None
    status: int | None = None
    sop_class: str = ""  # Affected, else Requested SOP Class UID
    sop_instance: str = ""  # Affected, else Requested SOP Instance UID
    move_destination: str = ""

    @property
    def name(self) -> str:
        return COMMAND_NAMES.get(self.field, f"command 0x{self.field:04x}")

    @property
    def is_response(self) -> bool:
        return bool(self.field & 0x8000)


def member_unwell(field: int, status: int | None) -> bool:
    """Whether a response says the SCP itself is in trouble, not the request: a C-STORE refused
    "out of resources" (A7xx, PS3.4 B.2.3), an N-CREATE or N-SET refused for "resource
    limitation" (0213, PS3.7 §10.1.3 and §10.1.5, Annex C), or a "processing failure" (0110,
    PS3.7 Annex C: a general failure of the SCP) of any of these three. C-FIND, C-GET and
    C-MOVE statuses never say it: a query or retrieve can be refused for its own size."""
    if status is None:
        return False
    if field == C_STORE_RSP:
        return status & 0xFF00 == 0xA700 or status == 0x0110
    if field in (N_CREATE_RSP, N_SET_RSP):
        return status in (0x0213, 0x0110)
    return False


def status_meaning(status: int) -> str:
    """A few words for a status (PS3.7 Annex C), for logs."""
    if status == 0x0000:
        return "success"
    if status in PENDING:
        return "pending"
    if status == 0xFE00:
        return "cancel"
    if status & 0xFF00 == 0xA700:
        return "refused: out of resources"
    if status == 0x0110:
        return "processing failure"
    if status & 0xFF00 == 0xA900:
        return "error: data set does not match SOP class"
    if status & 0xF000 == 0xC000:
        return "error: cannot understand"
    if status & 0xF000 == 0xB000:
        return "warning"
    return "failure"


def decode(context_id: int, data: bytes) -> Command:
    """The command set of one presentation context, whole; DimseError when unreadable."""
    elements: dict[int, bytes] = {}
    position = 0
    while position < len(data):
        if position + 8 > len(data):
            raise DimseError("truncated command element")
        group, element, length = struct.unpack_from("<HHL", data, position)
        position += 8
        if group != 0:
            raise DimseError(f"element ({group:04x},{element:04x}) in a command set")
        if length > len(data) - position:
            raise DimseError("command element runs past the command set")
        elements[element] = data[position:position + length]
        position += length
    field = _us(elements, _COMMAND_FIELD & 0xFFFF)
    if field is None:
        raise DimseError("command set without a Command Field")
    return Command(context_id, field, _us(elements, _MESSAGE_ID & 0xFFFF),
                   _us(elements, _RESPONDED_TO & 0xFFFF), _us(elements, _STATUS & 0xFFFF),
                   _uid(elements, _AFFECTED_CLASS) or _uid(elements, _REQUESTED_CLASS),
                   _uid(elements, _AFFECTED_INSTANCE) or _uid(elements, _REQUESTED_INSTANCE),
                   _ae(elements.get(_MOVE_DESTINATION & 0xFFFF, b"")))


def _us(elements: dict[int, bytes], element: int) -> int | None:
    value = elements.get(element)
    return struct.unpack("<H", value[:2])[0] if value is not None and len(value) >= 2 else None


def _uid(elements: dict[int, bytes], tag: int) -> str:
    value = elements.get(tag & 0xFFFF)
    if not value:
        return ""
    value = value.rstrip(b"\x00 ")
    # A UID is digits and dots only (PS3.5 9.1): strip() them all and nothing may be left.
    return value.decode("ascii") if len(value) <= 64 and not value.strip(b"0123456789.") else ""


def _ae(value: bytes) -> str:
    text = value.strip(b" \x00").decode("ascii", "replace")
    return text if len(text) <= 16 and text.isprintable() else ""


_DROPPED = bytearray()  # marks a kept data set that grew too large: its rest is skipped


class CommandPeek:
    """Follows one direction of an association's PDUs without copying their bodies: where the
    PDU boundaries are (`at_boundary`, `pdus`, `last_type`, for a clean A-ABORT and to know how
    it ended), and the commands in its P-DATA (see the module)."""

    def __init__(self, keep_data: frozenset[int] = frozenset()) -> None:
        self.keep_data = keep_data  # contexts whose data sets are kept whole (`data_sets`)
        self._data: dict[int, bytearray] = {}  # context -> kept data set bytes so far
        self.data_sets: list[tuple[int, bytes]] = []  # (context, data set), for the caller
        self.pdus = 0
        self.last_type = 0
        self._header = bytearray()  # a PDU header (6 bytes) or a PDV item header (6 bytes)
        self._pdu_left = 0  # body bytes of the current PDU still to come
        self._in_p_data = False
        self._pdv_left = 0  # value bytes of the current PDV still to come
        self._pdv_context = 0
        self._pdv_control = 0
        self._fragments: dict[int, bytearray] = {}  # context -> command bytes so far
        self._oversize: set[int] = set()  # contexts whose command grew past MAX_COMMAND
        self.data_bytes = 0  # data set bytes seen (counted, never kept)
        self.commands: list[Command] = []  # decoded, waiting for `take`
        self.errors: list[str] = []  # what could not be read (the relay logs and carries on)

    @property
    def at_boundary(self) -> bool:
        """Between two PDUs (an A-ABORT may be inserted here)."""
        return not self._pdu_left and not self._header and not self._in_p_data

    def take(self) -> list[Command]:
        """The commands decoded since the last call."""
        commands, self.commands = self.commands, []
        return commands

    def feed(self, data: bytes | bytearray) -> None:
        view = memoryview(data)
        position, size = 0, len(view)
        while position < size:
            if (size - position >= 6 and not self._pdu_left and not self._header
                    and not self._in_p_data):
                # The usual cases, one step per PDU, all of it in this chunk: a PDU other than
                # P-DATA-TF (skipped), or a P-DATA-TF holding exactly one PDV: data (images:
                # counted and skipped) or a whole command (read here).
                pdu_type, _, length = _PDU_HEADER.unpack_from(data, position)
                end = position + 6 + length
                if end <= size and pdu_type != P_DATA_TF:
                    self.pdus += 1
                    self.last_type = pdu_type
                    position = end
                    continue
                if end <= size and length >= 6:
                    pdv_length, context, control = _PDV_HEADER.unpack_from(data, position + 6)
                    if pdv_length + 4 == length and pdv_length >= 2 and (
                            not control & 1 or (control & 3 == 3 and pdv_length - 2 <= MAX_COMMAND
                                                and context not in self._fragments
                                                and context not in self._oversize)):
                        self.pdus += 1
                        self.last_type = pdu_type
                        position = end
                        if not control & 1:
                            self.data_bytes += pdv_length - 2
                            if context in self.keep_data:
                                self._keep(context, view[position - length + 6:position],
                                           bool(control & 2))
                        else:
                            self._command(context, bytes(view[position - length + 6:position]))
                        continue
            if not self._pdu_left and len(self._header) < 6 and not self._in_p_data:
                position = self._read_header(view, position)
                if len(self._header) == 6:
                    pdu_type, _, length = struct.unpack(">BBL", self._header)
                    self._header.clear()
                    self.pdus += 1
                    self.last_type = pdu_type
                    self._pdu_left = length
                    self._in_p_data = pdu_type == P_DATA_TF and length > 0
                continue
            if not self._in_p_data:  # another PDU's body: skipped
                step = min(self._pdu_left, size - position)
                self._pdu_left -= step
                position += step
                continue
            if self._pdv_left:
                step = min(self._pdv_left, size - position, self._pdu_left)
                self._pdv_value(view[position:position + step])
                self._pdv_left -= step
                self._pdu_left -= step
                position += step
                if not self._pdv_left:
                    self._pdv_end()
            else:
                start = position
                position = self._read_header(view, position, limit=self._pdu_left)
                self._pdu_left -= position - start
                if len(self._header) == 6:
                    length, self._pdv_context, self._pdv_control = struct.unpack(
                        ">LBB", self._header)
                    self._header.clear()
                    if length < 2 or length - 2 > self._pdu_left:
                        self.errors.append("PDV item length does not fit its PDU")
                        self._skip_pdu()
                    else:
                        self._pdv_left = length - 2
                        if not self._pdv_left:
                            self._pdv_end()
            if not self._pdu_left:
                self._in_p_data = False
                if self._header or self._pdv_left:
                    self.errors.append("P-DATA-TF ends inside a PDV item")
                    self._header.clear()
                    self._pdv_left = 0

    def _read_header(self, view: memoryview, position: int, limit: int | None = None) -> int:
        need = 6 - len(self._header)
        if limit is not None:
            need = min(need, limit)
        chunk = view[position:position + need]
        self._header += chunk
        return position + len(chunk)

    def _skip_pdu(self) -> None:
        """Give up on the rest of this P-DATA-TF (its remaining bytes are skipped)."""
        self._in_p_data = False
        self._pdv_left = 0

    def _pdv_value(self, chunk: memoryview) -> None:
        if not self._pdv_control & 1:
            self.data_bytes += len(chunk)
            if self._pdv_context in self.keep_data:
                self._keep(self._pdv_context, chunk, False)
            return
        context = self._pdv_context
        if context in self._oversize:
            return
        fragments = self._fragments.setdefault(context, bytearray())
        if len(fragments) + len(chunk) > MAX_COMMAND:
            self._oversize.add(context)
            del self._fragments[context]
            self.errors.append(f"command set on context {context} over {MAX_COMMAND} bytes")
            return
        fragments += chunk

    def _pdv_end(self) -> None:
        if self._pdv_control & 3 == 2 and self._pdv_context in self.keep_data:
            self._keep(self._pdv_context, memoryview(b""), True)
        if self._pdv_control & 3 != 3:  # a data PDV, or a command fragment that is not the last
            return
        context = self._pdv_context
        if context in self._oversize:  # its end: the next command starts afresh
            self._oversize.discard(context)
            return
        self._command(context, bytes(self._fragments.pop(context, b"")))

    def _keep(self, context: int, chunk: memoryview, last: bool) -> None:
        """A piece of a kept context's data set; the whole of it at its last fragment."""
        kept = self._data.setdefault(context, bytearray())
        if kept is not _DROPPED:
            if len(kept) + len(chunk) > MAX_DATA_SET:
                self.errors.append(f"data set on context {context} over {MAX_DATA_SET} bytes")
                self._data[context] = kept = _DROPPED
            else:
                kept += chunk
        if last:
            del self._data[context]
            if kept is not _DROPPED:
                self.data_sets.append((context, bytes(kept)))

    def _command(self, context: int, data: bytes) -> None:
        try:
            self.commands.append(decode(context, data))
        except DimseError as exc:
            self.errors.append(f"context {context}: {exc}")


__all__ = ["COMMAND_NAMES", "Command", "CommandPeek", "DimseError", "MAX_COMMAND",
           "MAX_DATA_SET", "PENDING", "decode", "member_unwell", "status_meaning"]
