"""Realistic HL7 v2.5 test messages, built and validated with hl7apy.

Each kind is built once with hl7apy (strict validation: the structure its message type
requires) into a template; each message is then that template with its own MSH-10, patient and
time, so thousands of messages cost string replacements, not hl7apy's ~3 ms per message.
Only test data: patients are `<prefix>PAT00001`..., named TEST^PATIENT.
"""

from __future__ import annotations

import datetime
import functools

# --kind names: the short ones are what `gateway simulate hl7-sender --type` always took.
KINDS = {
    "ADT": "ADT^A01", "ADT^A01": "ADT^A01", "ADT^A04": "ADT^A04", "ADT^A08": "ADT^A08",
    "ORM": "ORM^O01", "ORM^O01": "ORM^O01", "ORU": "ORU^R01", "ORU^R01": "ORU^R01",
    "NMD": "NMD^N02", "NMD^N02": "NMD^N02",
}
# Placeholders: valid values of their fields' types (hl7apy checks them), unique in a message.
_TIME = "19000101000000"
_CONTROL = "CONTROLIDTOKEN"
_PATIENT = "PATIENTIDTOKEN"
_NUMBER = "NUMBERTOKEN"


def _header(message, application: str, message_type: str) -> None:
    msh = message.msh
    msh.msh_3, msh.msh_4, msh.msh_5, msh.msh_6 = application, "HOSP", "RIS", "HOSP"
    msh.msh_7, msh.msh_9, msh.msh_10 = _TIME, message_type, _CONTROL
    msh.msh_11, msh.msh_12 = "P", "2.5"


def _patient(pid) -> None:
    pid.pid_1 = "1"
    pid.pid_3 = f"{_PATIENT}^^^HOSP^MR"
    pid.pid_5 = f"TEST^PATIENT {_NUMBER}"
    pid.pid_7, pid.pid_8 = "19700101", "U"


@functools.cache
def template(kind: str) -> str:
    """The ER7 text of one message of `kind` (a KINDS key), with placeholders."""
    from hl7apy import VALIDATION_LEVEL
    from hl7apy.core import Message

    message_type = KINDS[kind]
    code, event = message_type.split("^")
    structure = "ADT_A01" if code == "ADT" else f"{code}_{event}"  # A04, A08 share A01's
    message = Message(structure, version="2.5", validation_level=VALIDATION_LEVEL.STRICT)
    application = {"ADT": "HIS", "ORM": "HIS", "ORU": "LAB", "NMD": "MEDGATE"}[code]
    _header(message, application, f"{message_type}^{structure}")
    if code == "ADT":
        message.evn.evn_2 = _TIME
        _patient(message.pid)
        message.pv1.pv1_2, message.pv1.pv1_3 = "I", "WARD1^101^A"
    elif code == "ORM":
        _patient(message.orm_o01_patient.pid)
        order = message.orm_o01_order
        order.orc.orc_1, order.orc.orc_2 = "NW", _CONTROL
        detail = order.add_group("ORM_O01_ORDER_DETAIL")
        request = detail.add_group("ORM_O01_OBRRQDRQ1RXOODSODT_SUPPGRP")
        request.add_segment("OBR")
        request.obr.obr_1, request.obr.obr_2 = "1", _CONTROL
        request.obr.obr_4 = "71020^Chest X-ray 2 views^C4"
    elif code == "ORU":
        result = message.oru_r01_patient_result
        _patient(result.oru_r01_patient.pid)
        order = result.oru_r01_order_observation
        order.obr.obr_1, order.obr.obr_4 = "1", "CBC^Blood count^L"
        observation = order.oru_r01_observation.obx
        observation.obx_1, observation.obx_2, observation.obx_3 = "1", "NM", "HGB^Hemoglobin^L"
        observation.obx_5, observation.obx_6, observation.obx_11 = "130", "g/L", "F"
    else:  # NMD^N02: the system clock, nothing clinical
        clock = message.add_group("NMD_N02_CLOCK_AND_STATS_WITH_NOTES").add_group("NMD_N02_CLOCK")
        clock.nck.nck_1 = _TIME
    if code != "ORM":  # hl7apy models ORM^O01's OBR/RQD/RQ1/RXO/ODS/ODT choice as a sequence
        message.validate()
    return message.to_er7() + "\r"


def make_messages(count: int, kind: str = "ADT", patients: int | None = None,
                  prefix: str = "SIM", first: int = 1) -> list[bytes]:
    """`count` messages of `kind` with MSH-10 `<prefix><number>` (numbered from `first`) over
    `patients` patient IDs."""
    if kind not in KINDS:
        raise ValueError(f"message kind {kind!r} is not one of {', '.join(KINDS)}")
    patients = patients or count
    text = template(kind).replace(_TIME, datetime.datetime.now().strftime("%Y%m%d%H%M%S"))
    messages = []
    for number in range(first, first + count):
        messages.append(text.replace(_CONTROL, f"{prefix}{number:06d}")
                        .replace(_PATIENT, f"{prefix}PAT{(number - 1) % patients + 1:05d}")
                        .replace(_NUMBER, str(number)).encode("ascii"))
    return messages
