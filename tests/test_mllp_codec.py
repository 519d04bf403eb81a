"""protocols/mllp.py with plain bytes; python-hl7 (an independent parser) reads what we build."""

from __future__ import annotations

import hl7
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.mllp import (END, SB, HL7Error, Junk, Message, MissingControlId, MllpReader,
                            Oversize, build_ack, frame, peek_ack, peek_header)

ADT = (b"MSH|^~\\&|HIS|NORTHWING|RIS|HOSP|20261126120000||ADT^A01^ADT_A01|CTRL0042|P|2.5.1\r"
       b"EVN|A01|20261126120000\r"
       b"PID|1||PAT123^^^HOSP^MR~999-99-9999^^^SSA^SS||DOE^JANE\r"
       b"PV1|1|I\r")


def events(reader: MllpReader):
    out = []
    while (event := reader.next_event()) is not None:
        out.append(event)
    return out


def test_peek_header_reads_the_routing_fields():
    header = peek_header(ADT)
    assert (header.sending_application, header.sending_facility) == ("HIS", "NORTHWING")
    assert header.message_type == "ADT^A01^ADT_A01" and header.trigger_event == "A01"
    assert (header.control_id, header.version, header.processing_id) == ("CTRL0042", "2.5.1", "P")
    assert header.patient_id == "PAT123^^^HOSP^MR"  # first repetition only
    assert not header.enhanced_mode


def test_peek_header_other_separators_and_lf_segments():
    message = b"MSH#@~\\&#A#B#C#D#20260101##ORU@R01#X9#P#2.3###AL#NE\nPID#1##P9\n"
    header = peek_header(message)
    assert (header.control_id, header.patient_id, header.trigger_event) == ("X9", "P9", "R01")
    assert header.enhanced_mode and header.accept_ack_type == "AL"


@pytest.mark.parametrize("bad, why", [
    (b"PID|1||X\r", "does not start with an MSH"), (b"", "does not start with an MSH"),
    (b"MSH|^~\\&|A|B|C|D|2026||ADT^A01||P|2.5\r", "MSH-10"),
])
def test_peek_header_refuses_what_it_cannot_answer(bad, why):
    with pytest.raises(HL7Error, match=why):
        peek_header(bad)


def test_a_message_without_a_control_id_is_refused_with_what_answers_it():
    """No MSH-10: MissingControlId, an HL7Error that holds the header (the gateway's reject
    is addressed from it)."""
    with pytest.raises(MissingControlId) as refused:
        peek_header(b"MSH|^~\\&|LAB|HOSP|RIS|WARD|2026||ORU^R01||P|2.5|||AL\rPID|1||P7\r")
    header = refused.value.header
    assert (header.sending_application, header.sending_facility, header.control_id,
            header.message_type, header.accept_ack_type, header.patient_id) == (
        "LAB", "HOSP", "", "ORU^R01", "AL", "P7")


def test_ack_and_nak_read_by_python_hl7():
    header = peek_header(ADT)
    nak = build_ack(header, "AR", control_id="MEDGATE7", timestamp="20261126120001",
                    text="medgate: no member is up | really")
    parsed = hl7.parse(nak.decode())
    assert str(parsed.segment("MSH")[3]) == "RIS" and str(parsed.segment("MSH")[5]) == "HIS"
    assert str(parsed.segment("MSH")[9]) == "ACK^A01^ACK"
    assert str(parsed["MSA.1"]) == "AR" and str(parsed["MSA.2"]) == "CTRL0042"
    assert str(parsed.segment("ERR")[3]) == "207^Application internal error^HL70357"
    assert str(parsed.segment("ERR")[8]) == "medgate: no member is up   really"
    ack = peek_ack(nak)
    assert (ack.code, ack.control_id, ack.positive) == ("AR", "CTRL0042", False)
    positive = build_ack(header, "AA", control_id="R1", timestamp="20261126120001")
    assert b"ERR" not in positive and peek_ack(positive).positive


def test_reader_frames_junk_and_tolerated_line_ends():
    reader = MllpReader()
    reader.feed(frame(ADT) + b"\r\n" + frame(b"MSH|x") + b"garbage" + SB + b"MSH|y" + END)
    got = events(reader)
    assert got == [Message(ADT), Message(b"MSH|x"), Junk(b"garbage"), Message(b"MSH|y")]


def test_oversize_frame_is_reported_as_soon_as_it_passes_the_limit_and_not_buffered():
    reader = MllpReader(max_message_bytes=1000)
    big = ADT + b"OBX|1|ED|PDF||" + b"A" * 50_000 + b"\r"
    reader.feed(SB)
    seen = []
    for start in range(0, len(big), 700):
        reader.feed(big[start:start + 700])
        seen += events(reader)
        assert reader.buffered <= 1000 + 700
    (oversize,) = seen  # at 1400 bytes, long before the end block
    assert isinstance(oversize, Oversize) and 1000 < oversize.size <= 1400
    assert peek_header(oversize.head).control_id == "CTRL0042"
    reader.feed(END + frame(b"MSH|next"))
    assert events(reader) == [Message(b"MSH|next")]  # the rest of the big frame was dropped


def test_a_whole_oversize_frame_in_one_piece_is_reported_with_its_size():
    reader = MllpReader(max_message_bytes=10)
    reader.feed(frame(b"MSH|" + b"x" * 20) + frame(b"MSH|ok"))
    assert events(reader) == [Oversize(b"MSH|" + b"x" * 20, 24), Message(b"MSH|ok")]


@given(st.lists(st.binary(max_size=60).filter(lambda b: SB not in b and END not in b
                                              and not b.endswith(b"\x1c")), max_size=6),
       st.integers(1, 17))
def test_frames_survive_any_chunking(payloads, chunk):
    stream = b"".join(frame(p) for p in payloads)
    reader = MllpReader()
    got = []
    for start in range(0, len(stream), chunk):
        reader.feed(stream[start:start + chunk])
        got += events(reader)
    assert got == [Message(p) for p in payloads]


@given(st.binary(max_size=300), st.integers(1, 50))
def test_random_bytes_give_events_or_nothing_never_errors(data, limit):
    reader = MllpReader(max_message_bytes=limit)
    reader.feed(data)
    for event in events(reader):
        assert isinstance(event, (Message, Junk, Oversize))
        if isinstance(event, Message):
            assert len(event.payload) <= limit
            try:
                peek_header(event.payload)
            except HL7Error:
                pass


def _header_by_full_split(payload: bytes):
    """peek_header as a plain reading of HL7 v2 ch. 2 would do it: every segment split out
    (CR, LF or CRLF ends one; empty ones skipped), the MSH first, the first PID after it."""
    from protocols.mllp import Header

    segments = [s for s in payload.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r")
                if s]
    if not segments or not segments[0].startswith(b"MSH") or len(segments[0]) < 8:
        raise HL7Error("no MSH")
    msh = segments[0].decode("latin-1")
    parts = msh.split(msh[3])
    field = lambda values, n: values[n] if n < len(values) else ""  # noqa: E731

    def first(name: str, index: int) -> str:
        for segment in segments[1:]:
            if segment[:4] == f"{name}{msh[3]}".encode("latin-1"):
                values = segment.decode("latin-1").split(msh[3])
                return field(values, index).split(field(parts, 1)[1:2] or "~")[0]
        return ""

    prior = first("MRG", 1) if field(parts, 8).startswith("ADT") else ""  # merges only
    return Header(msh[3], field(parts, 1), field(parts, 2), field(parts, 3), field(parts, 4),
                  field(parts, 5), field(parts, 8), field(parts, 9), field(parts, 10),
                  field(parts, 11), field(parts, 14), field(parts, 15), first("PID", 3), prior)


_PIECES = [b"MSH|^~\\&|A|B|C|D|2020||ADT^A01|X1|P|2.5|||AL|NE", b"PID|1||P1^^^H~P2||DOE",
           b"MRG|P0^^^H~P9", b"MRG|", b"MSH|^~\\&|A|B|C|D|2020||ORU^R01|X2|P|2.5",
           b"PID|", b"OBX|1|TX|||PID|x", b"\r", b"\n", b"\r\n", b"EVN|A01", b"MSH|", b"PIDX|",
           b"PID^", b"MSH#^~\\&#A#B#C#D#T##ADT#Y2", b"PID#1##Q9", b"|", b"x"]


@given(st.lists(st.sampled_from(_PIECES) | st.binary(max_size=12), max_size=9))
def test_peek_header_reads_only_msh_and_pid_yet_agrees_with_a_full_split(pieces):
    payload = b"".join(pieces)
    try:
        expected = _header_by_full_split(payload)
    except HL7Error:
        with pytest.raises(HL7Error):
            peek_header(payload)
        return
    if not expected.control_id:  # refused, with the header that answers it
        with pytest.raises(MissingControlId) as refused:
            peek_header(payload)
        assert refused.value.header == expected
        return
    assert peek_header(payload) == expected
