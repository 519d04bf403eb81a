"""HL7 v2 message structure checked with hl7apy: the segments and field types that MSH-9's
message structure and MSH-12's version require (strict parse, then validate).

Used where a whole parse is worth its cost (about 7 ms a message, so never on the relay path
unless a VIP asks with `validate = "structure"`): the gateway's optional validation, the
receiver simulator's `--validate`, and the check of a heartbeat file at config load.
Pure: bytes in, a Problem or None out.
"""

from __future__ import annotations

from dataclasses import dataclass

# hl7apy 1.3 models ORM^O01's order detail choice (one of OBR, RQD, RQ1, RXO, ODS, ODT) as a
# sequence, so it finds every real ORM^O01 "missing" the others. That complaint is no problem;
# hl7apy stops at its first error, so the rest of such a message goes unchecked.
_HL7APY_CHOICE = "Missing required child ORM_O01_OBRRQDRQ1RXOODSODT_SUPPGRP."


@dataclass(frozen=True)
class Problem:
    """Why hl7apy rejects a message: `kind` (its exception's name, safe to log: it quotes
    nothing of the message) and `detail` (its text, which may quote field values: for the
    sender's ERR segment only, never a log)."""

    kind: str
    detail: str


def _text(payload: bytes) -> str:
    return payload.decode("latin-1").replace("\r\n", "\r").replace("\n", "\r").strip("\r")


def parse_problem(payload: bytes) -> Problem | None:
    """None when hl7apy can parse the message at all (tolerantly, as a receiving engine
    does: unknown segments and loose values pass); else why not."""
    from hl7apy.parser import parse_message

    try:
        parse_message(_text(payload), find_groups=False)
    except Exception as exc:  # hl7apy raises a dozen types
        return Problem(type(exc).__name__, str(exc) or type(exc).__name__)
    return None


def structure_problem(payload: bytes) -> Problem | None:
    """None when hl7apy parses and validates the message strictly; else why not."""
    from hl7apy import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    try:
        message = parse_message(_text(payload), validation_level=VALIDATION_LEVEL.STRICT,
                                find_groups=True)
        message.validate()
    except Exception as exc:  # hl7apy raises a dozen types (and ValueError for bad values)
        if str(exc).startswith(_HL7APY_CHOICE):
            return None
        return Problem(type(exc).__name__, str(exc) or type(exc).__name__)
    return None
