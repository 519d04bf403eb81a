"""protocols/dicom.py with plain bytes: fixtures, round trips, pynetdicom agreement, fuzzing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pynetdicom.pdu import A_ASSOCIATE_RQ as PynetdicomRQ

from protocols import dicom, dimse
from protocols.dicom import Abort, Association, AssociateReject, PduReader, ProtocolError

def test_our_rq_is_what_pynetdicom_reads():
    raw = dicom.encode_associate_rq("PACS1", "MEDGATE", [
        (1, dicom.VERIFICATION_SOP_CLASS, [dicom.IMPLICIT_VR_LITTLE_ENDIAN]),
        (3, "1.2.840.10008.5.1.4.1.1.7", ["1.2.840.10008.1.2.1", dicom.IMPLICIT_VR_LITTLE_ENDIAN])])
    theirs = PynetdicomRQ()
    theirs.decode(raw)
    assert theirs.called_ae_title == "PACS1" and theirs.calling_ae_title == "MEDGATE"
    contexts = [(c.context_id, str(c.abstract_syntax), [str(t) for t in c.transfer_syntax])
                for c in theirs.presentation_context]
    assert contexts == [(1, "1.2.840.10008.1.1", ["1.2.840.10008.1.2"]),
                        (3, "1.2.840.10008.5.1.4.1.1.7", ["1.2.840.10008.1.2.1",
                                                          "1.2.840.10008.1.2"])]
    assert theirs.encode() == raw  # byte for byte what pynetdicom would send
    ours = Association.decode(raw)
    assert ours.max_pdu_length == 16384 and ours.presentation_contexts[1].id == 3


def test_called_ae_rewrite_keeps_the_length():
    raw = dicom.encode_associate_rq("VIP", "CT01", [(1, dicom.VERIFICATION_SOP_CLASS,
                                                     [dicom.IMPLICIT_VR_LITTLE_ENDIAN])])
    rewritten = Association.decode(raw).with_called_ae("CARDIOPACS")
    assert len(rewritten) == len(raw) and rewritten[10:26] == b"CARDIOPACS      "
    assert Association.decode(rewritten).calling_ae == "CT01"


def test_reject_and_abort_bytes():
    assert dicom.REJECT_ALL_FULL.encode() == bytes.fromhex("03 00 00000004 00 02 03 02")
    assert dicom.REJECT_NO_MEMBER.encode() == bytes.fromhex("03 00 00000004 00 02 03 01")
    assert dicom.ABORT_PROVIDER.encode() == bytes.fromhex("07 00 00000004 00 00 02 00")
    assert AssociateReject.decode(dicom.REJECT_CALLED_AE.encode()).describe() == (
        "rejected-permanent, service-user, called-AE-title-not-recognized")
    assert Abort.decode(dicom.ABORT_PROVIDER.encode()).describe() == (
        "service-provider, reason-not-specified")


def test_reader_splits_and_keeps_leftovers():
    reader = PduReader()
    stream = dicom.RELEASE_RQ + dicom.ABORT_PROVIDER.encode() + b"\x04\x00"
    for byte in stream:
        reader.feed(bytes([byte]))
    assert reader.next_pdu() == dicom.RELEASE_RQ
    assert reader.next_pdu() == dicom.ABORT_PROVIDER.encode()
    assert reader.next_pdu() is None and reader.leftover() == b"\x04\x00"


def test_reader_refuses_unknown_types_and_huge_pdus_before_buffering():
    with pytest.raises(ProtocolError, match="unrecognized PDU type 0x09"):
        reader = PduReader()
        reader.feed(b"\x09\x00\x00\x00\x00\x04")
        reader.next_pdu()
    reader = PduReader(max_pdu_bytes=1000)
    reader.feed(b"\x01\x00\x7f\xff\xff\xff")
    with pytest.raises(ProtocolError, match="over the 1000-byte limit") as info:
        reader.next_pdu()
    assert info.value.abort == (2, 6)


def test_c_echo_round_trip():
    peek = dimse.CommandPeek()
    peek.feed(dicom.encode_c_echo_rq(1, 7) + dicom.encode_c_echo_rsp(1, 7, 0x0110))
    rq, rsp = peek.take()
    assert (rq.field, rq.message_id, rq.sop_class) == (dicom.C_ECHO_RQ, 7,
                                                        dicom.VERIFICATION_SOP_CLASS)
    assert (rsp.field, rsp.responded_to, rsp.status) == (dimse.C_ECHO_RSP, 7, 0x0110)


@given(st.lists(st.tuples(st.sampled_from(sorted(dicom.PDU_NAMES)), st.binary(max_size=40)),
                max_size=8), st.integers(1, 50))
def test_tracker_follows_boundaries_in_any_chunking(pdus, chunk):
    stream = b"".join(dicom.HEADER.pack(t, 0, len(body)) + body for t, body in pdus)
    tracker = dimse.CommandPeek()
    for start in range(0, len(stream), chunk):
        tracker.feed(stream[start:start + chunk])
    assert tracker.pdus == len(pdus) and tracker.at_boundary
    if pdus:
        assert tracker.last_type == pdus[-1][0]
        tracker.feed(stream[:3])
        assert not tracker.at_boundary


@given(st.binary(max_size=400))
def test_random_bytes_only_ever_raise_protocol_error(data):
    reader = PduReader(max_pdu_bytes=4096)
    reader.feed(data)
    try:
        while (pdu := reader.next_pdu()) is not None:
            if pdu[0] in (dicom.A_ASSOCIATE_RQ, dicom.A_ASSOCIATE_AC):
                Association.decode(pdu)
            elif pdu[0] == dicom.P_DATA_TF:
                dimse.CommandPeek().feed(pdu)
            elif pdu[0] == dicom.A_ASSOCIATE_RJ:
                AssociateReject.decode(pdu)
            elif pdu[0] == dicom.A_ABORT:
                Abort.decode(pdu)
    except ProtocolError:
        pass


@given(st.binary(min_size=68, max_size=300))
def test_random_rq_bodies_only_raise_protocol_error(tail):
    body = b"\x00\x01\x00\x00" + tail
    try:
        Association.decode(dicom.HEADER.pack(dicom.A_ASSOCIATE_RQ, 0, len(body)) + body)
    except ProtocolError:
        pass


@given(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1,
               max_size=16),
       st.lists(st.integers(1, 127).map(lambda n: n * 2 - 1), min_size=1, max_size=5, unique=True))
def test_rq_round_trip(title, ids):
    contexts = [(i, f"1.2.840.10008.5.1.4.1.1.{i}", [dicom.IMPLICIT_VR_LITTLE_ENDIAN]) for i in ids]
    rq = Association.decode(dicom.encode_associate_rq(title, "MEDGATE", contexts))
    assert rq.called_ae == title.strip()
    assert [(c.id, c.abstract_syntax, list(c.transfer_syntaxes))
            for c in rq.presentation_contexts] == contexts
