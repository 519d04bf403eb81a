"""Transparent mode between network namespaces: a client host, the gateway routing between a
client-side and a member-side network, a member host whose default route is the gateway
(every address here is inside namespaces this test makes and deletes)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.dicom_peers import DCMTK_ENV, dcmtk, write_instances
from tests.helpers import stop_process, wait_until

CLIENT, GATEWAY_CLIENT_SIDE, GATEWAY_MEMBER_SIDE, MEMBER = (
    "10.97.1.2", "10.97.1.1", "10.97.2.1", "10.97.2.2")
_numbers = itertools.count(1)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Hosts:
    """Three namespaces joined by two veth pairs; the gateway's policy rule for the way back
    (`ip rule add iif <member side> lookup 100`, `ip route add local <clients> ... table 100`)."""

    def __init__(self) -> None:
        tag = f"{os.getpid() % 100000}{next(_numbers)}"
        self.client, self.gateway, self.member = (f"mgc{tag}", f"mgg{tag}", f"mgm{tag}")
        self.member_side = f"g1{tag}"
        self.processes: list[subprocess.Popen] = []
        try:
            ip("netns", "add", self.client)
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"network namespaces cannot be created here (root needed): "
                        f"{exc.stderr.decode().strip()}")
        ip("netns", "add", self.gateway)
        ip("netns", "add", self.member)
        ip("link", "add", f"c0{tag}", "type", "veth", "peer", "name", f"g0{tag}")
        ip("link", "add", f"m0{tag}", "type", "veth", "peer", "name", self.member_side)
        for device, space in ((f"c0{tag}", self.client), (f"g0{tag}", self.gateway),
                              (self.member_side, self.gateway), (f"m0{tag}", self.member)):
            ip("link", "set", device, "netns", space)
        for space, device, address in ((self.client, f"c0{tag}", f"{CLIENT}/24"),
                                       (self.gateway, f"g0{tag}", f"{GATEWAY_CLIENT_SIDE}/24"),
                                       (self.gateway, self.member_side,
                                        f"{GATEWAY_MEMBER_SIDE}/24"),
                                       (self.member, f"m0{tag}", f"{MEMBER}/24")):
            ip("-n", space, "addr", "add", address, "dev", device)
            ip("-n", space, "link", "set", device, "up")
            ip("-n", space, "link", "set", "lo", "up")
        ip("-n", self.client, "route", "add", "default", "via", GATEWAY_CLIENT_SIDE)
        ip("-n", self.member, "route", "add", "default", "via", GATEWAY_MEMBER_SIDE)
        subprocess.run(["ip", "netns", "exec", self.gateway, "sysctl", "-qw",
                        "net.ipv4.ip_forward=1"], check=True, timeout=30)
        ip("-n", self.gateway, "route", "add", "local", "10.97.1.0/24", "dev", "lo", "table",
           "100")
        self.add_way_back()

    def add_way_back(self) -> None:
        ip("-n", self.gateway, "rule", "add", "iif", self.member_side, "lookup", "100",
           "pref", "100")

    def remove_way_back(self) -> None:
        ip("-n", self.gateway, "rule", "del", "pref", "100")

    def run(self, space: str, *args: str, timeout: float = 120,
            **options) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", space, *args], capture_output=True,
                              text=True, timeout=timeout, **options)

    def start(self, space: str, log: Path, *args: str) -> subprocess.Popen:
        process = subprocess.Popen(["ip", "netns", "exec", space, *args],
                                   stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                   start_new_session=True)
        self.processes.append(process)
        return process

    def close(self) -> None:
        for process in self.processes:
            stop_process(process)
        for space in (self.client, self.gateway, self.member):
            subprocess.run(["ip", "netns", "del", space], capture_output=True, timeout=30)


@pytest.fixture
def hosts():
    made = Hosts()
    yield made
    made.close()


CONFIG = f"""
[gateway]
admin = ""
audit = ""
[[vip]]
name = "archive"
protocol = "dicom"
listen = "{GATEWAY_CLIENT_SIDE}:11112"
transparent = true
health = {{ check = "dicom-echo", interval = "1s" }}
[[vip.member]]
name = "pacs"
address = "{MEMBER}:11112"
ae_title = "PACS"
[[vip]]
name = "archive-plain"
protocol = "dicom"
listen = "{GATEWAY_CLIENT_SIDE}:11113"
health = {{ check = "dicom-echo", interval = "1s" }}
[[vip.member]]
name = "pacs"
address = "{MEMBER}:11112"
ae_title = "PACS"
[[vip]]
name = "hl7"
protocol = "hl7"
listen = "{GATEWAY_CLIENT_SIDE}:2575"
transparent = true
health = {{ check = "tcp", interval = "1s" }}
[[vip.member]]
name = "ris1"
address = "{MEMBER}:2575"
[[vip.member]]
name = "ris2"
address = "{MEMBER}:2576"
"""


@pytest.mark.slow
def test_members_see_the_clients_own_address_and_what_is_missing_is_named(hosts, tmp_path):
    config = tmp_path / "site.toml"
    config.write_text(CONFIG)
    gateway = [sys.executable, "-m", "gateway"]
    scp_log = tmp_path / "storescp.log"
    (tmp_path / "pacs").mkdir()
    hosts.start(hosts.member, scp_log, dcmtk("storescp"), "-d", "-dhl", "-aet", "PACS", "-od",
                str(tmp_path / "pacs"), "11112")
    records = [tmp_path / f"ris{n}.record" for n in (1, 2)]
    for n, record in enumerate(records, 1):
        hosts.start(hosts.member, tmp_path / f"ris{n}.log", *gateway, "simulate",
                    "hl7-receiver", "--listen", f"{MEMBER}:{2574 + n}", "--name", f"RIS{n}",
                    "--record", str(record), "--no-parse")
    checked = hosts.run(hosts.gateway, *gateway, "check", "-c", str(config))
    assert "transparent" not in checked.stdout, checked.stdout  # nothing missing
    log = tmp_path / "gateway.log"
    hosts.start(hosts.gateway, log, *gateway, "run", "-c", str(config))
    wait_until(lambda: log.read_text().count("listening on") == 3, timeout=30,
               what="the gateway listening")
    assert "vip=archive transparent: members see each client's own address" in log.read_text()

    image = list(write_instances(tmp_path / "images", 1))[0]
    for port in (11112, 11113):  # transparent, then not
        stored = hosts.run(hosts.client, dcmtk("storescu"), "-aet", "CT01", "-aec", "ARCHIVE",
                           GATEWAY_CLIENT_SIDE, str(port), str(image), env=DCMTK_ENV)
        assert stored.returncode == 0, stored.stderr
    associations, peer = [], ""  # (address, calling AE) as storescp's debug log has them
    for line in scp_log.read_text().splitlines():
        if line.startswith("D: Association Received: "):
            peer = line.rsplit(" ", 1)[-1]
        elif line.startswith("D: Calling Application Name:") and peer:
            associations.append((peer, line.rsplit(" ", 1)[-1]))
            peer = ""  # the RQ's; the AC's dump repeats it
    stores = [address for address, calling in associations if calling == "CT01"]
    # through the transparent VIP from the modality's address, through the plain one from the
    # gateway's; the gateway's own checks always from its own
    assert stores == [CLIENT, GATEWAY_MEMBER_SIDE], associations
    assert {address for address, calling in associations if calling == "MEDGATE"} == {
        GATEWAY_MEMBER_SIDE}

    sent = hosts.run(hosts.client, *gateway, "simulate", "hl7-sender",
                     f"{GATEWAY_CLIENT_SIDE}:2575", "--count", "6")
    assert sent.returncode == 0, sent.stdout + sent.stderr
    lines = [line.split() for record in records for line in record.read_text().splitlines()
             if not line.startswith("MEDGATE")]
    assert sorted(control_id for control_id, _ in lines) == [f"SIM{n:06d}" for n in range(1, 7)]
    assert {peer.rsplit(":", 1)[0] for _, peer in lines} == {CLIENT}  # the sender's address
    assert all(record.read_text().strip() for record in records)  # balanced per message
    # ... and port: a sender on a port of its choosing
    one = (f"import socket; s = socket.socket(); s.bind(('{CLIENT}', 40001)); "
           f"s.connect(('{GATEWAY_CLIENT_SIDE}', 2575)); "
           "s.sendall(b'\\x0bMSH|^~\\\\&|HIS|HOSP|RIS|HOSP|2026||ADT^A01|PORT1|P|2.5\\r"
           "PID|1||P1\\r\\x1c\\r'); print(s.recv(4096))")
    answered = hosts.run(hosts.client, sys.executable, "-c", one)
    assert b"MSA|AA|PORT1".decode() in answered.stdout, answered.stdout + answered.stderr
    assert f"PORT1 {CLIENT}:40001" in "".join(r.read_text() for r in records)
    for process in hosts.processes[3:]:
        stop_process(process)

    hosts.remove_way_back()
    checked = hosts.run(hosts.gateway, *gateway, "check", "-c", str(config))
    assert checked.returncode != 0
    assert (f"vip archive: transparent: replies from member pacs ({MEMBER}, reached via "
            f"{hosts.member_side}) to client addresses would not come back to the gateway: add "
            f"`ip rule add iif {hosts.member_side} lookup 100`") in " ".join(checked.stdout.split())
    refused = hosts.run(hosts.gateway, *gateway, "run", "-c", str(config))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "cannot start: vip 'archive': transparent: replies from member pacs" in refused.stderr
    hosts.add_way_back()
    # (Linux lets either CAP_NET_ADMIN or CAP_NET_RAW set IP_TRANSPARENT)
    without = hosts.run(hosts.gateway, "capsh", "--drop=cap_net_admin,cap_net_raw", "--",
                        "-c", f"{sys.executable} -m gateway run -c {config}", timeout=60)
    assert without.returncode == 1, without.stderr
    assert "transparent: needs CAP_NET_ADMIN" in without.stderr
