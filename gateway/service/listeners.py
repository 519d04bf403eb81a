"""The gateway's listening sockets: bound all at once before anything is served (a port in use
fails the start with one line), kept by (VIP, address) so that a reload binds only what is new.
"""

from __future__ import annotations

import errno
import logging
import socket

import trio

from gateway.config import Address, Config, VipConfig
from gateway.net import channel
from gateway.net.relay import tune_socket
from gateway.service.startup import StartupError

log = logging.getLogger("medgate")

# A fixed address belongs to whichever VIP lists it (a reload may move it to another VIP
# without rebinding); "any free port" (port 0) is one socket per VIP.
ListenKey = tuple[str, Address]
RETURN = "/return"  # the owner of a DICOM VIP's return listener is "<vip>/return"


def listen_key(vip_name: str, address: Address) -> ListenKey:
    # A fixed address is kept across a reload that moves it to another VIP; a return path's
    # listener is always its VIP's own.
    return (vip_name if address.port == 0 or vip_name.endswith(RETURN) else "", address)


def _owned(vip: VipConfig) -> list[tuple[str, Address]]:
    """(owner, address) of each listener of `vip`: its listen addresses, and its return
    path's (owner "<vip>/return")."""
    owned = [(vip.name, address) for address in vip.listen]
    if vip.return_listen is not None:
        owned.append((vip.name + RETURN, vip.return_listen))
    return owned


def wanted_keys(config: Config) -> dict[ListenKey, tuple[str, Address]]:
    """Every (owner, address) the config listens on, by its key."""
    return {listen_key(owner, address): (owner, address)
            for vip in config.vips for owner, address in _owned(vip)}


def vip_of(config: Config, key: ListenKey) -> VipConfig | None:
    """The VIP that a listener's clients go to now (None: it went with a reload)."""
    owner, address = key
    returning = owner.endswith(RETURN)
    for vip in config.vips:  # a loop, not next() of a generator: this runs for every client
        if returning:
            if vip.name + RETURN == owner and vip.return_listen is not None:
                return vip
        elif vip.name == owner or (not owner and address in vip.listen):
            return vip
    return None


async def bind_address(owner: str, address: Address) -> list[trio.SocketListener]:
    """Listen on `address`; StartupError names `owner` ("vip 'x'" or "[gateway] admin")."""
    try:
        try:
            opened = await trio.open_tcp_listeners(address.port, host=address.host,
                                                   backlog=1024)
        except OSError as exc:
            if exc.errno != errno.EADDRNOTAVAIL:
                raise
            opened = [_listen_before_the_address_is_here(address)]
            log.info("%s: %s is not on this host (yet): listening with IP_FREEBIND, so it "
                     "takes clients as soon as the address arrives (e.g. by VRRP)", owner,
                     address.host)
    except OSError as exc:
        hint = " (ports below 1024 need root or CAP_NET_BIND_SERVICE)" if (
            exc.errno == errno.EACCES) else ""
        raise StartupError(f"{owner}: cannot listen on {address}: "
                           f"{exc.strerror or exc}{hint}") from None
    for listener in opened:
        tune_socket(listener.socket)  # accepted sockets inherit it
    return opened


async def bind_all(wanted: list[tuple[str, Address]]
                   ) -> dict[ListenKey, list[trio.SocketListener]]:
    """Bind every (vip, address) or none: StartupError names the one that failed."""
    opened: dict[ListenKey, list[trio.SocketListener]] = {}
    try:
        for vip_name, address in wanted:
            opened[listen_key(vip_name, address)] = await bind_address(f"vip {vip_name!r}",
                                                                       address)
    except StartupError:
        await close_all(opened)
        raise
    return opened


async def close_all(listening: dict[ListenKey, list[trio.SocketListener]]) -> None:
    for listeners in listening.values():
        for listener in listeners:
            await listener.aclose()
    listening.clear()


def bound_addresses(config: Config, listening: dict[ListenKey, list[trio.SocketListener]]
                    ) -> dict[str, tuple[Address, ...]]:
    """The addresses each VIP listens on, as bound (port 0 read back); a return path's under
    "<vip>/return"."""
    bound: dict[str, tuple[Address, ...]] = {}
    for vip in config.vips:
        for owner, address in _owned(vip):
            bound[owner] = bound.get(owner, ()) + tuple(
                Address(*listener.socket.getsockname()[:2])
                for listener in listening.get(listen_key(owner, address), ()))
    return bound


def _listen_before_the_address_is_here(address: Address) -> trio.SocketListener:
    """A listener on an address this host does not have yet: the standby of a pair listens
    on the floating address, warm, before VRRP moves it here."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        channel.set_ip_flag(sock, channel.FREEBIND)
        sock.bind((address.host, address.port))
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock))
