"""What the gateway decides on its own (README): failover, failback, redispatch and passive
health never make things worse than a direct connection would. Each scenario was reproduced
against 0.2 (split studies, one message at two engines, an outage from one bad message, a
crash on reload); each test fails there."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys

import hl7
import pytest
import trio

from gateway.balancer import Health
from gateway.config import parse_config
from gateway.service.server import REMOVED, REPROTOCOLED
from gateway.testing.simulators.hl7_messages import make_messages
from protocols.mllp import (Header, Message, MllpReader, build_ack, frame, is_batch,
                            peek_ack, peek_batch, peek_header)
from tests.helpers.dicom_peers import Storescp, storescu, write_instances
from tests.helpers import (refused_port, start_gateway, stop_process, vip_port,
                           wait_for_health, wait_until)
from tests.helpers.hl7_senders import send_until_acked
from tests.test_limits import read_frame
from tests.test_dicom_vip import dicom_vip
from tests.test_hl7_vip import hl7_vip

TCP_CHECK = 'health = { check = "tcp", interval = "1h" }'


# -- DICOM: a study stays on one archive

async def test_a_study_stays_on_one_archive_while_its_primary_is_frozen(nursery, tmp_path,
                                                                        caplog):
    """0.2 sent images 5-6 of a 12-image study to the standby while the primary was frozen,
    then the rest back: two archives with halves of one study. Now the modality is refused
    (transient) until the primary answers again, and every image lands on the primary."""
    primary = Storescp(tmp_path / "primary", "PACS1").start()
    standby = Storescp(tmp_path / "standby", "PACS2").start()
    try:
        gateway = await start_gateway(nursery, dicom_vip(
            [("pacs1", primary.port, "PACS1"), ("pacs2", standby.port, "PACS2")],
            extra='mode = "failover"',
            health='health = { check = "dicom-echo", interval = "10s", timeout = "2s" }',
            timeout="2s"))
        port = vip_port(gateway, "pacs")
        study = sorted(write_instances(tmp_path / "study", 12))
        refused = 0
        async with trio.open_nursery() as freezer:
            for number, image in enumerate(study, 1):
                if number == 5:  # the primary freezes for 3.5 s after image 4
                    os.kill(primary.process.pid, signal.SIGSTOP)
                    freezer.start_soon(_thaw_after, primary, 3.5)
                while True:  # a modality: one association per image, retried when refused
                    stored = await storescu(port, [image], "ARCHIVE", "CT01")
                    if stored.clean:
                        break
                    assert "Rejected Transient" in stored.stderr, stored.stderr
                    refused += 1
                    await trio.sleep(0.5)
        assert (primary.stored(), standby.stored()) == (12, 0)
        assert refused >= 1  # the frozen primary was waited for, not replaced
        assert gateway.balancer.pool("pacs").member("pacs1").health is Health.UP
        assert ("member=pacs1 calling_ae='CT01' (affinity: pacs1) failed: no answer to the "
                "A-ASSOCIATE-RQ within 2s; not moved: its member is up and keeps it "
                "(affinity)") in caplog.text
    finally:
        primary.stop()
        standby.stop()


async def _thaw_after(archive: Storescp, seconds: float) -> None:
    await trio.sleep(seconds)
    os.kill(archive.process.pid, signal.SIGCONT)


async def test_a_calling_ae_moves_once_its_member_is_down_and_stays_for_its_window(
        nursery, pacs, tmp_path):
    pacs1, pacs2 = pacs("PACS1"), pacs("PACS2")
    gateway = await start_gateway(nursery, dicom_vip(
        [("pacs1", pacs1.port, "PACS1"), ("pacs2", pacs2.port, "PACS2")],
        extra="error_limit = 2",
        health='health = { check = "dicom-echo", interval = "200ms", timeout = "5s", '
               'rise = 1, fall = 1 }'))
    port, pool = vip_port(gateway, "pacs"), gateway.balancer.pool("pacs")
    files = sorted(write_instances(tmp_path / "files", 6))
    assert (await storescu(port, files[:1], "ARCHIVE", "CT01")).clean
    home = pool.persisted_member("CT01")
    other = "pacs2" if home == "pacs1" else "pacs1"
    archives = {"pacs1": pacs1, "pacs2": pacs2}
    assert (await storescu(port, files[1:2], "ARCHIVE", "MR01")).clean  # balanced elsewhere
    assert pool.persisted_member("MR01") == other
    archives[home].stop()
    await wait_for_health(pool, home, Health.DOWN)
    assert (await storescu(port, files[2:4], "ARCHIVE", "CT01")).clean  # moved, and
    assert pool.persisted_member("CT01") == other
    archives[home].restart()
    await wait_for_health(pool, home, Health.UP)
    assert (await storescu(port, files[4:], "ARCHIVE", "CT01")).clean  # stays for its window
    assert archives[other].stored_count() == 5


def _balancer_pool(**settings):
    from gateway.balancer import MemberSpec, Pool

    pool = Pool.from_specs("pacs", [MemberSpec("pacs1"), MemberSpec("pacs2")],
                           mode="failover", persistence_method="table",
                           persistence_timeout=1800.0, hold_persisted=True, fall=1, rise=1,
                           **settings)
    for member in pool.members:
        pool.record_check(member.name, True, "ok", 0.001, 0.0)
    return pool


def test_failback_waits_failback_after_and_each_calling_ae_its_study_window():
    pool = _balancer_pool(failback_after=300.0)
    assert pool.pick("CT01", now=1.0).name == "pacs1"
    pool.report_success(pool.member("pacs1"), "CT01")
    pool.record_check("pacs1", False, "timeout", 1.0, 10.0)  # down
    assert pool.pick("CT01", now=11.0).name == "pacs2"  # moved: its member is down
    switch = pool.take_switch()
    assert (switch.previous, switch.member, switch.why) == ("pacs1", "pacs2", "pacs1 is down")
    pool.report_success(pool.member("pacs2"), "CT01")
    pool.record_check("pacs1", True, "ok", 0.001, 20.0)  # up again at 20 s
    assert pool.standby_active() and pool.failback_at(21.0) == 320.0
    assert pool.pick("MR01", now=319.0).name == "pacs2"  # not before failback_after
    assert pool.pick("US01", now=320.0).name == "pacs1"  # a new calling AE: failed back
    assert pool.take_switch().why.startswith("failback: up for 300s")
    assert pool.pick("CT01", now=400.0).name == "pacs2"  # mid-study: never moved back
    assert pool.pick("MR01", now=401.0).name == "pacs2"
    assert pool.pick("CT01", now=400.0 + 1801.0).name == "pacs1"  # its window ran out


def test_manual_failback_waits_for_the_operator():
    pool = _balancer_pool(failback_manual=True)
    assert pool.pick("CT01", now=1.0).name == "pacs1"
    pool.record_check("pacs1", False, "timeout", 1.0, 2.0)
    assert pool.pick("CT01", now=3.0).name == "pacs2"
    pool.record_check("pacs1", True, "ok", 0.001, 4.0)
    assert pool.pick("MR01", now=100_000.0).name == "pacs2" and pool.failback_at(5.0) is None
    assert pool.fail_back(100_001.0) == "pacs1"
    assert pool.pick("US01", now=100_002.0).name == "pacs1"
    assert not pool.standby_active()


def test_the_hold_applies_to_a_served_key_whose_member_is_up_and_ready():
    from gateway.balancer import AdminState, NoMemberAvailable, NoMemberReason

    pool = _balancer_pool()
    pool.mode = "balance"
    member = pool.pick("CT01", now=1.0)
    # A first association that fails is moved: nothing of its study is anywhere yet.
    assert pool.pick("CT01", now=1.0, exclude={member.name}).name != member.name
    pool.report_success(pool.member("pacs2"), "CT01")
    home = pool.persisted_member("CT01")
    with pytest.raises(NoMemberAvailable) as held:
        pool.pick("CT01", now=2.0, exclude={home})
    assert held.value.reason is NoMemberReason.HELD and pool.held_back == 1
    pool.set_admin_state(home, AdminState.DRAIN)  # drained: served if it answers, else moved
    assert pool.pick("CT01", now=3.0).name == home
    assert pool.pick("CT01", now=3.0, exclude={home}).name != home


async def test_manual_failback_through_the_admin_api_and_ctl_and_the_status_page(nursery,
                                                                                  tmp_path,
                                                                                  caplog):
    from tests.helpers import Backend

    pacs = [await Backend(name, greet=False).start(nursery) for name in ("p1", "p2")]
    config = tmp_path / "site.toml"
    config.write_text("""
[gateway]
admin = "127.0.0.1:0"
audit = ""
""" + dicom_vip([("pacs1", pacs[0].port, "P1"), ("pacs2", pacs[1].port, "P2")],
                extra='mode = "failover"\nfailback = "manual"',
                health='health = { check = "tcp", interval = "100ms", rise = 1, fall = 1 }'))
    gateway = await start_gateway(nursery, config.read_text(), admin=True)
    pool = gateway.balancer.pool("pacs")
    pool.pick("CT01", now=trio.current_time())
    pacs[0].stop()
    await wait_for_health(pool, "pacs1", Health.DOWN)
    pool.pick("MR01", now=trio.current_time())  # the standby takes over
    await pacs[0].start()
    await wait_for_health(pool, "pacs1", Health.UP)
    assert ("vip=pacs member=pacs1 is up; pacs2 keeps the new clients until an operator fails "
            "back (failback = \"manual\": gateway ctl failback pacs)") in caplog.text
    admin = ["--admin", f"http://{gateway.admin_address}"]
    status = await trio.run_process([sys.executable, "-m", "gateway", "ctl", *admin, "status"],
                                    capture_stdout=True, env={**os.environ, "COLUMNS": "200"})
    assert b"pacs: standby pacs2 active since" in status.stdout
    assert b"failback manual (gateway ctl failback pacs)" in status.stdout
    page = await trio.run_process(["curl", "-s", f"http://{gateway.admin_address}/"],
                                  capture_stdout=True)
    assert b"standby pacs2 active since" in page.stdout
    metrics = await trio.run_process(["curl", "-s", f"http://{gateway.admin_address}/metrics"],
                                     capture_stdout=True)
    assert b'medgate_vip_standby_active{vip="pacs"} 1.0' in metrics.stdout
    back = await trio.run_process([sys.executable, "-m", "gateway", "ctl", *admin, "failback",
                                   "pacs"], capture_stdout=True)
    assert back.stdout == b"pacs: pacs1 takes the new clients (was pacs2)\n"
    assert pool.pick("US01", now=trio.current_time()).name == "pacs1"
    assert not pool.standby_active()


async def test_a_member_full_for_two_modalities_is_marked_down_but_one_modality_is_not_enough(
        nursery, pacs, tmp_path):
    """0.2 took a member down after 3 "out of resources" in a row from anyone: one modality's
    retries of one study were enough. Now it takes two calling AEs within status_window."""
    full, good = pacs("FULL", store_status=0xA700), pacs("GOOD")
    gateway = await start_gateway(nursery, dicom_vip(
        [("full", full.port, "FULL"), ("good", good.port, "GOOD")], health=TCP_CHECK,
        extra='mode = "failover"'))
    pool, port = gateway.balancer.pool("pacs"), vip_port(gateway, "pacs")
    image = sorted(write_instances(tmp_path / "files", 1))
    for _ in range(6):
        assert not (await storescu(port, image, "VIP", "CT1")).clean
    assert pool.member("full").health is Health.UP
    assert not (await storescu(port, image, "VIP", "MR1")).clean
    assert pool.member("full").health is Health.DOWN


# -- HL7: a message is never processed by two engines

class Engine:
    """An MLLP receiving engine: records each message's MSH-10, answers AA; its first
    `slow_first` messages after `delay` seconds; a message whose MSH-10 starts with one of
    `rejects`' keys with that (MSA-1, ERR-3 code)."""

    def __init__(self, name: str, *, slow_first: int = 0, delay: float = 0.0,
                 rejects: dict[str, tuple[str, str]] | None = None) -> None:
        self.name = name
        self.slow_first = slow_first
        self.delay = delay
        self.rejects = rejects or {}
        self.received: list[str] = []
        self.port = 0
        self._ids = itertools.count(1)

    async def start(self, nursery: trio.Nursery) -> Engine:
        listeners = await nursery.start(trio.serve_tcp, self._handle, 0)
        self.port = listeners[0].socket.getsockname()[1]
        return self

    async def _handle(self, stream: trio.SocketStream) -> None:
        reader = MllpReader()
        try:
            while data := await stream.receive_some(65536):
                reader.feed(data)
                while isinstance(event := reader.next_event(), Message):
                    header = (peek_batch(event.payload).header if is_batch(event.payload)
                              else peek_header(event.payload))
                    self.received.append(header.control_id)
                    if len(self.received) <= self.slow_first:
                        await trio.sleep(self.delay)
                    await stream.send_all(frame(self.answer(header)))
        except trio.BrokenResourceError:
            pass

    def answer(self, header: Header) -> bytes:
        code, error = next((answer for prefix, answer in self.rejects.items()
                            if header.control_id.startswith(prefix)), ("AA", ""))
        ack = build_ack(header, code, control_id=f"{self.name}-{next(self._ids)}",
                        timestamp="20261204120000", text=f"{self.name}: {code}",
                        error_code=error)
        return ack if error else ack.split(b"\rERR|")[0] + b"\r"  # no error code at all

    def has(self, control_id: str) -> bool:
        return control_id in self.received


async def test_a_slow_engine_never_leaves_a_message_at_two_engines(nursery, tmp_path):
    """0.2: engine1 answered after the ACK timeout, so the message went to engine2 as well:
    both had it, neither could de-duplicate. Now it is in doubt: the sender's connection is
    closed, its resend goes to engine1 again, which can tell the duplicate."""
    engine1 = await Engine("E1", slow_first=2, delay=1.5).start(nursery)
    engine2 = await Engine("E2").start(nursery)
    audit = tmp_path / "audit.jsonl"
    config = f'[gateway]\naudit = "{audit}"\n' + hl7_vip(
        [("engine1", engine1.port), ("engine2", engine2.port)], extra='mode = "failover"',
        health=TCP_CHECK, ack_timeout="1s")
    (tmp_path / "site.toml").write_text(config)
    gateway = await start_gateway(nursery, config)
    messages = make_messages(4, prefix="DUP")
    sent = await send_until_acked(vip_port(gateway, "hl7"), messages, pause=0.3)
    control_ids = [peek_header(m).control_id for m in messages]
    assert sent.acked == control_ids and sent.closed >= 2 and not sent.naks
    assert not any(engine2.has(control_id) for control_id in control_ids)
    assert engine1.received[:3] == ["DUP000001", "DUP000001", "DUP000001"]  # resent to it
    assert gateway.balancer.pool("hl7").member("engine1").health is Health.UP
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    first = [r for r in records if r.get("control_id") == "DUP000001"]
    assert first[0]["in_doubt"] == "engine1" and first[0]["told"] == "connection closed"
    assert first[0]["reason"].startswith("in doubt at engine1: no ACK within 1s")
    assert first[-1]["told"].startswith("AA from engine1") and first[-1]["resent_to"] == "engine1"
    trace = await trio.run_process(
        [sys.executable, "-m", "gateway", "trace", "--hl7", "-c", str(tmp_path / "site.toml"),
         "DUP000001"], capture_stdout=True, env={**os.environ, "COLUMNS": "250"})
    text = trace.stdout.decode()
    assert "engine1: in doubt: no ACK within 1s" in text and "engine2" not in text


async def test_with_in_doubt_next_member_the_message_goes_on_and_nak_answers_say_so(nursery):
    engine1 = await Engine("E1", slow_first=1, delay=1.5).start(nursery)
    engine2 = await Engine("E2").start(nursery)
    moving = await start_gateway(nursery, hl7_vip(
        [("engine1", engine1.port), ("engine2", engine2.port)],
        extra='mode = "failover"\nin_doubt = "next-member"', health=TCP_CHECK,
        ack_timeout="1s"))
    sent = await send_until_acked(vip_port(moving, "hl7"), make_messages(1, prefix="NX"))
    assert sent.acked == ["NX000001"] and sent.resends == 0  # the 0.2 behaviour, on demand
    assert engine1.has("NX000001") and engine2.has("NX000001")

    engine3 = await Engine("E3", slow_first=1, delay=1.5).start(nursery)
    naking = await start_gateway(nursery, hl7_vip(
        [("engine3", engine3.port), ("engine2", engine2.port)],
        extra='mode = "failover"\nin_doubt_answer = "nak"', health=TCP_CHECK,
        ack_timeout="1s"))
    sent = await send_until_acked(vip_port(naking, "hl7"), make_messages(1, prefix="NK"))
    (control_id, nak), = sent.naks
    ack = peek_ack(nak)
    assert (control_id, ack.code, ack.error_code) == ("NK000001", "AE", "207")
    assert "in doubt at engine3" in ack.text and not engine2.has("NK000001")


async def test_a_batch_written_whole_is_in_doubt_as_a_message_is(nursery):
    from tests.test_hl7_depth import batch

    closer = await Engine("E1", slow_first=1, delay=2.0).start(nursery)
    witness = await Engine("E2").start(nursery)
    gateway = await start_gateway(nursery, hl7_vip(
        [("ris1", closer.port), ("ris2", witness.port)], extra='mode = "failover"',
        health=TCP_CHECK, ack_timeout="500ms"))
    stream = await trio.open_tcp_stream("127.0.0.1", vip_port(gateway, "hl7"))
    await stream.send_all(frame(batch("B9", "BD")))
    with trio.fail_after(10):
        assert await stream.receive_some(1000) == b""  # closed without an answer
    assert witness.received == []  # 0.2 sent the unanswered batch to ris2


async def test_a_poison_message_resent_twelve_times_takes_no_member_down(nursery):
    """0.2: both engines answered AR (ERR-3 103: table value not found) to one message, its
    sender resent it 12 times, both were marked down and every other sender got "no member
    is up". A content error says nothing of the engine; a resend counts once anyway."""
    poison = {"POISON": ("AR", "103^Table value not found^HL70357")}
    engines = [await Engine(f"E{n}", rejects=poison).start(nursery) for n in (1, 2)]
    gateway = await start_gateway(nursery, hl7_vip(
        [("engine1", engines[0].port), ("engine2", engines[1].port)], health=TCP_CHECK,
        extra='persistence = { key = "none" }'))
    port, pool = vip_port(gateway, "hl7"), gateway.balancer.pool("hl7")
    (message,) = make_messages(1, prefix="POISON")
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    for _ in range(12):
        await stream.send_all(frame(message))
        assert peek_ack((await read_frame(stream))).code == "AR"
    good = await send_until_acked(port, make_messages(6, prefix="GOOD"))
    assert good.acked == [f"GOOD{n:06d}" for n in range(1, 7)] and good.resends == 0
    assert all(member.health is Health.UP and member.failed == 0 for member in pool.members)


async def test_an_engine_that_rejects_everything_is_marked_down_but_never_the_last(nursery,
                                                                                   caplog):
    everything = {"": ("AR", "")}  # AR without an error code: the engine itself is unwell
    bad = await Engine("BAD", rejects=everything).start(nursery)
    internal = await Engine("INT", rejects={"": ("AR", "207^Application internal error"
                                                      "^HL70357")}).start(nursery)
    config = '[gateway]\nadmin = "127.0.0.1:0"\n' + hl7_vip(
        [("bad", bad.port), ("internal", internal.port)], health=TCP_CHECK,
        extra='persistence = { key = "none" }')
    gateway = await start_gateway(nursery, config, admin=True)
    pool = gateway.balancer.pool("hl7")
    stream = await trio.open_tcp_stream("127.0.0.1", vip_port(gateway, "hl7"))
    for message in make_messages(12, prefix="ALL"):
        await stream.send_all(frame(message))
        assert peek_ack(await read_frame(stream)).code == "AR"
    # One went down after error_limit; the other, the last one up, is kept up (min_up = 1).
    assert sorted(member.health.value for member in pool.members) == ["down", "up"]
    kept = next(member for member in pool.members if member.health is Health.UP)
    assert kept.floor_held.startswith("3 failure statuses in a row")
    assert f"member={kept.name} stays up: kept up by min_up = 1" in caplog.text
    metrics = await trio.run_process(["curl", "-s", f"http://{gateway.admin_address}/metrics"],
                                     capture_stdout=True)
    held = dict(re.findall(r'^medgate_member_held_up\{member="(\w+)",vip="hl7"\} (\S+)$',
                           metrics.stdout.decode(), re.MULTILINE))
    assert held == {kept.name: "1.0", "bad": "0.0"}
    page = await trio.run_process(["curl", "-s", f"http://{gateway.admin_address}/"],
                                  capture_stdout=True)
    assert b"kept up by min_up" in page.stdout


# -- HL7: order per patient by default, merges by the prior patient

def _merge(control_id: str, patient: str, prior: str) -> bytes:
    return (f"MSH|^~\\&|HIS|HOSP|RIS|HOSP|20261204120000||ADT^A40^ADT_A39|{control_id}|P|2.5\r"
            f"EVN|A40|20261204120000\rPID|1||{patient}^^^HOSP^MR||TEST^PATIENT\r"
            f"MRG|{prior}^^^HOSP^MR\r").encode()


async def test_patients_keep_their_order_by_default_and_a_merge_follows_the_prior_patient(
        nursery, caplog):
    caplog.set_level(logging.INFO, logger="medgate")
    engines = [await Engine(f"E{n}").start(nursery) for n in (1, 2, 3)]
    gateway = await start_gateway(nursery, hl7_vip(
        [(f"ris{n}", engine.port) for n, engine in enumerate(engines, 1)], health=TCP_CHECK))
    assert gateway.config.vips[0].persistence.key == "pid-3"  # no persistence in the config
    assert "persistence by pid-3 (rendezvous hash) as no persistence is set" in caplog.text
    messages = make_messages(40, patients=6, prefix="ORD")
    sent = await send_until_acked(vip_port(gateway, "hl7"), messages)
    assert sent.resends == 0
    holders: dict[str, set[str]] = {}
    for message in messages:
        header = peek_header(message)
        holder = next(e.name for e in engines if e.has(header.control_id))
        holders.setdefault(header.patient_id, set()).add(holder)
    assert all(len(names) == 1 for names in holders.values())  # each patient on one engine
    assert len({name for names in holders.values() for name in names}) >= 2  # and spread
    # A merge: its PID-3 hashes to one engine, its MRG-1 (the prior patient) to another.
    pool = gateway.balancer.pool("hl7")
    prior = "ORDPAT00001"
    patient = next(f"NEW{n}" for n in range(1000) if pool.hash_choice(f"NEW{n}^^^HOSP^MR").name
                   != pool.hash_choice(f"{prior}^^^HOSP^MR").name)
    sent = await send_until_acked(vip_port(gateway, "hl7"), [_merge("MRG1", patient, prior)])
    prior_engine = next(iter(holders[f"{prior}^^^HOSP^MR"]))
    assert next(e.name for e in engines if e.has("MRG1")) == prior_engine
    assert "MRG-1 and PID-3 map to different members" in caplog.text


# -- The gateway's own NAK says it is the gateway

@pytest.mark.parametrize("version", ["2.5.1", "2.3"])
async def test_the_gateways_nak_names_the_gateway_and_the_reason_as_its_version_has_it(
        nursery, version):
    gateway = await start_gateway(nursery, hl7_vip(
        [("ris1", refused_port())], health=TCP_CHECK,
        extra='hl7_application = "MEDGATE"\nhl7_facility = "GW-NORTH"'))
    message = (f"MSH|^~\\&|HIS|HOSP|RECVAPP|RFAC|20261204||ADT^A01|ID{version}|P|{version}\r"
               "PID|1||P1^^^HOSP^MR\r").encode()
    stream = await trio.open_tcp_stream("127.0.0.1", vip_port(gateway, "hl7"))
    await stream.send_all(frame(message))
    nak = hl7.parse((await read_frame(stream)).decode())  # python-hl7 reads it
    msh = nak.segment("MSH")
    assert [str(msh[n]) for n in (3, 4, 5, 6)] == ["MEDGATE", "GW-NORTH", "HIS", "HOSP"]
    assert str(nak["MSA.1"]) == "AR" and str(nak["MSA.2"]) == f"ID{version}"
    err = nak.segment("ERR")
    if version == "2.5.1":  # ERR-3, table 0357
        assert str(err[3]) == "207^Application internal error^HL70357"
    else:  # ERR-3 is not defined before 2.5: MSA-6 and ERR-1's fourth component
        assert str(nak.segment("MSA")[6]) == "207^Application internal error^HL70357"
        assert str(err[1]) == "^^^207&Application internal error&HL70357"
    assert "no member is up" in str(nak["MSA.3"])


async def test_by_default_the_nak_is_from_medgate_at_this_host(nursery):
    import socket

    gateway = await start_gateway(nursery, hl7_vip([("ris1", refused_port())], health=TCP_CHECK))
    stream = await trio.open_tcp_stream("127.0.0.1", vip_port(gateway, "hl7"))
    await stream.send_all(frame(make_messages(1)[0]))  # MSH-3/4 HIS/HOSP to RIS/HOSP
    msh = hl7.parse((await read_frame(stream)).decode()).segment("MSH")
    assert [str(msh[n]) for n in (3, 4, 5, 6)] == ["MEDGATE", socket.gethostname(), "HIS",
                                                     "HOSP"]


async def test_when_none_up_close_closes_instead_of_a_nak(nursery):
    gateway = await start_gateway(nursery, hl7_vip(
        [("ris1", refused_port())], health=TCP_CHECK, extra='when_none_up = "close"'))
    stream = await trio.open_tcp_stream("127.0.0.1", vip_port(gateway, "hl7"))
    await stream.send_all(frame(make_messages(1)[0]))
    with trio.fail_after(10):
        assert await stream.receive_some(1000) == b""


# -- Reloads never stop the gateway

def _reload_config(members: dict[str, int]) -> str:
    return '[gateway]\nadmin = ""\naudit = ""\n' + hl7_vip(
        list(members.items()),
        health='health = { check = "hl7-ack", interval = "100ms", timeout = "2s" }',
        extra='persistence = { key = "none" }')


async def test_a_reload_that_removes_a_member_whose_check_is_running_keeps_serving(nursery,
                                                                                   hl7_receiver):
    """0.2: the old monitor's check of the removed member reported on it: KeyError in the
    pool, the services nursery died, the gateway exited."""
    good, hanging = hl7_receiver("RIS1"), hl7_receiver("HANG", mode="hang")
    text = _reload_config({"ris1": good.port, "slow": hanging.port})
    gateway = await start_gateway(nursery, text)
    # The loop's check of "slow" is running (it takes 2 s to time out) once its message came.
    await hanging.wait_received(lambda ids: len(ids) >= 1)
    # "slow" goes; "slow2" comes, whose first check (2 s), waited for by the reload, outlasts
    # the old check of "slow".
    await gateway.reload(parse_config(_reload_config({"ris1": good.port, "slow2": hanging.port}),
                                      source="test.toml"))
    sent = await send_until_acked(vip_port(gateway, "hl7"), make_messages(2, prefix="AFTER"))
    assert sent.acked == ["AFTER000001", "AFTER000002"]


@pytest.mark.parametrize("change", ["removed", "protocol"])
async def test_a_vip_a_reload_removes_closes_its_clients_once_they_are_idle(nursery,
                                                                             hl7_receiver,
                                                                             caplog, change):
    """An HL7 sender keeps its connection for days: a VIP removed by a reload, or given
    another protocol (its old pool no longer checked), must not go on serving it, unchecked
    and unseen. Its idle clients are closed at once; one with a message under way gets its
    ACK first, then is closed (as at a drain)."""
    caplog.set_level(logging.INFO, logger="medgate")
    engine = hl7_receiver("RIS1")
    kept = ('[[vip]]\nname = "web"\nprotocol = "tcp"\nlisten = "127.0.0.1:0"\n'
            f'member = [{{ name = "web1", address = "127.0.0.1:{engine.port}" }}]\n')
    text = _reload_config({"ris1": engine.port}) + kept
    if change == "protocol":  # the same name, a TCP VIP now
        kept += kept.replace('"web"', '"hl7"')
    gateway = await start_gateway(nursery, text)
    port = vip_port(gateway, "hl7")
    idle = await trio.open_tcp_stream("127.0.0.1", port)
    busy = await trio.open_tcp_stream("127.0.0.1", port)
    first, under_way = make_messages(2, prefix="GONE")
    await idle.send_all(frame(first))
    assert b"MSA|AA|GONE000001" in await read_frame(idle)
    await busy.send_all(frame(under_way)[:20])
    await gateway.reload(parse_config('[gateway]\nadmin = ""\naudit = ""\n' + kept,
                                      source="test.toml"))
    with trio.fail_after(10):
        assert await idle.receive_some(100) == b""
    await busy.send_all(frame(under_way)[20:])
    assert b"MSA|AA|GONE000002" in await read_frame(busy)
    with trio.fail_after(10):
        assert await busy.receive_some(100) == b""
    why = REMOVED if change == "removed" else REPROTOCOLED
    assert caplog.text.count(f"closed: {why}") == 2
    if change == "protocol":  # the VIP's new clients are the new handler's, and stay
        web = await trio.open_tcp_stream("127.0.0.1", vip_port(gateway, "hl7"))
        await web.send_all(frame(make_messages(1, prefix="TCP")[0]))
        assert b"MSA|AA|TCP000001" in await read_frame(web)
        assert gateway.admission.clients["hl7"].slots
        await web.aclose()
    for stream in (idle, busy):
        await stream.aclose()


def test_a_sighup_during_a_reload_is_one_more_reload_never_the_end(tmp_path):
    """0.2: a SIGHUP that came while a reload waited for its first checks killed the process
    (exit by signal 1, nothing logged)."""
    hang = subprocess.Popen([sys.executable, "-c", _HANGING_RECEIVER], stdout=subprocess.PIPE,
                            start_new_session=True)
    try:
        hang_port = int(hang.stdout.readline())
        config = tmp_path / "site.toml"
        ok_port = refused_port()  # nothing answers there: the reloads are what is tested
        config.write_text(_reload_config({"ris1": ok_port, "slow": hang_port}))
        log = tmp_path / "gateway.log"
        process = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(config)],
                                   stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
                                   start_new_session=True)
        try:
            wait_until(lambda: "listening on" in log.read_text(), timeout=30,
                       what="gateway listening")
            # Remove "slow" (its check is running), add "slow2" (its first check takes 2 s).
            config.write_text(_reload_config({"ris1": ok_port, "slow2": hang_port}))
            process.send_signal(signal.SIGHUP)
            wait_until(lambda: "SIGHUP received" in log.read_text(), what="the first reload")
            process.send_signal(signal.SIGHUP)  # while the first waits for its checks
            wait_until(lambda: log.read_text().count("reloaded ") == 2, timeout=30,
                       what="two reloads")
            assert process.poll() is None
            process.send_signal(signal.SIGTERM)
            assert process.wait(30) == 0
            assert "gateway stopped" in log.read_text()
        finally:
            stop_process(process)
    finally:
        stop_process(hang)


_HANGING_RECEIVER = """
import socket, sys
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen(64)
print(server.getsockname()[1], flush=True)
held = []
while True:  # takes connections, never answers
    held.append(server.accept()[0])
"""


# -- What the balancer remembers survives a restart

def test_the_affinities_are_copied_at_once_and_formatted_later(tmp_path):
    """`take` copies on the event loop what `save` formats and writes in a worker thread:
    what the balancer learns in between is not in the file, and a table entry used again
    meanwhile counts as used when the copy was taken."""
    from gateway.records.affinity import AffinityStore
    from gateway.balancer import Balancer, MemberSpec, Pool

    pool = Pool.from_specs("dicom", [MemberSpec("pacs1"), MemberSpec("pacs2")],
                           persistence_method="table", persistence_timeout=100.0,
                           resend_memory=10)
    for member in pool.members:
        pool.record_check(member.name, True, "ok", 0.0, 0.0)
    kept = pool.pick("CT01", now=1.0).name
    pool.delivered(0x1, "pacs2", 2.0)
    store = AffinityStore(str(tmp_path))
    taken = store.take(Balancer([pool]), 5.0)
    pool.pick("CT01", now=7.0)
    pool.pick("MR01", now=7.0)
    pool.delivered(0x2, "pacs1", 7.0)
    store.save(taken)
    saved = json.loads((tmp_path / "affinity.json").read_text())["vips"]["dicom"]
    assert saved == {"persistence": [["CT01", kept, 0.0]],
                     "deliveries": [["0000000000000001", "pacs2", 3.0]]}


async def test_study_affinity_and_resend_memory_survive_a_restart(nursery, pacs, tmp_path):
    from gateway.records.affinity import AffinityStore
    from gateway.balancer import Balancer, MemberSpec, Pool

    pool = Pool.from_specs("pacs", [MemberSpec("pacs1"), MemberSpec("pacs2")],
                           mode="failover", persistence_method="table",
                           persistence_timeout=100.0, resend_memory=10)
    for member in pool.members:
        pool.record_check(member.name, True, "ok", 0.0, 0.0)
    pool.pick("OLD", now=-90.0)
    pool.pick("CT01", now=0.0)
    pool.delivered(0xABCDEF, "pacs2", 0.0)
    pool.adopt_active("pacs2", 0.0)
    store = AffinityStore(str(tmp_path))
    store.write(store.snapshot(Balancer([pool]), 5.0))
    fresh = Pool.from_specs("pacs", [MemberSpec("pacs1"), MemberSpec("pacs2")],
                            mode="failover", persistence_method="table",
                            persistence_timeout=100.0, resend_memory=10)
    for member in fresh.members:
        fresh.record_check(member.name, True, "ok", 0.0, 1000.0)
    assert store.load(Balancer([fresh]), 1000.0) == 3  # CT01, OLD and the delivery
    assert fresh.persisted_member("CT01") == "pacs1" and fresh.active == "pacs2"
    assert fresh.resend_member(0xABCDEF, 1000.0) == "pacs2"
    assert fresh.expire(1050.0) == 1 and fresh.persisted_member("OLD") is None  # kept its age
    # And a gateway keeps it across a restart.
    archive1, archive2 = pacs("PACS1"), pacs("PACS2")
    config = f'[gateway]\nstate_dir = "{tmp_path / "state"}"\naudit = ""\n' + dicom_vip(
        [("pacs1", archive1.port, "PACS1"), ("pacs2", archive2.port, "PACS2")],
        health=TCP_CHECK)
    images = sorted(write_instances(tmp_path / "images", 1))
    async with trio.open_nursery() as first_run:
        first = await start_gateway(first_run, config)
        for calling in ("CT01", "MR01", "US01"):
            assert (await storescu(vip_port(first, "pacs"), images, "VIP", calling)).clean
        kept = {c: first.balancer.pool("pacs").persisted_member(c) for c in ("CT01", "MR01")}
        first.stop()
    second = await start_gateway(nursery, config)
    assert {c: second.balancer.pool("pacs").persisted_member(c) for c in kept} == kept


def test_the_status_line_says_since_when_the_standby_is_active_and_when_it_fails_back():
    from gateway.service.pages import failover_line

    state = {"active": "pacs2", "since": "2026-12-04T14:02:11", "standby_active": True,
             "failback": "auto", "failback_at": "2026-12-04T14:07:30"}
    vip = {"name": "pacs", "failover": state}
    assert failover_line(vip) == "standby pacs2 active since 14:02, failback from 14:07"
    assert failover_line({**vip, "failover": {**state, "failback_at": None}}) == (
        "standby pacs2 active since 14:02")
    assert failover_line({**vip, "failover": {**state, "standby_active": False}}) == ""
    assert failover_line({"name": "web", "failover": None}) == ""
