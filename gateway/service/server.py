"""Runs a whole config: one listener nursery, one handler nursery, the health monitor.

Shutdown (`stop()`, SIGTERM): listeners close at once, live connections get `drain_timeout` to
finish, then are cancelled. The handler nursery is separate from the listeners' so that draining
is just moving its deadline (as hypercorn does).
"""

from __future__ import annotations

import enum
import errno
import hashlib
import logging
import os
import resource
import socket
import sqlite3
import time
from typing import TypeVar
from dataclasses import replace

import trio

from gateway.net import channel, tls, transparent
from gateway.balancer import Balancer, MemberSpec, Pool
from gateway.net.channel import Channel
from gateway.service.admin import AdminServer
from gateway.records.atna import Actor, AtnaSender
from gateway.records.audit import AuditLog
from gateway.records.affinity import AffinityStore
from gateway.records.inventory import Inventory
from gateway.records.receipts import Receipts
from gateway.config import Address, Config, ConfigError, Failback, VipConfig, load_config
from gateway.net.limits import (FDS_PER_CLIENT, PRESSED_HANDSHAKE_TIMEOUT, REFUSALS_AT_ONCE,
                            REFUSE_TIMEOUT, AcceptTrouble, AdminTable, ClientTable, Evicted,
                            Total, gateway_max_clients, per_source_limit, reserve_for,
                            vip_max_clients)
from gateway.net.peer import Peer, ProxyRefused, read_proxy_header, socket_peer, trusted
from gateway.net.relay import close_now, tune_socket
from gateway.service.peers import PeerSync, config_digests
from gateway.records.summary import SUMMARY_EVERY, TrafficSummary
from gateway.service.systemd import Notifier
from gateway.vips import Records, VipHandler
from gateway.vips.dicom import DicomVip
from gateway.vips.hl7 import HL7Vip
from gateway.vips.tcp import TcpVip
from gateway.vips.xds import XdsVip
from health.checks import CHECKS
from health.monitor import Monitor

Part = TypeVar("Part")
log = logging.getLogger("medgate")

HANDLERS = {"dicom": DicomVip, "hl7": HL7Vip, "tcp": TcpVip, "xds": XdsVip}


INVENTORY_SAVE_EVERY = 30.0  # seconds (and at stop)
ATNA_FLUSH_TIMEOUT = 2.0  # at stop, to send what is spooled (the rest goes at next start)
TRAFFIC_SAMPLE_EVERY = 10.0  # seconds: with HISTORY points, the status page shows 5 minutes


class Phase(enum.Enum):
    """Where the gateway is in its life, as /readyz and systemd hear it."""

    STARTING = "starting: listeners open, first health checks running"
    READY = "ready"
    DRAINING = "draining: no new clients, live ones finishing"


class StartupError(Exception):
    """The gateway could not start (a port in use, no permission); the message says which VIP."""


def member_specs(vip: VipConfig) -> list[MemberSpec]:
    return [MemberSpec(m.name, m.weight, m.max_connections) for m in vip.members]


def pool_settings(vip: VipConfig, shared: bool = False) -> dict:
    """The balancer settings of one VIP; `shared`: the gateway has peers to tell what it
    remembers (table persistence, HL7 deliveries)."""
    persistence = vip.persistence
    dicom = vip.protocol == "dicom"
    return dict(mode=vip.mode, algorithm=vip.algorithm,
                persistence_method=persistence.method if persistence else None,
                persistence_timeout=persistence.timeout if persistence else 3600.0,
                # DICOM: a study stays on one archive (README "What the gateway decides on its
                # own"): a calling AE whose member is up waits for it rather than moving.
                hold_persisted=dicom,
                failback_after=vip.failback_after if dicom else 0.0,
                failback_manual=dicom and vip.failback is Failback.MANUAL,
                status_sources=2 if dicom else 1, status_window=vip.status_window,
                min_up=vip.min_up,
                resend_memory=vip.resend_memory if vip.protocol == "hl7" else 0, shared=shared,
                rise=vip.health.rise, fall=vip.health.fall, error_limit=vip.error_limit)


def build_pool(vip: VipConfig, shared: bool = False) -> Pool:
    """The balancer pool for one VIP, from its config."""
    return Pool.from_specs(vip.name, member_specs(vip), **pool_settings(vip, shared))


def ensure_servable(config: Config) -> None:
    """Refuse, before binding anything, a config that asks for what this version cannot serve."""
    for vip in config.vips:
        if vip.protocol not in HANDLERS:
            raise ConfigError(
                f"{config.source}: vip {vip.name!r}: protocol {vip.protocol!r} is not served by "
                f"this version of medgate (it serves: {', '.join(sorted(HANDLERS))})")
        if vip.health.check not in CHECKS:
            raise ConfigError(
                f"{config.source}: vip {vip.name!r}: health check {vip.health.check!r} is not "
                f"available in this version of medgate (available: {', '.join(sorted(CHECKS))})")


def raise_fd_limit() -> int:
    """A proxy holds two sockets per client: lift the soft open-files limit to the hard one.
    Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # an unlimited or too large hard limit
            return soft
        log.debug("open files limit raised from %d to %d", soft, hard)
        return hard
    return soft


def file_digest(path: str) -> str:
    """The first 16 hex digits of the file's SHA-256 ('' when it cannot be read), for the audit
    record of a reload: which file content was running before and after."""
    try:
        return hashlib.sha256(open(path, "rb").read()).hexdigest()[:16]
    except OSError:
        return ""


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


async def check_transparent(config: Config) -> None:
    """StartupError naming what is missing for a `transparent = true` VIP (the capability,
    the way back for members' replies), before any client would fail."""
    for vip in config.vips:
        if vip.transparent:
            missing = await trio.to_thread.run_sync(transparent.problems, vip)
            if missing:
                more = (f" (and {len(missing) - 1} more: gateway check -c)"
                        if len(missing) > 1 else "")
                raise StartupError(f"vip {vip.name!r}: transparent: {missing[0]}{more}")
            log.info("vip=%s transparent: members see each client's own address", vip.name)


class Gateway:
    """Every VIP of a config: its listeners, pools, handlers, monitor, admin server and reload."""

    def __init__(self, config: Config, *, serve_admin: bool = True) -> None:
        ensure_servable(config)
        self.config = config
        self.atna = AtnaSender(config.gateway.atna) if config.gateway.atna else None
        self.audit = AuditLog(config.gateway.audit, self.atna)
        self.balancer = Balancer([build_pool(vip, bool(config.gateway.peers))
                                  for vip in config.vips])
        self.inventory = Inventory(config.gateway.state_dir)
        self.affinity = AffinityStore(config.gateway.state_dir)
        settings = config.gateway
        self.receipts = Receipts(settings.state_dir, settings.receipt_days,
                                 settings.receipt_hash_uids) if settings.state_dir else None
        self._records = Records(self.inventory, self.receipts)
        self.handlers: dict[str, VipHandler] = {
            vip.name: self._handler(vip) for vip in config.vips}
        self.admin = AdminServer(self) if serve_admin and config.gateway.admin else None
        self.admin_address: Address | None = None
        self.bound: dict[str, tuple[Address, ...]] = {}
        self.started_at = time.time()
        self.reloads = 0
        self.last_reload_error = ""
        # Listeners by _key(vip, configured address); each has its own serving scope.
        self._listening: dict[tuple[str, Address], list[trio.SocketListener]] = {}
        self._serving: dict[tuple[str, Address], trio.CancelScope] = {}
        self._admin_listeners: list[trio.SocketListener] = []
        self._monitor: Monitor | None = None
        self._services: trio.Nursery | None = None
        self._connections: trio.Nursery | None = None
        self._reload_lock = trio.Lock()
        self._stop = trio.Event()
        self.config_digest = file_digest(config.source)
        self.open_files = 0
        self.total = Total(limit=0)
        self.clients: dict[str, ClientTable] = {}
        self.admin_clients = AdminTable()
        self._admin_tls = (tls.server_context(config.gateway.admin_tls)
                           if config.gateway.admin_tls else None)
        self._refusals_full_logged = False
        self.phase = Phase.STARTING
        self.notifier = Notifier()
        self.config_digests = config_digests(config)  # what a pair's peers compare
        self.peers = (PeerSync(config.gateway, self.balancer, lambda: self.config_digests)
                      if config.gateway.peers else None)

    def _handler(self, vip: VipConfig) -> VipHandler:
        return HANDLERS[vip.protocol](vip, self.balancer.pool(vip.name), self.audit,
                                      self._records)

    def stop(self) -> None:
        """Stop accepting; live connections get drain_timeout to finish."""
        self._stop.set()

    # -- binding

    @staticmethod
    async def _bind_address(owner: str, address: Address) -> list[trio.SocketListener]:
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

    @staticmethod
    def _key(vip_name: str, address: Address) -> tuple[str, Address]:
        # A fixed address belongs to whichever VIP lists it (a reload may move it without
        # rebinding); "any free port" (port 0) is one socket per VIP.
        return (vip_name if address.port == 0 else "", address)

    async def _bind_all(self, wanted: list[tuple[str, Address]]) -> dict[tuple[str, Address], list]:
        """Bind every (vip, address) or none: StartupError names the one that failed."""
        opened: dict[tuple[str, Address], list[trio.SocketListener]] = {}
        try:
            for vip_name, address in wanted:
                opened[self._key(vip_name, address)] = await self._bind_address(
                    f"vip {vip_name!r}", address)
        except StartupError:
            for listeners in opened.values():
                for listener in listeners:
                    await listener.aclose()
            raise
        return opened

    async def bind(self) -> None:
        """Open every VIP's and the admin's listening sockets, before serving anything."""
        if self._listening:
            return
        for warning in self.config.warnings:
            log.warning("config: %s", warning)
        self.open_files = raise_fd_limit()
        self._set_limits()
        await check_transparent(self.config)
        try:
            self.audit.open()
            if self.atna is not None:
                self.atna.open()
        except OSError as exc:
            raise StartupError(str(exc)) from None
        state_dir = self.config.gateway.state_dir
        if state_dir:
            try:
                os.makedirs(state_dir, exist_ok=True)
            except OSError as exc:
                raise StartupError(f"[gateway] state_dir {state_dir}: {exc.strerror}") from None
            if not os.access(state_dir, os.W_OK):
                raise StartupError(f"[gateway] state_dir {state_dir}: not writable")
            try:
                self._running(self.receipts).open()
            except (OSError, sqlite3.Error) as exc:
                raise StartupError(f"[gateway] state_dir {state_dir}: receipts: {exc}") from None
        self.inventory.load()
        self.affinity.load(self.balancer, trio.current_time())
        self._listening = await self._bind_all(
            [(vip.name, address) for vip in self.config.vips for address in vip.listen])
        if self.admin is not None:
            try:
                self._admin_listeners = await self._bind_address(
                    "[gateway] admin", self._running(self.config.gateway.admin))
            except StartupError:
                for listeners in self._listening.values():
                    for listener in listeners:
                        await listener.aclose()
                self._listening.clear()
                raise
            self.admin_address = Address(*self._admin_listeners[0].socket.getsockname()[:2])
        self._update_bound()

    def _set_limits(self) -> None:
        """Client limits for the config in force (again after a reload); live clients stay."""
        total = gateway_max_clients(self.config, self.open_files)
        needed = total * FDS_PER_CLIENT + reserve_for(self.config)
        if needed > self.open_files:
            log.warning("[gateway] max_clients %d needs about %d file descriptors, the "
                        "open-files limit is %d: accept may fail at times (raise LimitNOFILE "
                        "or ulimit -n)", total, needed, self.open_files)
        self.total.limit = total
        limits = vip_max_clients(self.config, total)
        self.clients = {name: self.clients.get(name) or ClientTable(name, limit, self.total)
                        for name, limit in limits.items()}
        for vip in self.config.vips:
            table = self.clients[vip.name]
            table.limit = limits[vip.name]
            table.per_source = per_source_limit(vip.max_clients_per_source, table.limit)
        log.info("client limits: %d in all (open files %d), per VIP: %s", total,
                 self.open_files, ", ".join(f"{name} {limit}" for name, limit in limits.items()))

    def _update_bound(self) -> None:
        self.bound = {vip.name: tuple(Address(*listener.socket.getsockname()[:2])
                                      for address in vip.listen
                                      for listener in self._listening.get(
                                          self._key(vip.name, address), ()))
                      for vip in self.config.vips}

    def _vip_of(self, key: tuple[str, Address]) -> VipConfig | None:
        owner, address = key
        return next((vip for vip in self.config.vips
                     if vip.name == owner or (not owner and address in vip.listen)), None)

    # -- serving

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Bind, run the first health round, serve until stop(), drain; `started` gets `self`.
        The admin server answers from before the first checks to the end of the drain, so
        /readyz can say "starting" and "draining"."""
        await self.bind()
        async with trio.open_nursery() as admin:
            if self.admin is not None:
                admin.start_soon(self._accept_all, "[gateway] admin", self._admin_listeners,
                                 self._admit_admin, admin)
                log.info("admin: status page %s://%s/ (API /api/status, /metrics)",
                         "https" if self._admin_tls else "http", self.admin_address)
            await self._serve_and_drain(task_status)
            admin.cancel_scope.cancel()
        self._log_summary()  # what the last interval saw
        self.inventory.save()
        self.affinity.write(self.affinity.snapshot(self.balancer, trio.current_time()))
        if self.receipts is not None:  # what the drain added after the last batch, too
            await self.receipts.flush()
            self.receipts.close()
        self.audit.application(started=False)
        if self.atna is not None:
            with trio.move_on_after(ATNA_FLUSH_TIMEOUT):  # else it waits in the spool
                await self.atna.flush()
        self.audit.close()
        self.notifier.close()
        log.info("gateway stopped")

    async def _serve_and_drain(self, task_status) -> None:
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as services:
                self._services, self._connections = services, connections
                if self.atna is not None:
                    await services.start(self.atna.run)
                services.start_soon(self._save_state)
                self._summary, self._summary_since = TrafficSummary(), trio.current_time()
                services.start_soon(self._summarize)
                services.start_soon(self._sample_traffic)
                if self.receipts is not None:
                    await services.start(self.receipts.run)
                if self.notifier.watchdog_interval:
                    services.start_soon(self._watchdog)
                # No traffic before every member has had its first check: a member whose first
                # check fails must never see a client; nor before the peers' admin state
                # (a member drained on the other node is drained here too).
                await self._start_monitor(Monitor(self.balancer, self.config.vips))
                if self.peers is not None:
                    await self.peers.pull()
                    services.start_soon(self.peers.run)
                for key in list(self._listening):
                    self._start_listener(key)
                for vip in self.config.vips:
                    log.info("vip=%s protocol=%s listening on %s, members: %s", vip.name,
                             vip.protocol, ", ".join(map(str, self.bound[vip.name])),
                             ", ".join(self._member_line(vip)))
                self.audit.application(started=True)
                self.phase = Phase.READY
                self.notifier.notify(READY=1, STATUS=self._status_line())
                task_status.started(self)
                await self._stop.wait()
                self.phase = Phase.DRAINING
                self.notifier.notify(STOPPING=1, STATUS="draining")
                services.cancel_scope.cancel()
            live = len(connections.child_tasks)
            log.info("stopped accepting; %d live connection(s), waiting up to %gs for them",
                     live, self.config.gateway.drain_timeout)
            connections.cancel_scope.deadline = (trio.current_time()
                                                 + self.config.gateway.drain_timeout)
        if connections.cancel_scope.cancelled_caught:
            log.warning("drain timeout: remaining connections were closed")

    def _status_line(self) -> str:
        """What `systemctl status` shows next to the unit."""
        up = sum(self.balancer.pool(vip.name).member(m.name).accepts_new
                 for vip in self.config.vips for m in vip.members)
        total = sum(len(vip.members) for vip in self.config.vips)
        return f"serving {len(self.config.vips)} VIP(s), {up} of {total} member(s) up"

    async def _watchdog(self) -> None:
        """WATCHDOG=1 from the event loop itself: if the loop stops, systemd restarts us."""
        while True:
            self.notifier.notify(WATCHDOG=1)
            await trio.sleep(self.notifier.watchdog_interval)

    async def _save_state(self) -> None:
        """Save what is kept across restarts (the DICOM inventory, the balancer's affinities)
        now and then; the affinities, which can be large, are written from a worker thread."""
        while True:
            await trio.sleep(INVENTORY_SAVE_EVERY)
            self.inventory.save()
            if self.affinity.path is not None:
                await trio.to_thread.run_sync(
                    self.affinity.write, self.affinity.snapshot(self.balancer,
                                                                trio.current_time()))

    async def _sample_traffic(self) -> None:
        """A traffic point per member every TRAFFIC_SAMPLE_EVERY (the status page's lines)."""
        while True:
            await trio.sleep(TRAFFIC_SAMPLE_EVERY)
            for pool in self.balancer.pools.values():
                pool.sample_traffic()

    async def _summarize(self) -> None:
        """The periodic INFO line per VIP (each unit's own line is DEBUG)."""
        while True:
            await trio.sleep(SUMMARY_EVERY)
            self._log_summary()

    def _log_summary(self) -> None:
        now = trio.current_time()
        pools = [(self.balancer.pool(vip.name), vip.protocol) for vip in self.config.vips]
        for line in self._summary.lines(pools, now - self._summary_since):
            log.info("%s", line)
        self._summary_since = now

    @staticmethod
    def _running(part: Part | None) -> Part:
        """A part that exists while the gateway runs (its nurseries) or as the config says
        (admin server, receipts): reached only where it does."""
        assert part is not None, "a part of the gateway used before it exists"
        return part

    async def _start_monitor(self, monitor: Monitor) -> None:
        """Run `monitor` (its first round before this returns), instead of the one before."""
        if self._monitor is not None:
            self._monitor.cancel_scope.cancel()
        self._monitor = monitor
        await self._running(self._services).start(monitor.run)

    def _start_listener(self, key: tuple[str, Address]) -> None:
        scope = trio.CancelScope()
        self._serving[key] = scope
        self._running(self._services).start_soon(self._serve, scope, key, self._listening[key])

    async def _serve(self, scope: trio.CancelScope, key: tuple[str, Address], listeners) -> None:
        with scope:
            await self._accept_all(f"listener {key[1]}", listeners,
                                   lambda stream: self._admit(key, stream))

    async def _accept_all(self, owner: str, listeners, admit,
                          handlers: trio.Nursery | None = None) -> None:
        """Accept on every listener; each client is handed to `admit` in `handlers` (by
        default the connections' nursery). Running out of descriptors backs off and is logged
        once per burst, never spins."""
        async def accept_loop(listener: trio.SocketListener) -> None:
            trouble = AcceptTrouble(owner)
            async with listener:  # closed when serving stops (drain, reload): no new clients
                acceptor = channel.Acceptor(listener.socket)
                try:
                    while True:
                        try:
                            stream = await acceptor.accept()
                        except OSError as exc:
                            await trouble.failed(exc)
                            continue
                        trouble.succeeded()
                        (handlers or self._running(self._connections)).start_soon(admit, stream)
                finally:
                    acceptor.detach()

        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(accept_loop, listener)

    async def _admit(self, key: tuple[str, Address], stream: Channel) -> None:
        # The VIP and handler are looked up per connection: a reload swaps them under us.
        vip = self._vip_of(key)
        try:
            if vip is None:
                return
            handler = self.handlers[vip.name]
            peer = socket_peer(stream)
            if vip.accept_proxy and trusted(peer.host, vip.trusted_proxies):
                try:
                    peer = await read_proxy_header(stream, peer)
                except ProxyRefused as exc:
                    handler.pool.refused += 1
                    log.warning("vip=%s proxy=%s closed: %s", vip.name, peer.name, exc)
                    return
            # A trusted proxy speaks for many clients: its connections are not counted per
            # source (behind PROXY headers, each named client is).
            source = None if trusted(peer.host, vip.trusted_proxies) else peer.host
            table = self.clients[vip.name]
            with table.admit(peer.name, source) as slot:
                if slot is None:
                    await self._refuse(vip, handler, stream, peer)
                    return
                # A client in its handshake holds a slot without doing anything yet: under
                # pressure it is evicted first, and its handshake gets less time.
                with slot.opening("tls-handshake"):
                    client = await self._handshake(
                        vip, handler, stream, peer,
                        PRESSED_HANDSHAKE_TIMEOUT if table.pressed else tls.HANDSHAKE_TIMEOUT)
                if client is not None:
                    slot.peer = peer.with_certificate(client)
                    await handler.handle(client, slot)
        except Evicted:
            pass  # logged where it was decided
        except Exception:
            # A bug met by one connection must cost that connection, never the gateway.
            log.exception("vip=%s: unexpected error, connection closed",
                          vip.name if vip else "?")
        finally:
            close_now(stream)

    async def _handshake(self, vip: VipConfig, handler: VipHandler, stream: Channel,
                         peer: Peer, timeout: float = tls.HANDSHAKE_TIMEOUT
                         ) -> trio.abc.Stream | None:
        """The client's stream, over TLS when the VIP has it; None (logged) when the handshake
        fails: a refused certificate is a security event (a warning and an audit record)."""
        if handler.server_tls is None:
            return stream
        try:
            return await tls.accept(stream, handler.server_tls, timeout)
        except tls.TlsFailed as exc:
            handler.pool.refused += 1
            log.warning("vip=%s client=%s TLS handshake failed, closed: %s", vip.name,
                        peer.name, exc)
            self.audit.node_refused(vip.name, Actor(peer.host, peer.host),
                                    f"TLS handshake refused: {exc}")
            return None

    async def _refuse(self, vip: VipConfig, handler: VipHandler, stream: Channel,
                      peer: Peer) -> None:
        """Over max_clients: answer in the protocol's words while few refusals are under way;
        beyond that, close at once (a refusal holds a descriptor for REFUSE_TIMEOUT)."""
        table = self.clients[vip.name]
        why = (f"vip {vip.name!r} has max_clients ({table.limit}) clients"
               if len(table.slots) >= table.limit else
               f"the gateway has [gateway] max_clients ({self.total.limit}) clients"
               if self.total.count >= self.total.limit else
               f"{peer.host} holds max_clients_per_source ({table.per_source}) of vip "
               f"{vip.name!r}'s clients")
        if self.total.refusing >= REFUSALS_AT_ONCE:
            if not self._refusals_full_logged:
                log.warning("vip=%s: %d refusals under way; further clients over the limit are "
                            "closed at once", vip.name, REFUSALS_AT_ONCE)
                self._refusals_full_logged = True
            handler.pool.refused += 1
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

    async def _admit_admin(self, stream: Channel) -> None:
        try:
            with self.admin_clients.admit() as slot:
                if slot is None:
                    return  # a flood of admin clients: closed, the gateway's own work goes on
                client: trio.abc.Stream = stream
                name = socket_peer(stream).name
                if self._admin_tls is not None:
                    try:
                        client = await tls.accept(stream, self._admin_tls,
                                                  PRESSED_HANDSHAKE_TIMEOUT)
                    except tls.TlsFailed as exc:
                        log.warning("admin: client %s TLS handshake failed, closed: %s",
                                    name, exc)
                        return
                await self._running(self.admin).handle(client, name, slot)
        except Exception:
            # As a VIP's connections: a bug met by one admin connection costs that one only.
            log.exception("admin: unexpected error, connection closed")
        finally:
            close_now(stream)

    def _member_line(self, vip: VipConfig) -> list[str]:
        pool = self.balancer.pool(vip.name)
        return [f"{m.name}={m.address} ({pool.member(m.name).state})" for m in vip.members]

    # -- reload

    def reopen_logs(self, user: str = "SIGHUP", client: str = "signal") -> str:
        """Reopen the audit log by its name (logrotate moved the old one); '' when done."""
        error = self.audit.reopen()
        if error:
            log.error("%s; records go on to the old file", error)
        else:
            log.info("audit log reopened (asked by %s from %s)", user, client)
        self.audit.record("admin", user=user, client=client, action="reopen-logs",
                          outcome="refused" if error else "reopened",
                          **({"detail": error} if error else {}))
        return error

    async def reload_from_file(self, user: str = "SIGHUP", client: str = "signal") -> str:
        """Re-read the config file; '' when the new config runs, else why the old one stays.
        An audit record names who asked (`user` from `client`) and the file's digest."""
        before = self.config_digest
        if self.phase is not Phase.READY:
            return f"not reloaded: the gateway is {self.phase.name.lower()}"
        self.notifier.reloading()
        try:
            new = load_config(self.config.source)
            await self.reload(new)
        except (ConfigError, StartupError, tls.TlsSetupError) as exc:
            self.notifier.notify(READY=1, STATUS=f"reload refused; {self._status_line()}")
            self.last_reload_error = str(exc)
            log.error("reload refused, the running config stays: %s", exc)
            self.audit.record("admin", user=user, client=client, action="reload",
                              before={"config": before}, after={"config": before},
                              outcome="refused", detail=str(exc))
            self.audit.configuration_changed(False, False, Actor.at(user, client),
                                             f"reload refused: {exc}",
                                             f"config:{self.config.source}")
            return str(exc)
        self.last_reload_error = ""
        self.notifier.notify(READY=1, STATUS=self._status_line())
        self.config_digest = file_digest(self.config.source)
        self.audit.record("admin", user=user, client=client, action="reload",
                          before={"config": before}, after={"config": self.config_digest},
                          outcome="reloaded")
        self.audit.configuration_changed(False, True, Actor.at(user, client),
                                         f"config reloaded: {before} -> {self.config_digest}",
                                         f"config:{self.config.source}")
        return ""

    async def reload(self, new: Config) -> None:
        """Switch to `new`: added, removed and changed VIPs and members take effect; live
        connections finish on their members; kept members keep health and admin state."""
        async with self._reload_lock:
            ensure_servable(new)
            await check_transparent(new)
            if new.gateway.admin != self.config.gateway.admin:
                log.warning("reload: [gateway] admin changed; it takes effect at restart")
            if bool(new.gateway.admin_tls) != bool(self._admin_tls):
                log.warning("reload: [gateway] admin_tls turned on or off; it takes effect at "
                            "restart")
            elif new.gateway.admin_tls:
                self._admin_tls = tls.server_context(new.gateway.admin_tls)  # new files
            wanted = {self._key(vip.name, address): (vip.name, address)
                      for vip in new.vips for address in vip.listen}
            monitor = Monitor(self.balancer, new.vips)  # its TLS contexts may fail: first
            opened = await self._bind_all([pair for key, pair in wanted.items()
                                           if key not in self._listening])
            if self._monitor is not None:
                # Before the pools change: a check still running for a member this reload
                # removes must not report on it.
                self._monitor.cancel_scope.cancel()
            old_vips = {vip.name: vip for vip in self.config.vips}
            shared = bool(new.gateway.peers)
            for vip in new.vips:
                previous = old_vips.get(vip.name)
                if previous is not None and previous.protocol == vip.protocol:
                    self.balancer.pool(vip.name).reconfigure(member_specs(vip),
                                                             **pool_settings(vip, shared))
                    self.handlers[vip.name].reconfigure(vip)
                else:
                    self.balancer.pools[vip.name] = build_pool(vip, shared)
                    self.handlers[vip.name] = self._handler(vip)
            for name in set(old_vips) - {vip.name for vip in new.vips}:
                self.balancer.pools.pop(name, None)
                self.handlers.pop(name, None)
            self.config = replace(new, gateway=replace(new.gateway,
                                                       admin=self.config.gateway.admin))
            self._set_limits()
            if self._services is not None:
                await self._start_monitor(monitor)  # new members' first round before traffic
            self._listening.update(opened)
            for key in set(self._listening) - set(wanted):
                self._serving.pop(key).cancel()  # closes the listener, not live connections
                del self._listening[key]
            if self._services is not None:
                for key in opened:
                    self._start_listener(key)
            self._update_bound()
            self.reloads += 1
            self.config_digests = config_digests(self.config)
            for warning in new.warnings:
                log.warning("config: %s", warning)
            log.info("reloaded %s: %s", new.source, "; ".join(
                f"vip {vip.name} ({len(vip.members)} members: "
                f"{', '.join(self._member_line(vip))})" for vip in new.vips))
