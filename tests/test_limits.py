"""Exhaustion: client limits refused in each protocol's words, idle links closed for room, slow
heads timed out, descriptors kept for checks and the admin server, accept never spinning."""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import socketserver
import threading
import time
import urllib.request

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from gateway.testing.simulators.hl7_messages import make_messages
from protocols.dicom import AssociateReject
from protocols.mllp import END, frame, peek_ack
from tests.helpers.dicom_peers import echoscu
from tests.helpers.faulty_members import HttpRecorder, ScriptedServer
from tests.helpers import GatewayProcess, start_gateway, vip_port, wait_until
from tests.test_hardening import associate_rq, http_exchange, one_member_vip, soap_post


async def hang(stream: trio.SocketStream) -> None:
    """A member that takes the connection and never answers."""
    while await stream.receive_some(65536):
        pass


async def read_frame(stream: trio.SocketStream) -> bytes:
    answer = bytearray()
    with trio.fail_after(5):
        while END not in answer:
            data = await stream.receive_some(65536)
            assert data, "closed without an answer"
            answer += data
    return bytes(answer[1:answer.index(END)])


async def test_dicom_over_max_clients_gets_a_transient_reject(nursery, pacs):
    archive = pacs("PACS1")
    gateway = await start_gateway(nursery, one_member_vip("dicom", archive.port, "max_clients = 1"))
    port = vip_port(gateway, "dicom")
    first = await trio.open_tcp_stream("127.0.0.1", port)
    await first.send_all(associate_rq(b"VIP", b"CT01"))
    with trio.fail_after(5):
        assert (await first.receive_some(65536))[0] == 0x02  # A-ASSOCIATE-AC: the one slot
    second = await trio.open_tcp_stream("127.0.0.1", port)
    await second.send_all(associate_rq(b"VIP", b"CT02"))
    with trio.fail_after(5):
        answer = await second.receive_some(100)
    assert AssociateReject.decode(answer) == AssociateReject(2, 3, 2)  # local-limit-exceeded
    await first.aclose()
    await second.aclose()


@pytest.mark.parametrize("control_id", ["L000002", ""])
async def test_hl7_over_max_clients_gets_a_nak_naming_the_limit(nursery, control_id):
    """Without MSH-10 too (MSA-2 empty then): such a sender was closed without an answer."""
    server = await ScriptedServer(hang).start(nursery)
    gateway = await start_gateway(nursery, one_member_vip("hl7", server.port, "max_clients = 1"))
    port = vip_port(gateway, "hl7")
    busy_message, refused_message = make_messages(2, prefix="L")
    refused_message = refused_message.replace(b"|L000002|", f"|{control_id}|".encode())
    checks = server.connections  # the first health check's
    busy = await trio.open_tcp_stream("127.0.0.1", port)
    await busy.send_all(frame(busy_message))  # in flight: not idle, cannot be closed for room
    await server.wait_connections(checks + 1)  # relayed: the member holds it
    refused = await trio.open_tcp_stream("127.0.0.1", port)
    await refused.send_all(frame(refused_message))
    ack = peek_ack(await read_frame(refused))
    assert (ack.code, ack.control_id) == ("AR", control_id) and "max_clients" in ack.text
    await busy.aclose()
    await refused.aclose()


async def test_xds_over_max_clients_gets_503_with_a_fault(nursery):
    server = await ScriptedServer(hang).start(nursery)
    gateway = await start_gateway(nursery, one_member_vip("xds", server.port,
                                                          'max_clients = 1'))
    port = vip_port(gateway, "xds")
    checks = server.connections  # the first health check's
    busy = await trio.open_tcp_stream("127.0.0.1", port)
    await busy.send_all(soap_post(b"A"))
    await server.wait_connections(checks + 1)  # relayed: the member holds it
    response = await http_exchange(port, soap_post(b"B"))
    assert response.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 5" in response
    assert b"env:Receiver" in response and b"max_clients" in response
    await busy.aclose()


async def test_idle_mllp_links_are_closed_longest_idle_first_to_make_room(nursery, hl7_receiver):
    receiver = hl7_receiver("RIS1")
    gateway = await start_gateway(nursery, one_member_vip("hl7", receiver.port, "max_clients = 5\nmax_clients_per_source = 5"))
    port = vip_port(gateway, "hl7")
    idle = []
    for _ in range(4):
        idle.append(await trio.open_tcp_stream("127.0.0.1", port))
        await trio.sleep(0.05)
    sender = await trio.open_tcp_stream("127.0.0.1", port)  # the 5th: 80% reached, one goes
    (message,) = make_messages(1, prefix="R")
    await sender.send_all(frame(message))
    assert peek_ack(await read_frame(sender)).code == "AA"
    with trio.fail_after(5):
        assert await idle[0].receive_some(10) == b""  # the longest idle was closed
    with trio.move_on_after(0.3) as still_open:
        await idle[1].receive_some(10)
    assert still_open.cancelled_caught
    for stream in (*idle, sender):
        await stream.aclose()


async def test_slow_and_silent_http_clients_are_timed_out(nursery):
    server = await ScriptedServer(hang).start(nursery)
    gateway = await start_gateway(nursery, one_member_vip("xds", server.port,
                                                          'header_timeout = "1s"'))
    port = vip_port(gateway, "xds")
    silent = await trio.open_tcp_stream("127.0.0.1", port)
    slow = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(10):  # client_timeout is 1h: only header_timeout can end these
        cut = False
        for byte in b"POST /registry HTTP/1.1\r\nHost: x":  # 33 bytes: 6.6 s at this pace
            try:
                await slow.send_all(bytes([byte]))
            except trio.BrokenResourceError:
                cut = True
                break
            await trio.sleep(0.2)
        assert cut or await slow.receive_some(10) == b""  # closed, not left to dribble
        assert await silent.receive_some(10) == b""
    await silent.aclose()
    await slow.aclose()


def admin_status(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=5) as response:
        return json.load(response)


def checks_done(port: int) -> dict[tuple[str, str], float]:
    """How many health checks each member has had (medgate_check_seconds_count)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        families = text_string_to_metric_families(response.read().decode())
        return {(s.labels["vip"], s.labels["member"]): s.value for family in families
                for s in family.samples if s.name == "medgate_check_seconds_count"}


@pytest.fixture
def many_files():
    """Let this test process hold a thousand sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.slow
async def test_600_idle_clients_on_one_vip_stop_nothing_else(tmp_path, pacs, hl7_receiver,
                                                            many_files):
    archive = pacs("PACS1")
    receivers = [hl7_receiver("RIS1"), hl7_receiver("RIS2")]
    toml = f"""
[gateway]
admin = "127.0.0.1:0"
audit = ""

[[vip]]
name = "dicom"
protocol = "dicom"
listen = "127.0.0.1:0"
health = {{ check = "dicom-echo", interval = "300ms", timeout = "2s", rise = 1, fall = 2 }}
[[vip.member]]
name = "pacs1"
address = "127.0.0.1:{archive.port}"
ae_title = "PACS1"

[[vip]]
name = "hl7"
protocol = "hl7"
listen = "127.0.0.1:0"
health = {{ check = "hl7-ack", interval = "300ms", timeout = "2s", rise = 1, fall = 2 }}
max_clients_per_source = 1000  # one host's 600 idle links: the VIP's own limit is the test
"""
    for n, receiver in enumerate(receivers, 1):
        toml += f'[[vip.member]]\nname = "ris{n}"\naddress = "127.0.0.1:{receiver.port}"\n'
    gateway = GatewayProcess(tmp_path, toml, open_files=512).start()
    admin, dicom_port, hl7_port = gateway.port(), gateway.port("dicom"), gateway.port("hl7")
    idle: list[socket.socket] = []
    try:
        for _ in range(600):
            sock = socket.create_connection(("127.0.0.1", hl7_port), timeout=5)
            idle.append(sock)
        # Three more check rounds of every member while the gateway holds what it can
        start = checks_done(admin)
        wait_until(lambda: all(done >= start[key] + 3 for key, done in checks_done(admin).items()),
                   timeout=30, what="three check rounds")
        echo = await echoscu(dicom_port)
        assert echo.clean, echo.stderr
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", hl7_port)
            (message,) = make_messages(1, prefix="X")
            await stream.send_all(frame(message))
            ack = peek_ack(await read_frame(stream))
            await stream.aclose()
        assert (ack.code, ack.control_id) == ("AA", "X000001")
        status = await trio.to_thread.run_sync(admin_status, admin)
        members = {(v["name"], m["name"]): m for v in status["vips"] for m in v["members"]}
        assert {key: m["health"] for key, m in members.items()} == {
            ("dicom", "pacs1"): "up", ("hl7", "ris1"): "up", ("hl7", "ris2"): "up"}
        hl7 = next(vip for vip in status["vips"] if vip["name"] == "hl7")
        assert 0 < hl7["clients"] <= hl7["max_clients"] < 256  # a share of what 512 files allow
        log = gateway.text()
        assert "accept failed" not in log and "Too many open files" not in log, log[-3000:]
        assert "health up -> down" not in log
        assert "closed to make room" in log
    finally:
        for sock in idle:
            sock.close()
        gateway.stop()


class _Drain(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while self.request.recv(65536):
            pass


def test_accept_without_descriptors_backs_off_and_logs_once(tmp_path):
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Drain) as backend:
        backend.daemon_threads = True
        threading.Thread(target=backend.serve_forever, daemon=True).start()
        backend_port = backend.server_address[1]
        toml = f"""
[gateway]
admin = ""
audit = ""
max_clients = 1000

[[vip]]
name = "web"
protocol = "tcp"
listen = "127.0.0.1:0"
health = {{ check = "tcp", interval = "1h" }}
[[vip.member]]
name = "web1"
address = "127.0.0.1:{backend_port}"
"""
        gateway = GatewayProcess(tmp_path, toml, open_files=100).start()
        port = gateway.port("web")
        clients = []
        try:
            assert "max_clients 1000 needs about" in gateway.text()
            for _ in range(150):
                clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            wait_until(lambda: "accept failed" in gateway.text(), what="accept failing")
            before = gateway.cpu_seconds()
            time.sleep(2)
            spent = gateway.cpu_seconds() - before
            # Once per burst: a loaded machine may let a quiet spell (QUIET, 2 s) end one
            # while the clients wait, and the next failure is a new burst, said again.
            text = gateway.text()
            assert text.count("accept failed") == text.count("accepting again") + 1, text[-3000:]
            assert spent < 0.5, f"{spent:.2f}s of CPU in 2s while accept fails: spinning"
            for sock in clients:
                sock.close()
            time.sleep(2.5)  # a quiet spell ends the burst; the next accept says so
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            wait_until(lambda: "accepting again" in gateway.text(), what="accept recovered")
        finally:
            for sock in clients:
                sock.close()
            gateway.stop()
            backend.shutdown()


async def read_until(stream: trio.SocketStream, end: bytes) -> bytes:
    received = bytearray()
    with trio.fail_after(5):
        while not received.endswith(end):
            data = await stream.receive_some(65536)
            assert data, bytes(received)
            received += data
    return bytes(received)


async def test_idle_keep_alive_http_clients_make_room_too(nursery):
    member = HttpRecorder()
    server = await ScriptedServer(member).start(nursery)
    gateway = await start_gateway(nursery, one_member_vip("xds", server.port, "max_clients = 5\nmax_clients_per_source = 5"))
    port = vip_port(gateway, "xds")
    kept = []
    for name in (b"A", b"B", b"C", b"D"):  # each asks once, then keeps its connection open
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(soap_post(name, connection=""))
        await read_until(stream, b"answer to " + name)  # idle from here on, in this order
        kept.append(stream)
    response = await http_exchange(port, soap_post(b"E"))
    assert response.endswith(b"answer to E")
    with trio.fail_after(5):
        assert await kept[0].receive_some(10) == b""  # the longest idle made room
    await kept[1].send_all(soap_post(b"F", connection=""))  # the others still serve
    await read_until(kept[1], b"answer to F")
    for stream in kept:
        await stream.aclose()


async def test_an_evicted_client_gives_its_address_its_slot_back_at_once():
    """A CI run: one address holding a VIP's every slot (max_clients_per_source =
    max_clients) had each new client refused "over max_clients" while the silent
    handshakes evicted for it were still closing: the VIP let it in, the per-source count
    did not. An eviction frees the slot for every limit at once."""
    from gateway.net.limits import ClientTable, Full, Total

    table = ClientTable("hl7", limit=4, total=Total(limit=100), per_source=4)
    with contextlib.ExitStack() as held:
        for n in range(4):
            slot = held.enter_context(table.admit(f"10.0.0.1:{n}", "10.0.0.1"))
            assert slot is not None
            held.enter_context(slot.opening("tls-handshake"))
        assert table.full("10.0.0.1") is Full.VIP
        with table.admit("10.0.0.1:99", "10.0.0.1") as newcomer:  # evicts the oldest
            assert newcomer is not None
            assert table.evicted == {"tls-handshake": 1}
            assert table.full("10.0.0.1") is Full.VIP
            assert table.full(None) is Full.VIP
        assert table.full("10.0.0.1") is None
    # the evicted slot's own exit came last: its slot is counted free once, not twice
    assert (table.slots, table._by_source, table._leaving) == (set(), {}, 0)
    table2 = ClientTable("hl7", limit=8, total=Total(limit=100), per_source=2)
    with table2.admit("a:1", "a"), table2.admit("a:2", "a"):
        assert table2.full("a") is Full.SOURCE and table2.full("b") is None


async def test_draining_closes_the_clients_with_nothing_in_progress_and_counts_them_gone():
    """close_idle (the gateway draining): a client idle between units and one in its opening
    are closed; one busy with a unit is not (it is, once idle again); the closed ones count
    as gone at once, and not among the evictions for room."""
    from gateway.net.limits import ClientTable, Evicted, Total

    table = ClientTable("hl7", limit=8, total=Total(limit=100), per_source=8)
    with contextlib.ExitStack() as held:
        held.enter_context(contextlib.suppress(Evicted))  # what a closed client's wait raises
        idle, opening, busy = (held.enter_context(table.admit(f"10.0.0.1:{n}", "10.0.0.1"))
                               for n in range(3))
        assert idle is not None and opening is not None and busy is not None
        waiting = trio.CancelScope()
        held.enter_context(idle.idle(waiting))
        held.enter_context(opening.opening("first-unit"))
        assert table.close_idle() == 2
        assert (idle.evicted, opening.evicted, busy.evicted) == (True, True, False)
        assert waiting.cancel_called
        assert table._held_by("10.0.0.1") == 1 and table.evicted == {}
        assert table.close_idle() == 0  # each closed once
        busy_wait = trio.CancelScope()
        with contextlib.suppress(Evicted), busy.idle(busy_wait):  # its unit done: idle
            assert table.close_idle() == 1 and busy_wait.cancel_called


async def test_a_client_that_has_spoken_in_its_handshake_is_closed_after_the_silent_ones():
    """A CI run: twelve silent connections, each reopened as it was closed, came to be
    younger than a good client still in its TLS handshake, which was then closed as the
    oldest. Silent openings go first, however young."""
    from gateway.net.limits import ClientTable, Total

    table = ClientTable("hl7", limit=4, total=Total(limit=100))
    with contextlib.ExitStack() as held:
        slots = []
        for n in range(4):  # the first (oldest) has sent its ClientHello, the others nothing
            slots.append(slot := held.enter_context(table.admit(f"10.0.0.{n}:1", None)))
            held.enter_context(slot.opening("tls-handshake"))
        slots[0].heard()
        for n in range(3):  # each newcomer evicts a silent one, never the one that spoke
            newcomer = held.enter_context(table.admit(f"10.0.1.{n}:1", None))
            held.enter_context(newcomer.opening("tls-handshake"))
            assert slots[n + 1].evicted and not slots[0].evicted
        assert table.evicted == {"tls-handshake": 3}
