"""Simulated HL7 v2 peers over MLLP: a receiver (RIS, interface engine) and a sender (HIS).

The receiver records each message (each message of a batch) before it answers (as a real
engine commits, then ACKs), and can be told to answer AA (default), AE or AR, to never answer
(`hang`), to close the connection before answering (`close`), or to answer after `delay`
seconds (`slow`). As a receiving engine does, it parses each message (with hl7apy) and builds
its ACK with hl7apy; a message it cannot parse gets AE with an ERR segment. With `validate`
the parse is strict (the structure MSH-9 requires). That costs about 10 ms a message:
`parse = False` answers from the MSH alone, for benchmarks and floods of thousands.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from gateway.config import Address
from gateway.testing.simulators.serving import TrioServer, wait_on
from protocols.hl7_structure import Problem, parse_problem, structure_problem
from protocols.mllp import (SEGMENT_SEQUENCE_ERROR, HL7Error, Header, Message, MllpReader, build_ack, frame, is_batch,
                            peek_ack, peek_batch, peek_header)

log = logging.getLogger("medgate.simulate.hl7")

MODES = ("AA", "AE", "AR", "hang", "close", "slow")


@dataclass(frozen=True)
class Received:
    control_id: str
    message_type: str
    patient_id: str
    payload: bytes
    peer: str = ""  # host:port the message came from (the gateway's, or the client's own)


@dataclass
class HL7Receiver(TrioServer):
    """An MLLP receiver on `host:port` (port 0: any free one). Thread-safe record of messages."""

    name: str = "RIS"
    host: str = "127.0.0.1"
    port: int = 0
    mode: str = "AA"
    delay: float = 1.0  # seconds, for mode "slow"
    record: Path | None = None  # also append "MSH-10 peer-address" lines, flushed, before the ACK
    parse: bool = True  # parse with hl7apy and build the ACK with it (False: from MSH alone)
    validate: bool = False  # parse strictly; AE + ERR for a structure hl7apy rejects
    received: list[Received] = field(default_factory=list)
    # Guards `received`; notified on each arrival (the receiver may run in a thread of its own).
    _lock: threading.Condition = field(default_factory=threading.Condition, repr=False)
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

    async def wait_received(self, predicate: Callable[[list[str]], bool],
                            timeout: float = 10.0) -> list[str]:
        """The control ids received, once `predicate(control ids)` holds: woken by each
        arrival, not by polling, from any trio loop. TimeoutError after `timeout`."""
        await wait_on(self._lock, lambda: predicate(
            [message.control_id for message in self.received]), timeout,
            f"{self.describe()}: the messages waited for")
        return self.control_ids

    async def _handle(self, stream: trio.abc.Stream) -> None:
        reader = MllpReader()
        transport = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
        assert isinstance(transport, trio.SocketStream)
        try:
            peer = str(Address(*transport.socket.getpeername()[:2]))
        except OSError:  # gone already (a TCP health check that connects and closes)
            return
        try:
            while data := await stream.receive_some(65536):
                reader.feed(data)
                while (event := reader.next_event()) is not None:
                    if not isinstance(event, Message):
                        return  # junk or oversize: drop the connection, as many engines do
                    if not await self._answer(stream, event.payload, peer):
                        return
        except trio.BrokenResourceError:
            pass

    async def _answer(self, stream: trio.abc.Stream, payload: bytes, peer: str = "") -> bool:
        if is_batch(payload):  # recorded message by message, answered once, for the batch
            batch = peek_batch(payload)
            header = batch.header
            entries = [Received(control_id, "batch", "", payload, peer)
                       for control_id in batch.message_ids]
        else:
            header = peek_header(payload)
            entries = [Received(header.control_id, header.message_type, header.patient_id,
                                payload, peer)]
        with self._lock:
            self.received += entries
            self._lock.notify_all()
            if self.record is not None:
                with open(self.record, "a", encoding="latin-1") as record:
                    record.writelines(f"{entry.control_id} {entry.peer}\n" for entry in entries)
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
        if (self.parse or self.validate) and not is_batch(payload):
            problem = (structure_problem if self.validate else parse_problem)(payload)
            answer = self.hl7apy_ack(header, "AE" if problem else code, problem)
        else:
            answer = self.ack(header, code)
        await stream.send_all(frame(answer))
        return True

    def hl7apy_ack(self, header: Header, code: str, problem: Problem | None) -> bytes:
        """The ACK built with hl7apy: MSA-2 the message's MSH-10, MSA-3 why when not AA; an ERR
        naming the problem (HL7 table 0357 code 100) when hl7apy found one."""
        from hl7apy.core import Message as Hl7apyMessage

        def clean(text: str) -> str:  # a value, not structure: no separators in it
            return "".join(" " if char in "|^~\\&\r\n" else char for char in text)[:200]

        try:
            ack = Hl7apyMessage("ACK", version=header.version)
        except Exception:  # a version hl7apy does not know: answer in 2.5
            ack = Hl7apyMessage("ACK", version="2.5")
        ack.msh.msh_3, ack.msh.msh_4 = clean(self.name), "HOSP"
        ack.msh.msh_5 = clean(header.sending_application.split("^")[0])
        ack.msh.msh_7 = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
        ack.msh.msh_9 = f"ACK^{clean(header.trigger_event)}^ACK" if header.trigger_event else "ACK"
        ack.msh.msh_10 = f"{clean(self.name)}-{next(self._ids)}"
        ack.msh.msh_11 = clean(header.processing_id) or "P"
        ack.msa.msa_1, ack.msa.msa_2 = code, clean(header.control_id)
        if code != "AA" and problem is None:
            ack.msa.msa_3 = clean(f"{self.name} answers {code} on demand")
        if problem is not None:
            ack.add_segment("ERR")
            ack.err.err_3, ack.err.err_4 = SEGMENT_SEQUENCE_ERROR, "E"
            ack.err.err_8 = clean(f"{problem.kind}: {problem.detail}")
        return (ack.to_er7() + "\r").encode("latin-1", "replace")

    def ack(self, header: Header, code: str) -> bytes:
        timestamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
        return build_ack(header, code, control_id=f"{self.name}-{next(self._ids)}",
                         timestamp=timestamp,
                         text="" if code == "AA" else f"{self.name} answers {code} on demand")


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
