"""Shadow members: a copy of each unit a VIP relays, sent to a member that is never picked
(`shadow = true`), whose answer is compared with the real member's and never reaches the
client. A migration's evidence: the new engine answers live traffic as the old one does, or
here is every unit where it does not.

The client's path never waits on a shadow: after the real answer has gone to the client, the
unit is put in the shadow's queue (SHADOW_QUEUE units; past it whole units are dropped and
counted), which one task works through in order on one connection of its own. A shadow that is
down, slow or stopped only fills its queue. Its health is what its copies see ("answering", or
why not), shown apart from the members'.

HL7: each message the VIP relays and a member answered; compared: MSA-1, then ERR-3. XDS:
each query (a transaction that changes nothing, routed by role alone) whose request body the
VIP held whole and whose response was not past RESPONSE_KEPT; compared: the HTTP status, the
registry response's status, how many entries it found and which. A copy the shadow does not
answer (refused, closed, nothing within the VIP's ack_timeout, an answer for another message)
is counted as not compared, not as a difference.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import h11
import trio

from gateway.config import MemberConfig
from gateway.net import http
from gateway.net.link import Link
from gateway.net.relay import MemberFailed, describe_os_error, send_within
from gateway.records.shadow import Difference, DifferenceKind, ShadowLog
from gateway.vips.idle_pool import Residue, leftover
from protocols import dicom, dimse, soap
from protocols.mllp import HL7Error, Message, MllpReader, frame, peek_ack

log = logging.getLogger("medgate.shadow")

SHADOW_QUEUE = 1000  # units waiting for one shadow; past it whole units are dropped (counted)
RECENT = 20  # differences kept in memory per shadow for the status page
MAX_ANSWER_BYTES = 16 * 1024 * 1024  # a shadow's answer, read whole (an ITI-18's is small)
RESPONSE_KEPT = 16 * 1024 * 1024  # of a member's XDS response, kept to compare


@dataclass(frozen=True)
class Copy:
    """One unit for a shadow, with what the real member answered (its protocol's subclass)."""

    unit: str  # its type, for the records (an MSH-9, a transaction name)
    unit_id: str  # its identifier (an MSH-10, a wsa:MessageID), kept as a keyed hash
    member: str


@dataclass(frozen=True)
class HL7Copy(Copy):
    payload: bytes = b""
    code: str = ""  # the member's MSA-1
    error_code: str = ""  # its ERR-3


@dataclass(frozen=True)
class XdsCopy(Copy):
    head: h11.Request | None = None
    body: bytes = b""
    status: int = 0  # the member's HTTP status
    answer: soap.RegistryResponse | None = None  # what its body said (None: not a response)


class NotCompared(Exception):
    """The shadow gave no answer to compare; `detail` says why."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True)
class Finding:
    """One difference: what differed, the member's answer, the shadow's; `unit` and `unit_id`
    when it is about a part of the copied unit (a C-STORE of an association)."""

    kind: DifferenceKind
    member: str
    shadow: str
    unit: str = ""
    unit_id: str = ""


Found = list[Finding]
# What a shadow's copy may meet short of an answer to compare: it is then "not compared"
UNANSWERED: tuple[type[Exception], ...] = (
    NotCompared, MemberFailed, OSError, http.PeerGone, h11.ProtocolError,
    trio.BrokenResourceError, trio.ClosedResourceError, dicom.ProtocolError, dimse.DimseError)
UNANSWERED_OR_LATE: tuple[type[Exception], ...] = (*UNANSWERED, trio.TooSlowError)


@dataclass(eq=False)
class Shadow:
    """One shadow member of one VIP: its queue, its connection and what it showed."""

    vip: str
    config: MemberConfig
    open_connection: Callable[[str], Awaitable[Link]]  # the handler's open_member, by name
    records: ShadowLog | None = None
    ack_timeout: float = 30.0
    on: bool = True  # `gateway ctl shadow VIP/MEMBER on|off`
    # What changes the shadow (XDS writes) or makes it act outward (DICOM C-MOVE, C-GET,
    # N-services) is copied too: shadow_writes, shadow_side_effects
    copies_everything: bool = False
    copied: int = 0  # units answered by the shadow and compared
    not_compared: int = 0  # units it did not answer
    dropped: int = 0  # units dropped: the queue was full (or shadowing was off meanwhile)
    differences: dict[str, int] = field(default_factory=dict)  # by DifferenceKind
    recent: deque[Difference] = field(default_factory=lambda: deque(maxlen=RECENT))
    state: str = "no copy yet"
    _queue: deque[Copy] = field(default_factory=deque)
    _running: bool = False
    _stream: Link | None = None
    waiting_elsewhere: int = 0  # a leader's: units in its workers' queues (show_counts)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def unit_timeout(self) -> float:
        """How long one unit's copy may take in all (a DICOM association: each step)."""
        return self.ack_timeout

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
            with trio.fail_after(self.unit_timeout):
                found = await self._compare(copy)
        except UNANSWERED_OR_LATE as exc:
            self.close()
            self.not_compared += 1
            detail = (f"no answer within {self.unit_timeout:g}s"
                      if isinstance(exc, trio.TooSlowError) else
                      exc.detail if isinstance(exc, (NotCompared, MemberFailed)) else
                      describe_os_error(exc) if isinstance(
                          exc, (OSError, trio.BrokenResourceError, trio.ClosedResourceError))
                      else http.peer_failure(exc))
            if self.state != f"not answering: {detail}":
                log.warning("vip=%s shadow=%s %s not compared: %s", self.vip, self.name,
                            copy.unit, detail)
            self.state = f"not answering: {detail}"
            return
        self.copied += 1
        self.state = "answering"
        for finding in found:
            kind = finding.kind
            unit, unit_id = finding.unit or copy.unit, finding.unit_id or copy.unit_id
            self.differences[kind] = self.differences.get(kind, 0) + 1
            log.info("vip=%s shadow=%s %s differs (%s): %s answered %s, the shadow %s",
                     self.vip, self.name, unit, kind, copy.member, finding.member,
                     finding.shadow)
            if self.records is not None:
                self.recent.append(self.records.write(self.vip, self.name, kind, unit, unit_id,
                                                      copy.member, finding.member,
                                                      finding.shadow))

    async def _compare(self, copy: Copy) -> Found:
        """Send `copy` to the shadow; what differs in its answer (NotCompared: no answer)."""
        raise NotImplementedError

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self._stream = None

    def counts(self) -> dict:
        """A worker's counts, as plain data (its leader sums them: show_counts)."""
        return {"compared": self.copied, "not_compared": self.not_compared,
                "dropped": self.dropped, "waiting": self.waiting,
                "differences": dict(self.differences), "state": self.state,
                "recent": [d.__dict__ for d in self.recent]}

    def show_counts(self, counts: dict) -> None:
        """A leader's shadow, which copies nothing itself, shows its workers' counts summed
        (add_counts); its state is the last worker's that saw any."""
        self.copied, self.not_compared = counts["compared"], counts["not_compared"]
        self.dropped, self.waiting_elsewhere = counts["dropped"], counts["waiting"]
        self.differences = dict(counts["differences"])
        self.state = counts["state"] or self.state
        self.recent = deque((Difference(**d) for d in sorted(
            counts["recent"], key=lambda d: d["time"])), maxlen=RECENT)

    def show(self) -> dict:
        """What the status page and /api/status show of it."""
        return {"name": self.name, "address": str(self.config.address),
                "shadowing": "on" if self.on else "off", **self.counts(),
                "waiting": self.waiting + self.waiting_elsewhere}


def add_counts(total: dict, counts: dict, gone: bool = False) -> dict:
    """`counts` (Shadow.counts) added to `total` (new when empty); `gone`: of a worker that
    has exited, whose queue went with it."""
    if not total:
        total.update(compared=0, not_compared=0, dropped=0, waiting=0, differences={},
                     state="", recent=[])
    for name in ("compared", "not_compared", "dropped"):
        total[name] += counts[name]
    total["waiting"] += 0 if gone else counts["waiting"]
    for kind, count in counts["differences"].items():
        total["differences"][kind] = total["differences"].get(kind, 0) + count
    total["state"] = counts["state"] if counts["state"] != "no copy yet" else total["state"]
    total["recent"] = (total["recent"] + counts["recent"])[-RECENT:]
    return total


@dataclass(eq=False)
class HL7Shadow(Shadow):
    """HL7: the message on an MLLP connection of its own; MSA-1, then ERR-3 compared."""

    _reader: MllpReader | None = None

    async def _compare(self, copy: Copy) -> Found:
        assert isinstance(copy, HL7Copy)
        try:
            ack = peek_ack(await self._exchange(copy.payload))
        except HL7Error as exc:
            raise NotCompared(exc.reason) from None
        if ack.control_id != copy.unit_id:
            raise NotCompared(f"answered {ack.control_id!r}, not {copy.unit_id!r}")
        member = copy.code + (f" {copy.error_code}" if copy.error_code else "")
        shadow = ack.code + (f" {ack.error_code}" if ack.error_code else "")
        if ack.code != copy.code:
            return [Finding(DifferenceKind.ACK_CODE, member, shadow)]
        if ack.error_code != copy.error_code:
            return [Finding(DifferenceKind.ERROR_CODE, member, shadow)]
        return []

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
            raise NotCompared("took not all of the message")
        while True:
            event = reader.next_event()
            if isinstance(event, Message):
                return event.payload
            if event is not None:
                raise NotCompared(f"sent what is not an MLLP frame ({type(event).__name__})")
            data = await stream.receive_some(65536)
            if not data:
                raise NotCompared("closed the connection")
            reader.feed(data)

    def close(self) -> None:
        super().close()
        self._reader = None


@dataclass(eq=False)
class XdsShadow(Shadow):
    """XDS: the request (a query: it changes nothing) on an HTTP connection of its own; the
    HTTP status, then the registry response's status, then (ITI-18) how many entries and
    which were found, compared."""

    _connection: h11.Connection | None = None

    async def _compare(self, copy: Copy) -> Found:
        assert isinstance(copy, XdsCopy) and copy.head is not None
        status, body = await self._exchange(copy.head, copy.body)
        if status != copy.status:
            return [Finding(DifferenceKind.HTTP_STATUS, str(copy.status), str(status))]
        try:
            answer = soap.parse_registry_response(body)
        except soap.SoapError:
            answer = None
        member = copy.answer
        if member is None or answer is None:
            return [] if member is None and answer is None else [Finding(
                DifferenceKind.REGISTRY_STATUS, member.describe() if member else "no response",
                answer.describe() if answer else "no response")]
        if answer.status != member.status or answer.fault != member.fault:
            return [Finding(DifferenceKind.REGISTRY_STATUS, member.describe(),
                            answer.describe())]
        found, wanted = answer.entries, member.entries
        if len(found) != len(wanted):
            return [Finding(DifferenceKind.RESULT_COUNT, str(len(wanted)), str(len(found)))]
        if sorted(found) != sorted(wanted):
            return [Finding(DifferenceKind.DOCUMENT_IDS, f"{len(set(wanted) - set(found))} not "
                            "found by the shadow", f"{len(set(found) - set(wanted))} not found "
                            "by the member")]
        return []

    async def _exchange(self, head: h11.Request, body: bytes) -> tuple[int, bytes]:
        """The request on the shadow's connection (kept alive while it is clean); its
        response's status and body (NotCompared past MAX_ANSWER_BYTES)."""
        if self._stream is not None and self._connection is not None:
            left = leftover(self._stream, len(self._connection.trailing_data[0]))
            if left.residue is not Residue.NOTHING:
                self.close()
        if self._stream is None:
            self._stream = await self.open_connection(self.name)
            self._connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=http.MAX_HEAD)
        stream, connection = self._stream, self._connection
        assert connection is not None
        headers = [(k, v) for k, v in http.end_to_end(head.headers) if k != b"host"]
        headers.insert(0, (b"Host", str(self.config.address).encode()))
        await stream.send_all(connection.send(h11.Request(method=head.method, target=head.target,
                                                          headers=headers))
                              + connection.send(h11.Data(data=body))
                              + connection.send(h11.EndOfMessage()))
        status, parts, size = 0, [], 0
        while True:
            event = await http.next_event(stream, connection)
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_ANSWER_BYTES:
                    raise NotCompared(f"its response is over {MAX_ANSWER_BYTES} bytes")
                parts.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise NotCompared("closed the connection before its response ended")
        if connection.our_state is h11.DONE and connection.their_state is h11.DONE:
            connection.start_next_cycle()
        else:
            self.close()
        return status, b"".join(parts)

    def close(self) -> None:
        super().close()
        self._connection = None


# DICOM: what is copied; never what would make the shadow act outward (C-MOVE and C-GET send
# images to workstations, N-ACTION asks for storage commitment reports, MPPS N-CREATE/N-SET
# tell real modalities' worklists, N-EVENT-REPORT is the other way)
COPIED_COMMANDS = frozenset({dimse.C_STORE_RQ, dimse.C_FIND_RQ, dimse.C_ECHO_RQ})
DICOM_TAPE = 64 * 1024 * 1024  # of an association's client bytes, kept to copy it whole
RELEASE_WAIT = 2.0  # for the shadow's A-RELEASE-RP


@dataclass(frozen=True)
class DicomCopy(Copy):
    """An association: its RQ, what the member answered, the client's PDUs after the RQ and
    the member's responses, by the message ID they answer (statuses, pending ones first)."""

    request: dicom.Association | None = None
    answer: str = ""  # "accepted", "rejected (...)" or "aborted"
    accepted: dict[int, str] = field(default_factory=dict)  # context id -> transfer syntax
    tape: bytes = b""
    responses: dict[int, list[int]] = field(default_factory=dict)
    cut: bool = False  # the client's association ended mid-way (aborted, or a side failed)


def association_answer(pdu: bytes) -> str:
    """An A-ASSOCIATE answer in the words the comparison uses."""
    if pdu[0] == dicom.A_ASSOCIATE_AC:
        return "accepted"
    if pdu[0] == dicom.A_ASSOCIATE_RJ:
        return f"rejected ({dicom.AssociateReject.decode(pdu).describe()})"
    return "aborted"


def accepted_contexts(accept: dicom.Association) -> dict[int, str]:
    return {c.id: c.transfer_syntaxes[0] for c in accept.presentation_contexts
            if c.result == 0 and c.transfer_syntaxes}


@dataclass(eq=False)
class DicomShadow(Shadow):
    """DICOM: each association, once the client's has ended, as a new association to the
    shadow: the same RQ (called AE the shadow's `ae_title`), then the client's C-STOREs,
    C-FINDs and C-ECHOs on the contexts the shadow accepted with the same transfer syntax,
    re-fragmented to its maximum PDU; compared: the association's result, the contexts, each
    response's final status and each C-FIND's match count."""

    @property
    def unit_timeout(self) -> float:
        return math.inf  # an association of a study takes its time: each step is bounded

    async def _compare(self, copy: Copy) -> Found:
        assert isinstance(copy, DicomCopy) and copy.request is not None
        stream = await self.open_connection(self.name)
        self._stream = stream  # closed by the caller on any failure
        try:
            return await self._replay(stream, copy)
        finally:
            self.close()

    async def _replay(self, stream: Link, copy: DicomCopy) -> Found:
        request = copy.request
        assert request is not None
        rq = request.with_called_ae(self.config.ae_title) if self.config.ae_title else request.raw
        await self._send(stream, rq)
        reader = dicom.PduReader()
        pdu = b""
        with trio.move_on_after(self.ack_timeout):
            pdu = await self._next_pdu(stream, reader)
        if not pdu:
            raise NotCompared(f"no answer to the A-ASSOCIATE-RQ within {self.ack_timeout:g}s")
        try:
            answer = association_answer(pdu)
            accept = dicom.Association.decode(pdu) if pdu[0] == dicom.A_ASSOCIATE_AC else None
        except dicom.ProtocolError as exc:
            raise NotCompared(f"answered the A-ASSOCIATE-RQ with garbage: {exc}") from None
        found = ([] if answer == copy.answer else
                 [Finding(DifferenceKind.ASSOCIATION, copy.answer, answer)])
        if accept is None or copy.answer != "accepted":
            if accept is not None:
                await self._release(stream, reader)
            return found
        theirs = accepted_contexts(accept)
        differ = sorted(i for i in copy.accepted.keys() | theirs.keys()
                        if copy.accepted.get(i) != theirs.get(i))
        if differ:
            found.append(Finding(DifferenceKind.CONTEXTS, f"{len(copy.accepted)} accepted",
                                 f"{len(theirs)} accepted, {len(differ)} not as the member"))
        usable = {i for i, syntax in copy.accepted.items() if theirs.get(i) == syntax}
        largest = min(accept.max_pdu_length - 6 if accept.max_pdu_length else 65536, 1 << 20)
        sent: dict[int, dimse.Command] = {}
        answers: dict[int, list[int]] = {}
        problems: list[Exception] = []  # raised here, not out of the nursery (a group)
        async with trio.open_nursery() as nursery:
            everything_sent, all_answered = trio.Event(), trio.Event()
            nursery.start_soon(self._read_answers, stream, reader, sent, answers,
                               everything_sent, all_answered, problems)
            try:
                await self._send_tape(stream, copy.tape, usable, largest, sent)
                if copy.cut:  # as the member saw it: cut mid-way, nothing to compare
                    await self._send(stream, dicom.Abort(0, 0).encode())
                    raise NotCompared("the association was cut mid-way: aborted on the "
                                      "shadow too")
                everything_sent.set()
                if not sent:
                    all_answered.set()
                with trio.move_on_after(self.ack_timeout) as waiting:
                    await all_answered.wait()
                if waiting.cancelled_caught:
                    problems.append(NotCompared(
                        f"{len(sent) - len(answers)} of {len(sent)} requests not answered "
                        f"within {self.ack_timeout:g}s"))
            except UNANSWERED as exc:
                problems.append(exc)
            nursery.cancel_scope.cancel()
        if problems:
            raise problems[0]
        await self._release(stream, reader)
        for message_id, command in sent.items():
            mine, theirs_ = copy.responses.get(message_id, []), answers.get(message_id, [])
            unit, unit_id = command.name, command.sop_instance or str(message_id)
            if mine[-1:] != theirs_[-1:]:
                found.append(Finding(DifferenceKind.DIMSE_STATUS, _status(mine), _status(theirs_),
                                     unit, unit_id))
            elif command.field == dimse.C_FIND_RQ and len(mine) != len(theirs_):
                found.append(Finding(DifferenceKind.MATCH_COUNT, f"{len(mine) - 1} matches",
                                     f"{len(theirs_) - 1} matches", unit, unit_id))
        return found

    async def _send(self, stream: Link, data: bytes) -> None:
        if not await send_within(stream, data, self.ack_timeout):
            raise NotCompared(f"took not what was sent within {self.ack_timeout:g}s")

    async def _next_pdu(self, stream: Link, reader: dicom.PduReader) -> bytes:
        while (pdu := reader.next_pdu()) is None:
            data = await stream.receive_some(65536)
            if not data:
                raise NotCompared("closed the connection")
            reader.feed(data)
        return pdu

    async def _send_tape(self, stream: Link, tape: bytes, usable: set[int], largest: int,
                         sent: dict[int, dimse.Command]) -> None:
        """The client's P-DATA, message by message: a copied command's PDVs and its data set's,
        re-fragmented to the shadow's PDU size; up to the client's A-RELEASE-RQ or A-ABORT."""
        reader = dicom.PduReader(max_pdu_bytes=len(tape) + 6)
        reader.feed(tape)
        command: dict[int, bytearray] = {}  # context -> command fragments so far
        held: dict[int, list[dicom.Pdv]] = {}  # context -> its command's PDVs, until decided
        copying: dict[int, bool] = {}  # context -> its current message is copied
        while (pdu := reader.next_pdu()) is not None and pdu[0] == dicom.P_DATA_TF:
            for pdv in dicom.decode_p_data(pdu):
                context = pdv.context_id
                if pdv.is_command:
                    command.setdefault(context, bytearray()).extend(pdv.data)
                    held.setdefault(context, []).append(pdv)
                    if not pdv.is_last:
                        continue
                    try:
                        asked = dimse.decode(context, bytes(command.pop(context)))
                    except dimse.DimseError:
                        asked = None
                    pdvs = held.pop(context)
                    copying[context] = (asked is not None and context in usable
                                        and asked.message_id is not None
                                        and (asked.field in COPIED_COMMANDS or (
                                            self.copies_everything and not asked.is_response)))
                    if not copying[context]:
                        continue
                    assert asked is not None and asked.message_id is not None
                    sent[asked.message_id] = asked
                elif copying.get(context):
                    pdvs = [pdv]
                else:
                    continue
                for piece in pdvs:
                    for start in range(0, max(len(piece.data), 1), largest):
                        chunk = piece.data[start:start + largest]
                        last = piece.is_last and start + largest >= len(piece.data)
                        await self._send(stream, dicom.encode_p_data(
                            [dicom.Pdv(context, piece.is_command, last, chunk)]))

    async def _read_answers(self, stream: Link, reader: dicom.PduReader,
                            sent: dict[int, dimse.Command], answers: dict[int, list[int]],
                            everything_sent: trio.Event, all_answered: trio.Event,
                            problems: list[Exception]) -> None:
        """The shadow's responses, statuses by the message ID they answer (what went wrong
        in `problems`)."""
        try:
            await self._read_each_answer(stream, reader, sent, answers, everything_sent,
                                         all_answered)
        except UNANSWERED as exc:
            problems.append(exc)
            all_answered.set()

    async def _read_each_answer(self, stream: Link, reader: dicom.PduReader,
                                sent: dict[int, dimse.Command], answers: dict[int, list[int]],
                                everything_sent: trio.Event, all_answered: trio.Event) -> None:
        fragments: dict[int, bytearray] = {}
        finished: set[int] = set()
        while True:
            pdu = await self._next_pdu(stream, reader)
            if pdu[0] == dicom.A_ABORT:
                raise NotCompared("aborted the association")
            if pdu[0] != dicom.P_DATA_TF:
                continue
            for pdv in dicom.decode_p_data(pdu):
                if not pdv.is_command:
                    continue  # a C-FIND match's identifier: counted by its response
                fragments.setdefault(pdv.context_id, bytearray()).extend(pdv.data)
                if not pdv.is_last:
                    continue
                try:
                    answer = dimse.decode(pdv.context_id, bytes(fragments.pop(pdv.context_id)))
                except dimse.DimseError as exc:
                    raise NotCompared(f"sent a command set that cannot be read: {exc}") from None
                if answer.responded_to is None or answer.status is None:
                    continue
                answers.setdefault(answer.responded_to, []).append(answer.status)
                if answer.status not in dimse.PENDING:
                    finished.add(answer.responded_to)
            if everything_sent.is_set() and finished >= sent.keys():
                all_answered.set()

    async def _release(self, stream: Link, reader: dicom.PduReader) -> None:
        """A-RELEASE-RQ, and its RP awaited briefly (then the connection closes anyway)."""
        try:
            await self._send(stream, dicom.RELEASE_RQ)
            with trio.move_on_after(RELEASE_WAIT):
                while (await self._next_pdu(stream, reader))[0] != dicom.A_RELEASE_RP:
                    pass
        except (NotCompared, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


def _status(statuses: list[int]) -> str:
    return f"0x{statuses[-1]:04x}" if statuses else "no response"
