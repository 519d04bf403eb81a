"""What the VIP handlers need of a connection, beyond trio's Stream: one abstract class that
the socket Channel, the TlsChannel over it and the memory double of the tests
(tests/helpers/memory_link.py) implement, so that a VIP runs over either alike, on a real
clock or trio's MockClock.

A VIP never asks which kind of connection it holds; where TLS matters (records that cannot be
read before they are whole) the link says so with `encrypted`. A link that can close its
sending side alone (plain TCP, the memory double) is also a trio HalfCloseableStream.
"""

from __future__ import annotations

from abc import abstractmethod

import trio


class Link(trio.abc.Stream):
    """One connection, to a client or a member (a trio Stream, and what follows)."""

    # TLS: bytes may wait in records not yet whole, which `data_buffered` cannot read.
    encrypted: bool = False
    # Bytes `send_now` took that are not on the wire yet (TLS: the rest of a record the
    # socket did not take whole): the next send_all, of b"" if nothing else, sends them first.
    unsent: bytes | memoryview = b""

    @abstractmethod
    def send_now(self, data: bytes | bytearray | memoryview) -> int:
        """What the connection takes of `data` without waiting: the bytes taken. All of it is
        sent once `unsent` is empty too; else the rest of `data` and `unsent` go next, with
        send_all."""

    @abstractmethod
    def close(self) -> None:
        """Close at once, without a goodbye; a task waiting on it gets ClosedResourceError."""

    @abstractmethod
    def unread(self) -> int | None:
        """Bytes received and not read yet, without reading them: 0 when none, None when the
        peer has closed the connection (or it broke)."""

    def splice_fd(self) -> int | None:
        """The socket's descriptor when bytes may move to or from it by splice(2), past this
        process (a plain TCP connection); None for TLS, memory doubles and the like."""
        return None

    def unacknowledged(self) -> int | None:
        """Bytes sent that the peer's TCP has not acknowledged yet: 0 when all were (or where
        the link cannot tell), None when the connection was reset (or closed here)."""
        return 0

    @abstractmethod
    def data_buffered(self) -> int | None:
        """Application bytes already received above the socket (decrypted TLS records), taken
        to be counted: only for a connection about to be judged, and closed if there are any.
        None when the peer ended its side."""

