"""Admission: an accepted connection's way to its VIP's handler (PROXY header, client limits,
TLS handshake), or its refusal in the protocol's words when the VIP or the gateway is full.

Every connection ends here: whatever happens to it, its socket is closed once its handler is
done, and a bug met by one connection costs that connection only, never the gateway.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from gateway.config import Config, VipConfig
from gateway.net import tls
from gateway.net.channel import Channel
from gateway.net.link import Link
from gateway.net.limits import (FDS_PER_CLIENT, PRESSED_HANDSHAKE_TIMEOUT, REFUSALS_AT_ONCE,
                                REFUSE_TIMEOUT, AdminTable, ClientTable, Evicted, Full, Total,
                                gateway_max_clients, per_source_limit, reserve_for,
                                vip_max_clients)
from gateway.net.peer import Peer, ProxyRefused, read_proxy_header, socket_peer, trusted
from gateway.records.atna import Actor
from gateway.records.audit import AuditLog
from gateway.vips import VipHandler

if TYPE_CHECKING:
    from gateway.service.admin import AdminServer

log = logging.getLogger("medgate")


class Admission:
    """Admits clients to VIPs and to the admin server, within the client limits."""

    def __init__(self, audit: AuditLog, admin_tls: ssl.SSLContext | None) -> None:
        self.audit = audit
        self.admin_tls = admin_tls  # the admin server's HTTPS, when [gateway] admin_tls is set
        self.total = Total(limit=0)
        self.clients: dict[str, ClientTable] = {}  # by VIP name; kept across reloads
        self.admin_clients = AdminTable()
        self._refusals_full_logged = False

    def set_limits(self, config: Config, open_files: int) -> None:
        """Client limits for the config in force (again after a reload); live clients stay."""
        total = gateway_max_clients(config, open_files)
        needed = total * FDS_PER_CLIENT + reserve_for(config)
        if needed > open_files:
            log.warning("[gateway] max_clients %d needs about %d file descriptors, the "
                        "open-files limit is %d: accept may fail at times (raise LimitNOFILE "
                        "or ulimit -n)", total, needed, open_files)
        self.total.limit = total
        limits = vip_max_clients(config, total)
        for name in set(self.clients) - set(limits):
            del self.clients[name]
        for vip in config.vips:
            table = self.clients.setdefault(vip.name, ClientTable(vip.name, limits[vip.name],
                                                                  self.total))
            table.limit = limits[vip.name]
            table.per_source = per_source_limit(vip.max_clients_per_source, table.limit)
        log.info("client limits: %d in all (open files %d), per VIP: %s", total, open_files,
                 ", ".join(f"{name} {limit}" for name, limit in limits.items()))

    async def admit(self, vip: VipConfig | None, handler: VipHandler | None,
                    stream: Channel) -> None:
        """Serve one client of `vip` (None: its listener went with a reload) with `handler`."""
        try:
            if vip is None or handler is None:
                return
            peer = socket_peer(stream)
            if vip.accept_proxy and trusted(peer.host, vip.trusted_proxies):
                try:
                    peer = await read_proxy_header(stream, peer)
                except ProxyRefused as exc:
                    handler.pool.count_refused()
                    log.warning("vip=%s proxy=%s closed: %s", vip.name, peer.name, exc)
                    return
            # A trusted proxy speaks for many clients: its connections are not counted per
            # source (behind PROXY headers, each named client is).
            source = None if trusted(peer.host, vip.trusted_proxies) else peer.host
            table = self.clients[vip.name]
            with table.admit(peer.name, source) as slot:
                if slot is None:
                    await self._refuse(vip, handler, stream, peer, table.full(source))
                    return
                # A client in its handshake holds a slot without doing anything yet: under
                # pressure it is evicted first, and its handshake gets less time.
                client: Link | None = stream
                if handler.server_tls is not None:  # no opening's scope without TLS
                    with slot.opening("tls-handshake"):
                        client = await self._handshake(
                            vip, handler, stream, peer, PRESSED_HANDSHAKE_TIMEOUT
                            if table.pressed else tls.HANDSHAKE_TIMEOUT, slot.heard)
                if client is not None:
                    slot.peer = peer.with_certificate(client)
                    await handler.handle(client, slot)
        except Evicted:
            pass  # logged where it was decided
        except Exception:
            log.exception("vip=%s: unexpected error, connection closed",
                          vip.name if vip else "?")
        finally:
            stream.close()

    async def _handshake(self, vip: VipConfig, handler: VipHandler, stream: Channel,
                         peer: Peer, timeout: float = tls.HANDSHAKE_TIMEOUT,
                         heard: Callable[[], None] | None = None) -> Link | None:
        """The client's stream, over TLS when the VIP has it; None (logged) when the handshake
        fails: a refused certificate is a security event (a warning and an audit record)."""
        if handler.server_tls is None:
            return stream
        try:
            return await tls.accept(stream, handler.server_tls, timeout, heard)
        except tls.TlsFailed as exc:
            handler.pool.count_refused()
            log.warning("vip=%s client=%s TLS handshake failed, closed: %s", vip.name,
                        peer.name, exc)
            self.audit.node_refused(vip.name, Actor(peer.host, peer.host),
                                    f"TLS handshake refused: {exc}")
            return None

    async def _refuse(self, vip: VipConfig, handler: VipHandler, stream: Channel,
                      peer: Peer, full: Full | None) -> None:
        """Over a client limit (`full`): answer in the protocol's words while few refusals are
        under way; beyond that, close at once (a refusal holds a descriptor for
        REFUSE_TIMEOUT)."""
        table = self.clients[vip.name]
        why = (f"{peer.host} holds max_clients_per_source ({table.per_source}) of vip "
               f"{vip.name!r}'s clients" if full is Full.SOURCE else
               f"the gateway has [gateway] max_clients ({self.total.limit}) clients"
               if full is Full.GATEWAY else
               f"vip {vip.name!r} has max_clients ({table.limit}) clients")
        if self.total.refusing >= REFUSALS_AT_ONCE:
            if not self._refusals_full_logged:
                log.warning("vip=%s: %d refusals under way; further clients over the limit are "
                            "closed at once", vip.name, REFUSALS_AT_ONCE)
                self._refusals_full_logged = True
            handler.pool.count_refused()
            return
        self._refusals_full_logged = False
        self.total.refusing += 1
        try:
            with trio.move_on_after(REFUSE_TIMEOUT):
                client = await self._handshake(vip, handler, stream, peer)
                if client is not None:
                    await handler.refuse(client, peer.name, why)
        finally:
            self.total.refusing -= 1

    async def admit_admin(self, admin: AdminServer, stream: Channel) -> None:
        """Serve one admin client, over HTTPS when configured; a flood of admin clients is
        closed, so the gateway's own work goes on."""
        try:
            with self.admin_clients.admit() as slot:
                if slot is None:
                    return
                client: Link = stream
                name = socket_peer(stream).name
                if self.admin_tls is not None:
                    try:
                        client = await tls.accept(stream, self.admin_tls,
                                                  PRESSED_HANDSHAKE_TIMEOUT)
                    except tls.TlsFailed as exc:
                        log.warning("admin: client %s TLS handshake failed, closed: %s",
                                    name, exc)
                        return
                await admin.handle(client, name, slot)
        except Exception:
            log.exception("admin: unexpected error, connection closed")
        finally:
            stream.close()
