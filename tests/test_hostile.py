"""Hostile input II: no client can stop the gateway, take a VIP's members down, or hold its
slots. Each test was a defect reproduced on loopback against 0.2."""

from __future__ import annotations

import json

import trio

from gateway.balancer import AdminState, Health
from gateway.service.peers import PEER_HEADER
from tests.helpers import (ask_who, eventually, reserved_port, start_backends, start_gateway,
                           vip_port)
from tests.test_admin_security import JSON, ask, site


# -- the admin API: what a body holds cannot stop the gateway or half-apply a change

NESTED = b"[" * 1000 + b"]" * 1000


async def test_a_deeply_nested_body_is_refused_and_the_gateway_serves_on(nursery):
    """0.2: json.loads raised RecursionError, which crossed the admin nursery: the process
    exited and every VIP stopped."""
    (backend,) = await start_backends(nursery, "a")
    gateway = await start_gateway(nursery, site(backend.port), admin=True)
    for path in ("/api/persistence", "/api/vips/web/members/a", "/api/vips/web/failover"):
        status, answer = await ask(gateway, "POST", path, body=NESTED, headers=JSON)
        assert status == 400 and "nested more than 32 levels" in answer["error"], answer
    assert (await ask(gateway, "GET", "/readyz"))[0] == 200
    assert await ask_who(vip_port(gateway)) == "a"


async def test_a_refused_change_is_not_half_applied(nursery):
    """0.2 answered 400 to a drain with an impossible weight, and drained the member."""
    (backend,) = await start_backends(nursery, "a")
    gateway = await start_gateway(nursery, site(backend.port), admin=True)
    status, answer = await ask(gateway, "POST", "/api/vips/web/members/a",
                               body=b'{"state": "drain", "weight": 5000}', headers=JSON)
    assert status == 400 and "weight 5000" in answer["error"]
    member = gateway.balancer.pool("web").member("a")
    assert (member.admin, member.weight) == (AdminState.READY, 100)


async def test_an_error_in_one_admin_request_ends_that_request_only(nursery, monkeypatch,
                                                                    caplog):
    from gateway.service.admin import AdminServer

    (backend,) = await start_backends(nursery, "a")
    gateway = await start_gateway(nursery, site(backend.port), admin=True)

    def broken(self, body):
        raise RuntimeError("a bug")

    monkeypatch.setattr(AdminServer, "_adopt_persistence", broken)
    status, answer = await ask(gateway, "POST", "/api/persistence", body=b"{}", headers=JSON)
    assert status == 500 and answer["error"] == "internal error (RuntimeError), logged"
    assert "admin: POST /api/persistence from" in caplog.text and "RuntimeError: a bug" in (
        caplog.text)
    assert (await ask(gateway, "GET", "/readyz"))[0] == 200


# -- a pair: a stamp from the future never pins a member

async def test_a_future_stamp_from_a_peer_is_refused(nursery):
    """0.2: one push stamped 1e12 made every later change pushed by a peer lose, while both
    nodes said "in sync"."""
    (backend,) = await start_backends(nursery, "a")
    gateway = await start_gateway(nursery, site(backend.port), admin=True)
    peer = {**JSON, PEER_HEADER: "1"}
    for stamp in (b"1e12", b"Infinity", b'"soon"'):
        status, answer = await ask(gateway, "POST", "/api/vips/web/members/a",
                                   body=b'{"state": "maint", "stamp": ' + stamp + b"}",
                                   headers=peer)
        assert status == 400, (stamp, answer)
    member = gateway.balancer.pool("web").member("a")
    assert member.admin is AdminState.READY and member.admin_changed_at == 0.0
    body = json.dumps({"state": "drain", "stamp": trio.current_time() * 0 + 1000.0}).encode()
    status, _ = await ask(gateway, "POST", "/api/vips/web/members/a", body=body, headers=peer)
    assert status == 200 and member.admin is AdminState.DRAIN  # a plausible stamp: taken


async def test_a_peer_with_a_bad_status_cannot_stop_the_gateway_at_start_or_later(nursery):
    """The same bounds for what a peer answers: a deep or odd /api/status is a peer that
    did not answer well, never an exception in the gateway's services."""
    from tests.helpers.faulty_members import ScriptedServer, http_response

    answers = [NESTED, b"[1, 2]", b'{"vips": [1, {"members": "x"}], "config_digests": []}',
               b'{"vips": [{"name": "web", "members": [{"name": "a", "admin": "maint", '
               b'"weight": 100, "admin_changed_at": 1e300}]}]}']

    async def odd_peer(stream):
        await stream.receive_some(65536)
        await stream.send_all(http_response(answers.pop(0) if answers else b"{}"))

    peer = await ScriptedServer(odd_peer).start(nursery)
    (backend,) = await start_backends(nursery, "a")
    config = site(backend.port, f'admin_token = "pair-token-0123456789"\n'
                                f'peers = ["127.0.0.1:{peer.port}"]')
    gateways = [await start_gateway(nursery, config, admin=True) for _ in range(4)]
    for gateway in gateways[:2]:  # started, and their links say what went wrong
        assert gateway.peers.links[0].ok is False
    assert gateways[2].balancer.pool("web").member("a").admin is AdminState.READY  # nothing
    # a stamp from far in the future is taken as now, not as a pin for ever
    member = gateways[3].balancer.pool("web").member("a")
    assert member.admin is AdminState.MAINT and member.admin_changed_at < 1e11


async def test_nodes_that_disagree_say_so_never_in_sync(nursery, tmp_path):
    from tests.test_pair import pair_key, pair_toml

    backends = await start_backends(nursery, "a", "b")
    port_a, port_b = reserved_port(), reserved_port()
    key = pair_key(tmp_path)
    node_a = await start_gateway(nursery, pair_toml(port_a, [port_b], backends, key), admin=True)
    node_b = await start_gateway(nursery, pair_toml(port_b, [port_a], backends, key), admin=True)
    member_b = node_b.balancer.pool("web").member("a")
    node_b.balancer.set_admin_state("web", "a", AdminState.DRAIN, stamp=2000.0)
    # A's change, stamped by a clock that runs behind: B keeps its own later one
    node_a.balancer.set_admin_state("web", "a", AdminState.MAINT, stamp=1000.0)
    node_a.peers.announce("web", "a", {"state": "maint", "weight": 100, "stamp": 1000.0})
    link = node_a.peers.links[0]
    await eventually(lambda: bool(link.disagree), 10)
    assert member_b.admin is AdminState.DRAIN
    status, answer = await ask(node_a, "GET", "/api/status")
    (peer,) = answer["peers"]
    assert peer["in_sync"] is False and peer["disagree"] == [
        "web/a: the peer keeps its own later change"]
    status, page = await ask(node_a, "GET", "/")
    assert "admin state differs: web/a" in page["text"] and ": in sync" not in page["text"]


# -- a client's malformed request never counts against a member

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT = "1.2.840.10008.1.2"


async def _associate_raw(port: int, rq: bytes) -> bytes:
    from protocols.dicom import PduReader

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    reader = PduReader()
    with trio.fail_after(10):
        await stream.send_all(rq)
        while (pdu := reader.next_pdu()) is None:
            reader.feed(await stream.receive_some(65536))
    await stream.aclose()
    return pdu


async def test_a_request_with_a_malformed_uid_is_refused_first_and_blames_no_member(nursery,
                                                                                   pacs):
    """0.2: each member answered A-ABORT to an abstract syntax UID holding '<' and 0x83; the
    gateway struck it and tried the next; three such requests took every member down."""
    from protocols import dicom
    from tests.helpers.dicom_peers import echoscu
    from tests.test_dicom_vip import dicom_vip

    archives = [pacs("PACS1"), pacs("PACS2")]
    gateway = await start_gateway(nursery, dicom_vip(
        [(f"pacs{n}", a.port, f"PACS{n}") for n, a in enumerate(archives, 1)],
        health='health = { check = "dicom-echo", interval = "1h" }'))
    port = vip_port(gateway, "pacs")
    good = dicom.encode_associate_rq("VIP", "CT01", [(1, VERIFICATION, [IMPLICIT])])
    bad = good.replace(VERIFICATION.encode(), b"1.2.840.<0008.\x83.1")
    checked = sum(a.echoes for a in archives)  # the checks' own first round
    for _ in range(3):
        answer = await _associate_raw(port, bad)
        assert answer[0] == dicom.A_ASSOCIATE_RJ
        reject = dicom.AssociateReject.decode(answer)
        assert (reject.result, reject.source, reject.reason) == (1, 1, 1)  # permanent
    pool = gateway.balancer.pool("pacs")
    assert all(m.health is Health.UP and m.failed == 0 for m in pool.members)
    assert sum(a.echoes for a in archives) == checked  # no member saw them
    # One trailing NUL, as real modalities pad a UID, is a UID all the same.
    padded = dicom.encode_associate_rq("VIP", "CT01", [(1, VERIFICATION + "\x00", [IMPLICIT])])
    assert (await _associate_raw(port, padded))[0] == dicom.A_ASSOCIATE_AC
    assert (await echoscu(port)).clean


def test_uid_forms():
    from protocols.dicom import uid_problem

    assert uid_problem("1.2.840.10008.1.2.4.50") == "" and uid_problem("0.1") == ""
    for bad, why in (("", "empty"), ("1." + "1" * 63, "65 characters"),
                     ("1.02.3", "leading zeros"), ("1..2", "digits and dots"),
                     ("1.2.", "digits and dots"), ("1.2<3", "digits and dots")):
        assert why in uid_problem(bad), bad


async def test_an_http_1_0_request_without_host_is_forwarded_and_blames_no_member(
        nursery, xds_registry, tmp_path):
    """0.2 forwarded it, its own client code raised "Missing mandatory Host", and that counted
    against the member: three such requests took the registry down."""
    from tests.test_xds_vip import FIXTURES, ITI18_TYPE, curl, xds_vip

    registry = xds_registry()
    # A TCP check: the registry's requests are the test's own (an ITI-18 check every 200 ms
    # could land among them, as it once did under the parallel suite).
    gateway = await start_gateway(nursery, xds_vip(
        [registry.port], [], health='health = { check = "tcp", interval = "1h" }'))
    url = f"http://127.0.0.1:{vip_port(gateway, 'xds')}/registry"
    checked = len(registry.requests)
    for _ in range(3):
        status, _, _ = await curl(url, ITI18_TYPE, FIXTURES / "iti18-find-documents.xml",
                                  "--http1.0", "-H", "Host:", scratch=tmp_path)
        assert status == 200
    member = gateway.balancer.pool("xds").member("registry1")
    assert member.health is Health.UP and member.failed == 0
    assert registry.requests[checked:] == ["ITI-18"] * 3


async def test_one_address_holds_at_most_its_share_of_a_vip(nursery, caplog):
    (backend,) = await start_backends(nursery, "a")
    text = site(backend.port).replace('listen = "127.0.0.1:0"',
                                      'listen = ["127.0.0.1:0", "[::1]:0"]\nmax_clients = 8')
    gateway = await start_gateway(nursery, text)
    v4, v6 = gateway.bound["web"]
    held = [await trio.open_tcp_stream("127.0.0.1", v4.port) for _ in range(2)]  # 8 / 4
    for stream in held:
        assert await stream.receive_some(10) == b"a\n"
    third = await trio.open_tcp_stream("127.0.0.1", v4.port)
    with trio.fail_after(5):
        assert await third.receive_some(10) == b""  # refused: closed
    assert "127.0.0.1 holds max_clients_per_source (2) of vip 'web'" in caplog.text
    other = await trio.open_tcp_stream("::1", v6.port)  # another address still gets in
    assert await other.receive_some(10) == b"a\n"
    for stream in (*held, third, other):
        await stream.aclose()
    proxied = await start_gateway(nursery, text.replace(
        "max_clients = 8", 'max_clients = 8\ntrusted_proxies = ["127.0.0.1"]'))
    many = [await trio.open_tcp_stream("127.0.0.1", proxied.bound["web"][0].port)
            for _ in range(4)]  # a trusted proxy speaks for many clients: not capped
    for stream in many:
        assert await stream.receive_some(10) == b"a\n"
        await stream.aclose()


def _admin_server():
    from gateway.config import parse_config
    from gateway.service.server import Gateway

    return Gateway(parse_config(site(1), source="t.toml")).admin


def test_admin_posts_answer_any_body_without_an_internal_error():
    """Fuzzed bodies on every POST endpoint: an answer of the API's own (200, 400, 404, 409),
    never a 500, never an exception."""
    import h11
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from tests.test_codec_fuzz import json_values

    admin = _admin_server()
    paths = ["/api/vips/web/members/a", "/api/vips/web/failover", "/api/vips/web/failback",
             "/api/persistence", "/api/vips/nope/members/a", "/api/reopen-logs"]

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(paths), st.booleans(),
           st.binary(max_size=120) | json_values.map(lambda value: json.dumps(value).encode())
           | st.fixed_dictionaries({}, optional={
               "state": st.sampled_from(["drain", "maint", "ready", "x"]) | json_values,
               "weight": json_values, "stamp": json_values, "active": json_values,
               "entries": json_values, "deliveries": json_values}).map(
               lambda value: json.dumps(value).encode()))
    def post(path, from_peer, body):
        headers = [("Host", "127.0.0.1:9090"), ("Content-Type", "application/json")]
        if from_peer:
            headers.append((PEER_HEADER, "1"))
        request = h11.Request(method="POST", target=path, headers=headers)
        status, _, payload = trio.run(admin.route, request, body, "127.0.0.1:1")
        assert status in (200, 400, 404, 409), (status, payload)

    post()


# -- silent connections never shut a TLS VIP to good clients

async def test_silent_connections_in_their_tls_handshake_make_room_first(nursery, hl7_receiver,
                                                                        certs):
    """0.2: a connection held its slot through its whole TLS handshake (10 s) and the
    eviction skipped it: silent TCP connections, reopened as they were closed, kept a TLS HL7
    VIP refusing every good client."""
    from gateway.testing.simulators.hl7_messages import make_messages
    from protocols import mllp
    from tests.test_tls import mllp_tls_exchange, tls_table

    from tests.test_hl7_vip import hl7_vip

    receiver = hl7_receiver("RIS")
    gateway = await start_gateway(nursery, hl7_vip(
        [("ris1", receiver.port)], health='health = { check = "tcp", interval = "1h" }',
        extra=f"tls = {tls_table(certs.server)}\nmax_clients = 10\n"
              "max_clients_per_source = 10"))
    port = vip_port(gateway, "hl7")

    async def silent() -> None:  # connects, says nothing; connects again once closed
        while True:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            try:
                while await stream.receive_some(1024):
                    pass
            except trio.BrokenResourceError:
                pass
            await stream.aclose()

    async with trio.open_nursery() as attack:
        for _ in range(12):
            attack.start_soon(silent)
        # Every slot taken by a silent handshake: the table is pressed and evicting.
        table = gateway.admission.clients["hl7"]
        await eventually(lambda: sum(table.evicted.values()) >= 1)
        for n in range(5):  # good clients are served all the same
            (ack,) = await mllp_tls_exchange(port, certs.ca,
                                             make_messages(1, prefix=f"GOOD{n}"))
            assert mllp.peek_ack(ack).code == "AA"
        attack.cancel_scope.cancel()
    assert gateway.clients["hl7"].evicted.get("tls-handshake", 0) >= 5


# -- slow admin connections never stop /readyz

async def test_slow_admin_connections_leave_the_probes_and_the_operator_an_answer(nursery):
    """0.2: the admin server's 32 connections were taken before any token was checked: 40
    connections each sending half a POST made /readyz fail 4 of 4 probes."""
    (backend,) = await start_backends(nursery, "a")
    gateway = await start_gateway(nursery, site(backend.port), admin=True)
    address = gateway.admin_address
    half = (f"POST /api/persistence HTTP/1.1\r\nHost: {address}\r\nContent-Type: "
            "application/json\r\nContent-Length: 100\r\n\r\n{").encode()
    slow = []
    for _ in range(40):
        stream = await trio.open_tcp_stream(address.host, address.port)
        await stream.send_all(half)
        slow.append(stream)
    for _ in range(4):
        assert (await ask(gateway, "GET", "/readyz"))[0] == 200
    status, answer = await ask(gateway, "GET", "/api/status")
    assert status == 200 and answer["vips"][0]["name"] == "web"
    for stream in slow:
        await stream.aclose()


# -- small ones: a crash loses no receipt, a full disk is said once

async def test_receipts_survive_a_crash_before_their_batch(tmp_path):
    """0.2: kill -9 lost the last receipt batch (41 of 478 acknowledged C-STOREs had no
    receipt). Each is a journal line before the modality's response; a start takes them
    back, whether the crash came before the batch or during it."""
    from gateway.records.receipts import FLUSHING, JOURNAL, Receipts, trace

    first = Receipts(str(tmp_path))
    first.open()
    for n in range(5):
        first.add("pacs", "CT1", "10.0.0.1", "pacs1", "1.2.840.10008.5.1.4.1.1.2", f"1.2.{n}", 0)
    await first.flush()  # written: its journal lines are gone with it
    assert not (tmp_path / FLUSHING).exists()
    for n in range(5, 8):
        first.add("pacs", "CT1", "10.0.0.1", "pacs1", "1.2.840.10008.5.1.4.1.1.2", f"1.2.{n}", 0)
    # A crash during a batch: its lines moved aside, some already in SQLite, one not.
    (tmp_path / JOURNAL).rename(tmp_path / FLUSHING)
    first._write(first.pending[:1])
    first.add("pacs", "MR1", "10.0.0.2", "pacs2", "1.2.840.10008.5.1.4.1.1.4", "1.2.8", 0)
    # ... and kill -9: nothing else of `first` runs.
    second = Receipts(str(tmp_path))
    second.open()
    found = trace(str(tmp_path))
    assert sorted(r.sop_instance for r in found) == [f"1.2.{n}" for n in range(9)]  # once each
    assert not (tmp_path / FLUSHING).exists() and (tmp_path / JOURNAL).stat().st_size == 0
    second.close()
    first.close()


async def test_a_batch_that_cannot_be_written_is_kept_and_written_later(tmp_path, caplog):
    """receipts.sqlite locked (a long `gateway trace`) or on a full disk for a while: each
    batch was dropped, and its journal lines, set aside, were overwritten by the next batch's:
    receipts lost for good. A batch that fails is kept, in memory and aside, and tried again
    a second later; a crash meanwhile loses none either."""
    import shutil
    import sqlite3

    from gateway.records.receipts import FLUSHING, Receipts, trace

    receipts = Receipts(str(tmp_path / "state"))
    (tmp_path / "state").mkdir()
    receipts.open()
    failures = [sqlite3.OperationalError("database is locked")] * 2
    write = receipts._write

    def locked_a_while(batch, only_new=False):
        if failures:
            raise failures.pop()
        write(batch, only_new)

    receipts._write = locked_a_while  # type: ignore[method-assign]
    uids = iter(f"1.4.{n}" for n in range(6))

    def add(count: int) -> None:
        for _ in range(count):
            receipts.add("pacs", "CT1", "10.0.0.1", "pacs1", "1.2.840.10008.5.1.4.1.1.2",
                         next(uids), 0)

    add(3)
    await receipts.flush()
    assert len(receipts.pending) == 3 and receipts._added.is_set()  # the next batch soon
    add(2)
    await receipts.flush()
    add(1)
    assert len(receipts.pending) == 6 and receipts.dropped == 0
    shutil.copytree(tmp_path / "state", tmp_path / "crashed")  # kill -9 now: what a start finds
    after_crash = Receipts(str(tmp_path / "crashed"))
    after_crash.open()
    assert sorted(r.sop_instance for r in trace(str(tmp_path / "crashed"))) == [
        f"1.4.{n}" for n in range(6)]  # once each
    after_crash.close()
    await receipts.flush()  # the database free again
    assert sorted(r.sop_instance for r in trace(str(tmp_path / "state"))) == [
        f"1.4.{n}" for n in range(6)]
    assert receipts.pending == [] and not (tmp_path / "state" / FLUSHING).exists()
    errors = [r.getMessage() for r in caplog.records if r.name == "medgate.receipts"]
    assert len(errors) == 2 and "database is locked" in errors[0]
    assert "written again after 2 failed batch(es), with the 6 receipt(s) kept" in errors[1]
    receipts.close()


def test_a_damaged_receipts_file_is_kept_aside_and_the_gateway_starts(tmp_path, caplog):
    """receipts.sqlite damaged (a disk error, a copy cut short): the gateway refused to start
    ("file is not a database"), every VIP down for a trace index. It is kept aside, a new one
    started, and what the journal held is taken back into it."""
    from gateway.records.receipts import FILE_NAME, JOURNAL, Receipts, trace

    (tmp_path / FILE_NAME).write_bytes(b"SQLite format 2\0" + b"\x17" * 3000)
    (tmp_path / JOURNAL).write_text('["2026-12-07T08:00:00.000+00:00", "pacs", "CT1", '
                                    '"10.0.0.1:4000", "pacs1", "1.2.840.10008.5.1.4.1.1.2", '
                                    '"1.5.1", 0]\n')
    receipts = Receipts(str(tmp_path))
    receipts.open()
    (kept,) = tmp_path.glob(f"{FILE_NAME}.unreadable-*")
    assert kept.read_bytes().startswith(b"SQLite format 2")  # as it was, for whoever looks
    assert [r.sop_instance for r in trace(str(tmp_path))] == ["1.5.1"]
    assert f"kept as {kept.name}, and a new one started" in caplog.text
    receipts.close()


async def test_the_journals_of_workers_that_crashed_are_taken_back_at_the_next_start(tmp_path):
    """With [gateway] workers, each worker process keeps its own journal
    (receipts.journal.wN-PID): the gateway's next start takes back those of every worker,
    fewer workers or not."""
    from gateway.records.receipts import JOURNAL, Receipts, trace, worker_journal

    for number in (1, 3):
        worker = Receipts(str(tmp_path), journal=worker_journal(number, 100 + number))
        worker.open()
        worker.add("pacs", f"CT{number}", "10.0.0.1", "pacs1", "1.2.840.10008.5.1.4.1.1.2",
                   f"1.3.{number}", 0)
        worker.close()  # ... killed before its batch
    during_a_batch = tmp_path / worker_journal(3, 103)
    during_a_batch.rename(f"{during_a_batch}.flushing")
    leader = Receipts(str(tmp_path))
    leader.open()
    assert sorted(r.sop_instance for r in trace(str(tmp_path))) == ["1.3.1", "1.3.3"]
    assert sorted(p.name for p in tmp_path.glob(f"{JOURNAL}*")) == [JOURNAL]
    leader.close()


async def test_a_worker_draining_after_a_reload_keeps_its_journal_apart_from_its_successor(
        tmp_path):
    """After a reload, worker 1 of the old workers drains beside worker 1 of the new ones.
    They shared one journal file: each batch of one moved the other's lines aside with its
    own and deleted them once written, so the receipts a worker killed before its batch had
    journaled were lost (its successor found nothing to take back). Each process has its
    own now, and the leader takes back an exited worker's."""
    from gateway.records.receipts import Receipts, trace, worker_journal

    leader = Receipts(str(tmp_path))
    leader.open()  # at the gateway's start, before any worker
    draining = Receipts(str(tmp_path), journal=worker_journal(1, 2001))
    draining.open()
    new = Receipts(str(tmp_path), journal=worker_journal(1, 2002))
    new.open()
    draining.add("pacs", "CT1", "10.0.0.1", "pacs1", "1.2.840.10008.5.1.4.1.1.2", "1.4.1", 0)
    new.add("pacs", "CT2", "10.0.0.2", "pacs1", "1.2.840.10008.5.1.4.1.1.2", "1.4.2", 0)
    await draining.flush()  # the old one's batch ...
    new.close()  # ... and the new one killed before its own
    assert leader.take_back(worker_journal(1, 2002)) == 1
    assert sorted(r.sop_instance for r in trace(str(tmp_path))) == ["1.4.1", "1.4.2"]
    assert leader.take_back(worker_journal(1, 2002)) == 0  # taken once
    draining.close()
    leader.close()


def test_a_half_written_inventory_from_a_crash_is_removed(tmp_path):
    from gateway.records.inventory import Inventory

    (tmp_path / "inventory.json.new").write_text('{"saved": ')
    Inventory(str(tmp_path)).load()
    assert not (tmp_path / "inventory.json.new").exists()


def test_a_full_disk_is_said_once_per_burst_and_counted(tmp_path, caplog):
    """0.2 logged one ERROR per audit record (201 lines for 200 messages)."""
    from gateway.records.audit import AuditLog

    audit = AuditLog("/dev/full")  # every write: ENOSPC
    audit.open()
    for n in range(200):
        audit.record("hl7", control_id=f"M{n}")
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "records are lost until it can again" in errors[0].message
    assert audit.lost == 200
    audit.target = str(tmp_path / "audit.jsonl")  # space again (logrotate moved it, say)
    assert audit.reopen() == ""
    audit.record("hl7", control_id="M200")
    assert "written again; 200 record(s) were lost meanwhile" in caplog.text
    assert (tmp_path / "audit.jsonl").read_text().count("\n") == 1
    audit.close()
