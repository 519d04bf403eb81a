"""Towards an active/standby pair: a gateway listens on a floating address before it arrives
(IP_FREEBIND) and takes clients once it does; the keepalived VRRP export for one node passes
keepalived's own config test and its track script asks /readyz. Two network namespaces (the
node, a client), made and deleted here."""

from __future__ import annotations

import contextlib
import itertools
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import Address
from tests.helpers import eventually, reserved_port, stop_process, wait_until

NODE, CLIENT, FLOATING = "10.98.0.1", "10.98.0.3", "10.98.0.100"
NODE6, CLIENT6, FLOATING6 = "fd00:98::1", "fd00:98::3", "fd00:98::100"
GATEWAY = [sys.executable, "-m", "gateway"]
_numbers = itertools.count(1)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def pair_net():
    tag = f"{os.getpid() % 100000}{next(_numbers)}"
    node, client, device = f"mgn{tag}", f"mgk{tag}", f"n0{tag}"
    try:
        ip("netns", "add", node)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"network namespaces cannot be created here (root needed): "
                    f"{exc.stderr.decode().strip()}")
    ip("netns", "add", client)
    ip("link", "add", device, "type", "veth", "peer", "name", f"k0{tag}")
    ip("link", "set", device, "netns", node)
    ip("link", "set", f"k0{tag}", "netns", client)
    for space, dev, address in ((node, device, NODE), (client, f"k0{tag}", CLIENT)):
        ip("-n", space, "addr", "add", f"{address}/24", "dev", dev)
        ip("-n", space, "link", "set", dev, "up")
        ip("-n", space, "link", "set", "lo", "up")
    yield node, client, device
    for space in (node, client):
        subprocess.run(["ip", "netns", "del", space], capture_output=True, timeout=30)


def in_ns(space: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", space, *args], capture_output=True,
                          text=True, timeout=timeout)


@contextlib.contextmanager
def standby(node: str, tmp_path: Path, floating: str):
    """A gateway in `node` with an HL7 VIP on `floating` (not on the node yet) and a receiver
    behind it; yields its config once it listens (with IP_FREEBIND, as its log says)."""
    config = tmp_path / "node.toml"
    config.write_text(f'[gateway]\nadmin = "127.0.0.1:{reserved_port()}"\naudit = ""\n'
                      f'[[vip]]\nname = "hl7"\nprotocol = "hl7"\n'
                      f'listen = "{Address(floating, 2575)}"\n'
                      'health = { check = "hl7-ack", interval = "1s" }\n'
                      '[[vip.member]]\nname = "ris1"\naddress = "127.0.0.1:2576"\n')
    processes = []
    try:
        processes.append(subprocess.Popen(
            ["ip", "netns", "exec", node, *GATEWAY, "simulate", "hl7-receiver", "--listen",
             "127.0.0.1:2576", "--no-parse"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True))
        log = tmp_path / "gateway.log"
        processes.append(subprocess.Popen(["ip", "netns", "exec", node, *GATEWAY, "run", "-c",
                                           str(config)], stderr=open(log, "wb"),
                                          start_new_session=True))
        wait_until(lambda: "listening on" in log.read_text(), timeout=30, what="listening")
        assert (f"vip 'hl7': {floating} is not on this host (yet): listening with IP_FREEBIND"
                in log.read_text())
        yield config
    finally:
        for process in processes:
            stop_process(process)


def send_three(client: str, floating: str) -> subprocess.CompletedProcess:
    return in_ns(client, *GATEWAY, "simulate", "hl7-sender", str(Address(floating, 2575)),
                 "--count", "3", "--timeout", "3")


def accepted(sent: subprocess.CompletedProcess) -> bool:
    return sent.returncode == 0 and sent.stdout.strip().endswith("3 of 3 accepted")


@pytest.mark.slow
def test_a_standby_listens_before_the_floating_address_and_serves_once_it_arrives(pair_net,
                                                                                  tmp_path):
    node, client, device = pair_net
    with standby(node, tmp_path, FLOATING) as config:
        assert send_three(client, FLOATING).returncode != 0  # nobody holds the address yet
        ip("-n", node, "addr", "add", f"{FLOATING}/24", "dev", device)  # as VRRP would
        sent = send_three(client, FLOATING)
        assert accepted(sent), sent.stdout + sent.stderr

        exported = in_ns(node, *GATEWAY, "export", "keepalived", "-c", str(config), "--vrrp",
                         "--virtual-router-id", "61", "--interface", device, "--unicast-src",
                         NODE, "--unicast-peer", "10.98.0.2", "--priority", "150")
        assert exported.returncode == 0, exported.stderr
        conf = tmp_path / "keepalived.conf"
        conf.write_text(exported.stdout)
        checked = in_ns(node, "keepalived", "-t", "-f", str(conf))  # where its link exists
        assert checked.returncode == 0, checked.stderr
        assert f"{FLOATING}/32 dev {device}" in exported.stdout
        probe = next(line for line in exported.stdout.splitlines() if "script \"" in line)
        probe = shlex.split(probe.split('"', 1)[1].rsplit('"', 1)[0])
        assert in_ns(node, *probe, timeout=10).returncode == 0  # ready: the node may hold it
        missing = in_ns(node, *GATEWAY, "export", "keepalived", "-c", str(config), "--vrrp")
        assert missing.returncode == 3
        assert "--vrrp needs --virtual-router-id, --interface" in missing.stderr


@pytest.mark.slow
def test_a_standby_listens_on_a_floating_ipv6_address_before_it_arrives(pair_net, tmp_path):
    # IPV6_FREEBIND is another option than IPv4's (IPPROTO_IPV6, 78): the same story over
    # IPv6, the addresses added without duplicate address detection (usable at once).
    node, client, device = pair_net
    for space, dev, address in ((node, device, NODE6), (client, f"k0{device[2:]}", CLIENT6)):
        ip("-n", space, "addr", "add", f"{address}/64", "dev", dev, "nodad")
    with standby(node, tmp_path, FLOATING6):
        assert send_three(client, FLOATING6).returncode != 0
        ip("-n", node, "addr", "add", f"{FLOATING6}/64", "dev", device, "nodad")
        sent = send_three(client, FLOATING6)
        assert accepted(sent), sent.stdout + sent.stderr


def pair_key(folder: Path) -> Path:
    """The hash key file both nodes of a pair share (as a site deploys one to both)."""
    path = folder / "pair-hash.key"
    if not path.exists():
        path.write_text("0123456789abcdef" * 4 + "\n")
    return path


def pair_toml(admin_port: int, peer_ports: list[int], backends: list, key_file: Path) -> str:
    peers = ", ".join(f'"127.0.0.1:{port}"' for port in peer_ports)
    text = (f'[gateway]\nadmin = "127.0.0.1:{admin_port}"\nadmin_token = "pair-token"\n'
            f'audit = ""\npeers = [{peers}]\nhash_key_file = "{key_file}"\n'
            '[[vip]]\nname = "web"\nprotocol = "tcp"\nlisten = "127.0.0.1:0"\n'
            'health = { check = "tcp", interval = "200ms", rise = 1 }\n')
    for backend in backends:
        text += (f'[[vip.member]]\nname = "{backend.name}"\n'
                 f'address = "127.0.0.1:{backend.port}"\n')
    return text


async def test_admin_state_is_shared_by_the_pair_and_taken_by_a_node_that_starts(nursery,
                                                                                 tmp_path):
    import json
    import urllib.request

    import trio

    from gateway.balancer import AdminState
    from tests.helpers import start_backends, start_gateway

    backends = await start_backends(nursery, "a", "b")
    port_a, port_b = reserved_port(), reserved_port()
    key = pair_key(tmp_path)
    node_a = await start_gateway(nursery, pair_toml(port_a, [port_b], backends, key), admin=True)

    async def change(port: int, member: str, body: dict) -> dict:
        def post():
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/api/vips/web/members/{member}",
                data=json.dumps(body).encode(), method="POST",
                headers={"Content-Type": "application/json",
                         "Authorization": "Bearer pair-token"})
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.load(response)
        return await trio.to_thread.run_sync(post)

    async def becomes(node, member: str, state: AdminState) -> None:
        await eventually(lambda: node.balancer.pool("web").member(member).admin is state, 5)

    # B is down: A keeps the change for it and says so
    await change(port_a, "a", {"state": "drain"})
    await eventually(lambda: node_a.peers.links[0].ok is False, 10)
    # B starts: it takes A's state before it reports ready
    node_b = await start_gateway(nursery, pair_toml(port_b, [port_a], backends, key), admin=True)
    assert node_b.balancer.pool("web").member("a").admin is AdminState.DRAIN
    # a change on either node reaches the other (last writer wins)
    await change(port_b, "b", {"state": "maint"})
    await becomes(node_a, "b", AdminState.MAINT)
    await change(port_a, "a", {"state": "ready"})
    await becomes(node_b, "a", AdminState.READY)
    await change(port_b, "a", {"weight": 40})
    await eventually(lambda: node_a.balancer.pool("web").member("a").weight == 40, 5)
    # an older change from a peer does not undo a later one here
    stale = {"state": "maint", "stamp": node_a.balancer.pool("web").member("a").admin_changed_at
             - 60}
    assert not node_a.peers.apply("web", "a", stale)
    assert node_a.balancer.pool("web").member("a").admin is AdminState.READY
    await eventually(lambda: node_a.peers.links[0].ok is True, 10)  # A's push reached B
    status = json.loads((await trio.to_thread.run_sync(lambda: urllib.request.urlopen(
        f"http://127.0.0.1:{port_a}/api/status", timeout=10).read())))
    assert status["peers"] == [{"address": f"127.0.0.1:{port_b}", "ok": True,
                                "detail": status["peers"][0]["detail"], "drift": [],
                                "disagree": [], "in_sync": True}]
    page = await trio.to_thread.run_sync(lambda: urllib.request.urlopen(
        f"http://127.0.0.1:{port_a}/", timeout=10).read())
    assert f"127.0.0.1:{port_b}: in sync".encode() in page
    # config drift: the same config here compares clean; one member changed is named
    same = tmp_path / "a.toml"
    same.write_text(pair_toml(port_a, [port_b], backends, key))
    changed = tmp_path / "changed.toml"
    changed.write_text(pair_toml(port_a, [port_b], backends, key).replace(
        f'address = "127.0.0.1:{backends[1].port}"\n',
        f'address = "127.0.0.1:{backends[1].port}"\nweight = 50\n'))
    check = [sys.executable, "-m", "gateway", "check", "--peer", "-c"]
    clean = await trio.run_process([*check, str(same)], capture_stdout=True, check=False)
    assert clean.returncode == 0 and b"peer " not in clean.stdout, clean.stdout
    drifted = await trio.run_process([*check, str(changed)], capture_stdout=True, check=False,
                                     env={**os.environ, "COLUMNS": "200"})
    assert drifted.returncode == 1
    assert f"peer 127.0.0.1:{port_b}: member web/b differs".encode() in drifted.stdout


SENDER = r'''
import json, socket, sys, time
vip, count, progress = sys.argv[1], int(sys.argv[2]), sys.argv[3]
acked, failures, gaps, sock, down_since = [], 0, [], None, None
for n in range(1, count + 1):
    message = (f"MSH|^~\\&|HIS|HOSP|RIS|HOSP|2026||ADT^A01|FO{n:06d}|P|2.5\r"
               f"PID|1||P{n}\r").encode()
    while True:  # a real sender: no ACK, reconnect and send the same message again
        try:
            if sock is None:
                sock = socket.create_connection((vip, 2575), timeout=1)
            sock.settimeout(2)
            sock.sendall(b"\x0b" + message + b"\x1c\r")
            answer = b""
            while not answer.endswith(b"\x1c\r"):
                data = sock.recv(4096)
                if not data:
                    raise OSError("closed")
                answer += data
            if f"MSA|AA|FO{n:06d}".encode() not in answer:
                raise OSError("not AA")
            break
        except OSError:
            failures += 1
            down_since = down_since or time.monotonic()
            if sock is not None:
                sock.close()
            sock = None
            time.sleep(0.1)
    if down_since is not None:
        gaps.append(time.monotonic() - down_since)
        down_since = None
    acked.append(f"FO{n:06d}")
    with open(progress, "w") as out:
        out.write(str(len(acked)))
    time.sleep(0.02)  # a steady feed, as an engine sends: it spans the failover
print(json.dumps({"acked": acked, "failures": failures, "gaps": gaps}))
'''


STORER = r'''
import json, subprocess, sys, time
storescu, vip, progress, files = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
stored, failures = [], 0
for path in files:
    while subprocess.run([storescu, "-aet", "CT01", "-aec", "ARCHIVE", "-to", "3", "-ta", "3",
                          "-td", "3", vip, "11112", path], capture_output=True).returncode:
        failures += 1  # not stored: the modality keeps it and sends it again
        time.sleep(0.1)
    stored.append(path)
    with open(progress, "w") as out:
        out.write(str(len(stored)))
print(json.dumps({"stored": stored, "failures": failures}))
'''


def node_toml(address: str, peer: str, certs, paths: dict[str, str]) -> str:
    return f"""
[gateway]
admin = "{address}:9090"
admin_token = "pair-token"
admin_tls = {{ cert = "{paths[address][0]}", key = "{paths[address][1]}", ca = "{certs}" }}
peers = ["{peer}:9090"]
hash_key_file = "{pair_key(Path(certs).parent)}"
audit = ""
[[vip]]
name = "hl7"
protocol = "hl7"
listen = "{FLOATING}:2575"
health = {{ check = "tcp", interval = "1s" }}
[[vip.member]]
name = "ris1"
address = "10.98.0.50:2575"
[[vip.member]]
name = "ris2"
address = "10.98.0.50:2576"
[[vip]]
name = "dicom"
protocol = "dicom"
listen = "{FLOATING}:11112"
health = {{ check = "dicom-echo", interval = "1s" }}
[[vip.member]]
name = "pacs"
address = "10.98.0.50:11112"
ae_title = "PACS"
"""


@pytest.mark.slow
def test_kill_9_on_the_active_node_moves_the_address_and_loses_nothing(tmp_path):
    """Two nodes (keepalived from our export, admin state shared over HTTPS), a member host
    and a client host on one bridge: the active gateway is killed during HL7 and DICOM
    traffic; then it comes back, with what was changed meanwhile."""
    import json
    import signal
    import time

    import trustme

    from tests.helpers.dicom_peers import dcmtk, write_instances

    tag = f"{os.getpid() % 10000}{next(_numbers)}"
    bridge = f"mgb{tag}"
    spaces = {"a": ("10.98.0.1", f"mga{tag}"), "b": ("10.98.0.2", f"mgz{tag}"),
              "client": ("10.98.0.3", f"mgc{tag}"), "member": ("10.98.0.50", f"mgm{tag}")}
    authority = trustme.CA()
    ca = tmp_path / "ca.crt"
    authority.cert_pem.write_to_path(ca)
    paths = {}
    for key in ("a", "b"):
        leaf = authority.issue_cert(spaces[key][0])
        paths[spaces[key][0]] = (str(tmp_path / f"{key}.crt"), str(tmp_path / f"{key}.key"))
        leaf.cert_chain_pems[0].write_to_path(paths[spaces[key][0]][0])
        leaf.private_key_pem.write_to_path(paths[spaces[key][0]][1])
    processes: list[subprocess.Popen] = []
    ctl = [*GATEWAY, "ctl", "--ca", str(ca), "--token", "pair-token"]
    try:
        try:
            ip("link", "add", bridge, "type", "bridge")
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot make a bridge here (root needed): {exc.stderr.decode().strip()}")
        ip("link", "set", bridge, "up")
        for key, (address, space) in spaces.items():
            ip("netns", "add", space)
            ip("link", "add", f"v{key[0]}0{tag}", "type", "veth", "peer", "name", f"v{key[0]}1{tag}")
            ip("link", "set", f"v{key[0]}0{tag}", "netns", space)
            ip("link", "set", f"v{key[0]}1{tag}", "master", bridge)
            ip("link", "set", f"v{key[0]}1{tag}", "up")
            ip("-n", space, "addr", "add", f"{address}/24", "dev", f"v{key[0]}0{tag}")
            ip("-n", space, "link", "set", f"v{key[0]}0{tag}", "up")
            ip("-n", space, "link", "set", "lo", "up")

        def start(space: str, log: str, *args: str) -> subprocess.Popen:
            process = subprocess.Popen(["ip", "netns", "exec", space, *args],
                                       stdout=subprocess.DEVNULL,
                                       stderr=open(tmp_path / log, "ab"), start_new_session=True)
            processes.append(process)
            return process

        member = spaces["member"][1]
        record = tmp_path / "ris.record"
        for port in (2575, 2576):
            start(member, f"ris{port}.log", *GATEWAY, "simulate", "hl7-receiver", "--listen",
                  f"10.98.0.50:{port}", "--record", str(record), "--no-parse")
        (tmp_path / "pacs").mkdir()
        start(member, "storescp.log", dcmtk("storescp"), "-aet", "PACS", "-od",
              str(tmp_path / "pacs"), "11112")
        nodes, configs = {}, {}
        for key, peer, priority in (("a", "b", "150"), ("b", "a", "100")):
            address, space = spaces[key]
            configs[key] = tmp_path / f"node-{key}.toml"
            configs[key].write_text(node_toml(address, spaces[peer][0], str(ca), paths))
            nodes[key] = start(space, f"gateway-{key}.log", *GATEWAY, "run", "-c",
                               str(configs[key]))
            exported = in_ns(space, *GATEWAY, "export", "keepalived", "-c", str(configs[key]),
                             "--vrrp", "--virtual-router-id", "61", "--interface",
                             f"v{key}0{tag}", "--unicast-src", address, "--unicast-peer",
                             spaces[peer][0], "--priority", priority)
            assert exported.returncode == 0, exported.stderr
            conf = tmp_path / f"keepalived-{key}.conf"
            conf.write_text(exported.stdout)
            start(space, f"keepalived-{key}.log", "keepalived", "-n", "-l", "-D", "-f",
                  str(conf), "-p", str(tmp_path / f"ka-{key}.pid"),
                  "-r", str(tmp_path / f"vrrp-{key}.pid"))

        def holder() -> str:
            for key in ("a", "b"):
                if f"{FLOATING}/" in in_ns(spaces[key][1], "ip", "-o", "addr", "show").stdout:
                    return key
            return ""

        def admin_state(key: str, name: str) -> str:
            shown = in_ns(spaces["client"][1], *ctl, "--admin",
                          f"https://{spaces[key][0]}:9090", "status", timeout=30).stdout
            row = next((line for line in shown.splitlines() if f" {name} " in line), "")
            return "drain" if "DRAIN" in row else "up" if "UP" in row else row

        wait_until(lambda: holder() == "a", timeout=30, what="the address on node a")
        hl7_progress, dicom_progress = tmp_path / "hl7.progress", tmp_path / "dicom.progress"
        client = spaces["client"][1]
        images = sorted(write_instances(tmp_path / "images", 40))
        hl7_sender = subprocess.Popen(["ip", "netns", "exec", client, sys.executable, "-c",
                                       SENDER, FLOATING, "300", str(hl7_progress)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      start_new_session=True)
        storer = subprocess.Popen(["ip", "netns", "exec", client, sys.executable, "-c", STORER,
                                   dcmtk("storescu"), FLOATING, str(dicom_progress), *images],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  start_new_session=True)
        processes += [hl7_sender, storer]

        def count(path: Path) -> int:
            return int(path.read_text() or 0) if path.exists() else 0

        wait_until(lambda: count(hl7_progress) >= 60 and count(dicom_progress) >= 5,
                   timeout=90, what="traffic through node a")
        os.kill(nodes["a"].pid, signal.SIGKILL)  # the active gateway dies during traffic
        killed_at = time.monotonic()
        wait_until(lambda: holder() == "b", timeout=30, what="the address on node b")
        moved = time.monotonic() - killed_at
        out, err = hl7_sender.communicate(timeout=180)
        assert hl7_sender.returncode == 0, err.decode()
        hl7 = json.loads(out)
        out, err = storer.communicate(timeout=300)
        assert storer.returncode == 0, err.decode()
        dicom = json.loads(out)
        received = {line.split()[0] for line in record.read_text().splitlines()}
        lost_hl7 = [control_id for control_id in hl7["acked"] if control_id not in received]
        kept = " ".join(p.name for p in (tmp_path / "pacs").iterdir())
        lost_images = [path for path in dicom["stored"] if Path(path).stem not in kept]
        print(f"\nkill -9 of the active node: the address moved in {moved:.1f} s; HL7: "
              f"{max(hl7['gaps'], default=0):.1f} s without service, {hl7['failures']} tries "
              f"re-sent, {len(hl7['acked'])} of 300 acked, {len(lost_hl7)} lost; DICOM: "
              f"{dicom['failures']} stores re-sent, {len(dicom['stored'])} of 40 stored, "
              f"{len(lost_images)} lost")
        assert len(hl7["acked"]) == 300 and lost_hl7 == []
        assert len(dicom["stored"]) == 40 and lost_images == []

        # While A is down, ris2 is drained on B; A comes back with it drained, and takes the
        # address back (it has the higher priority)
        drained = in_ns(client, *ctl, "--admin", f"https://{spaces['b'][0]}:9090", "drain",
                        "hl7/ris2")
        assert drained.returncode == 0, drained.stderr
        nodes["a"] = start(spaces["a"][1], "gateway-a.log", *GATEWAY, "run", "-c",
                           str(configs["a"]))
        wait_until(lambda: holder() == "a", timeout=30, what="the address back on node a")
        assert admin_state("a", "ris2") == "drain"
        # and a change on A shows on B
        made_ready = in_ns(client, *ctl, "--admin", f"https://{spaces['a'][0]}:9090", "ready",
                           "hl7/ris2")
        assert made_ready.returncode == 0, made_ready.stderr
        wait_until(lambda: admin_state("b", "ris2") == "up", timeout=10, what="ready on b")
    finally:
        for process in processes:
            stop_process(process)
        for _, space in spaces.values():
            subprocess.run(["ip", "netns", "del", space], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)


async def test_table_persistence_entries_reach_the_peer(nursery, tmp_path):
    """A client kept on a member by node A is kept on the same member by node B (after a
    failover it lands there), learned from A's batches."""
    import trio

    from tests.helpers import start_backends, start_gateway

    backends = await start_backends(nursery, "a", "b")
    port_a, port_b = reserved_port(), reserved_port()
    key = pair_key(tmp_path)
    sticky = 'persistence = { key = "source-ip", timeout = "1h", method = "table" }\n'

    def toml(own: int, peer: int) -> str:
        return pair_toml(own, [peer], backends, key).replace(
            'health = { check = "tcp"', sticky + 'health = { check = "tcp"')

    node_a = await start_gateway(nursery, toml(port_a, port_b), admin=True)
    node_b = await start_gateway(nursery, toml(port_b, port_a), admin=True)

    async def kept_alike_on_b(vip: str) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", node_a.bound[vip][0].port)
        await stream.receive_some(100)
        await stream.aclose()
        kept = node_a.balancer.pool(vip).persisted_member("127.0.0.1")
        assert kept in ("a", "b")
        await eventually(
            lambda: node_b.balancer.pool(vip).persisted_member("127.0.0.1") == kept, 10)

    await kept_alike_on_b("web")
    # a VIP a reload adds (its pool made then) shares its entries too
    from gateway.config import parse_config

    for node, own, peer in ((node_a, port_a, port_b), (node_b, port_b, port_a)):
        text = toml(own, peer)
        await node.reload(parse_config(text + text[text.index("[[vip]]"):].replace(
            'name = "web"', 'name = "web2"'), source="node.toml"))
    await kept_alike_on_b("web2")


async def test_a_node_tells_its_peers_what_is_new_and_sleeps_while_nothing_is(autojump_clock,
                                                                             tmp_path):
    """A new entry reaches the peers PERSISTENCE_EVERY after it was made, with what came
    meanwhile; with nothing new the node does not even look (it looked every second, idle
    or not: a pair spent CPU all night for nothing)."""
    from types import SimpleNamespace

    import trio

    from gateway.balancer import Balancer
    from gateway.config import parse_config
    from gateway.service.peers import PERSISTENCE_EVERY, PeerSync
    from gateway.service.server import build_pool

    backends = [SimpleNamespace(name=name, port=port) for name, port in (("a", 9001),
                                                                         ("b", 9002))]
    config = parse_config(pair_toml(9000, [9010], backends, pair_key(tmp_path)).replace(
        'health = { check = "tcp"', 'persistence = { key = "source-ip", timeout = "1h", '
        'method = "table" }\nhealth = { check = "tcp"'), source="node.toml")
    pool = build_pool(config.vips[0], shared=True)
    peers = PeerSync(config.gateway, Balancer([pool]), lambda: {})
    sent, looks = [], []
    new_persistence = pool.new_persistence

    def looked() -> list[tuple[str, str]]:
        looks.append(trio.current_time())
        return new_persistence()

    async def to_every_peer(path: str, document: dict) -> None:
        sent.append((trio.current_time(), path, document))

    pool.new_persistence = looked  # type: ignore[method-assign]
    peers._to_every_peer = to_every_peer  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(peers._share_persistence)
        await trio.sleep(3600)
        assert looks == [] and sent == []  # an idle hour: not one look
        start = trio.current_time()
        pool.adopt_persistence("10.0.0.1", "a", start, tell=True)  # a worker's, or a pick
        await trio.sleep(PERSISTENCE_EVERY / 2)
        pool.adopt_persistence("10.0.0.2", "b", trio.current_time(), tell=True)
        await trio.sleep(3600)
        nursery.cancel_scope.cancel()
    assert looks == [start + PERSISTENCE_EVERY]
    ((at, path, document),) = sent
    assert at == start + PERSISTENCE_EVERY and path == "/api/persistence"
    assert sorted(member for _, _, member in document["entries"]) == ["a", "b"]


def test_a_batch_to_the_peers_fits_their_admin_servers_body_limit_whatever_the_names():
    """500 entries of a VIP and members with long names were one batch of 75 KB: the peer's
    admin server (64 KiB bodies) refused it, and those entries were never shared."""
    import json

    from gateway.service.admin import MAX_BODY
    from gateway.service.peers import PERSISTENCE_BATCH, _batches

    entries = [("radiology-pacs-main-site-" + "x" * 30, f"hmac:{n:032x}",
                "pacs-node-a.radiology.hospital.example.org") for n in range(1200)]
    batches = _batches("entries", entries)
    assert [entry for batch in batches for entry in batch["entries"]] == entries
    assert all(len(json.dumps(batch).encode()) <= MAX_BODY for batch in batches)
    short = _batches("deliveries", [("ris", f"{n:016x}", "ris1") for n in range(1200)])
    assert [len(batch["deliveries"]) for batch in short] == [PERSISTENCE_BATCH] * 2 + [200]


async def test_resend_memory_and_the_active_failover_member_reach_the_peer(nursery,
                                                                            hl7_receiver,
                                                                            tmp_path):
    """After a failover to node B, a resent HL7 message still goes to the member that took it
    through node A, and B keeps A's active failover member (it does not fail back early)."""
    import trio

    from gateway.vips.hl7 import _unit
    from protocols.mllp import peek_header
    from tests.helpers import ask_who, start_backends, start_gateway
    from tests.helpers.hl7_senders import send_until_acked
    from gateway.testing.simulators.hl7_messages import make_messages

    backends = await start_backends(nursery, "a", "b")
    receivers = [hl7_receiver("RIS1"), hl7_receiver("RIS2")]
    port_a, port_b = reserved_port(), reserved_port()
    key = pair_key(tmp_path)
    hl7_vip = ('[[vip]]\nname = "hl7"\nprotocol = "hl7"\nlisten = "127.0.0.1:0"\n'
               'health = { check = "tcp", interval = "200ms", rise = 1 }\n' + "".join(
                   f'[[vip.member]]\nname = "ris{n}"\naddress = "127.0.0.1:{r.port}"\n'
                   for n, r in enumerate(receivers, 1)))

    def toml(own: int, peer: int) -> str:
        return pair_toml(own, [peer], backends, key).replace(
            'protocol = "tcp"\n', 'protocol = "tcp"\nmode = "failover"\n') + hl7_vip

    node_a = await start_gateway(nursery, toml(port_a, port_b), admin=True)
    node_b = await start_gateway(nursery, toml(port_b, port_a), admin=True)
    (message,) = make_messages(1, prefix="PAIR")
    sent = await send_until_acked(node_a.bound["hl7"][0].port, [message])
    assert sent.acked == ["PAIR000001"]
    unit = _unit(peek_header(message))
    took = node_a.balancer.pool("hl7").resend_member(unit, trio.current_time())
    assert took in ("ris1", "ris2")
    assert await ask_who(node_a.bound["web"][0].port) == "a"
    backends[0].stop()
    await wait_health(node_a, "a")
    assert await ask_who(node_a.bound["web"][0].port) == "b"  # the standby takes over on A
    await eventually(lambda: node_b.balancer.pool("hl7").resend_member(
        unit, trio.current_time()) == took and node_b.balancer.pool("web").active == "b", 10)


async def wait_health(node, member: str) -> None:
    from gateway.balancer import Health
    from tests.helpers import wait_for_health

    await wait_for_health(node.balancer.pool("web"), member, Health.DOWN)
