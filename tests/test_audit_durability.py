"""The audit log loses nothing the sender was told: SIGKILL of the gateway under HL7 traffic."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading

from gateway.testing.simulators.hl7_messages import make_messages
from protocols.mllp import MllpReader, Message, frame, peek_ack
from tests.helpers import GatewayProcess, wait_until
from tests.test_hl7_vip import hl7_vip

MESSAGES = 5000


class Sender(threading.Thread):
    """Sends messages one after another on one connection until it breaks; `acked` holds the
    control IDs answered AA."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.acked: list[str] = []

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                reader = MllpReader()
                for index, payload in enumerate(make_messages(3 * MESSAGES, prefix="K")):
                    sock.sendall(frame(payload))
                    while (event := reader.next_event()) is None:
                        data = sock.recv(65536)
                        if not data:
                            return
                        reader.feed(data)
                    assert isinstance(event, Message)
                    ack = peek_ack(event.payload)
                    if ack.code == "AA":
                        self.acked.append(ack.control_id)
        except OSError:
            return  # the gateway was killed


def test_every_ack_the_sender_saw_has_its_record_after_sigkill(tmp_path, hl7_receiver):
    receivers = [hl7_receiver(name="RIS1", parse=False), hl7_receiver(name="RIS2", parse=False)]
    audit = tmp_path / "audit.jsonl"
    config = (f'[gateway]\naudit = "{audit}"\n'
              + hl7_vip([("ris1", receivers[0].port), ("ris2", receivers[1].port)]))
    gateway = GatewayProcess(tmp_path, config).start()
    try:
        sender = Sender(gateway.port("hl7"))
        sender.start()
        wait_until(lambda: len(sender.acked) >= MESSAGES or not sender.is_alive(), timeout=120,
                   what=f"{MESSAGES} messages acknowledged")
        os.kill(gateway.process.pid, signal.SIGKILL)  # while the sender goes on sending
        gateway.process.wait()
        sender.join(30)
    finally:
        gateway.stop()
    assert len(sender.acked) >= MESSAGES, gateway.text()
    records = [json.loads(line) for line in audit.read_text().splitlines()]  # every line whole
    recorded = {r["control_id"] for r in records if r["kind"] == "hl7" and r["ack"] == "AA"}
    missing = [control_id for control_id in sender.acked if control_id not in recorded]
    assert not missing, f"{len(missing)} ACKed messages without a record, e.g. {missing[:3]}"
