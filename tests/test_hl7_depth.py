"""HL7 depth: batches and acknowledgment modes, against python-hl7 and hl7apy receivers."""

from __future__ import annotations

import datetime
import json
import os
import sys

import pytest
import trio

from gateway.balancer import Health
from gateway.testing.simulators.hl7_messages import make_messages
from protocols.mllp import frame, peek_ack
from tests.helpers import start_gateway, vip_port, wait_for_health
from tests.helpers.hl7_peers import LibraryReceiver
from tests.test_hl7_vip import ACK_LINE, hl7_vip, mllp_file, mllp_send_output


def batch(batch_id: str, prefix: str, count: int = 3) -> bytes:
    """A batch (HL7 v2.5 §2.10.3) of `count` ADT^A01 messages with BHS-11 = `batch_id`."""
    stamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
    return (f"BHS|^~\\&|HIS|HOSP|RIS|HOSP|{stamp}||||{batch_id}\r".encode()
            + b"".join(make_messages(count, prefix=prefix)) + f"BTS|{count}\r".encode())


@pytest.mark.parametrize("library", ["python-hl7", "hl7apy"])
async def test_a_batch_reaches_a_library_receiver_once_and_its_answer_comes_back(
        nursery, tmp_path, library):
    receiver = LibraryReceiver(tmp_path, library)
    try:
        gateway = await start_gateway(nursery, hl7_vip([("ris1", receiver.port)]))
        output = await mllp_send_output(vip_port(gateway, "hl7"), mllp_file(tmp_path, [
            batch("B1", "BA"), make_messages(1, prefix="ONE")[0]]))
        assert receiver.recorded() == ["BA000001", "BA000002", "BA000003", "ONE000001"]
        answers = [m.strip(b"\x0b\r\n") for m in output.split(b"\x1c") if m.strip()]
        assert len(answers) == 2
        if library == "python-hl7":  # a response batch: BHS-12 names the batch
            assert answers[0].startswith(b"BHS|") and answers[0].split(b"\r")[0].endswith(b"|B1")
            assert [a for _, _, a in ACK_LINE.findall(answers[0])] == [
                b"BA000001", b"BA000002", b"BA000003"]
        else:  # one ACK for the whole batch
            assert peek_ack(answers[0]).control_id == "B1"
        assert peek_ack(answers[1]).control_id == "ONE000001"
    finally:
        receiver.stop()


async def test_with_in_doubt_next_member_a_batch_goes_whole_to_the_next_member(
        nursery, hl7_receiver, tmp_path):
    closer = hl7_receiver("RIS1", mode="close")  # takes it, then closes without answering
    receiver = LibraryReceiver(tmp_path, "python-hl7")
    audit = tmp_path / "audit.log"
    try:
        # in_doubt = "next-member" (engines that share one de-duplication store): a batch
        # that got no answer goes whole to the next member (by default it is in doubt).
        config = f'[gateway]\naudit = "{audit}"\n' + hl7_vip(
            [("ris1", closer.port), ("ris2", receiver.port)],
            extra='mode = "failover"\nin_doubt = "next-member"',
            health='health = { check = "tcp", interval = "200ms", timeout = "1s", rise = 1, '
                   'fall = 1 }')
        (tmp_path / "site.toml").write_text(config)
        gateway = await start_gateway(nursery, config)
        port = vip_port(gateway, "hl7")
        output = await mllp_send_output(port, mllp_file(tmp_path, [batch("B7", "FO")]))
        assert b"BHS|" in output and output.count(b"MSA|AA|") == 3
        assert closer.control_ids == ["FO000001", "FO000002", "FO000003"]  # got it, no answer
        assert receiver.recorded() == ["FO000001", "FO000002", "FO000003"]  # then whole, once

        closer.stop()
        receiver.stop()
        pool = gateway.balancer.pool("hl7")
        await wait_for_health(pool, "ris1", Health.DOWN)
        await wait_for_health(pool, "ris2", Health.DOWN)
        output = await mllp_send_output(port, mllp_file(tmp_path, [batch("B8", "NONE")]))
        nak = peek_ack(output.strip(b"\x0b\x1c\r\n"))
        assert (nak.code, nak.control_id) == ("AR", "B8")
        assert "no member is up" in nak.text
        records = [json.loads(line) for line in audit.read_text().splitlines()]
        batches = [(r["control_id"], r["message_type"], r["batch_messages"], r["told"])
                   for r in records if r["kind"] == "hl7"]
        assert batches == [("B7", "batch", 3, "AA from ris2"),
                           ("B8", "batch", 3, "AR from the gateway")]
        # gateway trace --hl7 reads the same records: where each went, what the sender got
        trace = await trio.run_process(
            [sys.executable, "-m", "gateway", "trace", "--hl7", "-c", str(tmp_path / "site.toml"),
             "B7"], capture_stdout=True, check=False, env={**os.environ, "COLUMNS": "200"})
        assert trace.returncode == 0
        row = next(line for line in trace.stdout.decode().splitlines() if "batch of 3" in line)
        assert "ris2" in row and "AA from ris2" in row and "│ 2 " in row  # tried twice
        as_json = await trio.run_process(
            [sys.executable, "-m", "gateway", "trace", "--hl7", "--json", "-c",
             str(tmp_path / "site.toml"), "B8"], capture_stdout=True, check=False)
        record = json.loads(as_json.stdout)
        assert (record["told"], record["reason"]) == ("AR from the gateway", "no member is up")
        nothing = await trio.run_process(
            [sys.executable, "-m", "gateway", "trace", "--hl7", "-c", str(tmp_path / "site.toml"),
             "NOPE1"], capture_stdout=True, check=False)
        assert nothing.returncode == 1 and b"no HL7 message with MSH-10 'NOPE1'" in nothing.stdout
    finally:
        receiver.stop()


def with_ack_type(message: bytes, accept: str) -> bytes:
    """The message in enhanced mode: MSH-15 (accept ACK type) `accept`, MSH-16 AL."""
    msh, rest = message.split(b"\r", 1)
    return msh + f"|||{accept}|AL\r".encode() + rest


async def answers_within(stream: trio.SocketStream, expected: int, quiet: float) -> list[bytes]:
    """Frames the sender gets: `expected` of them, then nothing more for `quiet` seconds."""
    buffer = b""
    with trio.fail_after(10 + quiet):
        while buffer.count(b"\x1c\r") < expected:
            buffer += await stream.receive_some(65536)
    with trio.move_on_after(quiet):
        while True:
            data = await stream.receive_some(65536)
            if not data:
                break
            buffer += data
    return [m.strip(b"\x0b\x1c\r") for m in buffer.split(b"\x1c\r") if m.strip()]


# (MSH-15, receiver) -> MSA-1 of what the sender gets, and how many of the 3 messages the
# first member received (the second never gets one)
ACK_MODES = {
    ("AL", "acks-all"): (["AA"] * 3, 3),
    # No ACK in time: the first message is in doubt, sent to no other member; the sender's
    # connection is closed (the 2 after it are still the sender's, to resend).
    ("AL", "silent"): ([], 1),
    ("ER", "acks-all"): (["AA"] * 3, 3),  # it answers anyway: relayed
    ("ER", "silent"): ([], 3),  # delivered, never sent again
    ("ER", "rejects"): (["AR"] * 3, 3),  # its error ACKs, relayed
    ("NE", "acks-all"): (["AA"] * 3, 3),
    ("NE", "silent"): ([], 3),
}


@pytest.mark.parametrize("accept, receiver_kind", list(ACK_MODES),
                         ids=[f"{accept}-{kind}" for accept, kind in ACK_MODES])
async def test_what_the_sender_gets_per_acknowledgment_mode(nursery, hl7_receiver, tmp_path,
                                                            accept, receiver_kind):
    library = simulated = None
    if receiver_kind == "acks-all":  # python-hl7's create_ack, whatever MSH-15 says
        library = LibraryReceiver(tmp_path, "python-hl7")
        port = library.port
    else:
        simulated = hl7_receiver("RIS1", mode="hang" if receiver_kind == "silent" else "AR")
        port = simulated.port
    witness = hl7_receiver("RIS2")
    try:
        gateway = await start_gateway(nursery, hl7_vip(
            [("ris1", port), ("ris2", witness.port)], extra='mode = "failover"',
            health='health = { check = "tcp", interval = "60s" }', ack_timeout="1s"))
        messages = [with_ack_type(m, accept) for m in make_messages(3, prefix=accept)]
        stream = await trio.open_tcp_stream("127.0.0.1", vip_port(gateway, "hl7"))
        for message in messages:
            await stream.send_all(frame(message))
        codes, received = ACK_MODES[(accept, receiver_kind)]
        answers = await answers_within(stream, len(codes), quiet=1.5)
        await stream.aclose()
        ids = [f"{accept}{n:06d}" for n in (1, 2, 3)]
        assert sorted((peek_ack(a).control_id, peek_ack(a).code) for a in answers) == sorted(
            zip(ids, codes))
        first = library.recorded() if library else simulated.control_ids
        assert first == ids[:received]  # each message once at the first member
        assert witness.control_ids == []  # never sent on: delivered, or in doubt
    finally:
        if library:
            library.stop()


async def test_validate_structure_rejects_what_hl7apy_rejects_before_any_member_sees_it(
        nursery, hl7_receiver, tmp_path, caplog):
    receiver = hl7_receiver("RIS1")
    gateway = await start_gateway(nursery, hl7_vip([("ris1", receiver.port)],
                                                   extra='validate = "structure"'))
    good = make_messages(2, kind="ORU", prefix="GOOD")
    # An ADT^A01 without its required PV1; its birth date unreadable (hl7apy quotes that value)
    broken = make_messages(1, prefix="BAD")[0].replace(b"PV1||I|WARD1^101^A\r", b"")
    bad_date = make_messages(1, prefix="DATE")[0].replace(b"19700101", b"SECRET01")
    enhanced = with_ack_type(broken.replace(b"BAD000001", b"ENH000001"), "AL")
    output = await mllp_send_output(vip_port(gateway, "hl7"), mllp_file(
        tmp_path, [good[0], broken, bad_date, enhanced, good[1]]))
    acks = [peek_ack(b.strip(b"\x0b\r\n")) for b in output.split(b"\x1c") if b.strip()]
    assert [(a.control_id, a.code) for a in acks] == [
        ("GOOD000001", "AA"), ("BAD000001", "AE"), ("DATE000001", "AE"), ("ENH000001", "CE"),
        ("GOOD000002", "AA")]
    assert "Missing required child ADT_A01.PV1" in acks[1].text
    assert "SECRET01" in acks[2].text  # the sender is told what hl7apy read...
    assert b"ERR|||100^Segment sequence error^HL70357" in output
    live = [c for c in receiver.control_ids if not c.startswith("MEDGATE")]
    assert live == ["GOOD000001", "GOOD000002"]  # ...no member saw the rest
    rejected = [r.getMessage() for r in caplog.records if "from the gateway" in r.getMessage()]
    assert len(rejected) == 3 and "hl7apy rejects its structure (ValueError)" in rejected[1]
    assert not any("SECRET01" in r.getMessage() for r in caplog.records)  # ...but no log
