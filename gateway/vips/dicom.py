"""DICOM VIP: balance per association (one TCP connection carries exactly one, PS3.8 §9.1.1).

Rules kept here (docs/dicom.md; PS3.8 §7.1 and §9.3):
- The client gets an A-ASSOCIATE-AC only from a real member; the gateway never invents success.
- Refused, timed out, closed or aborted before answering the RQ, or no answer within
  `assoc_timeout` (a hung PACS still accepts TCP): the next member gets the RQ; the client sees
  nothing of it.
- Nothing can take it: A-ASSOCIATE-RJ rejected-transient, so the modality keeps its images and
  retries. Never a bare reset.
- A side lost mid-association: A-ABORT to the other, so no C-STORE is taken as stored that was not.
- After the AC the relay is a byte splice that only follows PDU boundaries, never P-DATA content.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import Callable

import trio

from gateway.balancer import Member, NoMemberAvailable, NoMemberReason
from gateway.config import VipConfig, is_ip
from gateway.records.atna import Actor
from gateway.net.channel import receive_ready, receive_when_ready
from gateway.net.link import Link
from gateway.net.peer import Peer
from gateway.net.relay import (MemberFailed, Splice, SpliceEnd, Traffic, clock_reader,
                           describe_os_error, dispatch, send_quietly, strike, unwell)
from gateway.net.limits import ClientSlot
from gateway.vips import VipHandler
from gateway.vips.shadow import (DICOM_TAPE, DicomCopy, DicomShadow, accepted_contexts,
                                 association_answer)
from gateway.vips.workflow import MPPS, WorkflowAffinity
from protocols.dicom import (A_ABORT, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ,
                             A_RELEASE_RP, A_RELEASE_RQ, ABORT_PROVIDER,
                             DICOM_APPLICATION_CONTEXT, PDU_NAMES, REJECT_ALL_FULL,
                             REJECT_APPLICATION_CONTEXT, REJECT_CALLED_AE, REJECT_CALLING_AE,
                             REJECT_NO_MEMBER, REJECT_NO_REASON, REJECT_PROTOCOL_VERSION, Abort,
                             Association, AssociateReject, PduReader, ProtocolError,
                             RejectResult, ae_title_problem, request_uid_problem)
from protocols.dimse import (C_CANCEL_RQ, C_FIND_RQ, C_GET_RQ, C_MOVE_RQ, C_STORE_RQ,
                             C_STORE_RSP, N_CREATE_RSP, N_SET_RQ, N_SET_RSP, PENDING, Command,
                             CommandPeek, member_unwell, status_meaning)

log = logging.getLogger("medgate.dicom")

MAX_OUTSTANDING = 1024  # requests of one association followed until their response
# Requests whose time to answer is their own (how much was asked for), not the member's health
SIZED_BY_THE_ASKING = frozenset({C_FIND_RQ, C_MOVE_RQ, C_GET_RQ})
# Seconds a modality waited in silence for a response before its A-ABORT, for that abort to
# count against the member (its DIMSE timeout; a user's cancel comes while it still sends)
GAVE_UP_AFTER = 10.0
# Seconds a rejected requestor is given to close (PS3.8 §9.1.5 ARTIM timer): a loaded
# requestor can take over a second to read the RJ; pynetdicom's own ARTIM is 30 s.
ARTIM = 10.0


class Outcome(enum.Enum):
    """How an association ended: the audit log's one word (the detail says why)."""

    RELEASED = "released"
    ABORTED = "aborted"
    REJECTED = "rejected"
    FAILED = "failed"


async def await_close(client: Link) -> None:
    """After an A-ASSOCIATE-RJ the requestor closes the transport (PS3.8 §9.2, AR-3, Sta13): wait
    for that, at most ARTIM, rather than closing first (a requestor that sees the close before
    it has read the RJ takes the association as aborted, not rejected)."""
    with trio.move_on_after(ARTIM):
        try:
            while await client.receive_some(4096):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


class PeerClosed(Exception):
    """The peer closed (or broke) the connection before a whole PDU arrived."""


async def read_pdu(stream: trio.abc.ReceiveStream, reader: PduReader,
                   answer: bool = False) -> bytes:
    """The next whole PDU; raises PeerClosed on EOF/reset, ProtocolError on garbage.
    `answer`: its bytes cannot be here yet (the answer to a PDU just sent, or what
    pdu_at_hand just found missing): epoll before the first read (receive_when_ready)."""
    while (pdu := reader.next_pdu()) is None:
        try:
            data = await (receive_when_ready(stream, 65536) if answer
                          else stream.receive_some(65536))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PeerClosed(describe_os_error(exc)) from None
        if not data:
            raise PeerClosed("connection closed")
        answer = False
        reader.feed(data)
    return pdu


def pdu_at_hand(stream: trio.abc.ReceiveStream, reader: PduReader) -> bytes | None:
    """The next whole PDU when its bytes are here already, without waiting (and so without a
    timer: a modality sends its A-ASSOCIATE-RQ as it connects, and it has often arrived when
    its association starts); None when it is not (what did come is in `reader`, and the end of
    the stream is left for `read_pdu` to find). PeerClosed on a reset."""
    while (pdu := reader.next_pdu()) is None:
        try:
            data = receive_ready(stream, 65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise PeerClosed(describe_os_error(exc)) from None
        if not data:
            return None
        reader.feed(data)
    return pdu


@dataclass
class _Answer:
    """A member's answer to the RQ: its stream, the AC (decoded) or RJ PDU, bytes after it."""

    stream: Link
    pdu: bytes
    leftover: bytes
    accept: Association | None = None  # None: the answer is an A-ASSOCIATE-RJ or A-ABORT
    abort: Abort | None = None  # the member aborted the RQ: relayed as its answer


class DicomSplice(Splice):
    """The post-AC relay: follows PDU boundaries both ways to end associations correctly, and
    hands each DIMSE response of the member to `answered`, with the request it settles (its
    data sets are never read).

    It knows which side owes a response (`owed`): while only one does, the association is
    not idle but waiting on that side, which may have a bound of its own (`member_owes_timeout`,
    `client_owes_timeout`: the VIP's server_timeout and client_timeout).
    """

    def __init__(self, *args, asked: Callable[[Command], None],
                 answered: Callable[[Command, Command | None], None],
                 tape: bytearray | None = None,
                 member_owes_timeout: float | None = None,
                 client_owes_timeout: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.trackers = {"client": CommandPeek(), "member": CommandPeek()}
        self.asked = asked
        self.answered = answered
        self.ended_cleanly = False  # an A-RELEASE-RP or A-ABORT went through
        self.tape = tape  # the client's bytes, kept for shadow members (None: not, or too big)
        self.quiet_timeout = self.idle_timeout  # while neither side (or both) owes a response
        self.member_owes_timeout = member_owes_timeout or self.quiet_timeout
        self.client_owes_timeout = client_owes_timeout or self.quiet_timeout
        # side -> {message id: (request, when it went)}: the requests it has yet to answer
        self.owed: dict[str, dict[int, tuple[Command, float]]] = {"client": {}, "member": {}}
        self.given_up = ""  # what the member owed when the modality aborted ("" if nothing)
        # ... and whether that was work (not a query or retrieve) it had waited for in silence
        self.given_up_on_work = False
        self._client_heard = 0.0  # when the client's last bytes came

    def owing(self, side: str) -> str:
        """What `side` owes, for a log ('' when nothing)."""
        owed = self.owed[side]
        if not owed:
            return ""
        request, asked_at = next(iter(owed.values()))
        count = f"{len(owed)} responses, the first" if len(owed) > 1 else "a response"
        return f"{count} to a {request.name} of {self._clock() - asked_at:.0f}s ago"

    def waiting_on(self) -> str | None:
        """The side the association waits on: the one alone that owes a response; None when
        neither or both do, or it is over."""
        member_owes, client_owes = self.owed["member"], self.owed["client"]
        if self.ended_cleanly or bool(member_owes) == bool(client_owes):
            return None
        return "member" if member_owes else "client"

    def owes_work(self, side: str) -> bool:
        """`side` owes a response to anything but a query or retrieve (SIZED_BY_THE_ASKING),
        whose answer may take long for its own size."""
        return any(request.field not in SIZED_BY_THE_ASKING
                   for request, _ in self.owed[side].values())

    def observe(self, source: str, chunk: bytes | bytearray) -> None:
        quiet_for = 0.0
        if source == "client":
            now = self._clock()
            quiet_for, self._client_heard = now - self._client_heard, now
            if self.tape is not None:
                self.tape += chunk
                if len(self.tape) > DICOM_TAPE:  # a whole study: not copied (dropped)
                    self.tape.clear()
                    self.tape = None
        tracker = self.trackers[source]
        tracker.feed(chunk)
        if tracker.last_type in (A_RELEASE_RP, A_ABORT):
            if source == "client" and tracker.last_type == A_ABORT and not self.ended_cleanly:
                # The modality gave up on a response: its own DIMSE timeout when it had
                # waited in silence, a user's cancel (in the middle of sending) when not
                self.given_up = self.owing("member")
                self.given_up_on_work = (quiet_for >= GAVE_UP_AFTER
                                         and self.owes_work("member"))
            self.ended_cleanly = True
            self.idle_timeout = self.quiet_timeout  # over: nothing more is owed
            # The member's RP to the client's A-RELEASE-RQ, no collision: the association is
            # over, and its requester closes the transport now (PS3.8 §9.2 action AR-3); the
            # gateway does so both ways. A collision, or a release the member asked for,
            # ends as the two sides close.
            client = self.trackers["client"]
            self.complete = (source == "member" and tracker.last_type == A_RELEASE_RP
                             and tracker.at_boundary and client.last_type == A_RELEASE_RQ
                             and client.at_boundary)
        if tracker.commands:
            self._follow(source, tracker.take())

    def _follow(self, source: str, commands: list[Command]) -> None:
        """Commands `source` sent: who owes what now, and the callbacks."""
        owed = self.owed
        owed_here = owed[source]
        owed_there = owed["member" if source == "client" else "client"]
        for command in commands:
            if command.is_response:
                settled = None  # a response without a status settles nothing it can tell
                if (command.status is not None and command.status not in PENDING
                        and command.responded_to is not None):
                    settled = owed_here.pop(command.responded_to, None)
                if source == "member":
                    self.answered(command, settled[0] if settled else None)
            else:
                if command.field != C_CANCEL_RQ and command.message_id is not None:
                    if len(owed_there) >= MAX_OUTSTANDING:  # the oldest goes
                        del owed_there[next(iter(owed_there))]
                    owed_there[command.message_id] = (command, self._clock())
                if source == "client":
                    self.asked(command)
        if not self.ended_cleanly:
            waiting_on = self.waiting_on()
            self.idle_timeout = (self.member_owes_timeout if waiting_on == "member" else
                                 self.client_owes_timeout if waiting_on == "client" else
                                 self.quiet_timeout)

    def farewell(self, ended: str, why: str) -> bytes:
        # Toward the side still there: an A-ABORT, if that stream stands between two PDUs.
        toward_other = self.trackers[ended]  # bytes from `ended` went to the other side
        if self.ended_cleanly or not toward_other.at_boundary:
            return b""
        return ABORT_PROVIDER.encode()


class DicomVip(VipHandler):
    """Handles each association of one `protocol = "dicom"` VIP."""

    shadow_type = DicomShadow

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._records = self.audit.layout(
            "dicom", "vip", "client", "calling_ae", "called_ae", "member", "pdus_in", "pdus_out",
            "bytes_in", "bytes_out", "failure_statuses", "duration_ms", "outcome", "detail")

    def reconfigure(self, vip: VipConfig) -> None:
        before = set(getattr(self, "members", ()))
        super().reconfigure(vip)
        self.workflow = getattr(self, "workflow", None) or WorkflowAffinity()  # kept on reload
        for name in before - set(self.members):
            self.workflow.forget_member(name)
        self.routes = dict(vip.routes)
        self.allowed = set(vip.allowed_calling_aes)
        self.certificate_aes = dict(vip.allowed_clients)
        # A destination named by an IP address, to compare with where its AE title calls from.
        self.destination_hosts = {d.ae_title: d.address.host for d in vip.destinations
                                  if is_ip(d.address.host)}
        self._warned: set[tuple[str, str]] = getattr(self, "_warned", set())
        # The called AE titles answered: ae_titles, else the AEs routes name (unless "*").
        self.called_aes = set(vip.ae_titles) or (
            set(self.routes) if self.routes and "*" not in self.routes else set())
        if not self.called_aes:
            log.warning("vip=%s answers to any called AE title: set ae_titles = [...] so that "
                        "a modality sending to a wrong AE title is refused, not stored",
                        vip.name)
        if vip.mode == "balance" and len(vip.members) > 1 and vip.persistence is None:
            log.warning("vip=%s balances each association over %d members without persistence "
                        "(study_window = 0): the images of one study may reach several members; "
                        "C-FIND/C-GET/C-MOVE, MPPS (N-CREATE then N-SET) and storage commitment "
                        "need members that share one database", vip.name, len(vip.members))
        elif vip.persistence_implicit and vip.persistence and len(vip.members) > 1:
            log.info("vip=%s keeps each calling AE on the member that took its last association "
                     "for %gs (study_window): a study stays on one member", vip.name,
                     vip.persistence.timeout)

    async def handle(self, client: Link, slot: ClientSlot) -> None:
        """Serve one association from A-ASSOCIATE-RQ to release, abort or reject."""
        clock = clock_reader()  # two calls a read, not four (the association reads it thrice)
        started = clock()
        client_name = slot.client
        session = _Session(self, client, client_name, slot.peer, slot)
        session.clock = clock
        try:
            ended, outcome = await session.run()
        except ProtocolError as exc:
            ended, outcome = await aborted(client, exc, "client")
        duration = clock() - started
        if self.records.inventory is not None and session.request is not None:
            request = session.request
            self.records.inventory.record(
                self.vip.name, request.calling_ae, session.client_host, request.called_ae,
                [(c.abstract_syntax, c.transfer_syntaxes) for c in request.presentation_contexts],
                accepted=ended is not Outcome.REJECTED)
        level = logging.DEBUG if ended is Outcome.RELEASED else logging.INFO  # summary counts it
        if log.isEnabledFor(level):
            log.log(level, "vip=%s client=%s calling=%s called=%s member=%s pdus=%d/%d "
                    "bytes_in=%d bytes_out=%d duration=%.3fs outcome=%s", self.vip.name,
                    client_name, session.calling or "-", session.called or "-",
                    session.member_name or "-", session.pdus_in, session.pdus_out,
                    session.traffic.from_client, session.traffic.from_member, duration, outcome)
        self._records.record(self.vip.name, client_name, session.calling, session.called,
                             session.member_name or None, session.pdus_in, session.pdus_out,
                             session.traffic.from_client, session.traffic.from_member,
                             session.unwell, round(duration * 1000, 1), ended.value, outcome)
        if self.shadows and session.request is not None and session.answer:
            self._copy_to_shadows(session, cut=ended not in (Outcome.RELEASED,
                                                             Outcome.REJECTED))
        if ended is Outcome.REJECTED:
            await await_close(client)

    def _copy_to_shadows(self, session: _Session, cut: bool) -> None:
        """The association, ended (`cut`: not by a release), to each shadow's queue; one too
        big to keep (DICOM_TAPE) is counted as dropped."""
        request = session.request
        if request is None or not session.copying:
            return  # shadowing was off when it began
        if session.tape is None:
            for shadow in self.shadows.values():
                shadow.dropped += 1
            log.info("vip=%s calling=%s: the association is over %d bytes: not copied to the "
                     "shadow members", self.vip.name, session.calling, DICOM_TAPE)
            return
        self._to_shadows(DicomCopy("A-ASSOCIATE", request.calling_ae, session.member_name,
                                   request, session.answer, session.accepted,
                                   bytes(session.tape), session.responses,
                                   cut and session.answer == "accepted"))

    async def refuse(self, client: Link, client_name: str, why: str) -> None:
        await refuse_association(self, client, client_name, why)

    def note_calling_host(self, calling_ae: str, host: str) -> None:
        """A calling AE that is also a return-path destination, calling from another host than
        its destination's: the reports and images for it would go elsewhere (logged once)."""
        destination = self.destination_hosts.get(calling_ae)
        if destination is None or destination == host or (calling_ae, host) in self._warned:
            return
        self._warned.add((calling_ae, host))
        log.warning("vip=%s calling AE %r calls from %s, but its return-path destination is "
                    "at %s: storage commitment reports and C-MOVE images for it go there",
                    self.vip.name, calling_ae, host, destination)


async def read_request(stream: Link, reader: PduReader, timeout: float, side: str,
                       slot: ClientSlot | None = None) -> tuple[Association | None, str]:
    """The A-ASSOCIATE-RQ `side` sends on `stream` within `timeout` (the opening of `slot`,
    if given: evicted first under pressure); (None, why) when it went or said nothing;
    ProtocolError when it sent another PDU."""
    try:
        pdu = pdu_at_hand(stream, reader)
        if pdu is None:
            deadline = trio.current_time() + timeout
            with (slot.opening("first-unit", deadline) if slot is not None
                  else trio.CancelScope(deadline=deadline)) as waiting:
                pdu = await read_pdu(stream, reader, True)
            if waiting.cancelled_caught:
                return None, f"no A-ASSOCIATE-RQ within {timeout:g}s; closed"
    except PeerClosed as exc:
        return None, f"{side} went before its A-ASSOCIATE-RQ: {exc}"
    if pdu[0] != A_ASSOCIATE_RQ:
        raise ProtocolError(f"expected A-ASSOCIATE-RQ, got {PDU_NAMES[pdu[0]]}", (2, 2))
    return Association.decode(pdu), ""


async def aborted(client: Link, exc: ProtocolError, side: str) -> tuple[Outcome, str]:
    """A protocol error from the `side` that sends on `client` ends the association with an
    A-ABORT to it; the outcome. (Caught where the association runs, not in a wrapper around
    it: a frame more would be resumed on every wait of the association's task.)"""
    await send_quietly(client, Abort(*exc.abort).encode())
    return Outcome.FAILED, f"protocol error from {side}: {exc.reason}; A-ABORT sent"


async def refuse_association(handler: VipHandler, client: Link, client_name: str,
                             why: str) -> None:
    """Over max_clients: read the RQ, answer A-ASSOCIATE-RJ transient, local-limit-exceeded
    (PS3.8 Table 9-21), so the modality keeps its images and retries."""
    handler.pool.count_refused()
    try:
        pdu = await read_pdu(client, PduReader())
    except (PeerClosed, ProtocolError) as exc:
        log.warning("vip=%s client=%s refused, closed before its A-ASSOCIATE-RQ (%s): %s",
                    handler.vip.name, client_name, exc, why)
        return
    if pdu[0] == A_ASSOCIATE_RQ:
        await send_quietly(client, REJECT_ALL_FULL.encode())
    detail = f"rejected by the gateway ({REJECT_ALL_FULL.describe()}): {why}"
    log.warning("vip=%s client=%s %s", handler.vip.name, client_name, detail)
    handler.audit.record("dicom", vip=handler.vip.name, client=client_name, member=None,
                         outcome=Outcome.REJECTED.value, detail=detail)


def refusal_of_titles(request: Association) -> tuple[AssociateReject, str] | None:
    """AE titles outside the default repertoire cannot be matched, rewritten or logged."""
    for reject, what, field_bytes in ((REJECT_CALLED_AE, "called", request.raw[10:26]),
                                      (REJECT_CALLING_AE, "calling", request.raw[26:42])):
        problem = ae_title_problem(field_bytes)
        if problem:
            return reject, f"{what} AE title is not valid: {problem}"
    return None


class _Session:
    """One association through the gateway (state shared by the steps of `DicomVip.handle`)."""

    def __init__(self, vip: DicomVip, client: Link, client_name: str,
                 peer: Peer, slot: ClientSlot | None = None) -> None:
        self.vip = vip
        self.slot = slot
        self.peer = peer
        self.config = vip.vip
        self.pool = vip.pool
        self.client = client
        self.client_name = client_name
        self.calling = ""
        self.called = ""
        self.member_name = ""
        self.pdus_in = self.pdus_out = 0
        self.unwell = 0  # member responses whose status said it is in trouble
        self.transient: tuple[str, bytes, AssociateReject] | None = None  # the last such RJ
        self.request: Association | None = None
        self.traffic = Traffic()
        # For shadow members: the client's bytes after its RQ, what the member answered
        self.copying = any(shadow.on for shadow in vip.shadows.values())
        self.tape: bytearray | None = bytearray() if self.copying else None  # None: too big
        self.answer = ""  # the member's answer to the RQ (shadow.association_answer)
        self.accepted: dict[int, str] = {}
        self.responses: dict[int, list[int]] = {}  # message ID -> statuses of its responses
        self.clock: Callable[[], float] = trio.current_time  # handle: the run's clock_reader

    @property
    def client_host(self) -> str:
        """The client's address without the port (the proxy's word for it, with PROXY)."""
        return self.peer.host

    async def run(self) -> tuple[Outcome, str]:
        """The association from its RQ to its end: how it ended, and the detail."""
        reader = PduReader()
        request, why = await read_request(
            self.client, reader, self.config.assoc_timeout, "client",
            self.slot)
        if request is None:
            return Outcome.FAILED, why
        self.calling, self.called = request.calling_ae, request.called_ae
        self.pdus_in = 1
        self.traffic.from_client = len(request.raw)
        refusal = refusal_of_titles(request)  # checked first
        if refusal is None:
            self.request = request  # AE titles safe to keep (for the inventory)
            self.vip.note_calling_host(request.calling_ae, self.client_host)
            refusal = self._refusal(request) or self._certificate_refusal(request)
        if refusal is not None:
            reject, why = refusal
            self.pool.count_refused()
            await send_quietly(self.client, reject.encode())
            return Outcome.REJECTED, f"rejected by the gateway ({reject.describe()}): {why}"
        key = self._persistence_key(request)
        among = self._route(request.called_ae)
        workflow = self.vip.workflow.kind([c.abstract_syntax
                                           for c in request.presentation_contexts])
        if workflow is not None:
            affine = self.vip.workflow.member_for(workflow, request.calling_ae,
                                                  trio.current_time())
            if affine in self.vip.members:
                among = [affine]  # that member, or a transient reject: never another one
        held = self.pool.persisted_member(key) if self.config.persistence else None
        unit = f"calling_ae={request.calling_ae!r} " + (
            f"(affinity: {held})" if held else "(no affinity yet)")
        try:
            member, answer = await dispatch(self.pool, key,
                                            lambda m: self._associate(m, request, reader),
                                            among=among, unit=unit, now=self.clock())
        except NoMemberAvailable as exc:
            if self.transient is not None:
                name, pdu, reject = self.transient
                await send_quietly(self.client, pdu)
                return Outcome.REJECTED, (f"rejected by {name} ({reject.describe()}); "
                                          f"{exc.reason.value}")
            reject = REJECT_ALL_FULL if exc.reason is NoMemberReason.ALL_FULL else REJECT_NO_MEMBER
            await send_quietly(self.client, reject.encode())
            return Outcome.REJECTED, (f"rejected by the gateway ({reject.describe()}): "
                                      f"{exc.reason.value}")
        self.member_name = member.name
        if self.tape is not None:
            self.tape += reader.leftover()  # sent on with the RQ
        try:
            return await self._relay(member, answer, request)
        finally:
            self.pool.drop_conn(member, self.traffic.from_client, self.traffic.from_member)
            answer.stream.close()

    def _refusal(self, request: Association) -> tuple[AssociateReject, str] | None:
        if not request.protocol_version & 1:
            return REJECT_PROTOCOL_VERSION, f"protocol version {request.protocol_version}"
        if request.application_context != DICOM_APPLICATION_CONTEXT:
            return REJECT_APPLICATION_CONTEXT, "application context is not DICOM's"
        problem = request_uid_problem(request)
        if problem:  # checked here, so that no member is blamed for what the modality sent
            return REJECT_NO_REASON, problem
        if self.vip.allowed and request.calling_ae not in self.vip.allowed:
            return REJECT_CALLING_AE, f"calling AE {request.calling_ae!r} is not allowed"
        if self.vip.called_aes and request.called_ae not in self.vip.called_aes:
            return REJECT_CALLED_AE, (f"called AE {request.called_ae!r} is not one this VIP "
                                      "answers to (ae_titles)")
        if self.vip.routes and self._route(request.called_ae) is None:
            return REJECT_CALLED_AE, f"no route for called AE {request.called_ae!r}"
        return None

    def _certificate_refusal(self, request: Association) -> tuple[AssociateReject, str] | None:
        """allowed_clients: the calling AE must be one the client's certificate may use; a
        refusal is a security event (node authentication failed)."""
        if not self.vip.certificate_aes:
            return None
        allowed = {ae for name in self.peer.names for ae in self.vip.certificate_aes.get(name, ())}
        if request.calling_ae in allowed:
            return None
        holder = self.peer.subject or "no certificate"
        why = (f"calling AE {request.calling_ae!r} is not one that {holder} may use "
               "(allowed_clients)")
        self.vip.audit.node_refused(self.config.name, Actor(request.calling_ae, self.peer.host),
                                    why)
        return REJECT_CALLING_AE, why

    def _route(self, called_ae: str) -> list[str] | None:
        routes = self.vip.routes
        if not routes:
            return None
        targets = routes.get(called_ae, routes.get("*"))
        return list(targets) if targets else None

    def _persistence_key(self, request: Association) -> str:
        persistence = self.config.persistence
        if persistence is not None and persistence.key == "calling-ae":
            # With routes, each called AE is its own study destination: one entry per route,
            # so a modality sending to two routes keeps its member on each.
            return (f"{request.calling_ae}\x1f{request.called_ae}" if self.vip.routes
                    else request.calling_ae)
        return self.client_host

    async def _associate(self, member: Member, request: Association, client_reader: PduReader):
        """Send the RQ to `member` and wait for its AC/RJ; MemberFailed moves to the next one."""
        config = self.vip.members[member.name]
        stream = await self.vip.open_member(member.name, self.peer)
        try:
            rq = request.with_called_ae(config.ae_title) if config.ae_title else request.raw
            try:
                await stream.send_all(rq + client_reader.leftover())
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise MemberFailed(f"sending the A-ASSOCIATE-RQ: {describe_os_error(exc)}") from None
            reader = PduReader()
            deadlines = self.vip.deadlines
            limit = deadlines.limit(stream, self.clock() + self.config.assoc_timeout)
            try:
                pdu = await read_pdu(stream, reader, True)
            except PeerClosed as exc:
                if limit.expired:
                    raise MemberFailed(f"no answer to the A-ASSOCIATE-RQ within "
                                       f"{self.config.assoc_timeout:g}s") from None
                raise MemberFailed(f"{exc} before answering the A-ASSOCIATE-RQ") from None
            except ProtocolError as exc:
                raise MemberFailed(f"answered the A-ASSOCIATE-RQ with garbage: {exc}") from None
            finally:
                deadlines.end(limit)
            if pdu[0] == A_ABORT:
                # Its answer to this request, whose every part the gateway could check is
                # checked: the modality gets it, as from a direct connection; not another
                # member (the request may be the cause), and not a strike.
                try:
                    abort = Abort.decode(pdu)
                except ProtocolError as exc:
                    raise MemberFailed(f"sent a malformed A-ABORT: {exc}") from None
                return _Answer(stream, pdu, reader.leftover(), abort=abort)
            if pdu[0] not in (A_ASSOCIATE_AC, A_ASSOCIATE_RJ):
                raise MemberFailed(f"answered the A-ASSOCIATE-RQ with {PDU_NAMES[pdu[0]]}")
            try:
                accept = Association.decode(pdu) if pdu[0] == A_ASSOCIATE_AC else None
                reject = None if accept else AssociateReject.decode(pdu)
            except ProtocolError as exc:
                raise MemberFailed(f"sent a malformed {PDU_NAMES[pdu[0]]}: {exc}") from None
            if reject is not None and reject.result == RejectResult.TRANSIENT:
                # Busy is not dead: no strike. With on_busy = "next-member" (balance mode's
                # default) another member may take it, and the modality gets this answer only
                # when none can (the last one is kept); else it is relayed now: the modality
                # retries later and its study stays on this member.
                self.transient = (member.name, pdu, reject)
                if self.config.busy_moves_on:
                    raise MemberFailed(f"busy: rejected the association ({reject.describe()})",
                                       member_at_fault=False)
            return _Answer(stream, pdu, reader.leftover(), accept)
        except BaseException:
            stream.close()
            raise

    async def _relay(self, member: Member, answer: _Answer,
                     request: Association) -> tuple[Outcome, str]:
        self.pdus_out = 1
        self.traffic.from_member = len(answer.pdu)
        self.answer = association_answer(answer.pdu)
        if answer.accept is not None:
            self.accepted = accepted_contexts(answer.accept)
        if answer.abort is not None:
            await send_quietly(self.client, answer.pdu)
            return Outcome.ABORTED, (f"aborted by {member.name} in answer to the "
                                     f"A-ASSOCIATE-RQ ({answer.abort.describe()}); relayed, not "
                                     "a strike")
        if answer.accept is None:
            reject = AssociateReject.decode(answer.pdu)
            await send_quietly(self.client, answer.pdu)
            relayed = (" (busy: relayed, on_busy = \"relay\")"
                       if reject.result == RejectResult.TRANSIENT else "")
            return Outcome.REJECTED, f"rejected by {member.name} ({reject.describe()}){relayed}"
        # PS3.8 §9.3.3: the AC's called AE field carries the value received in the RQ.
        await send_quietly(self.client, answer.accept.with_called_ae(request.called_ae)
                            if request.called_ae else answer.pdu)
        splice = DicomSplice(self.client, answer.stream,
                             min(self.config.client_timeout, self.config.server_timeout),
                             self.traffic, asked=lambda command: self._asked(member, command),
                             answered=lambda command, request: self._answered(member, command,
                                                                              request),
                             tape=self.tape,
                             member_owes_timeout=self.config.server_timeout,
                             client_owes_timeout=self.config.client_timeout)
        if answer.leftover:
            splice.observe("member", answer.leftover)
            await send_quietly(self.client, answer.leftover)
        end, detail = await splice.run()
        self.tape = splice.tape
        for pending, _ in splice.owed["member"].values():  # the modality keeps the image
            if pending.field == C_STORE_RQ:
                self._receipt(member, pending, -1)
        self.pdus_in += splice.trackers["client"].pdus
        self.pdus_out += splice.trackers["member"].pdus
        if end is SpliceEnd.IDLE and splice.waiting_on() == "member":
            # The modality waited on the PACS, not the other way: an answer from inside the
            # association that says the PACS is in trouble (as a C-STORE refused out of
            # resources: report_status, which the next association's AC does not clear),
            # unless all it owed were queries and retrieves, which may take long for their
            # own size (their statuses never count against it either: member_unwell)
            detail = (f"{member.name} sent nothing for {splice.idle_timeout:g}s, owing "
                      f"{splice.owing('member')}")
            if splice.owes_work("member"):
                unwell(self.pool, member, detail, now=trio.current_time(), source=self.calling)
            else:
                detail += " (a query or retrieve: not counted against it)"
        elif splice.given_up_on_work:
            # The modality's own time limit ran out on the PACS: counted as a stall is (it
            # takes error_limit in a row from two calling AEs, and any good C-STORE-RSP
            # clears them, so one impatient modality cannot mark it down)
            unwell(self.pool, member, f"the client aborted while {member.name} was owing "
                                      f"{splice.given_up}", now=trio.current_time(),
                   source=self.calling)
        if end is SpliceEnd.MEMBER:
            strike(self.pool, member, detail)
        if end is SpliceEnd.CLOSED:
            if splice.trackers["member"].last_type == A_ABORT:
                return Outcome.ABORTED, f"aborted by {member.name}"
            if splice.trackers["client"].last_type == A_ABORT:
                return Outcome.ABORTED, "aborted by the client" + (
                    f" while {member.name} was owing {splice.given_up}" if splice.given_up
                    else "")
            return Outcome.RELEASED, "released"
        return Outcome.FAILED, detail


    def _asked(self, member: Member, command: Command) -> None:
        """A request of the modality (the splice keeps it until its response): an MPPS
        N-SET-RQ is checked against the member that created the instance."""
        if command.field == N_SET_RQ and command.sop_class == MPPS:
            creator = self.vip.workflow.created_on(command.sop_instance, trio.current_time())
            if creator is not None and creator != member.name:
                log.warning("vip=%s calling=%s member=%s: N-SET of an MPPS instance that %s "
                            "created (it will not know it)", self.config.name, self.calling,
                            member.name, creator)

    def _receipt(self, member: Member, request: Command | None, status: int,
                 answer: Command | None = None) -> None:
        receipts = self.vip.records.receipts
        instance = (answer.sop_instance if answer else "") or (request.sop_instance if request else "")
        if receipts is None or not instance:
            return
        sop_class = (answer.sop_class if answer else "") or (request.sop_class if request else "")
        receipts.add(self.config.name, self.calling, self.client_host, member.name, sop_class,
                     instance, status)

    def _answered(self, member: Member, command: Command, request: Command | None) -> None:
        """A response of the member's and the `request` it settles (its receipt, an MPPS
        instance's creator). Passive health from DIMSE statuses: a C-STORE, N-CREATE or N-SET
        refused for the member's own resources (member_unwell) counts against it,
        `error_limit` in a row from at least two calling AEs within status_window mark it down
        even while it answers C-ECHO (one modality's bad data cannot); other statuses do not.
        The response goes on unchanged."""
        if command.status is None:
            return
        if self.tape is not None and command.responded_to is not None:
            self.responses.setdefault(command.responded_to, []).append(command.status)
        if command.field == C_STORE_RSP and command.responded_to is not None:
            self._receipt(member, request, command.status, command)
            if command.status == 0 or command.status & 0xF000 == 0xB000:  # stored (a warning too)
                self.vip.workflow.stored(self.calling, member.name, trio.current_time())
        elif command.field == N_CREATE_RSP and command.responded_to is not None:
            if request is not None and request.sop_class == MPPS and command.status == 0:
                self.vip.workflow.created(self.calling, command.sop_instance
                                          or request.sop_instance, member.name,
                                          trio.current_time())
        if not member_unwell(command.field, command.status):
            if command.field in (C_STORE_RSP, N_CREATE_RSP, N_SET_RSP):
                self.pool.report_status(member, False, "")  # it takes work again
            return
        self.unwell += 1
        unwell(self.pool, member, f"{command.name} status 0x{command.status:04x} "
                                  f"({status_meaning(command.status)}) to calling AE "
                                  f"{self.calling!r}", now=trio.current_time(),
               source=self.calling)
