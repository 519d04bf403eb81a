"""The DIMSE command peek: commands read out of relayed P-DATA however the bytes are cut, data
sets counted and never kept, and hostile bytes never more than an error noted; and what the
DICOM splice makes of the commands (which side owes a response)."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from gateway.net.relay import Traffic
from gateway.vips.dicom import MAX_OUTSTANDING, DicomSplice
from protocols import dicom, dimse

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
INSTANCE = "1.2.826.0.1.3680043.8.498.1234567890"


def store_rq(message_id: int, instance: str = INSTANCE) -> bytes:
    return dicom.encode_command({0x00000002: CT_IMAGE, 0x00000100: dimse.C_STORE_RQ,
                                 0x00000110: message_id, 0x00000700: 0, 0x00000800: 0x0000,
                                 0x00001000: instance})


def store_rsp(message_id: int, status: int) -> bytes:
    return dicom.encode_command({0x00000002: CT_IMAGE, 0x00000100: dimse.C_STORE_RSP,
                                 0x00000120: message_id, 0x00000800: 0x0101,
                                 0x00000900: status, 0x00001000: INSTANCE})


def p_data(*pdvs: tuple[int, bool, bool, bytes]) -> bytes:
    return dicom.encode_p_data([dicom.Pdv(*pdv) for pdv in pdvs])


def association_bytes() -> bytes:
    """A C-STORE whose command is split over two PDUs, its data set in 3 PDVs, then the
    response, a C-ECHO on another context and an A-RELEASE-RQ."""
    command = store_rq(7)
    image = bytes(range(256)) * 40
    return (p_data((1, True, False, command[:20]))
            + p_data((1, True, True, command[20:]), (1, False, False, image[:4000]))
            + p_data((1, False, False, image[4000:8000]), (1, False, False, image[8000:9740]))
            + p_data((1, False, True, image[9740:]))  # one data PDV alone: the bulk fast path
            + p_data((1, True, True, store_rsp(7, 0xA700)))
            + dicom.encode_c_echo_rq(3, 8)
            + dicom.RELEASE_RQ)


def expected() -> list[tuple]:
    return [(1, dimse.C_STORE_RQ, 7, None, None, INSTANCE),
            (1, dimse.C_STORE_RSP, None, 7, 0xA700, INSTANCE),
            (3, dimse.C_ECHO_RQ, 8, None, None, "")]


def summary(commands: list[dimse.Command]) -> list[tuple]:
    return [(c.context_id, c.field, c.message_id, c.responded_to, c.status, c.sop_instance)
            for c in commands]


def test_commands_are_read_and_data_sets_only_counted():
    peek = dimse.CommandPeek()
    peek.feed(association_bytes())
    commands = peek.take()
    assert summary(commands) == expected()
    assert commands[0].sop_class == CT_IMAGE and commands[0].name == "C-STORE-RQ"
    assert dimse.member_unwell(commands[1].field, commands[1].status)
    assert peek.data_bytes == 10240 and not peek.errors and peek.take() == []


@given(st.lists(st.integers(1, 400), max_size=60))
def test_any_cut_of_the_byte_stream_gives_the_same_commands(cuts):
    data = association_bytes()
    peek = dimse.CommandPeek()
    position = 0
    for cut in cuts:
        peek.feed(data[position:position + cut])
        position += cut
    peek.feed(data[position:])
    assert summary(peek.take()) == expected()
    assert peek.data_bytes == 10240 and not peek.errors


def test_statuses_that_say_the_member_is_unwell():
    statuses = (0x0000, 0xA700, 0xA7FF, 0x0110, 0x0213, 0xA900, 0xC000, 0x0122, 0xB000, 0xFF00)
    # A C-STORE refused for out of resources, or a processing failure.
    assert [s for s in statuses if dimse.member_unwell(dimse.C_STORE_RSP, s)] == [
        0xA700, 0xA7FF, 0x0110]
    # An MPPS N-CREATE or N-SET refused for resource limitation, or a processing failure.
    for field in (dimse.N_CREATE_RSP, dimse.N_SET_RSP):
        assert [s for s in statuses if dimse.member_unwell(field, s)] == [0x0110, 0x0213]
    # A query or retrieve may be refused for its own size: never the member's health.
    for field in (dimse.C_FIND_RSP, dimse.C_MOVE_RSP, dimse.C_GET_RSP, dimse.N_ACTION_RSP):
        assert not any(dimse.member_unwell(field, s) for s in statuses)


def test_an_oversize_command_is_dropped_and_the_next_one_read():
    peek = dimse.CommandPeek()
    huge = b"\x00" * (dimse.MAX_COMMAND + 10)
    peek.feed(p_data((1, True, False, huge[:30000])) + p_data((1, True, False, huge[30000:60000]))
              + p_data((1, True, True, huge[60000:])) + p_data((1, True, True, store_rq(9))))
    assert [c.message_id for c in peek.take()] == [9]
    assert any("over" in error for error in peek.errors)


@given(st.lists(st.binary(max_size=300), max_size=15))
def test_hostile_bytes_are_only_ever_noted(pieces):
    peek = dimse.CommandPeek()
    for piece in pieces:
        peek.feed(piece)
        for command in peek.take():
            assert isinstance(command.field, int)


@given(st.binary(max_size=200))
def test_decode_raises_only_dimse_error(body):
    try:
        dimse.decode(1, body)
    except dimse.DimseError:
        pass


def test_a_pdv_longer_than_its_pdu_is_an_error_not_a_crash():
    bad = struct.pack(">BBL", 4, 0, 10) + struct.pack(">LBB", 500, 1, 3) + b"1234"
    peek = dimse.CommandPeek()
    peek.feed(bad + p_data((1, True, True, store_rq(3))))
    assert [c.message_id for c in peek.take()] == [3] and peek.errors


@given(st.lists(st.integers(1, 400), max_size=60))
def test_a_kept_contexts_data_set_is_whole_however_the_bytes_are_cut(cuts):
    """Only the contexts named in keep_data (a storage commitment result's) have their data
    sets kept: whole, once each, whatever the PDV and chunk boundaries."""
    image = bytes(range(256)) * 40
    data = association_bytes() + p_data((5, False, False, b"result-"),
                                        (5, False, True, b"of-commitment"))
    peek = dimse.CommandPeek(keep_data=frozenset({1, 5}))
    position = 0
    for cut in cuts:
        peek.feed(data[position:position + cut])
        position += cut
    peek.feed(data[position:])
    assert peek.data_sets == [(1, image), (5, b"result-of-commitment")] and not peek.errors
    assert summary(peek.take()) == expected()
    other = dimse.CommandPeek(keep_data=frozenset({5}))
    other.feed(data)
    assert other.data_sets == [(5, b"result-of-commitment")]


def test_a_kept_data_set_over_its_limit_is_dropped_and_said(monkeypatch):
    monkeypatch.setattr(dimse, "MAX_DATA_SET", 100)
    peek = dimse.CommandPeek(keep_data=frozenset({1, 5}))
    peek.feed(association_bytes() + p_data((5, False, True, b"small")))
    assert peek.data_sets == [(5, b"small")]
    assert peek.errors == ["data set on context 1 over 100 bytes"]


# -- who owes a response (gateway.vips.dicom.DicomSplice), whatever the order of commands

_SIDES = ("client", "member")


def _splice() -> DicomSplice:
    """A splice to feed commands to (its links are never used), its clock stopped at 0."""
    splice = DicomSplice(None, None, 5.0, Traffic(), asked=lambda command: None,
                         answered=lambda command, request: None, member_owes_timeout=50.0,
                         client_owes_timeout=20.0)
    splice._clock = lambda: 0.0
    return splice


@given(st.lists(st.tuples(st.sampled_from(_SIDES), st.booleans(), st.integers(1, 4),
                          st.sampled_from([0x0000, 0xFF00, 0xFF01, 0xA700, 0xC000]),
                          st.booleans()), max_size=40))
def test_who_owes_a_response_follows_requests_and_final_responses(steps):
    """Each request is owed by the other side until a final (non-pending) response from that
    side names it; a C-CANCEL-RQ is owed nothing. The wait is the owing side's bound when
    one side alone owes, else the shorter one."""
    splice = _splice()
    model: dict[str, set[int]] = {"client": set(), "member": set()}
    for source, is_request, message_id, status, cancel in steps:
        other = "member" if source == "client" else "client"
        if is_request:
            field = dimse.C_CANCEL_RQ if cancel else dimse.C_FIND_RQ
            command = dimse.Command(1, field, message_id=message_id)
            if not cancel:
                model[other].add(message_id)
        else:
            command = dimse.Command(1, dimse.C_FIND_RSP, responded_to=message_id,
                                    status=status)
            if status not in dimse.PENDING:
                model[source].discard(message_id)
        splice._follow(source, [command])
        assert {side: set(splice.owed[side]) for side in _SIDES} == model
        member, client = bool(model["member"]), bool(model["client"])
        assert splice.idle_timeout == (50.0 if member and not client else
                                       20.0 if client and not member else 5.0)


def test_what_is_owed_is_bounded_and_the_oldest_forgotten():
    splice = _splice()
    splice._follow("client", [dimse.Command(1, dimse.C_STORE_RQ, message_id=number)
                              for number in range(1, MAX_OUTSTANDING + 2)])
    assert len(splice.owed["member"]) == MAX_OUTSTANDING
    assert 1 not in splice.owed["member"] and MAX_OUTSTANDING + 1 in splice.owed["member"]
