"""Shadow members: a copy of each unit a VIP relays, sent to a member that is never picked
(`shadow = true`), whose answer is compared with the real member's and never reaches the
client. A migration's evidence: the new engine answers live traffic as the old one does, or
here is every unit where it does not.

The client's path never waits on a shadow: after the real answer has gone to the client, the
unit is put in the shadow's queue (SHADOW_QUEUE units; past it whole units are dropped and
counted), which one task works through in order on one connection of its own. A shadow that is
down, slow or stopped only fills its queue. Its health is what its copies see ("answering", or
why not), shown apart from the members'.

HL7 (this version's shadows): each message the VIP relays and a member answered; compared:
MSA-1, then ERR-3. A copy the shadow does not answer (refused, closed, no ACK within the VIP's
ack_timeout, an ACK for another message) is counted as not compared, not as a difference.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import trio

from gateway.config import MemberConfig
from gateway.net.link import Link
from gateway.net.relay import MemberFailed, describe_os_error, send_within
from gateway.records.shadow import Difference, DifferenceKind, ShadowLog
from gateway.vips.idle_pool import Residue, leftover
from protocols.mllp import HL7Error, Message, MllpReader, frame, peek_ack

log = logging.getLogger("medgate.shadow")

SHADOW_QUEUE = 1000  # units waiting for one shadow; past it whole units are dropped (counted)
RECENT = 20  # differences kept in memory per shadow for the status page
MAX_ANSWER_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Copy:
    """One unit for a shadow, with what the real member answered."""

    payload: bytes
    control_id: str
    message_type: str
    member: str
    code: str  # the member's MSA-1
    error_code: str  # its ERR-3


@dataclass(eq=False)
class HL7Shadow:
    """One shadow member of one HL7 VIP: its queue, its connection and what it showed."""

    vip: str
    config: MemberConfig
    open_connection: Callable[[str], Awaitable[Link]]  # the handler's open_member, by name
    records: ShadowLog | None = None
    ack_timeout: float = 30.0
    on: bool = True  # `gateway ctl shadow VIP/MEMBER on|off`
    copied: int = 0  # units answered by the shadow and compared
    not_compared: int = 0  # units it did not answer
    dropped: int = 0  # units dropped: the queue was full (or shadowing was off meanwhile)
    differences: dict[str, int] = field(default_factory=dict)  # by DifferenceKind
    recent: deque[Difference] = field(default_factory=lambda: deque(maxlen=RECENT))
    state: str = "no copy yet"
    _queue: deque[Copy] = field(default_factory=deque)
    _running: bool = False
    _stream: Link | None = None
    _reader: MllpReader | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def offer(self, nursery: trio.Nursery, copy: Copy) -> None:
        """Queue `copy` for the shadow (dropped, counted, when the queue is full); the copying
        task runs while there is work, in `nursery`."""
        if not self.on:
            return
        if len(self._queue) >= SHADOW_QUEUE:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("vip=%s shadow=%s: its queue is full (%d units): %d copies "
                            "dropped so far (it is %s)", self.vip, self.name, SHADOW_QUEUE,
                            self.dropped, self.state)
            return
        self._queue.append(copy)
        if not self._running:
            self._running = True
            nursery.start_soon(self._work)

    async def _work(self) -> None:
        try:
            while self._queue and self.on:
                await self._copy(self._queue.popleft())
            self.dropped += len(self._queue)  # shadowing was turned off meanwhile
            self._queue.clear()
        except BaseException:  # the gateway stops: what is left is not compared
            self.close()
            raise
        finally:
            self._running = False
            if not self.on:
                self.close()

    async def _copy(self, copy: Copy) -> None:
        try:
            with trio.fail_after(self.ack_timeout):
                answer = await self._exchange(copy.payload)
            ack = peek_ack(answer)
            if ack.control_id != copy.control_id:
                raise MemberFailed(f"answered {ack.control_id!r}, not {copy.control_id!r}")
        except (MemberFailed, HL7Error, trio.TooSlowError, OSError,
                trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.close()
            self.not_compared += 1
            detail = (f"no answer within ack_timeout ({self.ack_timeout:g}s)"
                      if isinstance(exc, trio.TooSlowError) else
                      exc.detail if isinstance(exc, MemberFailed) else
                      exc.reason if isinstance(exc, HL7Error) else describe_os_error(exc))
            if self.state != f"not answering: {detail}":
                log.warning("vip=%s shadow=%s control_id=%s not compared: %s", self.vip,
                            self.name, copy.control_id, detail)
            self.state = f"not answering: {detail}"
            return
        self.copied += 1
        self.state = "answering"
        kind = (DifferenceKind.ACK_CODE if ack.code != copy.code else
                DifferenceKind.ERROR_CODE if ack.error_code != copy.error_code else None)
        if kind is None:
            return
        self.differences[kind] = self.differences.get(kind, 0) + 1
        member_answer = copy.code + (f" {copy.error_code}" if copy.error_code else "")
        shadow_answer = ack.code + (f" {ack.error_code}" if ack.error_code else "")
        log.info("vip=%s shadow=%s type=%s differs (%s): %s answered %s, the shadow %s",
                 self.vip, self.name, copy.message_type, kind, copy.member, member_answer,
                 shadow_answer)
        if self.records is not None:
            self.recent.append(self.records.write(
                self.vip, self.name, kind, copy.message_type, copy.control_id, copy.member,
                member_answer, shadow_answer))

    async def _exchange(self, payload: bytes) -> bytes:
        """Send one message on the shadow's connection (a new one when it has none, or when
        the one it had is closed or holds anything unasked) and read one answer."""
        if self._stream is not None and self._reader is not None:
            if leftover(self._stream, self._reader.buffered).residue is not Residue.NOTHING:
                self.close()
        if self._stream is None:
            self._stream = await self.open_connection(self.name)
            self._reader = MllpReader(MAX_ANSWER_BYTES)
        stream, reader = self._stream, self._reader
        assert reader is not None
        if not await send_within(stream, frame(payload), self.ack_timeout):
            raise MemberFailed("took not all of the message")
        while True:
            event = reader.next_event()
            if isinstance(event, Message):
                return event.payload
            if event is not None:
                raise MemberFailed(f"sent what is not an MLLP frame ({type(event).__name__})")
            data = await stream.receive_some(65536)
            if not data:
                raise MemberFailed("closed the connection")
            reader.feed(data)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._stream = self._reader = None

    def show(self) -> dict:
        """What the status page and /api/status show of it."""
        return {"name": self.name, "address": str(self.config.address),
                "shadowing": "on" if self.on else "off", "state": self.state,
                "compared": self.copied, "not_compared": self.not_compared,
                "dropped": self.dropped, "waiting": self.waiting,
                "differences": dict(self.differences),
                "recent": [d.__dict__ for d in self.recent]}
