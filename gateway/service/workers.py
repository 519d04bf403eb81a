"""The leader of `[gateway] workers = N` worker processes (N > 1).

The leader binds every listening socket and keeps what must exist once: the health checks (a
PACS sees one C-ECHO per interval whatever N is), the admin server, the peers of a pair, the
ATNA sender, reload, and the kept state (affinity.json, the inventory). It relays nothing: N
workers (gateway.service.worker) accept on the same inherited sockets and relay.

Why one inherited socket per address rather than one SO_REUSEPORT socket per worker: with
SO_REUSEPORT the kernel gives each socket its own accept queue, and the connections waiting
in a worker's queue die with it (unless net.ipv4.tcp_migrate_req is set, which a site may
not control). With one socket, a queue that every worker accepts from, a worker that dies
loses no connection that was still waiting.

Both ways over one Unix socket per worker (protocols.control frames):
- leader -> worker: `hello` (the config text the leader validated, the listeners' descriptors,
  the shared client counts, the persistence, delivery and workflow (MPPS, storage commitment)
  entries, the members' state), then
  `state` whenever a member's health, admin state, weight or the failover choice changes
  (looked at STATE_EVERY after a check or a worker's report, at least every STATE_FALLBACK;
  at once, and acknowledged, after an admin change), `entries`: other workers' new
  persistence, delivery and workflow entries, and `reopen-logs` (acknowledged: logrotate
  moved the audit log, which each worker writes its units' records to).
- worker -> leader: `ready`; `report` every REPORT_EVERY while there is something to say
  (passive signals in order, new persistence, delivery and workflow entries, failover switches,
  inventory records, security events for ATNA); `stats` every STATS_EVERY (counters). A
  worker with nothing new to say sleeps until something is queued, its counters every
  HEARTBEAT_EVERY its sign of life (gateway.service.worker.ReportPace).
An idle gateway so wakes about once a second in the leader, not 20 times, and once every few
seconds in a worker, not 11 times (each wake costs a process's caches: 0.4 ms on the 2-core
machine; bench/README.md, Workers).
A worker never waits on the leader while relaying: it picks with its own pool, which follows
the leader's state; the leader counts passive strikes over all workers and alone takes a
member down.
Nor does the leader wait on one worker to tell the others: what it has for a worker after
the hello goes into that worker's outbox, sent by its own courier task (a worker stopped or
swapped out would fill its socket, and everything for the others waited behind it).

A worker that exits is started again (logged, `medgate_worker_restarts_total`); its clients
reconnect as after any connection loss. Workers drain when the leader dies (its end of the
channel closes; PR_SET_PDEATHSIG too). A stop is a `stop` message to each, not a signal
(systemd signals every process of the unit: a worker would count two), HURRY its second
SIGTERM. A reload starts a new generation of workers with the new config; once each of them
is ready the old one stops accepting and drains, as at a stop. Until then the old one serves,
and is started again if one exits; a reload waits RELOAD_WAIT for its workers, then returns
(they take over once ready, or the next reload replaces them).

A worker imports medgate from disk (a new Python process): after an upgrade on disk it would
run other code than the leader's. It is given the digest of the leader's code
(gateway.service.code_identity) and exits with EXIT_OTHER_CODE when its own differs; a reload
that would start such workers is refused before anything changes.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from gateway.balancer import POOL_COUNTERS, AdminState, Balancer, Health, Pool, Signal
from gateway.net.relay import log_change
from gateway.net.limits import ClientTable
from gateway.net.shared_counts import MEMBER_SLOTS, VIP_SLOTS, SharedCounts
from gateway.config import Config, ConfigError
from gateway.recall import made_at, told
from gateway.records.atna import Actor, AtnaSender
from gateway.records.inventory import Inventory
from gateway.records.receipts import Receipts, worker_journal
from gateway.service.code_identity import code_digest
from gateway.service.listeners import ListenKey
from gateway.service.reload_plan import WORKER_AT_RESTART
from gateway.service.startup import StartupError
from gateway.service.control_link import ControlLink
from gateway.vips import VipHandler
from gateway.vips.dicom import DicomVip
from gateway.vips.shadow import add_counts
from gateway.vips.workflow import WorkflowAffinity
from protocols import atna
from protocols.control import ControlError, encode

log = logging.getLogger("medgate.workers")


class Leader(Protocol):
    """What the workers' leader is to them (gateway.service.server.Gateway)."""

    config: Config
    balancer: Balancer
    handlers: dict[str, VipHandler]
    clients: dict[str, ClientTable]  # by VIP name
    inventory: Inventory
    atna: AtnaSender | None
    receipts: Receipts | None

    @property
    def stopping(self) -> trio.Event: ...

    @property
    def listening(self) -> dict[ListenKey, list[trio.SocketListener]]: ...


STATE_EVERY = 0.05  # seconds: how soon a health change reaches workers (an admin change: at once)
STATE_FALLBACK = 1.0  # seconds: the state is looked at this often even when nothing told of news
SYNC_TIMEOUT = 2.0  # an admin change waits this long at most for every worker to apply it
REPORT_EVERY = 0.1  # seconds between a worker's reports (what it has to say)
STATS_EVERY = 1.0  # seconds between a worker's counters
HEARTBEAT_EVERY = 5.0  # seconds between the counters of a worker with nothing to report
SILENT_LIMIT = 15.0  # a worker that sends nothing this long (its counters come every second,
# every HEARTBEAT_EVERY when idle): killed, and started again (one that hangs while it starts, too)
LOOK_AGAIN = 1.0  # past SILENT_LIMIT, seconds of one more look for its messages before the kill
RESTART_BACKOFF_MAX = 30.0  # seconds between restarts of a worker that keeps exiting
SLOW_START = 30.0  # seconds a start or reload waits for its workers before it says so (again)
RELOAD_WAIT = 30.0  # seconds a reload waits for its new workers; they go on starting after it
STOP_GRACE = 5.0  # past drain_timeout, before a worker that does not exit is killed
ENTRIES = ("persistence", "deliveries", "workflow")  # what one worker's report passes on
# Entries per control message at most: what a starting worker is told it must keep (after
# its hello), what a worker reports (after a long wait on the leader); a site's tables (up
# to a million entries a VIP) would not fit one control frame
PART_ENTRIES = 20_000
STOP = encode({"type": "stop"})  # to a worker: drain and exit (a message: systemd signals it too)
# Bytes of the leader's messages a worker may leave untaken (its courier holds them): past
# it, the worker is stuck (stopped, or starved so long), and it is killed and started again
OUTBOX_BYTES = 32 * 1024 * 1024
HURRY = signal.SIGUSR1  # to a worker: close its live connections now
EXIT_OTHER_CODE = 4  # a worker's exit status: its medgate code on disk is not the leader's
OTHER_CODE = ("the medgate code on disk is not the code this gateway started with (upgraded or "
              "changed since): restart the gateway to run it")


def member_state(pool: Pool, now: float) -> dict[str, Any]:
    """What a worker's pool takes from the leader's (Pool.follow)."""
    return {"active": pool.active, "members": {
        m.name: [m.health.value, m.health_detail, m.admin.value, m.weight,
                 None if m.health is not Health.UP else max(now - m.up_since, 0.0),
                 m.floor_held] for m in pool.members}}


def follow_state(pool: Pool, state: dict[str, Any], now: float) -> None:
    """A worker's pool takes `state` (member_state of the leader's)."""
    for name, (health, detail, admin, weight, up_for, floor_held) in state["members"].items():
        pool.follow(name, Health(health), detail, AdminState(admin), int(weight),
                    now - up_for if up_for is not None else now, floor_held)
    if state.get("active") is not None:
        pool.adopt_active(state["active"], now)


def workflows(gateway: Leader) -> dict[str, WorkflowAffinity]:
    """The DICOM VIPs' workflow affinity (MPPS, storage commitment), by VIP name."""
    return {name: handler.workflow for name, handler in gateway.handlers.items()
            if isinstance(handler, DicomVip)}


def adopt_entries(pools: dict[str, Pool], kept: dict[str, WorkflowAffinity],
                  message: dict[str, Any], now: float, tell: bool = False) -> None:
    """Entries a worker made (persistence, HL7 deliveries, DICOM workflow), kept as if made
    here: each [key, member] (made now) or [key, member, age in seconds] (the leader's
    snapshot for a starting worker); `tell`: the leader's, which tells a pair's peers too."""
    for vip, entries in message.get("persistence", {}).items():
        if vip in pools:
            for key, member, *age in entries:
                pools[vip].adopt_persistence(key, member, made_at(now, age), tell=tell)
    for vip, entries in message.get("deliveries", {}).items():
        if vip in pools:
            for unit, member, *age in entries:
                pools[vip].adopt_delivery(as_unit(unit), member, made_at(now, age), tell=tell)
    for vip, entries in message.get("workflow", {}).items():
        if vip in kept:
            kept[vip].adopt(entries, now)


def entry_parts(entries: dict[str, Any], size: int = PART_ENTRIES) -> list[dict[str, Any]]:
    """`entries` as adopt_entries takes them (persistence and deliveries by VIP, workflow by
    VIP and table) cut into messages of at most `size` entries each, in order."""
    parts: list[dict[str, Any]] = []
    room = 0
    for kind in ENTRIES:
        for vip, held in entries.get(kind, {}).items():
            lists = held.items() if kind == "workflow" else [(None, held)]
            for table, items in lists:
                start = 0
                while start < len(items):
                    if not room:
                        parts.append({})
                        room = size
                    chunk = items[start:start + room]
                    by_vip = parts[-1].setdefault(kind, {})
                    if table is None:
                        by_vip[vip] = chunk
                    else:
                        by_vip.setdefault(vip, {})[table] = chunk
                    start += len(chunk)
                    room -= len(chunk)
    return parts


def report_messages(report: dict[str, Any]) -> list[dict[str, Any]]:
    """A worker's report as control messages: its entries in parts of at most PART_ENTRIES,
    the rest with the first part (none for an empty report)."""
    parts = entry_parts({kind: report[kind] for kind in ENTRIES if kind in report}) or [{}]
    first = {kind: value for kind, value in report.items() if kind not in ENTRIES}
    first.update(parts[0])
    return [{"type": "report", **part} for part in [first, *parts[1:]] if part]


def as_unit(value: Any) -> Any:
    """A unit identifier back from JSON (a list was a tuple)."""
    return tuple(as_unit(item) for item in value) if isinstance(value, list) else value


class NoFreeRow(OSError):
    """Every row of the shared counts is held: reloads came faster than the workers drain."""


@dataclass(eq=False)
class WorkerProcess:
    """One worker process: `number` (1..N) names it in logs and metrics; a restart keeps it."""

    number: int
    row: int  # its row of the shared client counts
    process: trio.Process
    link: ControlLink
    started_at: float = field(default_factory=time.time)
    ready: trio.Event = field(default_factory=trio.Event)
    draining: trio.Event = field(default_factory=trio.Event)  # its listeners are closed
    stats: dict[str, Any] = field(default_factory=dict)  # its last `stats`
    applied: int = 0  # the last `sync` state or `reopen_logs` it has applied
    error: str = ""  # why it could not apply that (its audit log not reopened)
    retiring: bool = False  # told to stop (a stop, a reload): not started again
    generation: int = 0  # the start (1) or reload (2, 3, ...) it was started for
    # Its hello is made: entries from now on are passed on to it too, not only once it is
    # ready (what the hello's snapshot missed would else never reach it)
    greeted: bool = False
    # What the leader has for it after its hello, in order, encoded: sent by its own courier
    # (`deliver`), so that a worker slow to read holds up no other, nor an admin change
    outbox: trio.MemorySendChannel[bytes] = field(init=False)
    _posted: trio.MemoryReceiveChannel[bytes] = field(init=False)
    queued: int = 0  # bytes in the outbox

    def __post_init__(self) -> None:
        self.outbox, self._posted = trio.open_memory_channel[bytes](math.inf)

    def post(self, frame: bytes) -> int:
        """`frame` for the worker after those posted before it, never waiting; the bytes that
        wait to go (0 once the outbox is closed: the worker has been given up)."""
        try:
            self.outbox.send_nowait(frame)
        except trio.ClosedResourceError:
            return 0
        self.queued += len(frame)
        return self.queued

    async def deliver(self) -> None:
        """The courier: what is posted, in order, until the link has gone (what is posted
        after that is dropped)."""
        async for frame in self._posted:
            try:
                await self.link.send_frame(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.outbox.close()
                return
            self.queued -= len(frame)

    def signal(self, signum: int) -> None:
        if self.process.returncode is None:
            try:
                self.process.send_signal(signum)
            except ProcessLookupError:
                pass


class Workers:
    """Starts, feeds, listens to and restarts the workers of one gateway (see the module)."""

    def __init__(self, gateway: Leader) -> None:
        self.gateway = gateway
        self.count = gateway.config.gateway.workers
        self.check(gateway.config)
        self.code = code_digest()  # what each worker must run too
        # Rows for three generations: one serving, two draining after quick reloads
        self.counts = SharedCounts.create(3 * self.count)
        self.vip_slots: dict[str, int] = {}
        self.member_slots: dict[str, int] = {}  # "vip/member" with max_connections: its slot
        self.live: list[WorkerProcess] = []
        self._rows_starting: set[int] = set()  # taken by a worker whose process is starting
        self._gone = trio.Event()  # set (and replaced) when a worker has gone from `live`
        self.restarts = 0
        # Worker numbers with no process serving since one failed: (why, since: wall clock)
        self.down: dict[int, tuple[str, float]] = {}
        self.audit_lost = 0  # audit records the workers could not write (their sum)
        # Counters of workers that have gone, so the gateway's totals never go back
        self._retired = _no_stats()
        # (the worker they came from, or None: the leader's peers; the entries)
        self._pending_entries: list[tuple[WorkerProcess | None, dict[str, Any]]] = []
        self._entry_batches = 0  # entries adopted from workers or peers, batches ever
        # The kept entries a starting worker is told, as of (generation, _entry_batches): the
        # workers a start or reload starts at once share one snapshot (a million entries
        # take the leader seconds to gather)
        self._kept: tuple[tuple[int, int], list[dict[str, Any]]] | None = None
        self._nursery: trio.Nursery | None = None
        self._stopping = False
        self._last_state: list[Any] = []
        self._seq = 0  # of the last state pushed by `sync`
        self._applied = trio.Event()  # set (and replaced) when a worker has applied one
        self._readiness = trio.Event()  # set (and replaced) when a worker is ready, or draining
        self._news = trio.Event()  # set (and replaced) when the state may have changed
        self.generation = 0  # the newest: a reload starts the next
        self.serving = 0  # the one whose workers serve: the newest once all of them were ready

    @staticmethod
    def check(config: Config) -> None:
        """ConfigError for what workers cannot serve (at start and at each reload)."""
        if len(config.vips) > VIP_SLOTS:
            raise ConfigError(f"{config.source}: [gateway] workers: at most {VIP_SLOTS} VIPs "
                              f"with workers (this config has {len(config.vips)})")
        limited = len(limited_members(config))
        if limited > MEMBER_SLOTS:
            raise ConfigError(f"{config.source}: [gateway] workers: at most {MEMBER_SLOTS} "
                              f"members with max_connections with workers (this config has "
                              f"{limited})")

    def check_code(self) -> None:
        """StartupError if the code on disk is no longer this gateway's: a reload would start
        workers with it."""
        if code_digest() != self.code:
            raise StartupError(f"[gateway] workers: {OTHER_CODE}; a reload would start the "
                               f"new workers with it (the running ones keep serving)")

    # -- what the admin server shows

    def load(self) -> list[dict[str, Any]]:
        """Per worker: its number, pid, clients and units so far (the status page); after a
        reload, the earlier workers while they drain too."""
        clients = self.counts.total_by_row()
        return [{"worker": w.number, "pid": w.process.pid, "clients": clients[w.row],
                 "units": sum(p["pool"][0] for p in w.stats.get("pools", {}).values()),
                 "ready": w.ready.is_set(), "draining": w.retiring, "since": w.started_at}
                for w in sorted(self.live, key=lambda w: (w.retiring, w.number))]

    def not_serving(self) -> list[dict[str, Any]]:
        """The worker numbers with no process serving since one failed: why, and since when
        (an ISO time; the status page: a restart in progress shows until it is ready)."""
        return [{"worker": number, "why": why,
                 "since": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since))}
                for number, (why, since) in sorted(self.down.items())]

    # -- running

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Start the workers (returns through `task_status` once every one is ready), keep
        them, and at the gateway's stop let them drain and exit."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._send_state)
                await self._until_ready(self._start_generation())
                self.serving = self.generation
                task_status.started()
                await self.gateway.stopping.wait()
                self._stopping = True
                for worker in list(self.live):
                    worker.retiring = True
                    self._tell(worker, STOP)
                # Each drains within drain_timeout, then writes its last records: the leader's
                # own drain deadline does not cut that short (a second SIGTERM: `hurry`).
                with trio.CancelScope(shield=True) as waiting:
                    waiting.deadline = (trio.current_time()
                                        + self.gateway.config.gateway.drain_timeout + STOP_GRACE)
                    while self.live:
                        await self._gone.wait()
                nursery.cancel_scope.cancel()
        finally:
            for worker in self.live:
                worker.signal(signal.SIGKILL)
            self.counts.close()
            os.close(self.counts.fd)

    def hurry(self) -> None:
        """A second SIGTERM: the workers close their live connections now, as `gateway run`
        does (the first asked them to drain)."""
        for worker in self.live:
            worker.signal(HURRY)

    async def replace(self) -> list[int]:
        """A new generation with the config in force (after a reload); once each of its
        workers is ready, the earlier ones drain. Returns then, or after RELOAD_WAIT with the
        earlier workers serving on, the numbers of the new ones not ready yet: they go on
        starting (and take over once ready), and a later reload replaces them. (It waited
        for them for good: the reload's API call timed out, every later reload waited behind
        it, and an earlier worker that died meanwhile was not started again.)"""
        for worker in self.live:
            if worker.generation != self.serving and not worker.retiring:
                # An earlier reload's, not ready yet: this one replaces it
                worker.retiring = True
                self._tell(worker, STOP)
        log.info("reload: %d new worker(s) with the new config; the %d running drain once "
                 "they are ready", self.count, sum(not w.retiring for w in self.live))
        generation = self._start_generation()
        taken_over = trio.Event()
        nursery = self._nursery
        assert nursery is not None
        nursery.start_soon(self._take_over, generation, taken_over)
        with trio.move_on_after(RELOAD_WAIT):
            await taken_over.wait()
        return self.starting()

    def starting(self) -> list[int]:
        """The numbers of a reload's new workers not ready yet (none once they serve)."""
        if self.generation == self.serving:
            return []
        ready = {w.number for w in self.live if w.generation == self.generation
                 and w.ready.is_set() and not w.retiring}
        return [number for number in range(1, self.count + 1) if number not in ready]

    async def _take_over(self, generation: int, done: trio.Event) -> None:
        """Once each worker of `generation` is ready, the earlier ones drain; `done` once
        none of them accepts (a client after it gets the new config), or once a later reload
        or the stop has replaced it."""
        try:
            if not await self._until_ready(generation):
                return
            self.serving = generation
            old = [w for w in self.live if w.generation != generation and not w.retiring]
            for worker in old:
                worker.retiring = True
                self._tell(worker, STOP)
            with trio.move_on_after(STOP_GRACE):
                while any(not w.draining.is_set() for w in old if w in self.live):
                    await self._readiness.wait()
        finally:
            done.set()

    def _start_generation(self) -> int:
        """Start N workers of a new generation (one that fails is started again); its
        number."""
        self.generation += 1
        self._readiness.set()  # a wait for the one before ends (_until_ready)
        self._readiness = trio.Event()
        config = self.gateway.config
        self.vip_slots = assign_slots(self.vip_slots, {vip.name for vip in config.vips},
                                      VIP_SLOTS)
        self.member_slots = assign_slots(self.member_slots, limited_members(config),
                                         MEMBER_SLOTS)
        for name, table in self.gateway.clients.items():
            table.share(self.counts, self.vip_slots[name])  # the leader reads every row
        nursery = self._nursery
        assert nursery is not None
        for number in range(1, self.count + 1):
            nursery.start_soon(self._keep, number, self.generation)
        return self.generation

    async def _until_ready(self, generation: int) -> bool:
        """True once each worker of `generation` is ready; False if a later generation or
        the stop replaces it first. Says every SLOW_START what it waits for."""
        waited_since = trio.current_time()
        while self._ready_count(generation) < self.count:
            if self._stopping or generation != self.generation:
                return False
            with trio.move_on_after(SLOW_START) as waiting:
                await self._readiness.wait()
            if waiting.cancelled_caught:  # a start or reload that waits says for what
                reasons = "".join(f"; worker {number}: {why}"
                                  for number, (why, _) in sorted(self.down.items()))
                log.warning("%d of %d worker(s) ready after %ds%s; %s",
                            self._ready_count(generation), self.count,
                            trio.current_time() - waited_since, reasons,
                            "the earlier workers serve meanwhile" if generation > 1
                            else "the gateway is not ready until they are")
        self._kept = None  # not held for the leader's life: a restart gathers afresh
        return True

    def _ready_count(self, generation: int) -> int:
        return sum(w.ready.is_set() for w in self.live
                   if w.generation == generation and not w.retiring)

    def _kept_on(self, generation: int) -> bool:
        """Whether a worker of `generation` that exits is started again: while it is the
        newest (a reload's, starting) or the one serving (the earlier workers while a
        reload's start)."""
        return not self._stopping and generation in (self.generation, self.serving)

    def _free_row(self) -> int:
        used = {w.row for w in self.live} | self._rows_starting
        free = [row for row in range(self.counts.rows) if row not in used]
        if not free:  # reloads faster than the workers before drain
            raise NoFreeRow(f"{self.counts.rows} worker processes still run (earlier ones "
                            f"drain)")
        return free[0]

    async def _keep(self, number: int, generation: int) -> None:
        """Worker `number` of `generation`: started, listened to, and started again whenever
        it exits, until it is told to stop, or its generation neither serves nor is the
        newest (_kept_on)."""
        backoff = 0.5
        while self._kept_on(generation):
            lived = trio.current_time()
            try:
                worker = await self._spawn(number, generation)
            except NoFreeRow as exc:
                log.warning("worker %d waits for an earlier worker to end: %s", number, exc)
                await self._gone.wait()  # its row is free: at once, no backoff
                continue
            except OSError as exc:
                log.error("worker %d could not be started (%s): trying again in %gs", number,
                          exc, backoff)
                self._went_down(number, generation, f"could not be started: {exc}")
            else:
                if not worker.retiring and not self._kept_on(generation):
                    # A stop or reload came while it started: it was told nothing of it
                    # (not in `live` yet), and would serve the old config for good
                    worker.retiring = True
                    self._tell(worker, STOP)
                try:
                    async with trio.open_nursery() as courier:
                        courier.start_soon(worker.deliver)
                        await self._listen(worker)
                        courier.cancel_scope.cancel()
                finally:
                    with trio.CancelScope(shield=True):
                        await self._reap(worker)
                if worker.retiring or self._stopping:
                    log.info("worker %d (pid %d) has drained and exited (%s)", number,
                             worker.process.pid, _exit_words(worker.process.returncode))
                    return
                self.restarts += 1
                if worker.process.returncode == EXIT_OTHER_CODE:
                    log.error("worker %d (pid %d) could not start: %s; the other workers serve",
                              number, worker.process.pid, OTHER_CODE)
                    self._went_down(number, generation, OTHER_CODE)
                    # Tried again only after the longest backoff (it exited at once: the
                    # doubling below keeps it there): only the files put back would help
                    backoff = RESTART_BACKOFF_MAX
                else:
                    exited = _exit_words(worker.process.returncode)
                    log.error("worker %d (pid %d) exited (%s): starting it again; its clients "
                              "reconnect", number, worker.process.pid, exited)
                    self._went_down(number, generation, f"exited ({exited})")
            backoff = 0.5 if trio.current_time() - lived > RESTART_BACKOFF_MAX else min(
                backoff * 2, RESTART_BACKOFF_MAX)
            await trio.sleep(backoff)

    def _went_down(self, number: int, generation: int, why: str) -> None:
        """Worker `number` is not serving (until one of that number is ready); since when it
        first was not."""
        if 1 < generation != self.serving:
            why += " (a reload's new worker: the earlier one serves meanwhile)"
        self.down[number] = why, self.down.get(number, (why, time.time()))[1]

    async def _spawn(self, number: int, generation: int) -> WorkerProcess:
        gateway, pools = self.gateway, self.gateway.balancer.pools
        listening = {key: [listener.socket.fileno() for listener in opened]
                     for key, opened in gateway.listening.items()}
        # The row first: a process started when none was free was left waiting for its hello
        row = self._free_row()
        self._rows_starting.add(row)
        try:
            worker = await self._start_process(number, row, [
                fd for fds in listening.values() for fd in fds])
            worker.generation = generation  # in `live` since that returned: before any wait
        finally:
            self._rows_starting.discard(row)
        now = trio.current_time()
        kept = self._kept_entries(now)
        worker.greeted = True  # with the snapshot: what comes after it is passed on
        await self._greet(worker, {
            "type": "hello", "number": number, "workers": self.count, "row": row,
            "rows": self.counts.rows,
            "counts_fd": self.counts.fd, "config": gateway.config.text,
            "source": gateway.config.source,
            "listeners": [[owner, address.host, address.port, fds]
                          for (owner, address), fds in listening.items()],
            "vip_slots": self.vip_slots, "member_slots": self.member_slots,
            "log_level": logging.getLevelName(logging.getLogger().level).lower(),
            # what a reload does not change (its own config text may say otherwise)
            "at_restart": {key: getattr(gateway.config.gateway, key)
                           for key in WORKER_AT_RESTART},
            "state": {name: member_state(pool, now) for name, pool in pools.items()},
            "shadows": self._shadowing(), "parts": len(kept)})
        for part in kept:
            await self._greet(worker, {"type": "hello-entries", **part})
        log.info("worker %d started (pid %d)", number, worker.process.pid)
        return worker

    def _kept_entries(self, now: float) -> list[dict[str, Any]]:
        """What a starting worker must keep, in parts: the last snapshot while no entry has
        been adopted since, in this generation (a reload may have replaced pools)."""
        version = (self.generation, self._entry_batches)
        if self._kept is None or self._kept[0] != version:
            gateway, pools = self.gateway, self.gateway.balancer.pools
            self._kept = version, entry_parts({
                "persistence": {name: [told(*entry) for entry in pool.persistence_entries(now)]
                                for name, pool in pools.items()},
                "deliveries": {name: [told(*entry) for entry in pool.delivery_entries(now)]
                               for name, pool in pools.items()},
                "workflow": {name: workflow.entries(now)
                             for name, workflow in workflows(gateway).items()}})
        return self._kept[1]

    async def _start_process(self, number: int, row: int,
                             listeners: list[int]) -> WorkerProcess:
        """The process of worker `number` on counts row `row`, given the listening sockets
        and its end of a new control channel."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        environment = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        try:
            process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "gateway", "worker", "--control-fd",
                 str(theirs.fileno()), "--leader", str(os.getpid()), "--code", self.code],
                pass_fds=[theirs.fileno(), self.counts.fd, *listeners], env=environment,
                stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.counts.clear(row)
        worker = WorkerProcess(number, row, process, ControlLink(ours))
        self.live.append(worker)
        return worker

    async def _reap(self, worker: WorkerProcess) -> None:
        """After its channel ended: the process gone (killed if it lingers), its counters
        kept, its receipts taken back (beside its restart, which must not wait on SQLite)."""
        with trio.move_on_after(STOP_GRACE if not worker.retiring else
                                self.gateway.config.gateway.drain_timeout + STOP_GRACE):
            await worker.process.wait()
        if worker.process.returncode is None:
            worker.signal(signal.SIGKILL)
            await worker.process.wait()
        await worker.link.aclose()
        self.live.remove(worker)
        self._applied.set()  # an admin change waits for it no more (sync)
        self._applied = trio.Event()
        self._gone.set()  # a worker waiting for a row may start; a stop's wait looks again
        self._gone = trio.Event()
        self.counts.clear(worker.row)  # its clients have gone with it
        _add_stats(self._retired, worker.stats, gone=True)
        self._aggregate()
        nursery = self._nursery
        assert nursery is not None
        nursery.start_soon(self._take_back_receipts, worker)

    async def _take_back_receipts(self, worker: WorkerProcess) -> None:
        """The C-STORE receipts an exited worker journaled and had not written (it was
        killed, or crashed): into receipts.sqlite now, not at the gateway's next start."""
        receipts = self.gateway.receipts
        if receipts is not None:
            taken = await trio.to_thread.run_sync(
                receipts.take_back, worker_journal(worker.number, worker.process.pid))
            if taken:
                log.info("receipts: %d receipt(s) of worker %d (pid %d) taken back from its "
                         "journal", taken, worker.number, worker.process.pid)

    async def _greet(self, worker: WorkerProcess, message: dict[str, Any]) -> None:
        """Its hello, before anything its courier sends (a worker that does not read it
        holds up its own start only)."""
        try:
            await worker.link.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # it has gone: _keep starts it again

    def _tell(self, worker: WorkerProcess, frame: bytes) -> None:
        """An encoded message to `worker` through its courier; one that has left
        OUTBOX_BYTES untaken is killed (and started again, with a hello of the present)."""
        if worker.post(frame) > OUTBOX_BYTES:
            worker.outbox.close()
            log.error("worker %d (pid %d) has left %d bytes of the leader's messages untaken: "
                      "killed", worker.number, worker.process.pid, worker.queued)
            worker.signal(signal.SIGKILL)

    async def _listen(self, worker: WorkerProcess) -> None:
        """Its messages until it closes the channel; a worker silent for SILENT_LIMIT, or
        that breaks the protocol, is killed (and started again)."""
        while True:
            with trio.move_on_after(SILENT_LIMIT) as waited:
                if not await self._hear(worker):
                    return
            if not waited.cancelled_caught:
                continue
            # Nothing read for SILENT_LIMIT: after a stall of this process (stopped, paused)
            # the limit passes with the worker's messages waiting unread; a look first
            with trio.move_on_after(LOOK_AGAIN) as looked:
                if not await self._hear(worker):
                    return
            if looked.cancelled_caught:
                log.error("worker %d (pid %d) sent nothing for %gs: killed", worker.number,
                          worker.process.pid, SILENT_LIMIT)
                worker.signal(signal.SIGKILL)
                return

    async def _hear(self, worker: WorkerProcess) -> bool:
        """One message of `worker`, taken; False once its channel has ended, or it broke the
        protocol (then it is killed)."""
        message = None
        try:
            message = await worker.link.receive()
            if message is None:
                return False
            self._take(worker, message)
            return True
        except ControlError as exc:
            log.error("worker %d: %s: killed", worker.number, exc.reason)
        except (KeyError, ValueError, TypeError) as exc:  # a message of another shape
            log.error("worker %d sent a %r message the leader cannot read (%s: %s): killed",
                      worker.number, message.get("type") if message else "?",
                      type(exc).__name__, exc)
        worker.signal(signal.SIGKILL)
        return False

    def _take(self, worker: WorkerProcess, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind in ("ready", "draining"):
            (worker.ready if kind == "ready" else worker.draining).set()
            self._readiness.set()
            self._readiness = trio.Event()
            if kind == "ready":  # it had the state of its hello: what changed since goes too
                self._last_state = []
                self.news()
                if not worker.retiring:
                    self.down.pop(worker.number, None)
        elif kind == "applied":
            worker.applied = int(message["seq"])
            worker.error = str(message.get("error", ""))
            self._applied.set()
            self._applied = trio.Event()
        elif kind == "stats":
            worker.stats = message
            self._aggregate()
        elif kind == "report":
            self._apply_report(worker, message)
            self.news()

    # -- what workers report

    def _apply_report(self, worker: WorkerProcess, report: dict[str, Any]) -> None:
        gateway = self.gateway
        now = trio.current_time()
        pools = gateway.balancer.pools
        for vip, signals in report.get("signals", {}).items():
            pool = pools.get(vip)
            if pool is not None:
                for signal_ in signals:
                    _apply_signal(pool, signal_, now)
        adopt_entries(pools, workflows(gateway), report, now, tell=True)
        for vip, member in report.get("active", {}).items():
            if vip in pools:
                pools[vip].adopt_active(member, now)
        for vip, calling, address, called, contexts, accepted in report.get("inventory", []):
            gateway.inventory.record(vip, calling, address, called,
                                     [(a, tuple(t)) for a, t in contexts], accepted)
        if gateway.atna is not None:
            for kind, ok, (name, address), detail, subject in report.get("security", []):
                gateway.atna.security_alert(atna.Code(*kind), ok, Actor(name, address),
                                            detail, subject)
        entries: dict[str, Any] = {k: report[k] for k in ENTRIES if k in report}
        if entries:
            self._pending_entries.append((worker, entries))
            self._entry_batches += 1

    def _aggregate(self) -> None:
        """The leader's pools and client tables show the sums over all workers, live and gone
        (the status page, the metrics and the summaries read them as they are)."""
        total = _no_stats()
        _add_stats(total, self._retired)
        for worker in self.live:
            _add_stats(total, worker.stats)
        self.audit_lost = total["audit_lost"]
        for vip, pool in self.gateway.balancer.pools.items():
            numbers = total["pools"].get(vip)
            if numbers is not None:
                pool.show_counters(numbers)
            table = self.gateway.clients.get(vip)
            if table is not None:
                table.evicted = total["evicted"].get(vip, {})
        for vip, shadows in total["shadows"].items():
            handler = self.gateway.handlers.get(vip)
            for name, counts in shadows.items():
                if handler is not None and name in handler.shadows:
                    handler.shadows[name].show_counts(counts)

    # -- what workers are told

    def news(self) -> None:
        """The state may have changed (a check recorded, a worker's report, a peer's entries):
        the workers hear of it within STATE_EVERY."""
        self._news.set()

    async def _send_state(self) -> None:
        """The members' state to every worker when it changed, and other workers' entries:
        STATE_EVERY after news (what comes meanwhile goes along), at least every
        STATE_FALLBACK."""
        while True:
            with trio.move_on_after(STATE_FALLBACK):
                await self._news.wait()
                await trio.sleep(STATE_EVERY)  # what comes meanwhile goes along
            self._news = trio.Event()  # before looking: news from now on is looked at again
            self._push_state()
            self._pass_entries()

    def pass_on(self, entries: dict[str, Any]) -> None:
        """Entries from elsewhere (a pair's peer) for every worker, with the next state."""
        self._pending_entries.append((None, entries))
        self._entry_batches += 1
        self.news()

    def _pass_entries(self) -> None:
        """Each worker's new entries to every other worker (one starting too)."""
        entries, self._pending_entries = self._pending_entries, []
        greeted = [w for w in self.live if w.greeted]
        for source, message in entries:
            frame = encode({"type": "entries", **message})
            for worker in greeted:
                if source is not worker:
                    self._tell(worker, frame)

    def _ready(self) -> list[WorkerProcess]:
        return [w for w in self.live if w.ready.is_set()]

    def _push_state(self, seq: int = 0) -> None:
        """The state to every ready worker if it changed since the last push (`seq`: always,
        and each worker answers `applied` with it)."""
        now = trio.current_time()
        state = {name: member_state(pool, now)
                 for name, pool in self.gateway.balancer.pools.items()}
        shadowing = self._shadowing()
        compared = [*_without_ages(state), shadowing]
        if not seq and compared == self._last_state:
            return
        self._last_state = compared
        frame = encode({"type": "state", "pools": state, "shadows": shadowing, "seq": seq})
        for worker in self._ready():
            self._tell(worker, frame)

    def _shadowing(self) -> dict[str, dict[str, bool]]:
        """Whether each shadow member is copied to (`gateway ctl shadow`), by VIP."""
        return {vip: {name: shadow.on for name, shadow in handler.shadows.items()}
                for vip, handler in self.gateway.handlers.items() if handler.shadows}

    async def sync(self) -> bool:
        """The members' state to every worker now (after an admin change); True once each has
        applied it, False if one did not within SYNC_TIMEOUT (it follows at its next state)."""
        self._seq += 1
        seq = self._seq
        self._pass_entries()  # what the leader knows, before: in order on each channel
        self._push_state(seq)
        return not await self._unapplied(seq, self._ready())

    async def reopen_logs(self) -> list[tuple[str, str]]:
        """Every worker reopens the audit log by its name, as the leader does (each writes
        its units' records, draining ones too); (which worker, why) for each ready one that
        did not (a worker still starting opens the file when it begins to serve, and hears
        this after its hello anyway)."""
        self._seq += 1
        seq = self._seq
        frame = encode({"type": "reopen-logs", "seq": seq})
        asked = sorted((w for w in self.live if w.greeted), key=lambda w: (w.retiring, w.number))
        for worker in asked:
            self._tell(worker, frame)
        late = await self._unapplied(seq, [w for w in asked if w.ready.is_set()])
        return ([(_named(w), w.error) for w in asked if w.applied >= seq and w.error]
                + [(_named(w), f"did not reopen it within {SYNC_TIMEOUT:g}s") for w in late])

    async def _unapplied(self, seq: int, workers: list[WorkerProcess]) -> list[WorkerProcess]:
        """Those of `workers` still serving that have not applied message `seq` within
        SYNC_TIMEOUT (none once each has)."""
        with trio.move_on_after(SYNC_TIMEOUT):
            while any(w.applied < seq for w in workers if w in self.live):
                await self._applied.wait()
        return [w for w in workers if w.applied < seq and w in self.live]


def limited_members(config: Config) -> set[str]:
    """The members whose max_connections the workers count together, as "vip/member"."""
    return {f"{vip.name}/{member.name}" for vip in config.vips for member in vip.members
            if member.max_connections}


def assign_slots(held: dict[str, int], names: set[str], size: int) -> dict[str, int]:
    """Slots (0 to size - 1) for `names`: those in `held` keep theirs (workers of an earlier
    generation may still count there); those of names gone are given again only when no
    other slot is free."""
    if len(held.keys() | names) > size:
        held = {name: slot for name, slot in held.items() if name in names}
    else:
        held = dict(held)
    used = set(held.values())
    free = (slot for slot in range(size) if slot not in used)  # each given once: it moves on
    for name in sorted(names - held.keys()):
        held[name] = next(free)
    return held


def _without_ages(state: dict[str, Any]) -> list[tuple]:
    """A state snapshot as compared (an up member's age grows every moment)."""
    return [(vip, pool["active"], [(name, *values[:4], values[5])
                                   for name, values in pool["members"].items()])
            for vip, pool in sorted(state.items())]


def _no_stats() -> dict[str, Any]:
    return {"pools": {}, "evicted": {}, "audit_lost": 0, "shadows": {}}


def _add_stats(total: dict[str, Any], stats: dict[str, Any], gone: bool = False) -> None:
    """Add a worker's `stats` (counters) to `total`; `gone`: its live connections are not."""
    for vip, numbers in stats.get("pools", {}).items():
        kept = total["pools"].setdefault(vip, {"pool": [0] * len(POOL_COUNTERS),
                                               "members": {}})
        kept["pool"] = [a + b for a, b in zip(kept["pool"], numbers["pool"])]
        for name, values in numbers["members"].items():
            old = kept["members"].get(name, [0] * len(values))
            kept["members"][name] = [0 if gone and i == 0 else a + b
                                     for i, (a, b) in enumerate(zip(old, values))]
    for vip, reasons in stats.get("evicted", {}).items():
        kept = total["evicted"].setdefault(vip, {})
        for reason, count in reasons.items():
            kept[reason] = kept.get(reason, 0) + count
    total["audit_lost"] += stats.get("audit_lost", 0)
    for vip, shadows in stats.get("shadows", {}).items():
        for name, counts in shadows.items():
            add_counts(total["shadows"].setdefault(vip, {}).setdefault(name, {}), counts, gone)


def _apply_signal(pool: Pool, signal_: list[Any], now: float) -> None:
    """One passive signal from a worker, counted as if this process had seen it."""
    kind, name = Signal(signal_[0]), signal_[1]
    member = pool._named(name)
    if member is None:
        return
    if kind is Signal.FAILURE:
        log_change(pool, member, pool.report_failure(member, signal_[2], as_unit(signal_[3])))
    elif kind is Signal.UNWELL:
        log_change(pool, member, pool.report_status(
            member, True, signal_[2], now=now, source=signal_[4], unit=as_unit(signal_[3])))
    elif kind is Signal.SUCCESS:
        pool.report_success(member, relayed=False)
    elif kind is Signal.FINE:
        pool.report_status(member, False, "")
    else:
        pool.answered_well(member, now)


def _named(worker: WorkerProcess) -> str:
    return f"worker {worker.number}" + (" (draining)" if worker.retiring else "")


def _exit_words(returncode: int | None) -> str:
    if returncode is not None and returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"

