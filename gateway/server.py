"""Runs a whole config: one listener nursery, one handler nursery, the health monitor.

Shutdown (`stop()`, SIGTERM): listeners close at once, live connections get `drain_timeout` to
finish, then are cancelled. The handler nursery is separate from the listeners' so that draining
is just moving its deadline (as hypercorn does).
"""

from __future__ import annotations

import errno
import logging
import resource
from dataclasses import dataclass

import trio

from gateway.balancer import Balancer, MemberSpec, Pool
from gateway.config import Address, Config, ConfigError, VipConfig
from gateway.relay import tune_socket
from gateway.vips.dicom import DicomVip
from gateway.vips.hl7 import HL7Vip
from gateway.vips.tcp import TcpVip
from gateway.vips.xds import XdsVip
from health.checks import CHECKS
from health.monitor import Monitor

log = logging.getLogger("medgate")

HANDLERS = {"dicom": DicomVip, "hl7": HL7Vip, "tcp": TcpVip, "xds": XdsVip}


class StartupError(Exception):
    """The gateway could not start (a port in use, no permission); the message says which VIP."""


@dataclass(frozen=True)
class BoundVip:
    name: str
    addresses: tuple[Address, ...]


def build_pool(vip: VipConfig) -> Pool:
    """The balancer pool for one VIP, from its config."""
    persistence = vip.persistence
    return Pool.from_specs(
        vip.name,
        [MemberSpec(m.name, m.weight, m.max_connections) for m in vip.members],
        mode=vip.mode,
        algorithm=vip.algorithm,
        persistence_method=persistence.method if persistence else None,
        persistence_timeout=persistence.timeout if persistence else 3600.0,
        rise=vip.health.rise,
        fall=vip.health.fall,
        error_limit=vip.error_limit,
    )


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


def raise_fd_limit() -> None:
    """A proxy holds two sockets per client: lift the soft open-files limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.debug("open files limit raised from %d to %d", soft, hard)


class Gateway:
    """Every VIP of a config, its pools and its monitor."""

    def __init__(self, config: Config) -> None:
        ensure_servable(config)
        self.config = config
        self.balancer = Balancer([build_pool(vip) for vip in config.vips])
        self.monitor = Monitor(self.balancer, config.vips)
        self.bound: dict[str, BoundVip] = {}
        self._listeners: dict[str, list[trio.SocketListener]] = {}
        self._stop = trio.Event()

    def stop(self) -> None:
        """Stop accepting; live connections get drain_timeout to finish."""
        self._stop.set()

    async def _bind(self, vip: VipConfig) -> list[trio.SocketListener]:
        listeners: list[trio.SocketListener] = []
        for address in vip.listen:
            try:
                opened = await trio.open_tcp_listeners(address.port, host=address.host,
                                                       backlog=1024)
                for listener in opened:
                    tune_socket(listener.socket)  # accepted sockets inherit it
                listeners += opened
            except OSError as exc:
                for listener in listeners:
                    await listener.aclose()
                hint = " (ports below 1024 need root or CAP_NET_BIND_SERVICE)" if (
                    exc.errno == errno.EACCES) else ""
                raise StartupError(f"vip {vip.name!r}: cannot listen on {address}: "
                                   f"{exc.strerror or exc}{hint}") from None
        return listeners

    async def bind(self) -> None:
        """Open every VIP's listening sockets; StartupError names the VIP and address that failed."""
        if self._listeners:
            return
        raise_fd_limit()
        try:
            for vip in self.config.vips:
                self._listeners[vip.name] = await self._bind(vip)
        except StartupError:
            for listeners in self._listeners.values():
                for listener in listeners:
                    await listener.aclose()
            self._listeners.clear()
            raise
        for vip in self.config.vips:
            addresses = tuple(Address(*l.socket.getsockname()[:2])
                              for l in self._listeners[vip.name])
            self.bound[vip.name] = BoundVip(vip.name, addresses)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Bind, run the first health round, serve until stop(); `started` gets `self`."""
        await self.bind()
        bound = [(vip, self._listeners[vip.name]) for vip in self.config.vips]
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as services:
                # No traffic before every member has had its first check: a member whose first
                # check fails must never see a client.
                await services.start(self.monitor.run)
                for vip, listeners in bound:
                    handler = HANDLERS[vip.protocol](vip, self.balancer.pool(vip.name))
                    services.start_soon(self._serve, vip, listeners, handler.handle, connections)
                    log.info("vip=%s protocol=%s listening on %s, members: %s", vip.name,
                             vip.protocol, ", ".join(map(str, self.bound[vip.name].addresses)),
                             ", ".join(self._member_line(vip)))
                task_status.started(self)
                await self._stop.wait()
                services.cancel_scope.cancel()
            live = len(connections.child_tasks)
            log.info("stopped accepting; %d live connection(s), waiting up to %gs for them",
                     live, self.config.gateway.drain_timeout)
            connections.cancel_scope.deadline = (trio.current_time()
                                                 + self.config.gateway.drain_timeout)
        if connections.cancel_scope.cancelled_caught:
            log.warning("drain timeout: remaining connections were closed")
        log.info("gateway stopped")

    def _member_line(self, vip: VipConfig) -> list[str]:
        pool = self.balancer.pool(vip.name)
        return [f"{m.name}={m.address} ({pool.member(m.name).state})" for m in vip.members]

    @staticmethod
    async def _serve(vip: VipConfig, listeners, handler, connections: trio.Nursery) -> None:
        async def guarded(stream: trio.SocketStream) -> None:
            # A bug met by one connection must cost that connection, never the whole gateway.
            try:
                await handler(stream)
            except Exception:
                log.exception("vip=%s: unexpected error, connection closed", vip.name)

        await trio.serve_listeners(guarded, listeners, handler_nursery=connections)
