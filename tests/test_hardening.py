"""Hostile input and faulty members: no answer reaches the wrong client, no smuggling, no
exhaustion, every codec error declared. Each test fails on medgate 0.1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trio

from gateway.testing.simulators.hl7_messages import make_messages
from protocols import soap
from protocols.dicom import (IMPLICIT_VR_LITTLE_ENDIAN, VERIFICATION_SOP_CLASS, AssociateReject,
                             encode_associate_rq)
from protocols.mllp import END, SB, frame, peek_ack
from tests.helpers.faulty_members import HttpRecorder, ScriptedServer, StrayAckReceiver
from tests.helpers import (GatewayProcess, eventually, refused_port, start_gateway, vip_port,
                           wait_until)

ITI18_TYPE = f'application/soap+xml; action="{soap.ITI18}"'


def one_member_vip(protocol: str, port: int, extra: str = "") -> str:
    return f"""
[[vip]]
name = "{protocol}"
protocol = "{protocol}"
listen = "127.0.0.1:0"
connect_timeout = "1s"
ack_timeout = "2s"
error_limit = 10
health = {{ check = "tcp", interval = "1h" }}
{extra}

[[vip.member]]
name = "m1"
address = "127.0.0.1:{port}"
"""


async def http_exchange(port: int, request: bytes, timeout: float = 5) -> bytes:
    """Send raw bytes to the VIP and read until the gateway closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    received = bytearray()
    with trio.fail_after(timeout):
        await stream.send_all(request)
        while data := await stream.receive_some(65536):
            received += data
    await stream.aclose()
    return bytes(received)


def soap_post(body: bytes, *headers: str, connection: str = "close") -> bytes:
    lines = ["POST /registry HTTP/1.1", "Host: xds", f"Content-Type: {ITI18_TYPE}",
             f"Content-Length: {len(body)}", *headers]
    if connection:
        lines.append(f"Connection: {connection}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def body_of(response: bytes) -> bytes:
    return response.partition(b"\r\n\r\n")[2]


# -- 1. a response never reaches the wrong client

async def test_xds_member_answering_twice_never_answers_the_next_client(nursery):
    member = HttpRecorder(twice=True)
    server = await ScriptedServer(member).start(nursery)
    gateway = await start_gateway(nursery, one_member_vip("xds", server.port))
    port = vip_port(gateway, "xds")
    answers = [body_of(await http_exchange(port, soap_post(name))) for name in (b"A", b"B", b"C")]
    assert answers == [b"answer to A", b"answer to B", b"answer to C"]
    pool_member = gateway.balancer.pool("xds").member("m1")
    assert pool_member.failed >= 3  # a passive-health strike per dirty connection


async def test_hl7_stray_ack_after_the_awaited_one_is_never_relayed(nursery):
    receiver = StrayAckReceiver()
    server = await ScriptedServer(receiver).start(nursery)
    gateway = await start_gateway(nursery, one_member_vip("hl7", server.port))
    stream = await trio.open_tcp_stream("127.0.0.1", vip_port(gateway, "hl7"))
    answers = []
    with trio.fail_after(10):
        buffer = bytearray()
        for message in make_messages(4, prefix="S"):
            await stream.send_all(frame(message))
            while END not in buffer:
                buffer += await stream.receive_some(65536)
            end = buffer.index(END)
            answers.append(peek_ack(bytes(buffer[1:end])))
            del buffer[:end + 2]
    await stream.aclose()
    assert [a.text for a in answers] == ["real"] * 4
    assert [a.control_id for a in answers] == receiver.received
    assert gateway.balancer.pool("hl7").member("m1").failed >= 4


# -- 2. HTTP request smuggling

async def xds_with_recorder(nursery, extra: str = ""):
    member = HttpRecorder()
    server = await ScriptedServer(member).start(nursery)
    gateway = await start_gateway(nursery, one_member_vip("xds", server.port, extra))
    return member, vip_port(gateway, "xds")


async def test_content_length_with_transfer_encoding_is_refused_not_forwarded(nursery):
    member, port = await xds_with_recorder(nursery)
    hidden = b"POST /registry HTTP/1.1\r\nHost: xds\r\nContent-Length: 0\r\n\r\n"
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(hidden), hidden)
    request = (f"POST /registry HTTP/1.1\r\nHost: xds\r\nContent-Type: {ITI18_TYPE}\r\n"
               f"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n").encode() + chunked
    response = await http_exchange(port, request)
    assert response.startswith(b"HTTP/1.1 400 ")
    assert b"\r\nconnection: close\r\n" in response.lower()
    assert b"Content-Length and Transfer-Encoding" in body_of(response)
    assert member.requests == []


async def test_obs_fold_and_bad_headers_are_refused(nursery):
    member, port = await xds_with_recorder(nursery)
    folded = soap_post(b"A", "X-Note: first", " continued")
    response = await http_exchange(port, folded)
    assert response.startswith(b"HTTP/1.1 400 ") and b"obs-fold" in response
    for bad in ("Bad Header: 1", "X-Nul: a\x00b"):
        response = await http_exchange(port, soap_post(b"A", bad))
        assert response.startswith(b"HTTP/1.1 400 "), (bad, response[:200])
    response = await http_exchange(port, soap_post(b"A", "Transfer-Encoding: gzip"))
    assert response.startswith(b"HTTP/1.1 501 ")
    assert member.requests == []
    # What looks like a fold in a body that came with the head is the body's, not the head's
    response = await http_exchange(port, soap_post(b" A\n\tB"))
    assert response.startswith(b"HTTP/1.1 200 "), response[:200]
    assert [body for _, body in member.requests] == [b" A\n\tB"]


async def test_hop_by_hop_headers_are_never_forwarded(nursery):
    member, port = await xds_with_recorder(nursery)
    response = await http_exchange(port, soap_post(
        b"A", "X-Secret: 1", "Keep-Alive: timeout=5", "TE: trailers", "Proxy-Authorization: x",
        "Proxy-Foo: y", "X-Kept: 1", connection="close, X-Secret"))
    assert body_of(response) == b"answer to A"
    (head, _), = member.requests
    names = {line.split(b":")[0].lower() for line in head.split(b"\r\n")[1:] if line}
    assert not names & {b"x-secret", b"keep-alive", b"te", b"proxy-authorization", b"proxy-foo"}
    assert b"x-kept" in names


async def test_a_request_with_nothing_to_drop_is_forwarded_as_sent_plus_x_forwarded_for(
        nursery):
    # Two requests on one connection: the first keeps every header (h11 writes it as read),
    # the second names one to drop (its head is written anew); each gets one X-Forwarded-For.
    member, port = await xds_with_recorder(nursery)
    response = await http_exchange(port, soap_post(b"A", "X-Kept: 1", connection="")
                                   + soap_post(b"B", "X-Kept: 2"))
    assert response.count(b"HTTP/1.1 200 ") == 2
    heads = [[line for line in head.split(b"\r\n") if line] for head, _ in member.requests]
    assert heads[0] == [b"POST /registry HTTP/1.1", b"Host: xds",
                        f"Content-Type: {ITI18_TYPE}".encode(), b"Content-Length: 1",
                        b"X-Kept: 1", b"X-Forwarded-For: 127.0.0.1"]
    assert [line.lower() for line in heads[1]] == [
        b"post /registry http/1.1", b"host: xds", f"content-type: {ITI18_TYPE}".lower().encode(),
        b"content-length: 1", b"x-kept: 2", b"x-forwarded-for: 127.0.0.1"]


async def test_x_forwarded_for_is_replaced_unless_the_client_is_a_trusted_proxy(nursery):
    def forwarded(member):
        head = member.requests[-1][0].decode()
        return [line.split(":", 1)[1].strip() for line in head.split("\r\n")
                if line.lower().startswith("x-forwarded-for:")]

    member, port = await xds_with_recorder(nursery)
    await http_exchange(port, soap_post(b"A", "X-Forwarded-For: 6.6.6.6"))
    assert forwarded(member) == ["127.0.0.1"]
    member, port = await xds_with_recorder(nursery, 'trusted_proxies = ["127.0.0.0/8"]')
    await http_exchange(port, soap_post(b"A", "X-Forwarded-For: 10.1.2.3"))
    assert forwarded(member) == ["10.1.2.3, 127.0.0.1"]


# -- 5. every codec error is declared

RFC2231_TYPES = ["multipart/related; boundary*=", "multipart/related; boundary*=; boundary*0=",
                 "multipart/related; boundary*0*=utf-8''%F0%91%80%9C",
                 "application/soap+xml; action*=; action*0=",
                 f"application/soap+xml; action*=utf-8''{soap.ITI18}"]


async def test_rfc2231_content_type_parameters_get_a_sender_fault(nursery):
    member, port = await xds_with_recorder(nursery)
    for content_type in RFC2231_TYPES:
        request = (f"POST /registry HTTP/1.1\r\nHost: xds\r\nContent-Type: {content_type}\r\n"
                   f"Content-Length: 1\r\nConnection: close\r\n\r\nA").encode()
        response = await http_exchange(port, request)
        assert response.startswith(b"HTTP/1.1 400 "), (content_type, response[:100])
        fault = soap.parse_registry_response(body_of(response)).fault
        assert fault.startswith("env:Sender") and "RFC 2231" in fault, fault
    assert member.requests == []


def associate_rq(called: bytes, calling: bytes) -> bytes:
    rq = bytearray(encode_associate_rq("VIP", "MODALITY", [(1, VERIFICATION_SOP_CLASS,
                                                              [IMPLICIT_VR_LITTLE_ENDIAN])]))
    rq[10:26], rq[26:42] = called.ljust(16), calling.ljust(16)
    return bytes(rq)


async def test_ae_titles_outside_the_repertoire_are_rejected_before_any_member(nursery):
    server = await ScriptedServer(HttpRecorder()).start(nursery)  # must never see the RQ
    gateway = await start_gateway(nursery, one_member_vip("dicom", server.port))
    before = server.connections  # the tcp check's
    for called, calling, reason in ((b"VIP", b"CT\xca01", 3), (b"VIP\xff", b"CT01", 7),
                                    (b"VIP", b"CT\nFORGED", 3), (b"VIP", b"C\\T", 3)):
        stream = await trio.open_tcp_stream("127.0.0.1", vip_port(gateway, "dicom"))
        with trio.fail_after(5):
            await stream.send_all(associate_rq(called, calling))
            answer = await stream.receive_some(100)
        await stream.aclose()
        assert AssociateReject.decode(answer) == AssociateReject(1, 1, reason), (calling, answer)
    assert server.connections == before


async def test_gateway_log_lines_cannot_be_forged_or_carry_message_content(tmp_path):
    gateway = GatewayProcess(tmp_path, '[gateway]\nadmin = ""\naudit = ""\n'
                             + one_member_vip("dicom", refused_port())
                             + one_member_vip("hl7", refused_port()))
    await trio.to_thread.run_sync(gateway.start)
    try:
        port, hl7_port = await trio.to_thread.run_sync(
            lambda: (gateway.port("dicom"), gateway.port("hl7")))
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(associate_rq(b"VIP", b"CT\nFORGED LINE"))
        with trio.fail_after(5):
            assert await stream.receive_some(100)
        await stream.aclose()
        for hostile in (b"PID|1||SECRET-PATIENT^^^HOSP\r", frame(b"PID|1||SECRET-PATIENT\r")):
            stream = await trio.open_tcp_stream("127.0.0.1", hl7_port)
            await stream.send_all(hostile)
            with trio.fail_after(5):
                while await stream.receive_some(100):
                    pass
            await stream.aclose()
        await trio.to_thread.run_sync(lambda: wait_until(
            lambda: gateway.text().count("vip=hl7 client=") >= 2, what="hl7 log lines"))
    finally:
        gateway.stop()
    text = gateway.text()
    assert "CT\\x0aFORGED LINE" in text
    assert not any(line.startswith("FORGED") for line in text.splitlines())
    assert "SECRET" not in text


# -- 6. bounded work per bad frame

@pytest.mark.parametrize("control_id", ["BIG000001", ""])
async def test_mllp_frame_over_the_limit_is_nakked_before_its_end_block(nursery, control_id):
    """Without MSH-10 too (MSA-2 empty then): such a sender was closed without an answer."""
    receiver = StrayAckReceiver()
    server = await ScriptedServer(receiver).start(nursery)
    gateway = await start_gateway(nursery, one_member_vip("hl7", server.port,
                                                          'max_message_bytes = "4KB"'))
    (message,) = make_messages(1, prefix="BIG")
    message = message.replace(b"|BIG000001|", f"|{control_id}|".encode())
    stream = await trio.open_tcp_stream("127.0.0.1", vip_port(gateway, "hl7"))
    answer = bytearray()
    with trio.fail_after(5):
        await stream.send_all(SB + message + b"OBX|1|ED|PDF||" + b"A" * 8000)  # no end block
        while data := await stream.receive_some(65536):
            answer += data
    await stream.aclose()
    ack = peek_ack(bytes(answer[1:answer.index(END)]))
    assert (ack.code, ack.control_id) == ("AR", control_id)
    assert receiver.received == []


# -- 7. HL7: never deliver for a sender that has gone

def failover_hl7(first: int, second: int, audit: Path, extra: str = "") -> str:
    return f"""
[gateway]
audit = "{audit}"

[[vip]]
name = "hl7"
protocol = "hl7"
listen = "127.0.0.1:0"
mode = "failover"
connect_timeout = "1s"
error_limit = 10
health = {{ check = "tcp", interval = "1h" }}
{extra}

[[vip.member]]
name = "ris1"
address = "127.0.0.1:{first}"

[[vip.member]]
name = "ris2"
address = "127.0.0.1:{second}"
"""


def audit_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def test_a_message_whose_sender_has_gone_is_not_tried_further(nursery, hl7_receiver,
                                                                     tmp_path):
    hung, good = hl7_receiver("RIS1", mode="hang"), hl7_receiver("RIS2")
    audit = tmp_path / "audit.jsonl"
    gateway = await start_gateway(nursery, failover_hl7(hung.port, good.port, audit,
                                                        'ack_timeout = "2s"'))
    (message,) = make_messages(1, prefix="GONE")
    stream = await trio.open_tcp_stream("127.0.0.1", vip_port(gateway, "hl7"))
    await stream.send_all(frame(message))
    with trio.move_on_after(0.5):  # the sender's own timeout: it gives up and closes
        await stream.receive_some(100)
    await stream.aclose()
    await eventually(lambda: audit.exists() and bool(audit_records(audit)), 10)
    await trio.sleep(2.5)  # past ack_timeout: 0.1 would have sent it to ris2 by now
    assert hung.control_ids == ["GONE000001"] and good.control_ids == []
    (record,) = audit_records(audit)
    assert record["ack"] != "AA" and record["told"] == "nothing (sender gone)"
    assert record["unanswered"] == ["ris1"] and "not tried further" in record["reason"]


async def test_message_timeout_bounds_all_tries_of_one_message(nursery, hl7_receiver, tmp_path):
    first, second = hl7_receiver("RIS1", mode="hang"), hl7_receiver("RIS2", mode="hang")
    audit = tmp_path / "audit.jsonl"
    gateway = await start_gateway(nursery, failover_hl7(
        first.port, second.port, audit, 'ack_timeout = "30s"\nmessage_timeout = "1s"\n'
                                        'in_doubt_answer = "nak"'))
    (message,) = make_messages(1, prefix="SLOW")
    stream = await trio.open_tcp_stream("127.0.0.1", vip_port(gateway, "hl7"))
    answer = bytearray()
    with trio.fail_after(10):
        await stream.send_all(frame(message))
        while END not in answer:
            answer += await stream.receive_some(1000)
    await stream.aclose()
    ack = peek_ack(bytes(answer[1:answer.index(END)]))
    # RIS1 has the whole message and said nothing: it is in doubt, not sent to RIS2.
    assert (ack.code, ack.control_id) == ("AE", "SLOW000001")
    assert "in doubt at ris1" in ack.text and "message_timeout" in ack.text
    assert second.control_ids == []
    (record,) = audit_records(audit)
    assert record["told"] == "AE from the gateway" and record["tries"] == 1
    assert record["in_doubt"] == "ris1"
