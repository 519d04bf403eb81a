"""The byte path of every client and member connection: a trio stream over a plain socket that
makes the system call first and waits in trio's epoll loop only when the call would block.

trio's SocketStream passes through the scheduler on every call (a checkpoint even when the data
is already there), a conflict detector and an async context manager, on every read and write of
every HL7 message and DICOM association (bench/profiles/). Here a call that succeeds at once
costs the system call only; every FAIR_EVERY immediate successes in a row pass through the
scheduler, where cancellation is honoured too, so that a connection with data always waiting
can neither starve the others nor outlive its cancellation.

A Channel (and TlsChannel over it) is a `Link` (link.py): the VIPs close it, peek at what
waits unread and send what it takes at once through that interface, never by its type.

What trio's stream contract promises, and what these channels (and TlsChannel over them) keep:

- kept: cancellation is seen in every wait and in the pass through the scheduler that every
  FAIR_EVERY-th call in a row makes on entry, before any byte moves (so a cancelled call has
  moved none); a closed channel raises ClosedResourceError, a failed system call
  BrokenResourceError; close() wakes a task waiting on the socket (notify_closing), which
  then gets ClosedResourceError.
- not kept: a checkpoint on every call (one that completes at once neither yields nor sees a
  cancellation, so a caller must not count on it to let other tasks run or to stop: the
  fairness pass above does both, every FAIR_EVERY calls; the check on entry was the largest
  cost a DICOM association adds to a relay, bench/README.md);
  conflict detection (two tasks receiving, or two sending, on one channel at once are not
  caught). medgate never does either: each direction of a connection has one task at a time
  by construction (the DICOM splice, the HL7 sender's reader and its watch, which take turns,
  an XDS exchange). Why: on the relay's hot path these cost about as much CPU as the system
  calls themselves (bench/profiles/).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import struct
import sys
import termios

import trio
from trio.lowlevel import (cancel_shielded_checkpoint, checkpoint, checkpoint_if_cancelled,
                           notify_closing, wait_readable, wait_writable)

from gateway.net.link import Link

READ_SIZE = 262144  # bytes per receive at most: fewer wakeups for bulk DICOM and TLS records
SMALL_READ = 65536  # bytes per receive until a read fills it (see Channel.receive_some)
SHORT_READS = 8  # short reads in a row that take reads back to SMALL_READ
FAIR_EVERY = 16  # immediate successes in a row before a pass through the scheduler
NOTSENT_LOWAT = 16384  # bytes waiting unsent in the kernel at most (TCP_NOTSENT_LOWAT)
_PEEK_NOW = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
_TCP_OPEN = (1, 8)  # tcp_info.tcpi_state ESTABLISHED, CLOSE_WAIT (linux/tcp_states.h)
_SPLICE = hasattr(os, "splice")  # Linux, Python 3.10+
PIPE_SIZE = 1 << 20  # the pipe between two spliced sockets (F_SETPIPE_SZ; the kernel may cap it)
SPLICE_LOWAT = 262144  # bytes a spliced source gathers before it wakes the relay (SO_RCVLOWAT)
_F_SETPIPE_SZ = 1031


class _TakesTurns:
    """FAIR_EVERY immediate successes in a row, then a pass through the scheduler; a wait
    (which is such a pass) starts the count again."""

    _streak = 0

    async def _fair(self) -> None:
        self._streak += 1
        if self._streak >= FAIR_EVERY:
            self._streak = 0
            await cancel_shielded_checkpoint()


async def receive(link: Link, answer: bool = False) -> bytes | bytearray:
    """What `link` has now, up to SMALL_READ bytes (b"" at its end). For a Channel: the
    system call first and epoll only on EAGAIN, without the checkpoint `receive_some` makes
    before it, so that a cancellation is seen only while waiting: a read that returns at
    once cannot be cancelled after taking bytes from the socket, and one cancelled while it
    waits has taken nothing (HL7's per-message loop relies on it: its one cancel scope ends
    early on purpose and is entered again). Another link: its receive_some.

    `answer`: what is awaited answers what was just sent (an ACK, or the next message of a
    sender that waits for each ACK), so it cannot be there yet: epoll first, not a read that
    would meet EAGAIN (a system call and an exception); should it be there, the wait ends at
    the scheduler's next look. A TLS link does the same in its receive_answer."""
    if type(link) is not Channel:
        answered = getattr(link, "receive_answer", None) if answer else None
        return await (answered or link.receive_some)(SMALL_READ)
    if link._closed:
        raise trio.ClosedResourceError("the connection was closed")
    sock = link.socket
    if answer:
        link._streak = 0
        await wait_readable(sock)
        if link._closed:
            raise trio.ClosedResourceError("the connection was closed")
    while True:
        try:
            data = sock.recv(SMALL_READ)
            break
        except BlockingIOError:
            link._streak = 0
            await wait_readable(sock)
            if link._closed:
                raise trio.ClosedResourceError("the connection was closed") from None
        except OSError as exc:
            raise trio.BrokenResourceError(f"receive: {exc.strerror or exc}") from exc
    link._streak += 1  # _fair, inline; shielded: the bytes are taken, they must come back
    if link._streak >= FAIR_EVERY:
        link._streak = 0
        await cancel_shielded_checkpoint()
    return data


def receive_ready(link: trio.abc.ReceiveStream, size: int) -> bytes | None:
    """What a Channel has now, up to `size` bytes (b"" at its end), without waiting; None when
    a read would wait, and always for another link, and on every FAIR_EVERY-th success in a
    row (whose read then passes through the scheduler). For a read under a timeout: a read
    that need not wait needs no cancel scope, which costs about 45 Python calls (the XDS VIP
    reads two or three times per request, bench/README.md)."""
    if type(link) is not Channel or link._streak + 1 >= FAIR_EVERY:
        return None
    if link._closed:
        raise trio.ClosedResourceError("the connection was closed")
    try:
        data = link.socket.recv(min(size, link._read_size))
    except BlockingIOError:
        return None
    except OSError as exc:
        raise trio.BrokenResourceError(f"receive: {exc.strerror or exc}") from exc
    link._streak += 1
    return data


async def receive_when_ready(link: trio.abc.ReceiveStream, size: int) -> bytes | bytearray:
    """receive_some(size) where nothing is likely there yet (receive_ready just found
    nothing, or what is awaited answers what was just sent): for a Channel, epoll first, then
    the read, without a read at once that would meet EAGAIN (a system call and an exception);
    should bytes be there, the wait ends at the scheduler's next look, which is also the pass
    through the scheduler that receive_ready's fairness asks for. Cancelled while it waits,
    it has taken nothing."""
    if type(link) is Channel:
        link._streak = 0
        await wait_readable(link.socket)
    return await link.receive_some(size)


class Channel(trio.abc.HalfCloseableStream, Link, _TakesTurns):
    """A connected TCP socket as a trio stream and a `Link`. `socket` is the standard library
    socket (non-blocking), for options and the address; close it with `close()`, never
    directly."""

    encrypted = False

    def __init__(self, sock: socket.socket, tuned: bool = False) -> None:
        """`tuned`: TCP_NODELAY and TCP_NOTSENT_LOWAT are set already (an accepted socket
        inherits them from its listener on Linux: see Acceptor), two system calls fewer."""
        sock.setblocking(False)
        if not tuned:
            _set_nodelay(sock)
            # As trio's SocketStream: at most 16 KiB waiting unsent in the kernel (measured
            # with bench/dicom.py: without it, 20-30% more CPU per MB of relayed C-STORE).
            _set_notsent_lowat(sock, NOTSENT_LOWAT)
        self.socket = sock
        self._read_size = SMALL_READ
        self._short_reads = 0  # reads in a row that returned less than SMALL_READ / 16
        self._closed = False

    @classmethod
    def adopt(cls, sock: trio.socket.SocketType) -> Channel:
        """A Channel for a socket trio opened (accepted, or connected by name)."""
        return cls(socket.socket(sock.family, sock.type, sock.proto, fileno=sock.detach()))

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to `max_bytes` (READ_SIZE) bytes; b"" at the end of the stream.

        recv() into a new bytes object costs less than recv_into() a reused buffer and a copy
        out, but asking for more than the allocator's mmap threshold (128 KiB) costs an
        mmap and munmap when little comes: reads start at SMALL_READ, grow to `max_bytes`
        while they come back full (bulk), and go back down after SHORT_READS short ones."""
        if self._closed:
            raise trio.ClosedResourceError("the connection was closed")
        self._streak += 1  # _fair, inline, before the bytes are taken: a cancellation here
        if self._streak >= FAIR_EVERY:  # takes none
            self._streak = 0
            await checkpoint()
        size = min(max_bytes or READ_SIZE, self._read_size)
        while True:
            try:
                data = self.socket.recv(size)
                break
            except BlockingIOError:
                self._streak = 0
                await wait_readable(self.socket)  # inline, not _wait: a frame less per wake
                if self._closed:
                    raise trio.ClosedResourceError("the connection was closed") from None
            except OSError as exc:
                raise trio.BrokenResourceError(f"receive: {exc.strerror or exc}") from exc
        if len(data) >= SMALL_READ // 16:
            self._short_reads = 0
            if len(data) == size:
                self._read_size = min(size * 4, READ_SIZE)
        else:
            # Short messages in a row (not one DIMSE command between data sets): back to
            # reads that cost little.
            self._short_reads += 1
            if self._short_reads >= SHORT_READS:
                self._read_size = SMALL_READ
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send every byte (waiting while the socket's buffer is full)."""
        if self._closed:
            raise trio.ClosedResourceError("the connection was closed")
        self._streak += 1  # _fair, inline, before a byte is sent
        if self._streak >= FAIR_EVERY:
            self._streak = 0
            await checkpoint()
        sent = self.send_now(data)
        if sent < len(data):
            with memoryview(data) as view:
                while sent < len(data):
                    self._streak = 0
                    await self._wait(wait_writable)
                    sent += self.send_now(view[sent:])

    def send_now(self, data: bytes | bytearray | memoryview) -> int:
        """Send what the socket takes without waiting; the number of bytes sent."""
        if self._closed:
            raise trio.ClosedResourceError("the connection was closed")
        try:
            return self.socket.send(data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise trio.BrokenResourceError(f"send: {exc.strerror or exc}") from exc

    def unread(self) -> int | None:
        """Bytes waiting on the socket (see Link.unread)."""
        try:
            # One system call in the usual case (nothing there): a peek that would block.
            if not self.socket.recv(1, _PEEK_NOW):
                return None  # end of stream
            return struct.unpack("i", fcntl.ioctl(self.socket.fileno(), termios.FIONREAD,
                                                  b"\0\0\0\0"))[0]
        except BlockingIOError:
            return 0
        except (OSError, ValueError):
            return None  # reset, or closed here

    def splice_fd(self) -> int | None:
        return None if self._closed or not _SPLICE else self.socket.fileno()

    def unacknowledged(self) -> int | None:
        """SIOCOUTQ: bytes written and not yet acknowledged by the peer; None once the
        connection is reset or closed here. A peer that ended its side (FIN: CLOSE_WAIT here)
        still counts: a peer process that closes with bytes unread sends a reset instead, so
        what it acknowledged before a FIN, it had read. Linux; 0 elsewhere."""
        tcp_info = getattr(socket, "TCP_INFO", None)
        if tcp_info is None:
            return 0
        try:
            if self.socket.getsockopt(socket.IPPROTO_TCP, tcp_info, 1)[0] not in _TCP_OPEN:
                return None
            return struct.unpack("i", fcntl.ioctl(self.socket.fileno(), termios.TIOCOUTQ,
                                                  b"\0\0\0\0"))[0]
        except (OSError, ValueError):
            return None

    def data_buffered(self) -> int | None:
        return 0  # nothing is held above the socket

    async def _wait(self, wait) -> None:
        await wait(self.socket)  # ClosedResourceError when closed meanwhile (notify_closing)
        if self._closed:
            raise trio.ClosedResourceError("the connection was closed")

    async def wait_send_all_might_not_block(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the connection was closed")
        await self._wait(wait_writable)

    async def send_eof(self) -> None:
        """Close the sending direction (TCP FIN); the other direction stays open."""
        if self._closed:
            raise trio.ClosedResourceError("the connection was closed")
        await checkpoint()
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise trio.BrokenResourceError(f"shutdown: {exc.strerror or exc}") from exc

    def close(self) -> None:
        """Close now; a task waiting on this connection gets ClosedResourceError."""
        if not self._closed:
            self._closed = True
            notify_closing(self.socket)
            self.socket.close()

    async def aclose(self) -> None:
        self.close()
        await checkpoint()


# accept() errors that concern one client that already went, not the listener (as trio's
# SocketListener has them): that client is skipped.
_SKIPPED_ACCEPT_ERRNOS = {getattr(errno, name) for name in (
    "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET",
    "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH") if hasattr(errno, name)}


class Acceptor(_TakesTurns):
    """Takes connections off a listening trio socket with the system call first (a burst of
    clients costs no pass through the scheduler each), waiting in epoll only when none is
    pending. It shares the listener's descriptor: `detach()` before the listener closes."""

    def __init__(self, listener: trio.socket.SocketType) -> None:
        self._socket = socket.socket(listener.family, listener.type, listener.proto,
                                     fileno=listener.fileno())
        self._socket.setblocking(False)
        # Set once here, inherited by every accepted socket (Linux), not set on each
        self._tuned = (sys.platform == "linux" and _set_nodelay(self._socket)
                       and _set_notsent_lowat(self._socket, NOTSENT_LOWAT))

    async def accept(self) -> Channel:
        """The next client; OSError for a failure of the listener itself (no descriptors)."""
        await checkpoint_if_cancelled()
        while True:
            try:
                sock, _ = self._socket.accept()
            except BlockingIOError:
                self._streak = 0
                await wait_readable(self._socket)
                continue
            except OSError as exc:
                if exc.errno in _SKIPPED_ACCEPT_ERRNOS:
                    continue
                raise
            break
        await self._fair()
        return Channel(sock, self._tuned)

    def detach(self) -> None:
        self._socket.detach()


# (IPv4, IPv6) socket options, from <linux/in.h> and <linux/in6.h>
TRANSPARENT = (19, 75)  # originate from an address that is not local (CAP_NET_ADMIN)
FREEBIND = (15, 78)  # listen on an address that is not (yet) on this host


def set_ip_flag(sock: socket.socket, option: tuple[int, int]) -> None:
    """Turn on an IP-level option (TRANSPARENT, FREEBIND) at the level of `sock`'s family."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, option[1], 1)
    else:
        sock.setsockopt(socket.SOL_IP, option[0], 1)


async def connect(family: int, address: tuple, tune=None,
                  source: tuple[str, int] | None = None) -> Channel:
    """A TCP connection to an IP address (tuned by `tune(sock)` first), from `source` when
    given (a client's own address and port: transparent mode); OSError on failure."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if tune is not None:
            tune(sock)
        if source:
            set_ip_flag(sock, TRANSPARENT)
            # Several member connections may come from one client port (to other members):
            # each is its own 4-tuple, which SO_REUSEADDR lets bind.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(source)
        try:
            sock.connect(address)
        except BlockingIOError:
            await wait_writable(sock)
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, os.strerror(code))
    except BaseException:
        notify_closing(sock)
        sock.close()
        raise
    return Channel(sock)


async def open_tcp(host: str, port: int) -> Channel:
    """A connection to a host by name or address (trio's resolver and happy eyeballs), as a
    Channel: for the gateway's own peers (health checks, ATNA, the HA pair), where TLS over
    it needs a Link."""
    return Channel.adopt((await trio.open_tcp_stream(host, port)).socket)


class SpliceBroken(Exception):
    """splice_exactly stopped: `side` ("source" or "target") ended, broke, or took too long
    (`slow`); `moved` bytes reached the target."""

    def __init__(self, side: str, detail: str, moved: int, slow: bool = False) -> None:
        super().__init__(f"{side}: {detail}")
        self.side, self.detail, self.moved, self.slow = side, detail, moved, slow


async def splice_exactly(source: Link, target: Link, count: int, *, read_timeout: float,
                         write_timeout: float) -> None:
    """Move exactly `count` bytes from `source` to `target` through a pipe (splice(2)): they
    never enter this process, where a read and a write would copy each byte twice. Both must
    have a `splice_fd`. A wait for the source is bounded by `read_timeout`, one for the target
    by `write_timeout`; SpliceBroken says which side failed and how much had moved."""
    source_fd, target_fd = source.splice_fd(), target.splice_fd()
    assert isinstance(source, Channel) and isinstance(target, Channel) and \
        source_fd is not None and target_fd is not None, "splice between plain sockets only"
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    source_lowat = 1
    # The target wakes the relay when a pipe's worth may go, not at NOTSENT_LOWAT (16 KiB):
    # that is for interactive traffic, where it keeps latency low.
    _set_notsent_lowat(target.socket, PIPE_SIZE)
    try:
        with contextlib.suppress(OSError):  # a smaller pipe works too, in more steps
            fcntl.fcntl(write_end, _F_SETPIPE_SZ, PIPE_SIZE)
        flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
        left, in_pipe, moved = count, 0, 0
        while left or in_pipe:
            if left:
                try:
                    taken = os.splice(source_fd, write_end, min(left, PIPE_SIZE), flags=flags)
                except BlockingIOError:  # nothing to read yet
                    taken = -1
                except OSError as exc:
                    raise SpliceBroken("source", exc.strerror or str(exc), moved) from None
                if taken == 0:
                    raise SpliceBroken("source", "closed the connection", moved)
                if taken > 0:
                    left, in_pipe = left - taken, in_pipe + taken
            if in_pipe:
                try:
                    given = os.splice(read_end, target_fd, in_pipe, flags=flags)
                except BlockingIOError:
                    given = 0
                except OSError as exc:
                    raise SpliceBroken("target", exc.strerror or str(exc), moved) from None
                in_pipe, moved = in_pipe - given, moved + given
            # Wait for what blocks: the target while the pipe holds bytes, else the source,
            # woken only once SPLICE_LOWAT bytes (or the rest) are there: a spin on a trickle
            # would cost a system call per few kilobytes.
            if in_pipe:
                side, fd, wait, timeout = "target", target_fd, wait_writable, write_timeout
            elif left:
                side, fd, wait, timeout = "source", source_fd, wait_readable, read_timeout
                lowat = min(left, SPLICE_LOWAT)
                if lowat != source_lowat:
                    with contextlib.suppress(OSError):
                        source.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, lowat)
                        source_lowat = lowat
            else:
                break
            with trio.move_on_after(timeout) as waiting:
                try:
                    await wait(fd)
                except trio.ClosedResourceError:  # closed here meanwhile (notify_closing)
                    raise SpliceBroken(side, "the connection was closed", moved) from None
            if waiting.cancelled_caught:
                raise SpliceBroken(side, f"no progress for {timeout:g}s", moved, slow=True)
        await checkpoint()
    finally:
        os.close(read_end)
        os.close(write_end)
        if source_lowat != 1:  # the connection goes on (keep-alive): readable at one byte
            with contextlib.suppress(OSError):
                source.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        _set_notsent_lowat(target.socket, NOTSENT_LOWAT)


def _set_nodelay(sock: socket.socket) -> bool:
    """TCP_NODELAY on `sock`; whether it was set (the peer may be gone already: the first
    read says so)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return False
    return True


def _set_notsent_lowat(sock: socket.socket, value: int) -> bool:
    """TCP_NOTSENT_LOWAT on `sock` where the system has it; whether it was set."""
    if not hasattr(socket, "TCP_NOTSENT_LOWAT"):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, value)
    except OSError:
        return False
    return True
