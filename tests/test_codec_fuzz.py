"""Every codec in protocols/ under arbitrary bytes: only its declared error is raised, and the
work done grows linearly with the input (no input makes a reader rescan what it has seen)."""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import json
import time

from hypothesis import given
from hypothesis import strategies as st

from gateway.records.audit import AuditLog
from protocols import atna, control, dicom, dimse, mllp, proxy, soap
from tests.helpers.audit_schema import valid_audit_message

chunks = st.lists(st.binary(max_size=200), max_size=12)
text = st.text(max_size=200)
any_text = st.text(st.characters(exclude_categories=()), max_size=60)  # surrogates too


# -- PROXY protocol: ProxyError only; what is encoded reads back; a prefix asks for more

@given(st.binary(max_size=400), st.sampled_from([b"", proxy.V2_SIGNATURE, b"PROXY "]))
def test_proxy_parse_raises_only_proxy_error(data, prefix):
    try:
        header = proxy.parse(prefix + data)
    except proxy.ProxyError:
        return
    assert header is None or 0 < header.length <= len(prefix + data)


addresses = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)


@given(addresses, st.integers(0, 65535), addresses, st.integers(0, 65535), st.binary(max_size=20))
def test_proxy_v2_round_trip(src, sport, dst, dport, after):
    header = proxy.encode_v2((src, sport), (dst, dport))
    for cut in range(len(header)):
        assert proxy.parse(header[:cut]) is None
    parsed = proxy.parse(header + after)
    assert parsed.length == len(header)

    def same(a: str, b: str) -> bool:
        a_ip, b_ip = ipaddress.ip_address(a), ipaddress.ip_address(b)
        return a_ip == b_ip or getattr(a_ip, "ipv4_mapped", None) == b_ip
    assert same(src, parsed.source[0]) and parsed.source[1] == sport
    assert same(dst, parsed.destination[0]) and parsed.destination[1] == dport


# -- ATNA syslog: SyslogError only; any names from the wire give well-formed XML

@given(chunks)
def test_syslog_reader_and_parser_raise_only_syslog_error(pieces):
    reader = atna.SyslogReader(limit=1000)
    try:
        for piece in pieces:
            reader.feed(piece)
            while (message := reader.next_message()) is not None:
                atna.parse_syslog(message)
    except atna.SyslogError:
        pass


@given(st.lists(st.binary(min_size=1, max_size=300), max_size=8), st.binary(max_size=40),
       st.data())
def test_whole_frames_ends_where_the_spool_was_cut(messages, garbage, data):
    """A spool of whole frames, cut anywhere or followed by anything: whole_frames gives the
    ends of the whole frames before the cut, and never raises."""
    spool = b"".join(atna.octet_counted(message) for message in messages)
    ends = list(itertools.accumulate(len(atna.octet_counted(m)) for m in messages))
    cut = data.draw(st.integers(0, len(spool)))
    assert atna.whole_frames(spool[:cut], limit=300) == [end for end in ends if end <= cut]
    found = atna.whole_frames(spool + garbage, limit=300)
    assert found[:len(ends)] == ends and all(end <= len(spool + garbage) for end in found)


@given(any_text, any_text, any_text, any_text)
def test_audit_messages_are_schema_valid_whatever_the_names(user, network, detail, subject):
    when = datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
    xml = atna.encode_message(atna.AuditEvent(
        atna.SECURITY_ALERT, atna.NODE_AUTHENTICATION, atna.Outcome.MINOR_FAILURE, when,
        (atna.Participant(user or "?", True, network_id=network),), "medgate@gw",
        description=detail, subjects=(atna.AlertSubject(subject or "?", detail),)))
    message = atna.syslog_message(xml, when=when, hostname=network, app_name="medgate",
                                  procid="1")
    reader = atna.SyslogReader(limit=len(message) + 1)
    reader.feed(atna.octet_counted(message))
    root = valid_audit_message(atna.parse_syslog(reader.next_message()).xml)
    assert root.find("EventIdentification/EventOutcomeDescription") is not None or not detail


# -- DICOM: ProtocolError only

@given(chunks)
def test_dicom_pdu_reader_raises_only_protocol_error(pieces):
    reader = dicom.PduReader(max_pdu_bytes=4096)
    tracker = dimse.CommandPeek()
    try:
        for piece in pieces:
            reader.feed(piece)
            tracker.feed(piece)
            while (pdu := reader.next_pdu()) is not None:
                decode_any_pdu(pdu)
    except dicom.ProtocolError:
        pass


def decode_any_pdu(pdu: bytes) -> None:
    kind = pdu[0]
    if kind in (dicom.A_ASSOCIATE_RQ, dicom.A_ASSOCIATE_AC):
        association = dicom.Association.decode(pdu)
        dicom.ae_title_problem(pdu[10:26])
        if not dicom.ae_title_problem(pdu[10:26]):
            association.with_called_ae(association.called_ae)
    elif kind == dicom.A_ASSOCIATE_RJ:
        dicom.AssociateReject.decode(pdu).describe()
    elif kind == dicom.A_ABORT:
        dicom.Abort.decode(pdu).describe()
    elif kind == dicom.P_DATA_TF:
        peek = dimse.CommandPeek()
        peek.feed(pdu)
        for command in peek.take():
            dimse.member_unwell(command.field, command.status)


@given(st.binary(min_size=0, max_size=400), st.sampled_from([1, 2, 3, 4, 7]))
def test_dicom_decoders_raise_only_protocol_error(body, kind):
    pdu = dicom.HEADER.pack(kind, 0, len(body)) + body
    try:
        decode_any_pdu(pdu)
    except dicom.ProtocolError:
        pass


@given(st.binary(min_size=16, max_size=16)
       | st.text(st.characters(min_codepoint=0x1F, max_codepoint=0x7F), max_size=16)
       .map(lambda text: text.encode().ljust(16, b"\x00")))  # mostly titles, at the edges
def test_the_ae_title_check_names_the_first_byte_outside_the_repertoire(field):
    # PS3.5 Table 6.2-1, byte by byte: printable ASCII but the backslash; trailing NULs pass
    title = field.rstrip(b"\x00")
    bad = [n for n, byte in enumerate(title, 1) if not 0x20 <= byte <= 0x7E or byte == 0x5C]
    expected = (f"byte {bad[0]} is outside the DICOM default character repertoire" if bad
                else "it is empty" if not title.strip(b" ") else "")
    assert dicom.ae_title_problem(field) == expected


@given(st.binary(min_size=16, max_size=16))
def test_every_ae_title_the_check_passes_can_be_encoded(field):
    if not dicom.ae_title_problem(field):
        title = field.rstrip(b"\x00").decode("ascii").strip()
        assert dicom.encode_ae(title).strip() == title.encode()


# -- MLLP: no exception from the reader, HL7Error only from the peeks

@given(chunks, st.integers(1, 300))
def test_mllp_reader_never_raises_and_peeks_raise_only_hl7_error(pieces, limit):
    reader = mllp.MllpReader(limit)
    for piece in pieces:
        reader.feed(piece)
        assert bool(reader.pending) == (reader.buffered > 0)
        while (event := reader.next_event()) is not None:
            assert bool(reader.pending) == (reader.buffered > 0)
            payload = event.payload if isinstance(event, mllp.Message) else getattr(
                event, "head", b"")
            for peek in (mllp.peek_header, mllp.peek_ack, mllp.peek_batch,
                         mllp.peek_batch_answer):
                try:
                    peek(payload)
                except mllp.HL7Error:
                    pass


@given(st.sampled_from([b"BHS|^~\\&|", b"FHS|^~\\&|", b"BHS", b"FHS\rBHS|"]),
       st.lists(st.sampled_from([b"MSH|^~\\&|", b"\r", b"\n", b"|", b"^", b"BHS|", b"MSA|",
                                 b"BTS|1", b"A", b"x" * 12]), max_size=40),
       st.sampled_from(["AA", "AR", "CE"]))
def test_batch_peeks_raise_only_hl7_error_and_a_readable_batch_is_answerable(start, parts, code):
    payload = start + b"".join(parts)
    try:
        mllp.peek_batch_answer(payload)
    except mllp.HL7Error:
        pass
    try:
        batch = mllp.peek_batch(payload)
    except mllp.HL7Error:
        return
    assert mllp.is_batch(payload) and batch.message_ids and batch.first.control_id
    ack = mllp.peek_ack(mllp.build_ack(batch.header, code, control_id="C1", timestamp="2026"))
    assert (ack.code, ack.control_id) == (code, batch.header.control_id)
    assert batch.answered_by(ack)


_FIELD = st.text(st.characters(min_codepoint=32, max_codepoint=126, blacklist_characters="|"),
                 max_size=6)


@given(st.binary(max_size=300) | st.lists(_FIELD, min_size=8, max_size=14).map(
           lambda fields: "|".join(fields[:7] + ["ID1"] + fields[7:]).encode()),
       st.sampled_from(["AA", "AR", "CE"]), text,
       st.sampled_from(["", "2.1", "2.3.1", "2.4", "2.5", "2.5.1", "2.8", "x"]),
       st.sampled_from([None, ("MEDGATE", "GW1"), ("A|B^C", "D~E\\F&G")]))
def test_ack_builder_answers_any_readable_header(payload, code, why, version, sender):
    try:
        header = mllp.peek_header(b"MSH|^~\\&|" + payload)
    except mllp.HL7Error:
        return
    header = header._replace(version=version)
    nak = mllp.build_ack(header, code, control_id="C1", timestamp="2026", text=why,
                         error_code="103^Table value not found^HL70357", sender=sender)
    ack = mllp.peek_ack(nak)
    assert ack.code == code
    # The error code reads back from ERR-3 (v2.5 on) or MSA-6 / ERR-1 (before), whatever the
    # version says; the gateway's own name is one field each, whatever it holds.
    assert ack.error_code == ("" if code == "AA" else "103")
    if sender is not None and header.field_separator == "|":
        fields = nak.split(b"\r")[0].decode("latin-1").split("|")
        assert len(fields[2].split("^")) == len(fields[3].split("^")) == 1


# -- SOAP: SoapError only

@given(text)
def test_content_type_parsing_raises_only_soap_error(value):
    for parse in (soap.content_type_params, soap.action_from_content_type):
        try:
            parse(value)
        except soap.SoapError:
            pass


@given(st.sampled_from(["application/soap+xml", "multipart/related; boundary=b",
                        'multipart/related; boundary="MIME"; type="application/xop+xml"']),
       chunks)
def test_action_peek_raises_only_soap_error(content_type, pieces):
    peek = soap.ActionPeek(content_type, limit=1000)
    try:
        for piece in pieces:
            peek.feed(b"--MIME\r\n\r\n<env:Envelope xmlns:env='x'>" + piece)
    except soap.SoapError:
        pass


@given(st.text(min_size=1, max_size=20), chunks)
def test_multipart_reader_raises_only_soap_error(boundary, pieces):
    try:
        reader = soap.MultipartReader(boundary, max_header_bytes=512)
        for piece in pieces:
            reader.feed(piece)
            while reader.next_event() is not None:
                pass
    except soap.SoapError:
        pass


@given(st.binary(max_size=500), text)
def test_registry_response_parsing_raises_only_soap_error(body, content_type):
    try:
        soap.parse_registry_response(soap.soap_envelope_of(body, content_type or "a/b"))
    except soap.SoapError:
        pass


@given(st.one_of(st.binary(max_size=500), text.map(lambda t: (
    '<?xml version="1.0"?><e:Envelope xmlns:e="http://www.w3.org/2003/05/soap-envelope" '
    'xmlns:a="http://www.w3.org/2005/08/addressing"><e:Header><a:MessageID>'
    + "".join(c for c in t if c.isalnum()) + "</a:MessageID></e:Header></e:Envelope>").encode())))
def test_a_requests_message_id_is_read_or_empty_never_an_error(body):
    found = soap.message_id(body)
    assert isinstance(found, str) and found == found.strip()
    if body.startswith(b"<?xml") and b"<a:MessageID>" in body:
        assert found == body.split(b"<a:MessageID>")[1].split(b"<")[0].decode().strip()


# -- linear time: 8x the input must not cost 64x (a rescan per piece would)

def _seconds(work, data: bytes) -> float:
    """The CPU time this thread spends on `work` (best of 3): what the codec itself costs,
    not what other processes on a busy machine take from the wall clock. Only the ratio of
    two such figures, taken side by side, is judged."""
    best = float("inf")
    for _ in range(3):
        started = time.thread_time()
        work(data)
        best = min(best, time.thread_time() - started)
    return best


def assert_linear(work, make) -> None:
    small, large = _seconds(work, make(1)), _seconds(work, make(8))
    assert large < 24 * small + 0.01, (small, large)


def feed_in_pieces(reader_factory, drain, size: int = 512):
    def work(data: bytes) -> None:
        reader = reader_factory()
        for start in range(0, len(data), size):
            reader.feed(data[start:start + size])
            drain(reader)
    return work


def _drain_mllp(reader):
    while reader.next_event() is not None:
        pass


def _drain_dicom(reader):
    while reader.next_pdu() is not None:
        pass


def _drain_multipart(reader):
    while reader.next_event() is not None:
        pass


def test_mllp_reader_is_linear():
    one_big = lambda n: mllp.SB + b"MSH|" + b"x" * 200_000 * n  # noqa: E731 - no end block
    many = lambda n: mllp.frame(b"MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5\r") * 5000 * n  # noqa: E731
    for make in (one_big, many):
        assert_linear(feed_in_pieces(lambda: mllp.MllpReader(16 * 1024 * 1024), _drain_mllp), make)


def test_dicom_pdu_reader_is_linear():
    pdata = dicom.encode_c_echo_rq(1, 1)
    big = dicom.HEADER.pack(dicom.P_DATA_TF, 0, 1_000_000) + bytes(1_000_000)
    assert_linear(feed_in_pieces(lambda: dicom.PduReader(2_000_000), _drain_dicom),
                  lambda n: pdata * 20_000 * n)
    assert_linear(feed_in_pieces(lambda: dicom.PduReader(2_000_000), _drain_dicom),
                  lambda n: big * n)


def test_dimse_command_peek_is_linear():
    command = dicom.encode_c_echo_rq(1, 1)
    fragments = dicom.encode_p_data([dicom.Pdv(1, True, False, b"\x00" * 1000)]) * 60
    data = dicom.encode_p_data([dicom.Pdv(1, False, False, bytes(60_000))])
    for unit in (command * 2_000, fragments, data * 20):
        assert_linear(feed_in_pieces(dimse.CommandPeek, lambda peek: peek.take()),
                      lambda n, unit=unit: unit * n)


def test_multipart_reader_and_content_type_are_linear():
    body = lambda n: (b"--B\r\nContent-ID: <x>\r\n\r\n" + b"y\r\n-" * 100_000 * n  # noqa: E731
                      + b"\r\n--B--\r\n")
    assert_linear(feed_in_pieces(lambda: soap.MultipartReader("B"), _drain_multipart), body)
    parameters = lambda n: ('a/b' + '; x="\\\\q' * 5000 * n).encode()  # noqa: E731

    def parse(data: bytes) -> None:
        try:
            soap.content_type_params(data.decode())
        except soap.SoapError:
            pass
    assert_linear(parse, parameters)


def test_mllp_peek_is_linear():
    message = lambda n: b"MSH|^~\\&|A|B|C|D|1||ADT^A01|1|P|2.5\r" + b"OBX|1|x\r" * 20_000 * n  # noqa: E731
    assert_linear(mllp.peek_header, message)


# -- audit lines: one JSON object per line whatever the wire put in a field

_field_values = st.one_of(any_text, st.none(), st.booleans(), st.integers(-2**40, 2**40),
                          st.floats(allow_nan=False, allow_infinity=False))


@given(st.lists(_field_values, min_size=3, max_size=3), st.dictionaries(
    st.sampled_from(["reason", "batch_messages"]), _field_values, max_size=2))
def test_a_layout_writes_the_line_record_writes(values, extra):
    lines: list[str] = []
    log = AuditLog("-")
    log._write = lines.append  # what open() would set, kept in memory
    names = ("vip", "control_id", "tries")
    log.layout("hl7", *names).record(*values, **extra)
    log.record("hl7", **dict(zip(names, values)), **extra)
    laid_out, recorded = (json.loads(line) for line in lines)
    assert all(line.count("\n") == 1 and line.endswith("\n") for line in lines)
    laid_out.pop("time"), recorded.pop("time")
    assert laid_out == recorded == {"kind": "hl7", **dict(zip(names, values)), **extra}


# -- A-ASSOCIATE-RQ UIDs: any bytes, decoded or refused, never an exception of another kind

@given(st.lists(st.binary(max_size=70) | st.sampled_from(
           [b"1.2.840.10008.1.1", b"1.2.840.10008.1.1\x00", b"1.02.3", b"1.2.<3\x83", b""]),
       min_size=2, max_size=6))
def test_request_uids_are_read_and_judged_without_surprises(uids):
    abstract, *transfers = uids
    rq = dicom.encode_associate_rq("VIP", "CT01", [(1, "1.1", ["1.2"])])
    # The same RQ with these UID bytes in its presentation context (lengths made right).
    item = dicom._item(dicom.ITEM_ABSTRACT_SYNTAX, abstract) + b"".join(
        dicom._item(dicom.ITEM_TRANSFER_SYNTAX, t) for t in transfers)
    context = dicom._item(dicom.ITEM_PRESENTATION_CONTEXT_RQ, bytes([1, 0, 0, 0]) + item)
    start = rq.index(bytes([dicom.ITEM_PRESENTATION_CONTEXT_RQ]), 74)
    end = start + 4 + int.from_bytes(rq[start + 2:start + 4], "big")
    body = rq[6:start] + context + rq[end:]
    pdu = dicom.HEADER.pack(dicom.A_ASSOCIATE_RQ, 0, len(body)) + body
    try:
        request = dicom.Association.decode(pdu)
    except dicom.ProtocolError:
        return
    problem = dicom.request_uid_problem(request)
    wellformed = all(dicom.uid_problem(dicom._uid(u)) == "" for u in uids)
    assert (problem == "") == wellformed
    assert all(chr(byte) not in problem for byte in b"<\x83")  # never quotes the bytes


# -- bounded JSON (admin requests, peers' answers): a value or a ValueError, never more

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(text, children,
                                                                        max_size=4),
    max_leaves=30)


@given(st.binary(max_size=300) | st.builds(
    lambda depth, inner: b"[" * depth + inner + b"]" * depth, st.integers(0, 3000),
    st.sampled_from([b"", b"1", b'"[[[["', b"{"])))
def test_bounded_json_raises_only_value_error(data):
    from gateway.net import bounded_json

    try:
        bounded_json.loads(data)
    except ValueError:
        pass


@given(json_values)
def test_bounded_json_reads_what_json_writes_within_its_depth(value):
    from gateway.net import bounded_json

    assert bounded_json.loads(json.dumps(value).encode()) == value


# -- the leader-worker control channel: ControlError only; whole messages read back in order

@given(chunks)
def test_control_frames_raise_only_control_error(pieces):
    reader = control.FrameReader(limit=1000)
    try:
        for piece in pieces:
            reader.feed(piece)
            while reader.next_message() is not None:
                pass
    except control.ControlError:
        pass


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)


@given(st.lists(st.dictionaries(st.text(max_size=8), json_values, max_size=4), max_size=5),
       st.integers(1, 7))
def test_control_messages_read_back_whole_at_any_cut(messages, step):
    sent = [{**message, "type": f"m{n}"} for n, message in enumerate(messages)]
    stream = b"".join(control.encode(message) for message in sent)
    reader = control.FrameReader()
    received = []
    for start in range(0, len(stream), step):
        reader.feed(stream[start:start + step])
        while (message := reader.next_message()) is not None:
            received.append(message)
    assert received == sent


def test_a_control_frame_over_the_limit_is_refused_before_it_is_read():
    reader = control.FrameReader(limit=10)
    reader.feed((11).to_bytes(4, "big"))
    try:
        reader.next_message()
    except control.ControlError as exc:
        assert "11 bytes is over the limit (10)" in exc.reason
    else:
        raise AssertionError("an oversize frame was accepted")


@given(st.lists(st.tuples(st.integers(1, 255), st.booleans(), st.booleans(),
                          st.binary(max_size=40)), max_size=5))
def test_p_data_values_read_back_as_encoded(values):
    pdvs = [dicom.Pdv(*value) for value in values]
    assert dicom.decode_p_data(dicom.encode_p_data(pdvs)) == pdvs


@given(st.binary(max_size=300))
def test_p_data_decoding_raises_only_protocol_error(body):
    try:
        dicom.decode_p_data(bytes([dicom.P_DATA_TF, 0]) + len(body).to_bytes(4, "big") + body)
    except dicom.ProtocolError:
        pass
