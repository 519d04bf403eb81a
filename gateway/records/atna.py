"""Sends ATNA audit messages (IHE ITI-20) to an audit record repository, over syslog TLS (RFC
5425) or UDP (RFC 5426).

No message is lost to a repository that is down or goes away: every message is appended to a
spool file on disk first, and the sender sends the spool in order, reconnecting with backoff
while the repository is unreachable. RFC 5425 has no acknowledgement, so a message leaves the
spool only once the repository's TCP has acknowledged its bytes (SIOCOUTQ) and no reset came
within CONFIRM_QUIET seconds after (a process killed with the bytes unread resets the
connection; one that read them and closed sends a FIN, which confirms); what is not confirmed
is sent again on the next connection: at-least-once, a repository may see a
message twice after an outage, never none. The spool is bounded (`spool_max`): past it new
messages are dropped, counted and logged, never blocking traffic. Over UDP nothing tells the
sender that a message arrived, so messages are sent as they come and not spooled.
"""

from __future__ import annotations

import bisect
import datetime
import errno
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import trio

from gateway.config.model import AtnaSettings
from gateway.net.channel import open_tcp
from gateway.net.link import Link
from gateway.net.tls import TlsFailed, client_context
from gateway.records import unreadable_name
from protocols import atna

log = logging.getLogger("medgate.atna")

BACKOFF = (1.0, 30.0)  # reconnect delays, doubling from the first to the second
SEND_TIMEOUT = 10.0  # a repository that takes (or acknowledges) no bytes this long: reconnect
CONFIRM_QUIET = 2.0  # seconds without a reset after the bytes were acknowledged
CONFIRM_POLL = 0.05  # how often the acknowledgement and the connection are looked at
_FAILURES = (OSError, TlsFailed, trio.BrokenResourceError, trio.ClosedResourceError,
             trio.TooSlowError)


@dataclass(frozen=True)
class Actor:
    """Who took part in an event, as the gateway knows it: a name and where it came from."""

    name: str
    address: str = ""  # an IP address, from the connection

    @classmethod
    def at(cls, name: str, client: str) -> Actor:
        """`name` at a 'host:port' client ('10.1.2.3:5000', '[::1]:80'; 'signal' as it is)."""
        host, sep, port = client.rpartition(":")
        return cls(name, host.strip("[]") if sep and port.isdigit() else client)


class AtnaSender:
    """Formats events (`application`, `security_alert`, `user_authentication`) and delivers
    them; `run` is the delivery task, started with the gateway's services."""

    def __init__(self, settings: AtnaSettings) -> None:
        self.settings = settings
        self.hostname = socket.gethostname()
        self.source_id = settings.source_id or f"medgate@{self.hostname}"
        self.dropped = 0
        self.sent = 0
        self.unreachable = 0  # connects to the repository that failed
        self.spooled = 0  # messages in the spool not yet confirmed
        self._wake = trio.Event()  # set by each message spooled, and by `finish`
        self._finishing = False
        self._finished = trio.Event()
        self._spool = Path(settings.spool) / "atna.spool"
        self._offset = Path(settings.spool) / "atna.offset"
        self._full_logged = False

    def open(self) -> None:
        """Make the spool folder; OSError names it when it cannot be written."""
        if self.settings.transport == "udp":
            return
        try:
            Path(self.settings.spool).mkdir(parents=True, exist_ok=True)
            with open(self._spool, "ab"):
                pass
            self._recover()
            self.spooled = len(atna.whole_frames(self._pending()[1]))  # what the last run left
        except OSError as exc:
            raise OSError(f"[gateway] atna: spool {self.settings.spool}: cannot write: "
                          f"{exc.strerror or exc}") from None

    # -- events

    def application(self, started: bool) -> None:
        """Application Activity: the gateway started or stopped."""
        self._emit(atna.APPLICATION_ACTIVITY,
                   atna.APPLICATION_START if started else atna.APPLICATION_STOP,
                   atna.Outcome.SUCCESS, "",
                   [atna.Participant(self.source_id, False, atna.ROLE_APPLICATION,
                                     self.hostname, alternative_user_id=str(os.getpid()))])

    def security_alert(self, kind: atna.Code, ok: bool, actor: Actor, detail: str,
                       subject: str = "") -> None:
        """Security Alert of type `kind` (node authentication, a configuration change) that
        `actor` caused; `subject` is what it concerns, as "scheme:name" ("vip:pacs",
        "config:/etc/medgate/medgate.toml"): the name is its ParticipantObjectName."""
        self._emit(atna.SECURITY_ALERT, kind,
                   atna.Outcome.SUCCESS if ok else atna.Outcome.MINOR_FAILURE, detail,
                   [atna.Participant(self.source_id, False, atna.ROLE_APPLICATION, self.hostname),
                    atna.Participant(actor.name, True, network_id=actor.address)],
                   (atna.AlertSubject(subject, detail, subject.partition(":")[2]),)
                   if subject else ())

    def user_authentication(self, ok: bool, actor: Actor, detail: str) -> None:
        """User Authentication (Login) of an admin user, by token."""
        self._emit(atna.USER_AUTHENTICATION, atna.LOGIN,
                   atna.Outcome.SUCCESS if ok else atna.Outcome.MINOR_FAILURE, detail,
                   [atna.Participant(actor.name, True, network_id=actor.address),
                    atna.Participant(self.source_id, False, atna.ROLE_APPLICATION,
                                     self.hostname)])

    def _emit(self, event_id, type_code, outcome, detail, participants, subjects=()) -> None:
        now = datetime.datetime.now(datetime.timezone.utc)
        xml = atna.encode_message(atna.AuditEvent(
            event_id, type_code, outcome, now, tuple(participants), self.source_id,
            self.settings.site_id, detail, tuple(subjects)))
        message = atna.syslog_message(xml, when=now, hostname=self.hostname, app_name="medgate",
                                      procid=str(os.getpid()),
                                      warning=outcome is not atna.Outcome.SUCCESS)
        if self.settings.transport == "udp":
            self._send_datagram(message)
        else:
            self._append(atna.octet_counted(message))

    # -- delivery

    def _append(self, frame: bytes) -> None:
        try:
            size = self._spool.stat().st_size
            if size + len(frame) > self.settings.spool_max:
                self.dropped += 1
                if not self._full_logged:
                    log.error("atna: spool %s is full (spool_max %d bytes, repository %s "
                              "unreachable?): audit messages are dropped until it drains",
                              self._spool, self.settings.spool_max, self.settings.repository)
                    self._full_logged = True
                return
            _append_whole(self._spool, frame, size)
            self.spooled += 1
        except OSError as exc:
            self.dropped += 1
            log.error("atna: spool %s: cannot write: %s", self._spool, exc.strerror or exc)
            return
        self._wake.set()

    def _send_datagram(self, message: bytes) -> None:
        address = self.settings.repository
        try:
            family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.sendto(message, (address.host, address.port))
            self.sent += 1
        except OSError as exc:
            self.dropped += 1
            log.warning("atna: UDP to %s: %s", address, exc.strerror or exc)

    def spool_bytes(self) -> int:
        """Bytes in the spool not yet confirmed (0 over UDP or when it cannot be read)."""
        if self.settings.transport == "udp":
            return 0
        try:
            return max(0, self._spool.stat().st_size - self._sent_offset())
        except OSError:
            return 0

    def _sent_offset(self) -> int:
        try:
            return int(self._offset.read_text() or 0)
        except (OSError, ValueError):
            return 0

    def _write_offset(self, offset: int) -> None:
        """The sent mark, replaced whole (a stop while it is written leaves the old one)."""
        written = self._offset.with_name(self._offset.name + ".new")
        written.write_text(str(offset))
        os.replace(written, self._offset)

    def _recover(self) -> None:
        """The spool as a stop left it, made whole: a message cut at its end (a kill or a
        power cut in a write) is set aside, and a sent mark that is not at a message's start
        moves back to the one before it, or to the start from past the end (sent again: at
        least once, never none). Else the repository would be sent bytes from inside a
        message, and every message after a cut one read as part of it."""
        data = self._spool.read_bytes()
        ends = [0, *atna.whole_frames(data, limit=max(len(data), 1))]
        whole = ends[-1]
        if whole < len(data):
            aside = unreadable_name(self._spool)
            aside.write_bytes(data[whole:])
            os.truncate(self._spool, whole)
            log.warning("atna: the last %d bytes of the spool %s are not whole messages (a "
                        "write cut by a stop or a full disk): kept aside as %s",
                        len(data) - whole, self._spool, aside)
        offset = self._sent_offset()
        # Past the end: the spool was emptied and its mark not (the order up to 0.3.0)
        resume = 0 if offset > len(data) else ends[bisect.bisect_right(ends, offset) - 1]
        if resume != offset:
            log.warning("atna: the spool's sent mark (byte %d) is not at a message's start: "
                        "sending again from byte %d (the repository may see a message twice)",
                        offset, resume)
            self._write_offset(resume)

    def _pending(self) -> tuple[int, bytes]:
        """Where sending resumes, and what the spool holds from there."""
        offset = self._sent_offset()
        with open(self._spool, "rb") as spool:
            spool.seek(offset)
            return offset, spool.read()

    def _mark_sent(self, offset: int) -> None:
        """Everything up to `offset` is sent; an empty spool starts again from nothing (the
        mark first: a stop between the two sends the spool again, where the other order
        left a mark past the messages spooled next, which were then never sent)."""
        drained = offset >= self._spool.stat().st_size
        self._write_offset(0 if drained else offset)
        if drained:
            self._spool.write_bytes(b"")
        if self._full_logged and drained:
            log.warning("atna: spool drained; %d audit messages were dropped while it was "
                        "full", self.dropped)
            self._full_logged = False

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Send the spool, in order, until `finish` (or cancellation)."""
        task_status.started()
        try:
            if self.settings.transport != "udp":
                await self._send_until_finished()
        finally:
            self._finished.set()

    async def finish(self) -> None:
        """At stop: the delivery task sends and confirms what is spooled on the connection it
        has, then ends (at once if the repository is unreachable: the spool keeps the rest
        for the next start). The caller bounds the wait."""
        self._finishing = True
        self._wake.set()
        await self._finished.wait()

    async def _send_until_finished(self) -> None:
        delay = BACKOFF[0]
        while True:
            try:
                stream = await self._connect()
            except _FAILURES as exc:
                self.unreachable += 1
                if self._finishing:
                    log.warning("atna: at stop, repository %s unreachable (%s); the spool "
                                "keeps %d bytes for the next start", self.settings.repository,
                                _reason(exc), self.spool_bytes())
                    return
                log.warning("atna: repository %s unreachable (%s); spooling, retry in %gs",
                            self.settings.repository, _reason(exc), delay)
                with trio.move_on_after(delay):
                    await self._wake_at_stop()
                delay = min(delay * 2, BACKOFF[1])
                continue
            delay = BACKOFF[0]
            log.info("atna: connected to the audit record repository %s",
                     self.settings.repository)
            try:
                await self._deliver(stream)
                return  # finished
            except _FAILURES as exc:
                log.warning("atna: repository %s connection lost (%s); spooling",
                            self.settings.repository, _reason(exc))
            finally:
                await trio.aclose_forcefully(stream)

    async def _wake_at_stop(self) -> None:
        while not self._finishing:
            self._wake = trio.Event()
            await self._wake.wait()

    async def _connect(self) -> Link:
        address = self.settings.repository
        with trio.fail_after(SEND_TIMEOUT):
            stream: Link = await open_tcp(address.host, address.port)
            if self.settings.transport == "tls":
                secure = client_context(self.settings.tls, address.host)
                stream = await secure.wrap(stream)
        return stream

    async def _deliver(self, stream: Link) -> None:
        """Send and confirm what is spooled, as it comes, until `finish` finds nothing left."""
        while await self._send_pending(stream) or not self._finishing:
            if not self._finishing and not self.spool_bytes():
                self._wake = trio.Event()
                await self._wake.wait()

    async def _send_pending(self, stream: Link) -> bool:
        """Send what the spool holds past the sent offset and mark it sent once confirmed;
        False when there was nothing. BrokenResourceError when the repository's TCP did not
        acknowledge it or the connection ended within CONFIRM_QUIET: it stays spooled."""
        offset, pending = self._pending()
        if not pending:
            return False
        with trio.fail_after(SEND_TIMEOUT):
            await stream.send_all(pending)
            while (unacknowledged := stream.unacknowledged()):
                await trio.sleep(CONFIRM_POLL)
        quiet_until = trio.current_time() + CONFIRM_QUIET
        while unacknowledged is not None and trio.current_time() < quiet_until:
            await trio.sleep(CONFIRM_POLL)
            unacknowledged = stream.unacknowledged()
        confirmed = len(atna.whole_frames(pending, limit=len(pending)))
        if unacknowledged is None:
            raise trio.BrokenResourceError(
                f"the connection was reset within {CONFIRM_QUIET:g}s of {len(pending)} bytes; "
                f"{confirmed} message(s) stay spooled and are sent again")
        self.sent += confirmed
        self.spooled = max(0, self.spooled - confirmed)
        self._mark_sent(offset + len(pending))
        return True


def _append_whole(spool: Path, frame: bytes, size: int) -> None:
    """`frame` at the end of `spool` (`size` bytes now) in one write, or nothing: a frame cut
    by a full disk would make every message spooled after it unreadable."""
    fd = os.open(spool, os.O_WRONLY | os.O_APPEND)
    try:
        if os.write(fd, frame) != len(frame):
            raise OSError(errno.ENOSPC, "the message was written in part (a full disk?)")
    except OSError:
        try:
            os.ftruncate(fd, size)
        except OSError:
            pass  # the next start sets the cut message aside
        raise
    finally:
        os.close(fd)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, trio.TooSlowError):
        return f"no answer within {SEND_TIMEOUT:g}s"
    cause = exc.__cause__ or exc
    return getattr(cause, "strerror", None) or str(cause) or type(cause).__name__


__all__ = ["Actor", "AtnaSender"]
