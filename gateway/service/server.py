"""Runs a whole config: the Gateway wires its parts (admission, listeners, the balancer and
handlers, monitor, admin server, records) and runs the lifecycle: bind everything, first
health round, serve, drain, stop; it applies reloads that reload_plan works out.

Shutdown (`stop()`, SIGTERM): listeners close at once, live connections get `drain_timeout`
to finish, then are cancelled. The connections' nursery is separate from the services' (the
listeners, the monitor) so that draining is just moving its deadline (as hypercorn does).
"""

from __future__ import annotations

import enum
import logging
import sqlite3
import time
from dataclasses import replace
from functools import partial
from typing import Any, Awaitable, Callable, Coroutine, TypeVar

import trio

from gateway.balancer import Balancer, MemberSpec, Pool
from gateway.config import (Address, Config, ConfigError, Failback, VipConfig, file_digest,
                            load_config)
from gateway.net import channel, tls
from gateway.net.channel import Channel
from gateway.net.deadlines import Deadlines
from gateway.net.limits import AcceptTrouble, ClientTable
from gateway.privacy import HashKeyError, KeyedHash, key_path
from gateway.records.affinity import AffinityStore
from gateway.records.atna import Actor, AtnaSender
from gateway.records.audit import AuditLog
from gateway.records.inventory import Inventory
from gateway.records.receipts import JOURNAL, Receipts
from gateway.records.shadow import ShadowLog
from gateway.records.summary import SUMMARY_EVERY, TrafficSummary
from gateway.service.admin import AdminServer
from gateway.service.admission import Admission
from gateway.service.listeners import (RETURN, ListenKey, bind_address, bind_all,
                                       bound_addresses, close_all, vip_of, wanted_keys)
from gateway.service.peers import PeerSync, config_digests
from gateway.service.reload_plan import in_force, plan_reload
from gateway.service.startup import (StartupError, check_transparent, make_state_dir,
                                     raise_fd_limit)
from gateway.service.systemd import Notifier
from gateway.service.workers import Workers
from gateway.vips import Records, VipHandler
from gateway.vips.dicom import DicomVip
from gateway.vips.dicom_return import DicomReturnPath
from gateway.vips.hl7 import HL7Vip
from gateway.vips.tcp import TcpVip
from gateway.vips.xds import XdsVip
from health.checks import CHECKS
from health.monitor import Monitor

Part = TypeVar("Part")
log = logging.getLogger("medgate")

HANDLERS = {"dicom": DicomVip, "hl7": HL7Vip, "tcp": TcpVip, "xds": XdsVip}


INVENTORY_SAVE_EVERY = 30.0  # seconds (and at stop)
ATNA_FLUSH_TIMEOUT = 5.0  # at stop, to send and confirm what is spooled (the rest: next start)
TRAFFIC_SAMPLE_EVERY = 10.0  # seconds: with HISTORY points, the status page shows 5 minutes
DRAIN_SWEEP = 0.1  # seconds: while draining, how often clients idle between units are closed
# Past drain_timeout, the most a stop takes: the workers' grace, the receipts' last batch, the
# ATNA spool's last send, the state files; systemd is told drain_timeout + this at STOPPING=1
STOP_AFTER_DRAIN = 30.0
REMOVED = "its VIP was removed by a reload"
REPROTOCOLED = "a reload gave its VIP another protocol"


class Phase(enum.Enum):
    """Where the gateway is in its life, as /readyz and systemd hear it."""

    STARTING = "starting: listeners open, first health checks running"
    READY = "ready"
    DRAINING = "draining: no new clients, live ones finishing"


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


def build_pool(vip: VipConfig, shared: bool = False,
               key_hash: Callable[[str], str] | None = None) -> Pool:
    """The balancer pool for one VIP, from its config; `key_hash` hashes the table
    persistence keys it keeps and tells its peers."""
    return Pool.from_specs(vip.name, member_specs(vip), **pool_settings(vip, shared),
                           key_hash=key_hash)


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


class Gateway:
    """Every VIP of a config: its listeners, pools, handlers, monitor, admin server and reload."""

    def __init__(self, config: Config, *, serve_admin: bool = True) -> None:
        ensure_servable(config)
        self.config = config
        self.atna = AtnaSender(config.gateway.atna) if config.gateway.atna else None
        self.audit = AuditLog(config.gateway.audit, self._security_events())
        # Receipts and table persistence keep identifiers as keyed hashes (gateway.privacy):
        # the key is read, or made, at bind.
        self.hasher = KeyedHash()
        self.balancer = Balancer([build_pool(vip, self._shares_entries(config), self.hasher)
                                  for vip in config.vips])
        self.inventory = self._make_inventory(config)
        self.affinity = AffinityStore(config.gateway.state_dir)
        settings = config.gateway
        self.receipts = Receipts(settings.state_dir, settings.receipt_days,
                                 self.hasher if settings.receipt_hash_uids else None,
                                 self._journal_name()) if settings.state_dir else None
        self._services: trio.Nursery | None = None  # while serving (handlers' background)
        self.deadlines = Deadlines()  # every VIP's time limits on waits, one task for all
        self.shadow_log = ShadowLog(settings.state_dir, self.hasher)
        self._records = Records(self.inventory, self.receipts, self.shadow_log)
        self.handlers: dict[str, VipHandler] = {
            vip.name: self._handler(vip) for vip in config.vips}
        # DICOM VIPs' return paths (return_listen), by VIP name.
        self.returns: dict[str, DicomReturnPath] = {
            vip.name: self._return_path(vip) for vip in config.vips if vip.return_listen}
        self.admin = AdminServer(self) if serve_admin and config.gateway.admin else None
        self.admin_address: Address | None = None
        self.bound: dict[str, tuple[Address, ...]] = {}
        self.started_at = time.time()
        self.reloads = 0
        self.last_reload_error = ""
        # Listeners by listen_key(vip, configured address); each has its own serving scope.
        self._listening: dict[ListenKey, list[trio.SocketListener]] = {}
        self._serving: dict[ListenKey, trio.CancelScope] = {}
        self._admin_listeners: list[trio.SocketListener] = []
        self._monitor: Monitor | None = None
        self._connections: trio.Nursery | None = None
        # The client tables of VIPs a reload removed or gave another protocol, while clients
        # remain (closed when idle), each with the reason logged
        self._removed_clients: list[tuple[ClientTable, str]] = []
        self._reload_lock = trio.Lock()
        self._stop = trio.Event()
        self.config_digest = file_digest(config.source)
        self.open_files = 0
        self.admission = Admission(self.audit, tls.server_context(config.gateway.admin_tls)
                                   if config.gateway.admin_tls else None)
        # What the admin server shows of the admission (the same objects, kept across reloads).
        self.total = self.admission.total
        self.clients = self.admission.clients
        self.admin_clients = self.admission.admin_clients
        self.phase = Phase.STARTING
        self.notifier = Notifier()
        self.config_digests = config_digests(config)  # what a pair's peers compare
        self.peers = (PeerSync(config.gateway, self.balancer, lambda: self.config_digests)
                      if config.gateway.peers and self.owns_upkeep else None)
        # With [gateway] workers > 1, this process (the leader) relays nothing: its workers do.
        self.workers = (Workers(self) if config.gateway.workers > 1 and self.owns_upkeep
                        else None)

    @property
    def stopping(self) -> trio.Event:
        """Set by stop(): no new clients from then on."""
        return self._stop

    @property
    def listening(self) -> dict[ListenKey, list[trio.SocketListener]]:
        """The listening sockets, by key (a leader hands them to its workers)."""
        return self._listening

    # A worker's turn-taking with the others at accept (None: none to take turns with)
    _accept_pace: Callable[[], Awaitable[None]] | None = None

    # What a worker process (gateway.service.worker) does otherwise: the leader of workers
    # and a gateway without them own the checks, peers, admin, ATNA and kept state.
    owns_upkeep = True

    def _security_events(self):
        """Where the audit log's security events go (ATNA), if anywhere."""
        return self.atna

    @staticmethod
    def _shares_entries(config: Config) -> bool:
        """Whether the pools collect new persistence entries and deliveries to tell: to a
        pair's peers (and, in a worker, to the leader)."""
        return bool(config.gateway.peers)

    def _journal_name(self) -> str:
        return JOURNAL

    def _make_inventory(self, config: Config) -> Inventory:
        return Inventory(config.gateway.state_dir)

    def _load_hash_key(self) -> None:
        """The key of the identifiers kept as hashes: read, or made at the first start; a
        pair's peers compare its fingerprint. Nothing kept (no state_dir, no key file): a key
        for this process."""
        settings = self.config.gateway
        path = key_path(settings.state_dir, settings.hash_key_file)
        if path:
            try:
                self.hasher.load(path)
            except HashKeyError as exc:
                raise StartupError(f"[gateway] hash_key_file: {exc.reason}") from None
        self.config_digests = config_digests(self.config, self.hasher)

    def _handler(self, vip: VipConfig) -> VipHandler:
        handler = HANDLERS[vip.protocol](vip, self.balancer.pool(vip.name), self.audit,
                                         self._records)
        handler.background = self._services  # a reload's new VIP (None before serving)
        handler.deadlines = self.deadlines
        return handler

    def _return_path(self, vip: VipConfig) -> DicomReturnPath:
        return DicomReturnPath(vip, self.balancer.pool(vip.name), self.audit, self._records)

    def _reconfigure_return_path(self, vip: VipConfig) -> None:
        """After a reload: the VIP's return path made, reconfigured or gone, as it says."""
        if vip.return_listen is None:
            self.returns.pop(vip.name, None)
        elif vip.name in self.returns:
            self.returns[vip.name].reconfigure(vip)
        else:
            self.returns[vip.name] = self._return_path(vip)

    def stop(self) -> None:
        """Stop accepting; live connections get drain_timeout to finish."""
        self._stop.set()

    async def bind(self) -> None:
        """Open every VIP's and the admin's listening sockets, before serving anything."""
        if self._listening:
            return
        if self.owns_upkeep:  # a worker's leader has said it all, and checked
            for warning in self.config.warnings:
                log.warning("config: %s", warning)
            await check_transparent(self.config)
        self.open_files = raise_fd_limit()
        self.admission.set_limits(self.config, self.open_files)
        try:
            self.audit.open()
            if self.atna is not None:
                self.atna.open()
        except OSError as exc:
            raise StartupError(str(exc)) from None
        state_dir = self.config.gateway.state_dir
        if state_dir:
            make_state_dir(state_dir)
        self._load_hash_key()
        if state_dir:
            try:
                self.shadow_log.open()
                self._running(self.receipts).open()
            except (OSError, sqlite3.Error) as exc:
                raise StartupError(f"[gateway] state_dir {state_dir}: receipts: {exc}") from None
        if self.owns_upkeep:  # a worker's leader keeps them, and tells it its entries
            self.inventory.load()
            self.affinity.load(self.balancer, trio.current_time())
        self._listening = await self._open_listeners()
        if self.admin is not None:
            try:
                self._admin_listeners = await bind_address(
                    "[gateway] admin", self._running(self.config.gateway.admin))
            except StartupError:
                await close_all(self._listening)
                raise
            self.admin_address = Address(*self._admin_listeners[0].socket.getsockname()[:2])
        self.bound = bound_addresses(self.config, self._listening)

    async def _open_listeners(self) -> dict[ListenKey, list[trio.SocketListener]]:
        return await bind_all(list(wanted_keys(self.config).values()))

    # -- serving

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Bind, run the first health round, serve until stop(), drain; `started` gets `self`.
        The admin server answers from before the first checks to the end of the drain, so
        /readyz can say "starting" and "draining"."""
        await self.bind()
        # ATNA delivery outlives the rest, so that Application Stop goes out (and is
        # confirmed) on the connection that sent everything before it.
        async with trio.open_nursery() as audit_delivery:
            if self.atna is not None:
                await audit_delivery.start(self.atna.run)
            async with trio.open_nursery() as admin:
                if self.admin is not None:
                    admin.start_soon(self._accept_all, "[gateway] admin",
                                     self._admin_listeners,
                                     partial(self.admission.admit_admin, self.admin), admin)
                    log.info("admin: status page %s://%s/ (API /api/status, /metrics)",
                             "https" if self.admission.admin_tls else "http",
                             self.admin_address)
                await self._serve_and_drain(task_status)
                admin.cancel_scope.cancel()
            if self.owns_upkeep:
                self._log_summary()  # what the last interval saw
                self.inventory.save()
                if self.affinity.path is not None:  # no state_dir: nothing to copy
                    self.affinity.save(self.affinity.take(self.balancer, trio.current_time()))
            if self.receipts is not None:  # what the drain added after the last batch, too
                await self.receipts.flush()
                self.receipts.close()
            await self._stopped()
            if self.atna is not None:
                with trio.move_on_after(ATNA_FLUSH_TIMEOUT):  # else it waits in the spool
                    await self.atna.finish()
            audit_delivery.cancel_scope.cancel()
        self.audit.close()
        self.shadow_log.close()
        self.notifier.close()
        log.info("gateway stopped")

    async def _serve_and_drain(self, task_status) -> None:
        # The time limits' task outlives the connections: a draining one is bounded too
        async with trio.open_nursery() as limits:
            self.deadlines.bind(limits)
            await self._serve_connections(task_status)
            limits.cancel_scope.cancel()

    async def _serve_connections(self, task_status) -> None:
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as services:
                self._services, self._connections = services, connections
                for handler in self.handlers.values():
                    handler.background = services
                if self.receipts is not None:
                    await services.start(self.receipts.run)
                await self._start_upkeep(services)
                if self.workers is not None:
                    await connections.start(self.workers.run)
                else:
                    for key in list(self._listening):
                        self._start_listener(key)
                for vip in self.config.vips if self.owns_upkeep else ():  # the leader says it
                    log.info("vip=%s protocol=%s listening on %s, members: %s", vip.name,
                             vip.protocol, ", ".join(map(str, self.bound[vip.name])),
                             ", ".join(self._member_line(vip)))
                    if vip.return_listen is not None:
                        log.info("vip=%s return path listening on %s, destinations: %s",
                                 vip.name, ", ".join(map(str, self.bound[vip.name + RETURN])),
                                 ", ".join(f"{d.ae_title}={d.address}"
                                           for d in vip.destinations))
                self.audit.application(started=True)  # a worker's goes nowhere (_SecurityEvents)
                self.phase = Phase.READY
                self.notifier.notify(READY=1, STATUS=self._status_line())
                task_status.started(self)
                await self._stop.wait()
                self.phase = Phase.DRAINING
                # EXTEND_TIMEOUT_USEC: a drain_timeout longer than the unit's TimeoutStopSec
                # was cut by SIGKILL, associations in the middle of a study with it
                self.notifier.notify(STOPPING=1, STATUS="draining", EXTEND_TIMEOUT_USEC=int(
                    (self.config.gateway.drain_timeout + STOP_AFTER_DRAIN) * 1_000_000))
                services.cancel_scope.cancel()
            if self.workers is None:
                log.info("stopped accepting; %d live connection(s), waiting up to %gs for them",
                         len(connections.child_tasks), self.config.gateway.drain_timeout)
            else:  # its one task there is the workers' (their own lines count their clients)
                log.info("stopped accepting; %d worker(s) drain, each for up to %gs",
                         len(self.workers.live), self.config.gateway.drain_timeout)
            await self._accepting_stopped()
            connections.cancel_scope.deadline = (trio.current_time()
                                                 + self.config.gateway.drain_timeout)
            if self.workers is None:  # a leader's clients are its workers'
                connections.start_soon(self._close_idle_clients, connections)
        if connections.cancel_scope.cancelled_caught:
            log.warning("drain timeout: remaining connections were closed")

    async def _close_idle_clients(self, connections: trio.Nursery) -> None:
        """While draining: each client idle between units (an HL7 sender between messages,
        an XDS keep-alive, a modality yet to ask) is closed now, and each one busy with a
        unit once that unit is done; a unit in progress keeps up to drain_timeout. Senders
        keep their connections for days: without this, every stop and reload would wait
        the whole drain_timeout for them, then cut them."""
        while len(connections.child_tasks) > 1:  # a client's, besides this one
            for table in self.admission.clients.values():
                table.close_idle()
            self._close_removed_idle()
            await trio.sleep(DRAIN_SWEEP)

    async def _close_removed_vips_clients(self) -> None:
        """The clients of VIPs a reload removed or gave another protocol, each closed once it
        has nothing in progress (as at a drain): a sender that keeps its connection would else
        be served for days by a VIP, pool and members no longer configured, checked or shown."""
        while self._removed_clients:
            self._close_removed_idle()
            await trio.sleep(DRAIN_SWEEP)
            self._removed_clients = [(table, why) for table, why in self._removed_clients
                                     if table.slots]

    def _close_removed_idle(self) -> None:
        for table, why in self._removed_clients:
            table.close_idle(why)

    def _part_from_clients(self, vip: str, why: str) -> None:
        """The live clients of `vip`'s old handler, to be closed once idle (`why`)."""
        table = self.admission.clients.pop(vip, None)
        if table is not None and table.slots:
            self._removed_clients.append((table, why))

    async def _start_upkeep(self, services: trio.Nursery) -> None:
        """What keeps the members' state and the kept records: checks, peers, saves, the
        periodic summary; returns once traffic may start."""
        services.start_soon(self._save_state)
        self._summary, self._summary_since = TrafficSummary(), trio.current_time()
        services.start_soon(self._summarize)
        services.start_soon(self._sample_traffic)
        if self.notifier.watchdog_interval:
            services.start_soon(self._watchdog)
        # No traffic before every member has had its first check: a member whose first
        # check fails must never see a client; nor before the peers' admin state
        # (a member drained on the other node is drained here too).
        await self._start_monitor(self._new_monitor(self.config.vips))
        if self.peers is not None:
            await self.peers.pull()
            services.start_soon(self.peers.run)

    async def _accepting_stopped(self) -> None:
        """The listeners are closed; live connections drain."""

    async def _stopped(self) -> None:
        """Everything has drained: the last word (ATNA Application Stop)."""
        self.audit.application(started=False)

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
        now and then; the affinities, which can be large, are copied here and formatted and
        written in a worker thread."""
        while True:
            await trio.sleep(INVENTORY_SAVE_EVERY)
            self.inventory.save()
            if self.affinity.path is not None:
                await trio.to_thread.run_sync(
                    self.affinity.save, self.affinity.take(self.balancer, trio.current_time()))

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

    def _new_monitor(self, vips: tuple[VipConfig, ...]) -> Monitor:
        """The checks of `vips`; with workers, each check recorded is news for them."""
        return Monitor(self.balancer, vips, self._checked)

    def _checked(self) -> None:
        if self.workers is not None:
            self.workers.news()

    def _start_listener(self, key: ListenKey) -> None:
        scope = trio.CancelScope()
        self._serving[key] = scope
        self._running(self._services).start_soon(self._serve, scope, key, self._listening[key])

    async def _serve(self, scope: trio.CancelScope, key: ListenKey, listeners) -> None:
        with scope:
            await self._accept_all(f"listener {key[1]}", listeners,
                                   partial(self._admit, key))

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
                        if handlers is None and self._accept_pace is not None:
                            await self._accept_pace()
                finally:
                    acceptor.detach()

        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(accept_loop, listener)

    def _admit(self, key: ListenKey, stream: Channel) -> Coroutine[Any, Any, None]:
        """The connection's task: admission's coroutine itself, not one awaiting it (a
        frame less to pass through at every wake of every connection). The VIP and handler
        are looked up per connection: a reload swaps them under us."""
        vip = vip_of(self.config, key)
        handlers: dict = self.returns if key[0].endswith(RETURN) else self.handlers
        return self.admission.admit(vip, handlers.get(vip.name) if vip else None, stream)

    def _member_line(self, vip: VipConfig) -> list[str]:
        pool = self.balancer.pool(vip.name)
        return [f"{m.name}={m.address} ({pool.member(m.name).state})" for m in vip.members]

    # -- reload

    async def reopen_logs(self, user: str = "SIGHUP", client: str = "signal") -> str:
        """Reopen the audit log by its name (logrotate moved the old one), in every worker
        too; '' when done."""
        error = self.audit.reopen()
        if self.workers is not None:  # each process says why, once for those that agree
            failed: dict[str, list[str]] = {error: ["the leader"]} if error else {}
            for who, why in await self.workers.reopen_logs():
                failed.setdefault(why, []).append(who)
            error = "; ".join(f"{why} ({', '.join(who)})" for why, who in failed.items())
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
            if self.workers is not None:
                Workers.check(new)
                self.workers.check_code()
            if new.gateway.admin_ldap is not None and self.admission.admin_tls is None:
                raise ConfigError("[gateway] admin_ldap: the admin server speaks plain HTTP "
                                  "until a restart turns admin_tls on; directory passwords "
                                  "must not cross it: restart instead of reloading")
            await check_transparent(new)
            plan = plan_reload(self.config, new, self._listening,
                               self.admission.admin_tls is not None)
            for setting in plan.kept_for_restart:
                log.warning("reload: [gateway] %s changed; it takes effect at restart", setting)
            if new.gateway.admin_tls and "admin_tls" not in plan.kept_for_restart:
                self.admission.admin_tls = tls.server_context(new.gateway.admin_tls)  # new files
            monitor = self._new_monitor(new.vips)  # its TLS contexts may fail: first
            audit = None  # the new path of the audit log, open, if it moved
            if new.gateway.audit != self.audit.target:
                try:
                    audit = self.audit.opened_elsewhere(new.gateway.audit)
                except OSError as exc:
                    raise StartupError(str(exc)) from None
            try:
                opened = await bind_all(list(plan.to_bind))
            except StartupError:
                if audit is not None:
                    audit.close()
                raise
            if self._monitor is not None:
                # Before the pools change: a check still running for a member this reload
                # removes must not report on it.
                self._monitor.cancel_scope.cancel()
            shared = bool(self.config.gateway.peers)  # peers are at restart
            for vip in plan.reconfigured:
                self.balancer.pool(vip.name).reconfigure(member_specs(vip),
                                                         **pool_settings(vip, shared))
                self.handlers[vip.name].reconfigure(vip)
                self._reconfigure_return_path(vip)
            sweeping = bool(self._removed_clients)
            for vip in plan.replaced:
                self.balancer.pools[vip.name] = pool = build_pool(vip, shared, self.hasher)
                if self.peers is not None:
                    self.peers.watch(pool)
                self.handlers[vip.name] = self._handler(vip)
                self.returns.pop(vip.name, None)
                self._reconfigure_return_path(vip)
                self._part_from_clients(vip.name, REPROTOCOLED)  # new clients: a new table
            for name in plan.removed:
                self.balancer.pools.pop(name, None)
                self.handlers.pop(name, None)
                self.returns.pop(name, None)
                self._part_from_clients(name, REMOVED)
            if self._removed_clients and not sweeping and self._services is not None:
                self._services.start_soon(self._close_removed_vips_clients)
            self.config = replace(new, gateway=in_force(self.config.gateway, new.gateway))
            if audit is not None:
                log.info("reload: the audit log is now %s (was %s)", audit.target,
                         self.audit.target)
                self.audit.take_over(audit)
            self.admission.set_limits(self.config, self.open_files)
            if self._services is not None:
                await self._start_monitor(monitor)  # new members' first round before traffic
            self._listening.update(opened)
            for key in plan.to_close:
                serving = self._serving.pop(key, None)
                if serving is not None:
                    serving.cancel()  # closes the listener, not live connections
                else:  # a leader's: its workers' copies close with them
                    for listener in self._listening[key]:
                        await listener.aclose()
                del self._listening[key]
            if self._services is not None and self.workers is None:
                for key in opened:
                    self._start_listener(key)
            self.bound = bound_addresses(self.config, self._listening)
            self.reloads += 1
            self.config_digests = config_digests(self.config, self.hasher)
            for warning in new.warnings:
                log.warning("config: %s", warning)
            if self.workers is not None and self._services is not None:
                await self.workers.replace()  # a new generation, with the new config
            log.info("reloaded %s (%s): %s", new.source, plan.describe(), "; ".join(
                f"vip {vip.name} ({len(vip.members)} members: "
                f"{', '.join(self._member_line(vip))})" for vip in new.vips))
