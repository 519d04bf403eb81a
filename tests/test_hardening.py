"""Hostile input and faulty members: no answer reaches the wrong client, no smuggling, no
exhaustion, every codec error declared. Each test fails on medgate 0.1."""

from __future__ import annotations

import trio

from gateway.simulators.hl7 import make_messages
from protocols import soap
from protocols.mllp import END, frame, peek_ack
from tests.faulty_members import HttpRecorder, ScriptedServer, StrayAckReceiver
from tests.helpers import start_gateway, vip_port

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
