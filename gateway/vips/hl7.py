"""HL7 v2 / MLLP VIP: balance per message, not per connection, and never lose one.

Rules kept here (docs/hl7.md; HL7 v2.5 §2.9 acknowledgments):
- Each framed message gets its own pick (persistence by source IP, MSH-4 or PID-3 keeps the
  messages of one facility or patient on one member, in order).
- An ACK reaches the sender only from a member, relayed unchanged, and only when its MSA-2 is the
  message's MSH-10; the one exception is the gateway's own NAK below.
- A member that fails before the whole message was written to it (refused, reset, not reading)
  or says it did not take it (an MLLP commit NAK): the same message goes to the next member.
- Once the whole message was written, a member that fails to answer (reset, closed, no ACK
  within `ack_timeout`, an ACK for another message) leaves it *in doubt*: it may have processed
  it, so no other member gets it (one processed by two engines cannot be de-duplicated by
  either) unless `in_doubt = "next-member"`; the sender's connection is closed (or NAKed,
  `in_doubt_answer`), so it resends. Either way that upstream connection is closed, never
  reused (a late ACK must never answer the next message).
- A resent message (the same MSH-3, MSH-4 and MSH-10) goes to the member that took it before
  while that member is up (resend affinity, `resend_memory`), so it can tell the duplicate.
- No member, or every try failed before delivery: a NAK from the gateway (MSA-1 `nak_code`: AR,
  or CE in enhanced mode, MSA-2 = MSH-10, MSH-3/4 the gateway's own, ERR saying why), so the
  sender keeps the message and resends (or a close, `when_none_up = "close"`).
- A member's AE/AR is its application's answer and is relayed as is.
- MSH-15 NE or ER (enhanced mode, no accept ACK, or one only on error): the message is
  delivered once fully written to a member, never sent again; an answer that member sends for
  it within `ack_timeout` is relayed while the sender is connected (ER: its error ACK).
- A batch (a frame starting with FHS or BHS, HL7 v2.5 §2.10.3) is one unit: relayed whole
  to one member, its answer (a response batch whose BHS-12 is the batch's BHS-11, or an ACK
  for the batch or one of its messages) relayed back; retried and NAKed as a message is.
- `routes` pick the members by MSH fields (first match wins); a message no route takes is
  rejected by the gateway (AR, or CR in enhanced mode): resending it would not help.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from functools import partial

import trio

from gateway.balancer import Member, NoMemberAvailable, stable_hash
from gateway.config import InDoubt, InDoubtAnswer, VipConfig, WhenNoneUp
from gateway.config.model import ROUTE_FIELDS, MessageRoute
from gateway.net.channel import Channel, receive
from gateway.net.link import Link
from gateway.net.limits import ClientSlot, Evicted
from gateway.net.peer import Peer
from gateway.net.relay import (MemberFailed, choose, clock_reader, describe_os_error, dispatch,
                               strike, unwell)
from gateway.vips import PooledVipHandler
from gateway.vips.idle_pool import KEEPS, PROBATION, Habit, Residue, leftover
from gateway.vips.hl7_exchange import (SENT_AT_ONCE, WATCH_AFTER, Answer, Delivery,
                                       InDoubtError, SenderGone, StaleConnection, Upstream,
                                       after_sending, answer_watching, check_answer, exchange,
                                       read_answer, try_bounds)
from gateway.vips.shadow import HL7Copy, HL7Shadow
from gateway.vips.hl7_sender import QUIET_ENDINGS, Ending, Sender, SessionEnd, first_event
from protocols.hl7_structure import structure_problem
from protocols.mllp import (APPLICATION_ERROR, BATCH_STARTS, REQUIRED_FIELD_MISSING,
                            SEGMENT_SEQUENCE_ERROR, Batch, Event, HL7Error, Header, Message,
                            MissingControlId, MllpReader, Oversize, build_ack, frame, is_batch,
                            peek_batch, peek_header)

log = logging.getLogger("medgate.hl7")

UNAWAITED = ("NE", "ER")  # MSH-15 accept ACK types whose ACK is not waited for
# What `handle` does outside its alarm's scope (see there): how the connection ends, if it does
Later = Callable[[], Awaitable[SessionEnd | None]]
MAX_LATE_WAITS = 64  # per sender: member connections read for a late answer at once
ANSWERED_WELL = ("AA", "CA", "commit", "batch")  # answers that speak for the member's health
# Without unwell_acks, an AR or CR says the member itself is unwell only with no error code or
# 207 (application internal error, HL7 table 0357); a code about the message (1xx content,
# 200-206 unsupported type, event, processing ID, version, unknown or duplicate key, record
# locked) says nothing of the member, however often the message is resent.
UNWELL_CODES = ("AR", "CR")
UNWELL_ERRORS = ("", "207")
_nak_ids = itertools.count(1)
_PARSER = trio.CapacityLimiter(1)  # hl7apy is pure Python: more threads would only queue on the GIL


class HL7Vip(PooledVipHandler):
    """Handles each sender connection of one `protocol = "hl7"` VIP."""

    shadow_type = HL7Shadow

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._clock: Callable[[], float] = trio.current_time  # handle: the run's clock_reader
        self._records = self.audit.layout(
            "hl7", "vip", "client", "message_type", "control_id", "member", "ack", "told",
            "gateway_nak", "tries", "latency_ms")

    def reconfigure(self, vip: VipConfig) -> None:
        super().reconfigure(vip)
        # The gateway's own NAKs say they are the gateway's (MSH-3/4), not the receiver's.
        self.nak_sender = (vip.hl7_application, vip.hl7_facility or socket.gethostname())
        persistence = vip.persistence
        if vip.persistence_implicit and persistence is not None:
            log.info("vip=%s keeps each patient's messages on one member, in order: "
                     "persistence by %s (rendezvous hash) as no persistence is set", vip.name,
                     persistence.key)

    def _copy_to_shadows(self, message: Message, delivery: Delivery, member: Member,
                         answer: Answer) -> None:
        """The unit, answered, to every shadow's queue (the client has its answer)."""
        header = delivery.header
        self._to_shadows(HL7Copy(header.message_type, header.control_id, member.name,
                                 message.payload, answer.code, answer.error_code))

    async def handle(self, client: Link, slot: ClientSlot) -> None:
        """Serve one sender connection: message after message until it closes or idles out;
        answers members send later to its NE/ER messages are relayed meanwhile (`listening`).
        The usual message (small, awaited, not a batch, to a member over plain TCP,
        with a pooled connection to its member) is read, written and its answer awaited in
        this one function, the least a message can cost; any other message, and a try that
        does not end with a quick ACK, take the same steps in `_relay` and `_carry`.

        One cancel scope bounds every wait of the quick way. Its deadline (`alarm`) may come
        early, never late: it is moved to come sooner (WATCH_AFTER past a write,
        client_timeout past the sender's last bytes), and later only to the watch of a message
        just written, when that of an earlier one (landed) is near. When it fires, what was
        awaited is still in hand here (the message written in `flight`, the bytes in the
        readers), the clock says whether a bound has truly passed, and a new scope takes over:
        under load, one scope for a few hundred messages instead of one a message. What must
        not stop halfway (the other ways, a slow member's answer, a send that waits) is left
        in `later` and done outside that scope, in one bounding the message as a whole: the
        scope may have come due in the very pass that read the message's last bytes, and a
        cancellation once due cannot be put off by moving the deadline."""
        vip, pool = self.vip, self.pool
        evicted = False
        async with trio.open_nursery() as listening:
            sender = Sender(client, slot.client, slot.peer, listening, vip.max_message_bytes)
            reader = sender.reader
            log.info("vip=%s client=%s connected", vip.name, sender.name)
            messages = 0
            end: SessionEnd | None = None
            flight: _Flight | None = None
            later: Later | None = None  # what `handle`'s scope must not cut short
            evict_after = False  # an eviction came as a message arrived: that one first
            # the clock of the per-message reads (here and in _settled): two calls, not four
            clock = self._clock = clock_reader()
            heard = clock()  # client_timeout counts from the sender's last bytes
            alarm = heard + vip.client_timeout
            slack = min(1.0, vip.client_timeout / 10)  # as move_deadline: a move costs a read
            try:
                while end is None:
                    with trio.CancelScope(deadline=alarm) as scope:
                        while end is None:
                            if flight is None:
                                # -- the sender's next message
                                while (event := reader.next_event()) is None:
                                    idle_at = heard + vip.client_timeout
                                    if alarm > idle_at + slack:
                                        alarm = scope.deadline = idle_at
                                    between = not reader.pending  # idle: may be closed for room
                                    if between:  # ClientSlot.idle, inline
                                        slot.idle_scope, slot.idle_since = scope, heard
                                    try:
                                        data = await receive(client, between and messages > 0)
                                    except (trio.BrokenResourceError,
                                            trio.ClosedResourceError) as exc:
                                        end = SessionEnd(Ending.BROKEN, describe_os_error(exc))
                                        break
                                    finally:
                                        if between:
                                            slot.idle_scope = slot.idle_since = None
                                    if not data:
                                        end = (SessionEnd(Ending.CUT, f"{reader.buffered} bytes "
                                                          "unanswered, the sender still has them")
                                               if reader.buffered else SessionEnd(Ending.CLOSED))
                                        break
                                    heard = clock()
                                    reader.feed(data)
                                if end is not None:
                                    break
                                now = heard
                                assert event is not None
                                if isinstance(event, Oversize):
                                    later = partial(self._refuse_oversize, sender, event)
                                    break
                                if not isinstance(event, Message):
                                    end = SessionEnd(Ending.JUNK, f"{len(event.data)} bytes")
                                    break
                                messages += 1
                                payload = event.payload
                                try:  # _read_header, inline for all but a batch
                                    header, batch = ((peek_header(payload), None)
                                                     if payload[:3] not in BATCH_STARTS
                                                     else _read_header(payload))
                                except MissingControlId as exc:
                                    if payload[:3] in BATCH_STARTS:  # one of a batch's
                                        end = SessionEnd(Ending.UNREADABLE, exc.reason)
                                        break
                                    # Answered, not closed: a sender resends what a closed
                                    # connection left unanswered, for ever, its feed held up
                                    later = partial(self._refuse, Delivery(
                                        exc.header, now, now + vip.message_timeout, sender),
                                        Refused(NO_CONTROL_ID))
                                    break
                                except HL7Error as exc:
                                    end = SessionEnd(Ending.UNREADABLE, exc.reason)
                                    break
                                if not (batch is None and len(payload) < SENT_AT_ONCE
                                        and header.accept_ack_type not in UNAWAITED
                                        and vip.validate != "structure"):
                                    later = partial(self._relay, sender, event, header, batch,
                                                    now)
                                    break
                                # -- the quick way: a pooled connection, its answer awaited here
                                delivery = Delivery(header, now, now + vip.message_timeout, sender,
                                                    unit=_unit(header))
                                try:
                                    among, key = self._plan(delivery, header)
                                    member = choose(pool, key, now, among=among,
                                                    place=delivery.unit)
                                except (NoMemberAvailable, Refused) as exc:
                                    later = partial(self._refuse, delivery, exc)
                                    break
                                upstream = self._quick_upstream(member, sender.peer, now)
                                if upstream is not None:
                                    pool.take_conn(member)
                                    data = frame(payload)
                                    try:
                                        if upstream.stream.send_now(data) == len(data):
                                            flight = _Flight(event, delivery, member, upstream, key,
                                                             among, *try_bounds(
                                                                 delivery, now, vip.ack_timeout))
                                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                                        pass
                                    if flight is None:  # gone or full: tried again, the usual way
                                        upstream.stream.close()
                                        pool.drop_conn(member)
                                if flight is None:  # a new connection, or the member's first reuse
                                    later = partial(self._carry, event, delivery, key, among,
                                                    first=member)
                                    break
                                delivery.tries.append(member.name)
                                delivery.written.append(member.name)
                                watch_at = now + WATCH_AFTER  # min(), without the call:
                                flight.watch_at = (watch_at if watch_at < flight.deadline
                                                   else flight.deadline)
                                if (alarm > flight.watch_at
                                        or alarm < now + WATCH_AFTER / 2):
                                    # Sooner for this message; or later, when the watch of
                                    # one that has landed is about to fire: a move costs ten
                                    # calls, a scope that fires a cancellation and a new scope
                                    alarm = scope.deadline = flight.watch_at
                            if (flight.reply is None and flight.failure is None
                                    and not flight.watching):
                                # -- its answer (a fresh scope resumes this wait if the last fired)
                                replies = flight.upstream.reader
                                while (reply := replies.next_event()) is None:
                                    try:
                                        data = await receive(flight.upstream.stream, True)
                                    except (trio.BrokenResourceError,
                                            trio.ClosedResourceError) as exc:
                                        flight.failure = MemberFailed(
                                            f"{describe_os_error(exc)} before the ACK")
                                        break
                                    if not data:
                                        flight.failure = MemberFailed(
                                            "connection closed before the ACK")
                                        break
                                    replies.feed(data)
                                else:
                                    flight.reply = reply
                            landing, flight = flight, None
                            end, heard, later = self._land(landing)
                            if later is not None or evict_after:
                                break
                    if later is not None:
                        # outside the alarm's scope, in one for the message and its answer
                        with trio.move_on_after(vip.message_timeout
                                                + vip.client_timeout) as bounded:
                            end = await later()
                        later = None
                        heard = trio.current_time()
                        alarm = heard + vip.client_timeout
                        if bounded.cancelled_caught:
                            # What outlives the message's own bounds: the send of its answer
                            end = SessionEnd(Ending.UNREAD, (
                                "not taken within message_timeout + client_timeout "
                                f"({vip.message_timeout + vip.client_timeout:g}s)"))
                        evict_after = slot.evicted  # one that came as the message was read
                    if evict_after or scope.cancelled_caught and slot.evicted and flight is None:
                        evicted = True  # raised outside the nursery, as itself
                        break
                    if scope.cancelled_caught:
                        now = trio.current_time()
                        if flight is not None:  # its answer awaited
                            # (an eviction that came as it was read waits for its answer)
                            evict_after = slot.evicted
                            if now >= flight.watch_at:  # `_land` waits on, the sender watched
                                flight.watching = True
                                alarm = now + vip.client_timeout
                            else:
                                alarm = flight.watch_at
                        elif now >= heard + vip.client_timeout:
                            end = SessionEnd(Ending.IDLE, f"{vip.client_timeout:g}s")
                        else:
                            alarm = heard + vip.client_timeout
            finally:
                listening.cancel_scope.cancel()  # the sender has gone: no one to relay to
                if flight is not None:  # cancelled from outside while its answer was awaited
                    flight.upstream.stream.close()
                    pool.drop_conn(flight.member)
        if evicted:
            raise Evicted
        assert end is not None
        log.log(logging.INFO if end.ending in QUIET_ENDINGS else logging.WARNING,
                "vip=%s client=%s disconnected after %d message(s): %s", vip.name,
                sender.name, messages, end)

    def _quick_upstream(self, member: Member, peer: Peer | None,
                        now: float) -> Upstream | None:
        """A pooled plain-TCP connection to `member`, clean, for `handle`'s quick way; None
        when it has none, when it uses TLS, or when a first reuse must be tried the careful
        way (_first_reuse)."""
        name = member.name
        if name in self.member_tls or self.idle.habit(name) is not KEEPS:
            return None
        # _take_idle and _origin, inline: on the path of every message
        origin = (peer.source if peer and (self.members[name].send_proxy or self.vip.transparent)
                  else None)
        return self.idle.take(name, origin, now, self.vip.server_timeout,
                              partial(self._clean, member))

    def _land(self, flight: _Flight) -> tuple[SessionEnd | None, float, Later | None]:
        """What comes of a message written the quick way, as far as it goes without a wait:
        its answer relayed, or its try failed and handled as `_try` and dispatch would have;
        (how the connection ends, if it does; when the sender was last heard or answered;
        what is left that waits, for `handle` to do outside its alarm's scope: a slow
        member's answer, the next try or the gateway's answer, the rest of an answer)."""
        delivery, member, upstream = flight.delivery, flight.member, flight.upstream
        if flight.watching:  # past WATCH_AFTER
            return None, trio.current_time(), partial(self._land_watched, flight)
        answer: Answer | None = None
        failure = flight.failure
        if failure is None:
            if not isinstance(flight.reply, Message):
                failure = MemberFailed("answered with something that is not an MLLP frame")
            else:
                try:
                    answer = check_answer(flight.reply.payload, delivery)
                except MemberFailed as exc:
                    failure = exc
        if answer is None:
            assert failure is not None
            upstream.stream.close()
            failed = self._try_failed(member, delivery, after_sending(member.name, failure))
            if isinstance(failed, InDoubtError):
                self.pool.drop_conn(member)
                return None, trio.current_time(), partial(self._answer_in_doubt, delivery,
                                                          failed)
            return None, trio.current_time(), partial(
                self._carry, flight.message, delivery, flight.key, flight.among,
                failed=(member, failed))
        delivery.answered.append(member.name)
        if not upstream.reader.pending or self._clean(member, upstream):
            self.idle.put(member.name, upstream, delivery.started)
        else:
            upstream.stream.close()
        self.pool.report_success(member, flight.key)
        sender = delivery.sender
        data, heard = self._settled(flight.message, delivery, member, answer, flight.key)
        gone = False
        if data:
            sent = sender.send_at_once(data)
            if sent is not None and (sent < len(data) or sender.client.unsent):  # waits for room
                return None, heard, partial(self._answer_rest, flight, answer, data[sent:])
            gone = sent is None
        end = (self._after_answer(flight.message, delivery, member, answer, gone)
               if gone or self.shadows else None)
        return end, heard, None

    async def _land_watched(self, flight: _Flight) -> SessionEnd | None:
        """`_land` for a member silent past WATCH_AFTER: its answer awaited, the sender
        watched meanwhile, then landed."""
        delivery, member, upstream = flight.delivery, flight.member, flight.upstream
        try:
            flight.reply = Message(await answer_watching(
                upstream, True, delivery, flight.deadline, flight.bound))
        except MemberFailed as exc:
            flight.failure = exc
        except SenderGone:
            upstream.stream.close()
            self.pool.drop_conn(member)
            self._sender_gone(delivery)
            return SessionEnd(Ending.GONE)
        except BaseException:
            upstream.stream.close()
            self.pool.drop_conn(member)
            raise
        flight.watching = False
        end, _, later = self._land(flight)
        return await later() if later is not None else end

    async def _answer_rest(self, flight: _Flight, answer: Answer,
                           rest: bytes) -> SessionEnd | None:
        """The part of an answer the sender's socket did not take at once (TLS records
        waiting in `unsent`, if nothing else)."""
        gone = not await flight.delivery.sender.send(rest)
        return self._after_answer(flight.message, flight.delivery, flight.member, answer, gone)

    async def refuse(self, client: Link, client_name: str, why: str) -> None:
        """Over max_clients: a NAK for the first message if it comes in time, else a close."""
        self.pool.count_refused()
        header = None
        event = await first_event(client, MllpReader(self.vip.max_message_bytes), self.vip)
        try:
            header = _answerable_header(event.payload) if isinstance(event, Message) else None
        except HL7Error:
            pass
        if header is None:
            log.warning("vip=%s client=%s refused, closed: %s", self.vip.name, client_name, why)
            return
        now = trio.current_time()
        await self._nak_and_record(Delivery(header, now, now, Sender(client, client_name)),
                                   why)

    async def _refuse_oversize(self, sender: Sender, event: Oversize) -> SessionEnd:
        why = (f"message of more than {self.vip.max_message_bytes} bytes "
               f"(max_message_bytes; {event.size} received)")
        try:
            header = _answerable_header(event.head)
        except HL7Error:
            return SessionEnd(Ending.OVERSIZE, f"{why}; its MSH cannot be read")
        log.warning("vip=%s client=%s control_id=%s type=%s refused: %s", self.vip.name,
                    sender.name, header.control_id, header.message_type, why)
        self.pool.count_refused()
        await sender.send(self._nak(header, why))
        return SessionEnd(Ending.OVERSIZE, f"{event.size} bytes received: NAKed")

    async def _relay(self, sender: Sender, message: Message, header: Header,
                     batch: Batch | None, now: float) -> SessionEnd | None:
        """Deliver one message (read at `now`) and answer the sender; a SessionEnd when the
        sender's connection ends with it."""
        first = batch.first if batch else header  # routes and persistence go by the first MSH
        delivery = Delivery(header, now, now + self.vip.message_timeout, sender, batch,
                            unit=_unit(header))
        try:
            if self.vip.validate == "structure" and batch is None:
                await self._validate(message.payload)
                if delivery.out_of_time:  # queued behind other messages' validation
                    raise Refused
            among, key = self._plan(delivery, first)
        except Refused as exc:
            return await self._refuse(delivery, exc)
        return await self._carry(message, delivery, key, among)

    def _plan(self, delivery: Delivery,
              first: Header) -> tuple[Sequence[str] | None, str | None]:
        """The members a message may go to (its route's; the one its earlier copy went to,
        for a resend) and its persistence key; Refused when no route takes it."""
        route = delivery.route = self._route(first) if self.vip.message_routes else None
        among = route.members if route else None
        earlier = self.pool.resend_member(delivery.unit, delivery.started)
        if earlier is not None and (among is None or earlier in among):
            among = (earlier,)  # a resend: where the first copy went, or a NAK (it retries)
            delivery.resent_to = earlier
        persistence = self.vip.persistence
        if persistence is None:
            return among, None
        if persistence.key == "msh-4":
            return among, first.sending_facility
        if persistence.key == "pid-3":
            # A merge or move goes with the prior patient (MRG-1), whose member holds it; a
            # message without a PID keeps its facility's order (MSH-4).
            return among, (first.prior_patient_id or first.patient_id
                           or first.sending_facility or None)
        peer = delivery.sender.peer
        return among, peer.host if peer is not None else None

    async def _carry(self, message: Message, delivery: Delivery, key: str | None,
                     among: Sequence[str] | None, *, first: Member | None = None,
                     failed: tuple[Member, MemberFailed] | None = None) -> SessionEnd | None:
        """Try members (`first` first; after `failed`, a try `handle` made) until one takes
        the message, and answer the sender: its ACK, or the gateway's NAK or a close."""
        sender = delivery.sender
        try:
            member, answer = await dispatch(
                self.pool, key, partial(self._try, message=message, delivery=delivery),
                among=among, unit=f"control_id={delivery.header.control_id}",
                once=delivery.unit, now=delivery.started, first=first, failed=failed,
                place=delivery.unit)
        except (NoMemberAvailable, Refused) as exc:
            return await self._refuse(delivery, exc)
        except InDoubtError as exc:
            return await self._answer_in_doubt(delivery, exc)
        except SenderGone:
            self._sender_gone(delivery)
            return SessionEnd(Ending.GONE)
        data, _ = self._settled(message, delivery, member, answer, key)
        gone = bool(data) and not await sender.send(data)
        return self._after_answer(message, delivery, member, answer, gone)

    def _settled(self, message: Message, delivery: Delivery, member: Member, answer: Answer,
                 key: str | None) -> tuple[bytes, float]:
        """A message `member` took: counted, remembered (resend affinity), judged, logged and
        recorded before the sender is answered (every ACK it sees has its record); the frame
        to answer it with (b"" for MSH-15 NE/ER: no answer yet) and when its answer came."""
        header, sender = delivery.header, delivery.sender
        self.pool.drop_conn(member, len(message.payload), len(answer.payload))
        end = self._clock()
        self.pool.delivered(delivery.unit, member.name, end)
        first = delivery.batch.first if delivery.batch else header
        if first.prior_patient_id:
            self._note_merge(first, member, key)
        if answer.code in ANSWERED_WELL:  # _judge's usual answer, without the call
            self.pool.answered_well(member, end)
        elif answer.payload:  # MSH-15 NE/ER: no answer (yet) to judge
            self._judge(member, answer, delivery, end)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("vip=%s client=%s control_id=%s type=%s member=%s ack=%s tries=%d "
                      "latency=%.1fms", self.vip.name, sender.name, header.control_id,
                      header.message_type, member.name, answer.code, len(delivery.tries),
                      (end - delivery.started) * 1000)
        self._audit(delivery, member.name, answer.code,
                    f"{answer.code} from {member.name}" if answer.payload else
                    f"nothing (MSH-15 {header.accept_ack_type})", end=end)
        return (frame(answer.payload) if answer.payload else b""), end

    def _after_answer(self, message: Message, delivery: Delivery, member: Member,
                      answer: Answer, gone: bool) -> SessionEnd | None:
        """After the sender was answered (or found `gone` doing so): its end, or the unit
        copied to the shadows."""
        if gone:
            log.warning("vip=%s client=%s control_id=%s: the sender went away before its %s "
                        "from %s", self.vip.name, delivery.sender.name,
                        delivery.header.control_id, answer.code, member.name)
            return SessionEnd(Ending.GONE)
        if self.shadows and answer.payload and delivery.batch is None:
            self._copy_to_shadows(message, delivery, member, answer)
        return None

    @staticmethod
    async def _validate(payload: bytes) -> None:
        """validate = "structure": Refused (AE, CE in enhanced mode) for a message hl7apy
        rejects. hl7apy takes milliseconds of CPU a message, so it runs in a worker thread
        (one at a time), where it does not hold up the other connections' relaying."""
        problem = await trio.to_thread.run_sync(structure_problem, payload, limiter=_PARSER)
        if problem is not None:
            raise Refused(Nak(("AE", "CE"), f"hl7apy rejects its structure ({problem.kind})",
                              f"structure: {problem.kind}: {problem.detail}",
                              SEGMENT_SEQUENCE_ERROR))

    def _route(self, header: Header) -> MessageRoute | None:
        """The first route whose globs all match; None when the VIP has no routes;
        Refused (AR, CR in enhanced mode) when it has but none takes this message."""
        routes = self.vip.message_routes
        for route in routes:
            if all(fnmatchcase(getattr(header, ROUTE_FIELDS[name]), glob)
                   for name, glob in route.match):
                return route
        if routes:
            fields = ", ".join(f"{name} {getattr(header, attribute)!r}"
                               for name, attribute in ROUTE_FIELDS.items())
            raise Refused(Nak(("AR", "CR"), f"no route matches the message ({fields})"))
        return None

    def _judge(self, member: Member, answer: Answer, delivery: Delivery, now: float) -> None:
        """Passive health from the member's answers: one that says the member itself is
        unwell (an AR or CR with no error code or 207, or an `unwell_acks` code) counts
        against it, `error_limit` in a row mark it down though its port and heartbeat answer
        (a receiver whose database is down NAKs everything); a message resent counts once.
        The answer itself went to the sender unchanged. Any other answer ends the run."""
        code = answer.code
        unwell_acks = self.vip.unwell_acks
        if (code in unwell_acks if unwell_acks is not None else
                code in UNWELL_CODES and answer.error_code in UNWELL_ERRORS):
            error = f", error code {answer.error_code}" if answer.error_code else ""
            unwell(self.pool, member, f"answered {code} (MSA-1{error}) to "
                                      f"{delivery.header.control_id}", now=now,
                   once=delivery.unit)
        elif code in ANSWERED_WELL:
            self.pool.answered_well(member, now)
        else:
            self.pool.report_status(member, False, "")

    async def _try(self, member: Member, message: Message, delivery: Delivery) -> Answer:
        if delivery.tries:  # the first try starts within the deadline (_relay)
            if delivery.out_of_time:
                raise Refused
            if delivery.sender.watch.gone_now():
                raise SenderGone  # a sender that gave up resends: no further member gets it
        delivery.tries.append(member.name)
        try:
            answer = await self._deliver(member, message.payload, delivery)
        except (InDoubtError, MemberFailed) as exc:
            raise self._try_failed(member, delivery, exc) from None
        if delivery.attempts:  # a try failed before: the record lists them all
            delivery.attempts.append(f"{member.name}: {answer.code}")
        return answer

    def _try_failed(self, member: Member, delivery: Delivery,
                    exc: InDoubtError | MemberFailed) -> InDoubtError | MemberFailed:
        """A try that failed, noted in the record: what dispatch is to make of it (in doubt:
        struck and tried no further, unless in_doubt = "next-member")."""
        if isinstance(exc, MemberFailed):
            delivery.attempts.append(f"{member.name}: not delivered: {exc.detail}")
            return exc
        delivery.attempts.append(f"{member.name}: in doubt: {exc.detail}")
        if self.vip.in_doubt is InDoubt.NEXT_MEMBER:  # engines sharing one de-dup store
            return MemberFailed(f"{exc.detail} (in doubt; in_doubt = \"next-member\")")
        strike(self.pool, member, exc.detail, delivery.unit)
        return exc

    async def _refuse(self, delivery: Delivery,
                      exc: NoMemberAvailable | Refused) -> SessionEnd | None:
        header, tries = delivery.header, delivery.tries
        rejected = exc.nak if isinstance(exc, Refused) else None
        if not isinstance(exc, NoMemberAvailable):
            self.pool.count_refused()  # dispatch counts the other refusals
        if rejected is not None:
            why = rejected.reason
        elif delivery.out_of_time:
            why = (f"no ACK within message_timeout ({self.vip.message_timeout:g}s; tried "
                   f"{', '.join(tries)})")
        else:
            assert isinstance(exc, NoMemberAvailable)
            why = exc.reason.value if not tries else (
                f"no member could take it (tried {', '.join(tries)})")
            if delivery.route is not None:
                why += (f" (route {delivery.route.describe()}: "
                        f"{', '.join(delivery.route.members)})")
        if header.accept_ack_type == "NE" or (
                rejected is None and self.vip.when_none_up is WhenNoneUp.CLOSE):
            # NE: the sender asked for no accept ACK, so a NAK would answer nothing it waits
            # for; closing is the one signal it cannot miss. when_none_up = "close": for
            # senders that take any NAK as final; each one resends after a close.
            because = "MSH-15 NE" if header.accept_ack_type == "NE" else "when_none_up"
            self._audit(delivery, None, "", "connection closed", why)
            return SessionEnd(Ending.NOT_DELIVERED, f"{header.control_id} ({because}): {why}")
        return await self._nak_and_record(delivery, why, rejected)

    async def _answer_in_doubt(self, delivery: Delivery,
                               exc: InDoubtError) -> SessionEnd | None:
        """The whole message reached `exc.member`, which did not answer: no other member gets
        it. The sender is answered as a direct connection to that engine would look to it:
        closed without an answer (it resends: to the same member, resend affinity), or with
        in_doubt_answer = "nak" an AE (CE) saying so."""
        header = delivery.header
        self.pool.delivered(delivery.unit, exc.member, trio.current_time())
        self.pool.count_refused()
        why = f"in doubt at {exc.member}: {exc.detail}; not sent to another member"
        if self.vip.in_doubt_answer is InDoubtAnswer.NAK:
            return await self._nak_and_record(delivery, why, Nak(("AE", "CE"), why),
                                              in_doubt=exc.member)
        log.warning("vip=%s client=%s control_id=%s type=%s %s: the sender's connection is "
                    "closed, so that it resends", self.vip.name, delivery.sender.name,
                    header.control_id, header.message_type, why)
        self._audit(delivery, exc.member, "", "connection closed", why, in_doubt=exc.member)
        return SessionEnd(Ending.IN_DOUBT, f"{header.control_id} at {exc.member}")

    def _note_merge(self, header: Header, member: Member, key: str | None) -> None:
        """A merge or move goes by its MRG-1 (the prior patient, whose member holds the
        record); say so when PID-3 alone would have gone elsewhere."""
        persistence = self.vip.persistence
        if persistence is None or persistence.key != "pid-3" or key != header.prior_patient_id:
            return
        if persistence.method == "hash":
            by_pid = self.pool.hash_choice(header.patient_id)
            name = by_pid.name if by_pid is not None else None
        else:
            name = self.pool.persisted_member(header.patient_id)
        if name is not None and name != member.name:
            log.info("vip=%s control_id=%s type=%s: MRG-1 and PID-3 map to different members: "
                     "%s (the prior patient's, by MRG-1) takes it, not %s (PID-3)",
                     self.vip.name, header.control_id, header.message_type, member.name, name)

    async def _nak_and_record(self, delivery: Delivery, why: str,
                              rejected: Nak | None = None, **extra) -> SessionEnd | None:
        """The gateway's own NAK to the sender (nak_code, or the rejection's code), with its
        log line and audit record (`extra` fields too); a SessionEnd if the sender has gone."""
        header = delivery.header
        if rejected is None:
            code, text, error_code = self._nak_code(header), why, APPLICATION_ERROR
        else:
            code = rejected.codes[1] if header.enhanced_mode else rejected.codes[0]
            text, error_code = rejected.text or why, rejected.error_code
        log.warning("vip=%s client=%s control_id=%s type=%s %s from the gateway: %s",
                    self.vip.name, delivery.sender.name, header.control_id, header.message_type,
                    code, why)
        self._audit(delivery, extra.get("in_doubt"), code, f"{code} from the gateway", why,
                    by_gateway=True, **extra)
        if await delivery.sender.send(self._nak(header, text, code, error_code)):
            return None
        return SessionEnd(Ending.GONE)

    def _sender_gone(self, delivery: Delivery) -> None:
        unanswered = [name for name in delivery.written if name not in delivery.answered]
        if unanswered:  # its resend goes there (resend affinity)
            self.pool.delivered(delivery.unit, unanswered[-1], trio.current_time())
        why = (f"sender {delivery.sender.watch.gone} while its message was being tried; not tried "
               f"further; received without answering: {', '.join(unanswered) or 'none'}")
        log.warning("vip=%s client=%s control_id=%s type=%s %s", self.vip.name,
                    delivery.sender.name,
                    delivery.header.control_id, delivery.header.message_type, why)
        self._audit(delivery, None, "", "nothing (sender gone)", why,
                    unanswered=unanswered)

    def _audit(self, delivery: Delivery, member: str | None, ack: str,
               told: str, reason: str = "", end: float | None = None,
               by_gateway: bool = False, **extra) -> None:
        header = delivery.header
        if reason:
            extra["reason"] = reason
        if delivery.batch:
            extra["batch_messages"] = len(delivery.batch.message_ids)
        if delivery.attempts:  # a try that failed: every member tried, with its outcome
            extra["attempts"] = delivery.attempts
        if delivery.resent_to:
            extra["resent_to"] = delivery.resent_to
        self._records.record(self.vip.name, delivery.sender.name, header.message_type,
                             header.control_id, member, ack, told,
                             by_gateway, len(delivery.tries),
                             round(((trio.current_time() if end is None else end)
                                    - delivery.started) * 1000, 1), **extra)

    def _nak_code(self, header: Header) -> str:
        return self.vip.nak_code or ("CE" if header.enhanced_mode else "AR")

    def _nak(self, header: Header, why: str, code: str | None = None,
             error_code: str = APPLICATION_ERROR) -> bytes:
        code = code or self._nak_code(header)
        timestamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
        return frame(build_ack(header, code, control_id=f"MEDGATE{next(_nak_ids)}",
                               timestamp=timestamp, text=f"medgate: {why}",
                               error_code=error_code, sender=self.nak_sender))

    # -- upstream

    async def _deliver(self, member: Member, payload: bytes, delivery: Delivery) -> Answer:
        """Send one message to `member` and return its matching ACK; MemberFailed when it
        did not get the whole message (the next member may), InDoubtError when it did but gave
        no answer for it."""
        if delivery.header.accept_ack_type in UNAWAITED:
            return await self._deliver_unawaited(member, payload, delivery)
        origin = self._origin(member, delivery.sender.peer)
        # The first try starts when the message was read (microseconds ago: the clock is read
        # once less per message), unless validation took its time in between.
        now = (delivery.started if len(delivery.tries) == 1 and self.vip.validate != "structure"
               else trio.current_time())
        upstream = self._take_idle(member, origin, now)
        on_probation = upstream is not None and self.idle.habit(member.name) is Habit.UNKNOWN
        if on_probation:
            upstream = await self._first_reuse(member, upstream)
            now = trio.current_time()
        if upstream is not None:
            try:
                answer = await self._exchange(upstream, member, payload, delivery, now)
            except StaleConnection:
                pass  # the member closed an idle connection: not its failure, open a new one
            else:
                if on_probation:
                    self.idle.learn(member.name, Habit.KEEPS)
                return answer
        stream = await self.open_member(member.name, delivery.sender.peer)
        return await self._exchange(Upstream(stream, origin=origin), member, payload, delivery,
                                    trio.current_time())

    async def _first_reuse(self, member: Member, upstream: Upstream) -> Upstream | None:
        """The first connection to `member` taken from the pool is left idle PROBATION s
        more: a member that closes its connection after each answer has closed this one by
        then (learned: none of its connections is pooled again), where a message written to
        it would have been in doubt. The connection if it is still clean, else None."""
        try:
            await trio.sleep(PROBATION)
        except BaseException:
            upstream.stream.close()
            raise
        left = leftover(upstream.stream, upstream.reader.buffered)  # looked at once
        if left.residue is Residue.CLOSED:
            if self.idle.learn(member.name, Habit.CLOSES):
                log.info("vip=%s member=%s closes its connection after each answer: a new "
                         "one per message from now on", self.vip.name, member.name)
        elif self._judge_leftover(member, left, "the ACK awaited"):
            return upstream
        upstream.stream.close()
        return None

    async def _deliver_unawaited(self, member: Member, payload: bytes,
                                 delivery: Delivery) -> Answer:
        """MSH-15 NE or ER: no accept ACK is awaited (NE: none comes; ER: only on error), so the
        message is delivered once fully written and never sent again. A fresh connection each
        time: a pooled one cannot be proven open without reading from it, and a message written
        to a connection the member has closed would be lost unseen. That connection is then
        read, while the sender is connected, for an answer the member may still send."""
        mode = delivery.header.accept_ack_type
        stream = await self.open_member(member.name, delivery.sender.peer)
        try:
            with trio.move_on_after(self.vip.ack_timeout) as waiting:
                await stream.send_all(frame(payload))
            if waiting.cancelled_caught:
                raise MemberFailed(f"took not all of the message within "
                                   f"{self.vip.ack_timeout:g}s")
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            stream.close()
            raise MemberFailed(f"sending: {describe_os_error(exc)}") from None
        except BaseException:
            stream.close()
            raise
        delivery.written.append(member.name)
        sender = delivery.sender
        if sender.listening is not None and sender.late < MAX_LATE_WAITS:
            sender.late += 1
            sender.listening.start_soon(self._relay_late_answer, member, stream, delivery)
        else:
            stream.close()  # the kernel still delivers what was sent
        return Answer(b"", f"none (MSH-15 {mode})")

    async def _relay_late_answer(self, member: Member, stream: Link,
                                 delivery: Delivery) -> None:
        """Wait up to ack_timeout for the member's answer to an NE/ER message (ER: an error
        ACK) and relay it, if it is for that message, to the sender."""
        header, sender = delivery.header, delivery.sender
        payload = None
        try:
            with trio.move_on_after(self.vip.ack_timeout):
                payload = await read_answer(Upstream(stream), False)
        except MemberFailed:
            pass  # closed, or not a frame: no answer, which is what NE and ER expect
        finally:
            sender.late -= 1
            stream.close()
        if payload is None:
            return
        try:  # correlated as an awaited ACK is (a batch's answer too)
            answer = check_answer(payload, delivery)
        except MemberFailed as exc:
            log.warning("vip=%s member=%s control_id=%s: dropped what it sent after the "
                        "message (MSH-15 %s): %s", self.vip.name, member.name,
                        header.control_id, header.accept_ack_type, exc.detail)
            return
        if answer.code == "commit":
            return  # MLLP's own commit ACK: nothing the sender asked for
        self._judge(member, answer, delivery, trio.current_time())
        self._audit(delivery, member.name, answer.code,
                    f"{answer.code} from {member.name} after delivery")
        relayed = await sender.send(frame(payload))
        log.log(logging.INFO if answer.code in ANSWERED_WELL else logging.WARNING,
                "vip=%s client=%s control_id=%s type=%s member=%s answered %s (MSH-15 %s): %s",
                self.vip.name, sender.name, header.control_id, header.message_type,
                member.name, answer.code, header.accept_ack_type,
                "relayed" if relayed else "the sender has gone")

    def _clean(self, member: Member, upstream: Upstream) -> bool:
        """Nothing arrived besides the ACK awaited (see PooledVipHandler._reusable)."""
        stream = upstream.stream
        if type(stream) is Channel and stream.unread() == 0 and not upstream.reader.pending:
            return True  # _reusable's first look, inline: on every message (reader.buffered
            # would cost two calls more)
        return self._reusable(member, stream, upstream.reader.buffered, "the ACK awaited")

    async def _exchange(self, upstream: Upstream, member: Member, payload: bytes,
                        delivery: Delivery, now: float) -> Answer:
        """Send the message to `member` over `upstream` (at `now`) and return its answer,
        checked; the connection goes back to the idle pool only when the exchange ended
        with the ACK awaited and nothing else."""
        keep = False
        try:
            answer = await exchange(upstream, member.name, payload, delivery, now,
                                    self.vip.ack_timeout)
            keep = True
            return answer
        finally:
            # Pooled only with nothing buffered after the ACK; what may still arrive is looked
            # for when the connection is taken again (_take_idle), the later, stronger check.
            if keep and (not upstream.reader.pending or self._clean(member, upstream)):
                # idle from the exchange's start: errs towards not reusing
                self.idle.put(member.name, upstream, now)
            else:
                upstream.stream.close()

def _unit(header: Header) -> int:
    """What identifies a message across resends: its sender (MSH-3, MSH-4) and control ID
    (MSH-10; a batch's BHS-11), as a stable 64-bit hash: a pair's nodes and a restart agree,
    and it is small in memory."""
    return stable_hash(
        f"{header.sending_application}\x00{header.sending_facility}\x00{header.control_id}")


def _read_header(payload: bytes) -> tuple[Header, Batch | None]:
    """The header a message (or a batch, by its id) is logged and answered by; HL7Error if
    it has none."""
    if is_batch(payload):
        batch = peek_batch(payload)
        return batch.header, batch
    return peek_header(payload), None


def _answerable_header(payload: bytes) -> Header:
    """The header a refusal answers: one without MSH-10 too (MSA-2 empty, as its MSH-10);
    HL7Error if it has none."""
    try:
        return _read_header(payload)[0]
    except MissingControlId as exc:
        return exc.header


@dataclass(eq=False, slots=True)
class _Flight:
    """A message `handle` wrote the quick way, its answer awaited: what a fresh cancel scope
    needs to go on waiting, and `_land` to finish the try (or hand it to dispatch)."""

    message: Message
    delivery: Delivery
    member: Member
    upstream: Upstream
    key: str | None
    among: Sequence[str] | None
    deadline: float  # no ACK by then: the try failed (in doubt)
    bound: str  # that bound, as the failure names it
    watch_at: float = 0.0  # still silent then: waited for with the sender watched
    reply: Event | None = None
    failure: MemberFailed | None = None
    watching: bool = False


@dataclass(frozen=True)
class Nak:
    """The gateway's refusal of a message for good (resending it would not help): `codes` is
    MSA-1 in original and in enhanced mode, `reason` what the log and audit say, `text` what
    the sender's ERR-8 says when it may quote the message (never logged), `error_code` ERR-3."""

    codes: tuple[str, str]
    reason: str
    text: str = ""
    error_code: str = APPLICATION_ERROR


class Refused(Exception):
    """The gateway answers the message itself and tries no (further) member: with `nak` when
    resending would not help, without when message_timeout has passed (the VIP's nak_code)."""

    def __init__(self, nak: Nak | None = None) -> None:
        super().__init__(nak.reason if nak else "message_timeout has passed")
        self.nak = nak


# A message without MSH-10 can be neither matched to its ACK nor told from its resend: the
# gateway rejects it (AR, CR in enhanced mode), as an engine rejects an MSH it cannot accept
NO_CONTROL_ID = Nak(("AR", "CR"), "MSH-10 (message control ID) is empty",
                    error_code=REQUIRED_FIELD_MISSING)
