"""`[gateway] workers = N`: a leader process and N workers behind one set of VIPs.

The parts without processes first (shared client counts, passive signals counted by the leader,
state followed by workers, the key), then a gateway with two workers as a site runs it: every
protocol served, the checks run once, an admin drain applied by both workers before the API
answers, and a worker killed mid-stream while a resending HL7 sender loses nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from gateway.balancer import AdminState, Health, MemberSpec, NoMemberAvailable, Pool
from gateway.config import ConfigError, GatewaySettings, parse_config
from gateway.net.limits import ClientTable, Full, Total
from gateway.net.shared_counts import SharedCounts
from gateway.records.atna import Actor
from gateway.service.code_identity import PACKAGES, code_digest
from gateway.service.worker import (FAIR_PAUSE, FAIR_PAUSES, ReportPace, may_take_next,
                                    take_turns)
from gateway.service.workers import (HEARTBEAT_EVERY, REPORT_EVERY, _apply_signal, follow_state,
                                     member_state)
from gateway.testing.simulators.hl7_messages import make_messages
from protocols.mllp import frame, peek_header
from tests.helpers import GatewayProcess, reserved_port, wait_until
from tests.helpers.dicom_peers import echoscu, storescu, write_instances
from tests.helpers.hl7_senders import send_until_acked
from tests.test_xds_vip import PATIENT

GATEWAY = [sys.executable, "-m", "gateway"]


# -- client limits shared by the workers

def _two_workers(limit: int, per_source: int = 0) -> tuple[ClientTable, ClientTable]:
    """The same VIP's client table in two workers (rows 0 and 1 of one shared file)."""
    first = SharedCounts.create(2)
    second = SharedCounts(first.fd, 2, 1)
    first.row = 0
    tables = []
    for counts in (first, second):
        table = ClientTable("hl7", limit, Total(limit=1000), per_source)
        table.share(counts, 3)
        tables.append(table)
    return tables[0], tables[1]


async def test_no_worker_admits_past_the_vip_limit_and_none_refuses_while_it_has_room():
    one, two = _two_workers(limit=4)
    with one.admit("a:1") as a, one.admit("b:1") as b, one.admit("c:1") as c:
        assert None not in (a, b, c)
        assert two.in_use == 3 and one.in_use == 3
        with two.admit("d:1") as d:
            assert d is not None  # room left: the other worker's three do not refuse it
            with two.admit("e:1") as e, one.admit("f:1") as f:
                assert e is None and f is None  # four in all: both refuse
                assert two.full(None) is Full.VIP
        with two.admit("g:1") as g:
            assert g is not None  # d has gone: its slot is free for either


async def test_a_source_limit_counts_the_address_in_every_worker():
    one, two = _two_workers(limit=100, per_source=2)
    with one.admit("10.0.0.7:1", "10.0.0.7"), two.admit("10.0.0.7:2", "10.0.0.7"):
        assert one.full("10.0.0.7") is Full.SOURCE and two.full("10.0.0.7") is Full.SOURCE
        assert one.full("10.0.0.8") is None
    assert one.full("10.0.0.7") is None


async def test_the_clients_of_a_worker_that_has_gone_are_forgotten():
    one, two = _two_workers(limit=2)
    with two.admit("a:1"), two.admit("b:1"):
        assert one.full(None) is Full.VIP
        leader = SharedCounts(one._shared.fd, 2)  # the leader, on its worker's exit
        leader.clear(1)
        assert one.full(None) is None and one.in_use == 0


def test_a_members_max_connections_is_the_gateways_not_each_workers():
    """With 4 workers, a PACS with max_connections = 2 took 5 associations at once (each
    worker allowed 2). Each worker publishes its connections to a limited member in shared
    memory and counts the others' too; the leader numbers the members (assign_slots)."""
    from gateway.service.worker import share_member_counts
    from gateway.service.workers import assign_slots

    first = SharedCounts.create(2)
    second = SharedCounts(first.fd, 2, 1)
    first.row = 0
    slots = assign_slots({}, {"pacs/pacs1"}, 4)
    workers = []
    for counts in (first, second):
        pool = _up(Pool.from_specs("pacs", [MemberSpec("pacs1", max_connections=2),
                                            MemberSpec("pacs2")]))
        share_member_counts(pool, counts, slots)
        workers.append(pool)
    one, two = workers
    limited = one.member("pacs1")
    one.take_conn(limited)
    assert not two.member("pacs1").full
    two.take_conn(two.member("pacs1"))
    assert limited.full and two.member("pacs1").full  # two in all: both see it
    assert not one.member("pacs2").full  # unlimited: nothing shared
    with pytest.raises(NoMemberAvailable):
        one.pick(among=["pacs1"])
    one.drop_conn(limited)
    assert not two.member("pacs1").full and two.pick(among=["pacs1"]).name == "pacs1"
    leader = SharedCounts(first.fd, 2)
    leader.clear(1)  # worker 2 has gone, its connections with it
    assert one.member("pacs1").active == 0 and not one.member("pacs1").full


def test_slots_are_kept_across_reloads_and_given_again_only_when_none_is_free():
    from gateway.service.workers import assign_slots

    first = assign_slots({}, {"b", "a"}, 3)
    assert first == {"a": 0, "b": 1}
    kept = assign_slots(first, {"b", "c"}, 3)  # "a" gone: its slot is not given to "c"
    assert kept == {"a": 0, "b": 1, "c": 2}
    assert assign_slots(kept, {"b", "c", "d"}, 3) == {"b": 1, "c": 2, "d": 0}  # now it is


async def _couriers_run(workers: list) -> None:
    """The leader's couriers send what is posted for `workers` (WorkerProcess), then stop."""
    async with trio.open_nursery() as couriers:
        for worker in workers:
            couriers.start_soon(worker.deliver)
        await trio.testing.wait_all_tasks_blocked()
        couriers.cancel_scope.cancel()


# -- passive health: the leader counts every worker's signals

def _pool(**settings) -> Pool:
    return Pool.from_specs("hl7", [MemberSpec("ris1"), MemberSpec("ris2")], error_limit=3,
                           **settings)


def _up(pool: Pool) -> Pool:
    for member in pool.members:
        pool.record_check(member.name, True, "ok", 0.01, now=0.0)
    return pool


def test_a_worker_never_takes_a_member_down_itself_and_the_leader_counts_all_workers():
    leader = _up(_pool())
    workers = [_up(_pool()) for _ in range(2)]
    for pool in workers:
        pool.outbox = []
    # Two strikes in one worker, one in the other: three in a row for the gateway
    for pool, unit in ((workers[0], 1), (workers[0], 2), (workers[1], 3)):
        assert pool.report_failure(pool.member("ris1"), "reset", unit) is None
    assert all(pool.member("ris1").health is Health.UP for pool in workers)
    for pool in workers:
        for signal_ in pool.take_outbox():
            _apply_signal(leader, json.loads(json.dumps(signal_)), now=1.0)
    assert leader.member("ris1").health is Health.DOWN
    assert "3 consecutive live failures" in leader.member("ris1").health_detail
    state = json.loads(json.dumps(member_state(leader, now=2.0)))
    follow_state(workers[1], state, now=5.0)
    assert workers[1].member("ris1").health is Health.DOWN
    assert workers[1].pick().name == "ris2"


def test_good_news_is_told_once_a_batch_and_ends_a_run_of_strikes():
    leader = _up(_pool())
    worker = _up(_pool())
    worker.outbox = []
    member = worker.member("ris1")
    worker.report_failure(member, "reset")
    worker.report_failure(member, "reset")
    for _ in range(100):
        worker.report_success(member)
    worker.report_failure(member, "reset")
    signals = worker.take_outbox()
    assert [s[0] for s in signals] == ["failure", "failure", "success", "failure"]
    for signal_ in signals:
        _apply_signal(leader, list(signal_), now=1.0)
    assert leader.member("ris1").health is Health.UP  # the success ended the run
    assert leader.member("ris1").live_failures == 1


def test_a_worker_follows_the_leaders_admin_state_weight_and_failover_choice():
    leader = _up(Pool.from_specs("pacs", [MemberSpec("a"), MemberSpec("b")], mode="failover"))
    worker = _up(Pool.from_specs("pacs", [MemberSpec("a"), MemberSpec("b")], mode="failover"))
    leader.set_admin_state("a", AdminState.DRAIN)
    leader.set_weight("b", 7)
    leader.adopt_active("b", now=1.0)
    follow_state(worker, json.loads(json.dumps(member_state(leader, now=1.0))), now=3.0)
    assert worker.member("a").admin is AdminState.DRAIN and worker.member("b").weight == 7
    assert worker.active == "b" and worker.pick(now=3.0).name == "b"


def test_whatever_a_worker_queues_for_the_leader_wakes_its_reporter():
    """Each thing a report carries tells the worker's reporter as it is queued (so a worker
    whose clients have nothing to say sleeps, and none of it waits): passive signals (good
    news once a batch), table persistence and delivery entries, a failover switch, the
    workflow memory's entries, inventory records and ATNA events; and a unit's end, whose
    counters (a member's live connections: `ctl drain --wait`) the leader reads. What
    queues nothing (a key picked again, good news told already) tells nothing."""
    from gateway.service.worker import _InventoryRelay, _SecurityEvents
    from gateway.vips.workflow import WorkflowAffinity
    from protocols.atna import Code

    told: list[str] = []
    pool = _up(_pool(shared=True, resend_memory=100, persistence_method="table"))
    pool.report_to_leader(lambda: told.append("pool"))
    failover = _up(Pool.from_specs("pacs", [MemberSpec("a"), MemberSpec("b")],
                                   mode="failover", shared=True))
    failover.report_to_leader(lambda: told.append("failover"))
    workflow = WorkflowAffinity()
    workflow.share(lambda: told.append("workflow"))
    inventory = _InventoryRelay([], lambda: told.append("inventory"))
    security = _SecurityEvents([], lambda: told.append("security"))
    member = pool.member("ris1")
    steps = [
        (lambda: pool.report_failure(member, "reset", 1), ["pool"]),
        (lambda: pool.report_success(member), ["pool"]),
        (lambda: pool.report_success(member), []),  # told already this batch
        (lambda: pool.report_status(member, True, "AR", source="CT1", unit=2), ["pool"]),
        (lambda: pool.answered_well(member, 1.0), ["pool"]),
        (lambda: pool.delivered(("SND", "FAC", "C1"), "ris1", 1.0), ["pool"]),
        (lambda: pool.pick("PID1", now=1.0), ["pool"]),  # a new table entry
        (lambda: pool.pick("PID1", now=1.5), []),  # the same entry, used again
        (lambda: failover.pick(now=1.0), ["failover"]),  # the first active member
        (lambda: (pool.take_conn(member), pool.drop_conn(member)), ["pool"]),  # a unit's end
        (lambda: workflow.created("CT1", "1.2.3", "pacs1", 1.0), ["workflow", "workflow"]),
        (lambda: workflow.stored("CT1", "pacs1", 1.0), ["workflow"]),
        (lambda: inventory.record("pacs", "CT1", "10.0.0.1", "ARCHIVE", [], True),
         ["inventory"]),
        (lambda: security.security_alert(Code("110113", "DCM", "Security Alert"), False,
                                         Actor("CT1", "10.0.0.1"), "refused", ""),
         ["security"]),
    ]
    for n, (step, expected) in enumerate(steps):
        told.clear()
        step()
        assert told == expected, n


# -- taking turns at the shared listening sockets

@given(st.lists(st.integers(0, 40), min_size=1, max_size=16), st.data())
def test_the_worker_holding_fewest_always_may_take_the_next_client_and_none_goes_past_its_share(
        held, data):
    workers = len(held)
    row = data.draw(st.integers(0, workers - 1))
    if held[row] == min(held):
        assert may_take_next(held, row, workers)
    if may_take_next(held, row, workers):  # taking it leaves it within one of its share
        assert held[row] + 1 <= -(-(sum(held) + 1) // workers) + 1


async def test_a_worker_above_its_share_leaves_the_next_clients_to_the_others_a_while(
        autojump_clock):
    held = [3, 1, 1, 1]  # row 0 above its share: 3 * 4 > 6 + 4
    started = trio.current_time()
    await take_turns(lambda: held, 0, 4)  # nobody else takes one: it does, after the pauses
    assert trio.current_time() - started == pytest.approx(FAIR_PAUSES * FAIR_PAUSE)

    seen = iter([held, held])  # the others take clients during its second pause
    started = trio.current_time()
    await take_turns(lambda: next(seen, [3, 2, 2, 1]), 0, 4)
    assert trio.current_time() - started == pytest.approx(2 * FAIR_PAUSE)
    started = trio.current_time()
    await take_turns(lambda: [2, 1, 1, 1], 0, 4)  # within one of its share: no pause
    assert trio.current_time() == started


# -- the code a worker runs

def test_the_code_digest_follows_every_source_file_by_content_and_place(tmp_path):
    package = tmp_path / "gateway"
    (package / "vips").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "vips" / "hl7.py").write_text("A = 1\n")
    (package / "vips" / "notes.txt").write_text("not code")
    first = code_digest([package])
    assert code_digest([package]) == first
    (package / "vips" / "notes.txt").write_text("still not code")
    assert code_digest([package]) == first
    (package / "vips" / "hl7.py").write_text("A = 2\n")
    assert code_digest([package]) != first
    (package / "vips" / "hl7.py").write_text("A = 1\n")
    assert code_digest([package]) == first
    (package / "vips" / "hl7.py").rename(package / "hl7.py")  # the same content, moved
    assert code_digest([package]) != first
    assert len(code_digest()) == 24  # medgate's own packages


# -- the key

@pytest.mark.parametrize("value, error", [
    ("0", ": 0:"), ("65", ": 65:"), ('"some"', ": 'some':"), ("true", ": True:")])
def test_workers_is_a_count_or_auto(value, error):
    with pytest.raises(ConfigError) as refused:
        parse_config(f"[gateway]\nworkers = {value}\n" + _HL7_ONLY, "site.toml")
    assert "site.toml:2" in str(refused.value) and "workers" in str(refused.value)
    assert error in str(refused.value) and '"auto"' in str(refused.value)


def test_auto_is_the_cpus_the_gateway_may_use():
    config = parse_config('[gateway]\nworkers = "auto"\n' + _HL7_ONLY)
    assert config.gateway.workers == min(len(os.sched_getaffinity(0)), 64)


_HL7_ONLY = """
[[vip]]
name = "hl7"
protocol = "hl7"
listen = "127.0.0.1:0"
member = [{ name = "ris1", address = "127.0.0.1:2575" }]
"""


# -- a gateway with two workers

def _admin(port: int, path: str, change: dict | None = None):
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", method="POST" if change is not None else "GET",
        data=json.dumps(change).encode() if change is not None else None,
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        body = answer.read()
    return json.loads(body) if path.startswith("/api") else body.decode()


def _workers_toml(tmp_path: Path, pacs: int, ris: list[int], registry: int, web: int) -> str:
    return f"""
[gateway]
admin = "127.0.0.1:0"
workers = 2
audit = "{tmp_path / 'audit.jsonl'}"
state_dir = "{tmp_path / 'state'}"
drain_timeout = "5s"

[[vip]]
name = "pacs"
protocol = "dicom"
listen = "127.0.0.1:0"
ae_titles = ["ARCHIVE"]
health = {{ check = "dicom-echo", interval = "300ms" }}
member = [{{ name = "pacs1", address = "127.0.0.1:{pacs}", ae_title = "PACS" }}]

[[vip]]
name = "hl7"
protocol = "hl7"
listen = "127.0.0.1:0"
health = {{ check = "hl7-ack", interval = "500ms" }}
member = [{{ name = "ris1", address = "127.0.0.1:{ris[0]}" }},
          {{ name = "ris2", address = "127.0.0.1:{ris[1]}" }}]

[[vip]]
name = "xds"
protocol = "xds"
listen = "127.0.0.1:0"
health = {{ check = "xds-query", path = "/registry", patient_id = "{PATIENT}" }}
member = [{{ name = "registry1", address = "127.0.0.1:{registry}", role = "registry" }}]

[[vip]]
name = "web"
protocol = "tcp"
listen = "127.0.0.1:0"
member = [{{ name = "web1", address = "127.0.0.1:{web}" }}]
"""


@pytest.fixture
def web_server(tmp_path):
    """Python's own HTTP server (a peer none of us wrote) as the TCP VIP's member."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("hello from web1\n")
    process = subprocess.Popen([sys.executable, "-u", "-m", "http.server", "0", "--bind",
                                "127.0.0.1", "--directory", str(tmp_path / "site")],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    line = process.stdout.readline().decode()
    yield int(line.split(" port ")[1].split()[0])
    process.terminate()
    process.wait(10)


@pytest.fixture
def two_workers(tmp_path, pacs, hl7_receiver, xds_registry, web_server):
    """A `gateway run` with workers = 2 and a VIP of each protocol; the simulated peers."""
    peers = {"pacs": pacs(ae_title="PACS"),
             "ris": [hl7_receiver(name="RIS1"), hl7_receiver(name="RIS2")],
             "registry": xds_registry()}
    gateway = GatewayProcess(tmp_path, _workers_toml(
        tmp_path, peers["pacs"].port, [r.port for r in peers["ris"]], peers["registry"].port,
        web_server)).start()
    try:
        wait_until(lambda: "vip=web protocol=tcp listening" in gateway.text(),
                   what="the gateway ready")
        yield gateway, peers
    finally:
        gateway.stop()


def _worker_pids(gateway: GatewayProcess) -> dict[int, int]:
    status = _admin(gateway.port(), "/api/status")
    return {load["worker"]: load["pid"] for load in status["workers"] if not load["draining"]}


def _checks_run(admin: int, vip: str) -> int:
    metrics = _admin(admin, "/metrics")
    return int(float(next(line.rsplit(" ", 1)[1] for line in metrics.splitlines()
                          if line.startswith("medgate_check_seconds_count")
                          and f'vip="{vip}"' in line)))


async def test_two_workers_serve_every_protocol_and_the_checks_run_once(two_workers, tmp_path,
                                                                        xds_consumer):
    gateway, peers = two_workers
    admin = gateway.port()
    assert len(_worker_pids(gateway)) == 2
    images = write_instances(tmp_path / "images", 4)
    stored = await storescu(gateway.port("pacs"), sorted(images), "ARCHIVE", "CT01")
    assert stored.clean, stored.stderr
    assert sorted(images.values()) == sorted(peers["pacs"].stored)
    echoed = await echoscu(gateway.port("pacs"), "ARCHIVE")
    assert echoed.clean, echoed.stderr
    sent = await send_until_acked(gateway.port("hl7"), make_messages(20, prefix="WK"))
    assert len(sent.acked) == 20 and sent.resends == 0
    found = await trio.to_thread.run_sync(
        xds_consumer(f"http://127.0.0.1:{gateway.port('xds')}").find_documents, PATIENT)
    assert found.status.endswith(":Success"), found.errors
    page = await trio.run_process(["curl", "-sS", f"http://127.0.0.1:{gateway.port('web')}/"],
                                  capture_stdout=True)
    assert page.stdout == b"hello from web1\n"
    # Every C-ECHO the PACS answered but echoscu's came from the leader's own checks: the
    # workers run none (with two, the PACS would see three times as many).
    echoes, checks = peers["pacs"].echoes, _checks_run(admin, "pacs")
    assert checks >= 2 and abs((echoes - 1) - checks) <= 1, (echoes, checks)

    def relayed() -> dict[str, int]:  # the workers' counters, summed by the leader
        return {vip["name"]: vip["relayed"] for vip in _admin(admin, "/api/status")["vips"]}

    wait_until(lambda: relayed() == {"pacs": 2, "hl7": 20, "xds": 1, "web": 1},
               what="every unit counted")
    assert "2 workers, 0 restart(s): worker 1 (pid" in _admin(admin, "/")
    shown = await trio.run_process([*GATEWAY, "ctl", "--admin", f"http://127.0.0.1:{admin}",
                                    "status"], capture_stdout=True)
    assert "2 workers (0 restarts): 1: " in shown.stdout.decode()
    metrics = _admin(admin, "/metrics")
    units = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
             if line.startswith("medgate_worker_units_total{")]
    assert len(units) == 2 and sum(units) == 24
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert sorted(r["control_id"] for r in audit if r["kind"] == "hl7") == sorted(sent.acked)


async def _on_every_worker(gateway: GatewayProcess, least: int = 4) -> list[trio.SocketStream]:
    """At least `least` HL7 connections, opened one at a time until each serving worker
    holds one (which worker takes a connection is the kernel's choice)."""
    streams: list[trio.SocketStream] = []

    def held() -> list[int]:
        return [w["clients"] for w in _admin(gateway.port(), "/api/status")["workers"]
                if not w["draining"]]

    while len(streams) < least or not all(held()):
        assert len(streams) < 40, f"the connections went to one worker: {held()}"
        streams.append(await trio.open_tcp_stream("127.0.0.1", gateway.port("hl7")))
        wait_until(lambda: sum(held()) == len(streams), what="the client admitted")
    return streams


async def test_an_admin_drain_reaches_both_workers_before_the_api_answers(two_workers):
    gateway, peers = two_workers
    admin = gateway.port()
    streams = await _on_every_worker(gateway, 6)
    try:
        drained = await trio.to_thread.run_sync(
            _admin, admin, "/api/vips/hl7/members/ris1", {"state": "drain"})
        assert drained["admin"] == "drain"
        # At once, on every connection, whichever worker holds it: nothing new to ris1
        for n, stream in enumerate(streams):
            await _send_one(stream, make_messages(1, prefix=f"DR{n}-")[0])
        got = {r.name: [c for c in r.control_ids if c.startswith("DR")] for r in peers["ris"]}
        assert got["RIS1"] == [] and len(got["RIS2"]) == len(streams)
    finally:
        for stream in streams:
            await stream.aclose()


async def test_a_message_resent_through_the_other_worker_goes_where_the_first_copy_went(
        two_workers, tmp_path):
    """Resend affinity across workers: no persistence, so only the delivery memory that the
    first copy's worker passed on (through the leader) sends a resend to the same member."""
    gateway, peers = two_workers
    gateway.config.write_text(gateway.config.read_text().replace(
        'health = { check = "hl7-ack", interval = "500ms" }',
        'health = { check = "hl7-ack", interval = "500ms" }\npersistence = { key = "none" }'))
    await trio.to_thread.run_sync(_admin, gateway.port(), "/api/reload", {})
    streams = await _on_every_worker(gateway)
    try:
        messages = make_messages(12, prefix="RS")
        for message in messages:
            await _send_one(streams[0], message)
        first = {r.name: {c for c in r.control_ids if c.startswith("RS")} for r in peers["ris"]}
        assert all(first.values())  # round robin: both engines have some
        # What the leader knows, every worker has applied once an admin change has returned
        wait_until(lambda: _vip(gateway, "hl7")["remembered"]["deliveries"] >= 12,
                   what="the deliveries at the leader")
        await trio.to_thread.run_sync(_admin, gateway.port(), "/api/vips/hl7/members/ris1",
                                      {"weight": 100})
        for stream in streams[1:]:  # in reverse: a fresh round robin would not match
            for message in reversed(messages):
                await _send_one(stream, message)
        again = {r.name: [c for c in r.control_ids if c.startswith("RS")] for r in peers["ris"]}
        for name, ids in again.items():
            assert set(ids) == first[name] and len(ids) == len(streams) * len(first[name]), name
    finally:
        for stream in streams:
            await stream.aclose()


def _vip(gateway: GatewayProcess, name: str) -> dict:
    return next(v for v in _admin(gateway.port(), "/api/status")["vips"] if v["name"] == name)


def test_an_admin_change_waits_for_every_worker_to_apply_it(two_workers):
    gateway, _ = two_workers
    pids = _worker_pids(gateway)
    os.kill(pids[2], signal.SIGSTOP)  # it cannot apply anything now
    try:
        changed = _admin(gateway.port(), "/api/vips/hl7/members/ris1", {"weight": 50})
    finally:
        os.kill(pids[2], signal.SIGCONT)
    assert changed["weight"] == 50  # the change stands: the late worker follows at its next state
    assert "a worker did not apply the change within 2s" in gateway.text()


async def _send_one(stream: trio.SocketStream, message: bytes, sent: int = 0) -> None:
    """`message` (but its first `sent` bytes, sent already), and its AA."""
    from protocols.mllp import MllpReader, frame, peek_ack

    await stream.send_all(frame(message)[sent:])
    reader = MllpReader()
    with trio.fail_after(10):
        while (event := reader.next_event()) is None:
            reader.feed(await stream.receive_some(65536))
    assert peek_ack(event.payload).code == "AA", peek_header(message).control_id


async def _closed(stream: trio.SocketStream) -> bool:
    with trio.fail_after(10):
        return await stream.receive_some(65536) == b""


HALF = 20  # bytes of a message sent before a stop or reload: a unit under way, not idle


async def test_a_worker_killed_mid_stream_is_started_again_and_a_resending_sender_loses_nothing(
        two_workers):
    gateway, peers = two_workers
    admin = gateway.port()
    pids = _worker_pids(gateway)
    messages = make_messages(300, prefix="KL")
    async with trio.open_nursery() as nursery:
        results = []

        async def send(part: list[bytes]) -> None:
            results.append(await send_until_acked(gateway.port("hl7"), part, pause=0.2,
                                                  give_up=120))

        for n in range(4):
            nursery.start_soon(send, messages[n::4])
        with trio.fail_after(30):
            while sum(c.startswith("KL") for r in peers["ris"] for c in r.control_ids) < 60:
                await trio.sleep(0.02)
        os.kill(pids[1], signal.SIGKILL)
    wanted = {peek_header(m).control_id for m in messages}
    assert {c for r in results for c in r.acked} == wanted
    received = {c for r in peers["ris"] for c in r.control_ids}
    assert wanted <= received  # every message reached an engine (a resend may have twice)
    wait_until(lambda: len(_worker_pids(gateway)) == 2 and pids[1] not in
               _worker_pids(gateway).values(), what="worker 1 started again")
    wait_until(lambda: not _admin(admin, "/api/status")["workers_down"],
               what="worker 1 serving again")
    metrics = _admin(admin, "/metrics")
    assert "medgate_worker_restarts_total 1.0" in metrics
    assert "medgate_workers_down 0.0" in metrics
    assert "worker 1 (pid" in gateway.text() and "killed by SIGKILL" in gateway.text()


async def test_the_receipts_of_a_killed_worker_are_taken_back_while_the_gateway_runs(
        two_workers, tmp_path):
    """A worker killed with receipts it had journaled and not yet written to SQLite: they
    waited in its journal for the gateway's next start, so `gateway trace` did not find those
    images until then (the database is locked here meanwhile, so that none is written)."""
    import sqlite3

    gateway, peers = two_workers
    pids = _worker_pids(gateway)
    database = sqlite3.connect(tmp_path / "state" / "receipts.sqlite", isolation_level=None)
    database.execute("begin exclusive")  # every batch waits, then fails and is kept
    images = write_instances(tmp_path / "images", 3)
    stored = await storescu(gateway.port("pacs"), sorted(images), "ARCHIVE", "KILLED")
    assert stored.clean, stored.stderr
    for pid in pids.values():
        os.kill(pid, signal.SIGKILL)  # from here on neither can write a batch
    database.execute("commit")

    def kept() -> int:
        return database.execute(
            "select count(*) from receipt where calling_ae = 'KILLED'").fetchone()[0]

    wait_until(lambda: kept() == 3, timeout=30, what="the receipts taken back")
    assert "receipt(s) of worker" in gateway.text()
    database.close()


def _four_workers_before(tmp_path: Path, members: str) -> GatewayProcess:
    """A `gateway run` with 4 workers and one DICOM VIP over `members` ([[vip.member]]
    tables), serving."""
    gateway = GatewayProcess(tmp_path, f"""
[gateway]
admin = "127.0.0.1:0"
workers = 4
audit = ""

[[vip]]
name = "pacs"
protocol = "dicom"
listen = "127.0.0.1:0"
health = {{ check = "tcp", interval = "60s" }}
{members}""").start()
    wait_until(lambda: "vip=pacs protocol=dicom listening" in gateway.text(),
               what="the gateway ready")
    return gateway


async def test_a_studys_parallel_associations_on_several_workers_reach_one_pacs(tmp_path,
                                                                                pacs):
    """A modality sending a study over four associations at once (DCMTK storescu, four
    processes): accepted by different workers, each placed the new calling AE by its own
    round robin (the others learn of a study affinity ~150 ms later), and 9 studies of 10
    were split over two PACS with 4 workers. A worker places a new key by rendezvous hash."""
    archives = [pacs(ae_title="PACS"), pacs(ae_title="PACS")]
    gateway = _four_workers_before(tmp_path, "".join(
        f'[[vip.member]]\nname = "pacs{n}"\naddress = "127.0.0.1:{archive.port}"\n'
        f'ae_title = "PACS"\n' for n, archive in enumerate(archives, 1)))
    try:
        port = gateway.port("pacs")
        for study in range(6):
            images = write_instances(tmp_path / f"study{study}", 4)
            async with trio.open_nursery() as modality:
                for path in images:
                    modality.start_soon(storescu, port, [path], "ARCHIVE", f"CT{study}")
            where = {n for n, archive in enumerate(archives) for uid in images.values()
                     if uid in archive.stored}
            assert len(where) == 1, f"study {study} split over {len(where)} PACS"
    finally:
        gateway.stop()


def test_four_workers_hold_a_pacs_to_its_max_connections(tmp_path, pacs):
    """pynetdicom modalities open eight associations and keep them: a PACS with
    max_connections = 2 behind 4 workers took 5 at once (each worker allowed 2)."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    archive = pacs(ae_title="PACS")
    gateway = _four_workers_before(tmp_path, f'[[vip.member]]\nname = "pacs1"\naddress = '
                                   f'"127.0.0.1:{archive.port}"\nae_title = "PACS"\n'
                                   'max_connections = 2\n')
    held = []
    try:
        for n in range(8):
            modality = AE(ae_title=f"CT{n}")
            modality.add_requested_context(Verification)
            held.append(modality.associate("127.0.0.1", gateway.port("pacs"), ae_title="ANY"))
        assert sum(association.is_established for association in held) == 2
        # Each other one was told to retry (pynetdicom, loaded, may read an RJ as an abort)
        wait_until(lambda: gateway.text().count("member is at max_connections") == 6,
                   what="six associations rejected")
    finally:
        for association in held:
            if association.is_established:
                association.release()
        gateway.stop()


async def test_a_reload_starts_workers_with_the_new_config_and_the_old_ones_drain(two_workers):
    gateway, peers = two_workers
    old = set(_worker_pids(gateway).values())
    held = await trio.open_tcp_stream("127.0.0.1", gateway.port("hl7"))
    await _send_one(held, make_messages(1, prefix="OLD1-")[0])
    under_way = make_messages(1, prefix="OLD2-")[0]
    await held.send_all(frame(under_way)[:HALF])  # its old worker drains until it is done
    gateway.config.write_text(gateway.config.read_text().replace(
        f'name = "ris1", address = "127.0.0.1:{peers["ris"][0].port}"',
        f'name = "ris1", address = "127.0.0.1:{peers["ris"][0].port}", weight = 0'))
    reloaded = await trio.to_thread.run_sync(_admin, gateway.port(), "/api/reload", {})
    assert reloaded["reloads"] == 1
    new = set(_worker_pids(gateway).values())
    assert len(new) == 2 and not new & old  # every worker serving has the new config
    # A draining worker still hears the leader: an admin change waits for it too, and it
    # applies it at once (its leader side, and its sign of life, outlive its accepting)
    changed = await trio.to_thread.run_sync(_admin, gateway.port(),
                                            "/api/vips/web/members/web1", {"weight": 5})
    assert changed["weight"] == 5 and "did not apply the change" not in gateway.text()
    await _send_one(held, under_way, sent=HALF)
    assert await _closed(held)  # idle again: closed, its worker draining
    sent = await send_until_acked(gateway.port("hl7"), make_messages(8, prefix="NEW-"))
    assert len(sent.acked) == 8
    assert not [c for c in peers["ris"][0].control_ids if c.startswith("NEW-")]  # weight 0
    await held.aclose()
    wait_until(lambda: gateway.text().count("has drained and exited") == 2,
               what="the old workers gone once their clients are")
    assert all(not _alive(pid) for pid in old)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie whose parent has gone does not)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


async def test_the_workers_drain_when_the_leader_is_killed(two_workers):
    """They stop: and drain as at a stop, each message under way answered. A worker's first
    report to the dead leader raised, and the worker died with a traceback, cutting the
    messages of its other clients."""
    gateway, _ = two_workers
    pids = list(_worker_pids(gateway).values())
    streams = await _on_every_worker(gateway)
    messages = make_messages(2 * len(streams), prefix="LK")
    for stream, message in zip(streams, messages):
        await _send_one(stream, message)
    under_way = messages[len(streams):]
    for stream, message in zip(streams, under_way):
        await stream.send_all(frame(message)[:HALF])
    os.kill(gateway.process.pid, signal.SIGKILL)
    gateway.process.wait()
    wait_until(lambda: gateway.text().count("stopped accepting") == 2, what="both draining")
    for stream, message in zip(streams, under_way):  # each unit's end wakes its reporter
        await _send_one(stream, message, sent=HALF)
        assert await _closed(stream)
        await stream.aclose()
    wait_until(lambda: not any(_alive(pid) for pid in pids), what="the workers gone")
    assert gateway.text().count("gateway stopped") == 2 and "Traceback" not in gateway.text()


async def test_after_an_upgrade_on_disk_no_worker_runs_the_new_code_and_a_reload_is_refused(
        tmp_path, hl7_receiver):
    """A worker is a new Python process that imports medgate from disk: after an upgrade on
    disk it would run other code than its leader's (other control messages). The gateway runs
    from a copy of its packages here, and one file of the copy changes under it."""
    code = tmp_path / "code"
    for package in PACKAGES:
        shutil.copytree(Path(__file__).parent.parent / package, code / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    ris = hl7_receiver(name="RIS1")
    gateway = GatewayProcess(tmp_path, f"""
[gateway]
admin = "127.0.0.1:0"
workers = 2
drain_timeout = "2s"

[[vip]]
name = "hl7"
protocol = "hl7"
listen = "127.0.0.1:0"
member = [{{ name = "ris1", address = "127.0.0.1:{ris.port}" }}]
""", code=code).start()
    try:
        wait_until(lambda: len(_worker_pids(gateway)) == 2, what="two workers")
        pids = _worker_pids(gateway)
        upgraded = code / "gateway" / "vips" / "tcp.py"
        upgraded.write_text(upgraded.read_text() + "# 0.3.1\n")
        with pytest.raises(urllib.error.HTTPError) as refused:
            await trio.to_thread.run_sync(_admin, gateway.port(), "/api/reload", {})
        assert refused.value.code == 400
        assert "restart the gateway" in json.loads(refused.value.read())["error"]
        assert _worker_pids(gateway) == pids and "reload refused" in gateway.text()
        os.kill(pids[1], signal.SIGKILL)
        wait_until(lambda: "worker 1 (pid" in gateway.text() and "could not start: the "
                   "medgate code on disk is not the code this gateway started" in gateway.text(),
                   what="the restarted worker refusing")
        assert "not started: the medgate code on disk" in gateway.text()  # its own line
        sent = await send_until_acked(gateway.port("hl7"), make_messages(5, prefix="UP"))
        assert len(sent.acked) == 5  # worker 2 serves meanwhile
        assert set(_worker_pids(gateway)) == {2} and "Traceback" not in gateway.text()
        # What an operator is shown: the status, ctl status, the page, a metric to alert on
        (down,) = _admin(gateway.port(), "/api/status")["workers_down"]
        assert down["worker"] == 1 and "restart the gateway" in down["why"]
        assert "medgate_workers_down 1.0" in _admin(gateway.port(), "/metrics")
        status = await trio.run_process(
            [sys.executable, "-m", "gateway", "ctl", "--admin",
             f"http://127.0.0.1:{gateway.port()}", "status"],
            capture_stdout=True, env={**os.environ, "COLUMNS": "200"})
        assert b"worker 1 not serving since " in status.stdout
        page = _admin(gateway.port(), "/")
        assert 'class="workers-down error"><li>worker 1: the medgate code on disk' in page
    finally:
        gateway.stop()


async def test_a_worker_keeps_serving_when_the_thread_that_started_it_ends(two_workers):
    """The parent-death signal comes when the leader's *thread* that started a worker ends
    (trio starts processes from worker threads, which end after 10 s idle): the worker checks
    that its leader is still there, and goes on (0.3's first build drained every worker then)."""
    gateway, _ = two_workers
    pids = _worker_pids(gateway)
    for pid in pids.values():
        os.kill(pid, signal.SIGUSR2)  # what the kernel sends when that thread ends
    sent = await send_until_acked(gateway.port("hl7"), make_messages(10, prefix="TH"))
    assert len(sent.acked) == 10 and sent.closed == 0
    assert _worker_pids(gateway) == pids and "has gone" not in gateway.text()
    assert "medgate_worker_restarts_total 0.0" in _admin(gateway.port(), "/metrics")


async def test_sigterm_to_every_process_of_the_unit_drains_without_cutting_clients(two_workers):
    """systemd's stop (KillMode=control-group) signals the leader and each worker at once: the
    workers drain, as the leader does; the messages under way finish (a worker that counted
    the leader's stop as a second SIGTERM would cut them), then each client, idle, is
    closed at once."""
    gateway, _ = two_workers
    streams = await _on_every_worker(gateway)
    pids = _worker_pids(gateway).values()
    messages = make_messages(len(streams), prefix="LATE")
    for stream, message in zip(streams, messages):  # each a message under way
        await stream.send_all(frame(message)[:HALF])
    # The order that caught it: the leader's stop reaches the workers before their own SIGTERM
    os.kill(gateway.process.pid, signal.SIGTERM)
    wait_until(lambda: gateway.text().count("stopped accepting") == 3, what="all draining")
    assert "stopped accepting; 2 worker(s) drain" in gateway.text()  # no client of its own
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    for stream, message in zip(streams, messages):
        await _send_one(stream, message, sent=HALF)
        assert await _closed(stream)  # idle again: closed at once, not at drain_timeout
        await stream.aclose()
    assert gateway.process.wait(30) == 0
    assert "closing live connections" not in gateway.text()


async def test_with_workers_each_copies_to_the_shadow_and_the_leader_shows_the_sums(
        tmp_path, hl7_receiver):
    """A shadow engine that answers AE to everything, behind two workers: the messages of
    connections on both are copied and compared, the leader shows the sums; `ctl shadow off`
    reaches both workers before it answers."""
    engine, trial = hl7_receiver(name="RIS1"), hl7_receiver(name="NEW", mode="AE")
    gateway = GatewayProcess(tmp_path, f"""
[gateway]
admin = "127.0.0.1:0"
workers = 2
state_dir = "{tmp_path / 'state'}"

[[vip]]
name = "hl7"
protocol = "hl7"
listen = "127.0.0.1:0"
member = [{{ name = "engine", address = "127.0.0.1:{engine.port}" }},
          {{ name = "new", address = "127.0.0.1:{trial.port}", shadow = true }}]
""").start()
    try:
        wait_until(lambda: "vip=hl7 protocol=hl7 listening" in gateway.text(), what="ready")
        streams = await _on_every_worker(gateway)
        for n, stream in enumerate(streams):
            for message in make_messages(3, prefix=f"SW{n}-"):
                await _send_one(stream, message)  # AA: the engine's answer, never the shadow's
        copied = 3 * len(streams)

        def shadow() -> dict:
            return _vip(gateway, "hl7")["shadows"][0]

        wait_until(lambda: shadow()["compared"] == copied, what="every copy, summed")
        assert shadow()["differences"] == {"ack-code": copied}
        assert all(w["units"] > 0 for w in _admin(gateway.port(), "/api/status")["workers"])
        off = await trio.run_process([*GATEWAY, "ctl", "--admin",
                                      f"http://127.0.0.1:{gateway.port()}", "shadow",
                                      "hl7/new", "off"], capture_stdout=True)
        assert b"shadowing off" in off.stdout
        for n, stream in enumerate(streams):
            await _send_one(stream, make_messages(1, prefix=f"OFF{n}-")[0])
        assert not [c for c in trial.control_ids if c.startswith("OFF")]
        lines = (tmp_path / "state" / "shadow-differences.jsonl").read_text().splitlines()
        assert len(lines) == copied  # whole lines from both workers in one file
        for stream in streams:
            await stream.aclose()
    finally:
        gateway.stop()


async def test_a_peers_entries_are_passed_on_to_every_worker():
    """With a pair and workers, what the peer tells the leader (persistence entries, HL7
    deliveries) must reach the workers, which pick: the leader passes it on with its next
    state, to every worker (none of them made it)."""
    import socket as socket_module

    from gateway.service.control_link import ControlLink
    from gateway.service.workers import WorkerProcess, Workers
    from protocols.control import FrameReader

    workers = Workers.__new__(Workers)  # only what passing on needs: no processes
    workers._pending_entries, workers.live, workers._news = [], [], trio.Event()
    workers._entry_batches = 0
    ends = []
    for number in (1, 2):
        ours, theirs = socket_module.socketpair()
        worker = WorkerProcess(number, number, None, ControlLink(ours))  # type: ignore[arg-type]
        worker.greeted = True
        workers.live.append(worker)
        ends.append(theirs)
    workers.pass_on({"persistence": {"pacs": [["hmac:00", "pacs1"]]}})
    workers._pass_entries()
    await _couriers_run(workers.live)
    for end in ends:
        reader = FrameReader()
        reader.feed(end.recv(65536))
        assert reader.next_message() == {"type": "entries",
                                         "persistence": {"pacs": [["hmac:00", "pacs1"]]}}
        end.close()
    for worker in workers.live:
        await worker.link.aclose()


async def test_a_frame_begun_is_finished_whatever_cancels_its_sender(autojump_clock):
    """An admin request's task cancelled while its state goes to a worker that is slow to
    read: the frame still goes out whole, so the worker reads it and every frame after it
    (half of one would garble the channel, and the worker would take the leader as broken)."""
    import socket as socket_module

    from gateway.service.control_link import FINISH_FRAME, ControlLink

    ours, theirs = socket_module.socketpair()
    sender, receiver = ControlLink(ours), ControlLink(theirs)
    big = {"type": "entries", "persistence": {"pacs": [["hmac:" + "0" * 60, "pacs1"]] * 40000}}
    # not cancelled, a sender waits as long as the other end takes (a worker keeps serving
    # through a leader that is stuck a while)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.send, big)
        await trio.sleep(10 * FINISH_FRAME)
        with trio.fail_after(1):
            assert await receiver.receive() == big
    async with trio.open_nursery() as nursery:
        cancelled_sender = trio.CancelScope()

        async def send_big() -> None:
            with cancelled_sender:
                await sender.send(big)
                await sender.send({"type": "never"})  # not sent: cancelled once big is out

        nursery.start_soon(send_big)
        await trio.testing.wait_all_tasks_blocked()  # the socket's buffer is full
        cancelled_sender.cancel()
        await trio.sleep(FINISH_FRAME / 2)  # the worker reads late, within the bound
        nursery.start_soon(sender.send, {"type": "state"})
        with trio.fail_after(1):
            assert await receiver.receive() == big
            assert await receiver.receive() == {"type": "state"}

    # a peer that takes nothing within FINISH_FRAME: the link is given up, not garbled, and
    # what listened on it hears that it has ended (the leader then reaps that worker)
    ended = []

    async def listen() -> None:
        ended.append(await sender.receive())

    async def send_big_for_a_second() -> None:
        with trio.move_on_after(1):
            await sender.send(big)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(listen)
        nursery.start_soon(send_big_for_a_second)
    assert ended == [None]
    with pytest.raises(trio.BrokenResourceError):
        await sender.send({"type": "state"})
    await receiver.aclose()


async def test_no_worker_process_is_started_while_every_counts_row_is_taken(monkeypatch):
    """Reloads faster than the old workers drain: every row of the shared counts taken (three
    generations). The next worker is not started (its keeper logs it and tries again later);
    it was, and was left waiting for a hello that never came."""
    from gateway.service.workers import WorkerProcess, Workers

    workers = Workers.__new__(Workers)
    workers.counts = SharedCounts.create(3)
    workers.gateway = SimpleNamespace(listening={}, balancer=SimpleNamespace(pools={}))
    workers._rows_starting = {2}  # a worker's process being started holds its row
    workers.live = [WorkerProcess(n, n, None, None) for n in (0, 1)]  # type: ignore[arg-type]
    started = []

    async def open_process(*args, **kwargs):
        started.append(args)

    monkeypatch.setattr(trio.lowlevel, "open_process", open_process)
    with pytest.raises(OSError, match="3 worker processes still run"):
        await workers._spawn(4, 1)
    assert started == [] and workers._rows_starting == {2}


@given(st.dictionaries(st.sampled_from(["persistence", "deliveries"]), st.dictionaries(
    st.sampled_from(["pacs", "ris"]), st.lists(st.tuples(st.text(max_size=3), st.just("m")),
                                               max_size=12))),
       st.dictionaries(st.sampled_from(["pacs", "mr"]), st.dictionaries(
           st.sampled_from(["mpps", "commitment"]),
           st.lists(st.tuples(st.text(max_size=3), st.just("m")), max_size=12))),
       st.integers(1, 7))
def test_a_starting_workers_entries_are_cut_into_parts_that_add_up_to_them(plain, workflow,
                                                                           size):
    from gateway.service.workers import entry_parts

    entries = {**plain, "workflow": workflow}
    parts = entry_parts(entries, size)
    joined: dict = {}
    for part in parts:
        counted = 0
        for kind, by_vip in part.items():
            for vip, held in by_vip.items():
                for table, items in (held.items() if kind == "workflow" else [(None, held)]):
                    assert items  # no empty lists: each entry counts
                    counted += len(items)
                    place = joined.setdefault(kind, {})
                    if table is None:
                        place.setdefault(vip, []).extend(items)
                    else:
                        place.setdefault(vip, {}).setdefault(table, []).extend(items)
        assert 0 < counted <= size
    def without_empty(tree):
        if isinstance(tree, dict):
            kept = {k: without_empty(v) for k, v in tree.items()}
            return {k: v for k, v in kept.items() if v}
        return tree
    assert joined == without_empty(entries)


def test_a_report_of_many_entries_goes_in_parts_and_a_small_one_in_one_message():
    """After a long wait on the leader (a bulk load of patients meanwhile) a worker's report
    could go over the control frame's limit: encode raised and the worker's reporter died."""
    from gateway.service.workers import PART_ENTRIES, report_messages

    signals = {"ris": [["failure", "ris1", "timeout"]]}
    many = [[f"hmac:{n:032x}", "ris2"] for n in range(2 * PART_ENTRIES + 1)]
    messages = report_messages({"signals": signals, "persistence": {"ris": many},
                                "deliveries": {"ris": [[7, "ris1"]]}})
    assert [m["type"] for m in messages] == ["report"] * 3
    assert messages[0]["signals"] == signals
    assert [e for m in messages for e in m.get("persistence", {}).get("ris", [])] == many
    assert [m.get("deliveries") for m in messages] == [None, None, {"ris": [[7, "ris1"]]}]
    assert report_messages({"signals": signals}) == [{"type": "report", "signals": signals}]
    assert report_messages({}) == []


async def test_a_worker_starting_beside_tables_over_a_frame_is_told_them_all(autojump_clock):
    """A site's tables (up to a million entries a VIP) were one hello: over the control
    frame's limit, the leader's encode raised and the leader died at the next worker start.
    They go in parts after the hello, and the worker keeps them all (and what the other
    workers made meanwhile) before its first client."""
    import socket as socket_module

    from gateway.service.control_link import ControlLink
    from gateway.service.worker import kept_entries
    from gateway.service.workers import WorkerProcess, Workers, adopt_entries
    from protocols.control import MAX_FRAME

    def pool():
        return Pool.from_specs("ris", [MemberSpec("ris1"), MemberSpec("ris2")],
                               persistence_method="table", persistence_timeout=3600.0,
                               resend_memory=300_000)

    leaders = pool()
    for number in range(250_000):  # about 20 MB as one JSON frame
        leaders.adopt_persistence(f"hmac:{number:064x}", "ris2", 0.0)
        leaders.delivered(number, "ris1", 0.0)
    workers = Workers.__new__(Workers)
    workers.counts = SharedCounts.create(3)
    workers.gateway = SimpleNamespace(listening={}, balancer=SimpleNamespace(
        pools={"ris": leaders}), handlers={}, config=SimpleNamespace(
            text="", source="x.toml", gateway=GatewaySettings()))
    workers.count, workers._rows_starting, workers.live = 1, set(), []
    workers.vip_slots, workers._pending_entries = {}, []
    workers.member_slots = {}
    workers.generation, workers._entry_batches, workers._kept = 1, 0, None
    ours, theirs = socket_module.socketpair()

    async def start_process(number: int, row: int, listeners: list[int]) -> WorkerProcess:
        worker = WorkerProcess(number, row, SimpleNamespace(pid=4321),  # type: ignore[arg-type]
                               ControlLink(ours))
        workers.live.append(worker)
        return worker

    workers._start_process = start_process  # type: ignore[method-assign]
    worker_end = ControlLink(theirs)
    async def spawn_and_courier() -> None:  # as _keep: the courier once the hello is sent
        await (await workers._spawn(1, 1)).deliver()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(spawn_and_courier)
        hello = await worker_end.receive()
        assert hello["type"] == "hello" and hello["parts"] > 1
        # another worker's entry, passed on while the parts go (the snapshot missed it)
        workers._pending_entries.append((None, {"deliveries": {"ris": [[999_999, "ris2"]]}}))
        workers._pass_entries()
        kept = await kept_entries(worker_end, hello["parts"])
        assert kept is not None and len(kept) == hello["parts"]
        kept.append(await worker_end.receive())  # after the parts: the worker follows it
        nursery.cancel_scope.cancel()
    follower = pool()
    for message in kept:
        assert len(json.dumps(message)) < MAX_FRAME
        adopt_entries({"ris": follower}, {}, message, 1.0)
    assert follower.persisted_member(f"hmac:{249_999:064x}") == "ris2"
    assert len(follower.persistence_entries(1.0)) == 250_000
    assert follower.resend_member(123_456, 1.0) is None  # members unknown: not up yet
    assert len(follower.delivery_entries(1.0)) == 250_001
    await worker_end.aclose()
    await workers.live[0].link.aclose()


async def test_reopen_logs_says_which_worker_could_not_and_which_did_not_answer(
        autojump_clock):
    """`gateway ctl reopen-logs` (logrotate's postrotate) reopened the leader's audit log
    only: the workers, which write the units' records, wrote on into the moved file. Each is
    asked now; one that cannot, or does not answer within SYNC_TIMEOUT, is named."""
    from gateway.service.workers import SYNC_TIMEOUT, WorkerProcess, Workers

    workers = Workers.__new__(Workers)
    workers._seq, workers._applied = 0, trio.Event()
    workers.live = [WorkerProcess(number, number, SimpleNamespace(pid=4320 + number),
                                  None, greeted=True)  # type: ignore[arg-type]
                    for number in (1, 2, 3)]
    for worker in workers.live:
        worker.ready.set()
    workers.live[2].retiring = True  # draining after a reload: it still writes records
    answered = []

    async def answer(number: int, error: str) -> None:
        worker = workers.live[number - 1]
        asked = json.loads(worker._posted.receive_nowait()[4:])
        assert asked["type"] == "reopen-logs"
        workers._take(worker, {"type": "applied", "seq": asked["seq"], "error": error})
        answered.append(number)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: _later(answer(1, "")))
        nursery.start_soon(lambda: _later(answer(3, "[gateway] audit: cannot reopen a")))
        started = trio.current_time()
        failed = await workers.reopen_logs()
    assert sorted(answered) == [1, 3] and trio.current_time() - started == SYNC_TIMEOUT
    assert failed == [("worker 3 (draining)", "[gateway] audit: cannot reopen a"),
                      ("worker 2", f"did not reopen it within {SYNC_TIMEOUT:g}s")]


async def _later(work) -> None:
    await trio.sleep(0.1)
    await work


def test_a_starting_worker_keeps_the_leaders_entries_for_what_is_left_of_their_time():
    """The snapshot a starting worker is told carries each entry's age: an hour-old study
    affinity or resend entry lived there another whole timeout (a worker restarted late in
    an entry's life kept it twice as long as the others, and they disagreed meanwhile)."""
    from gateway.service.workers import Workers, adopt_entries, entry_parts
    from gateway.vips.workflow import KEEP_FOR, WorkflowAffinity

    def pool() -> Pool:
        return _up(Pool.from_specs("ris", [MemberSpec("ris1"), MemberSpec("ris2")],
                                   persistence_method="table", persistence_timeout=600.0,
                                   resend_memory=100))

    leaders, leaders_workflow = pool(), WorkflowAffinity()
    leaders.adopt_persistence("hmac:00", "ris2", 0.0)
    leaders.delivered(("SND", "FAC", "C1"), "ris2", 0.0)
    leaders_workflow.created("CT1", "1.2.3", "pacs1", 0.0)
    workers = Workers.__new__(Workers)
    workers.gateway = SimpleNamespace(balancer=SimpleNamespace(pools={"ris": leaders}),
                                      handlers={})
    workers.generation, workers._entry_batches, workers._kept = 1, 0, None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("gateway.service.workers.workflows", lambda _: {"pacs": leaders_workflow})
        parts = workers._kept_entries(500.0)  # made at 0: 100 s of their 600 left
    follower, followers_workflow = pool(), WorkflowAffinity()
    for part in parts:  # as the worker adopts them, at its own (later) time
        adopt_entries({"ris": follower}, {"pacs": followers_workflow},
                      json.loads(json.dumps(part)), 510.0)
    assert follower.persisted_member("hmac:00") == "ris2"
    assert follower.resend_member(("SND", "FAC", "C1"), 510.0) == "ris2"
    assert [k for k, _, _ in follower.persistence_entries(590.0)] == ["hmac:00"]
    assert follower.persistence_entries(611.0) == []  # at 600 s of age, not 1,110
    assert followers_workflow.entries(KEEP_FOR)["mpps"] == [["CT1", "pacs1", KEEP_FOR - 10]]
    assert not any(followers_workflow.entries(KEEP_FOR + 11.0).values())
    assert entry_parts({"persistence": {"ris": [["k", "m"]]}})[0]["persistence"]["ris"] == [
        ["k", "m"]]  # a worker's report: made now, no age


def test_workers_started_together_share_one_snapshot_of_what_they_must_keep():
    """A million entries take the leader seconds to gather: the workers a start (or a
    reload) starts at once share one snapshot, while no entry has come since."""
    from gateway.service.workers import Workers

    leaders = Pool.from_specs("ris", [MemberSpec("ris1")], persistence_method="table")
    leaders.adopt_persistence("hmac:00", "ris1", 0.0)
    gathered = []
    persistence_entries = leaders.persistence_entries

    def counted(now: float):
        gathered.append(now)
        return persistence_entries(now)

    leaders.persistence_entries = counted  # type: ignore[method-assign]
    workers = Workers.__new__(Workers)
    workers.gateway = SimpleNamespace(balancer=SimpleNamespace(pools={"ris": leaders}),
                                      handlers={})
    workers.generation, workers._entry_batches, workers._kept = 1, 0, None
    workers._pending_entries, workers._news = [], trio.Event()
    first = workers._kept_entries(1.0)
    assert workers._kept_entries(2.0) is first and gathered == [1.0]  # one start, one look
    workers.pass_on({"persistence": {"ris": [["hmac:01", "ris1"]]}})  # came since
    leaders.adopt_persistence("hmac:01", "ris1", 3.0)
    assert workers._kept_entries(3.0)[0]["persistence"]["ris"] == [["hmac:00", "ris1", 3.0],
                                                                   ["hmac:01", "ris1", 0.0]]
    workers.generation = 2  # a reload: pools may have been replaced
    workers._kept_entries(4.0)
    assert gathered == [1.0, 3.0, 4.0]


async def test_a_worker_that_becomes_ready_gets_what_changed_since_its_hello(autojump_clock):
    """A member went down while a worker started: the state went to the workers already
    serving, and the new one kept its hello's view (the member up) until the next change of
    any member's state, however long that took."""
    import socket as socket_module

    from gateway.service.control_link import ControlLink
    from gateway.service.workers import WorkerProcess, Workers

    pool = Pool.from_specs("ris", [MemberSpec("ris1"), MemberSpec("ris2")], rise=1, fall=1)
    pool.record_check("ris1", True, "ok", 0.001, 0.0)
    workers = Workers.__new__(Workers)
    workers.gateway = SimpleNamespace(balancer=SimpleNamespace(pools={"ris": pool}), handlers={})
    workers._last_state, workers._news = [], trio.Event()
    workers._readiness, workers.live, workers.down = trio.Event(), [], {}
    ours, theirs = socket_module.socketpair()
    starting = WorkerProcess(1, 0, None, ControlLink(ours))  # type: ignore[arg-type]
    starting.greeted = True  # its hello: ris1 up
    workers.live.append(starting)
    pool.record_check("ris1", False, "refused", 0.001, 1.0)  # meanwhile: down (fall = 1)
    workers._push_state()  # to the workers serving: none yet
    workers._take(starting, {"type": "ready", "pid": 1})
    workers._push_state()
    await _couriers_run([starting])
    with trio.fail_after(1):
        state = await ControlLink(theirs).receive()
    assert state is not None and state["pools"]["ris"]["members"]["ris1"][0] == "down"
    await starting.link.aclose()
    theirs.close()


async def test_a_worker_that_does_not_read_holds_up_no_other_and_is_given_up_past_its_limit(
        monkeypatch, caplog):
    """One worker stopped (SIGSTOP, swapped out) under traffic: its socket filled with the
    entries passed on, and the leader, sending to each worker in turn, waited on it: no other
    worker heard of a member down or an admin drain until the stopped one was killed as
    silent, 16 s later (an admin drain took 12 s to answer, tried by hand). Each worker has
    a courier now; one that leaves OUTBOX_BYTES untaken is killed."""
    import socket as socket_module

    from gateway.service import workers as workers_module
    from gateway.service.control_link import ControlLink
    from gateway.service.workers import WorkerProcess, Workers

    pool = Pool.from_specs("ris", [MemberSpec("ris1"), MemberSpec("ris2")], rise=1, fall=1)
    pool.record_check("ris1", True, "ok", 0.001, 0.0)
    workers = Workers.__new__(Workers)
    workers.gateway = SimpleNamespace(balancer=SimpleNamespace(pools={"ris": pool}), handlers={})
    workers._last_state, workers._pending_entries, workers.live = [], [], []
    signalled: list[int] = []
    ends = []
    for number in (1, 2):
        ours, theirs = socket_module.socketpair()
        process = SimpleNamespace(pid=4320 + number, returncode=None,
                                  send_signal=signalled.append)
        worker = WorkerProcess(number, number, process, ControlLink(ours))  # type: ignore[arg-type]
        worker.greeted = True
        worker.ready.set()
        workers.live.append(worker)
        ends.append(theirs)
    stuck, serving = workers.live
    big = {"persistence": {"ris": [[f"hmac:{n:064x}", "ris1"] for n in range(20_000)]}}
    async with trio.open_nursery() as couriers:
        for worker in workers.live:
            couriers.start_soon(worker.deliver)
        for _ in range(4):  # another worker's entries, over what a socket holds
            workers._pending_entries.append((None, big))
        workers._pass_entries()
        reader = ControlLink(ends[1])
        for _ in range(4):
            assert (await reader.receive())["type"] == "entries"
        await trio.testing.wait_all_tasks_blocked()
        assert stuck.queued > 0  # its courier waits on its socket
        pool.record_check("ris1", False, "refused", 0.001, 1.0)  # down: every worker must hear
        workers._push_state()
        with trio.fail_after(5):
            state = await reader.receive()
        assert state["pools"]["ris"]["members"]["ris1"][0] == "down"
        assert signalled == []
        monkeypatch.setattr(workers_module, "OUTBOX_BYTES", stuck.queued + 1000)
        workers._pending_entries.append((None, big))
        workers._pass_entries()
        assert signalled == [signal.SIGKILL]  # the stuck one, once
        assert f"worker 1 (pid 4321) has left {stuck.queued} bytes" in caplog.text
        workers._push_state(seq=1)
        assert signalled == [signal.SIGKILL] and stuck.post(b"more") == 0  # given up
        assert (await reader.receive())["type"] == "entries"  # the other goes on
        couriers.cancel_scope.cancel()
    for worker, end in zip(workers.live, ends):
        await worker.link.aclose()
        end.close()


async def test_what_is_posted_for_a_worker_whose_link_has_gone_is_dropped():
    import socket as socket_module

    from gateway.service.control_link import ControlLink
    from gateway.service.workers import STOP, WorkerProcess

    ours, theirs = socket_module.socketpair()
    theirs.close()
    worker = WorkerProcess(1, 0, None, ControlLink(ours))  # type: ignore[arg-type]
    assert worker.post(STOP) == len(STOP)
    with trio.fail_after(5):
        await worker.deliver()  # returns: the link has gone
    assert worker.post(STOP) == 0  # not kept: it would grow until the worker is reaped
    await worker.link.aclose()


async def test_a_worker_started_across_a_reload_is_told_to_stop(autojump_clock):
    """A worker restarted (after a crash) while a reload started the next generation was not
    among the workers the reload told to stop: it served the old config for good, and was
    counted as one of the new generation's."""
    import socket as socket_module

    from gateway.service.control_link import ControlLink
    from gateway.service.workers import WorkerProcess, Workers

    workers = Workers.__new__(Workers)
    workers._stopping, workers.generation, workers.live, workers.restarts = False, 1, [], 0
    workers.down, workers.serving = {}, 1
    ours, theirs = socket_module.socketpair()
    told = ControlLink(theirs)

    async def spawn(number: int, generation: int) -> WorkerProcess:
        process = SimpleNamespace(pid=4321, returncode=0)
        worker = WorkerProcess(number, 0, process, ControlLink(ours),  # type: ignore[arg-type]
                               generation=generation)
        workers.generation = workers.serving = 2  # a reload, which took over meanwhile
        return worker

    async def nothing(worker: WorkerProcess) -> None:
        pass

    async def listen(worker: WorkerProcess) -> None:  # until its courier has sent what it has
        await trio.testing.wait_all_tasks_blocked()

    workers._spawn = spawn  # type: ignore[method-assign]
    workers._listen, workers._reap = listen, nothing  # type: ignore[method-assign]
    await workers._keep(1, 1)  # returns: it drained and exited, not started again
    with trio.fail_after(1):
        assert await told.receive() == {"type": "stop"}
    await told.aclose()
    ours.close()


async def test_a_worker_is_killed_as_silent_only_after_one_more_look(autojump_clock):
    """A leader stopped for 20 s (SIGSTOP, a paused VM) woke with its time limits passed and
    its workers' messages unread (epoll_wait returns EINTR, then nothing): it killed every
    worker as silent, cutting all clients. Past SILENT_LIMIT it looks once more
    (LOOK_AGAIN); a worker still silent then is killed."""
    import socket as socket_module

    from gateway.service.control_link import ControlLink
    from gateway.service.workers import LOOK_AGAIN, SILENT_LIMIT, WorkerProcess, Workers
    from protocols.control import encode

    workers = Workers.__new__(Workers)
    workers._take = lambda worker, message: None  # type: ignore[method-assign]
    ours, theirs = socket_module.socketpair()
    killed = []
    process = SimpleNamespace(pid=4321, returncode=None, send_signal=killed.append)
    worker = WorkerProcess(1, 0, process, ControlLink(ours))  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(workers._listen, worker)
        await trio.sleep(SILENT_LIMIT + LOOK_AGAIN / 2)
        theirs.sendall(encode({"type": "stats"}))  # read by the look: not killed
        await trio.sleep(SILENT_LIMIT)
        assert killed == []
        await trio.sleep(LOOK_AGAIN + 0.01)  # silent for good
        assert killed == [signal.SIGKILL]
        nursery.cancel_scope.cancel()
    await worker.link.aclose()
    theirs.close()


async def test_a_worker_told_to_stop_while_it_starts_exits_without_serving():
    import socket as socket_module

    from gateway.service.control_link import ControlLink
    from gateway.service.worker import kept_entries

    ours, theirs = socket_module.socketpair()
    leader, worker = ControlLink(ours), ControlLink(theirs)
    await leader.send({"type": "hello-entries", "deliveries": {"ris": [[1, "ris1"]]}})
    await leader.send({"type": "stop"})
    assert await kept_entries(worker, 2) is None
    await leader.aclose()
    assert await kept_entries(worker, 1) is None  # the leader gone
    await worker.aclose()


async def test_a_worker_waiting_for_a_row_starts_as_soon_as_an_earlier_one_ends(
        autojump_clock):
    """Reloads faster than the workers drain: the next worker waits for a row, then starts
    the moment one is free (it tried again on a growing backoff, up to 30 s late, logged as
    an error)."""
    from gateway.service.workers import WorkerProcess, Workers

    workers = Workers.__new__(Workers)
    workers.counts = SharedCounts.create(1)
    workers._rows_starting, workers._gone = set(), trio.Event()
    workers.live = [WorkerProcess(1, 0, None, None)]  # type: ignore[arg-type]  # still drains
    workers._stopping, workers.generation, workers.down, workers.serving = False, 1, {}, 1
    tries = []

    async def spawn(number: int, generation: int) -> WorkerProcess:
        tries.append(trio.current_time())
        workers._free_row()
        workers._stopping = True  # started: this test ends here
        raise OSError("not started in this test")

    workers._spawn = spawn  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(workers._keep, 1, 1)
        await trio.sleep(100)
        assert tries == [0]  # waiting, not trying again and again
        workers.live.clear()  # the earlier worker has drained and gone (_reap)
        workers._gone.set()
    assert tries == [0, 100]
    assert workers.down[1][0] == "could not be started: not started in this test"
    assert workers.not_serving()[0]["why"] == workers.down[1][0]


async def test_a_reload_whose_workers_cannot_start_returns_and_the_serving_ones_are_kept(
        autojump_clock):
    """A reload whose new workers never became ready waited for them for good: its API call
    timed out, every later reload waited behind it (a config put right could not be
    loaded), and a serving worker that died meanwhile was not started again. It returns
    after RELOAD_WAIT; the serving workers are kept (started again) until a reload whose
    workers are ready replaces them."""
    from gateway.service.workers import RELOAD_WAIT, STOP, WorkerProcess, Workers

    workers = Workers.__new__(Workers)
    workers.gateway = SimpleNamespace(config=SimpleNamespace(vips=[]), clients={})
    workers.count, workers.vip_slots, workers.generation, workers.serving = 2, {}, 0, 0
    workers.member_slots = {}
    workers.live, workers.down, workers.restarts = [], {}, 0
    workers._readiness, workers._gone, workers._stopping = trio.Event(), trio.Event(), False
    workers._news = trio.Event()
    failing = {2}  # generations whose workers cannot start
    exits: dict[int, trio.Event] = {}  # by pid: set, the process exits
    pids = iter(range(100, 1000))

    class Link:
        def __init__(self, pid: int) -> None:
            self.pid = pid

        async def send_frame(self, frame: bytes) -> None:
            if frame == STOP:  # it closes its listeners, says so, drains and exits
                worker = next(w for w in workers.live if w.process.pid == self.pid)
                worker.draining.set()
                workers._readiness.set()
                exits[self.pid].set()

    async def spawn(number: int, generation: int) -> WorkerProcess:
        if generation in failing:
            raise OSError("not started in this test")
        pid = next(pids)
        exits[pid] = trio.Event()
        worker = WorkerProcess(number, 0, SimpleNamespace(pid=pid, returncode=None),
                               Link(pid), generation=generation)  # type: ignore[arg-type]
        workers.live.append(worker)
        return worker

    async def listen(worker: WorkerProcess) -> None:
        workers._take(worker, {"type": "ready"})
        await exits[worker.process.pid].wait()

    async def reap(worker: WorkerProcess) -> None:
        worker.process.returncode = 0 if worker.retiring else -9
        workers.live.remove(worker)
        workers._gone.set()
        workers._gone = trio.Event()

    workers._spawn, workers._listen, workers._reap = spawn, listen, reap  # type: ignore
    async with trio.open_nursery() as nursery:
        workers._nursery = nursery
        assert await workers._until_ready(workers._start_generation())  # the start
        workers.serving = 1
        first = list(workers.live)
        started = trio.current_time()
        assert await workers.replace() == [1, 2]  # not ready: the reload returns
        assert trio.current_time() - started == RELOAD_WAIT
        assert not any(w.retiring for w in first) and workers.serving == 1
        assert "a reload's new worker" in workers.down[1][0]
        exits[first[0].process.pid].set()  # a serving worker dies: it is started again
        await trio.sleep(5)
        assert sorted((w.number, w.generation) for w in workers.live) == [(1, 1), (2, 1)]
        assert first[0] not in workers.live and workers.restarts == 1
        failing.clear()  # the config put right: the next reload takes over at once
        started = trio.current_time()
        assert await workers.replace() == []
        assert trio.current_time() - started < 1 and workers.serving == 3
        await trio.testing.wait_all_tasks_blocked()
        assert sorted((w.number, w.generation) for w in workers.live) == [(1, 3), (2, 3)]
        assert not workers.down
        workers._stopping = True
        for worker in workers.live:
            exits[worker.process.pid].set()


async def test_a_start_or_reload_whose_workers_do_not_become_ready_says_why(autojump_clock,
                                                                            caplog):
    """A worker that fails at every start kept a reload waiting in silence (the running
    workers serve meanwhile): every SLOW_START it says which are not ready, and why."""
    from gateway.service.workers import SLOW_START, WorkerProcess, Workers

    workers = Workers.__new__(Workers)
    workers.gateway = SimpleNamespace(config=SimpleNamespace(vips=[]), clients={})
    workers.count, workers.vip_slots, workers.generation = 2, {}, 1  # a reload's second
    workers.member_slots = {}
    workers.live, workers.down, workers._readiness = [], {}, trio.Event()
    workers._stopping, workers.serving = False, 1
    started: list[WorkerProcess] = []

    async def keep(number: int, generation: int) -> None:
        if number == 2:
            workers._went_down(2, 1, "exited (exit status 1)")
            return
        worker = WorkerProcess(number, 0, None, None,  # type: ignore[arg-type]
                               generation=generation)
        workers.live.append(worker)
        started.append(worker)
        worker.ready.set()

    workers._keep = keep  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        workers._nursery = nursery
        with trio.move_on_after(2.5 * SLOW_START):
            await workers._until_ready(workers._start_generation())
        warned = [r.getMessage() for r in caplog.records if "ready after" in r.getMessage()]
        assert warned == [f"1 of 2 worker(s) ready after {int(k * SLOW_START)}s; worker 2: "
                          f"exited (exit status 1); the earlier workers serve meanwhile"
                          for k in (1, 2)]
        late = WorkerProcess(2, 1, None, None, generation=2)  # type: ignore[arg-type]
        workers.live.append(late)
        late.ready.set()
        workers._readiness.set()
        assert await workers._until_ready(2)  # all ready: at once


# -- an idle gateway sleeps

async def test_a_worker_reports_while_there_is_news_and_otherwise_only_shows_it_lives(
        autojump_clock):
    """ReportPace: what is queued for the leader wakes the reporter, which reports
    REPORT_EVERY later and every REPORT_EVERY while news keeps coming, with its counters
    every STATS_EVERY; a look with nothing new sends the counters, and then only the
    counters go, every HEARTBEAT_EVERY (the leader's sign of life), until the next news
    (connected clients with nothing to say cost nothing)."""
    pace = ReportPace()
    sent: list[tuple[str, float]] = []

    async def report() -> None:
        sent.append(("report", trio.current_time()))

    async def stats() -> None:
        sent.append(("stats", trio.current_time()))

    def between(start: float, end: float, kind: str) -> int:
        return sum(1 for what, at in sent if what == kind and start < at <= end + 1e-9)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pace.run, report, stats)
        await trio.sleep(10.025)  # a look at 0.1 s found nothing: then the counters at 5.1 s
        assert (between(0, 10.025, "report"), between(0, 10.025, "stats")) == (1, 2)
        for _ in range(40):  # news every 50 ms for 2 s (a unit's entries)
            pace.wake()
            await trio.sleep(0.05)
        await trio.sleep(0.15)
        # a report at 10.125, ..., 12.025 s, and one more that finds nothing new (12.125 s);
        # the counters every second and with that last one
        assert between(10.025, 12.2, "report") == 21
        assert between(10.025, 12.2, "stats") == 3
        await trio.sleep(60)
        assert between(12.2, 72.025, "report") == 0
        assert between(12.2, 72.025, "stats") == int((72.025 - 12.1) // HEARTBEAT_EVERY)
        pace.wake()  # one entry (an MPPS N-CREATE in a long association, say)
        told = trio.current_time()
        await trio.sleep(1)
        assert [at - told for what, at in sent if what == "report" and at > told] == [
            pytest.approx(REPORT_EVERY), pytest.approx(2 * REPORT_EVERY)]
        nursery.cancel_scope.cancel()


async def test_the_leader_looks_at_the_state_after_news_and_otherwise_once_a_second(
        autojump_clock):
    """Workers._send_state: idle, the members' state is looked at every STATE_FALLBACK, not
    every STATE_EVERY; news (a check recorded, a worker's report) has it looked at
    STATE_EVERY later."""
    from gateway.service.workers import STATE_EVERY, STATE_FALLBACK, Workers

    workers = Workers.__new__(Workers)  # only what sending the state needs: no processes
    workers._news = trio.Event()
    looked: list[float] = []

    def push_state() -> None:
        looked.append(trio.current_time())

    def nothing() -> None:
        pass

    workers._push_state, workers._pass_entries = push_state, nothing  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(workers._send_state)
        await trio.sleep(30.5)  # news half-way between two looks
        assert len(looked) == 30 / STATE_FALLBACK
        told = trio.current_time()
        workers.news()
        await trio.sleep(2 * STATE_EVERY)
        assert looked[-1] == pytest.approx(told + STATE_EVERY)
        nursery.cancel_scope.cancel()


async def test_each_check_recorded_is_news_for_the_workers():
    """The monitor tells (its `checked`) after each check it records: with workers, the leader
    then looks at the members' state STATE_EVERY later instead of at its next fallback look,
    so a member found down reaches every worker within 50 ms."""
    from gateway.balancer import Balancer
    from health.monitor import Monitor

    vip = parse_config(_HL7_ONLY.replace("2575", str(reserved_port())).replace(
        'protocol = "hl7"', 'protocol = "hl7"\nhealth = { check = "tcp", interval = "1h" }'),
        source="t.toml").vips[0]
    pool = Pool.from_specs("hl7", [MemberSpec("ris1")], rise=1, min_up=0)
    told: list[Health] = []
    monitor = Monitor(Balancer([pool]), [vip], checked=lambda: told.append(
        pool.member("ris1").health))
    await monitor.check_once(vip, vip.members[0])  # nothing listens there: refused
    assert told == [Health.DOWN]  # told once the check was recorded


def test_a_leaders_checks_are_news_for_its_workers():
    """The gateway's monitor (at start and after each reload) tells the leader's workers."""
    from gateway.service.server import Gateway

    config = parse_config('[gateway]\nworkers = 2\nadmin = ""\n' + _HL7_ONLY, source="t.toml")
    gateway = Gateway(config)
    monitor = gateway._new_monitor(config.vips)
    assert gateway.workers is not None and not gateway.workers._news.is_set()
    assert monitor.checked is not None
    monitor.checked()
    assert gateway.workers._news.is_set()
    gateway.workers.counts.close()
    os.close(gateway.workers.counts.fd)
