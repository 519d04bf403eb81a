"""TLS on VIPs and to members, with TLS stacks no one here wrote: DCMTK's `+tls`, curl and
OpenSSL's `s_client`, plus python's ssl as an MLLP/TLS sender."""

from __future__ import annotations

import json
import re
import signal
import shutil
import ssl
import subprocess
import sys
import time

import pytest
import trio

from gateway.balancer import Health
from gateway.config import Address, ClientTls, HealthConfig, MemberConfig
from health.checks import check_target, run_check
from protocols import mllp, soap
from gateway.testing.simulators.hl7_messages import make_messages as hl7_messages
from tests.helpers.dicom_peers import echoscu, storescu, write_instances
from tests.helpers.faulty_members import ScriptedServer, StrayAckReceiver
from tests.helpers import (GatewayProcess, start_backends, start_gateway, stop_process, vip_port,
                           wait_for_health, wait_until)
from tests.test_dicom_vip import dicom_vip, stored_by_storescu
from tests.test_xds_vip import (FIXTURES, ITI18_TYPE, MTOM_TYPE, UNIQUE_ID, curl, write_mtom,
                                xds_vip)


def tls_table(cert: tuple[str, str], **more: str) -> str:
    """A TOML inline table for `tls = ...`."""
    pairs = {"cert": cert[0], "key": cert[1], **more}
    return "{ " + ", ".join(f'{key} = "{value}"' for key, value in pairs.items()) + " }"


def dcmtk_tls(certs, leaf=None) -> list[str]:
    """DCMTK's TLS options: a client certificate (or anonymous TLS) trusting the test CA."""
    if leaf is None:
        return ["+tla", "+cf", certs.ca]
    return ["+tls", leaf[1], leaf[0], "-pw", "+cf", certs.ca]


def server_context(leaf: tuple[str, str], ca: str | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*leaf)
    if ca:
        context.load_verify_locations(ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def test_dcmtk_over_tls_through_a_tls_vip_to_plain_members(nursery, pacs, certs, tmp_path):
    pacs1 = pacs("PACS1")
    gateway = await start_gateway(nursery, dicom_vip(
        [("pacs1", pacs1.port, "PACS1")],
        extra=f"tls = {tls_table(certs.server, ca=certs.ca, verify_client='required')}\n"
              'allowed_clients = { "CN=ct1.hospital.local" = ["ECHOSCU", "STORESCU"] }'))
    port = vip_port(gateway, "pacs")
    echo = await echoscu(port, "VIP", "ECHOSCU", *dcmtk_tls(certs, certs.client))
    assert echo.clean, echo.stderr
    files = write_instances(tmp_path / "files", 4)
    stored = await storescu(port, sorted(files), "VIP", "STORESCU", *dcmtk_tls(certs, certs.client))
    assert stored.clean, stored.stderr
    assert set(pacs1.stored) == set(files.values())

    # The certificate of us2 may not call as ECHOSCU: A-ASSOCIATE-RJ permanent, calling AE.
    other = await echoscu(port, "VIP", "ECHOSCU", *dcmtk_tls(certs, certs.other_client))
    assert not other.clean and "Calling AE Title Not Recognized" in other.stderr, other.stderr
    # verify_client = "required": no certificate, no association (and a plain client neither).
    anonymous = await echoscu(port, "VIP", "ECHOSCU", *dcmtk_tls(certs))
    assert not anonymous.clean
    plain = await echoscu(port)
    assert not plain.clean
    assert gateway.balancer.pool("pacs").member("pacs1").total == 2  # the refused never got there


async def test_plain_dcmtk_through_a_vip_to_a_tls_only_storescp(nursery, storescp_tls, certs,
                                                                 tmp_path):
    member_tls = (f'tls = {{ ca = "{certs.ca}", cert = "{certs.client[0]}", '
                  f'key = "{certs.client[1]}" }}')
    gateway = await start_gateway(nursery, dicom_vip(
        [("tlspacs", storescp_tls, "TLSPACS")], member_extra={"tlspacs": member_tls}))
    member = gateway.balancer.pool("pacs").member("tlspacs")
    # (a first check may time out on a busy machine; the next ones say whether TLS works)
    await wait_for_health(gateway.balancer.pool("pacs"), "tlspacs", Health.UP, 20)
    assert member.last_check.ok, member.last_check.detail  # the C-ECHO check went over TLS
    assert member.certificate_expires is not None
    port = vip_port(gateway, "pacs")
    echo = await echoscu(port)
    assert echo.clean, echo.stderr
    files = write_instances(tmp_path / "files", 3)
    stored = await storescu(port, sorted(files), "VIP", "STORESCU", "-v")
    assert stored.clean, stored.stderr
    assert stored_by_storescu(stored.stderr, sorted(files)) == set(files)
    assert len(list((tmp_path / "received").iterdir())) == 3


async def mllp_tls_exchange(port: int, ca: str, messages: list[bytes]) -> list[bytes]:
    """Send each message over one MLLP/TLS connection (python's ssl), each after its ACK."""
    context = ssl.create_default_context(cafile=ca)
    stream = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), context,
                            server_hostname="127.0.0.1")
    reader = mllp.MllpReader(1 << 20)
    acks = []
    with trio.fail_after(30):
        for message in messages:
            await stream.send_all(mllp.frame(message))
            while (event := reader.next_event()) is None:
                reader.feed(await stream.receive_some(65536))
            acks.append(event.payload)
    await stream.aclose()
    return acks


async def test_mllp_over_tls_on_both_sides_every_message_acked_and_correlated(
        nursery, hl7_receiver, hl7_sender, certs):
    receiver = hl7_receiver("RIS", tls=server_context(certs.server))
    gateway = await start_gateway(nursery, f"""
[[vip]]
name = "ris"
protocol = "hl7"
listen = "127.0.0.1:0"
tls = {tls_table(certs.server)}
health = {{ check = "hl7-ack", interval = "300ms", timeout = "2s" }}

[[vip.member]]
name = "ris1"
address = "127.0.0.1:{receiver.port}"
tls = {{ ca = "{certs.ca}" }}
""")
    await wait_for_health(gateway.balancer.pool("ris"), "ris1", Health.UP, 20)
    assert gateway.balancer.pool("ris").member("ris1").last_check.ok
    messages = hl7_sender.make_messages(20)
    acks = await mllp_tls_exchange(vip_port(gateway, "ris"), certs.ca, messages)
    for message, ack in zip(messages, acks):
        answer = mllp.peek_ack(ack)
        assert answer.code == "AA" and answer.control_id == mllp.peek_header(message).control_id
    sent_ids = [mllp.peek_header(m).control_id for m in messages]
    assert [i for i in receiver.control_ids if not i.startswith("MEDGATE-HC")] == sent_ids


async def test_xds_over_https_with_mutual_tls_and_the_client_subject_forwarded(
        nursery, xds_registry, xds_repository, certs, tmp_path):
    registry = xds_registry()
    repository = xds_repository(registry_url=f"{registry.url}registry")
    gateway = await start_gateway(nursery, xds_vip(
        [registry.port], [repository.port],
        extra=f"tls = {tls_table(certs.server, ca=certs.ca, verify_client='required')}\n"
              "forward_client_cert = true"))
    base = f"https://127.0.0.1:{vip_port(gateway, 'xds')}"
    client = ["--cacert", certs.ca, "--cert", certs.client[0], "--key", certs.client[1]]
    sha = write_mtom(tmp_path / "iti41.bin", 50)
    status, _, body = await curl(f"{base}/repository", MTOM_TYPE, tmp_path / "iti41.bin",
                                 *client, scratch=tmp_path)
    assert status == 200 and soap.parse_registry_response(body).success, body[:500]
    assert repository.documents[UNIQUE_ID].sha256 == sha
    status, _, body = await curl(f"{base}/registry", ITI18_TYPE,
                                 FIXTURES / "iti18-find-documents.xml", *client, scratch=tmp_path)
    assert status == 200 and soap.parse_registry_response(body).success
    forwarded = repository.client_certs[repository.requests.index("ITI-41")]
    assert re.fullmatch(r'Subject="CN=ct1\.hospital\.local,OU=[^"]*,O=trustme[^"]*";'
                        r'DNS="ct1\.hospital\.local"', forwarded), forwarded
    # Only the client's ITI-18 carried it: not the health checks, not ITI-42 (repository's own).
    assert [c for c in registry.client_certs if c] == [forwarded]
    # Without a client certificate: no HTTP answer at all (curl prints 000).
    refused = await trio.run_process(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", certs.ca,
         "-H", f"Content-Type: {ITI18_TYPE}", "--data-binary",
         f"@{FIXTURES / 'iti18-find-documents.xml'}", f"{base}/registry"],
        capture_stdout=True, capture_stderr=True, check=False)
    assert refused.returncode != 0 and refused.stdout == b"000"


@pytest.mark.parametrize("check", ["tcp", "http", "dicom-echo", "hl7-ack", "xds-query"])
async def test_each_check_says_what_is_wrong_with_a_member_certificate(hl7_receiver, certs,
                                                                        check):
    expired = hl7_receiver("EXPIRED", tls=server_context(certs.expired))
    wrong_host = hl7_receiver("WRONG", tls=server_context(certs.wrong_host))
    stranger = hl7_receiver("STRANGER", tls=server_context(certs.stranger))
    health = HealthConfig(check, timeout=3, patient_id="P1")

    outcomes = {}

    async def reason(port: int) -> str:
        member = MemberConfig("m", Address("127.0.0.1", port), tls=ClientTls(ca=certs.ca))
        outcome = outcomes[port] = await run_check(check_target(member, health), health)
        assert not outcome.ok
        return outcome.detail

    assert (await reason(expired.port)).startswith("TLS: certificate expired on ")
    # the date is known though the certificate was refused: the expiry gauge goes negative
    assert outcomes[expired.port].certificate_expires < time.time()
    assert (await reason(wrong_host.port)) == ("TLS: hostname mismatch: the certificate is for "
                                               "DNS:other.example.org, not '127.0.0.1'")
    assert (await reason(stranger.port)).startswith("TLS: unknown CA: ")
    assert outcomes[stranger.port].certificate_expires > time.time()


def test_gateway_check_urls_over_tls(hl7_receiver, certs):
    good = hl7_receiver("RIS", tls=server_context(certs.server))
    expiring = hl7_receiver("SOON", tls=server_context(certs.expiring))
    expired = hl7_receiver("OLD", tls=server_context(certs.expired))
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check", "--json",
         *(f"hl7s://127.0.0.1:{r.port}?ca={certs.ca}" for r in (good, expiring, expired))],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1, result.stderr
    good_check, expiring_check, expired_check = json.loads(result.stdout)["checks"]
    assert good_check["ok"] and good_check["certificate_expires"] and not good_check["warning"]
    assert expiring_check["ok"] and expiring_check["warning"].startswith(
        "certificate expires in 10 days")
    assert expired_check["reason"].startswith("TLS: certificate expired on ")


async def test_sighup_with_new_certificates_new_clients_get_them_live_ones_go_on(
        nursery, certs, tmp_path):
    web, = await start_backends(nursery, "web1")
    cert, key = tmp_path / "vip.crt", tmp_path / "vip.key"
    shutil.copy(certs.server[0], cert)
    shutil.copy(certs.server[1], key)
    gateway = GatewayProcess(tmp_path, f"""
[gateway]
admin = ""
[[vip]]
name = "web"
protocol = "tcp"
listen = "127.0.0.1:0"
tls = {{ cert = "{cert}", key = "{key}" }}
[[vip.member]]
name = "web1"
address = "127.0.0.1:{web.port}"
""").start()
    port = gateway.port("web")
    try:
        context = ssl.create_default_context(cafile=certs.ca)
        live = trio.SSLStream(await trio.open_tcp_stream("127.0.0.1", port), context,
                              server_hostname="127.0.0.1")
        with trio.fail_after(10):
            assert await live.receive_some(100) == b"web1\n"
        assert "CN = server-2" not in await s_client_subject(port, certs.ca)
        shutil.copy(certs.server2[0], cert)
        shutil.copy(certs.server2[1], key)
        gateway.process.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded" in gateway.text(), what="reload")
        assert "CN = server-2" in await s_client_subject(port, certs.ca)
        with trio.fail_after(10):
            await live.send_all(b"still here\n")
            assert await live.receive_some(100) == b"still here\n"
        await live.aclose()
    finally:
        gateway.stop()


async def s_client_subject(port: int, ca: str) -> str:
    """The subject line `openssl s_client` prints for the certificate it was given."""
    with trio.fail_after(20):
        result = await trio.run_process(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", ca,
             "-verify_return_error", "-brief"],
            stdin=b"", capture_stdout=True, capture_stderr=True, check=False)
    text = (result.stdout + result.stderr).decode(errors="replace")
    assert "Verification: OK" in text, text
    return next(line for line in text.splitlines() if "Peer certificate" in line)


async def test_admin_over_https_shows_the_member_certificate_expiry(nursery, hl7_receiver, certs,
                                                                   tmp_path):
    receiver = hl7_receiver("RIS", tls=server_context(certs.server))
    soon = hl7_receiver("SOON", tls=server_context(certs.expiring))
    config = f"""
[gateway]
admin = "127.0.0.1:0"
admin_tls = {tls_table(certs.server)}
[[vip]]
name = "ris"
protocol = "hl7"
listen = "127.0.0.1:0"
health = {{ check = "hl7-ack", interval = "1s" }}
[[vip.member]]
name = "ris1"
address = "127.0.0.1:{receiver.port}"
tls = {{ ca = "{certs.ca}" }}
[[vip.member]]
name = "ris2"
address = "127.0.0.1:{soon.port}"
tls = {{ ca = "{certs.ca}" }}
"""
    gateway = await start_gateway(nursery, config, admin=True)
    base = f"https://{gateway.admin_address}"
    with trio.fail_after(20):
        status = await trio.run_process(["curl", "-sS", "--cacert", certs.ca, f"{base}/api/status"],
                                        capture_stdout=True, capture_stderr=True)
        metrics = await trio.run_process(["curl", "-sS", "--cacert", certs.ca, f"{base}/metrics"],
                                         capture_stdout=True, capture_stderr=True)
        page = await trio.run_process(["curl", "-sS", "--cacert", certs.ca, f"{base}/"],
                                      capture_stdout=True, capture_stderr=True)
        plain = await trio.run_process(["curl", "-sS", f"http://{gateway.admin_address}/api/status"],
                                       capture_stdout=True, capture_stderr=True, check=False)
    member, expiring = json.loads(status.stdout)["vips"][0]["members"]
    assert member["certificate_expires"].endswith("UTC") and member["last_check"]["ok"]
    assert member["certificate_days_left"] > 300 and 9 < expiring["certificate_days_left"] <= 10
    assert page.stdout.count(b"WARNING, 10 days left") == 1
    gauge = re.search(rb'medgate_member_certificate_expiry_seconds\{member="ris1",vip="ris"\} '
                      rb'(\S+)', metrics.stdout)
    assert gauge and float(gauge.group(1)) > 86400, metrics.stdout[-2000:]
    assert plain.returncode != 0  # no clear-text answer on the HTTPS port
    # gateway ctl -c: https from admin_tls, trusting the admin server's own certificate.
    (tmp_path / "site.toml").write_text(config.replace(
        'admin = "127.0.0.1:0"', f'admin = "{gateway.admin_address}"'))
    ctl = await trio.run_process([sys.executable, "-m", "gateway", "ctl", "-c",
                                  str(tmp_path / "site.toml"), "status"],
                                 capture_stdout=True, capture_stderr=True, check=False)
    assert ctl.returncode == 0 and b"ris1" in ctl.stdout, ctl.stderr


def test_haproxy_export_of_tls_vips_and_members_passes_haproxy_c(certs, tmp_path):
    config = tmp_path / "medgate.toml"
    config.write_text(f"""
[[vip]]
name = "pacs-tls"
protocol = "dicom"
listen = "127.0.0.1:2762"
tls = {tls_table(certs.server, ca=certs.ca, verify_client='required')}
accept_proxy = true
trusted_proxies = ["10.1.0.0/16"]
[[vip.member]]
name = "pacs1"
address = "127.0.0.1:11112"
send_proxy = true
tls = {{ ca = "{certs.ca}", cert = "{certs.client[0]}", key = "{certs.client[1]}", server_name = "localhost" }}

[[vip]]
name = "xds"
protocol = "xds"
listen = "127.0.0.1:8443"
tls = {tls_table(certs.server, ca=certs.ca, verify_client='optional')}
forward_client_cert = true
health = {{ check = "xds-query", patient_id = "P1", path = "/registry" }}
[[vip.member]]
name = "registry1"
address = "127.0.0.1:8080"
""")
    exported = subprocess.run([sys.executable, "-m", "gateway", "export", "haproxy", "-c",
                               str(config), "--checks", "tcp"], capture_output=True, text=True)
    assert exported.returncode == 0, exported.stderr
    text = exported.stdout
    assert "ssl crt " in text and f"ca-file {certs.ca} verify required" in text
    assert "verify optional" in text and "X-Forwarded-Client-Cert" in text
    assert "send-proxy-v2 ssl " in text and "verifyhost localhost" in text
    assert "expect-proxy layer4 if { src 10.1.0.0/16 }" in text
    # The comment says how to make the one-file PEMs HAProxy reads; do what it says.
    for line in text.splitlines():
        if line.startswith("# HAProxy reads certificate and key from one file: "):
            subprocess.run(line.split(": ", 1)[1], shell=True, check=True)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(text.replace("/run/haproxy/admin.sock", str(tmp_path / "admin.sock")))
    checked = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def simulator(folder, *args: str) -> tuple[subprocess.Popen, int]:
    """`gateway simulate ...` as a process; (process, the port it printed in READY)."""
    process = subprocess.Popen([sys.executable, "-m", "gateway", "simulate", *args],
                               stdout=subprocess.PIPE, stderr=open(folder / f"{args[0]}.log", "wb"),
                               start_new_session=True)
    line = process.stdout.readline().decode()
    assert line.startswith("READY"), (line, (folder / f"{args[0]}.log").read_text())
    return process, int(line.rsplit(":", 1)[1])


def test_command_line_simulators_and_gateway_over_tls_with_atna(certs, tmp_path):
    server = ["--tls-cert", certs.server[0], "--tls-key", certs.server[1]]
    receiver, ris_port = simulator(tmp_path, "hl7-receiver", "--listen", "127.0.0.1:0", *server)
    repository, arr_port = simulator(tmp_path, "audit-repository", "--listen", "127.0.0.1:0",
                                     *server, "--tls-ca", certs.ca)
    gateway = GatewayProcess(tmp_path, f"""
[gateway]
admin = ""
atna = {{ repository = "127.0.0.1:{arr_port}", ca = "{certs.ca}", cert = "{certs.client[0]}", key = "{certs.client[1]}", spool = "{tmp_path / 'spool'}" }}
[[vip]]
name = "ris"
protocol = "hl7"
listen = "127.0.0.1:0"
tls = {tls_table(certs.server)}
health = {{ check = "hl7-ack", interval = "1s" }}
[[vip.member]]
name = "ris1"
address = "127.0.0.1:{ris_port}"
tls = {{ ca = "{certs.ca}" }}
""")
    try:
        gateway.start()
        sent = subprocess.run([sys.executable, "-m", "gateway", "simulate", "hl7-sender",
                               f"127.0.0.1:{gateway.port('ris')}", "--count", "5", "--tls-ca", certs.ca],
                              capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0 and sent.stdout.strip().endswith("5 of 5 accepted"), sent
        gateway.stop()  # Application Start, then Application Stop at the end
        stop_process(repository)
        assert repository.stdout.read().decode().strip() == "received 2 audit message(s)"
    finally:
        gateway.stop()
        for process in (receiver, repository):
            stop_process(process)


@pytest.mark.parametrize("separately", [False, True])
async def test_stray_ack_from_a_tls_member_is_never_relayed(nursery, certs, separately):
    """The hardening rule over TLS: a pooled connection holding anything after the awaited
    ACK (decrypted, in a further TLS record, or on the socket) is never reused."""
    receiver = StrayAckReceiver(separately)
    server = await ScriptedServer(receiver, tls=server_context(certs.server)).start(nursery)
    gateway = await start_gateway(nursery, f"""
[[vip]]
name = "hl7"
protocol = "hl7"
listen = "127.0.0.1:0"
ack_timeout = "2s"
error_limit = 10
health = {{ check = "tcp", interval = "1h" }}
[[vip.member]]
name = "m1"
address = "127.0.0.1:{server.port}"
tls = {{ ca = "{certs.ca}" }}
""")
    stream = await trio.open_tcp_stream("127.0.0.1", vip_port(gateway, "hl7"))
    answers = []
    reader = mllp.MllpReader(1 << 20)
    with trio.fail_after(10):
        for message in hl7_messages(6):
            await stream.send_all(mllp.frame(message))
            while (event := reader.next_event()) is None:
                reader.feed(await stream.receive_some(65536))
            answers.append(mllp.peek_ack(event.payload))
    await stream.aclose()
    assert [a.text for a in answers] == ["real"] * 6
    assert [a.control_id for a in answers] == receiver.received
    assert gateway.balancer.pool("hl7").member("m1").failed >= 5  # a strike for each stray
