"""systemd's service notification protocol (sd_notify(3)), without libsystemd.

Under `Type=notify` systemd sets NOTIFY_SOCKET, a Unix datagram socket ("@name" is in the
abstract namespace); each notification is one datagram of newline-separated KEY=VALUE lines.
The gateway says READY=1 once its listeners are up and the first checks are done, RELOADING=1
and READY=1 around a reload, STOPPING=1 (with EXTEND_TIMEOUT_USEC: the drain's length) when it
starts draining, and WATCHDOG=1 every half WatchdogSec (WATCHDOG_USEC) from the event loop
itself, so a loop that stops answering gets the service restarted. Without NOTIFY_SOCKET every
call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("medgate")


class Notifier:
    """Sends notifications to the NOTIFY_SOCKET of `environ` (os.environ by default)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        address = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval = _watchdog_interval(environ)
        self._socket: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, **fields: str | int) -> None:
        """One notification, e.g. notify(READY=1, STATUS="serving 4 VIPs")."""
        if not self.address:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._socket.setblocking(False)
            self._socket.sendto(message, self.address)
        except OSError as exc:  # systemd gone or socket full: the service goes on regardless
            if not self._warned:
                log.warning("systemd notification to %s failed: %s", self.address.lstrip("\0"),
                            exc.strerror or exc)
                self._warned = True

    def reloading(self) -> None:
        """RELOADING=1 with the monotonic time, as Type=notify-reload requires."""
        self.notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_interval(environ: Mapping[str, str]) -> float:
    """Seconds between WATCHDOG=1 (half of WATCHDOG_USEC), 0 when no watchdog is asked for
    this process (WATCHDOG_PID, when set, must be ours)."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", "0"))
        pid = int(environ.get("WATCHDOG_PID", str(os.getpid())))
    except ValueError:
        return 0.0
    if usec <= 0 or pid != os.getpid():
        return 0.0
    return usec / 2e6
