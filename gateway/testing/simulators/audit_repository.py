"""A simulated ATNA audit record repository (IHE ITI-20 receiver): syslog over TLS or TCP with
RFC 5425 octet counting, keeping every audit message it receives, in order."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import trio

from gateway.testing.simulators.serving import TrioServer, wait_on
from protocols.atna import SyslogError, SyslogMessage, SyslogReader, parse_syslog

log = logging.getLogger("medgate.simulate.atna")


@dataclass
class AuditRepository(TrioServer):
    """Receives audit messages on `host:port` (TLS when `.tls` is set before `start`)."""

    host: str = "127.0.0.1"
    port: int = 0
    messages: list[SyslogMessage] = field(default_factory=list)
    save: Path | None = None  # a folder: each message's XML is written there as it arrives
    _saved: int | None = field(default=None, repr=False)  # files in `save`, once counted
    # Guards `messages`; notified on each arrival (the server may run in a thread of its own).
    _lock: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def describe(self) -> str:
        return "ATNA audit record repository"

    async def _handle(self, stream: trio.abc.Stream) -> None:
        reader = SyslogReader()
        try:
            while data := await stream.receive_some(65536):
                reader.feed(data)
                while (message := reader.next_message()) is not None:
                    parsed = parse_syslog(message)
                    with self._lock:
                        self.messages.append(parsed)
                        if self.save is not None:
                            self._save(parsed.xml)
                        self._lock.notify_all()
                    log.info("audit message %d: PRI %d, %d bytes", len(self.messages),
                             parsed.priority, len(parsed.xml))
        except SyslogError as exc:
            log.warning("audit repository: bad syslog frame, connection closed: %s", exc)
        except trio.BrokenResourceError:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    def _save(self, xml: bytes) -> None:
        """DIR/NNNNNN.xml, numbered on from the files there (a restarted repository goes on);
        written under a temporary name first, so that a file that is there is whole."""
        assert self.save is not None
        if self._saved is None:  # counted once: from then on, this process numbers them
            self.save.mkdir(parents=True, exist_ok=True)
            self._saved = len(list(self.save.glob("*.xml")))
        self._saved += 1
        name = f"{self._saved:06d}"
        partial = self.save / f".{name}.part"
        partial.write_bytes(xml)
        partial.rename(self.save / f"{name}.xml")

    def received(self) -> list[SyslogMessage]:
        with self._lock:
            return list(self.messages)

    async def wait_received(self, count: int, timeout: float = 10.0) -> list[SyslogMessage]:
        """The messages received, once there are at least `count`: woken by each arrival, not
        by polling. TimeoutError after `timeout`."""
        await wait_on(self._lock, lambda: len(self.messages) >= count, timeout,
                      f"{count} audit messages")
        return self.received()
