"""`gateway check`, the HAProxy agent and the HAProxy / keepalived exports, with the real engines."""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.commands.export import combined_pem
from tests.helpers.dicom_peers import DCMTK_ENV, dcmtk, write_instances
from tests.helpers import (listening, refused_port, reserved_port, reserved_ports, stop_process,
                           wait_started, wait_until)

GATEWAY = [sys.executable, "-m", "gateway"]


def gateway(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*GATEWAY, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def storescp(tmp_path):
    """DCMTK's storescp (AE PACS), a PACS no one here wrote."""
    port = reserved_port()
    process = wait_started(subprocess.Popen(
        [dcmtk("storescp"), "--fork", "--ignore", "-aet", "PACS", str(port)], env=DCMTK_ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True),
        lambda: subprocess.run([dcmtk("echoscu"), "-aec", "PACS", "127.0.0.1", str(port)],
                               env=DCMTK_ENV, capture_output=True).returncode == 0, "storescp")
    yield port
    stop_process(process)


def closed_port() -> int:
    return refused_port()


def test_check_config_reports_each_member_with_its_reason(tmp_path, storescp, pacs, hl7_receiver,
                                                           xds_registry):
    rejecting = pacs("PACS2", reject=True)
    ris_ok, ris_nak, ris_hung = hl7_receiver("RIS1"), hl7_receiver("RIS2", mode="AR"), \
        hl7_receiver("RIS3", mode="hang")
    registry_ok, registry_failing = xds_registry(), xds_registry(mode="failure", name="REG2")
    config = tmp_path / "site.toml"
    config.write_text(f"""
[defaults]
health = {{ timeout = "1s" }}
[[vip]]
name = "dicom"
protocol = "dicom"
listen = "127.0.0.1:0"
health = {{ check = "dicom-echo" }}
[[vip.member]]
name = "storescp"
address = "127.0.0.1:{storescp}"
ae_title = "PACS"
[[vip.member]]
name = "rejecting"
address = "127.0.0.1:{rejecting.port}"
ae_title = "PACS2"
[[vip.member]]
name = "gone"
address = "127.0.0.1:{closed_port()}"
ae_title = "PACS3"
[[vip]]
name = "hl7"
protocol = "hl7"
listen = "127.0.0.1:0"
health = {{ check = "hl7-ack" }}
routes = [{{ match = {{ "MSH-9" = "ORU^*" }}, members = ["ris1"] }},
          {{ match = "*", members = ["ris2", "ris3"] }}]
[[vip.member]]
name = "ris1"
address = "127.0.0.1:{ris_ok.port}"
[[vip.member]]
name = "ris2"
address = "127.0.0.1:{ris_nak.port}"
[[vip.member]]
name = "ris3"
address = "127.0.0.1:{ris_hung.port}"
[[vip]]
name = "xds"
protocol = "xds"
listen = "127.0.0.1:0"
health = {{ check = "xds-query", path = "/registry", patient_id = "P1^^^&1.2&ISO" }}
[[vip.member]]
name = "reg1"
address = "127.0.0.1:{registry_ok.port}"
role = "registry"
[[vip.member]]
name = "reg2"
address = "127.0.0.1:{registry_failing.port}"
role = "registry"
""")
    result = gateway("check", "-c", str(config), "--json")
    assert result.returncode == 1, result.stderr  # some down, every VIP has one up
    document = json.loads(result.stdout)
    reasons = {c["member"]: (c["ok"], c["reason"]) for c in document["checks"]}
    assert reasons["storescp"] == (True, "C-ECHO status 0x0000 (success)")
    assert reasons["rejecting"] == (False, "association rejected (rejected-permanent, "
                                           "service-user, calling-AE-title-not-recognized)")
    assert reasons["gone"] == (False, "connection refused")
    assert reasons["ris1"] == (True, "MSA-1 AA")
    assert reasons["ris2"] == (False, "MSA-1 AR: RIS2 answers AR on demand")
    assert reasons["ris3"] == (False, "timeout after 1s")
    assert reasons["reg1"][0] and reasons["reg1"][1].startswith("Success, 0 document(s)")
    assert reasons["reg2"] == (False, "Failure: XDSRegistryError: REG2: simulated failure")
    assert document["status"] == "degraded" and document["exit"] == 1
    assert document["routes"] == [
        {"vip": "hl7", "route": 1, "match": "MSH-9=ORU^*", "members": ["ris1"],
         "members_up": ["ris1"]},
        {"vip": "hl7", "route": 2, "match": "*", "members": ["ris2", "ris3"],
         "members_up": []}]
    routes = gateway("check", "-c", str(config), "--vip", "hl7")
    assert "routes (first match wins)" in routes.stdout
    assert "ris2, ris3" in routes.stdout and "none: refused" in routes.stdout

    text = gateway("check", "-c", str(config), "--vip", "dicom")
    assert text.returncode == 1
    assert "storescp" in text.stdout and "UP" in text.stdout and "connection refused" in text.stdout
    assert "ris1" not in text.stdout and "routes" not in text.stdout

    rejecting.reject = False
    assert gateway("check", "-c", str(config), "--vip", "nope").returncode == 3


def test_check_urls_exit_codes(storescp, pacs):
    live = f"dicom://MEDGATE@PACS@127.0.0.1:{storescp}"
    dead = f"dicom://PACS@127.0.0.1:{closed_port()}"
    assert gateway("check", live).returncode == 0
    assert gateway("check", live, dead).returncode == 1
    only_dead = gateway("check", dead, "--json")
    assert only_dead.returncode == 2 and json.loads(only_dead.stdout)["status"] == "down"
    usage = gateway("check", "dicom://127.0.0.1:104")
    assert usage.returncode == 3 and "called AE title" in usage.stderr
    assert gateway("check").returncode == 3


# -- HAProxy

def hap(sock_path: Path, command: str) -> str:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(sock_path))
        sock.sendall(command.encode() + b"\n")
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out.decode()


def server_status(sock_path: Path, backend: str, server: str) -> str:
    for line in hap(sock_path, "show stat").splitlines():
        fields = line.split(",")
        if len(fields) > 18 and fields[0] == backend and fields[1] == server:
            return fields[17]
    return ""


def dicom_vip_config(path: Path, vip_port: int, members: list[tuple[str, int, str]]) -> Path:
    text = f"""
[[vip]]
name = "pacs"
protocol = "dicom"
listen = "127.0.0.1:{vip_port}"
health = {{ check = "dicom-echo", interval = "300ms", timeout = "1s", rise = 1, fall = 2 }}
"""
    for name, port, ae in members:
        text += f'[[vip.member]]\nname = "{name}"\naddress = "127.0.0.1:{port}"\nae_title = "{ae}"\n'
    path.write_text(text)
    return path


class HAProxy:
    """HAProxy on `cfg`, once its frontend listens on 127.0.0.1:`port`."""

    def __init__(self, cfg: Path, folder: Path, port: int) -> None:
        checked = subprocess.run(["haproxy", "-c", "-f", str(cfg)], capture_output=True,
                                 text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        self.process = wait_started(subprocess.Popen(
            ["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL,
            stderr=open(folder / "haproxy.log", "wb"), start_new_session=True),
            lambda: listening(port), "haproxy listening")

    def stop(self) -> None:
        stop_process(self.process)


def wait_status(sock: Path, backend: str, server: str, wanted, timeout: float = 10) -> float:
    started = time.monotonic()
    wait_until(lambda: sock.exists() and server_status(sock, backend, server).startswith(wanted),
               timeout=timeout, what=f"{backend}/{server} {wanted}")
    return time.monotonic() - started


def test_haproxy_with_the_medgate_agent_balances_dicom_and_drops_a_rejecting_pacs(tmp_path, pacs):
    pacs1, pacs2 = pacs("PACS1"), pacs("PACS2")
    # The agent listens on its port and one more per member (HAProxy configs without
    # agent-send): all held, or another test's connection could take one of them
    vip_port, agent_port = reserved_port(), reserved_ports(3)[0]
    # One called AE for both: HAProxy cannot rewrite it (see the chain layout test below)
    config = dicom_vip_config(tmp_path / "site.toml", vip_port,
                              [("pacs1", pacs1.port, "PACS"), ("pacs2", pacs2.port, "PACS")])
    sock = tmp_path / "admin.sock"
    cfg = tmp_path / "haproxy.cfg"
    exported = gateway("export", "haproxy", "-c", str(config), "--agent",
                       f"127.0.0.1:{agent_port}", "--stats-socket", str(sock), "-o", str(cfg))
    assert exported.returncode == 0, exported.stderr
    assert 'agent-send "pacs/pacs1\\n"' in cfg.read_text()
    agent = subprocess.Popen([*GATEWAY, "agent", "-c", str(config), "--listen",
                              f"127.0.0.1:{agent_port}"], stdout=subprocess.DEVNULL,
                             stderr=open(tmp_path / "agent.log", "wb"), start_new_session=True)
    try:
        haproxy = HAProxy(cfg, tmp_path, vip_port)
    except BaseException:
        stop_process(agent)
        raise
    try:
        wait_status(sock, "pacs", "pacs1", "UP")
        wait_status(sock, "pacs", "pacs2", "UP")
        for _ in range(4):
            echo = subprocess.run([dcmtk("echoscu"), "-aec", "PACS", "127.0.0.1", str(vip_port)],
                                  env=DCMTK_ENV, capture_output=True, text=True, timeout=30)
            assert echo.returncode == 0 and "E:" not in echo.stderr and "F:" not in echo.stderr
        assert pacs1.echoes >= 2 and pacs2.echoes >= 2  # round robin across both

        pacs2.reject = True  # accepts TCP, rejects every association
        # How soon is a figure, not a bound: a loaded machine delays HAProxy's checks too.
        took = wait_status(sock, "pacs", "pacs2", "DOWN", timeout=30)
        print(f"\nHAProxy took the rejecting PACS down in {took:.1f} s (fall x interval: 0.6 s)")
        before = pacs1.echoes
        for _ in range(4):
            subprocess.run([dcmtk("echoscu"), "-aec", "PACS", "127.0.0.1", str(vip_port)],
                           env=DCMTK_ENV, capture_output=True, timeout=30, check=True)
        assert pacs1.echoes - before >= 4  # all of them (plus pacs1's own checks)
        pacs2.reject = False
        wait_status(sock, "pacs", "pacs2", "UP")
    finally:
        haproxy.stop()
        stop_process(agent)


def test_haproxy_native_dicom_checks_with_each_members_ae_titles(tmp_path, pacs, storescp):
    rejecting = pacs("PACS2", reject=True)
    sock = tmp_path / "admin.sock"
    port = reserved_port()
    config = dicom_vip_config(tmp_path / "site.toml", port,
                              [("live", storescp, "PACS"), ("rejecting", rejecting.port, "PACS")])
    cfg = tmp_path / "haproxy.cfg"
    assert gateway("export", "haproxy", "-c", str(config), "--checks", "native",
                   "--stats-socket", str(sock), "-o", str(cfg)).returncode == 0
    haproxy = HAProxy(cfg, tmp_path, port)
    try:
        wait_status(sock, "pacs_check_live", "live", "UP")
        wait_status(sock, "pacs", "live", "UP")
        wait_status(sock, "pacs_check_rejecting", "rejecting", "DOWN")
        wait_status(sock, "pacs", "rejecting", "DOWN")
        rejecting.reject = False
        wait_status(sock, "pacs", "rejecting", "UP")
    finally:
        haproxy.stop()


def test_haproxy_native_dicom_check_of_a_tls_member(tmp_path, storescp_tls, certs):
    """The check backend speaks TLS with the member's client certificate, as the traffic
    does: HAProxy marks storescp +tls up, and a plain echoscu reaches it through HAProxy."""
    sock, port = tmp_path / "admin.sock", reserved_port()
    cert, key = tmp_path / "gw.crt", tmp_path / "gw.key"
    cert.write_bytes(Path(certs.client[0]).read_bytes())
    key.write_bytes(Path(certs.client[1]).read_bytes())
    config = tmp_path / "site.toml"
    config.write_text(f"""
[[vip]]
name = "pacs"
protocol = "dicom"
listen = "127.0.0.1:{port}"
health = {{ check = "dicom-echo", interval = "300ms", timeout = "1s", rise = 1, fall = 2 }}
[[vip.member]]
name = "tlspacs"
address = "127.0.0.1:{storescp_tls}"
ae_title = "TLSPACS"
tls = {{ ca = "{certs.ca}", cert = "{cert}", key = "{key}" }}
""")
    cfg = tmp_path / "haproxy.cfg"
    # HAProxy matches DNS names only: by its IP address the member could never be verified.
    refused = gateway("export", "haproxy", "-c", str(config), "--checks", "native")
    assert refused.returncode != 0 and "server_name" in refused.stderr, refused.stderr
    config.write_text(config.read_text().replace('key = "', 'server_name = "localhost", key = "'))
    exported = gateway("export", "haproxy", "-c", str(config), "--checks", "native",
                       "--stats-socket", str(sock), "-o", str(cfg))
    assert exported.returncode == 0, exported.stderr
    check_server = next(line for line in cfg.read_text().splitlines()
                        if line.strip().startswith("server tlspacs") and "track" not in line)
    assert f"crt {combined_pem(str(cert))}" in check_server and "check-ssl" in check_server
    Path(combined_pem(str(cert))).write_bytes(cert.read_bytes() + key.read_bytes())
    haproxy = HAProxy(cfg, tmp_path, port)
    try:
        wait_status(sock, "pacs_check_tlspacs", "tlspacs", "UP")
        wait_status(sock, "pacs", "tlspacs", "UP")
        echo = subprocess.run([dcmtk("echoscu"), "-aec", "TLSPACS", "127.0.0.1", str(port)],
                              env=DCMTK_ENV, capture_output=True, text=True, timeout=30)
        assert echo.returncode == 0 and "E:" not in echo.stderr, echo.stderr
    finally:
        haproxy.stop()


def test_members_with_different_ae_titles_export_only_as_a_chain_that_keeps_failover(tmp_path,
                                                                                   pacs):
    """HAProxy cannot rewrite the called AE: a plain export is refused; the chain layout (real
    HAProxy in front of medgate, which rewrites it) stores before and after a failover to a
    PACS that accepts only its own called AE title."""
    pacs1 = pacs("PACS1", require_called_aet=True)
    pacs2 = pacs("PACS2", require_called_aet=True)
    # One port, two addresses (the chain's layout): HAProxy on 127.0.0.1, medgate on ::1
    vip_port, admin_port = reserved_port(), reserved_port()
    config = tmp_path / "site.toml"
    config.write_text(f"""
[gateway]
admin = "[::1]:{admin_port}"
audit = ""
[[vip]]
name = "archive"
protocol = "dicom"
listen = "[::1]:{vip_port}"
mode = "failover"
ae_titles = ["ARCHIVE"]
health = {{ check = "dicom-echo", interval = "300ms", timeout = "1s", rise = 1, fall = 1 }}
[[vip.member]]
name = "pacs1"
address = "127.0.0.1:{pacs1.port}"
ae_title = "PACS1"
[[vip.member]]
name = "pacs2"
address = "127.0.0.1:{pacs2.port}"
ae_title = "PACS2"
""")
    for engine in ("haproxy", "keepalived"):
        refused = gateway("export", engine, "-c", str(config))
        assert refused.returncode == 3 and len(refused.stderr.splitlines()) == 1
        assert ("members expect different called AE titles (pacs1 PACS1, pacs2 PACS2)"
                in refused.stderr and "--chain" in refused.stderr), refused.stderr
    kept = gateway("export", "keepalived", "-c", str(config), "--chain", "::1")
    assert kept.returncode == 0 and f"real_server ::1 {vip_port}" in kept.stdout
    assert f"http://[::1]:{admin_port}/readyz" in kept.stdout
    (tmp_path / "keepalived.conf").write_text(kept.stdout)
    checked = subprocess.run(["keepalived", "-t", "-f", str(tmp_path / "keepalived.conf")],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    sock, cfg = tmp_path / "admin.sock", tmp_path / "haproxy.cfg"
    exported = gateway("export", "haproxy", "-c", str(config), "--chain", "::1", "--bind",
                       "127.0.0.1", "--stats-socket", str(sock), "-o", str(cfg))
    assert exported.returncode == 0, exported.stderr
    # HAProxy on 127.0.0.1:{vip_port}, medgate on [::1]:{vip_port}: one port, two addresses
    medgate = subprocess.Popen([*GATEWAY, "run", "-c", str(config)], stdout=subprocess.DEVNULL,
                               stderr=open(tmp_path / "gateway.log", "wb"),
                               start_new_session=True)
    try:
        haproxy = HAProxy(cfg, tmp_path, vip_port)
    except BaseException:
        stop_process(medgate)
        raise
    instances = write_instances(tmp_path / "images", 2)
    try:
        wait_status(sock, "archive", "medgate1", "UP", timeout=30)  # its /readyz said 200

        def store() -> None:
            result = subprocess.run([dcmtk("storescu"), "-aec", "ARCHIVE", "-aet", "CT01",
                                     "127.0.0.1", str(vip_port), *map(str, instances)],
                                    env=DCMTK_ENV, capture_output=True, text=True, timeout=60)
            assert result.returncode == 0 and "E:" not in result.stderr, result.stderr

        store()
        assert pacs1.stored_count() == 2 and pacs2.stored_count() == 0
        pacs1.stop()  # failover: medgate now sends to pacs2, called AE PACS2
        wait_until(lambda: "pacs1 health up -> down" in (tmp_path / "gateway.log").read_text(),
                   timeout=20, what="pacs1 down")
        store()
        assert pacs2.stored_count() == 2
    finally:
        haproxy.stop()
        stop_process(medgate)


def test_haproxy_native_hl7_check(tmp_path, hl7_receiver):
    good, bad = hl7_receiver("RIS1"), hl7_receiver("RIS2", mode="AR")
    sock = tmp_path / "admin.sock"
    config = tmp_path / "hl7.toml"
    port = reserved_port()
    config.write_text(f"""
[[vip]]
name = "hl7"
protocol = "hl7"
listen = "127.0.0.1:{port}"
health = {{ check = "hl7-ack", interval = "300ms", rise = 1, fall = 1 }}
[[vip.member]]
name = "ris1"
address = "127.0.0.1:{good.port}"
[[vip.member]]
name = "ris2"
address = "127.0.0.1:{bad.port}"
""")
    cfg = tmp_path / "haproxy.cfg"
    assert gateway("export", "haproxy", "-c", str(config), "--checks", "native",
                   "--stats-socket", str(sock), "-o", str(cfg)).returncode == 0
    haproxy = HAProxy(cfg, tmp_path, port)
    try:
        wait_status(sock, "hl7", "ris1", "UP")
        wait_status(sock, "hl7", "ris2", "DOWN")
        bad.mode = "AA"
        wait_status(sock, "hl7", "ris2", "UP")
    finally:
        haproxy.stop()


# -- keepalived

def test_keepalived_export_passes_its_config_test_and_checks_run_by_hand(tmp_path, storescp):
    if not Path("/usr/sbin/keepalived").exists():
        pytest.fail("keepalived is not installed: apt-get install keepalived (.ci/run does this)")
    dead = closed_port()
    config = dicom_vip_config(tmp_path / "site.toml", refused_port(),  # exported, not bound
                              [("live", storescp, "PACS"), ("dead", dead, "PACS")])
    conf = tmp_path / "keepalived.conf"
    result = gateway("export", "keepalived", "-c", str(config), "-o", str(conf),
                     "--gateway-command", f"{sys.executable} -m gateway")
    assert result.returncode == 0, result.stderr
    test = subprocess.run(["keepalived", "-t", "-f", str(conf)], capture_output=True, text=True)
    assert test.returncode == 0, test.stderr
    scripts = [line.split('"')[1] for line in conf.read_text().splitlines() if "misc_path" in line]
    assert len(scripts) == 2
    codes = [subprocess.run(shlex.split(script), capture_output=True, timeout=30).returncode
             for script in scripts]
    assert codes[0] == 0 and codes[1] != 0  # the live member up, the dead one down
    assert "misc_dynamic" not in conf.read_text()  # 2 and 3 would read as "up" there


def test_export_errors_are_clear(tmp_path):
    config = tmp_path / "wild.toml"
    config.write_text('[[vip]]\nname = "v"\nprotocol = "tcp"\nlisten = "0.0.0.0:443"\n'
                      '[[vip.member]]\nname = "m"\naddress = "viewer.local:443"\n')
    result = gateway("export", "keepalived", "-c", str(config))
    assert result.returncode == 3 and "--vip-address" in result.stderr
    result = gateway("export", "keepalived", "-c", str(config), "--vip-address", "10.0.0.9")
    assert result.returncode == 3 and "needs an IP address" in result.stderr


async def test_agent_replies_by_agent_send_and_by_port(nursery):
    import trio

    from gateway.balancer import AdminState, Balancer
    from gateway.config import Address, parse_config
    from gateway.service.server import build_pool
    from health.agent import Agent

    config = parse_config("""
[[vip]]
name = "pacs"
protocol = "dicom"
listen = "127.0.0.1:0"
[[vip.member]]
name = "pacs1"
address = "127.0.0.1:1"
weight = 200
[[vip.member]]
name = "pacs2"
address = "127.0.0.1:2"
""")
    balancer = Balancer([build_pool(vip) for vip in config.vips])
    pool = balancer.pool("pacs")
    agent = Agent(balancer, config.vips)
    assert agent.reply("pacs", "pacs1") == "100% ready\n"  # not checked yet: no health word
    pool.record_check("pacs1", True, "C-ECHO status 0x0000 (success)", 0.001, 0.0)
    pool.record_check("pacs2", False, "association rejected (rejected-permanent, #7)", 0.001, 0.0)
    base, port1, port2 = await nursery.start(agent.serve, Address("127.0.0.1", 0))

    async def ask(port: int, said: bytes = b"") -> str:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        if said:
            await stream.send_all(said)
        answer = b""
        while data := await stream.receive_some(1024):
            answer += data
        return answer.decode()

    assert await ask(base.port, b"pacs/pacs1\n") == "100% ready up\n"
    assert await ask(port2.port) == "100% ready down #association rejected (rejected-permanent,  7)\n"
    pool.set_admin_state("pacs1", AdminState.DRAIN)
    pool.set_weight("pacs1", 100)
    assert await ask(port1.port) == "50% drain up\n"
    balancer.set_admin_state("pacs", "pacs1", AdminState.MAINT)
    assert await ask(base.port, b"pacs/pacs1\n") == "50% maint up\n"
    assert (await ask(base.port)).startswith("down #medgate agent: name the member")
    assert (await ask(base.port, b"pacs/nope\n")).startswith("down #medgate agent: no member")


def test_an_xds_vip_of_registries_and_repositories_is_exported_only_as_a_chain(tmp_path):
    """HAProxy and LVS cannot route by SOAP action: an ITI-41 would reach a registry."""
    for engine in ("haproxy", "keepalived"):
        refused = gateway("export", engine, "-c",
                          str(Path(__file__).parent.parent / "examples" / "xds.toml"))
        assert refused.returncode == 3
        assert "members serve different roles (registry, repository)" in refused.stderr
        assert "--chain" in refused.stderr
