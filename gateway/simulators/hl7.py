"""Simulated HL7 v2 peers over MLLP: a receiver (RIS, interface engine) and a sender (HIS).

The receiver records each message (each message of a batch) before it answers (as a real engine commits, then ACKs), and
can be told to answer AA (default), AE or AR, to never answer (`hang`), to close the connection
before answering (`close`), or to answer after `delay` seconds (`slow`).
"""

from __future__ import annotations

import datetime
import itertools
import logging
import socket
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

import trio

from gateway.simulators.serving import TrioServer
from protocols.mllp import (HL7Error, Header, Message, MllpReader, build_ack, frame, is_batch,
                            peek_ack, peek_batch, peek_header)

log = logging.getLogger("medgate.simulate.hl7")

MODES = ("AA", "AE", "AR", "hang", "close", "slow")


@dataclass(frozen=True)
class Received:
    control_id: str
    message_type: str
    patient_id: str
    payload: bytes


@dataclass
class HL7Receiver(TrioServer):
    """An MLLP receiver on `host:port` (port 0: any free one). Thread-safe record of messages."""

    name: str = "RIS"
    host: str = "127.0.0.1"
    port: int = 0
    mode: str = "AA"
    delay: float = 1.0  # seconds, for mode "slow"
    record: Path | None = None  # also append each control ID to this file, flushed, before the ACK
    received: list[Received] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1), repr=False)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")

    @property
    def control_ids(self) -> list[str]:
        with self._lock:
            return [message.control_id for message in self.received]

    def describe(self) -> str:
        return f"HL7 receiver {self.name} (answers {self.mode})"

    async def _handle(self, stream: trio.SocketStream) -> None:
        reader = MllpReader()
        try:
            while data := await stream.receive_some(65536):
                reader.feed(data)
                while (event := reader.next_event()) is not None:
                    if not isinstance(event, Message):
                        return  # junk or oversize: drop the connection, as many engines do
                    if not await self._answer(stream, event.payload):
                        return
        except trio.BrokenResourceError:
            pass

    async def _answer(self, stream: trio.SocketStream, payload: bytes) -> bool:
        if is_batch(payload):  # recorded message by message, answered once, for the batch
            batch = peek_batch(payload)
            header = batch.header
            entries = [Received(control_id, "batch", "", payload)
                       for control_id in batch.message_ids]
        else:
            header = peek_header(payload)
            entries = [Received(header.control_id, header.message_type, header.patient_id,
                                payload)]
        with self._lock:
            self.received += entries
            if self.record is not None:
                with open(self.record, "a", encoding="latin-1") as record:
                    record.writelines(f"{entry.control_id}\n" for entry in entries)
        mode = self.mode
        code = "AA" if mode == "slow" else mode
        # Enhanced mode (MSH-15): NE wants no accept ACK, ER one only on error, SU only on
        # success; the message is taken all the same.
        wanted = {"NE": False, "ER": code != "AA", "SU": code == "AA"}
        if not wanted.get(header.accept_ack_type, True) and mode in ("AA", "AE", "AR", "slow"):
            return True
        if mode == "hang":
            await trio.sleep_forever()
        if mode == "close":
            return False
        if mode == "slow":
            await trio.sleep(self.delay)
        await stream.send_all(frame(self.ack(header, code)))
        return True

    def ack(self, header: Header, code: str) -> bytes:
        timestamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
        return build_ack(header, code, control_id=f"{self.name}-{next(self._ids)}",
                         timestamp=timestamp,
                         text="" if code == "AA" else f"{self.name} answers {code} on demand")


def make_messages(count: int, kind: str = "ADT", patients: int | None = None,
                  prefix: str = "SIM", first: int = 1) -> list[bytes]:
    """`count` messages (ADT^A01 or ORU^R01) with distinct MSH-10 over `patients` patient IDs,
    numbered from `first`."""
    patients = patients or count
    timestamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
    messages = []
    for number in range(first, first + count):
        patient = f"{prefix}PAT{(number - 1) % patients + 1:05d}"
        control_id = f"{prefix}{number:06d}"
        if kind == "ORU":
            body = (f"MSH|^~\\&|LAB|HOSP|RIS|HOSP|{timestamp}||ORU^R01^ORU_R01|{control_id}|P|2.5\r"
                    f"PID|1||{patient}^^^HOSP^MR||TEST^PATIENT {number}\r"
                    f"OBR|1|{control_id}||CBC^Blood count\r"
                    f"OBX|1|NM|HGB^Hemoglobin||{120 + number % 40}|g/L\r")
        else:
            body = (f"MSH|^~\\&|HIS|HOSP|RIS|HOSP|{timestamp}||ADT^A01^ADT_A01|{control_id}|P|2.5\r"
                    f"EVN|A01|{timestamp}\r"
                    f"PID|1||{patient}^^^HOSP^MR||TEST^PATIENT {number}\r"
                    f"PV1|1|I\r")
        messages.append(body.encode())
    return messages


@dataclass(frozen=True)
class SendResult:
    control_id: str
    code: str  # MSA-1 of the answer, or "" when there was none
    error: str = ""
    ack: bytes = b""


def send_messages(host: str, port: int, messages: list[bytes], timeout: float = 30.0,
                  tls: ssl.SSLContext | None = None) -> list[SendResult]:
    """Send on one connection (over TLS with a client context `tls`), each after the previous
    ACK (blocking, like a classic engine)."""
    results: list[SendResult] = []
    with socket.create_connection((host, port), timeout=timeout) as plain:
        plain.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = tls.wrap_socket(plain, server_hostname=host) if tls else plain
        reader = MllpReader()
        for index, payload in enumerate(messages):
            control_id = peek_header(payload).control_id
            try:
                sock.sendall(frame(payload))
                while (event := reader.next_event()) is None:
                    data = sock.recv(65536)
                    if not data:
                        raise ConnectionError("connection closed before the ACK")
                    reader.feed(data)
            except OSError as exc:
                results.append(SendResult(control_id, "", str(exc) or type(exc).__name__))
                results += [SendResult(peek_header(m).control_id, "", "not sent")
                            for m in messages[index + 1:]]
                break
            if not isinstance(event, Message):
                results.append(SendResult(control_id, "", "answer is not an MLLP frame"))
                continue
            try:
                ack = peek_ack(event.payload)
            except HL7Error as exc:
                results.append(SendResult(control_id, "", exc.reason, event.payload))
                continue
            if ack.control_id != control_id:
                results.append(SendResult(control_id, "", f"ACK for {ack.control_id!r}",
                                          event.payload))
                continue
            results.append(SendResult(control_id, ack.code, ack.text, event.payload))
    return results
