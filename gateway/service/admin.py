"""The admin server: status page, JSON API, Prometheus metrics, run-time member changes.

GET /healthz     "alive" while the process answers (no token needed)
GET /readyz      200 "ready", or 503 "starting: ..." / "draining: ..." (no token needed)
GET /            status page (self-contained HTML, refreshes itself, fits a phone)
GET /api/status  the same as JSON
GET /metrics     Prometheus text format
POST /api/vips/{vip}/members/{member}  {"state": "drain"|"maint"|"ready"} or {"weight": N}
POST /api/vips/{vip}/failback  failover mode: new clients go to the first member again
POST /api/vips/{vip}/failover  a peer's active member ([gateway] peers)
POST /api/reload re-read the config file (as SIGHUP does); with workers, `workers_starting`
                names the new ones not ready yet (a reload waits 30 s for them at most)
POST /api/reopen-logs  reopen the audit log file (after logrotate moved it), in every worker
POST /api/persistence  a peer's new persistence and resend-affinity entries ([gateway] peers)

Who may do what (see docs/security.md "Security and limits"): every request must name the admin server in
its Host (an IP address, `localhost` or one of `[gateway] admin_hosts`: a DNS-rebinding page
cannot); a POST needs `Content-Type: application/json` and, if it has an Origin, this server's
(a cross-site form or fetch cannot), and, when admin users or a token are set, the token of an
`operate` user (Bearer, or Basic with the token as password). Off loopback, GETs need the token
of any user. Every change is an audit record naming the user and the client. Bodies are bounded,
every read has a timeout.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hmac
import ipaddress
import json
import logging
import platform
import time
import urllib.parse
from http import HTTPStatus
from typing import Protocol

import h11
import trio
from prometheus_client import CollectorRegistry, Info, ProcessCollector, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)

from gateway import __version__

from gateway.net import bounded_json, http, tls
from gateway.records.atna import Actor, AtnaSender
from gateway.records.audit import AuditLog
from gateway.records.inventory import Inventory
from gateway.service.pages import inventory_page, status_page
from gateway.balancer import CHECK_BUCKETS, AdminState, Balancer, Health, NoMemberAvailable
from gateway.config import (AdminRole, AdminUser, Address, Config, file_digest, is_ip,
                            is_loopback)
from gateway.net.limits import AdminSlot, AdminTable, ClientTable
from gateway.net.link import Link
from gateway.service.directory import Directory, LoginOutcome
from gateway.service.peers import PEER_HEADER, PeerSync, later, peer_stamp
from gateway.service.workers import SYNC_TIMEOUT, Workers
from gateway.vips import VipHandler
from gateway.vips.shadow import HL7Shadow

ANONYMOUS = AdminUser("anonymous", "", AdminRole.OPERATE)  # no token configured (loopback only)


class Gateway(Protocol):
    """What the admin server sees of the running gateway (gateway.service.server.Gateway)."""

    config: Config
    balancer: Balancer
    audit: AuditLog
    bound: dict[str, tuple[Address, ...]]
    clients: dict[str, ClientTable]  # by VIP name
    admin_clients: AdminTable  # this server's own connections
    inventory: Inventory
    admin_address: Address | None
    started_at: float
    reloads: int
    phase: enum.Enum  # STARTING, READY or DRAINING; its value says it in words
    peers: PeerSync | None  # the other nodes of a pair, when [gateway] peers is set
    config_digests: dict[str, str]  # a digest per VIP and member, for a pair's peers
    config_digest: str  # the running config file's digest (file_digest)
    last_reload_error: str
    atna: AtnaSender | None
    workers: Workers | None  # [gateway] workers > 1: the worker processes
    handlers: dict[str, VipHandler]  # by VIP name

    async def reload_from_file(self, user: str = ..., client: str = ...) -> str: ...

    async def reopen_logs(self, user: str = ..., client: str = ...) -> str: ...

log = logging.getLogger("medgate.admin")

MAX_BODY = 65536
READ_TIMEOUT = 10.0  # a connection's wait for its next request
REQUEST_TIMEOUT = 3.0  # a request's head and body, from its first byte
SEND_TIMEOUT = 10.0  # for a client to take a response: one that stops reading is closed
UNITS = {"dicom": "associations", "hl7": "messages", "xds": "requests", "tcp": "connections"}


def snapshot(gateway: Gateway) -> dict:
    """Everything the page, the API and `gateway ctl status` show, as plain data."""
    vips = []
    for vip in gateway.config.vips:
        pool = gateway.balancer.pool(vip.name)
        table = gateway.clients.get(vip.name)
        members = []
        for config in vip.members:
            member = pool.member(config.name)
            check = member.last_check
            members.append({
                "name": member.name, "address": str(config.address), "state": member.state,
                "health": member.health.value, "admin": member.admin.value,
                "weight": member.weight, "configured_weight": member.configured_weight,
                "max_connections": member.max_connections, "active": member.active,
                "total": member.total, "failed": member.failed,
                "bytes_in": member.bytes_in, "bytes_out": member.bytes_out,
                "health_detail": member.health_detail,
                "certificate_expires": None if member.certificate_expires is None else
                    tls.day(member.certificate_expires),
                "certificate_days_left": None if member.certificate_expires is None else
                    round((member.certificate_expires - time.time()) / 86400, 1),
                "last_check": None if check is None else {
                    "ok": check.ok, "detail": check.detail,
                    "latency_ms": round(check.latency * 1000, 2),
                    "age_s": round(trio.current_time() - check.at, 1)},
                "tls": config.tls is not None,
                "held_up": member.floor_held,  # min_up keeps it up against passive signals
                "admin_changed_at": member.admin_changed_at,
                "traffic": list(member.traffic),  # units per 10 s sample, oldest first
                "check_ms": [round(latency * 1000, 2) for latency in member.check_history],
            })
        vips.append({
            "name": vip.name, "protocol": vip.protocol, "mode": vip.mode,
            "listen": [str(a) for a in gateway.bound.get(vip.name, ())] or
                      [str(a) for a in vip.listen],
            "check": vip.health.check, "unit": UNITS[vip.protocol],
            "tls": None if vip.tls is None else {"verify_client": vip.tls.verify_client,
                                                 "min_version": vip.tls.min_version},
            "relayed": pool.relayed, "refused": pool.refused, "retried": pool.retried,
            "held_back": pool.held_back, "failover": _failover(pool, vip),
            "remembered": pool.remembered(),
            "shadows": [shadow.show() for shadow in shadows_of(gateway, vip.name).values()],
            "clients": table.in_use if table else 0,
            "max_clients": table.limit if table else None,
            "members_up": sum(m["state"] in ("up", "drain") for m in members),
            "members": members,
            "routes": [{"match": match, "members": list(names),
                        "members_up": [m["name"] for m in members
                                       if m["name"] in names and m["state"] in ("up", "drain")]}
                       for match, names in vip.route_table()],
        })
    return {"version": __version__, "config": gateway.config.source,
            "uptime_s": round(time.time() - gateway.started_at, 1),
            "reloads": gateway.reloads, "last_reload_error": gateway.last_reload_error,
            "peers": [{"address": str(link.address), "ok": link.ok, "detail": link.detail,
                       "drift": link.drift, "disagree": link.disagree,
                       "in_sync": bool(link.ok) and not link.drift and not link.disagree}
                      for link in (gateway.peers.links if gateway.peers else [])],
            "config_digests": gateway.config_digests,
            # [gateway] workers > 1: each worker process's load (the VIPs' figures are sums)
            "workers": gateway.workers.load() if gateway.workers else [],
            "worker_restarts": gateway.workers.restarts if gateway.workers else 0,
            "workers_down": gateway.workers.not_serving() if gateway.workers else [],
            "vips": vips}


def shadows_of(gateway: Gateway, vip: str) -> dict[str, HL7Shadow]:
    """The shadow members of a VIP, by name ({} for none)."""
    return getattr(gateway.handlers.get(vip), "shadows", {})


def _failover(pool, vip) -> dict | None:
    """Failover mode: which member takes the new clients, since when, and when an earlier one
    takes them back (wall-clock times, as ISO strings)."""
    if vip.mode != "failover":
        return None
    now, wall = trio.current_time(), time.time()

    def clock(at: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(wall - (now - at)))

    failback_at = pool.failback_at(now)
    return {"active": pool.active, "since": clock(pool.active_since) if pool.active else None,
            "standby_active": pool.standby_active(),
            "failback": "manual" if pool.failback_manual else "auto",
            "failback_at": clock(failback_at) if failback_at is not None else None}


class _Collector:
    """Reads the balancer at scrape time: no counters kept twice."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def collect(self):
        labels = ["vip", "member"]
        up = GaugeMetricFamily("medgate_member_up", "1 when the member takes new clients "
                               "(health up, admin ready)", labels=labels)
        healthy = GaugeMetricFamily("medgate_member_healthy", "1 when the member's health is up",
                                    labels=labels)
        active = GaugeMetricFamily("medgate_member_active", "live connections, associations or "
                                   "messages in flight", labels=labels)
        weight = GaugeMetricFamily("medgate_member_weight", "current weight", labels=labels)
        expiry = GaugeMetricFamily("medgate_member_certificate_expiry_seconds", "seconds until "
                                   "the member's TLS certificate expires (as its last check saw "
                                   "it; negative: expired)", labels=labels)
        total = CounterMetricFamily("medgate_member_routed", "units routed to the member",
                                    labels=labels)
        failed = CounterMetricFamily("medgate_member_failures", "live failures (refused, reset, "
                                     "timeout)", labels=labels)
        bytes_in = CounterMetricFamily("medgate_member_bytes_in", "bytes from clients to the "
                                       "member", labels=labels)
        bytes_out = CounterMetricFamily("medgate_member_bytes_out", "bytes from the member to "
                                        "clients", labels=labels)
        checks = HistogramMetricFamily("medgate_check_seconds", "health check latency",
                                       labels=labels)
        relayed = CounterMetricFamily("medgate_vip_relayed", "units a member took",
                                      labels=["vip", "unit"])
        refused = CounterMetricFamily("medgate_vip_refused", "units the gateway refused itself "
                                      "(RJ, NAK, 503)", labels=["vip", "unit"])
        retried = CounterMetricFamily("medgate_vip_retried", "units moved to another member after "
                                      "a failure", labels=["vip", "unit"])
        held_back = CounterMetricFamily("medgate_vip_held_back", "units refused rather than "
                                        "moved: their member (study affinity) is up",
                                        labels=["vip", "unit"])
        held_up = GaugeMetricFamily("medgate_member_held_up", "1 while min_up keeps the member "
                                    "up though passive signals would take it down",
                                    labels=labels)
        standby = GaugeMetricFamily("medgate_vip_standby_active", "failover mode: 1 while a "
                                    "later member than the first takes the new clients",
                                    labels=["vip"])
        clients = GaugeMetricFamily("medgate_vip_clients", "client connections held",
                                    labels=["vip"])
        max_clients = GaugeMetricFamily("medgate_vip_max_clients", "the VIP's max_clients",
                                        labels=["vip"])
        lost = CounterMetricFamily("medgate_audit_records_lost", "audit records that could "
                                   "not be written (a full disk): the traffic went on")
        lost.add_metric([], self.gateway.audit.lost + (self.gateway.workers.audit_lost
                                                       if self.gateway.workers else 0))
        admin_evicted = CounterMetricFamily("medgate_admin_evicted", "admin connections that "
                                            "sent no whole request, closed to make room")
        admin_evicted.add_metric([], self.gateway.admin_clients.evicted)
        evicted = CounterMetricFamily("medgate_vip_evicted", "clients closed to make room, by "
                                      "what they were doing: tls-handshake, first-unit, idle",
                                      labels=["vip", "reason"])
        for name, table in self.gateway.clients.items():
            clients.add_metric([name], table.in_use)
            max_clients.add_metric([name], table.limit)
            for reason, count in table.evicted.items():
                evicted.add_metric([name, reason], count)
        for vip in self.gateway.config.vips:
            pool = self.gateway.balancer.pool(vip.name)
            unit = UNITS[vip.protocol]
            relayed.add_metric([vip.name, unit], pool.relayed)
            refused.add_metric([vip.name, unit], pool.refused)
            retried.add_metric([vip.name, unit], pool.retried)
            held_back.add_metric([vip.name, unit], pool.held_back)
            if vip.mode == "failover":
                standby.add_metric([vip.name], 1 if pool.standby_active() else 0)
            for member in pool.members:
                key = [vip.name, member.name]
                held_up.add_metric(key, 1 if member.floor_held else 0)
                up.add_metric(key, 1 if member.accepts_new else 0)
                healthy.add_metric(key, 1 if member.health is Health.UP else 0)
                active.add_metric(key, member.active)
                weight.add_metric(key, member.weight)
                total.add_metric(key, member.total)
                failed.add_metric(key, member.failed)
                bytes_in.add_metric(key, member.bytes_in)
                bytes_out.add_metric(key, member.bytes_out)
                cumulative, buckets = 0, []
                for bound, count in zip((*CHECK_BUCKETS, float("inf")), member.check_latency):
                    cumulative += count
                    buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
                checks.add_metric(key, buckets, member.check_latency_sum)
                if member.certificate_expires is not None:
                    expiry.add_metric(key, member.certificate_expires - time.time())
        yield from (up, healthy, active, weight, total, failed, bytes_in, bytes_out, checks,
                    relayed, refused, retried, held_back, held_up, standby, clients,
                    max_clients, evicted, lost, admin_evicted, expiry)
        yield from self._service()

    def _service(self):
        """The gateway's own state: its config against the file, its peers, its ATNA spool."""
        gateway = self.gateway
        differs = GaugeMetricFamily("medgate_config_file_differs", "1 when the config file on "
                                    "disk is not the running config (edited and not reloaded, "
                                    "or its reload was refused)")
        differs.add_metric([], int(file_digest(gateway.config.source) != gateway.config_digest))
        refused = GaugeMetricFamily("medgate_config_reload_refused", "1 when the last reload "
                                    "was refused (the running config stays)")
        refused.add_metric([], int(bool(gateway.last_reload_error)))
        yield from (differs, refused)
        down = GaugeMetricFamily("medgate_workers_down", "worker processes ([gateway] workers) "
                                 "that should serve and do not, since one failed")
        down.add_metric([], len(gateway.workers.down) if gateway.workers else 0)
        yield down
        yield from _shadow_metrics(gateway)
        if gateway.workers is not None:
            yield from _worker_metrics(gateway.workers)
        if gateway.peers is not None:
            reachable = GaugeMetricFamily("medgate_peer_reachable", "1 when the peer answered "
                                          "the last exchange", labels=["peer"])
            in_sync = GaugeMetricFamily("medgate_peer_in_sync", "1 when the peer is reachable, "
                                        "runs the same config and agrees on every member's "
                                        "admin state", labels=["peer"])
            drift = GaugeMetricFamily("medgate_peer_config_differences", "VIPs, members or "
                                      "keys whose config differs on the peer", labels=["peer"])
            for link in gateway.peers.links:
                peer = [str(link.address)]
                reachable.add_metric(peer, int(bool(link.ok)))
                in_sync.add_metric(peer, int(bool(link.ok) and not link.drift
                                             and not link.disagree))
                drift.add_metric(peer, len(link.drift))
            yield from (reachable, in_sync, drift)
        atna = gateway.atna
        if atna is not None:
            records = GaugeMetricFamily("medgate_atna_spool_records", "ATNA messages in the "
                                        "spool not yet confirmed by the repository")
            records.add_metric([], atna.spooled)
            size = GaugeMetricFamily("medgate_atna_spool_bytes", "bytes of those messages")
            size.add_metric([], atna.spool_bytes())
            limit = GaugeMetricFamily("medgate_atna_spool_max_bytes", "the spool's limit "
                                      "(spool_max): past it new messages are dropped")
            limit.add_metric([], atna.settings.spool_max)
            sent = CounterMetricFamily("medgate_atna_sent", "ATNA messages the repository "
                                       "confirmed (a message sent again counts again)")
            sent.add_metric([], atna.sent)
            dropped = CounterMetricFamily("medgate_atna_dropped", "ATNA messages dropped: "
                                          "the spool was full or could not be written")
            dropped.add_metric([], atna.dropped)
            unreachable = CounterMetricFamily("medgate_atna_connect_failures", "connections "
                                              "to the audit record repository that failed")
            unreachable.add_metric([], atna.unreachable)
            yield from (records, size, limit, sent, dropped, unreachable)


def _shadow_metrics(gateway: Gateway):
    """Shadow members: what was copied and compared, and every difference by kind."""
    labels = ["vip", "shadow"]
    units = CounterMetricFamily("medgate_shadow_units", "units the shadow answered, compared "
                                "with the member's answer", labels=labels)
    differences = CounterMetricFamily("medgate_shadow_differences", "units whose shadow "
                                      "answer differed, by what differed",
                                      labels=[*labels, "kind"])
    not_compared = CounterMetricFamily("medgate_shadow_not_compared", "units copied that the "
                                       "shadow did not answer", labels=labels)
    dropped = CounterMetricFamily("medgate_shadow_dropped", "units not copied: the shadow's "
                                  "queue was full", labels=labels)
    on = GaugeMetricFamily("medgate_shadow_on", "1 while units are copied to the shadow",
                           labels=labels)
    for vip in gateway.config.vips:
        for shadow in shadows_of(gateway, vip.name).values():
            key = [vip.name, shadow.name]
            units.add_metric(key, shadow.copied)
            not_compared.add_metric(key, shadow.not_compared)
            dropped.add_metric(key, shadow.dropped)
            on.add_metric(key, int(shadow.on))
            for kind, count in shadow.differences.items():
                differences.add_metric([*key, kind], count)
    yield from (units, differences, not_compared, dropped, on)


def _worker_metrics(workers: Workers):
    """[gateway] workers > 1: each worker's load, and how often one had to be started again."""
    restarts = CounterMetricFamily("medgate_worker_restarts", "worker processes that exited "
                                   "and were started again")
    restarts.add_metric([], workers.restarts)
    clients = GaugeMetricFamily("medgate_worker_clients", "client connections a worker holds",
                                labels=["worker"])
    units = CounterMetricFamily("medgate_worker_units", "units a worker process has relayed "
                                "since it started", labels=["worker"])
    for load in workers.load():
        clients.add_metric([str(load["worker"])], load["clients"])
        units.add_metric([str(load["worker"])], load["units"])
    yield from (restarts, clients, units)


class AdminServer:
    """Serves the admin endpoints of one gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(gateway))
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, open fds, memory
        Info("medgate_build", "the running medgate", registry=self.registry).info(
            {"version": __version__, "python": platform.python_version()})
        self.directory: Directory | None = None  # admin_ldap's, made at its first use

    async def handle(self, stream: Link, client: str,
                     slot: AdminSlot | None = None) -> None:
        """Answer the requests of one connection from `client` ('host:port', for the audit).
        A request must be whole within REQUEST_TIMEOUT of its first byte; a connection on a
        slot kept for the probes is answered /healthz and /readyz only."""
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
        try:
            while True:
                request, _ = await http.next_request(stream, connection,
                                                     idle_timeout=READ_TIMEOUT,
                                                     header_timeout=REQUEST_TIMEOUT)
                if not isinstance(request, h11.Request):
                    return
                with trio.fail_after(REQUEST_TIMEOUT):
                    body = bytearray()
                    while isinstance(event := await http.next_event(stream, connection),
                                     h11.Data):
                        body += event.data
                        if len(body) > MAX_BODY:
                            await self._reply(stream, connection, 413, {"error": "body too big"})
                            return
                try:
                    if slot is not None and slot.probes_only and request.target.split(
                            b"?")[0] not in (b"/healthz", b"/readyz"):
                        status, content_type, payload = self._json(503, {
                            "error": "the admin server is full: only /healthz and /readyz "
                                     "are answered now"})
                    else:
                        status, content_type, payload = await self.route(request, bytes(body),
                                                                         client)
                except Exception as exc:  # a bug met by one request ends that request only
                    log.exception("admin: %s %s from %s failed", request.method.decode(),
                                  request.target.decode("latin-1")[:200], client)
                    status, content_type, payload = self._json(
                        500, {"error": f"internal error ({type(exc).__name__}), logged"})
                if not await self._send(stream, connection, status, content_type, payload):
                    return
                if slot is not None:
                    slot.proven = True  # it sent a whole request: not closed to make room
                if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                    return
                connection.start_next_cycle()
        except (trio.TooSlowError, http.SlowHead, http.PeerGone, h11.ProtocolError):
            return

    async def route(self, request: h11.Request, body: bytes,
                    client: str = "?") -> tuple[int, str, bytes]:
        method = request.method.decode()
        path = request.target.decode().split("?", 1)[0].rstrip("/") or "/"
        if not self._host_allowed(http.header(request.headers, b"host")):
            return self._json(403, {"error": "Host is not this admin server's address, "
                                             "localhost or one of [gateway] admin_hosts"})
        user, name, refused = await self._user(request)
        if user is None and refused:
            self.gateway.audit.login(False, Actor.at(name or "?", client),
                                     f"admin {method} {path}: {refused}")
        if method == "GET" and path in ("/healthz", "/readyz"):
            # For probes (container HEALTHCHECK, load balancers): no token, nothing revealed.
            if path == "/healthz":
                return 200, "text/plain; charset=utf-8", b"alive\n"
            phase = self.gateway.phase.value
            return (200 if phase == "ready" else 503, "text/plain; charset=utf-8",
                    f"{phase}\n".encode())
        if method == "GET":
            if user is None and self._needs_token_to_read():
                return self._json(401, {"error": "this admin server is not on loopback: "
                                                 "send a token (Bearer, or Basic as password)"})
            if path == "/":
                return 200, "text/html; charset=utf-8", status_page(snapshot(self.gateway)).encode()
            if path == "/api/status":
                return self._json(200, snapshot(self.gateway))
            if path == "/metrics":
                return (200, "text/plain; version=0.0.4; charset=utf-8",
                        generate_latest(self.registry))
            if path in ("/api/inventory", "/inventory"):
                query = urllib.parse.parse_qs(request.target.decode().partition("?")[2])
                senders = self.gateway.inventory.entries(query.get("vip", [None])[0])
                if path == "/inventory":
                    return 200, "text/html; charset=utf-8", inventory_page(senders).encode()
                return self._json(200, {"senders": senders})
        if method == "POST":
            refusal = self._post_refusal(request, user)
            if refusal is not None:
                return refusal
            if user is not None:
                self.gateway.audit.login(True, Actor.at(user.name, client),
                                         f"admin {method} {path}")
            user = user or ANONYMOUS
            parts = path.strip("/").split("/")
            from_peer = bool(http.header(request.headers, PEER_HEADER.lower().encode()))
            if len(parts) == 5 and parts[:2] == ["api", "vips"] and parts[3] == "members":
                return await self._applied(self._change_member(parts[2], parts[4], body, user,
                                                               client, from_peer))
            if len(parts) == 5 and parts[:2] == ["api", "vips"] and parts[3] == "shadows":
                return await self._applied(self._shadowing(parts[2], parts[4], body, user,
                                                           client))
            if len(parts) == 4 and parts[:2] == ["api", "vips"] and parts[3] == "failback":
                return await self._applied(self._fail_back(parts[2], user, client))
            if len(parts) == 4 and parts[:2] == ["api", "vips"] and parts[3] == "failover":
                return await self._applied(self._adopt_active(parts[2], body))
            if parts == ["api", "reload"]:
                error = await self.gateway.reload_from_file(user.name, client)
                if error:
                    return self._json(400, {"error": error})
                workers = self.gateway.workers
                return self._json(200, {"reloaded": self.gateway.config.source,
                                        "reloads": self.gateway.reloads,
                                        **({"workers_starting": workers.starting()}
                                           if workers is not None else {})})
            if parts == ["api", "persistence"]:
                return self._adopt_persistence(body)
            if parts == ["api", "reopen-logs"]:
                error = await self.gateway.reopen_logs(user.name, client)
                if error:
                    return self._json(500, {"error": error})
                audit = self.gateway.config.gateway.audit
                return self._json(200, {"reopened": audit if audit not in ("", "-") else ""})
        if path in ("/", "/api/status", "/metrics", "/api/inventory", "/inventory", "/healthz",
                    "/readyz"):
            return self._json(405, {"error": f"{method} is not allowed on {path}"})
        return self._json(404, {"error": f"no {method} {path} here"})

    async def _applied(self, answer: tuple[int, str, bytes]) -> tuple[int, str, bytes]:
        """`answer`, once every worker process has applied the change (with workers): a
        client sent after it sees the member drained, whichever worker takes it."""
        workers = self.gateway.workers
        if answer[0] == 200 and workers is not None and not await workers.sync():
            log.warning("admin: a worker did not apply the change within %gs; it follows at "
                        "its next state", SYNC_TIMEOUT)
        return answer

    # -- who is asking

    async def _user(self, request: h11.Request) -> tuple[AdminUser | None, str, str]:
        """Who the request signs in as: a token (Bearer, or Basic's password), else a
        directory user (Basic's name and password, with admin_ldap). (user, the name given,
        why it was refused: "" when it sent no credentials)."""
        scheme, _, credentials = http.header(request.headers, b"authorization").partition(" ")
        name, secret = "", credentials.strip()
        if scheme.lower() == "basic":
            try:
                name, _, secret = base64.b64decode(secret, validate=True).decode(
                    "utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None, "", "Basic credentials that are not base64 UTF-8"
        elif scheme.lower() != "bearer":
            return None, "", "wrong token" if scheme else ""
        found = None
        for user in self.gateway.config.gateway.admin_users:  # every one compared: no timing hint
            if hmac.compare_digest(user.token.encode(), secret.encode()) and secret:
                found = user
        if found is not None:
            return found, found.name, ""
        directory = self._directory()
        if directory is None or not name:
            return None, name, "wrong token"
        answer = await directory.login(name, secret)
        if answer.outcome is LoginOutcome.ACCEPTED and answer.role is not None:
            return AdminUser(name, "", answer.role), name, ""
        if answer.outcome is LoginOutcome.UNAVAILABLE:
            log.warning("admin: the directory (admin_ldap) could not be asked about %s: %s",
                        name, answer.detail)
        return None, name, f"LDAP {answer.outcome}: {answer.detail}"

    def _directory(self) -> Directory | None:
        """admin_ldap's logins, made again when a reload changes it."""
        settings = self.gateway.config.gateway.admin_ldap
        if settings is None:
            return None
        if self.directory is None or self.directory.settings != settings:
            self.directory = Directory(settings)
        return self.directory

    def _needs_token_to_read(self) -> bool:
        address = self.gateway.admin_address or self.gateway.config.gateway.admin
        return address is not None and not is_loopback(address.host)

    def _host_allowed(self, host_header: str) -> bool:
        """DNS rebinding defence: a name must be ours; an address literal cannot be rebound."""
        host = _host_part(host_header)
        bound = self.gateway.config.gateway.admin  # as configured: it may be a name
        if not host or bound is None:
            return False
        names = ("localhost", bound.host.lower(), *self.gateway.config.gateway.admin_hosts)
        if host in names:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        listening = ipaddress.ip_address(bound.host) if is_ip(bound.host) else None
        return listening is None or listening.is_unspecified or address == listening or (
            address.is_loopback and listening.is_loopback)

    def _post_refusal(self, request: h11.Request,
                      user: AdminUser | None) -> tuple[int, str, bytes] | None:
        """Why a state-changing request is refused (CSRF, token, role), or None."""
        settings = self.gateway.config.gateway
        if settings.admin_users or settings.admin_ldap is not None:
            if user is None:
                return self._json(401, {"error": "missing or wrong credentials (a token, or "
                                                 "with admin_ldap a directory user's name and "
                                                 "password)"})
            if user.role != "operate":
                return self._json(403, {"error": f"user {user.name!r} may only read"})
        media = http.header(request.headers, b"content-type").split(";")[0].strip().lower()
        if media != "application/json":
            return self._json(403, {"error": "changes need Content-Type: application/json"})
        origin = http.header(request.headers, b"origin")
        if origin and not self._same_origin(origin):
            return self._json(403, {"error": "the request's Origin is not this admin server"})
        return None

    def _same_origin(self, origin: str) -> bool:
        scheme, _, rest = origin.partition("://")
        bound = self.gateway.admin_address
        if scheme != "http" or bound is None or not self._host_allowed(rest):
            return False
        port = rest.rpartition(":")[2] if not rest.endswith("]") else ""
        return port.isdigit() and int(port) == bound.port

    # -- changes

    def _change_member(self, vip: str, name: str, body: bytes, user: AdminUser,
                       client: str, from_peer: bool = False) -> tuple[int, str, bytes]:
        """A member's admin state or weight; `from_peer`: pushed by another node of the pair
        (applied only when later than this node's last change, and not pushed on)."""
        try:
            pool = self.gateway.balancer.pool(vip)
            member = pool.member(name)
        except KeyError as exc:
            return self._json(404, {"error": exc.args[0]})
        before = {"state": member.admin.value, "weight": member.weight}
        try:  # the whole body is checked before anything is applied
            state, weight, stamp = self._member_change(bounded_json.loads(body or b"{}"),
                                                       from_peer)
        except (ValueError, TypeError) as exc:
            return self._json(400, {"error": str(exc)})
        if from_peer and not later(stamp, member):  # a peer's change: the later one wins
            return self._json(200, {"kept": "this node's change is later"})
        if state is not None:
            self.gateway.balancer.set_admin_state(vip, name, state, stamp)
        if weight is not None:
            self.gateway.balancer.set_weight(vip, name, weight, stamp)
        after = {"state": member.admin.value, "weight": member.weight}
        if self.gateway.peers is not None and not from_peer:
            self.gateway.peers.announce(vip, name, {**after, "stamp": stamp})
        log.warning("admin: user=%s client=%s vip=%s member=%s %s -> %s%s", user.name, client,
                    vip, name, _words(before), _words(after), " (from a peer)" if from_peer
                    else "")
        self.gateway.audit.record("admin", user=user.name, client=client, action="member",
                                  vip=vip, member=name, before=before, after=after)
        self.gateway.audit.configuration_changed(
            True, True, Actor.at(user.name, client),
            f"{vip}/{name}: {_words(before)} -> {_words(after)}", f"vip:{vip}/member:{name}")
        snapshot_member = next(m for v in snapshot(self.gateway)["vips"] if v["name"] == vip
                               for m in v["members"] if m["name"] == name)
        return self._json(200, snapshot_member)

    def _member_change(self, change, from_peer: bool) -> tuple[AdminState | None, int | None,
                                                                float]:
        """(state, weight, stamp) of a member change, every part checked; ValueError says
        what is wrong. A peer's stamp must be a time, at most peer_max_skew ahead of this
        node's clock (one from the future would win over every later change)."""
        if not isinstance(change, dict) or not change.keys() & {"state", "weight"}:
            raise ValueError('send {"state": "drain"|"maint"|"ready"} or {"weight": N}')
        state = AdminState(change["state"]) if "state" in change else None
        weight = change.get("weight")
        if weight is not None and (not isinstance(weight, int) or isinstance(weight, bool)
                                   or not 0 <= weight <= 1000):
            raise ValueError(f"weight {weight!r} is not a whole number from 0 to 1000")
        stamp = time.time()
        if from_peer:
            stamp = peer_stamp(change.get("stamp", 0.0), stamp,
                               self.gateway.config.gateway.peer_max_skew)
        return state, weight, stamp

    def _shadowing(self, vip: str, name: str, body: bytes, user: AdminUser,
                   client: str) -> tuple[int, str, bytes]:
        """Start or stop copying units to a shadow member: {"on": true|false}; audited."""
        shadow = shadows_of(self.gateway, vip).get(name)
        if shadow is None:
            return self._json(404, {"error": f"vip {vip!r} has no shadow member {name!r}"})
        try:
            change = bounded_json.loads(body or b"{}")
            on = change["on"]
            if not isinstance(on, bool):
                raise TypeError(f"{on!r} is not true or false")
        except (ValueError, KeyError, TypeError) as exc:
            return self._json(400, {"error": f'send {{"on": true}} or {{"on": false}}: {exc}'})
        before = "on" if shadow.on else "off"
        shadow.on = on
        after = "on" if on else "off"
        log.warning("admin: user=%s client=%s vip=%s shadow=%s shadowing %s -> %s", user.name,
                    client, vip, name, before, after)
        self.gateway.audit.record("admin", user=user.name, client=client, action="shadow",
                                  vip=vip, member=name, before={"shadowing": before},
                                  after={"shadowing": after})
        self.gateway.audit.configuration_changed(
            True, True, Actor.at(user.name, client), f"{vip}/{name}: shadowing {before} -> "
            f"{after}", f"vip:{vip}/member:{name}")
        return self._json(200, shadow.show())

    def _fail_back(self, vip: str, user: AdminUser, client: str) -> tuple[int, str, bytes]:
        """An operator's failback (failover mode): new clients go to the first member in order
        that takes them; clients within their study window stay where they are."""
        try:
            pool = self.gateway.balancer.pool(vip)
        except KeyError as exc:
            return self._json(404, {"error": exc.args[0]})
        if pool.mode != "failover":
            return self._json(400, {"error": f"vip {vip!r} is not in failover mode"})
        before = pool.active
        try:
            active = pool.fail_back(trio.current_time())
        except NoMemberAvailable as exc:
            return self._json(409, {"error": f"no failback: {exc.reason.value}"})
        log.warning("admin: user=%s client=%s vip=%s failback: %s takes the new clients (was "
                    "%s); calling AEs within their study window stay where they are",
                    user.name, client, vip, active, before or "none")
        self.gateway.audit.record("admin", user=user.name, client=client, action="failback",
                                  vip=vip, before={"active": before}, after={"active": active})
        self.gateway.audit.configuration_changed(
            True, True, Actor.at(user.name, client), f"{vip}: failback to {active}", f"vip:{vip}")
        return self._json(200, {"vip": vip, "active": active, "was": before})

    def _adopt_active(self, vip: str, body: bytes) -> tuple[int, str, bytes]:
        """A peer's active member (failover mode): {"active": member, "stamp": wall clock}."""
        try:
            change = bounded_json.loads(body)
            pool = self.gateway.balancer.pool(vip)
            active = str(change["active"])
            stamp = peer_stamp(change["stamp"], time.time(),
                               self.gateway.config.gateway.peer_max_skew)
        except (ValueError, KeyError, TypeError) as exc:
            return self._json(400, {"error": f'send {{"active": member, "stamp": time}}: {exc}'})
        peers = self.gateway.peers
        if peers is not None and not peers.later_active(vip, stamp):
            return self._json(200, {"kept": "this node's change is later"})
        taken = pool.adopt_active(active, trio.current_time())
        if taken:
            log.info("vip=%s failover: %s takes the new clients (from a peer)", vip, active)
        return self._json(200, {"taken": taken})

    def _adopt_persistence(self, body: bytes) -> tuple[int, str, bytes]:
        """A peer's new entries: {"entries": [[vip, key, member], ...]} (table persistence,
        study affinity) and {"deliveries": [[vip, unit, member], ...]} (HL7 resend affinity,
        units as 16 hex digits)."""
        pools = self.gateway.balancer.pools
        try:
            document = bounded_json.loads(body)
            now = trio.current_time()
            taken = sum(pools[vip].adopt_persistence(str(key), str(member), now)
                        for vip, key, member in document.get("entries", []) if vip in pools)
            taken += sum(pools[vip].adopt_delivery(int(str(unit), 16), str(member), now)
                         for vip, unit, member in document.get("deliveries", []) if vip in pools)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return self._json(400, {"error": f"send {{\"entries\": [[vip, key, member], "
                                             f"...], \"deliveries\": [...]}}: {exc}"})
        if self.gateway.workers is not None:  # they pick: they need the peer's entries too
            passed: dict[str, dict[str, list]] = {"persistence": {}, "deliveries": {}}
            for vip, key, member in document.get("entries", []):
                passed["persistence"].setdefault(vip, []).append([str(key), str(member)])
            for vip, unit, member in document.get("deliveries", []):
                passed["deliveries"].setdefault(vip, []).append([int(str(unit), 16),
                                                                 str(member)])
            self.gateway.workers.pass_on(passed)
        return self._json(200, {"taken": taken})

    @staticmethod
    def _json(status: int, document) -> tuple[int, str, bytes]:
        return status, "application/json", json.dumps(document, indent=1).encode()

    async def _reply(self, stream: Link, connection: h11.Connection, status: int,
                     document) -> bool:
        return await self._send(stream, connection, *self._json(status, document))

    @staticmethod
    async def _send(stream: Link, connection: h11.Connection, status: int, content_type: str,
                    payload: bytes) -> bool:
        """One response in one write; False when the client did not take it in SEND_TIMEOUT."""
        headers = [("Content-Type", content_type), ("Content-Length", str(len(payload))),
                   ("Cache-Control", "no-store")]
        if status == 401:
            headers.append(("WWW-Authenticate", 'Basic realm="medgate admin", charset="UTF-8"'))
        return await http.send_within(stream, http.whole_response(
            connection, status, HTTPStatus(status).phrase, headers, payload), SEND_TIMEOUT)


def _words(state: dict) -> str:
    return " ".join(f"{key}={value}" for key, value in state.items())


def _host_part(host_header: str) -> str:
    """'gw.local:9090' -> 'gw.local'; '[::1]:9090' -> '::1' (lower-case)."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else ""
    return host.rpartition(":")[0] if ":" in host else host

