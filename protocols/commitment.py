"""A storage commitment result (PS3.4 J.3.3, the N-EVENT-REPORT's data set), sans-IO: which
instances the archive committed and which it did not, and why.

The one data set the gateway reads: the Transaction UID (0008,1195), the Referenced SOP Sequence
(0008,1199) and the Failed SOP Sequence (0008,1198) with each Failure Reason (0008,1197), in
implicit or explicit VR little endian (PS3.5 §7.1, §7.5: sequences and items of defined or
undefined length). Everything else is skipped. Bounded: MAX_DEPTH nested sequences, MAX_ITEMS
items; the caller bounds the bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import NamedTuple

STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"  # Storage Commitment Push Model SOP Class
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
MAX_DEPTH = 8
MAX_ITEMS = 200_000

TRANSACTION_UID = 0x00081195
REFERENCED_SOPS = 0x00081199
FAILED_SOPS = 0x00081198
FAILURE_REASON = 0x00081197
SOP_CLASS = 0x00081150
SOP_INSTANCE = 0x00081155
_SEQUENCES = {REFERENCED_SOPS, FAILED_SOPS}  # known as sequences without a VR (implicit)
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
             b"UT", b"UV"}  # a 4-byte length after 2 reserved bytes (PS3.5 Table 7.1-1)
_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<L")

# A value, or a sequence's items (each a dict of elements).
Element = bytes | list[dict[int, "Element"]]


class DataSetError(Exception):
    """The data set cannot be read; `reason` says where."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Reference(NamedTuple):
    sop_class: str
    sop_instance: str


class Failure(NamedTuple):
    sop_class: str
    sop_instance: str
    reason: int | None  # (0008,1197): 0x0110 processing failure, 0x0112 no such object, ...


@dataclass(frozen=True)
class CommitmentResult:
    transaction_uid: str
    committed: tuple[Reference, ...]
    failed: tuple[Failure, ...]


def read_result(data: bytes, transfer_syntax: str) -> CommitmentResult:
    """The result an N-EVENT-REPORT's data set carries; DataSetError when it cannot be read
    (a transfer syntax other than implicit or explicit VR little endian among the causes)."""
    if transfer_syntax not in (IMPLICIT_LE, EXPLICIT_LE):
        raise DataSetError(f"transfer syntax {transfer_syntax} is not read (only implicit and "
                           "explicit VR little endian)")
    parser = _Parser(memoryview(data), transfer_syntax == EXPLICIT_LE)
    elements, _ = parser.data_set(0, len(data), 0, in_item=False)
    return CommitmentResult(
        _text(elements.get(TRANSACTION_UID, b"")),
        tuple(Reference(_text(item.get(SOP_CLASS, b"")), _text(item.get(SOP_INSTANCE, b"")))
              for item in _items(elements, REFERENCED_SOPS)),
        tuple(Failure(_text(item.get(SOP_CLASS, b"")), _text(item.get(SOP_INSTANCE, b"")),
                      _us(item.get(FAILURE_REASON)))
              for item in _items(elements, FAILED_SOPS)))


class _Parser:
    def __init__(self, view: memoryview, explicit: bool) -> None:
        self.view = view
        self.explicit = explicit
        self.items = 0

    def data_set(self, position: int, end: int, depth: int,
                 in_item: bool) -> tuple[dict[int, Element], int]:
        """The elements from `position` to `end`, or (`in_item`) to an item delimitation."""
        view = self.view
        elements: dict[int, Element] = {}
        while position < end:
            if end - position < 8:
                raise DataSetError(f"element header cut off at byte {position}")
            group, number = _TAG.unpack_from(view, position)
            tag = group << 16 | number
            if tag == _ITEM_END:
                if not in_item:
                    raise DataSetError(f"item delimitation outside an item at byte {position}")
                return elements, position + 8
            vr = bytes(view[position + 4:position + 6]) if self.explicit and group != 0xFFFE \
                else b""
            if vr in _LONG_VRS:
                if end - position < 12:
                    raise DataSetError(f"element header cut off at byte {position}")
                length, position = _U32.unpack_from(view, position + 8)[0], position + 12
            elif vr:
                length, position = _U16.unpack_from(view, position + 6)[0], position + 8
            else:
                length, position = _U32.unpack_from(view, position + 4)[0], position + 8
            if vr == b"SQ" or length == _UNDEFINED or (not vr and tag in _SEQUENCES):
                elements[tag], position = self.sequence(position, length, end, depth + 1)
                continue
            if position + length > end:
                raise DataSetError(f"element ({group:04X},{number:04X}) runs past its end")
            elements[tag] = bytes(view[position:position + length])
            position += length
        if in_item:
            raise DataSetError("an item of undefined length has no item delimitation")
        return elements, position

    def sequence(self, position: int, length: int, end: int,
                 depth: int) -> tuple[list[dict[int, Element]], int]:
        if depth > MAX_DEPTH:
            raise DataSetError(f"sequences nested deeper than {MAX_DEPTH}")
        if length != _UNDEFINED:
            if position + length > end:
                raise DataSetError(f"a sequence at byte {position} runs past its end")
            end = position + length
        items: list[dict[int, Element]] = []
        while position < end:
            if end - position < 8:
                raise DataSetError(f"item header cut off at byte {position}")
            group, number = _TAG.unpack_from(self.view, position)
            tag, item_length = group << 16 | number, _U32.unpack_from(self.view, position + 4)[0]
            position += 8
            if tag == _SEQUENCE_END and length == _UNDEFINED:
                return items, position
            if tag != _ITEM:
                raise DataSetError(f"({group:04X},{number:04X}) where an item should be")
            self.items += 1
            if self.items > MAX_ITEMS:
                raise DataSetError(f"more than {MAX_ITEMS} items")
            if item_length == _UNDEFINED:
                item, position = self.data_set(position, end, depth, in_item=True)
            else:
                if position + item_length > end:
                    raise DataSetError(f"an item at byte {position} runs past its sequence")
                item, _ = self.data_set(position, position + item_length, depth, in_item=False)
                position += item_length
            items.append(item)
        if length == _UNDEFINED:
            raise DataSetError("a sequence of undefined length has no sequence delimitation")
        return items, position


def _items(elements: dict[int, Element], tag: int) -> list[dict[int, Element]]:
    value = elements.get(tag, [])
    if not isinstance(value, list):
        raise DataSetError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) is not a sequence")
    return value


def _text(value: Element) -> str:
    if not isinstance(value, bytes):
        raise DataSetError("a UID is a sequence")
    return value.rstrip(b"\x00 ").decode("ascii", "replace")


def _us(value: Element | None) -> int | None:
    if isinstance(value, bytes) and len(value) == 2:
        return int(_U16.unpack(value)[0])
    return None


__all__ = ["CommitmentResult", "DataSetError", "EXPLICIT_LE", "Failure", "IMPLICIT_LE",
           "Reference", "STORAGE_COMMITMENT", "read_result"]
