"""A worker process of `[gateway] workers = N` (see gateway.service.workers, the leader's
side): it accepts on the listening sockets it inherited and relays, with pools that follow
the leader's member state, and tells the leader what it saw.

Started by the leader as `python -m gateway worker --control-fd FD --leader PID --code DIGEST`
(the digest of the leader's code: a worker whose code on disk differs exits at once); not a
command for people.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from typing import Any

import trio

from gateway import exits
from gateway.balancer import Pool
from gateway.config import Address, Config, ConfigError, parse_config
from gateway.logs import LogFormat, setup_logging
from gateway.net.shared_counts import SharedCounts
from gateway.records.atna import Actor
from gateway.records.inventory import Inventory
from gateway.records.receipts import worker_journal
from gateway.service.code_identity import code_digest
from gateway.service.control_link import ControlLink
from gateway.service.listeners import ListenKey
from gateway.service.server import Gateway
from gateway.service.startup import StartupError
from gateway.service.workers import (EXIT_OTHER_CODE, HEARTBEAT_EVERY, OTHER_CODE, REPORT_EVERY,
                                     STATS_EVERY, adopt_entries, follow_state, report_messages,
                                     workflows)
from protocols import atna

log = logging.getLogger("medgate.worker")

PR_SET_PDEATHSIG = 1
LEADER_GONE = signal.SIGUSR2  # the parent-death signal (prctl)
HURRY = signal.SIGUSR1  # from the leader: close live connections now (a second SIGTERM to it)
FAIR_PAUSE = 0.002  # seconds a worker over its share of clients leaves the next accept to others
FAIR_PAUSES = 10  # at most, per client accepted: when the others do not take them, it does


def may_take_next(held: list[int], row: int, workers: int) -> bool:
    """Whether the worker of `row` may take the next client: while it holds at most one more
    than the average of `held` (clients by worker row). The worker holding the fewest always
    may: no client waits for a worker that will not take it. One more than the average, not
    the average: where clients come and go (short associations) a worker is often above the
    average for a moment, and pausing then cost a sixth of the association rate (bench/README,
    Workers); clients that stay end within one of their share (64 over 4 workers: 15 to 17)."""
    return held[row] * workers <= sum(held) + workers


async def take_turns(clients_by_row: Callable[[], list[int]], row: int, workers: int) -> None:
    """After a client is accepted: a worker above its share of the gateway's clients leaves
    the next ones to the others (FAIR_PAUSE at a time, FAIR_PAUSES at most; it takes them
    when the others do not). Every worker that waits on a shared socket is woken; one that
    is always first would take them all, and clients such as HL7 senders stay for hours."""
    for _ in range(FAIR_PAUSES):
        if may_take_next(clients_by_row(), row, workers):
            return
        await trio.sleep(FAIR_PAUSE)


class ReportPace:
    """When a worker tells the leader what it saw. Whatever a report carries wakes it as it
    is queued (`wake`: a pool's passive signals, persistence and delivery entries and
    failover switch, the workflow memory's entries, inventory records, ATNA events), as a
    client accepted and a unit's end (its counters) do: REPORT_EVERY later it reports, and
    again every REPORT_EVERY while news keeps coming, with its counters every STATS_EVERY.
    A look that finds nothing new since the one before sends the counters and sleeps until
    the next news, sending them every HEARTBEAT_EVERY as its sign of life (the leader kills
    a worker silent for SILENT_LIMIT). A worker with nothing to say, with clients or
    without, then wakes every few seconds, not 11 times a second; nothing queued waits
    longer than before."""

    def __init__(self) -> None:
        self._news = trio.Event()

    def wake(self) -> None:
        self._news.set()

    async def run(self, send_report: Callable[[], Awaitable[None]],
                  send_stats: Callable[[], Awaitable[None]]) -> None:
        reports = 0  # since the last counters
        while True:
            await trio.sleep(REPORT_EVERY)
            # replaced before the report is made: what is queued from now on wakes it again
            news, self._news = self._news.is_set(), trio.Event()
            await send_report()
            reports += 1
            if not news or reports * REPORT_EVERY >= STATS_EVERY - REPORT_EVERY / 2:
                reports = 0
                await send_stats()
            while not news:
                with trio.move_on_after(HEARTBEAT_EVERY):
                    await self._news.wait()
                    break
                await send_stats()


class _SecurityEvents:
    """A worker's ATNA security events: to the leader, whose sender delivers them."""

    def __init__(self, outbox: list[list[Any]], news: Callable[[], None]) -> None:
        self.outbox, self.news = outbox, news

    def security_alert(self, kind: atna.Code, ok: bool, actor: Actor, detail: str,
                       subject: str) -> None:
        self.outbox.append([[kind.code, kind.system, kind.meaning], ok,
                            [actor.name, actor.address], detail, subject])
        self.news()

    def user_authentication(self, ok: bool, actor: Actor, detail: str) -> None:
        pass  # the admin server is the leader's

    def application(self, started: bool) -> None:
        pass  # the leader's start and stop are the gateway's


class _InventoryRelay(Inventory):
    """A worker's inventory records go to the leader's inventory (kept in state_dir)."""

    def __init__(self, outbox: list[list[Any]], news: Callable[[], None]) -> None:
        super().__init__()
        self.outbox, self.news = outbox, news

    def record(self, vip: str, calling_ae: str, address: str, called_ae: str,
               contexts: list[tuple[str, tuple[str, ...]]], accepted: bool) -> None:
        self.outbox.append([vip, calling_ae, address, called_ae,
                            [[a, list(t)] for a, t in contexts], accepted])
        self.news()


class WorkerGateway(Gateway):
    """The gateway as a worker runs it: no checks, admin, peers or kept state of its own."""

    owns_upkeep = False
    _leader_side: trio.Nursery  # the leader's messages and the reports: through the drain

    def __init__(self, config: Config, hello: dict[str, Any], link: ControlLink) -> None:
        self.hello, self.link = hello, link
        self.number = int(hello["number"])
        self.worker_count = int(hello["workers"])
        self._security: list[list[Any]] = []
        self._inventory_records: list[list[Any]] = []
        self.pace = ReportPace()  # before the parts that queue for the leader are made
        super().__init__(config, serve_admin=False)
        self.row = int(hello["row"])
        self.counts = SharedCounts(int(hello["counts_fd"]), int(hello["rows"]), self.row)
        for pool in self.balancer.pools.values():
            pool.report_to_leader(self.pace.wake)
            share_member_counts(pool, self.counts, hello["member_slots"])
        self.workflows = workflows(self)
        for workflow in self.workflows.values():
            workflow.share(self.pace.wake)

    async def _accept_pace(self) -> None:
        """Tell the reporter, and take turns at the shared listening sockets (take_turns)."""
        self.pace.wake()  # its counters follow
        # The client just accepted is counted once its admission has begun: two checkpoints
        # let that task run first (trio runs each batch of ready tasks in random order).
        await trio.lowlevel.checkpoint()
        await trio.lowlevel.checkpoint()
        await take_turns(self.counts.total_by_row, self.row, self.worker_count)

    def _security_events(self):
        return _SecurityEvents(self._security, self.pace.wake)

    @staticmethod
    def _shares_entries(config: Config) -> bool:
        return True  # with the leader

    def _journal_name(self) -> str:
        return worker_journal(self.number, os.getpid())

    def _make_inventory(self, config: Config) -> Inventory:
        return _InventoryRelay(self._inventory_records, self.pace.wake)

    async def _open_listeners(self) -> dict[ListenKey, list[trio.SocketListener]]:
        opened: dict[ListenKey, list[trio.SocketListener]] = {}
        for owner, host, port, fds in self.hello["listeners"]:
            opened[(owner, Address(host, port))] = [
                trio.SocketListener(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))
                for fd in fds]
        slots = self.hello["vip_slots"]
        for name, table in self.admission.clients.items():
            table.share(self.counts, slots[name])
        return opened

    async def _serve_and_drain(self, task_status) -> None:
        """As the gateway's, with the leader's side (its messages, this worker's reports)
        kept through the drain, not only while accepting: a draining worker follows the
        members' state, applies an admin change, tells its units' signals and entries, and
        shows the leader it lives (one silent for SILENT_LIMIT is killed, its clients cut),
        until its last connection has ended; `_stopped` then sends the last of it."""
        async with trio.open_nursery() as leader_side:
            self._leader_side = leader_side
            await super()._serve_and_drain(task_status)
            leader_side.cancel_scope.cancel()

    async def _start_upkeep(self, services: trio.Nursery) -> None:
        """The leader's member state and kept entries, before the first client."""
        now = trio.current_time()
        for message in self.hello.pop("kept"):  # not held for the worker's life: adopted
            self._adopt(message, now)
        self._follow_state(self.hello["state"], self.hello["shadows"], now)
        self._leader_side.start_soon(self._follow)
        self._leader_side.start_soon(self.pace.run, self._send_report, self._send_stats)

    async def _follow(self) -> None:
        """The leader's messages, through the drain too; its end closing ends this worker
        (drain, as at SIGTERM)."""
        while True:
            message = await self.link.receive()
            if message is None:
                log.warning("the leader has gone: draining")
                self.stop()
                return
            if message["type"] == "stop":  # a stop or a reload of the gateway: drain
                self.stop()
                continue
            now = trio.current_time()
            if message["type"] == "state":
                self._follow_state(message["pools"], message.get("shadows", {}), now)
                if message.get("seq"):  # an admin change, which waits for every worker
                    await self.tell_leader({"type": "applied", "seq": message["seq"]})
            elif message["type"] == "entries":
                self._adopt(message, now)
            elif message["type"] == "reopen-logs":  # logrotate moved it; the leader logs it
                await self.tell_leader({"type": "applied", "seq": message["seq"],
                                        "error": self.audit.reopen()})

    def _follow_state(self, pools: dict[str, Any], shadowing: dict[str, dict[str, bool]],
                      now: float) -> None:
        """The leader's member state, by VIP, and whether to copy to each shadow member
        (`gateway ctl shadow`)."""
        for name, state in pools.items():
            if name in self.balancer.pools:
                follow_state(self.balancer.pools[name], state, now)
        for vip, flags in shadowing.items():
            handler = self.handlers.get(vip)
            for name, on in flags.items():
                if handler is not None and name in handler.shadows:
                    handler.shadows[name].on = on

    def _adopt(self, message: dict[str, Any], now: float) -> None:
        """Entries the other workers made, as if made here."""
        adopt_entries(self.balancer.pools, self.workflows, message, now)

    async def _send_report(self) -> None:
        """What this worker saw since the last report (ReportPace), if anything."""
        report: dict[str, Any] = {}
        for name, pool in self.balancer.pools.items():
            for part, entries in (("signals", pool.take_outbox()),
                                  ("persistence", pool.new_persistence()),
                                  ("deliveries", pool.new_deliveries())):
                if entries:
                    report.setdefault(part, {})[name] = [list(entry) for entry in entries]
            active = pool.new_active()
            if active is not None:
                report.setdefault("active", {})[name] = active
        for name, workflow in self.workflows.items():
            new = workflow.take_new()
            if new:
                report.setdefault("workflow", {})[name] = new
        for part, records in (("inventory", self._inventory_records),
                              ("security", self._security)):
            if records:
                report[part] = records[:]
                records.clear()  # the same list: its writer keeps it
        for message in report_messages(report):
            await self.tell_leader(message)

    async def _send_stats(self) -> None:
        await self.tell_leader({
            "type": "stats", "audit_lost": self.audit.lost,
            "pools": {name: pool.counters() for name, pool in self.balancer.pools.items()},
            "evicted": {name: dict(table.evicted)
                        for name, table in self.admission.clients.items() if table.evicted},
            "shadows": {vip: {name: shadow.counts() for name, shadow in handler.shadows.items()}
                        for vip, handler in self.handlers.items() if handler.shadows}})

    async def tell_leader(self, message: dict[str, Any]) -> None:
        """`message` to the leader; nothing if it has gone (`_follow` hears it, and this
        worker drains: its clients' units finish, whatever its reporter was doing)."""
        try:
            await self.link.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _accepting_stopped(self) -> None:
        """The leader hears it: after a reload, no client may reach the old config."""
        await self.tell_leader({"type": "draining"})

    async def _stopped(self) -> None:
        """Drained: the last report and counters, so the leader's totals miss nothing."""
        await self._send_report()
        await self._send_stats()


def share_member_counts(pool: Pool, counts: SharedCounts, slots: dict[str, int]) -> None:
    """Each member of `pool` with max_connections counts the other workers' connections
    to it, and publishes this one's, in its slot (`slots`: the leader's, by "vip/member"):
    the limit is the gateway's, not each worker's."""
    for member in pool.members:
        slot = slots.get(f"{pool.name}/{member.name}")
        if slot is not None and member.max_connections:
            pool.count_elsewhere(member.name, partial(counts.member_elsewhere, slot),
                                 partial(counts.publish_member, slot))


def as_the_leaders(config: Config, at_restart: dict[str, Any]) -> Config:
    """`config` with the [gateway] settings the leader started with where a reload does not
    change them (after one, the config text may say otherwise), and no ATNA sender (the
    leader's delivers this worker's security events)."""
    kept = {**at_restart, "log_format": LogFormat(at_restart["log_format"])}  # from JSON
    return replace(config, gateway=replace(config.gateway, atna=None, **kept))


def _die_with(leader: int) -> None:
    """LEADER_GONE when the leader dies. The kernel sends it when the *thread* that started
    this process ends, and trio starts processes from its worker threads, which end when idle:
    so the signal is only a hint, checked against the parent process (_stop_on_signals)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, LEADER_GONE)


async def kept_entries(link: ControlLink, parts: int) -> list[dict[str, Any]] | None:
    """What the leader sends after its hello: `parts` messages of the entries this worker
    must keep, and entries passed on meanwhile; None if it said stop (or went) first."""
    kept = []
    while parts:
        message = await link.receive()
        if message is None or message["type"] == "stop":
            return None
        if message["type"] in ("hello-entries", "entries"):
            kept.append(message)
            parts -= message["type"] == "hello-entries"
    return kept


async def _serve(link: ControlLink, leader: int) -> int | None:
    hello = await link.receive()
    if hello is None or hello.get("type") != "hello":
        log.error("no hello from the leader: exiting")
        return 1
    kept = await kept_entries(link, int(hello["parts"]))
    if kept is None:
        log.info("the leader stopped or went before this worker served: exiting")
        return 0
    hello["kept"] = kept
    try:
        config = parse_config(hello["config"], hello["source"])
    except ConfigError as exc:  # the leader validated this very text: not expected
        log.error("config error: %s", exc)
        return 1
    config = as_the_leaders(config, hello["at_restart"])
    setup_logging(hello["log_level"], config.gateway.log_format, f"worker={hello['number']} ")
    gateway = WorkerGateway(config, hello, link)
    await gateway.bind()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, HURRY,
                                   LEADER_GONE) as signals:
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as hard_stop:
                nursery.start_soon(_stop_on_signals, gateway, signals, hard_stop, leader)
                async with trio.open_nursery() as serving:
                    await serving.start(gateway.run)
                    await gateway.tell_leader({"type": "ready", "pid": os.getpid()})
            nursery.cancel_scope.cancel()
    return 0


async def _stop_on_signals(gateway: Gateway, signals, hard_stop: trio.CancelScope,
                           leader: int) -> None:
    """SIGTERM or SIGINT drains (as `gateway run`), as do the leader's `stop` and its death;
    a second one, or the leader's HURRY, closes live connections now. (Under systemd every
    process of the unit gets SIGTERM: the leader stops its workers with a message, not a
    signal, so that a worker does not count two.)"""
    signalled = False  # a SIGTERM or SIGINT came (the leader's `stop` does not count)
    async for signum in signals:
        if signum == LEADER_GONE:
            if os.getppid() == leader:
                continue  # a thread of the leader ended, not the leader
            log.warning("the leader (pid %d) has gone: draining", leader)
            gateway.stop()
            continue
        if signum == HURRY or signalled:
            hard_stop.cancel()
            return
        signalled = True
        gateway.stop()


def main(control_fd: int, leader: int, leaders_code: str) -> int:
    """The worker process's life; its exit status."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads are the leader's
    # The others are the signal receiver's while the worker serves; before (the leader's
    # `stop` message still reaches it) and after it (a signal pending when the receiver closes
    # must not kill a worker that has drained), they are ignored.
    for signum in (signal.SIGTERM, signal.SIGINT, HURRY, LEADER_GONE):
        signal.signal(signum, signal.SIG_IGN)
    _die_with(leader)
    setup_logging("info")
    code = code_digest()
    if code != leaders_code:  # not one message read: their shapes may differ
        log.error("worker (pid %d) not started: %s (this code %s, the gateway's %s)",
                  os.getpid(), OTHER_CODE, code, leaders_code)
        return EXIT_OTHER_CODE
    link_socket = socket.socket(fileno=control_fd)

    async def serve() -> int | None:
        return await _serve(ControlLink(link_socket), leader)

    try:
        status = exits.run(serve)
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 1
    except KeyboardInterrupt:
        return 0
    return status or 0

