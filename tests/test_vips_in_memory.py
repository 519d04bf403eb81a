"""VIP handlers over memory links on trio's MockClock: the timeouts of minutes a clinical
exchange has (ack_timeout, assoc_timeout) are met in fake time, and what a VIP decides at
them is checked exactly, without a socket or a wall-clock bound."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import h11
import pytest
import trio
import trio.testing

from gateway.balancer import Health
from gateway.config import Destination
from gateway.net import http
from gateway.testing.simulators.hl7_messages import make_messages
from gateway.vips import Records
from gateway.vips.dicom import DicomVip
from gateway.vips.dicom_return import DicomReturnPath
from gateway.vips.hl7 import HL7Vip, _unit
from gateway.vips.xds import XdsVip
from gateway.net.limits import ClientSlot
from gateway.vips.hl7_exchange import SENT_AT_ONCE, WATCH_AFTER, Delivery, Upstream, exchange
from gateway.vips.hl7_sender import Sender
from gateway.vips.idle_pool import PROBATION, Habit
from protocols import dicom, mllp, soap
from tests.helpers.memory_link import MemoryLink, connect_client, memory_link_pair, memory_vip

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
        self.delay = 0.0  # seconds before each answer
        # what it sends instead of its AA, as is, for the message's MSH-10 (None: it closes)
        self.answer: Callable[[str], bytes | None] | None = None
        self.received: list[str] = []
        self.links: list[MemoryLink] = []  # its end of each connection, in order
        self.ended: list[float] = []  # when the gateway ended each connection

    async def serve(self, link: MemoryLink) -> None:
        self.links.append(link)
        reader = mllp.MllpReader(1 << 20)
        while True:
            while (event := reader.next_event()) is None:
                try:
                    data = await link.receive_some()
                except trio.ClosedResourceError:
                    return  # closed here, by the test
                if not data:
                    self.ended.append(trio.current_time())
                    return
                reader.feed(data)
            header = mllp.peek_header(event.payload)
            self.received.append(header.control_id)
            await trio.sleep(self.delay)
            if self.answer is not None:
                payload = self.answer(header.control_id)
                if payload is None:
                    link.close()
                    return
                await link.send_all(payload)
            elif not self.silent and header.accept_ack_type != "NE":
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


async def test_a_message_without_a_control_id_is_rejected_and_the_feed_goes_on(
        autojump_clock, caplog):
    """A message whose MSH reads but has no MSH-10 can be neither matched to its ACK nor
    told from its resend: the gateway rejects it (AR, ERR-3 101 required field missing, as
    an engine rejects an MSH it cannot accept) and no engine gets it. The connection stays:
    the sender's next message goes through (a close would have it resend the bad one for
    ever, its whole feed held up). A frame that is no HL7 message at all (no MSH) cannot be
    answered: the connection closes, logged."""
    caplog.set_level(logging.INFO, logger="medgate")
    ris1, ris2 = Engine("ris1"), Engine("ris2")
    async with trio.open_nursery() as nursery:
        handler = memory_vip(HL7Vip, HL7_VIP.format(extra=""),
                             {"ris1": ris1.serve, "ris2": ris2.serve}, nursery)
        sender = connect_client(handler, nursery)
        await sender.send_all(mllp.frame(
            b"MSH|^~\\&|LAB|HOSP|RIS|HOSP|20261207||ADT^A01||P|2.5\rPID|||P1\r"))
        answer = await read_answer(sender)
        assert answer is not None
        ack = mllp.peek_ack(answer)
        assert (ack.code, ack.control_id, ack.error_code) == ("AR", "", "101")
        (message,) = make_messages(1, prefix="NEXT")
        await sender.send_all(mllp.frame(message))
        answer = await read_answer(sender)
        assert answer is not None and mllp.peek_ack(answer).code == "AA"
        assert ris1.received + ris2.received == ["NEXT000001"]
        await sender.send_all(mllp.frame(b"PID|||P2\r"))
        assert await read_answer(sender) is None
        nursery.cancel_scope.cancel()
    assert "AR from the gateway: MSH-10 (message control ID) is empty" in caplog.text
    assert ("disconnected after 3 message(s): unreadable message, closed: message of 9 bytes "
            "does not start with an MSH segment") in caplog.text


async def test_a_sender_gone_before_its_answer_gets_its_resend_to_the_same_engine(
        autojump_clock, caplog):
    """An engine took the message and answered AA, but the sender had gone (a reset 50 ms
    in, before the watch of its message began): the answer cannot be given, the log says
    so, and the sender's resend goes to the engine that has it, not where the balance would
    send it next (resend affinity; pid-3 persistence is off here): one message, one engine."""
    caplog.set_level(logging.INFO, logger="medgate")
    ris1, ris2 = Engine("ris1"), Engine("ris2")
    ris1.delay = ris2.delay = 0.1
    async with trio.open_nursery() as nursery:
        handler = memory_vip(HL7Vip, HL7_VIP.format(extra='persistence = { key = "none" }'),
                             {"ris1": ris1.serve, "ris2": ris2.serve}, nursery)
        (message,) = make_messages(1, prefix="GONE")
        sender = connect_client(handler, nursery)
        await sender.send_all(mllp.frame(message))
        await trio.sleep(0.05)
        sender.close()
        await trio.sleep(1)
        (engine,) = [e for e in (ris1, ris2) if e.received == ["GONE000001"]]
        assert (f"control_id=GONE000001: the sender went away before its AA from "
                f"{engine.name}") in caplog.text
        sender = connect_client(handler, nursery)
        assert await ask(sender, message) == "AA"
        assert engine.received == ["GONE000001"] * 2
        assert (ris1.received + ris2.received).count("GONE000001") == 2
        await sender.aclose()
        nursery.cancel_scope.cancel()


async def test_two_workers_place_a_message_no_persistence_decides_alike(autojump_clock):
    """With workers and `persistence = { key = "none" }`, a message resent to another worker
    before the resend entry of the first reached it (~150 ms) went where that worker's round
    robin pointed: one message at two engines. A worker's pool places a message that no
    persistence key decides by the hash of its sender and MSH-10, so its resend is placed
    alike by any worker (here two handlers with pools of their own, one a message ahead)."""
    ris1, ris2 = Engine("ris1"), Engine("ris2")
    async with trio.open_nursery() as nursery:
        workers = [memory_vip(HL7Vip, HL7_VIP.format(extra='persistence = { key = "none" }'),
                              {"ris1": ris1.serve, "ris2": ris2.serve}, nursery)
                   for _ in range(2)]
        for handler in workers:
            handler.pool.report_to_leader()
        ahead = connect_client(workers[1], nursery)
        assert await ask(ahead, make_messages(1, prefix="AHEAD")[0]) == "AA"
        messages = make_messages(20, prefix="PLACE")
        for handler in workers:
            sender = connect_client(handler, nursery)
            for message in messages:
                assert await ask(sender, message) == "AA"
            await sender.aclose()
        for n in range(1, 21):
            held = [engine.received.count(f"PLACE{n:06d}") for engine in (ris1, ris2)]
            assert sorted(held) == [0, 2], (n, held)  # both copies at one engine
        assert "PLACE000001" in ris1.received + ris2.received
        assert all(engine.received for engine in (ris1, ris2))  # spread, as balancing does
        nursery.cancel_scope.cancel()


async def test_a_sender_that_does_not_read_its_answer_is_let_go_and_told_apart_from_idle(
        autojump_clock, caplog):
    """A sender whose socket takes none of its ACK (it stopped reading): the send is bounded
    with the message, by message_timeout + client_timeout, and the connection ends then,
    logged as what it is, not as a sender idle for client_timeout. The message was
    delivered, and recorded so: its resend will find its engine."""
    caplog.set_level(logging.INFO, logger="medgate")
    ris1 = Engine("ris1")
    async with trio.open_nursery() as nursery:
        handler = memory_vip(HL7Vip, HL7_VIP.format(
            extra='mode = "failover"\nmessage_timeout = "60s"\nclient_timeout = "30s"'),
                             {"ris1": ris1.serve, "ris2": None}, nursery)
        (message,) = make_messages(1, prefix="DEAF")
        sender = connect_client(handler, nursery)
        sender.inbox_limit = 0
        await sender.send_all(mllp.frame(message))
        started = trio.current_time()
        with trio.fail_after(3600):  # fake time: an unbounded send fails here, not hangs
            assert await sender.receive_some() == b""  # took nothing, then closed
        assert trio.current_time() - started == 90
        nursery.cancel_scope.cancel()
    assert ris1.received == ["DEAF000001"]
    (ended,) = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert ended.getMessage().endswith(
        "disconnected after 1 message(s): the sender did not read its answer: not taken "
        "within message_timeout + client_timeout (90s)")
    assert ended.levelno == logging.WARNING  # not INFO, as an idle sender's end is


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


# -- the quick way: a message on a pooled connection, its answer awaited in handle itself

@dataclass
class Warm:
    """An HL7 VIP (failover: ris1, then ris2) whose ris1 keeps its connections, learned:
    the sender's next message goes the quick way."""

    handler: HL7Vip
    sender: MemoryLink
    ris1: Engine
    ris2: Engine
    slot: ClientSlot


@asynccontextmanager
async def warm(extra: str = "") -> AsyncIterator[Warm]:
    ris1, ris2 = Engine("ris1"), Engine("ris2")
    async with trio.open_nursery() as nursery:
        handler = memory_vip(HL7Vip, HL7_VIP.format(extra='mode = "failover"\n' + extra),
                             {"ris1": ris1.serve, "ris2": ris2.serve}, nursery)
        assert isinstance(handler, HL7Vip)
        slot = ClientSlot("198.51.100.7:40000")
        sender = connect_client(handler, nursery, slot=slot)
        # a new connection, then its first reuse (PROBATION): learned
        for message in make_messages(2, prefix="WARM"):
            assert await ask(sender, message) == "AA"
        assert handler.idle.habit("ris1") is Habit.KEEPS
        yield Warm(handler, sender, ris1, ris2, slot)
        nursery.cancel_scope.cancel()


async def test_the_quick_way_waits_past_watch_after_for_a_slow_ack(autojump_clock):
    """An engine that answers after 5 s, on the pooled connection: the cancel scope that
    fires at WATCH_AFTER is not the end of the try: the wait goes on (the sender watched)
    and the ACK is relayed the moment it comes, on the same connection."""
    async with warm() as vip:
        vip.ris1.delay = 5.0
        started = trio.current_time()
        for message in make_messages(2, prefix="SLOW"):
            assert await ask(vip.sender, message) == "AA"
        assert trio.current_time() - started == 10.0
        assert vip.ris1.received[2:] == ["SLOW000001", "SLOW000002"]
        assert vip.handler.opened == {"ris1": 1, "ris2": 0}  # type: ignore[attr-defined]


async def test_a_message_read_as_the_alarm_comes_due_is_relayed_whole(autojump_clock):
    """The connection's one cancel scope may come due (here WATCH_AFTER past the last
    write) in the very pass of the scheduler that brings the sender's next message, as under
    load: the scope is cancelled, and the read has its bytes all the same. A message that
    goes the longer way (here one too large for the quick way) must not be cut short by
    that cancellation: it is relayed and answered (it was lost: no answer, no NAK)."""
    async with warm() as vip:
        (message,) = make_messages(1, prefix="DUE")
        assert await ask(vip.sender, message) == "AA"  # the alarm: WATCH_AFTER past its write
        await trio.testing.wait_all_tasks_blocked()  # the handler waits for the next message
        autojump_clock.jump(WATCH_AFTER * 2)  # a busy pass: the alarm passes meanwhile
        (large,) = make_messages(1, prefix="LARGE")
        vip.sender.send_now(mllp.frame(large + b"NTE|1||" + b"x" * SENT_AT_ONCE + b"\r"))
        answer = await read_answer(vip.sender)
        assert answer is not None, "the message was dropped: no answer"
        assert mllp.peek_ack(answer).code == "AA"
        assert vip.ris1.received[-1] == "LARGE000001"


async def test_an_answer_the_socket_takes_not_at_once_goes_whole_after_it(autojump_clock):
    """The sender's socket takes none of the ACK at once (its buffer full; over TLS, records
    still waiting): the rest goes with a send that waits, outside the connection's alarm,
    and arrives whole; the next message goes the quick way again."""
    async with warm() as vip:
        served = vip.sender.peer  # the gateway's end of the sender's connection
        assert served is not None
        takes, offered = served.send_now, []

        def full_once(data: bytes) -> int:
            offered.append(len(data))
            return 0 if len(offered) == 1 else takes(data)

        served.send_now = full_once  # type: ignore[method-assign]
        for message in make_messages(2, prefix="FULL"):
            assert await ask(vip.sender, message) == "AA"
        assert len(offered) == 3 and offered[0] == offered[1]  # offered, then sent whole
        assert vip.ris1.received[2:] == ["FULL000001", "FULL000002"]
        assert vip.handler.opened == {"ris1": 1, "ris2": 0}  # type: ignore[attr-defined]


async def test_a_small_message_whose_watch_after_passed_before_its_send_still_goes(
        autojump_clock):
    """exchange (the careful way) bounds a small message's send and first wait by
    WATCH_AFTER from when the message was read; under load the send may start after that:
    the message still goes whole, and its answer is awaited (it failed as "took not all of
    the message", the member blamed for the gateway's own delay)."""
    ris1 = Engine("ris1")
    near, far = memory_link_pair("ris1")
    (message,) = make_messages(1, prefix="LATE")
    read_at = trio.current_time()
    autojump_clock.jump(WATCH_AFTER * 5)  # busy between the read and the send
    sender = Sender(memory_link_pair("sender")[0], "sender")
    delivery = Delivery(mllp.peek_header(message), read_at, read_at + 60.0, sender)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ris1.serve, far)
        answer = await exchange(Upstream(near), "ris1", message, delivery, read_at, 30.0)
        nursery.cancel_scope.cancel()
    assert answer.code == "AA" and ris1.received == ["LATE000001"]
    assert delivery.written == ["ris1"]


async def test_the_quick_way_leaves_an_unanswered_message_in_doubt_at_its_engine(
        autojump_clock):
    """No ACK within ack_timeout on the pooled connection: in doubt at ris1, as on any
    other: the sender's connection closes at exactly 30 s, ris2 never gets it, ris1 is
    struck and its connection is closed, never reused (a late ACK must not answer the next
    message)."""
    async with warm('message_timeout = "120s"') as vip:
        vip.ris1.silent = True
        (message,) = make_messages(1, prefix="DOUBT")
        started = trio.current_time()
        await vip.sender.send_all(mllp.frame(message))
        assert await read_answer(vip.sender) is None
        assert trio.current_time() - started == 30.0
        assert (vip.ris1.received[2:], vip.ris2.received) == (["DOUBT000001"], [])
        assert vip.handler.pool.member("ris1").failed == 1
        await trio.testing.wait_all_tasks_blocked()
        assert vip.ris1.ended == [started + 30.0]  # its connection closed with the try


async def test_a_sender_gone_while_the_quick_way_waits_ends_the_try(autojump_clock):
    """The sender closes 2 s into a silent engine's wait (past WATCH_AFTER, where the
    sender is watched): the try ends then, not at ack_timeout; the engine's connection is
    closed and the message remembered at ris1 for its resend (resend affinity)."""
    async with warm() as vip:
        vip.ris1.silent = True
        (message,) = make_messages(1, prefix="GONE")
        await vip.sender.send_all(mllp.frame(message))
        await trio.sleep(2)
        gone_at = trio.current_time()
        await vip.sender.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert vip.ris1.ended == [gone_at]
        unit = _unit(mllp.peek_header(message))
        assert vip.handler.pool.resend_member(unit, gone_at) == "ris1"
        assert vip.ris2.received == []


async def test_an_idle_sender_is_closed_client_timeout_after_its_last_answer(
        autojump_clock):
    """client_timeout counts from the sender's last bytes, whatever the scope that fired
    early on the way (WATCH_AFTER, left from the last message): closed at exactly 60 s."""
    async with warm('client_timeout = "60s"') as vip:
        (message,) = make_messages(1, prefix="LAST")
        assert await ask(vip.sender, message) == "AA"
        answered = trio.current_time()
        assert await vip.sender.receive_some() == b""
        assert trio.current_time() - answered == 60.0


async def test_an_idle_sender_on_the_quick_way_may_be_evicted_for_room(autojump_clock):
    """Between messages the sender is idle and may be closed to make room (max_clients):
    an eviction closes it at once, and its engine connection stays pooled, clean."""
    async with warm() as vip:
        (message,) = make_messages(1, prefix="IDLE")
        assert await ask(vip.sender, message) == "AA"
        await trio.testing.wait_all_tasks_blocked()
        assert vip.slot.evictable
        evicted_at = trio.current_time()
        vip.slot.evict()
        assert await vip.sender.receive_some() == b""
        assert trio.current_time() == evicted_at and vip.slot.evicted
        assert vip.handler.idle.count("ris1") == 1 and vip.ris1.ended == []


async def test_an_eviction_that_comes_as_a_message_arrives_lets_it_be_answered(
        autojump_clock):
    """The message came in the same pass as the eviction (its read has the bytes, the
    cancellation is due): the message is relayed and answered, then the connection closes
    for room; it was written to the engine and dropped, its sender left without an answer."""
    async with warm() as vip:
        await trio.testing.wait_all_tasks_blocked()
        (message,) = make_messages(1, prefix="RACE")
        vip.sender.send_now(mllp.frame(message))
        vip.slot.evict()
        answer = await read_answer(vip.sender)
        assert answer is not None and mllp.peek_ack(answer).code == "AA"
        assert await vip.sender.receive_some() == b""  # then closed, for room
        assert vip.slot.evicted and vip.ris1.received[-1] == "RACE000001"


async def test_a_pooled_connection_its_engine_closed_is_not_written_to(autojump_clock):
    """The engine closed a pooled connection while it was idle: the next message is not
    written to it (it would be in doubt) but goes on a new connection, delivered once."""
    async with warm() as vip:
        vip.ris1.links[0].close()
        await trio.testing.wait_all_tasks_blocked()
        (message,) = make_messages(1, prefix="STALE")
        assert await ask(vip.sender, message) == "AA"
        assert vip.ris1.received == ["WARM000001", "WARM000002", "STALE000001"]
        assert vip.handler.opened == {"ris1": 2, "ris2": 0}  # type: ignore[attr-defined]
        assert vip.handler.pool.member("ris1").failed == 0  # not the engine's failure


def _ack(control_id: str) -> bytes:
    """An AA for `control_id`, framed."""
    return mllp.frame(b"MSH|^~\\&|RIS||GW||20260101||ACK|X|P|2.5\rMSA|AA|"
                      + control_id.encode() + b"\r")


async def _in_doubt_at_ris1(answer: Callable[[str], bytes | None]) -> None:
    """A message on the quick way that ris1 takes, then sends `answer` for: the sender's
    connection closes at once without an answer (in doubt at ris1: it resends there), ris2
    never gets it, ris1 is struck and its connection closed."""
    async with warm() as vip:
        vip.ris1.answer = answer
        (message,) = make_messages(1, prefix="ODD")
        started = trio.current_time()
        await vip.sender.send_all(mllp.frame(message))
        assert await read_answer(vip.sender) is None
        assert trio.current_time() == started  # at once, not at ack_timeout
        assert (vip.ris1.received[2:], vip.ris2.received) == (["ODD000001"], [])
        assert vip.handler.pool.member("ris1").failed == 1
        await trio.testing.wait_all_tasks_blocked()
        assert vip.ris1.ended == [started] or vip.ris1.links[0].closed


async def test_an_ack_for_another_message_on_the_quick_way_leaves_it_in_doubt(autojump_clock):
    await _in_doubt_at_ris1(lambda control_id: _ack("SOMETHING-ELSE"))


async def test_junk_instead_of_an_ack_on_the_quick_way_leaves_it_in_doubt(autojump_clock):
    await _in_doubt_at_ris1(lambda control_id: b"not an HL7 message")


async def test_an_engine_closing_before_its_ack_on_the_quick_way_leaves_it_in_doubt(
        autojump_clock):
    await _in_doubt_at_ris1(lambda control_id: None)


async def test_a_commit_nak_on_the_quick_way_moves_the_message_to_the_next_member(
        autojump_clock):
    """An MLLP commit NAK says ris1 did not take it: not in doubt, ris2 gets it and its
    AA goes to the sender; the try counts as a retry."""
    async with warm() as vip:
        vip.ris1.answer = lambda control_id: mllp.frame(mllp.COMMIT_NAK)
        (message,) = make_messages(1, prefix="NAKED")
        assert await ask(vip.sender, message) == "AA"
        assert vip.ris1.received[2:] == vip.ris2.received == ["NAKED000001"]
        assert vip.handler.pool.retried == 1


async def test_in_doubt_next_member_moves_a_quick_way_message_on(autojump_clock):
    """in_doubt = "next-member" (engines sharing one de-duplication store): an ACK for
    another message at ris1 sends the message on to ris2, whose AA the sender gets."""
    async with warm('in_doubt = "next-member"') as vip:
        vip.ris1.answer = lambda control_id: _ack("SOMETHING-ELSE")
        (message,) = make_messages(1, prefix="NEXT")
        assert await ask(vip.sender, message) == "AA"
        assert vip.ris1.received[2:] == vip.ris2.received == ["NEXT000001"]


async def test_bytes_after_the_ack_keep_the_connection_out_of_the_pool(autojump_clock):
    """An engine that sends something after its ACK: that connection is not reused (the
    extra bytes could answer the next message), the engine is struck for it, and the next
    message goes on a new connection."""
    async with warm() as vip:
        vip.ris1.answer = lambda control_id: _ack(control_id) + b"EXTRA"
        first, second = make_messages(2, prefix="MORE")
        assert await ask(vip.sender, first) == "AA"
        vip.ris1.answer = None
        assert await ask(vip.sender, second) == "AA"
        assert vip.handler.opened == {"ris1": 2, "ris2": 0}  # type: ignore[attr-defined]
        assert vip.handler.pool.member("ris1").failed == 1


async def test_a_sender_cancelled_while_the_quick_way_waits_closes_the_engine_connection(
        autojump_clock):
    """The gateway stops (or the VIP goes with a reload) while a message's ACK is awaited
    the quick way: that engine connection is closed, never pooled, and no longer counted."""
    ris1 = Engine("ris1")
    async with trio.open_nursery() as nursery:
        handler = memory_vip(HL7Vip, HL7_VIP.format(extra='mode = "failover"'),
                             {"ris1": ris1.serve, "ris2": None}, nursery)
        async with trio.open_nursery() as serving:
            sender = connect_client(handler, serving)
            for message in make_messages(2, prefix="WARM"):  # learned: it keeps them
                assert await ask(sender, message) == "AA"
            ris1.silent = True
            (message,) = make_messages(1, prefix="STOP")
            await sender.send_all(mllp.frame(message))
            await trio.sleep(0.1)  # before WATCH_AFTER: the quick wait itself
            stopped = trio.current_time()
            serving.cancel_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert ris1.ended == [stopped]
        assert handler.pool.member("ris1").active == 0
        assert handler.idle.count("ris1") == 0
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


TWO_PACS_FAILOVER = DICOM_VIP.replace('assoc_timeout = "45s"',
                                     'assoc_timeout = "45s"\nmode = "failover"') + """
[[vip.member]]
name = "pacs2"
address = "192.0.2.21:104"
ae_title = "PACS2"
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


async def test_a_dicom_client_silent_in_its_opening_may_be_evicted_for_room(autojump_clock,
                                                                         caplog):
    """The wait for the A-ASSOCIATE-RQ is the client's opening (evicted first under
    pressure) and its assoc_timeout, in one scope: an eviction 10 s in closes it then, as
    an eviction (logged where it was decided), not as an association that failed."""
    caplog.set_level(logging.INFO, logger="medgate")
    async with trio.open_nursery() as nursery:
        handler = memory_vip(DicomVip, DICOM_VIP, {"pacs1": None}, nursery)
        slot = ClientSlot("198.51.100.7:40000")
        client = connect_client(handler, nursery, slot=slot)
        await trio.sleep(10)
        evicted_at = trio.current_time()
        slot.evict()
        assert await client.receive_some() == b""
        assert trio.current_time() == evicted_at and slot.evicted
        nursery.cancel_scope.cancel()
    assert "outcome=" not in caplog.text  # no association summary: it never was one


async def test_a_pacs_that_leaves_the_request_unanswered_is_left_at_assoc_timeout(
        autojump_clock, caplog):
    """The wait for a member's A-ASSOCIATE-AC is bounded by a time limit (assoc_timeout):
    when it passes, that member's connection is closed and, no other member able to take
    the association, the modality is rejected transient (it keeps its images)."""
    caplog.set_level(logging.INFO, logger="medgate")
    asked: list[MemoryLink] = []

    async def silent(link: MemoryLink) -> None:
        asked.append(link)
        while await link.receive_some():
            pass  # reads the request, never answers

    async with trio.open_nursery() as nursery:
        handler = memory_vip(DicomVip, TWO_PACS_FAILOVER, {"pacs1": silent, "pacs2": None},
                             nursery)
        client = connect_client(handler, nursery)
        started = trio.current_time()
        client.send_now(dicom.encode_associate_rq("PACS", "MODALITY", [
            (1, dicom.VERIFICATION_SOP_CLASS, [dicom.IMPLICIT_VR_LITTLE_ENDIAN])]))
        answer = await client.receive_some()
        assert trio.current_time() - started == 45
        assert answer[0] == dicom.A_ASSOCIATE_RJ and answer[7] == 2  # result: transient
        assert asked[0].peer is not None and asked[0].peer.closed
        assert "no answer to the A-ASSOCIATE-RQ within 45s" in caplog.text
        nursery.cancel_scope.cancel()


ECHO_CONTEXTS = [(1, dicom.VERIFICATION_SOP_CLASS, [dicom.IMPLICIT_VR_LITTLE_ENDIAN])]


async def _next_pdu(link: MemoryLink, reader: dicom.PduReader) -> bytes:
    while (pdu := reader.next_pdu()) is None:
        data = await link.receive_some()
        assert data, "closed before a whole PDU"
        reader.feed(data)
    return pdu


def echoing_pacs(answers: bool, closes: bool = True) -> Callable[[MemoryLink], object]:
    """A PACS that accepts the association and its C-ECHO-RQ, then answers it (or never
    does), and reads on until the gateway closes its sending side, then closes (or not)."""
    async def serve(link: MemoryLink) -> None:
        reader = dicom.PduReader()
        request = dicom.Association.decode(await _next_pdu(link, reader))
        await link.send_all(dicom.encode_associate_ac(request))
        await _next_pdu(link, reader)  # the C-ECHO-RQ
        if answers:
            await link.send_all(dicom.encode_c_echo_rsp(1, 1))
        while await link.receive_some():
            pass
        if closes:
            link.close()
    return serve


async def _ask_then_wait(config: str, answers: bool,
                         request: bytes = dicom.encode_c_echo_rq(1, 1),
                         ) -> tuple[DicomVip, float, bytes]:
    """One association through the VIP: its request (a C-ECHO-RQ unless given), answered
    or not, then nothing from the modality; (handler, seconds from the RQ's last byte to the
    gateway's end of the association, what the modality got after the AC)."""
    async with trio.open_nursery() as nursery:
        handler = memory_vip(DicomVip, config, {"pacs1": echoing_pacs(answers)}, nursery)
        client = connect_client(handler, nursery)
        reader = dicom.PduReader()
        client.send_now(dicom.encode_associate_rq("PACS", "MODALITY", ECHO_CONTEXTS + [
            (3, dicom.STUDY_ROOT_FIND, [dicom.IMPLICIT_VR_LITTLE_ENDIAN])]))
        assert (await _next_pdu(client, reader))[0] == dicom.A_ASSOCIATE_AC
        client.send_now(request)
        asked = trio.current_time()
        after = b""
        while chunk := await client.receive_some():
            after += chunk
        waited = trio.current_time() - asked
        nursery.cancel_scope.cancel()
    return handler, waited, after  # type: ignore[return-value]


def answering_pacs(answer: Callable[[dicom.Association], bytes]) -> Callable[[MemoryLink],
                                                                         object]:
    """A PACS that answers the A-ASSOCIATE-RQ with `answer(request)`, then reads on."""
    async def serve(link: MemoryLink) -> None:
        reader = dicom.PduReader()
        await link.send_all(answer(dicom.Association.decode(await _next_pdu(link, reader))))
        while await link.receive_some():
            pass
    return serve


@pytest.mark.parametrize(("answer", "detail"), [
    (lambda request: b"\x99" + bytes(9),
     "answered the A-ASSOCIATE-RQ with garbage: unrecognized PDU type 0x99"),
    (lambda request: dicom.encode_c_echo_rsp(1, 1),
     "answered the A-ASSOCIATE-RQ with P-DATA-TF"),
    (lambda request: bytes([dicom.A_ABORT, 0, 0, 0, 0, 2, 0, 0]),  # 2 bytes: it has 4
     "sent a malformed A-ABORT"),
    (lambda request: bytes([dicom.A_ASSOCIATE_AC, 0, 0, 0, 0, 4, 0, 1, 0, 0]),  # no fixed part
     "sent a malformed A-ASSOCIATE-AC"),
], ids=["garbage", "p-data", "short-abort", "short-ac"])
async def test_a_pacs_that_answers_the_request_wrongly_is_struck_and_the_next_one_asked(
        autojump_clock, caplog, answer, detail):
    """A member whose answer to the A-ASSOCIATE-RQ is not an AC, RJ or A-ABORT, or is one
    that cannot be read, gets a strike and the next member gets the request: the modality
    sees only pacs2's AC."""
    caplog.set_level(logging.INFO, logger="medgate")
    async with trio.open_nursery() as nursery:
        handler = memory_vip(DicomVip, TWO_PACS_FAILOVER, {"pacs1": answering_pacs(answer),
                                                           "pacs2": echoing_pacs(True)}, nursery)
        client = connect_client(handler, nursery)
        reader = dicom.PduReader()
        client.send_now(dicom.encode_associate_rq("PACS", "MODALITY", ECHO_CONTEXTS))
        assert (await _next_pdu(client, reader))[0] == dicom.A_ASSOCIATE_AC
        nursery.cancel_scope.cancel()
    assert handler.pool.member("pacs1").live_failures == 1
    assert detail in caplog.text


# client_timeout and server_timeout apart, to tell which one bounded the wait
TIMED_DICOM_VIP = DICOM_VIP.replace('assoc_timeout = "45s"',
                                    'assoc_timeout = "45s"\nclient_timeout = "2m"\n'
                                    'server_timeout = "10m"')


# A request of the modality's, and its command's name
ECHO, FIND = (dicom.encode_c_echo_rq(1, 1), "C-ECHO-RQ"), (
    dicom.encode_c_find_rq(3, 1, dicom.encode_study_query("P1")), "C-FIND-RQ")


@pytest.mark.parametrize(("asked", "counted", "detail"), [
    (ECHO, True, "a response to a C-ECHO-RQ of 600s ago"),
    (FIND, False,
     "a response to a C-FIND-RQ of 600s ago (a query or retrieve: not counted against it)"),
], ids=["echo", "find"])
async def test_a_pacs_that_owes_a_response_is_waited_server_timeout_then_counted(
        autojump_clock, caplog, asked, counted, detail):
    """A PACS that took a request and sends nothing is what the association waits on, not an
    idle modality: it gets server_timeout (10 min, not the 2 min of client_timeout), then the
    modality is told (A-ABORT, so it keeps what was not answered) and the stall counts
    against the PACS as a failure status does, named in the log; not when it owed a query
    or retrieve, which may take long for its own size."""
    caplog.set_level(logging.INFO, logger="medgate")
    handler, waited, after = await _ask_then_wait(TIMED_DICOM_VIP, False, asked[0])
    assert waited == 600
    assert after == dicom.ABORT_PROVIDER.encode()
    assert handler.pool.member("pacs1").status_failures == (1 if counted else 0)
    assert f"outcome=pacs1 sent nothing for 600s, owing {detail}" in caplog.text


@pytest.mark.parametrize("who_gives_up", ["gateway", "modality"])
async def test_a_pacs_that_accepts_associations_but_stalls_every_request_is_marked_down(
        autojump_clock, caplog, who_gives_up):
    """Each association is accepted (a live success) and then stalls, until the gateway's
    server_timeout (1 min) or, with the default server_timeout (1 h), the modality's own
    time limit (an A-ABORT after 30 s) ends it: the stalls are not cleared by the next AC.
    error_limit (3) of them in a row, from two calling AEs within status_window, mark the
    PACS down though it accepts associations; the next modality's association goes to
    pacs2."""
    caplog.set_level(logging.INFO, logger="medgate")
    config = TWO_PACS_FAILOVER if who_gives_up == "modality" else TWO_PACS_FAILOVER.replace(
        'assoc_timeout = "45s"', 'assoc_timeout = "45s"\nserver_timeout = "1m"')
    async with trio.open_nursery() as nursery:
        handler = memory_vip(DicomVip, config, {"pacs1": echoing_pacs(False),
                                                "pacs2": echoing_pacs(True)}, nursery)
        pacs1 = handler.pool.member("pacs1")

        async def associate(calling: str) -> bytes:
            client = connect_client(handler, nursery)
            reader = dicom.PduReader()
            client.send_now(dicom.encode_associate_rq("PACS", calling, ECHO_CONTEXTS))
            assert (await _next_pdu(client, reader))[0] == dicom.A_ASSOCIATE_AC
            client.send_now(dicom.encode_c_echo_rq(1, 1))
            if who_gives_up == "modality":
                with trio.move_on_after(30):
                    return await _next_pdu(client, reader)
                client.send_now(dicom.Abort(0, 0).encode())
                await client.send_eof()
                assert await client.receive_some() == b""
                return b""
            return await _next_pdu(client, reader)

        for calling in ("CT01", "MR01", "CT01"):
            assert await associate(calling) in (b"", dicom.ABORT_PROVIDER.encode())
        await trio.testing.wait_all_tasks_blocked()  # the handler judges once both sides end
        assert pacs1.health is Health.DOWN and pacs1.live_failures == 0
        assert (await associate("US01"))[0] == dicom.P_DATA_TF  # pacs2's C-ECHO-RSP
        nursery.cancel_scope.cancel()
    assert "3 failure statuses in a row from 2 senders" in caplog.text


async def test_an_association_nobody_owes_anything_ends_idle_without_a_strike(
        autojump_clock, caplog):
    """Once the PACS has answered, the association is idle: it ends at the shorter of the two
    timeouts (2 min) as an idle timeout, not a failure of the PACS."""
    caplog.set_level(logging.INFO, logger="medgate")
    handler, waited, after = await _ask_then_wait(TIMED_DICOM_VIP, answers=True)
    assert waited == 120
    assert after.endswith(dicom.ABORT_PROVIDER.encode())  # after the C-ECHO-RSP
    assert handler.pool.member("pacs1").live_failures == 0
    assert "idle timeout after 120s" in caplog.text and "owing" not in caplog.text


class _Receipts:
    """Records.receipts' one method a DICOM VIP calls per C-STORE, recorded."""

    def __init__(self) -> None:
        self.added: list[tuple[str, str, int]] = []

    def add(self, vip: str, calling_ae: str, client: str, member: str, sop_class: str,
            sop_instance: str, status: int) -> None:
        self.added.append((member, sop_instance, status))


CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
TAG_AFFECTED_SOP_INSTANCE = 0x00001000


def c_store_rq(message_id: int, instance: str) -> bytes:
    """P-DATA-TFs carrying a C-STORE-RQ of a CT image (PS3.7 §9.1.1) and a data set."""
    return dicom.encode_p_data([dicom.Pdv(1, True, True, dicom.encode_command({
        dicom.TAG_AFFECTED_SOP_CLASS: CT_IMAGE, dicom.TAG_COMMAND_FIELD: 0x0001,
        dicom.TAG_MESSAGE_ID: message_id, dicom.TAG_PRIORITY: 0,
        dicom.TAG_DATA_SET_TYPE: 0x0000, TAG_AFFECTED_SOP_INSTANCE: instance}))]) + (
        dicom.encode_p_data([dicom.Pdv(1, False, True, b"\0" * 64)]))


def c_store_rsp(message_id: int, instance: str) -> bytes:
    """A P-DATA-TF carrying a C-STORE-RSP, success."""
    return dicom.encode_p_data([dicom.Pdv(1, True, True, dicom.encode_command({
        dicom.TAG_AFFECTED_SOP_CLASS: CT_IMAGE, dicom.TAG_COMMAND_FIELD: 0x8001,
        dicom.TAG_MESSAGE_ID_RESPONDED: message_id, dicom.TAG_DATA_SET_TYPE: dicom.NO_DATA_SET,
        dicom.TAG_STATUS: 0, TAG_AFFECTED_SOP_INSTANCE: instance}))])


async def test_a_c_store_the_pacs_never_answered_has_a_receipt_that_says_so(autojump_clock):
    """The receipt of an image whose C-STORE-RSP never came (the PACS went silent, the
    association ended at server_timeout) says it was not stored (status -1): what `gateway
    trace` shows for an image the modality must still have."""
    ct_image, instance = CT_IMAGE, "1.2.826.0.1.3680043.2.1143.77"
    store = c_store_rq(7, instance)
    receipts = _Receipts()
    async with trio.open_nursery() as nursery:
        handler = memory_vip(DicomVip, TIMED_DICOM_VIP, {"pacs1": echoing_pacs(False)}, nursery)
        handler.records = Records(receipts=receipts)  # type: ignore[arg-type]
        client = connect_client(handler, nursery)
        reader = dicom.PduReader()
        client.send_now(dicom.encode_associate_rq("PACS", "MODALITY", [
            (1, ct_image, [dicom.IMPLICIT_VR_LITTLE_ENDIAN])]))
        assert (await _next_pdu(client, reader))[0] == dicom.A_ASSOCIATE_AC
        client.send_now(store)
        assert await _next_pdu(client, reader) == dicom.ABORT_PROVIDER.encode()
        nursery.cancel_scope.cancel()
    assert receipts.added == [("pacs1", instance, -1)]


@pytest.mark.parametrize(("asked", "waits", "pacs_closes", "counted"), [
    (ECHO, 30, True, True),
    (ECHO, 30, False, True),
    (FIND, 30, True, False),
    (ECHO, 5, True, False),
], ids=["echo", "echo-pacs-stays", "find", "echo-cancelled"])
async def test_a_modality_that_gives_up_on_a_silent_pacs_counts_against_it(
        autojump_clock, caplog, asked, waits, pacs_closes, counted):
    """A modality's own time limit (an A-ABORT 30 s after its request) ends the association
    as the modality's abort; the log says what the PACS still owed, and it counts against
    the PACS as a stall past server_timeout does: not for a query or retrieve, nor for an
    abort after less than GAVE_UP_AFTER (10 s) of silence (a user's cancel). After an
    A-ABORT nothing is owed: a PACS that then keeps its end open is left at the shorter
    timeout, as an idle association, and counted once."""
    caplog.set_level(logging.INFO, logger="medgate")
    async with trio.open_nursery() as nursery:
        handler = memory_vip(DicomVip, TIMED_DICOM_VIP,
                             {"pacs1": echoing_pacs(False, closes=pacs_closes)}, nursery)
        client = connect_client(handler, nursery)
        reader = dicom.PduReader()
        client.send_now(dicom.encode_associate_rq("PACS", "MODALITY", ECHO_CONTEXTS + [
            (3, dicom.STUDY_ROOT_FIND, [dicom.IMPLICIT_VR_LITTLE_ENDIAN])]))
        assert (await _next_pdu(client, reader))[0] == dicom.A_ASSOCIATE_AC
        client.send_now(asked[0])
        await trio.sleep(waits)
        client.send_now(dicom.Abort(0, 0).encode())
        await client.send_eof()
        aborted = trio.current_time()
        assert await client.receive_some() == b""
        assert trio.current_time() - aborted == (0 if pacs_closes else 120)
        await trio.testing.wait_all_tasks_blocked()  # the handler judges once both sides end
        nursery.cancel_scope.cancel()
    pacs1 = handler.pool.member("pacs1")
    assert (pacs1.status_failures, pacs1.live_failures) == (1 if counted else 0, 0)
    if pacs_closes:
        assert (f"aborted by the client while pacs1 was owing a response to a {asked[1]} of "
                f"{waits}s ago" in caplog.text)
    else:
        assert "outcome=idle timeout after 120s" in caplog.text


async def test_an_http_head_is_timed_from_its_wait_then_from_its_first_bytes(autojump_clock):
    """The XDS VIP's read of a request head (http.next_request): a silent client for
    idle_timeout, then a slow-loris one for header_timeout counted from its first byte."""
    client, server = trio.testing.memory_stream_pair()
    started = trio.current_time()
    with pytest.raises(trio.TooSlowError):
        await http.next_request(server, h11.Connection(h11.SERVER), idle_timeout=30,
                                header_timeout=5)
    assert trio.current_time() - started == 30

    async def dribble() -> None:
        await trio.sleep(10)
        for byte in b"POST /registry HTTP/1.1\r\nHost: xds\r\n":
            await client.send_all(bytes([byte]))
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(dribble)
        started = trio.current_time()
        with pytest.raises(http.SlowHead):
            await http.next_request(server, h11.Connection(h11.SERVER), idle_timeout=30,
                                    header_timeout=5)
        assert trio.current_time() - started == 10 + 5
        nursery.cancel_scope.cancel()


XDS_VIP = """
[[vip]]
name = "xds"
protocol = "xds"
listen = "127.0.0.1:0"
client_timeout = "30s"
health = { check = "tcp", interval = "1h" }

[[vip.member]]
name = "registry1"
address = "192.0.2.30:8080"
role = "registry"
"""
ITI18_TYPE = f'application/soap+xml; charset=UTF-8; action="{soap.ITI18}"'


async def registry(link: MemoryLink) -> None:
    """An XDS registry on memory links: every request answered 200 with a small body."""
    connection = h11.Connection(h11.SERVER)
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            data = await link.receive_some()
            connection.receive_data(data)
            if not data:
                return
        elif isinstance(event, h11.EndOfMessage):
            body = b"<Envelope>found</Envelope>"
            for reply in (h11.Response(status_code=200, headers=[
                    ("Content-Type", "application/soap+xml"),
                    ("Content-Length", str(len(body)))]), h11.Data(data=body),
                    h11.EndOfMessage()):
                await link.send_all(connection.send(reply))
            connection.start_next_cycle()
        elif isinstance(event, h11.ConnectionClosed):
            return


def send_query(client: MemoryLink, connection: h11.Connection) -> None:
    """An ITI-18 request, sent whole over `client`."""
    body = b"<Envelope>FindDocuments</Envelope>"
    for event in (h11.Request(method="POST", target="/registry", headers=[
            ("Host", "xds"), ("Content-Type", ITI18_TYPE),
            ("Content-Length", str(len(body)))]), h11.Data(data=body), h11.EndOfMessage()):
        client.send_now(connection.send(event))


async def query(client: MemoryLink, connection: h11.Connection) -> int | None:
    """One ITI-18 over `client`; the response's status, None when the gateway closed."""
    send_query(client, connection)
    status = None
    while not isinstance(event := connection.next_event(), h11.EndOfMessage):
        if event is h11.NEED_DATA:
            data = await client.receive_some()
            if not data:
                return None
            connection.receive_data(data)
        elif isinstance(event, h11.Response):
            status = event.status_code
    connection.start_next_cycle()
    return status


async def test_an_xds_request_read_as_its_idle_deadline_passes_is_answered(autojump_clock):
    """The wait for the next request is bounded by a time limit (client_timeout). It may pass
    in the very pass of the scheduler that brings the next request, as under load: the
    limit's task finds the request's bytes there, and leaves the link open for the handler
    to read them (gateway.net.deadlines, GRACE). That request must be served, not cut off:
    it is answered, and the connection goes on."""
    async with trio.open_nursery() as nursery:
        handler = memory_vip(XdsVip, XDS_VIP, {"registry1": registry}, nursery)
        client = connect_client(handler, nursery)
        connection = h11.Connection(h11.CLIENT)
        assert await query(client, connection) == 200
        await trio.testing.wait_all_tasks_blocked()  # the handler waits for the next request
        autojump_clock.jump(31)  # a busy pass: client_timeout passes meanwhile
        assert await query(client, connection) == 200, "the request was cut off"
        assert await query(client, connection) == 200  # the connection goes on
        started = trio.current_time()
        assert await client.receive_some() == b""  # then idles out at client_timeout
        assert trio.current_time() - started == 30
        nursery.cancel_scope.cancel()


async def test_an_xds_client_that_does_not_read_its_fault_is_let_go(autojump_clock, caplog):
    """The gateway's own Fault (here a 503: the registry refuses connections) is a write the
    client has client_timeout to take, as a member's response is: one that never reads is
    closed then, and the log says why."""
    caplog.set_level(logging.INFO, logger="medgate")
    async with trio.open_nursery() as nursery:
        handler = memory_vip(XdsVip, XDS_VIP, {"registry1": None}, nursery)
        client = connect_client(handler, nursery)
        client.inbox_limit = 0
        send_query(client, h11.Connection(h11.CLIENT))
        started = trio.current_time()
        with trio.fail_after(3600):  # fake time: an unbounded send fails here, not hangs
            assert await client.receive_some() == b""  # took nothing, then closed
        assert trio.current_time() - started == 30
        nursery.cancel_scope.cancel()
    assert "connection ended: the client read nothing of the fault for 30s" in caplog.text


async def test_an_xds_connection_times_heads_and_lets_an_idle_client_go(autojump_clock, caplog):
    """The bounds of the wait for a request, kept by time limits: a new client that says
    nothing goes at header_timeout; a head counts header_timeout from its first byte
    (slow-loris), even when a byte comes as the limit passes; a client idle between
    requests may be evicted for room (the connection's scope)."""
    caplog.set_level(logging.INFO, logger="medgate")
    config = XDS_VIP.replace('client_timeout = "30s"', 'client_timeout = "30s"\n'
                                                       'header_timeout = "5s"')
    async with trio.open_nursery() as nursery:
        handler = memory_vip(XdsVip, config, {"registry1": registry}, nursery)
        silent = connect_client(handler, nursery, ("198.51.100.8", 40000))
        started = trio.current_time()
        assert await silent.receive_some() == b""
        assert trio.current_time() - started == 5
        slow = connect_client(handler, nursery, ("198.51.100.9", 40000))

        async def dribble() -> None:
            await trio.sleep(3)
            for byte in b"POST /registry HTTP/1.1\r\nHost: x":  # 33 s at this pace
                try:
                    slow.send_now(bytes([byte]))
                except trio.BrokenResourceError:
                    return  # closed: the test looks when
                await trio.sleep(1)

        started = trio.current_time()
        nursery.start_soon(dribble)
        assert await slow.receive_some() == b""
        assert trio.current_time() - started == 3 + 5
        await trio.testing.wait_all_tasks_blocked()  # the limit closed it; the handler logs
        assert "request head not complete after 5s: closed" in caplog.text
        slot = ClientSlot("198.51.100.7:40000")
        idle = connect_client(handler, nursery, slot=slot)
        assert await query(idle, h11.Connection(h11.CLIENT)) == 200
        await trio.sleep(10)
        evicted_at = trio.current_time()
        slot.evict()
        assert await idle.receive_some() == b""
        assert trio.current_time() == evicted_at and slot.evicted
        nursery.cancel_scope.cancel()


async def test_an_xds_query_a_registry_leaves_unanswered_goes_to_the_next_at_ack_timeout(
        autojump_clock, caplog):
    """The wait for a member's answer is bounded by a time limit (ack_timeout): when it
    passes, the silent member's connection is closed and the query, which may be tried
    again, is answered by the next registry."""
    silent_links: list[MemoryLink] = []

    async def silent(link: MemoryLink) -> None:
        silent_links.append(link)
        while await link.receive_some():
            pass  # reads the query, never answers

    config = XDS_VIP.replace('client_timeout = "30s"', 'client_timeout = "30s"\n'
                                                       'ack_timeout = "7s"\nmode = "failover"')
    config += '\n[[vip.member]]\nname = "registry2"\naddress = "192.0.2.31:8080"\nrole = "registry"\n'
    async with trio.open_nursery() as nursery:
        handler = memory_vip(XdsVip, config, {"registry1": silent, "registry2": registry},
                             nursery)
        client = connect_client(handler, nursery)
        started = trio.current_time()
        assert await query(client, h11.Connection(h11.CLIENT)) == 200
        assert trio.current_time() - started == 7
        assert handler.opened == {"registry1": 1, "registry2": 1}
        assert silent_links[0].peer is not None and silent_links[0].peer.closed
        assert "no response within 7s" in caplog.text
        nursery.cancel_scope.cancel()


async def test_an_xds_registry_that_stalls_in_its_response_is_struck_and_named(
        autojump_clock, caplog):
    """A member that stops in the middle of its response: at server_timeout the client's
    connection is closed (the head went out: nothing else can tell it), the member gets a
    strike, and the log names the member, not the client."""
    async def stalls(link: MemoryLink) -> None:
        connection = h11.Connection(h11.SERVER)
        while not isinstance(event := connection.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                connection.receive_data(await link.receive_some())
        await link.send_all(connection.send(h11.Response(status_code=200, headers=[
            ("Content-Type", "application/soap+xml"), ("Content-Length", "1000")])))
        await link.send_all(connection.send(h11.Data(data=b"<Envelope>")))
        await trio.sleep_forever()

    caplog.set_level(logging.INFO, logger="medgate")
    config = XDS_VIP.replace('client_timeout = "30s"', 'client_timeout = "30s"\n'
                                                       'server_timeout = "20s"')
    async with trio.open_nursery() as nursery:
        handler = memory_vip(XdsVip, config, {"registry1": stalls}, nursery)
        client = connect_client(handler, nursery)
        started = trio.current_time()
        assert await query(client, h11.Connection(h11.CLIENT)) is None  # cut after the head
        assert trio.current_time() - started == 20
        await trio.testing.wait_all_tasks_blocked()
        assert handler.pool.member("registry1").live_failures == 1
        assert "connection ended: registry1 broke off its response: sent nothing for 20s" \
            in caplog.text
        assert "idle for" not in caplog.text
        nursery.cancel_scope.cancel()


async def test_an_xds_client_that_stalls_in_its_request_body_is_told_apart_from_an_idle_one(
        autojump_clock, caplog):
    caplog.set_level(logging.INFO, logger="medgate")
    async with trio.open_nursery() as nursery:
        handler = memory_vip(XdsVip, XDS_VIP, {"registry1": registry}, nursery)
        client = connect_client(handler, nursery)
        connection = h11.Connection(h11.CLIENT)
        client.send_now(connection.send(h11.Request(method="POST", target="/registry", headers=[
            ("Host", "xds"), ("Content-Type", ITI18_TYPE), ("Content-Length", "100")])))
        client.send_now(connection.send(h11.Data(data=b"<Envelope>Find")))
        started = trio.current_time()
        assert await client.receive_some() == b""
        assert trio.current_time() - started == 30
        await trio.testing.wait_all_tasks_blocked()
        assert "connection ended: the client sent nothing of its request for 30s" in caplog.text
        assert "idle for" not in caplog.text
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("response, told", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nnot a header DOE^JANE\r\n\r\nabc",
     "registry1 failed: illegal header line;"),  # its head: the query is not answered
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\nDOE^JANE\r\n",
     "registry1 broke off its response: illegal chunk header\n"),  # its body, once begun
])
async def test_what_a_registry_sends_wrong_is_logged_without_its_bytes(response, told, caplog):
    """h11 quotes the bytes it could not read; a member's are left out of the log (and the
    member's strike and the client's Fault), as a client's are (http.reason_of)."""
    async def garbles(link: MemoryLink) -> None:
        connection = h11.Connection(h11.SERVER)
        while not isinstance(event := connection.next_event(), h11.EndOfMessage):
            if event is h11.NEED_DATA:
                connection.receive_data(await link.receive_some())
        await link.send_all(response)
        await trio.sleep_forever()

    caplog.set_level(logging.DEBUG, logger="medgate")
    async with trio.open_nursery() as nursery:
        handler = memory_vip(XdsVip, XDS_VIP, {"registry1": garbles}, nursery)
        client = connect_client(handler, nursery)
        await query(client, h11.Connection(h11.CLIENT))
        await trio.testing.wait_all_tasks_blocked()
        assert told in caplog.text and "DOE" not in caplog.text
        assert handler.pool.member("registry1").live_failures == 1
        nursery.cancel_scope.cancel()


# A return path; server_timeout short (a site that wants a stalled PACS caught in a minute)
RETURN_PATH_VIP = DICOM_VIP.replace(
    'assoc_timeout = "45s"', 'assoc_timeout = "45s"\nae_titles = ["ARCHIVE"]\n'
    'return_listen = "127.0.0.2:0"\nclient_timeout = "10m"\nserver_timeout = "1m"') + """
[[vip.destination]]
ae_title = "CT01"
address = "192.0.2.30:104"
"""


def storing_destination(answer_after: float | None) -> Callable[[MemoryLink], object]:
    """A modality's storage SCP: accepts the association, answers its C-STORE-RQ after
    `answer_after` seconds (None: never, and closes once the gateway does), then its
    A-RELEASE-RQ."""
    async def serve(link: MemoryLink) -> None:
        reader = dicom.PduReader()
        request = dicom.Association.decode(await _next_pdu(link, reader))
        await link.send_all(dicom.encode_associate_ac(request))
        await _next_pdu(link, reader)  # the C-STORE-RQ's command
        await _next_pdu(link, reader)  # ... and its data set
        if answer_after is None:  # reads on (an A-ABORT), then closes
            while await link.receive_some():
                pass
            link.close()
            return
        await trio.sleep(answer_after)
        await link.send_all(c_store_rsp(1, "1.2.3.4"))
        if (await _next_pdu(link, reader))[0] == dicom.A_RELEASE_RQ:
            await link.send_all(dicom.RELEASE_RP)
    return serve


@pytest.mark.parametrize(("answer_after", "ends_after", "outcome"), [
    (300, 300, "outcome=released"),
    (None, 600, "outcome=destination CT01 sent nothing for 600s, owing a response to a "
                "C-STORE-RQ of 600s ago"),
    (None, 30, "outcome=aborted by the member while destination CT01 was owing a response "
               "to a C-STORE-RQ of 30s ago"),
], ids=["slow", "silent", "member-gives-up"])
async def test_the_return_path_waits_on_a_destination_as_on_a_modality(
        autojump_clock, caplog, answer_after, ends_after, outcome):
    """On the return path the destination (a workstation taking a C-MOVE's image) is the
    modality: while it owes a response the association waits client_timeout (10 min), not
    the 1 min server_timeout that catches a stalled PACS, so a slow store completes; one
    that never answers ends at client_timeout, the member told (A-ABORT: it keeps the
    sub-operation as failed) and the log naming what the destination owed, as it does when
    the member gives up first (its own A-ABORT after 30 s)."""
    caplog.set_level(logging.INFO, logger="medgate")
    async with trio.open_nursery() as nursery:
        handler = memory_vip(DicomReturnPath, RETURN_PATH_VIP, {}, nursery)
        destination = storing_destination(answer_after)

        async def open_destination(config: Destination) -> MemoryLink:
            ours, theirs = memory_link_pair(f"gateway to {config.ae_title}")
            nursery.start_soon(destination, theirs)
            return ours

        handler.open_destination = open_destination  # type: ignore[method-assign]
        member = connect_client(handler, nursery, address=("192.0.2.20", 50000))
        reader = dicom.PduReader()
        member.send_now(dicom.encode_associate_rq("CT01", "PACS1", [
            (1, CT_IMAGE, [dicom.IMPLICIT_VR_LITTLE_ENDIAN])]))
        assert (await _next_pdu(member, reader))[0] == dicom.A_ASSOCIATE_AC
        member.send_now(c_store_rq(1, "1.2.3.4"))
        asked = trio.current_time()
        with trio.move_on_after(ends_after if ends_after < 60 else 3600):
            answer = await _next_pdu(member, reader)
        assert trio.current_time() - asked == ends_after
        if ends_after < 60:
            member.send_now(dicom.Abort(0, 0).encode())
            await member.send_eof()
        elif answer_after is None:
            assert answer == dicom.ABORT_PROVIDER.encode()
        else:
            assert answer == c_store_rsp(1, "1.2.3.4")
            member.send_now(dicom.RELEASE_RQ)
            assert (await _next_pdu(member, reader))[0] == dicom.A_RELEASE_RP
            await member.send_eof()
        while await member.receive_some():
            pass
        nursery.cancel_scope.cancel()
    assert outcome in caplog.text
