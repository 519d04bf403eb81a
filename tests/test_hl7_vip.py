"""The HL7 VIP with python-hl7's mllp_send (an independent client) and simulated receivers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import hl7
import pytest
import trio

from gateway.balancer import Health
from gateway.testing.simulators.hl7_messages import make_messages
from protocols.mllp import END, SB, frame, peek_header
from tests.helpers import eventually, start_gateway, stop_process, vip_port, wait_for_health
from tests.helpers.hl7_senders import send_until_acked
from tests.test_admin import get

ACK_LINE = re.compile(rb"MSH\|[^\r]*\|ACK[^|]*\|([^|]*)\|[^\r]*\rMSA\|(\w\w)\|([^|\r]*)")


def hl7_vip(members: list[tuple[str, int]], extra: str = "", health: str = "",
            member_extra: dict[str, str] | None = None, ack_timeout: str = "1s") -> str:
    health = health or ('health = { check = "hl7-ack", interval = "200ms", timeout = "1s", '
                        'rise = 2, fall = 2 }')
    text = f"""
[[vip]]
name = "hl7"
protocol = "hl7"
listen = "127.0.0.1:0"
connect_timeout = "1s"
ack_timeout = "{ack_timeout}"
{health}
{extra}
"""
    for name, port in members:
        text += f"""
[[vip.member]]
name = "{name}"
address = "127.0.0.1:{port}"
{(member_extra or {}).get(name, "")}
"""
    return text


def mllp_file(folder: Path, messages: list[bytes]) -> Path:
    path = folder / "messages.mllp"
    path.write_bytes(b"".join(frame(m) for m in messages))
    return path


async def mllp_send_output(port: int, path: Path, timeout: float = 60) -> bytes:
    """What python-hl7's mllp_send (no timeout of its own, exit 0 whatever the ACK says)
    prints: each answer, raw."""
    with trio.fail_after(timeout):
        result = await trio.run_process(["mllp_send", "-p", str(port), "-f", str(path),
                                         "127.0.0.1"], capture_stdout=True, capture_stderr=True,
                                        check=False)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


async def mllp_send(port: int, path: Path, timeout: float = 60) -> list[tuple[str, str, str]]:
    """python-hl7's mllp_send: (ACK's own MSH-10, MSA-1, MSA-2) per answer."""
    return [(m[0].decode(), m[1].decode(), m[2].decode())
            for m in ACK_LINE.findall(await mllp_send_output(port, path, timeout))]


async def test_one_connection_is_balanced_per_message_by_weight(nursery, hl7_receiver, tmp_path):
    ris1, ris2 = hl7_receiver("RIS1"), hl7_receiver("RIS2")
    gateway = await start_gateway(nursery, hl7_vip(
        [("ris1", ris1.port), ("ris2", ris2.port)],
        member_extra={"ris1": "weight = 300", "ris2": "weight = 100"},
        extra='persistence = { key = "none" }'))  # each message its own pick, not per patient
    messages = make_messages(40, prefix="W")
    acks = await mllp_send(vip_port(gateway, "hl7"), mllp_file(tmp_path, messages))
    assert [(code, answered) for _, code, answered in acks] == [
        ("AA", peek_header(m).control_id) for m in messages]
    health_checks = {"ris1": 0, "ris2": 0}
    for name, receiver in (("ris1", ris1), ("ris2", ris2)):
        health_checks[name] = sum(c.startswith("MEDGATE-HC") for c in receiver.control_ids)
    assert (len(ris1.control_ids) - health_checks["ris1"],
            len(ris2.control_ids) - health_checks["ris2"]) == (30, 10)
    assert {ack_id.split("-")[0] for ack_id, _, _ in acks} == {"RIS1", "RIS2"}  # unchanged ACKs


async def test_pid3_persistence_keeps_each_patient_on_one_receiver_in_order(nursery, hl7_receiver,
                                                                            tmp_path):
    receivers = [hl7_receiver(f"RIS{n}") for n in (1, 2, 3)]
    gateway = await start_gateway(nursery, hl7_vip(
        [(f"ris{n}", r.port) for n, r in enumerate(receivers, 1)],
        extra='persistence = { key = "pid-3", timeout = "1h" }'))
    messages = make_messages(60, patients=7, prefix="P")
    acks = await mllp_send(vip_port(gateway, "hl7"), mllp_file(tmp_path, messages))
    assert [code for _, code, _ in acks] == ["AA"] * 60
    sent_order: dict[str, list[str]] = {}
    for message in messages:
        header = peek_header(message)
        sent_order.setdefault(header.patient_id, []).append(header.control_id)
    for patient, control_ids in sent_order.items():
        holders = [r for r in receivers if any(m.patient_id == patient for m in r.received)]
        assert len(holders) == 1, patient
        got = [m.control_id for m in holders[0].received if m.patient_id == patient]
        assert got == control_ids  # in sending order
    assert sum(1 for r in receivers if any(not m.control_id.startswith("MEDGATE")
                                           for m in r.received)) >= 2  # and still spread


class ReceiverProcess:
    """`gateway simulate hl7-receiver` as a process, recording MSH-10s to a file."""

    def __init__(self, folder: Path, name: str, *options: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.options = options
        self.record = folder / f"{name}.record"
        self.log = folder / f"{name}.log"
        self.name = name
        self.process: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> ReceiverProcess:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "simulate", "hl7-receiver", "--listen",
             "127.0.0.1:0", "--name", self.name, "--record", str(self.record), *self.options],
            stdout=subprocess.PIPE, stderr=open(self.log, "wb"), start_new_session=True)
        line = self.process.stdout.readline().decode()
        assert line.startswith("READY"), (line, self.log.read_text())
        self.port = int(line.rsplit(":", 1)[1])
        return self

    def recorded(self) -> list[str]:
        if not self.record.exists():
            return []
        return [line.split()[0] for line in self.record.read_text().splitlines()
                if not line.startswith("MEDGATE-HC")]

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None


async def test_receiver_killed_mid_run_loses_nothing(nursery, tmp_path):
    first = ReceiverProcess(tmp_path, "RIS1").start()
    second = ReceiverProcess(tmp_path, "RIS2").start()
    try:
        gateway = await start_gateway(nursery, hl7_vip([("ris1", first.port),
                                                        ("ris2", second.port)]))
        messages = make_messages(500, prefix="K")
        killed = []

        async def kill_one():
            await eventually(lambda: len(first.recorded()) >= 60, 60)
            os.killpg(first.process.pid, signal.SIGKILL)
            killed.append(len(first.recorded()))

        async with trio.open_nursery() as inner:
            inner.start_soon(kill_one)
            # A sender as engines are: what gets no AA (a close when the message is in doubt,
            # a NAK while RIS1 is not yet marked down) is sent again.
            sent = await send_until_acked(vip_port(gateway, "hl7"), messages, pause=0.05)
        assert killed, "the receiver was never killed"
        control_ids = [peek_header(m).control_id for m in messages]
        assert sent.acked == control_ids  # every message acked, in order
        stored = Counter(first.recorded() + second.recorded())
        assert set(control_ids) <= set(stored)  # none acked and missing
        duplicates = sum(count - 1 for count in stored.values() if count > 1)
        print(f"\n500 messages, RIS1 killed after {killed[0]}: {sent.resends} resent "
              f"({sent.closed} closes, {len(sent.naks)} NAKs), {duplicates} duplicate(s)")
        # At most the message in doubt when RIS1 died: RIS1 recorded it, its resend went to
        # RIS2 once RIS1 was down. Nothing else reaches two engines.
        assert duplicates <= 1
    finally:
        first.stop()
        second.stop()


async def test_with_in_doubt_next_member_a_frozen_receiver_is_invisible_to_the_sender(nursery, tmp_path):
    frozen = ReceiverProcess(tmp_path, "RIS1").start()
    live = ReceiverProcess(tmp_path, "RIS2").start()
    try:
        # in_doubt = "next-member": for engines that share one de-duplication store, a
        # message that got no ACK goes on to the next member, and the sender never notices.
        gateway = await start_gateway(nursery, hl7_vip([("ris1", frozen.port),
                                                        ("ris2", live.port)],
                                                       extra='in_doubt = "next-member"'))
        pool = gateway.balancer.pool("hl7")
        os.kill(frozen.process.pid, signal.SIGSTOP)
        messages = make_messages(30, prefix="F")
        acks = await mllp_send(vip_port(gateway, "hl7"), mllp_file(tmp_path, messages))
        assert [(code, answered) for _, code, answered in acks] == [
            ("AA", peek_header(m).control_id) for m in messages]  # no error, no NAK
        assert all(not ack_id.startswith("MEDGATE") for ack_id, _, _ in acks)
        await wait_for_health(pool, "ris1", Health.DOWN)
        os.kill(frozen.process.pid, signal.SIGCONT)
        await wait_for_health(pool, "ris1", Health.UP)
        later = await mllp_send(vip_port(gateway, "hl7"),
                                mllp_file(tmp_path, make_messages(10, prefix="L")))
        assert {ack_id.split("-")[0] for ack_id, _, _ in later} == {"RIS1", "RIS2"}
    finally:
        if frozen.process is not None:
            os.kill(frozen.process.pid, signal.SIGCONT)
        frozen.stop()
        live.stop()


async def test_all_receivers_down_gives_a_nak_within_connect_timeout(nursery, hl7_receiver,
                                                                    tmp_path):
    receiver = hl7_receiver("RIS1")
    gateway = await start_gateway(nursery, hl7_vip(
        [("ris1", receiver.port)], health='health = { check = "hl7-ack", interval = "1h" }'))
    receiver.stop()  # the check has not noticed: the gateway finds out on the live message
    message = make_messages(1, prefix="D")
    started = trio.current_time()
    acks = await mllp_send(vip_port(gateway, "hl7"), mllp_file(tmp_path, message))
    assert trio.current_time() - started < 1 + 2  # connect_timeout 1s, plus mllp_send start-up
    ((ack_id, code, answered),) = acks
    assert (code, answered) == ("AR", "D000001") and ack_id.startswith("MEDGATE")


@pytest.mark.parametrize("mode, reason", [("hang", "timeout after 1s"),
                                          ("AR", "MSA-1 AR: RIS1 answers AR on demand"),
                                          ("close", "connection closed before the ACK")])
async def test_check_marks_a_receiver_that_does_not_ack_down(nursery, hl7_receiver, mode, reason):
    good, bad = hl7_receiver("RIS2"), hl7_receiver("RIS1", mode=mode)
    gateway = await start_gateway(nursery, hl7_vip([("ris1", bad.port), ("ris2", good.port)]))
    member = gateway.balancer.pool("hl7").member("ris1")
    assert member.health is Health.DOWN and member.last_check.detail == reason


async def test_member_ae_is_relayed_as_is(nursery, hl7_receiver, tmp_path):
    receiver = hl7_receiver("RIS1")
    gateway = await start_gateway(nursery, hl7_vip([("ris1", receiver.port)]))
    receiver.mode = "AE"
    ((ack_id, code, answered),) = await mllp_send(vip_port(gateway, "hl7"),
                                                  mllp_file(tmp_path, make_messages(1)))
    assert (code, answered) == ("AE", "SIM000001") and ack_id.startswith("RIS1")


async def test_late_ack_never_answers_the_next_message(nursery, hl7_receiver, tmp_path):
    slow, fast = hl7_receiver("SLOW"), hl7_receiver("FAST")
    gateway = await start_gateway(nursery, hl7_vip(
        [("slow", slow.port), ("fast", fast.port)],
        extra='mode = "failover"\nerror_limit = 10\nin_doubt = "next-member"',
        ack_timeout="300ms",
        health='health = { check = "hl7-ack", interval = "1h" }'))
    slow.mode, slow.delay = "slow", 0.5
    messages = make_messages(4, prefix="T")
    acks = await mllp_send(vip_port(gateway, "hl7"), mllp_file(tmp_path, messages))
    assert [(ack_id.split("-")[0], answered) for ack_id, _, answered in acks] == [
        ("FAST", peek_header(m).control_id) for m in messages]
    assert gateway.balancer.pool("hl7").member("slow").failed == 4  # tried first every time


class FakeReceiver:
    """Answers every message with an ACK for a different control ID."""

    async def start(self, nursery) -> int:
        async def handle(stream):
            buffer = b""
            while data := await stream.receive_some(65536):
                buffer += data
                while END in buffer:
                    raw, buffer = buffer.split(END, 1)
                    header = peek_header(raw[raw.index(SB) + 1:])
                    wrong = f"MSH|^~\\&|X|X|X|X|2026||ACK|Z1|P|2.5\rMSA|AA|NOT-{header.control_id}\r"
                    await stream.send_all(frame(wrong.encode()))

        listeners = await nursery.start(trio.serve_tcp, handle, 0)
        return listeners[0].socket.getsockname()[1]


async def test_ack_for_another_message_is_not_relayed(nursery, hl7_receiver, tmp_path):
    confused = await FakeReceiver().start(nursery)
    good = hl7_receiver("RIS2")
    gateway = await start_gateway(nursery, hl7_vip(
        [("confused", confused), ("good", good.port)],
        extra='mode = "failover"\nin_doubt = "next-member"',
        health='health = { check = "tcp", interval = "1h" }'))
    acks = await mllp_send(vip_port(gateway, "hl7"), mllp_file(tmp_path, make_messages(3)))
    assert [(ack_id.split("-")[0], answered) for ack_id, _, answered in acks] == [
        ("RIS2", "SIM000001"), ("RIS2", "SIM000002"), ("RIS2", "SIM000003")]
    member = gateway.balancer.pool("hl7").member("confused")
    assert member.health is Health.DOWN and "ACK for another message" in member.health_detail


async def test_oversize_message_gets_a_nak_and_the_connection_closes(nursery, hl7_receiver,
                                                                   tmp_path):
    receiver = hl7_receiver("RIS1")
    gateway = await start_gateway(nursery, hl7_vip([("ris1", receiver.port)],
                                                   extra='max_message_bytes = "2KB"'))
    small, big = make_messages(2, prefix="O")
    big = big + b"OBX|1|ED|PDF^Report||" + b"A" * 10_000 + b"\r"
    acks = await mllp_send(vip_port(gateway, "hl7"), mllp_file(tmp_path, [big]))
    assert [(code, answered) for _, code, answered in acks] == [("AR", "O000002")]
    acks = await mllp_send(vip_port(gateway, "hl7"), mllp_file(tmp_path, [small]))
    assert [(code, answered) for _, code, answered in acks] == [("AA", "O000001")]
    assert "O000002" not in receiver.control_ids


async def test_bytes_outside_a_frame_close_the_connection_with_a_log_line(nursery, hl7_receiver,
                                                                           caplog):
    receiver = hl7_receiver("RIS1")
    gateway = await start_gateway(nursery, hl7_vip([("ris1", receiver.port)]))
    stream = await trio.open_tcp_stream("127.0.0.1", vip_port(gateway, "hl7"))
    await stream.send_all(b"HELLO? this is not MLLP\r\n")
    with trio.fail_after(5):
        assert await stream.receive_some(100) == b""
    assert "bytes outside an MLLP frame" in caplog.text


def test_gateway_simulate_hl7_sender_against_a_receiver(tmp_path):
    receiver = ReceiverProcess(tmp_path, "RIS1").start()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "simulate", "hl7-sender",
             f"127.0.0.1:{receiver.port}", "--count", "5", "--type", "ORU"],
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().endswith("5 of 5 accepted")
        assert receiver.recorded() == [f"SIM{n:06d}" for n in range(1, 6)]
    finally:
        receiver.stop()


async def test_msh15_ne_messages_are_forwarded_without_waiting_for_an_ack(nursery, hl7_receiver):
    ris1, ris2 = hl7_receiver("RIS1"), hl7_receiver("RIS2")
    gateway = await start_gateway(nursery, hl7_vip([("ris1", ris1.port), ("ris2", ris2.port)],
                                                   extra='mode = "failover"', ack_timeout="5s"))
    # That NE messages are never answered nor timed out, over fake time:
    # test_vips_in_memory. Here: a real receiver gets each once, and a close says "not sent".
    stream = await trio.open_tcp_stream("127.0.0.1", vip_port(gateway, "hl7"))
    ids = []
    for message in make_messages(4, prefix="NE"):
        msh, rest = message.split(b"\r", 1)
        # MSH-15 accept ACK type NE, MSH-16 application ACK type AL: enhanced mode
        ids.append(peek_header(message).control_id)
        await stream.send_all(frame(msh + b"|||NE|AL\r" + rest))
    received = await ris1.wait_received(
        lambda control_ids: len([c for c in control_ids if c.startswith("NE")]) >= 4)
    # each once, at the active member: no ack timeout, no redispatch
    assert [c for c in received if c.startswith("NE")] == ids
    assert not [c for c in ris2.control_ids if c.startswith("NE")]
    pool = gateway.balancer.pool("hl7")
    assert pool.member("ris1").failed == pool.member("ris2").failed == 0
    ris1.stop()
    ris2.stop()
    await wait_for_health(pool, "ris1", Health.DOWN)
    await wait_for_health(pool, "ris2", Health.DOWN)
    await stream.send_all(frame(make_messages(1, prefix="LOST")[0].replace(
        b"|P|2.5\r", b"|P|2.5|||NE|AL\r", 1)))
    with trio.fail_after(5):
        assert await stream.receive_some(100) == b""  # closed: the sender knows
    await stream.aclose()


async def test_a_receiver_that_naks_everything_is_marked_down_and_its_naks_reach_the_sender(
        nursery, hl7_receiver, tmp_path):
    # Its port and its heartbeat stay open (the check ran while it answered AA, and not again
    # during the test): only its AR answers, error_limit of them in a row, take it out.
    broken, healthy = hl7_receiver("RIS1"), hl7_receiver("RIS2")
    gateway = await start_gateway(nursery, hl7_vip(
        [("ris1", broken.port), ("ris2", healthy.port)], extra="error_limit = 3",
        health='health = { check = "hl7-ack", interval = "60s", timeout = "1s" }'))
    pool = gateway.balancer.pool("hl7")
    assert pool.member("ris1").health is Health.UP
    broken.mode = "AR"
    acks = await mllp_send(vip_port(gateway, "hl7"), mllp_file(tmp_path, make_messages(
        20, prefix="N")))
    codes = [code for _, code, _ in acks]
    assert codes.count("AR") == 3 and codes.count("AA") == 17  # each AR relayed, unchanged
    live = [m for m in broken.received if not m.control_id.startswith("MEDGATE")]
    assert len(live) == 3  # then nothing more went to it (the rest: its heartbeat)
    member = pool.member("ris1")
    assert member.health is Health.DOWN
    assert member.health_detail.startswith("3 failure statuses in a row, last: answered AR")
    assert pool.member("ris2").health is Health.UP


def test_no_heartbeat_to_a_member_that_acked_live_traffic_within_the_interval():
    from gateway.balancer import Balancer, MemberSpec, Pool
    from gateway.config import parse_config
    from health.monitor import Monitor

    def monitor(extra: str = "") -> tuple[Monitor, Pool]:
        health = f'health = {{ check = "hl7-ack", interval = "5s"{extra} }}'
        vip = parse_config(hl7_vip([("ris1", 1)], health=health), source="t.toml").vips[0]
        pool = Pool.from_specs("hl7", [MemberSpec("ris1")], rise=1, min_up=0)  # no floor
        return Monitor(Balancer([pool]), [vip]), pool

    watcher, pool = monitor()
    vip, member = watcher.vips[0], watcher.vips[0].members[0]
    assert watcher.probe_needed(vip, member, 100.0)  # not up yet: probed
    pool.record_check("ris1", True, "MSA-1 AA", 0.001, 100.0)
    assert watcher.probe_needed(vip, member, 101.0)  # up, but no live ACK yet
    pool.answered_well(pool.member("ris1"), 101.0)
    assert not watcher.probe_needed(vip, member, 105.9)  # ACKed live traffic 4.9 s ago
    assert watcher.probe_needed(vip, member, 106.1)  # quiet for a whole interval
    pool.answered_well(pool.member("ris1"), 106.1)
    pool.report_failure(pool.member("ris1"), "reset")
    pool.report_failure(pool.member("ris1"), "reset")
    pool.report_failure(pool.member("ris1"), "reset")  # error_limit: down
    assert watcher.probe_needed(vip, member, 106.2)  # a down member is always probed
    always, pool = monitor(", skip_when_live = false")
    pool.record_check("ris1", True, "MSA-1 AA", 0.001, 100.0)
    pool.answered_well(pool.member("ris1"), 101.0)
    assert always.probe_needed(always.vips[0], always.vips[0].members[0], 101.5)


async def test_live_traffic_takes_the_place_of_the_heartbeat(nursery, hl7_receiver, tmp_path):
    receiver = hl7_receiver("RIS1", parse=False)  # 2000 messages: ACKs from the MSH alone
    gateway = await start_gateway(nursery, hl7_vip(
        [("ris1", receiver.port)],
        health='health = { check = "hl7-ack", interval = "300ms", timeout = "1s" }'))
    heartbeats_before = sum(c.startswith("MEDGATE-HC") for c in receiver.control_ids)
    # About two seconds of back-to-back messages: more than six check intervals.
    acks = await mllp_send(vip_port(gateway, "hl7"), mllp_file(tmp_path, make_messages(
        2000, prefix="L")))
    assert [code for _, code, _ in acks] == ["AA"] * 2000
    heartbeats = sum(c.startswith("MEDGATE-HC") for c in receiver.control_ids)
    assert heartbeats - heartbeats_before <= 1  # one may fall just before the first ACK


ROUTES = """
routes = [
  { match = { "MSH-9" = "ORU^R01*" }, members = ["lab1", "lab2"] },
  { match = { "MSH-9" = "ADT^*", "MSH-5" = "RIS" }, members = ["ris1", "ris2"] },
]
"""


async def test_routes_send_oru_to_the_lab_and_adt_to_the_ris_and_reject_the_rest(
        nursery, hl7_receiver, tmp_path):
    receivers = {name: hl7_receiver(name.upper()) for name in ("lab1", "lab2", "ris1", "ris2")}
    gateway = await start_gateway(nursery, '[gateway]\nadmin = "127.0.0.1:0"\n' + hl7_vip(
        [(name, receiver.port) for name, receiver in receivers.items()],
        extra=ROUTES + 'persistence = { key = "pid-3" }'), admin=True)
    port = vip_port(gateway, "hl7")
    results = make_messages(6, kind="ORU", prefix="ORU", patients=2)
    admissions = make_messages(6, prefix="ADT")
    billing = make_messages(1, prefix="BILL")[0].replace(b"|HIS|HOSP|RIS|", b"|HIS|HOSP|BILLING|")
    interleaved = [m for pair in zip(results, admissions) for m in pair] + [billing]
    output = await mllp_send_output(port, mllp_file(tmp_path, interleaved))
    codes = {answered: code for _, code, answered in ACK_LINE.findall(output)}
    assert codes.pop(b"BILL000001") == b"AR"
    assert set(codes.values()) == {b"AA"} and len(codes) == 12

    def live(name: str) -> list[str]:
        return [c for c in receivers[name].control_ids if not c.startswith("MEDGATE")]

    assert sorted(live("lab1") + live("lab2")) == [f"ORU{n:06d}" for n in range(1, 7)]
    assert sorted(live("ris1") + live("ris2")) == [f"ADT{n:06d}" for n in range(1, 7)]
    assert live("lab1") and live("lab2") and live("ris1") and live("ris2")  # balanced within
    for patient in (1, 2):  # persistence within the route: each lab patient on one lab member
        ids = {f"ORU{n:06d}" for n in range(patient, 7, 2)}
        assert ids <= set(live("lab1")) or ids <= set(live("lab2")), (live("lab1"), live("lab2"))
    # The gateway's reject says why, in MSA-3 and in the ERR segment (python-hl7 reads it).
    nak = next(block for block in output.split(b"\x1c") if b"MSA|AR|BILL000001" in block)
    err = hl7.parse(nak.strip(b"\x0b\r\n").decode()).segment("ERR")
    assert "no route matches the message" in str(err[8]) and "MSH-5 'BILLING'" in str(err[8])

    # The lab pair down: ORU is refused (the sender keeps it), ADT still flows.
    receivers["lab1"].stop()
    receivers["lab2"].stop()
    pool = gateway.balancer.pool("hl7")
    await wait_for_health(pool, "lab1", Health.DOWN)
    await wait_for_health(pool, "lab2", Health.DOWN)
    acks = await mllp_send(port, mllp_file(tmp_path, [
        make_messages(1, kind="ORU", prefix="LATE")[0], make_messages(1, prefix="LATEADT")[0]]))
    assert [(answered, code) for _, code, answered in acks] == [
        ("LATE000001", "AR"), ("LATEADT000001", "AA")]
    document = json.loads((await get(f"http://{gateway.admin_address}/api/status"))[1])
    assert document["vips"][0]["routes"] == [
        {"match": "MSH-9=ORU^R01*", "members": ["lab1", "lab2"], "members_up": []},
        {"match": "MSH-9=ADT^*, MSH-5=RIS", "members": ["ris1", "ris2"],
         "members_up": ["ris1", "ris2"]}]
    page = (await get(f"http://{gateway.admin_address}/"))[1].decode()
    assert "<code>MSH-9=ORU^R01*</code> &rarr; lab1, lab2 (0 up)" in page
