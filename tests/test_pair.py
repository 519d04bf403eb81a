"""Towards an active/standby pair: a gateway listens on a floating address before it arrives
(IP_FREEBIND) and takes clients once it does; the keepalived VRRP export for one node passes
keepalived's own config test and its track script asks /readyz. Two network namespaces (the
node, a client), made and deleted here."""

from __future__ import annotations

import itertools
import os
import shlex
import subprocess
import sys

import pytest

from tests.helpers import free_port, stop_process, wait_until

NODE, CLIENT, FLOATING = "10.98.0.1", "10.98.0.3", "10.98.0.100"
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


@pytest.mark.slow
def test_a_standby_listens_before_the_floating_address_and_serves_once_it_arrives(pair_net,
                                                                                  tmp_path):
    node, client, device = pair_net
    gateway = [sys.executable, "-m", "gateway"]
    admin_port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(f'[gateway]\nadmin = "127.0.0.1:{admin_port}"\naudit = ""\n'
                      f'[[vip]]\nname = "hl7"\nprotocol = "hl7"\nlisten = "{FLOATING}:2575"\n'
                      'health = { check = "hl7-ack", interval = "1s" }\n'
                      '[[vip.member]]\nname = "ris1"\naddress = "127.0.0.1:2576"\n')
    processes = []
    try:
        processes.append(subprocess.Popen(
            ["ip", "netns", "exec", node, *gateway, "simulate", "hl7-receiver", "--listen",
             "127.0.0.1:2576", "--no-parse"], stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True))
        log = tmp_path / "gateway.log"
        processes.append(subprocess.Popen(["ip", "netns", "exec", node, *gateway, "run", "-c",
                                           str(config)], stderr=open(log, "wb"),
                                          start_new_session=True))
        wait_until(lambda: "listening on" in log.read_text(), timeout=30, what="listening")
        assert (f"vip 'hl7': {FLOATING} is not on this host (yet): listening with IP_FREEBIND"
                in log.read_text())

        def send() -> subprocess.CompletedProcess:
            return in_ns(client, *gateway, "simulate", "hl7-sender", f"{FLOATING}:2575",
                         "--count", "3", "--timeout", "3")

        assert send().returncode != 0  # nobody holds the address yet
        ip("-n", node, "addr", "add", f"{FLOATING}/24", "dev", device)  # as VRRP would
        sent = send()
        assert sent.returncode == 0 and sent.stdout.strip().endswith("3 of 3 accepted"), \
            sent.stdout + sent.stderr

        exported = in_ns(node, *gateway, "export", "keepalived", "-c", str(config), "--vrrp",
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
        missing = in_ns(node, *gateway, "export", "keepalived", "-c", str(config), "--vrrp")
        assert missing.returncode == 3
        assert "--vrrp needs --virtual-router-id, --interface" in missing.stderr
    finally:
        for process in processes:
            stop_process(process)


def pair_toml(admin_port: int, peer_ports: list[int], backends: list) -> str:
    peers = ", ".join(f'"127.0.0.1:{port}"' for port in peer_ports)
    text = (f'[gateway]\nadmin = "127.0.0.1:{admin_port}"\nadmin_token = "pair-token"\n'
            f'audit = ""\npeers = [{peers}]\n'
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
    port_a, port_b = free_port(), free_port()
    node_a = await start_gateway(nursery, pair_toml(port_a, [port_b], backends), admin=True)

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
        with trio.fail_after(5):
            while node.balancer.pool("web").member(member).admin is not state:
                await trio.sleep(0.02)

    # B is down: A keeps the change for it and says so
    await change(port_a, "a", {"state": "drain"})
    with trio.fail_after(10):
        while node_a.peers.links[0].ok is not False:
            await trio.sleep(0.05)
    # B starts: it takes A's state before it reports ready
    node_b = await start_gateway(nursery, pair_toml(port_b, [port_a], backends), admin=True)
    assert node_b.balancer.pool("web").member("a").admin is AdminState.DRAIN
    # a change on either node reaches the other (last writer wins)
    await change(port_b, "b", {"state": "maint"})
    await becomes(node_a, "b", AdminState.MAINT)
    await change(port_a, "a", {"state": "ready"})
    await becomes(node_b, "a", AdminState.READY)
    await change(port_b, "a", {"weight": 40})
    with trio.fail_after(5):
        while node_a.balancer.pool("web").member("a").weight != 40:
            await trio.sleep(0.02)
    # an older change from a peer does not undo a later one here
    stale = {"state": "maint", "stamp": node_a.balancer.pool("web").member("a").admin_changed_at
             - 60}
    assert not node_a.peers.apply("web", "a", stale)
    assert node_a.balancer.pool("web").member("a").admin is AdminState.READY
    with trio.fail_after(10):
        while node_a.peers.links[0].ok is not True:  # A's pending push reached B
            await trio.sleep(0.05)
    status = json.loads((await trio.to_thread.run_sync(lambda: urllib.request.urlopen(
        f"http://127.0.0.1:{port_a}/api/status", timeout=10).read())))
    assert status["peers"] == [{"address": f"127.0.0.1:{port_b}", "ok": True,
                                "detail": status["peers"][0]["detail"], "drift": []}]
    page = await trio.to_thread.run_sync(lambda: urllib.request.urlopen(
        f"http://127.0.0.1:{port_a}/", timeout=10).read())
    assert f"127.0.0.1:{port_b}: in sync".encode() in page
    # config drift: the same config here compares clean; one member changed is named
    same = tmp_path / "a.toml"
    same.write_text(pair_toml(port_a, [port_b], backends))
    changed = tmp_path / "changed.toml"
    changed.write_text(pair_toml(port_a, [port_b], backends).replace(
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
print(json.dumps({"acked": acked, "failures": failures, "gaps": gaps}))
'''


@pytest.mark.slow
def test_kill_9_on_the_active_node_moves_the_address_and_loses_no_message(tmp_path):
    """Two nodes, keepalived VRRP from our export, a member and a client, on one bridge."""
    import json
    import signal
    import time

    tag = f"{os.getpid() % 10000}{next(_numbers)}"
    bridge = f"mgb{tag}"
    spaces = {"a": ("10.98.0.1", f"mga{tag}"), "b": ("10.98.0.2", f"mgz{tag}"),
              "client": ("10.98.0.3", f"mgc{tag}"), "member": ("10.98.0.50", f"mgm{tag}")}
    processes: list[subprocess.Popen] = []
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
        gateway = [sys.executable, "-m", "gateway"]
        record = tmp_path / "ris.record"
        processes.append(subprocess.Popen(
            ["ip", "netns", "exec", spaces["member"][1], *gateway, "simulate", "hl7-receiver",
             "--listen", "10.98.0.50:2575", "--record", str(record), "--no-parse"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        config = tmp_path / "pair.toml"
        config.write_text('[gateway]\nadmin = "127.0.0.1:9090"\naudit = ""\n'
                          f'[[vip]]\nname = "hl7"\nprotocol = "hl7"\nlisten = "{FLOATING}:2575"\n'
                          'health = { check = "tcp", interval = "1s" }\n'
                          '[[vip.member]]\nname = "ris1"\naddress = "10.98.0.50:2575"\n')
        nodes = {}
        for key, peer, priority in (("a", "b", "150"), ("b", "a", "100")):
            address, space = spaces[key]
            nodes[key] = subprocess.Popen(
                ["ip", "netns", "exec", space, *gateway, "run", "-c", str(config)],
                stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"gateway-{key}.log", "wb"),
                start_new_session=True)
            processes.append(nodes[key])
            exported = in_ns(space, *gateway, "export", "keepalived", "-c", str(config),
                             "--vrrp", "--virtual-router-id", "61", "--interface",
                             f"v{key}0{tag}", "--unicast-src", address, "--unicast-peer",
                             spaces[peer][0], "--priority", priority)
            assert exported.returncode == 0, exported.stderr
            conf = tmp_path / f"keepalived-{key}.conf"
            conf.write_text(exported.stdout)
            processes.append(subprocess.Popen(
                ["ip", "netns", "exec", space, "keepalived", "-n", "-l", "-D", "-f", str(conf),
                 "-p", str(tmp_path / f"ka-{key}.pid"), "-r", str(tmp_path / f"vrrp-{key}.pid")],
                stdout=open(tmp_path / f"keepalived-{key}.log", "wb"), stderr=subprocess.STDOUT,
                start_new_session=True))

        def holder() -> str:
            for key in ("a", "b"):
                shown = in_ns(spaces[key][1], "ip", "-o", "addr", "show").stdout
                if f"{FLOATING}/" in shown:
                    return key
            return ""

        wait_until(lambda: holder() == "a", timeout=30, what="the address on node a")
        progress = tmp_path / "progress"
        sender = subprocess.Popen(["ip", "netns", "exec", spaces["client"][1], sys.executable,
                                   "-c", SENDER, FLOATING, "300", str(progress)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  start_new_session=True)
        processes.append(sender)
        wait_until(lambda: progress.exists() and int(progress.read_text() or 0) >= 100,
                   timeout=60, what="100 messages acked through node a")
        os.kill(nodes["a"].pid, signal.SIGKILL)  # the active gateway dies during traffic
        killed_at = time.monotonic()
        wait_until(lambda: holder() == "b", timeout=30, what="the address on node b")
        moved = time.monotonic() - killed_at
        out, err = sender.communicate(timeout=120)
        assert sender.returncode == 0, err.decode()
        result = json.loads(out)
        received = [line.split()[0] for line in record.read_text().splitlines()
                    if line.startswith("FO")]
        lost = [control_id for control_id in result["acked"] if control_id not in received]
        print(f"\nkill -9 of the active node: address moved in {moved:.1f} s; the sender was "
              f"without service {max(result['gaps'], default=0):.1f} s, {result['failures']} "
              f"failed tries re-sent, {len(result['acked'])} of 300 acked, {len(lost)} lost")
        assert len(result["acked"]) == 300 and lost == []
    finally:
        for process in processes:
            stop_process(process)
        for _, space in spaces.values():
            subprocess.run(["ip", "netns", "del", space], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=30)


async def test_table_persistence_entries_reach_the_peer(nursery):
    """A client kept on a member by node A is kept on the same member by node B (after a
    failover it lands there), learned from A's batches."""
    import trio

    from tests.helpers import start_backends, start_gateway

    backends = await start_backends(nursery, "a", "b")
    port_a, port_b = free_port(), free_port()
    sticky = 'persistence = { key = "source-ip", timeout = "1h", method = "table" }\n'

    def toml(own: int, peer: int) -> str:
        return pair_toml(own, [peer], backends).replace(
            'health = { check = "tcp"', sticky + 'health = { check = "tcp"')

    node_a = await start_gateway(nursery, toml(port_a, port_b), admin=True)
    node_b = await start_gateway(nursery, toml(port_b, port_a), admin=True)
    stream = await trio.open_tcp_stream("127.0.0.1", node_a.bound["web"][0].port)
    await stream.receive_some(100)
    await stream.aclose()
    kept = node_a.balancer.pool("web").persisted_member("127.0.0.1")
    assert kept in ("a", "b")
    with trio.fail_after(10):
        while node_b.balancer.pool("web").persisted_member("127.0.0.1") != kept:
            await trio.sleep(0.05)
