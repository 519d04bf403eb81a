"""The PACS and modality simulators, through the plugin's fixtures and `gateway simulate`."""

from __future__ import annotations

import subprocess
import sys

from gateway.balancer import Health
from tests.helpers.dicom_peers import PacsProcess, echoscu, storescu, write_instances
from tests.helpers import start_gateway, vip_port, wait_for_health
from tests.test_dicom_vip import dicom_vip


def test_modality_stores_on_pacs_and_reports_each_instance(pacs, modality):
    archive = pacs("PACS1")
    results = modality.send("127.0.0.1", archive.port, count=5, called_ae="PACS1")
    assert [r.stored for r in results] == [True] * 5
    assert set(archive.stored) == {r.sop_instance_uid for r in results}


def test_abort_after_n_stores_is_seen_by_the_modality(pacs, modality):
    archive = pacs("PACS1", abort_after=2)
    results = modality.send("127.0.0.1", archive.port, count=4, called_ae="PACS1", timeout=2)
    assert [r.stored for r in results] == [True, True, False, False]
    assert all(r.error for r in results[2:]) and archive.stored_count() == 2


async def test_hanging_pacs_is_redispatched_then_released(nursery, pacs, tmp_path):
    hung, live = pacs("PACS1"), pacs("PACS2")
    gateway = await start_gateway(nursery, dicom_vip(
        [("pacs1", hung.port, "PACS1"), ("pacs2", live.port, "PACS2")],
        extra="error_limit = 1\nstudy_window = 0"))  # each store its own pick: both members
    pool = gateway.balancer.pool("pacs")
    for name in ("pacs1", "pacs2"):  # a first check may time out on a busy machine
        await wait_for_health(pool, name, Health.UP, 20)
    hung.set_hang(True)
    assert (await echoscu(vip_port(gateway, "pacs"))).clean  # waited 3s on pacs1, then pacs2
    assert pool.member("pacs1").health is Health.DOWN
    hung.set_hang(False)
    # Released: pacs1 takes associations again (each store its own pick). On a busy machine
    # the in-process PACS may miss assoc_timeout (3s) once more: that store goes to pacs2,
    # still clean, and pacs1 is waited for again.
    for path in write_instances(tmp_path, 10):
        await wait_for_health(pool, "pacs1", Health.UP, 20)
        assert (await storescu(vip_port(gateway, "pacs"), [path])).clean
        if hung.stored_count() and live.stored_count():
            break
    assert hung.stored_count() > 0 and live.stored_count() > 0


def test_gateway_simulate_modality_and_pacs_processes(tmp_path):
    archive = PacsProcess(tmp_path / "pacs", "ARCHIVE").start()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "simulate", "modality", f"127.0.0.1:{archive.port}",
             "--count", "3", "--called-ae", "ARCHIVE"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().endswith("3 of 3 stored")
        assert len(archive.stored()) == 3
    finally:
        archive.stop()
    refused = subprocess.run(
        [sys.executable, "-m", "gateway", "simulate", "modality", f"127.0.0.1:{archive.port}",
         "--count", "2", "--timeout", "3"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "0 of 2 stored" in refused.stdout


async def test_hl7_receiver_validates_with_hl7apy_and_the_sender_sends_every_kind(tmp_path):
    """`gateway simulate hl7-receiver --validate` (a process) reads what python-hl7's mllp_send
    sends: each generated kind passes hl7apy's strict structure check; a message without its
    required PV1 gets AE with an ERR segment naming what is missing."""
    from gateway.testing.simulators.hl7_messages import make_messages
    from protocols.mllp import peek_ack
    from tests.test_hl7_vip import ReceiverProcess, mllp_file, mllp_send_output

    receiver = ReceiverProcess(tmp_path, "RIS1", "--validate").start()
    try:
        kinds = ["ADT", "ADT^A04", "ADT^A08", "ORM", "ORU", "NMD"]
        messages = [make_messages(1, kind=kind, prefix=f"K{n}")[0] for n, kind in enumerate(kinds)]
        broken = make_messages(1, prefix="BROKEN")[0].replace(b"PV1||I|WARD1^101^A\r", b"")
        output = await mllp_send_output(receiver.port, mllp_file(tmp_path, messages + [broken]))
        acks = [peek_ack(block.strip(b"\x0b\r\n")) for block in output.split(b"\x1c")
                if block.strip()]
        assert [(a.control_id, a.code) for a in acks] == [
            (f"K{n}000001", "AA") for n in range(len(kinds))] + [("BROKEN000001", "AE")]
        assert acks[-1].text == "ValidationError: Missing required child ADT_A01.PV1"
        assert b"ERR|||100^Segment sequence error^HL70357|E" in output
    finally:
        receiver.stop()


def test_hl7_receiver_parses_with_hl7apy_by_default_and_answers_from_the_msh_without(
        hl7_receiver):
    """Tolerant by default (a missing segment passes, as most engines take it), AE with an
    ERR for what hl7apy cannot parse at all; parse=False answers from the MSH alone."""
    from gateway.testing.simulators.hl7 import send_messages
    from gateway.testing.simulators.hl7_messages import make_messages

    loose = make_messages(1, prefix="LOOSE")[0].replace(b"PV1||I|WARD1^101^A\r", b"")
    garbled = make_messages(1, prefix="BAD")[0].replace(b"|^~\\&|", b"|^^^^|", 1)
    parsing, plain = hl7_receiver("RIS1"), hl7_receiver("RIS2", parse=False)
    answers = send_messages("127.0.0.1", parsing.port, [loose, garbled])
    assert [(a.control_id, a.code) for a in answers] == [("LOOSE000001", "AA"),
                                                        ("BAD000001", "AE")]
    assert answers[1].error.startswith("InvalidEncodingChars")  # hl7apy's reason, in ERR-8
    assert b"ERR|||100^Segment sequence error^HL70357|E" in answers[1].ack
    answers = send_messages("127.0.0.1", plain.port, [loose, garbled])
    assert [a.code for a in answers] == ["AA", "AA"]  # no parse: the MSH is enough
