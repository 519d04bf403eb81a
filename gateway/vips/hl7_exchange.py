"""One HL7 message's exchange with one member over one MLLP connection: write it, read the
answer, tell an answer for this message from anything else, and say whether the member may
have it (in doubt) when no usable answer comes. Which member, which connection and what the
sender is told are the VIP's (vips/hl7.py); this module only speaks to the member.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from gateway.config.model import MessageRoute
from gateway.net.channel import receive_when_ready
from gateway.net.link import Link
from gateway.net.relay import MemberFailed, describe_os_error
from gateway.vips.hl7_sender import Sender
from protocols.mllp import (COMMIT_ACK, COMMIT_NAK, Batch, HL7Error, Header, Message,
                            MllpReader, frame, is_batch, peek_ack, peek_batch_answer)

MAX_ACK_BYTES = 1024 * 1024  # an ACK bigger than this is not an ACK
WATCH_AFTER = 0.2  # a member silent this long: watch the sender too while waiting for it
SENT_AT_ONCE = 8192  # a message this small fits any socket's send buffer: sent without waiting


@dataclass(eq=False)  # compared by identity: the idle list removes the one taken
class Upstream:
    """One MLLP connection to a member and what it has buffered."""

    stream: Link
    reader: MllpReader = field(default_factory=lambda: MllpReader(MAX_ACK_BYTES))
    idle_since: float = 0.0
    origin: tuple[str, int] | None = None  # the client its PROXY header named (send_proxy)


@dataclass(slots=True)
class Answer:
    payload: bytes  # the ACK as the member sent it, relayed unchanged
    code: str  # MSA-1, or "commit" for an MLLP R2 commit ACK
    error_code: str = ""  # ERR-3 (or MSA-6, ERR-1) of a negative answer


@dataclass(slots=True, init=False)
class Delivery:
    """One message on its way: what was tried, who got it whole, who answered, until when."""

    header: Header
    started: float
    deadline: float  # started + message_timeout
    sender: Sender
    batch: Batch | None  # a batch sent as one frame (header then names the batch id)
    route: MessageRoute | None  # the route that chose the members, if the VIP has routes
    unit: int  # _unit(header): the resend affinity and passive health count by it
    resent_to: str  # the member its earlier copy went to (resend affinity)
    tries: list[str]
    written: list[str]  # members the whole message was sent to
    answered: list[str]
    attempts: list[str]  # "member: outcome", once a try failed

    def __init__(self, header: Header, started: float, deadline: float, sender: Sender,
                 batch: Batch | None = None, unit: int = 0) -> None:
        # Written out, once a message: the generated __init__ calls list() for each list
        # (default_factory), about 600 machine instructions each, where `[]` costs 30
        self.header = header
        self.started = started
        self.deadline = deadline
        self.sender = sender
        self.batch = batch
        self.route = None
        self.unit = unit
        self.resent_to = ""
        self.tries = []
        self.written = []
        self.answered = []
        self.attempts = []

    @property
    def out_of_time(self) -> bool:
        return trio.current_time() >= self.deadline


class InDoubtError(Exception):
    """The whole message was written to `member`, which then gave no usable answer: it may
    have processed it."""

    def __init__(self, member: str, detail: str) -> None:
        super().__init__(detail)
        self.member = member
        self.detail = detail


class Undelivered(MemberFailed):
    """The member says it did not take the message (an MLLP commit NAK): the next may."""


class SenderGone(Exception):
    """The sender closed (or reset) its connection while its message was being tried."""


class StaleConnection(MemberFailed):
    """A pooled connection the member had already closed: retry on a new one."""


def try_bounds(delivery: Delivery, now: float, ack_timeout: float) -> tuple[float, str]:
    """When a try started at `now` ends without an ACK (ack_timeout, but never past the
    message's deadline), and how its failure names that bound."""
    left = delivery.deadline - now
    limit = ack_timeout if ack_timeout <= left else left  # min(), without the call
    return now + limit, (f"{limit:g}s" if limit == ack_timeout
                         else f"{limit:g}s (message_timeout)")


async def exchange(upstream: Upstream, member: str, payload: bytes, delivery: Delivery,
                   now: float, ack_timeout: float) -> Answer:
    """Send the message to `member` over `upstream` (at `now`) and return its answer, checked.
    MemberFailed (StaleConnection on a pooled connection the member had closed) when the
    member did not get all of it, InDoubtError when it did and gave no usable answer."""
    reused = upstream.idle_since > 0
    sent = False
    try:
        # One bound for the whole exchange: a member that stops reading a large message
        # is as hung as one that never answers. No try outlasts the message's deadline.
        deadline, bound = try_bounds(delivery, now, ack_timeout)
        # Most ACKs come at once. A member still silent after WATCH_AFTER is waited for
        # with the sender watched too: that takes a second task, so only then. (A large
        # message may take longer than that to send: its bound moves after the send.)
        small = len(payload) < SENT_AT_ONCE
        # A CancelScope, not move_on_at: no generator context manager per message.
        with trio.CancelScope(deadline=min(deadline, now + WATCH_AFTER) if small
                              else deadline) as waiting:
            try:
                data = frame(payload)
                # A small message goes at once, before anything can cancel it: the WATCH_AFTER
                # bound counts from when the message was read, and a busy moment past it
                # must not read as a member that took not all of it.
                taken = upstream.stream.send_now(data) if small else 0
                if taken < len(data) or upstream.stream.unsent:
                    await upstream.stream.send_all(data[taken:])
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                cls = StaleConnection if reused else MemberFailed
                raise cls(f"sending: {describe_os_error(exc)}") from None
            sent = True
            delivery.written.append(member)
            if not small:
                waiting.deadline = min(deadline, trio.current_time() + WATCH_AFTER)
            payload_in: bytes | None = await read_answer(upstream, reused)
        if waiting.cancelled_caught:
            if not sent:
                raise MemberFailed(f"took not all of the message within "
                                   f"{WATCH_AFTER if small else deadline - now:g}s")
            payload_in = await answer_watching(upstream, reused, delivery, deadline, bound)
        assert payload_in is not None
        answer = check_answer(payload_in, delivery)
        delivery.answered.append(member)
        return answer
    except MemberFailed as exc:
        if sent:
            raise after_sending(member, exc) from None
        raise


def after_sending(member: str, failure: MemberFailed) -> MemberFailed | InDoubtError:
    """What a failure means once the whole message was written: the member has it and may
    have processed it (in doubt: sending it to another, or again, could process it twice),
    unless it said it did not take it (an MLLP commit NAK)."""
    return failure if isinstance(failure, Undelivered) else InDoubtError(member, failure.detail)


async def answer_watching(upstream: Upstream, reused: bool, delivery: Delivery,
                          deadline: float, bound: str) -> bytes:
    """The answer of a member silent past WATCH_AFTER, awaited until `deadline` with the
    sender watched (SenderGone when it goes); MemberFailed when none comes in time."""
    if trio.current_time() < deadline:
        payload = await read_answer_watching(upstream, reused, delivery, deadline)
        if payload is not None:
            return payload
    raise MemberFailed(f"no ACK within {bound}")


async def read_answer(upstream: Upstream, reused: bool) -> bytes:
    """The next frame the member sends: StaleConnection when a pooled connection turns out
    closed before any byte came, MemberFailed for any other end or a non-frame."""
    received = upstream.reader.buffered  # a part may have come before a WATCH_AFTER pause
    while (event := upstream.reader.next_event()) is None:
        try:
            # an answer to what was just sent: epoll before the read (receive_when_ready)
            data = await receive_when_ready(upstream.stream, 65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            data, closed = b"", describe_os_error(exc)
        else:
            closed = "connection closed"
        if not data:
            cls = StaleConnection if reused and not received else MemberFailed
            raise cls(f"{closed} before the ACK")
        received += len(data)
        upstream.reader.feed(data)
    if not isinstance(event, Message):
        raise MemberFailed("answered with something that is not an MLLP frame")
    return event.payload


async def read_answer_watching(upstream: Upstream, reused: bool, delivery: Delivery,
                               deadline: float) -> bytes | None:
    """Go on waiting for a slow member's ACK until `deadline` (None then), reading the
    sender's side meanwhile: a sender that closes ends the try with SenderGone."""
    answer = failure = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(delivery.sender.watch.run, nursery.cancel_scope)
        with trio.move_on_at(deadline):
            try:
                answer = await read_answer(upstream, reused)
            except MemberFailed as exc:  # raised outside the nursery, as itself
                failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if answer is None and delivery.sender.watch.gone:
        raise SenderGone
    return answer


def check_answer(payload: bytes, delivery: Delivery) -> Answer:
    """The member's answer, if it answers this message (or batch): MemberFailed if not."""
    if payload == COMMIT_ACK:
        return Answer(payload, "commit")
    if payload == COMMIT_NAK:  # it says it did not take the message: not in doubt
        raise Undelivered("answered with an MLLP commit NAK")
    header, batch = delivery.header, delivery.batch
    try:
        ack = peek_batch_answer(payload) if batch and is_batch(payload) else peek_ack(payload)
    except HL7Error as exc:
        raise MemberFailed(f"answered with something that is not an ACK: {exc}") from None
    if batch is not None:
        if not batch.answered_by(ack):
            raise MemberFailed(f"answer for another batch ({ack.control_id!r}, expected "
                               f"{batch.control_id!r})")
        return Answer(payload, ack.code, ack.error_code)
    if ack.control_id != header.control_id:
        raise MemberFailed(f"ACK for another message (MSA-2 {ack.control_id!r}, "
                           f"expected {header.control_id!r})")
    return Answer(payload, ack.code, ack.error_code)
