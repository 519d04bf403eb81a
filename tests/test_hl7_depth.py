"""HL7 depth: batches and acknowledgment modes, against python-hl7 and hl7apy receivers."""

from __future__ import annotations

import datetime
import json

import pytest
import trio

from gateway.balancer import Health
from gateway.simulators.hl7 import make_messages
from protocols.mllp import frame, peek_ack
from tests.helpers import start_gateway, vip_port, wait_for_health
from tests.hl7_peers import LibraryReceiver
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


async def test_a_batch_goes_whole_to_the_next_member_and_is_nakd_by_its_id_when_none_is_up(
        nursery, hl7_receiver, tmp_path):
    closer = hl7_receiver("RIS1", mode="close")  # takes it, then closes without answering
    receiver = LibraryReceiver(tmp_path, "python-hl7")
    audit = tmp_path / "audit.log"
    try:
        gateway = await start_gateway(nursery, f'[gateway]\naudit = "{audit}"\n' + hl7_vip(
            [("ris1", closer.port), ("ris2", receiver.port)], extra='mode = "failover"',
            health='health = { check = "tcp", interval = "200ms", timeout = "1s", rise = 1, '
                   'fall = 1 }'))
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
    finally:
        receiver.stop()
