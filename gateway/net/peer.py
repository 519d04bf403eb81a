"""Who a client is: its address (as a trusted proxy's PROXY header gives it, or the socket's),
the gateway address it reached, and the names its verified TLS certificate carries."""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass, replace

import trio

from gateway.net.channel import Channel
from gateway.config import Address
from gateway.net.tls import certificate_names, certificate_subject, peer_certificate
from protocols.proxy import ProxyError, parse

log = logging.getLogger("medgate.peer")

PROXY_TIMEOUT = 5.0  # a trusted proxy's header must be whole this long after connect
_PEEK = 16 + 1024 + 16  # the largest header we read (protocols.proxy.V2_MAX_EXTRA) and a bit


@dataclass(frozen=True)
class Peer:
    host: str
    port: int
    local: tuple[str, int]  # the gateway address the client connected to
    via: str = ""  # the proxy that told us the address, if one did
    names: tuple[str, ...] = ()  # CN=, DNS:, IP:, email:, URI: of its verified certificate
    subject: str = ""  # its certificate's subject, "" when it sent none

    @property
    def name(self) -> str:
        return str(Address(self.host, self.port))

    @property
    def source(self) -> tuple[str, int]:
        return self.host, self.port

    def with_certificate(self, stream: trio.abc.Stream) -> Peer:
        """This peer with what the TLS stream's verified certificate says."""
        certificate = peer_certificate(stream)
        if not certificate:
            return self
        return replace(self, names=certificate_names(certificate),
                       subject=certificate_subject(certificate))


class ProxyRefused(Exception):
    """A trusted proxy's connection without a valid PROXY header; the message says why."""


def socket_peer(stream: Channel) -> Peer:
    """The peer as the socket sees it."""
    try:
        host, port = stream.socket.getpeername()[:2]
        local = stream.socket.getsockname()[:2]
    except OSError:
        return Peer("?", 0, ("?", 0))
    return Peer(_plain(host), port, (_plain(local[0]), local[1]))


def _plain(host: str) -> str:
    """'::ffff:10.1.2.3' (an IPv4 client on a dual-stack socket) as '10.1.2.3'."""
    if not host.startswith("::ffff:"):
        return host
    try:
        mapped = getattr(ipaddress.ip_address(host), "ipv4_mapped", None)
    except ValueError:
        return host
    return str(mapped) if mapped else host


def trusted(host: str, proxies) -> bool:
    """Whether `host` is in one of the networks `proxies` (trusted_proxies)."""
    if not proxies:  # the usual VIP: no address parsed for every client
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in proxies)


async def read_proxy_header(stream: Channel, peer: Peer) -> Peer:
    """Take the PROXY header off the socket (exactly its bytes: what follows stays for the
    protocol) and return the client it names; ProxyRefused when there is none in time."""
    sock = stream.socket
    with trio.move_on_after(PROXY_TIMEOUT):
        while True:
            try:
                await trio.lowlevel.wait_readable(sock)
                data = sock.recv(_PEEK, socket.MSG_PEEK)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise ProxyRefused(f"connection broken before its PROXY header: {exc}") from None
            if not data:
                raise ProxyRefused("closed before its PROXY header was whole")
            try:
                header = parse(data)
            except ProxyError as exc:
                raise ProxyRefused(str(exc)) from None
            if header is not None:
                sock.recv(header.length)  # already here: returns at once
                if header.source is None:
                    return replace(peer, via=peer.name)  # LOCAL: the proxy speaks for itself
                return replace(peer, host=header.source[0], port=header.source[1],
                               local=header.destination or peer.local, via=peer.name)
            # A peek returns at once while any byte waits: let more arrive (a header is small
            # and normally comes whole in the first segment).
            await trio.sleep(0.01)
    raise ProxyRefused(f"no whole PROXY header within {PROXY_TIMEOUT:g}s")
