"""Health checks against real sockets: what passes, and the reason given when it does not."""

from __future__ import annotations

import ssl

import pytest
import trio
import trustme

from gateway.config import Address, HealthConfig
from gateway.config import ClientTls, MemberConfig
from health.checks import Target, check_target, run_check
from protocols.mllp import peek_header


async def http_server(nursery, response: bytes, *, tls: ssl.SSLContext | None = None,
                      hang: bool = False) -> int:
    """Answer every request with `response` (raw bytes), or never answer when `hang`."""

    async def handle(stream):
        if tls is not None:
            stream = trio.SSLStream(stream, tls, server_side=True)
        try:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                request += chunk
            if hang:
                await trio.sleep_forever()
            await stream.send_all(response)
            await stream.aclose()
        except (trio.BrokenResourceError, ssl.SSLError):
            pass

    listeners = await nursery.start(trio.serve_tcp, handle, 0)
    return listeners[0].socket.getsockname()[1]


def ok_page(body: bytes, status: str = "200 OK") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\nContent-Type: text/plain\r\n"
            "\r\n").encode() + body


async def test_http_check_passes_on_2xx_and_finds_the_expected_text(nursery):
    port = await http_server(nursery, ok_page(b"status: OK, 2 nodes"))
    outcome = await run_check(T("127.0.0.1", port), HealthConfig("http", expect="OK"))
    assert outcome.ok and outcome.detail == "HTTP 200 OK, 'OK' found"
    assert 0 <= outcome.latency < 4


@pytest.mark.parametrize("response, expect, detail", [
    (ok_page(b"maintenance", "503 Service Unavailable"), "", "HTTP 503 Service Unavailable"),
    (ok_page(b"status: degraded"), "OK", "HTTP 200 OK, but the body does not contain 'OK'"),
    (b"SSH-2.0-OpenSSH_9.2\r\n", "", "not a valid HTTP response"),
    (b"", "", "connection closed before an HTTP response"),
])
async def test_http_check_failures_say_why(nursery, response, expect, detail):
    port = await http_server(nursery, response)
    outcome = await run_check(T("127.0.0.1", port), HealthConfig("http", expect=expect))
    assert not outcome.ok and detail in outcome.detail, outcome.detail


async def test_an_unreadable_response_is_described_without_its_bytes(nursery):
    port = await http_server(nursery, b"HTTP/1.1 200 OK\r\nnot a header DOE^JANE\r\n\r\n")
    outcome = await run_check(T("127.0.0.1", port), HealthConfig("http"))
    assert outcome.detail.endswith("not a valid HTTP response: illegal header line")
    assert "DOE" not in outcome.detail


async def test_redirect_passes(nursery):
    port = await http_server(nursery, b"HTTP/1.1 302 Found\r\nLocation: /login\r\n"
                                      b"Content-Length: 0\r\n\r\n")
    outcome = await run_check(T("127.0.0.1", port), HealthConfig("http"))
    assert outcome.ok and outcome.detail == "HTTP 302 Found"


async def test_hung_server_times_out(nursery, autojump_clock):
    """On trio's fake clock (autojump): the timeout is the check's own, whatever the machine."""
    port = await http_server(nursery, b"", hang=True)
    outcome = await run_check(T("127.0.0.1", port), HealthConfig("http", timeout=0.3))
    assert not outcome.ok and outcome.detail == "timeout after 0.3s"
    assert outcome.latency == pytest.approx(0.3)


async def test_tcp_check_refused():
    with trio.socket.socket() as sock:  # bound but not listening: connect is refused
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        outcome = await run_check(T("127.0.0.1", port), HealthConfig("tcp"))
    assert not outcome.ok and outcome.detail == "connection refused"


async def test_https_check_with_a_certificate_from_an_internal_ca(nursery, tmp_path):
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("viewer.hospital.local").configure_cert(server_context)
    ca.cert_pem.write_to_path(tmp_path / "ca.crt")
    port = await http_server(nursery, ok_page(b"OK"), tls=server_context)
    health = HealthConfig("http", tls=True, path="/health", expect="OK")

    def member(**tls) -> MemberConfig:
        return MemberConfig("viewer", Address("127.0.0.1", port), tls=ClientTls(**tls))

    trusted = member(ca=str(tmp_path / "ca.crt"), server_name="viewer.hospital.local")
    outcome = await run_check(check_target(trusted, health), health)
    assert outcome.ok, outcome.detail
    assert outcome.certificate_expires is not None  # what the expiry gauge shows
    untrusted = await run_check(check_target(member(), health), health)
    assert not untrusted.ok and untrusted.detail.startswith("TLS: unknown CA: ")
    wrong_name = await run_check(check_target(member(ca=str(tmp_path / "ca.crt")), health), health)
    assert wrong_name.detail == ("TLS: hostname mismatch: the certificate is for "
                                 "DNS:viewer.hospital.local, not '127.0.0.1'")
    plain = await run_check(T("127.0.0.1", port), HealthConfig("http", timeout=1))
    assert not plain.ok  # speaking plain HTTP to a TLS port fails visibly


def T(host: str, port: int) -> Target:
    return Target(Address(host, port))


def test_check_port_overrides_the_service_port():
    member = MemberConfig("pacs1", Address("10.0.0.5", 104), ae_title="PACS1")
    assert check_target(member, HealthConfig("http", port=8080)) == Target(
        Address("10.0.0.5", 8080), "PACS1")
    assert check_target(member, HealthConfig("http")) == Target(member.address, "PACS1")


async def test_hl7_ack_check_sends_the_site_heartbeat_with_a_fresh_control_id(hl7_receiver,
                                                                              tmp_path):
    heartbeat = tmp_path / "heartbeat.hl7"
    heartbeat.write_bytes(b"\x0bMSH|^~\\&|ENGINE|HOSP|RIS|HOSP|2020||NMQ^N01|FIXED|P|2.5\r\n"
                          b"NCK|20200101\x1c\r")  # framed, CRLF: both tolerated
    receiver = hl7_receiver("RIS1")
    health = HealthConfig("hl7-ack", message=str(heartbeat))
    first = await run_check(T("127.0.0.1", receiver.port), health)
    second = await run_check(T("127.0.0.1", receiver.port), health)
    assert first.ok and first.detail == "MSA-1 AA" and second.ok
    ids = receiver.control_ids
    assert len(set(ids)) == 2 and "FIXED" not in ids
    assert [m.message_type for m in receiver.received] == ["NMQ^N01", "NMQ^N01"]
    assert receiver.received[0].payload.endswith(b"NCK|20200101\r")


async def test_the_default_hl7_heartbeat_is_not_clinical_and_accept_reject_passes_a_nak(
        hl7_receiver):
    receiver = hl7_receiver("RIS1")
    target = T("127.0.0.1", receiver.port)
    assert (await run_check(target, HealthConfig("hl7-ack"))).ok
    heartbeat = receiver.received[0]
    assert heartbeat.message_type == "NMD^N02^NMD_N02" and heartbeat.patient_id == ""
    assert peek_header(heartbeat.payload).processing_id == "T"  # test processing
    receiver.mode = "AR"  # an engine that rejects a type it does not route
    refused = await run_check(target, HealthConfig("hl7-ack"))
    assert not refused.ok and refused.detail.startswith("MSA-1 AR")
    alive = await run_check(target, HealthConfig("hl7-ack", accept_reject=True))
    assert alive.ok and alive.detail.startswith("MSA-1 AR")
