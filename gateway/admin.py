"""The admin server: status page, JSON API, Prometheus metrics, run-time member changes.

GET /            status page (self-contained HTML, refreshes itself, fits a phone)
GET /api/status  the same as JSON
GET /metrics     Prometheus text format
POST /api/vips/{vip}/members/{member}  {"state": "drain"|"maint"|"ready"} or {"weight": N}
POST /api/reload re-read the config file (as SIGHUP does)

POSTs need `Authorization: Bearer <admin_token>` when a token is set. Bodies are bounded, every
read has a timeout.
"""

from __future__ import annotations

import html
import json
import logging
import time
from http import HTTPStatus
from typing import TYPE_CHECKING

import h11
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)

from gateway import __version__, http
from gateway.balancer import CHECK_BUCKETS, AdminState, Health

if TYPE_CHECKING:
    from gateway.server import Gateway

log = logging.getLogger("medgate.admin")

MAX_BODY = 65536
READ_TIMEOUT = 10.0
UNITS = {"dicom": "associations", "hl7": "messages", "xds": "requests", "tcp": "connections"}


def snapshot(gateway: Gateway) -> dict:
    """Everything the page, the API and `gateway ctl status` show, as plain data."""
    vips = []
    for vip in gateway.config.vips:
        pool = gateway.balancer.pool(vip.name)
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
                "last_check": None if check is None else {
                    "ok": check.ok, "detail": check.detail,
                    "latency_ms": round(check.latency * 1000, 2),
                    "age_s": round(trio.current_time() - check.at, 1)},
            })
        vips.append({
            "name": vip.name, "protocol": vip.protocol, "mode": vip.mode,
            "listen": [str(a) for a in gateway.bound.get(vip.name, ())] or
                      [str(a) for a in vip.listen],
            "check": vip.health.check, "unit": UNITS[vip.protocol],
            "relayed": pool.relayed, "refused": pool.refused, "retried": pool.retried,
            "members_up": sum(m["state"] in ("up", "drain") for m in members),
            "members": members,
        })
    return {"version": __version__, "config": gateway.config.source,
            "uptime_s": round(time.time() - gateway.started_at, 1),
            "reloads": gateway.reloads, "last_reload_error": gateway.last_reload_error,
            "vips": vips}


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
        for vip in self.gateway.config.vips:
            pool = self.gateway.balancer.pool(vip.name)
            unit = UNITS[vip.protocol]
            relayed.add_metric([vip.name, unit], pool.relayed)
            refused.add_metric([vip.name, unit], pool.refused)
            retried.add_metric([vip.name, unit], pool.retried)
            for member in pool.members:
                key = [vip.name, member.name]
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
        yield from (up, healthy, active, weight, total, failed, bytes_in, bytes_out, checks,
                    relayed, refused, retried)


class AdminServer:
    """Serves the admin endpoints of one gateway."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(gateway))

    async def handle(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
        try:
            while True:
                with trio.fail_after(READ_TIMEOUT):
                    request = await http.next_event(stream, connection)
                    if not isinstance(request, h11.Request):
                        return
                    body = bytearray()
                    while isinstance(event := await http.next_event(stream, connection),
                                     h11.Data):
                        body += event.data
                        if len(body) > MAX_BODY:
                            await self._reply(stream, connection, 413, {"error": "body too big"})
                            return
                status, content_type, payload = await self.route(request, bytes(body))
                await self._send(stream, connection, status, content_type, payload)
                if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                    return
                connection.start_next_cycle()
        except (trio.TooSlowError, http.PeerGone, h11.ProtocolError):
            return

    async def route(self, request: h11.Request, body: bytes) -> tuple[int, str, bytes]:
        method = request.method.decode()
        path = request.target.decode().split("?", 1)[0].rstrip("/") or "/"
        if method == "GET" and path == "/":
            return 200, "text/html; charset=utf-8", status_page(snapshot(self.gateway)).encode()
        if method == "GET" and path == "/api/status":
            return self._json(200, snapshot(self.gateway))
        if method == "GET" and path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", generate_latest(self.registry)
        if method == "POST":
            token = self.gateway.config.gateway.admin_token
            if token and http.header(request.headers, b"authorization") != f"Bearer {token}":
                return self._json(401, {"error": "missing or wrong bearer token"})
            parts = path.strip("/").split("/")
            if len(parts) == 5 and parts[:2] == ["api", "vips"] and parts[3] == "members":
                return self._change_member(parts[2], parts[4], body)
            if parts == ["api", "reload"]:
                error = await self.gateway.reload_from_file()
                if error:
                    return self._json(400, {"error": error})
                return self._json(200, {"reloaded": self.gateway.config.source,
                                        "reloads": self.gateway.reloads})
        if path in ("/", "/api/status", "/metrics"):
            return self._json(405, {"error": f"{method} is not allowed on {path}"})
        return self._json(404, {"error": f"no {method} {path} here"})

    def _change_member(self, vip: str, name: str, body: bytes) -> tuple[int, str, bytes]:
        try:
            pool = self.gateway.balancer.pool(vip)
            pool.member(name)
        except KeyError as exc:
            return self._json(404, {"error": str(exc).strip("'\"")})
        try:
            change = json.loads(body or b"{}")
            if not isinstance(change, dict) or not change.keys() & {"state", "weight"}:
                raise ValueError('send {"state": "drain"|"maint"|"ready"} or {"weight": N}')
            if "state" in change:
                state = AdminState(change["state"])
                self.gateway.balancer.set_admin_state(vip, name, state)
                log.warning("admin: vip=%s member=%s set to %s", vip, name, state.value)
            if "weight" in change:
                weight = change["weight"]
                if not isinstance(weight, int) or isinstance(weight, bool):
                    raise ValueError(f"weight {weight!r} is not a whole number")
                self.gateway.balancer.set_weight(vip, name, weight)
                log.warning("admin: vip=%s member=%s weight %d", vip, name, weight)
        except (ValueError, TypeError) as exc:
            return self._json(400, {"error": str(exc)})
        member = next(m for v in snapshot(self.gateway)["vips"] if v["name"] == vip
                      for m in v["members"] if m["name"] == name)
        return self._json(200, member)

    @staticmethod
    def _json(status: int, document) -> tuple[int, str, bytes]:
        return status, "application/json", json.dumps(document, indent=1).encode()

    async def _reply(self, stream, connection, status: int, document) -> None:
        await self._send(stream, connection, *self._json(status, document))

    @staticmethod
    async def _send(stream, connection, status: int, content_type: str, payload: bytes) -> None:
        headers = [("Content-Type", content_type), ("Content-Length", str(len(payload))),
                   ("Cache-Control", "no-store")]
        await http.send(stream, connection, h11.Response(
            status_code=status, headers=headers, reason=HTTPStatus(status).phrase))
        await http.send(stream, connection, h11.Data(data=payload))
        await http.send(stream, connection, h11.EndOfMessage())


STATE_COLOURS = {"up": "#1b873f", "drain": "#b26b00", "maint": "#b26b00", "down": "#c62828",
                 "unknown": "#6b6b6b"}


def status_page(status: dict) -> str:
    """The status page: one card per VIP, one row per member, green / amber / red."""
    e = html.escape
    cards = []
    for vip in status["vips"]:
        rows = []
        for m in vip["members"]:
            check = m["last_check"]
            check_text = "not checked yet" if check is None else (
                f"{'passed' if check['ok'] else 'failed'} {check['latency_ms']:.1f} ms, "
                f"{check['age_s']:.0f} s ago: {check['detail']}")
            rows.append(
                f'<tr class="member" data-vip="{e(vip["name"])}" data-member="{e(m["name"])}" '
                f'data-state="{e(m["state"])}">'
                f'<td><b>{e(m["name"])}</b><br><small>{e(m["address"])}</small></td>'
                f'<td><span class="state" style="background:{STATE_COLOURS[m["state"]]}">'
                f'{e(m["state"].upper())}</span></td>'
                f'<td>{m["weight"]}</td><td>{m["active"]} / {m["total"]}</td>'
                f'<td>{m["failed"]}</td><td>{_size(m["bytes_in"])} / {_size(m["bytes_out"])}</td>'
                f'<td class="check">{e(check_text)}</td></tr>')
        good = vip["members_up"]
        colour = "#1b873f" if good == len(vip["members"]) else ("#c62828" if not good else "#b26b00")
        cards.append(
            f'<section class="vip" data-vip="{e(vip["name"])}">'
            f'<h2><span class="dot" style="background:{colour}"></span>{e(vip["name"])} '
            f'<small>{e(vip["protocol"])} on {e(", ".join(vip["listen"]))}, {e(vip["mode"])}, '
            f'check {e(vip["check"])}</small></h2>'
            f'<p>{vip["unit"]}: {vip["relayed"]} relayed, {vip["refused"]} refused by the '
            f'gateway, {vip["retried"]} retried on another member</p>'
            f'<div class="scroll"><table><tr><th>member</th><th>state</th><th>weight</th>'
            f'<th>active / total</th><th>failures</th><th>bytes in / out</th><th>last check</th>'
            f'</tr>{"".join(rows)}</table></div></section>')
    reload_note = (f'<p class="error">last reload failed: {e(status["last_reload_error"])}</p>'
                   if status["last_reload_error"] else "")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="5">
<title>medgate status</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 0; padding: 1em; background: #f5f6f8; color: #1d1d1f; }}
h1 {{ font-size: 1.3em; margin: 0 0 .3em; }}
h2 {{ font-size: 1.1em; margin: 0 0 .3em; }}
h2 small {{ font-weight: normal; color: #555; }}
.vip {{ background: #fff; border-radius: 8px; padding: .8em; margin: 0 0 1em; box-shadow: 0 1px 3px #0002; }}
.scroll {{ overflow-x: auto; }}
table {{ border-collapse: collapse; width: 100%; font-size: .9em; }}
th, td {{ text-align: left; padding: .35em .5em; border-bottom: 1px solid #e3e3e3; vertical-align: top; }}
.state {{ color: #fff; padding: .1em .5em; border-radius: 4px; font-weight: bold; }}
.dot {{ display: inline-block; width: .7em; height: .7em; border-radius: 50%; margin-right: .4em; }}
.check {{ color: #444; min-width: 14em; }}
.error {{ color: #c62828; font-weight: bold; }}
footer {{ color: #666; font-size: .8em; }}
</style></head><body>
<h1>medgate status</h1>
{reload_note}
{"".join(cards)}
<footer>medgate {e(status["version"])}, config {e(status["config"])}, up {status["uptime_s"]:.0f} s,
{status["reloads"]} reload(s). <a href="/api/status">JSON</a> · <a href="/metrics">metrics</a>.
This page refreshes every 5 s.</footer>
</body></html>
"""


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)
