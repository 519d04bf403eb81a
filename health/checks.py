"""Negotiate health checks: each one talks to a member and returns a pass/fail with a reason.

Every check runs under its own timeout and never raises for a member's misbehaviour: the result's
`detail` is the one line an engineer needs ("connection refused", "HTTP 503 Service Unavailable",
"timeout after 4s").
"""

from __future__ import annotations

import datetime
import itertools
import os
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import h11
import trio

from gateway import IMPLEMENTATION_VERSION
from gateway.net import http, tls
from gateway.net.channel import open_tcp
from gateway.config import Address, ClientTls, HealthConfig, MemberConfig
from gateway.net.relay import describe_os_error
from protocols import dicom, dimse, mllp, soap

MAX_HTTP_BODY = 1024 * 1024  # a status page bigger than this is not read to the end


class CheckFailed(Exception):
    """The member answered wrongly or not at all; the message is the reason."""


@dataclass(frozen=True)
class CheckOutcome:
    ok: bool
    detail: str
    latency: float  # seconds
    certificate_expires: float | None = None  # the member's certificate's notAfter (Unix time)


@dataclass(frozen=True)
class Target:
    """What a check talks to: an address, the AE title a DICOM member expects, and the TLS
    the gateway speaks to it (None: plain TCP)."""

    address: Address
    ae_title: str = ""
    role: str = "both"  # XDS: a repository is not asked registry questions
    tls: tls.MemberTls | None = field(default=None, compare=False)


@dataclass
class Probe:
    """What one check saw on the way besides its answer: the member's certificate."""

    certificate_expires: float | None = None


CheckFn = Callable[[Target, HealthConfig, Probe], Awaitable[str]]


async def _open(target: Target, probe: Probe) -> trio.abc.Stream:
    """TCP, and the TLS handshake when the target has TLS: a certificate problem fails the
    check in words, with the certificate's dates or names where they explain it."""
    try:
        stream = await open_tcp(target.address.host, target.address.port)
    except OSError as exc:
        raise CheckFailed(describe_os_error(exc)) from None
    if target.tls is None:
        return stream
    try:
        secure = await target.tls.wrap(stream)
    except tls.TlsFailed as exc:
        await trio.aclose_forcefully(stream)
        raise CheckFailed(f"TLS: {await _explain(target, str(exc), probe)}") from None
    probe.certificate_expires = tls.certificate_expires(tls.peer_certificate(secure))
    return secure


async def _explain(target: Target, reason: str, probe: Probe) -> str:
    """`reason` with what the member's certificate says (read again without verifying it);
    its expiry goes to `probe` too, so an expired or untrusted certificate still has its date
    in the status and the metrics."""
    if not reason.startswith(("certificate expired", "certificate not yet", "hostname mismatch",
                              "unknown CA")):
        return reason
    certificate = await tls.fetch_certificate(target.address.host, target.address.port)
    if certificate is None or target.tls is None:
        return reason
    probe.certificate_expires = certificate.not_after
    if reason.startswith("certificate expired"):
        return f"certificate expired on {tls.day(certificate.not_after)} ({certificate.subject})"
    if reason.startswith("certificate not yet"):
        return (f"certificate not valid before {tls.day(certificate.not_before)} "
                f"({certificate.subject})")
    if reason.startswith("hostname mismatch"):
        return (f"hostname mismatch: the certificate is for {', '.join(certificate.names) or '?'}"
                f", not {target.tls.server_name!r}")
    return (f"unknown CA: {certificate.subject} is issued by {certificate.issuer}, which is not "
            f"in {target.tls.ca}")


async def check_tcp(target: Target, health: HealthConfig, probe: Probe) -> str:
    """Passes when a TCP connection opens (and the TLS handshake succeeds, with TLS)."""
    stream = await _open(target, probe)
    await trio.aclose_forcefully(stream)
    return "connected" + (" (TLS)" if target.tls else "")


async def check_http(target: Target, health: HealthConfig, probe: Probe) -> str:
    """GET `path`; passes on status 2xx/3xx and, if `expect` is set, that text in the body."""
    reply = await _http(target, health, probe, "GET")
    line = f"HTTP {reply.status} {reply.reason}".rstrip()
    if not 200 <= reply.status < 400:
        raise CheckFailed(line)
    if health.expect:
        if health.expect.encode() not in reply.body:
            raise CheckFailed(f"{line}, but the body does not contain {health.expect!r}")
        return f"{line}, {health.expect!r} found"
    return line


async def _http(target: Target, health: HealthConfig, probe: Probe, method: str,
                headers: Sequence[tuple[str, str]] = (), body: bytes = b"") -> http.Reply:
    address = target.address
    stream = await _open(target, probe)
    try:
        return await http.request(stream, method, health.path, str(address), headers, body,
                                  max_body=MAX_HTTP_BODY)
    except h11.RemoteProtocolError as exc:
        raise CheckFailed(f"not a valid HTTP response: {http.reason_of(exc)}") from None
    except http.PeerGone as exc:
        raise CheckFailed(str(exc)) from None
    except (trio.BrokenResourceError, OSError) as exc:
        raise CheckFailed(f"connection broken: {describe_os_error(exc)}") from None
    finally:
        await trio.aclose_forcefully(stream)


async def check_dicom_echo(target: Target, health: HealthConfig, probe: Probe) -> str:
    """Association + C-ECHO (Verification SOP class); passes on status 0x0000."""
    return await _dicom_check(target, health, probe, dicom_echo)


async def check_dicom_find(target: Target, health: HealthConfig, probe: Probe) -> str:
    """Association + C-FIND (Study Root, STUDY level) for a Patient ID that should match
    nothing: proves the PACS database answers, which C-ECHO does not. Passes on a final
    status 0x0000 (matches are counted, never read)."""
    return await _dicom_check(target, health, probe, lambda stream, calling, called: dicom_find(
        stream, calling, called, health.patient_id or NO_SUCH_PATIENT))


async def _dicom_check(target: Target, health: HealthConfig, probe: Probe, talk) -> str:
    stream = await _open(target, probe)
    try:
        return await talk(stream, health.calling_ae, target.ae_title or "ANY-SCP")
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise CheckFailed(f"connection broken: {describe_os_error(exc)}") from None
    except dicom.ProtocolError as exc:
        raise CheckFailed(f"DICOM protocol error: {exc}") from None
    finally:
        await trio.aclose_forcefully(stream)


NO_SUCH_PATIENT = "MEDGATE-NO-SUCH-PATIENT"


class _Dialog:
    """One association of a check: RQ/AC, one request and its responses, release."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.reader = dicom.PduReader()

    async def next_pdu(self, waiting_for: str) -> bytes:
        while (pdu := self.reader.next_pdu()) is None:
            data = await self.stream.receive_some(65536)
            if not data:
                raise CheckFailed(f"connection closed while waiting for {waiting_for}")
            self.reader.feed(data)
        if pdu[0] == dicom.A_ABORT:
            raise CheckFailed(f"association aborted ({dicom.Abort.decode(pdu).describe()})")
        return pdu

    async def associate(self, calling_ae: str, called_ae: str, sop_class: str,
                        name: str) -> None:
        await self.stream.send_all(dicom.encode_associate_rq(
            called_ae, calling_ae, [(1, sop_class, [dicom.IMPLICIT_VR_LITTLE_ENDIAN])],
            implementation_version=IMPLEMENTATION_VERSION))
        pdu = await self.next_pdu("the A-ASSOCIATE-AC")
        if pdu[0] == dicom.A_ASSOCIATE_RJ:
            raise CheckFailed(
                f"association rejected ({dicom.AssociateReject.decode(pdu).describe()})")
        if pdu[0] != dicom.A_ASSOCIATE_AC:
            raise CheckFailed(f"answered the A-ASSOCIATE-RQ with {dicom.PDU_NAMES[pdu[0]]}")
        context = dicom.Association.decode(pdu).context(1)
        if context is None or context.result != 0:
            result = "missing" if context is None else dicom.CONTEXT_RESULTS.get(
                context.result if context.result is not None else -1, str(context.result))
            raise CheckFailed(f"{name} not accepted ({result})")

    async def request(self, p_data: bytes, name: str) -> tuple[int | None, int]:
        """Send a request; (final status, pending responses before it)."""
        await self.stream.send_all(p_data)
        peek, pending = dimse.CommandPeek(), 0
        while True:
            pdu = await self.next_pdu(f"the {name} response")
            if pdu[0] != dicom.P_DATA_TF:
                raise CheckFailed(f"answered the {name} request with {dicom.PDU_NAMES[pdu[0]]}")
            peek.feed(pdu)
            if peek.errors:
                raise CheckFailed(f"unreadable {name} response: {peek.errors[0]}")
            for command in peek.take():
                if command.status in dimse.PENDING:
                    pending += 1
                else:
                    return command.status, pending

    async def release(self) -> None:
        await self.stream.send_all(dicom.RELEASE_RQ)
        with trio.move_on_after(1):  # a missing A-RELEASE-RP does not make the PACS unhealthy
            await self.next_pdu("the A-RELEASE-RP")


async def dicom_echo(stream: trio.abc.Stream, calling_ae: str, called_ae: str) -> str:
    """Speak RQ, C-ECHO-RQ, release over `stream`; CheckFailed says what the peer did instead."""
    dialog = _Dialog(stream)
    await dialog.associate(calling_ae, called_ae, dicom.VERIFICATION_SOP_CLASS,
                           "Verification SOP class")
    status, _ = await dialog.request(dicom.encode_c_echo_rq(1, message_id=1), "C-ECHO")
    await dialog.release()
    if status != 0:
        raise CheckFailed("C-ECHO status " + ("missing" if status is None else f"0x{status:04x}"))
    return "C-ECHO status 0x0000 (success)"


async def dicom_find(stream: trio.abc.Stream, calling_ae: str, called_ae: str,
                     patient_id: str) -> str:
    """RQ, one C-FIND-RQ at STUDY level for `patient_id`, release."""
    dialog = _Dialog(stream)
    await dialog.associate(calling_ae, called_ae, dicom.STUDY_ROOT_FIND,
                           "Study Root Query/Retrieve FIND")
    status, matches = await dialog.request(
        dicom.encode_c_find_rq(1, 1, dicom.encode_study_query(patient_id)), "C-FIND")
    await dialog.release()
    if status != 0:
        raise CheckFailed("C-FIND status " + ("missing" if status is None else
                                              f"0x{status:04x} ({dimse.status_meaning(status)})"))
    return f"C-FIND status 0x0000 (success), {matches} match(es) for {patient_id}"


DEFAULT_HL7_MESSAGE = (
    # Application management data (HL7 v2.5 §14.3.3 NMD^N02: the system clock, NCK), with
    # processing ID T: nothing clinical, no patient, so no engine stores or routes a test
    # patient from it. Sites may set their own heartbeat with `health.message`.
    "MSH|^~\\&|MEDGATE|MEDGATE|HEALTHCHECK|MEDGATE|{timestamp}||NMD^N02^NMD_N02|{control_id}|T|2.5\r"
    "NCK|{timestamp}\r"
)
_hl7_checks = itertools.count(1)


async def hl7_test_message(health: HealthConfig) -> bytes:
    """The check's message with a fresh MSH-7 and a unique MSH-10."""
    timestamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
    control_id = f"MEDGATE-HC-{os.getpid()}-{next(_hl7_checks)}"
    if not health.message:
        return DEFAULT_HL7_MESSAGE.format(timestamp=timestamp, control_id=control_id).encode()
    try:
        text = await trio.Path(health.message).read_bytes()
    except OSError as exc:
        raise CheckFailed(f"cannot read the test message {health.message}: "
                          f"{exc.strerror or exc}") from None
    text = text.strip().strip(mllp.SB + mllp.EB).replace(b"\r\n", b"\r").replace(b"\n", b"\r")
    segments = text.split(b"\r")
    separator = segments[0][3:4]
    msh = segments[0].split(separator)
    if len(msh) < 12 or msh[0] != b"MSH":
        raise CheckFailed(f"the test message {health.message} has no complete MSH segment")
    msh[6], msh[9] = timestamp.encode(), control_id.encode()
    segments[0] = separator.join(msh)
    return b"\r".join(segments) + b"\r"


async def check_hl7_ack(target: Target, health: HealthConfig, probe: Probe) -> str:
    """Send the test message; passes on MSA-1 AA or CA whose MSA-2 is its MSH-10, and on AE
    or AR too with `accept_reject` (an engine that rejects a message type it does not know is
    still alive)."""
    message = await hl7_test_message(health)
    header = mllp.peek_header(message)
    stream = await _open(target, probe)
    try:
        await stream.send_all(mllp.frame(message))
        reader = mllp.MllpReader(1024 * 1024)
        while (event := reader.next_event()) is None:
            data = await stream.receive_some(65536)
            if not data:
                raise CheckFailed("connection closed before the ACK")
            reader.feed(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise CheckFailed(f"connection broken: {describe_os_error(exc)}") from None
    finally:
        await trio.aclose_forcefully(stream)
    if not isinstance(event, mllp.Message):
        raise CheckFailed("answered with something that is not an MLLP frame")
    try:
        ack = mllp.peek_ack(event.payload)
    except mllp.HL7Error as exc:
        raise CheckFailed(f"answer is not an ACK: {exc.reason}") from None
    if ack.control_id != header.control_id:
        raise CheckFailed(f"ACK for another message (MSA-2 {ack.control_id!r}, "
                          f"expected {header.control_id!r})")
    detail = f"MSA-1 {ack.code}" + (f": {ack.text}" if ack.text else "")
    if not ack.positive and not (health.accept_reject and ack.code in ("AE", "AR", "CE", "CR")):
        raise CheckFailed(detail)
    return detail


async def check_xds_query(target: Target, health: HealthConfig, probe: Probe) -> str:
    """ITI-18 FindDocuments for `patient_id` at `path`; passes on ResponseStatusType Success."""
    scheme = "https" if target.tls else "http"
    envelope = soap.build_find_documents(health.patient_id, f"urn:uuid:{uuid.uuid4()}",
                                         to=f"{scheme}://{target.address}{health.path}")
    content_type = f'application/soap+xml; charset=UTF-8; action="{soap.ITI18}"'
    reply = await _http(target, health, probe, "POST", [("Content-Type", content_type)],
                        envelope)
    line = f"HTTP {reply.status} {reply.reason}".rstrip()
    try:
        answer = soap.parse_registry_response(soap.soap_envelope_of(
            reply.body, http.header(reply.headers, b"content-type") or "application/soap+xml"))
    except soap.SoapError as exc:
        raise CheckFailed(f"{line}, not a registry response: {exc.reason}") from None
    if target.role not in ("registry", "both"):
        # A repository, an XCA gateway, a PIX or PDQ actor has no stored query to answer; a
        # SOAP answer shows its SOAP stack is up, and a Sender fault ("not a transaction I
        # serve") is such an answer. A Receiver fault is not.
        if answer.fault and not answer.fault.startswith("env:Sender") or reply.status >= 500:
            raise CheckFailed(f"{line}: {answer.describe()}")
        return f"{line}, SOAP stack answers ({target.role}: ITI-18 not asked of it)"
    if reply.status != 200:
        raise CheckFailed(f"{line}: {answer.describe()}")
    if answer.success or (answer.partial and health.partial_success):
        count = len(answer.object_refs)
        return f"{answer.describe()}, {count} document(s) for {health.patient_id}"
    raise CheckFailed(answer.describe())


CHECKS: dict[str, CheckFn] = {
    "tcp": check_tcp,
    "http": check_http,
    "dicom-echo": check_dicom_echo,
    "dicom-find": check_dicom_find,
    "hl7-ack": check_hl7_ack,
    "xds-query": check_xds_query,
}


async def run_check(target: Target, health: HealthConfig) -> CheckOutcome:
    """Run the configured check once against `target` (the check port already applied)."""
    check = CHECKS[health.check]
    probe = Probe()
    started = trio.current_time()
    try:
        with trio.fail_after(health.timeout):
            detail = await check(target, health, probe)
    except trio.TooSlowError:
        return CheckOutcome(False, f"timeout after {health.timeout:g}s",
                            trio.current_time() - started, probe.certificate_expires)
    except CheckFailed as exc:
        return CheckOutcome(False, str(exc), trio.current_time() - started,
                            probe.certificate_expires)
    return CheckOutcome(True, detail, trio.current_time() - started, probe.certificate_expires)


def check_target(member: MemberConfig, health: HealthConfig) -> Target:
    """What the check talks to: the member (on the check port when one is set), over the
    member's TLS; `health.tls` without member TLS means verified TLS with the system CAs."""
    address = member.address
    if health.port is not None:
        address = Address(address.host, health.port)
    settings = member.tls or (ClientTls() if health.tls else None)
    return Target(address, member.ae_title, member.role,
                  tls.client_context(settings, address.host) if settings else None)
