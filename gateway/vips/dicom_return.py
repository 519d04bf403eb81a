"""The return path of a DICOM VIP: associations a member opens towards a client (a storage
commitment result, PS3.4 J.3.3; a C-MOVE's C-STORE sub-operations, PS3.4 C.4.2) arrive on the
VIP's `return_listen` and are relayed to the client's SCP as `[[vip.destination]]` lists it,
calling as the VIP (`return_ae_title`) and, where the host allows it, from the VIP's address:
the modality sees the PACS it knows, whichever member did the work.

Rules kept here (docs/dicom.md "The return path"):
- The called AE title names the destination; one not listed: A-ASSOCIATE-RJ permanent (called
  AE title not recognised), logged. A destination that cannot be reached: A-ASSOCIATE-RJ
  transient, so the member keeps the report or sub-operation and retries.
- The destination's AC goes back with the member's own calling AE title in it; after the AC the
  relay follows PDU boundaries, as the VIP's does.
- A storage commitment result (the N-EVENT-REPORT's data set on a Storage Commitment Push
  Model context, in implicit or explicit VR little endian) is read, bounded, and each instance
  it names is recorded as committed by the member or not (receipts); nothing else is read.
- Each association is an audit record (kind "dicom-return").
- Who the association waits on decides the wait, by party as on the VIP: the destination
  (a modality or workstation) owes a response: `client_timeout`; the member owes one:
  `server_timeout`; nothing owed: the shorter. A short server_timeout, set to catch a PACS
  that stalls, does not cut off a workstation slow to store a C-MOVE's image. Nothing here
  counts against the member: the destination is no member of the pool.
"""

from __future__ import annotations

import logging
from typing import Callable

import trio

from gateway.config import Destination, VipConfig, is_ip, is_unspecified
from gateway.net.link import Link
from gateway.net.limits import ClientSlot
from gateway.net.relay import MemberFailed, SpliceEnd, Traffic, connect, send_quietly
from gateway.net.tls import client_context
from gateway.vips import VipHandler
from gateway.vips.dicom import (DicomSplice, Outcome, PeerClosed, await_close, read_pdu,
                                read_request, refusal_of_titles, refuse_association,
                                aborted)
from protocols.commitment import STORAGE_COMMITMENT, DataSetError, read_result
from protocols.dicom import (A_ABORT, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, PDU_NAMES,
                             REJECT_CALLED_AE, REJECT_NO_MEMBER, Abort, Association,
                             AssociateReject, PduReader, ProtocolError)

log = logging.getLogger("medgate.dicom")

__all__ = ["DicomReturnPath"]


class DicomReturnPath(VipHandler):
    """Relays each association of one DICOM VIP's return listener to its destination."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._records = self.audit.layout(
            "dicom-return", "vip", "client", "calling_ae", "called_ae", "destination",
            "pdus_in", "pdus_out", "bytes_in", "bytes_out", "committed", "failed",
            "duration_ms", "outcome", "detail")

    def reconfigure(self, vip: VipConfig) -> None:
        super().reconfigure(vip)
        self.destinations = {d.ae_title: d for d in vip.destinations}
        self.destination_tls = {d.ae_title: client_context(d.tls, d.address.host)
                                for d in vip.destinations if d.tls}
        # From the VIP's own address, when it listens on one (not on 0.0.0.0 or ::).
        host = vip.listen[0].host
        self.local_host = host if is_ip(host) and not is_unspecified(host) else ""

    async def refuse(self, client: Link, client_name: str, why: str) -> None:
        await refuse_association(self, client, client_name, why)

    async def handle(self, client: Link, slot: ClientSlot) -> None:
        started = trio.current_time()
        relay = _Relay(self, client, slot)
        try:
            ended, detail = await relay.run()
        except ProtocolError as exc:
            ended, detail = await aborted(client, exc, "member")
        duration = trio.current_time() - started
        level = logging.INFO if ended is Outcome.RELEASED else logging.WARNING
        log.log(level, "vip=%s return path client=%s calling=%s called=%s destination=%s "
                "committed=%d failed=%d duration=%.3fs outcome=%s", self.vip.name, slot.client,
                relay.calling or "-", relay.called or "-", relay.destination or "-",
                relay.committed, relay.failed, duration, detail)
        self._records.record(self.vip.name, slot.client, relay.calling, relay.called,
                             relay.destination or None, relay.pdus_in, relay.pdus_out,
                             relay.traffic.from_client, relay.traffic.from_member,
                             relay.committed, relay.failed, round(duration * 1000, 1),
                             ended.value, detail)
        if ended is Outcome.REJECTED:
            await await_close(client)

    async def open_destination(self, destination: Destination) -> Link:
        """A connection to `destination` (MemberFailed says why not)."""
        return await connect(destination.address, self.vip.connect_timeout,
                             tls=self.destination_tls.get(destination.ae_title),
                             local_host=self.local_host)

    def member_of(self, calling_ae: str, host: str) -> str:
        """The member an association came from: by its AE title, else its host."""
        for member in self.vip.members:
            if member.ae_title and member.ae_title == calling_ae:
                return member.name
        for member in self.vip.members:
            if member.address.host == host:
                return member.name
        return host


class _Relay:
    """One association on the return path."""

    def __init__(self, path: DicomReturnPath, client: Link, slot: ClientSlot) -> None:
        self.path, self.client, self.slot = path, client, slot
        self.config = path.vip
        self.calling = self.called = self.destination = ""
        self.pdus_in = self.pdus_out = 0
        self.committed = self.failed = 0
        self.traffic = Traffic()

    async def run(self) -> tuple[Outcome, str]:
        reader = PduReader()
        request, why = await read_request(self.client, reader, self.config.assoc_timeout,
                                          "member")
        if request is None:
            return Outcome.FAILED, why
        self.pdus_in, self.traffic.from_client = 1, len(request.raw)
        refusal = refusal_of_titles(request)
        if refusal is None:
            self.calling, self.called = request.calling_ae, request.called_ae
            if request.called_ae not in self.path.destinations:
                known = ", ".join(sorted(self.path.destinations))
                refusal = REJECT_CALLED_AE, (f"called AE {request.called_ae!r} is no destination "
                                             f"of the return path (destinations: {known})")
        if refusal is not None:
            reject, why = refusal
            await send_quietly(self.client, reject.encode())
            return Outcome.REJECTED, f"rejected by the gateway ({reject.describe()}): {why}"
        destination = self.path.destinations[request.called_ae]
        self.destination = f"{destination.ae_title}@{destination.address}"
        try:
            stream = await self.path.open_destination(destination)
        except MemberFailed as exc:
            await send_quietly(self.client, REJECT_NO_MEMBER.encode())
            return Outcome.REJECTED, (f"rejected by the gateway ({REJECT_NO_MEMBER.describe()}):"
                                      f" destination {request.called_ae}: {exc}")
        try:
            return await self._associate(stream, request, reader)
        finally:
            stream.close()

    async def _associate(self, stream: Link, request: Association,
                         reader: PduReader) -> tuple[Outcome, str]:
        """The RQ to the destination as the VIP; its answer back to the member."""
        try:
            await stream.send_all(request.with_calling_ae(self.config.return_ae_title)
                                  + reader.leftover())
            answers = PduReader()
            with trio.fail_after(self.config.assoc_timeout):
                pdu = await read_pdu(stream, answers)
        except (trio.BrokenResourceError, trio.ClosedResourceError, PeerClosed, ProtocolError,
                trio.TooSlowError) as exc:
            await send_quietly(self.client, REJECT_NO_MEMBER.encode())
            return Outcome.REJECTED, (f"rejected by the gateway ({REJECT_NO_MEMBER.describe()}):"
                                      f" destination {request.called_ae} did not answer the "
                                      f"A-ASSOCIATE-RQ: {exc or 'timeout'}")
        self.pdus_out, self.traffic.from_member = 1, len(pdu)
        if pdu[0] == A_ASSOCIATE_RJ:
            await send_quietly(self.client, pdu)
            return Outcome.REJECTED, (f"rejected by destination {request.called_ae} "
                                      f"({AssociateReject.decode(pdu).describe()})")
        if pdu[0] != A_ASSOCIATE_AC:
            await send_quietly(self.client, pdu if pdu[0] == A_ABORT else Abort(2, 0).encode())
            return Outcome.ABORTED, (f"destination {request.called_ae} answered the "
                                     f"A-ASSOCIATE-RQ with {PDU_NAMES[pdu[0]]}")
        accept = Association.decode(pdu)
        # PS3.8 §9.3.3: the AC carries the calling AE title of the RQ, the member's own.
        await send_quietly(self.client, accept.with_calling_ae(request.calling_ae))
        return await self._splice(stream, request, accept, answers.leftover())

    async def _splice(self, stream: Link, request: Association, accept: Association,
                      leftover: bytes) -> tuple[Outcome, str]:
        syntaxes = {context.id: context.transfer_syntaxes[0]
                    for context in accept.presentation_contexts
                    if context.result == 0 and context.transfer_syntaxes}
        commitment = frozenset(context.id for context in request.presentation_contexts
                               if context.abstract_syntax == STORAGE_COMMITMENT
                               and context.id in syntaxes)
        # The splice's member is the destination (a modality's SCP), its client the member
        splice = _ReturnSplice(
            self.client, stream, min(self.config.client_timeout, self.config.server_timeout),
            self.traffic, commitment=commitment,
            results=lambda context, data: self._commitment(request, data, syntaxes[context]),
            member_owes_timeout=self.config.client_timeout,
            client_owes_timeout=self.config.server_timeout)
        client_side = splice.trackers["client"]
        if leftover:
            splice.observe("member", leftover)
            await send_quietly(self.client, leftover)
        end, detail = await splice.run()
        self.pdus_in += client_side.pdus
        self.pdus_out += splice.trackers["member"].pdus
        if end is SpliceEnd.CLOSED:
            if splice.trackers["member"].last_type == A_ABORT:
                return Outcome.ABORTED, f"aborted by destination {request.called_ae}"
            if client_side.last_type == A_ABORT:
                return Outcome.ABORTED, "aborted by the member" + (
                    f" while destination {request.called_ae} was owing {splice.given_up}"
                    if splice.given_up else "")
            return Outcome.RELEASED, "released"
        waiting_on = splice.waiting_on()
        if end is SpliceEnd.IDLE and waiting_on is not None:
            # Who it waited on, for the engineer: a destination that never answered a
            # sub-operation, or a member that asked and went quiet
            who = f"destination {request.called_ae}" if waiting_on == "member" else "the member"
            detail = (f"{who} sent nothing for {splice.idle_timeout:g}s, owing "
                      f"{splice.owing(waiting_on)}")
        return Outcome.FAILED, detail

    def _commitment(self, request: Association, data: bytes, syntax: str) -> None:
        """A storage commitment result on its way to the modality: its instances recorded."""
        try:
            result = read_result(data, syntax)
        except DataSetError as exc:
            log.warning("vip=%s return path calling=%s: a storage commitment result that cannot "
                        "be read (%d bytes): %s; relayed, not recorded", self.config.name,
                        request.calling_ae, len(data), exc.reason)
            return
        self.committed += len(result.committed)
        self.failed += len(result.failed)
        receipts = self.path.records.receipts
        if receipts is not None:
            receipts.add_commitment(self.config.name, self.path.member_of(
                request.calling_ae, self.slot.peer.host), result)


class _ReturnSplice(DicomSplice):
    """The VIP's splice, handing each storage commitment result the member sends (the data
    sets of the `commitment` contexts) to `results`."""

    def __init__(self, *args, commitment: frozenset[int],
                 results: Callable[[int, bytes], None], **kwargs) -> None:
        super().__init__(*args, asked=_ignore, answered=_ignore, **kwargs)
        self.trackers["client"].keep_data = commitment
        self.results = results

    def observe(self, source: str, chunk: bytes | bytearray) -> None:
        super().observe(source, chunk)
        client = self.trackers["client"]
        if client.data_sets:
            for context, data in client.data_sets:
                self.results(context, data)
            client.data_sets.clear()


def _ignore(*_commands: object) -> None:
    return None

