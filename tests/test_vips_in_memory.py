"""VIP handlers over memory links on trio's MockClock: the timeouts of minutes a clinical
exchange has (ack_timeout, assoc_timeout) are met in fake time, and what a VIP decides at
them is checked exactly, without a socket or a wall-clock bound."""

from __future__ import annotations

import trio

from gateway.testing.simulators.hl7_messages import make_messages
from gateway.vips.dicom import DicomVip
from gateway.vips.hl7 import HL7Vip
from gateway.vips.idle_pool import PROBATION, Habit
from protocols import mllp
from tests.helpers.memory_link import MemoryLink, connect_client, memory_vip

HL7_VIP = """
[[vip]]
name = "hl7"
protocol = "hl7"
listen = "127.0.0.1:0"
ack_timeout = "30s"
health = {{ check = "tcp", interval = "1h" }}
{extra}

[[vip.member]]
name = "ris1"
address = "192.0.2.10:2575"

[[vip.member]]
name = "ris2"
address = "192.0.2.11:2575"
"""


class Engine:
    """An HL7 receiver on memory links: records each message's MSH-10 and answers AA, or
    nothing while `silent`; with `closes_after` it closes each connection that long after
    answering, unread whatever came meanwhile (its FIN on the way, as hl7apy's MLLPServer
    does)."""

    def __init__(self, name: str, silent: bool = False,
                 closes_after: float | None = None) -> None:
        self.name = name
        self.silent = silent
        self.closes_after = closes_after
        self.received: list[str] = []

    async def serve(self, link: MemoryLink) -> None:
        reader = mllp.MllpReader(1 << 20)
        while True:
            while (event := reader.next_event()) is None:
                data = await link.receive_some()
                if not data:
                    return
                reader.feed(data)
            header = mllp.peek_header(event.payload)
            self.received.append(header.control_id)
            if not self.silent and header.accept_ack_type != "NE":
                await link.send_all(mllp.frame(
                    b"MSH|^~\\&|RIS||GW||20260101||ACK|A" + header.control_id.encode()
                    + b"|P|2.5\rMSA|AA|" + header.control_id.encode() + b"\r"))
                if self.closes_after is not None:
                    await trio.sleep(self.closes_after)
                    link.close()
                    return


async def read_answer(link: MemoryLink) -> bytes | None:
    """The next ACK's payload, or None when the gateway closed the connection instead."""
    reader = mllp.MllpReader(1 << 20)
    while (event := reader.next_event()) is None:
        data = await link.receive_some()
        if not data:
            return None
        reader.feed(data)
    return event.payload


async def test_an_unanswered_message_stays_with_its_engine_after_ack_timeout(autojump_clock):
    """ack_timeout (30 s) at ris1: the message is in doubt there. The sender's connection
    closes without an answer (as a direct connection to ris1 would look), ris2 never gets
    it, and the sender's resend goes back to ris1: one message, one engine."""
    ris1, ris2 = Engine("ris1", silent=True), Engine("ris2")
    async with trio.open_nursery() as nursery:
        handler = memory_vip(HL7Vip, HL7_VIP.format(
            extra='mode = "failover"\nmessage_timeout = "120s"'),
                             {"ris1": ris1.serve, "ris2": ris2.serve}, nursery)
        (message,) = make_messages(1, prefix="DOUBT")
        sender = connect_client(handler, nursery)
        started = trio.current_time()
        await sender.send_all(mllp.frame(message))
        assert await read_answer(sender) is None  # closed: the sender resends
        assert 30 <= trio.current_time() - started < 31
        assert (ris1.received, ris2.received) == (["DOUBT000001"], [])
        ris1.silent = False  # back, and answering
        sender = connect_client(handler, nursery)
        await sender.send_all(mllp.frame(message))
        answer = await read_answer(sender)
        assert answer is not None and mllp.peek_ack(answer).code == "AA"
        assert (ris1.received, ris2.received) == (["DOUBT000001"] * 2, [])
        await sender.aclose()
        nursery.cancel_scope.cancel()  # the members' pooled connections


async def test_ne_messages_are_forwarded_and_never_answered_or_timed_out(autojump_clock):
    """MSH-15 NE: the sender asked for no accept ACK. Each message reaches one engine once;
    no answer comes, not even after ten ack_timeouts, and no member is struck for the
    silence (formerly a one-second wall-clock wait over sockets)."""
    ris1, ris2 = Engine("ris1"), Engine("ris2")
    async with trio.open_nursery() as nursery:
        handler = memory_vip(HL7Vip, HL7_VIP.format(extra=""),
                             {"ris1": ris1.serve, "ris2": ris2.serve}, nursery)
        sender = connect_client(handler, nursery)
        ids = []
        for message in make_messages(4, prefix="NE"):
            msh, rest = message.split(b"\r", 1)
            ids.append(mllp.peek_header(message).control_id)
            await sender.send_all(mllp.frame(msh + b"|||NE|AL\r" + rest))
        with trio.move_on_after(300) as quiet:
            await sender.receive_some()
        assert quiet.cancelled_caught, "an NE message was answered"
        assert sorted(ris1.received + ris2.received) == sorted(ids)
        assert [handler.pool.member(name).failed for name in ("ris1", "ris2")] == [0, 0]
        await sender.aclose()
        nursery.cancel_scope.cancel()  # the members' pooled connections


async def ask(sender: MemoryLink, message: bytes) -> str:
    """Send one message, return the MSA-1 of its answer."""
    await sender.send_all(mllp.frame(message))
    answer = await read_answer(sender)
    assert answer is not None, "closed instead of an answer"
    return mllp.peek_ack(answer).code


async def test_an_engine_that_closes_after_each_answer_gets_a_connection_per_message(
        autojump_clock):
    """An engine that closes its connection 10 ms after each answer: the next message,
    sent at once, is not written to the closing connection (it would be in doubt, the sender
    cut off); the gateway waits once to see (PROBATION), learns, and from then on opens a
    connection per message without waiting."""
    ris1 = Engine("ris1", closes_after=0.01)
    async with trio.open_nursery() as nursery:
        handler = memory_vip(HL7Vip, HL7_VIP.format(extra='mode = "failover"'),
                             {"ris1": ris1.serve, "ris2": None}, nursery)
        sender = connect_client(handler, nursery)
        first, second, third = make_messages(3, prefix="ONE")
        assert await ask(sender, first) == "AA"
        started = trio.current_time()
        assert await ask(sender, second) == "AA"
        assert trio.current_time() - started == PROBATION  # the one wait
        assert handler.idle.habit("ris1") is Habit.CLOSES
        started = trio.current_time()
        assert await ask(sender, third) == "AA"
        assert trio.current_time() == started
        assert ris1.received == ["ONE000001", "ONE000002", "ONE000003"]
        assert handler.opened == {"ris1": 3, "ris2": 0}  # type: ignore[attr-defined]
        await sender.aclose()
        nursery.cancel_scope.cancel()


async def test_an_engine_that_keeps_its_connection_gets_every_message_on_it(autojump_clock):
    """The usual engine: one connection carries every message; the first reuse waited
    PROBATION once, and none after it waits."""
    ris1 = Engine("ris1")
    async with trio.open_nursery() as nursery:
        handler = memory_vip(HL7Vip, HL7_VIP.format(extra='mode = "failover"'),
                             {"ris1": ris1.serve, "ris2": None}, nursery)
        sender = connect_client(handler, nursery)
        started = trio.current_time()
        for message in make_messages(4, prefix="KEEP"):
            assert await ask(sender, message) == "AA"
        assert trio.current_time() - started == PROBATION
        assert handler.idle.habit("ris1") is Habit.KEEPS
        assert len(ris1.received) == 4
        assert handler.opened == {"ris1": 1, "ris2": 0}  # type: ignore[attr-defined]
        await sender.aclose()
        nursery.cancel_scope.cancel()


DICOM_VIP = """
[[vip]]
name = "pacs"
protocol = "dicom"
listen = "127.0.0.1:0"
assoc_timeout = "45s"
health = { check = "tcp", interval = "1h" }

[[vip.member]]
name = "pacs1"
address = "192.0.2.20:104"
ae_title = "PACS1"
"""


async def test_a_dicom_client_that_never_asks_is_closed_at_assoc_timeout(autojump_clock):
    """A connection that sends no A-ASSOCIATE-RQ holds no member: it is closed once
    assoc_timeout (45 s) has passed, and no member was ever connected to."""
    async with trio.open_nursery() as nursery:
        handler = memory_vip(DicomVip, DICOM_VIP, {"pacs1": None}, nursery)
        client = connect_client(handler, nursery)
        started = trio.current_time()
        assert await client.receive_some() == b""
        assert 45 <= trio.current_time() - started < 46
        assert handler.opened == {"pacs1": 0}  # type: ignore[attr-defined]
        nursery.cancel_scope.cancel()
