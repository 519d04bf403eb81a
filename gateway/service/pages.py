"""The admin server's HTML pages: the status page and the DICOM senders page. Self-contained
(no scripts or fonts from the internet), every value from the wire or the config escaped."""

from __future__ import annotations

import html

from gateway.net import tls
from gateway.balancer import HISTORY

STATE_COLOURS = {"up": "#1b873f", "drain": "#b26b00", "maint": "#b26b00", "down": "#c62828",
                 "unknown": "#6b6b6b"}


def inventory_page(senders: list[dict]) -> str:
    """Who sends what to the DICOM VIPs, as a table (AE titles and UIDs escaped)."""
    e = html.escape

    def counts(values: dict[str, int]) -> str:
        return "<br>".join(f"{e(key)} ({count})" for key, count in sorted(values.items()))

    rows = "".join(
        f"<tr><td>{e(s['vip'])}</td><td><b>{e(s['calling_ae'])}</b></td><td>{e(s['address'])}"
        f"</td><td>{s['associations']} ({s['rejected']} refused)</td>"
        f"<td>{counts(s['called_aes'])}</td><td><small>{counts(s['sop_classes'])}</small></td>"
        f"<td><small>{counts(s['transfer_syntaxes'])}</small></td>"
        f"<td>{e(s['first_seen'])}<br>{e(s['last_seen'])}</td></tr>" for s in senders)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>medgate DICOM senders</title>
<style>body{{font-family:system-ui,sans-serif;margin:1em}}table{{border-collapse:collapse}}
td,th{{border-bottom:1px solid #ddd;padding:.3em .6em;text-align:left;vertical-align:top}}
.scroll{{overflow-x:auto}}</style></head>
<body><h1>DICOM senders</h1><p><a href="/">status</a> &middot; {len(senders)} calling AE /
address pairs &middot; <a href="/api/inventory">JSON</a></p>
<div class="scroll"><table><tr><th>VIP</th><th>calling AE</th><th>address</th>
<th>associations</th><th>called AEs</th><th>SOP classes</th><th>transfer syntaxes</th>
<th>first / last seen</th></tr>{rows}</table></div></body></html>
"""


def failover_line(vip: dict) -> str:
    """"standby pacs2 active since 14:02, failback from 14:07" for a failover VIP whose
    standby takes the new clients; "" otherwise."""
    state = vip.get("failover")
    if not state or not state["standby_active"]:
        return ""
    line = f"standby {state['active']} active since {state['since'][11:16]}"
    if state["failback"] == "manual":
        return f"{line}, failback manual (gateway ctl failback {vip['name']})"
    if state["failback_at"]:
        return f"{line}, failback from {state['failback_at'][11:16]}"
    return line


# What a VIP with no member up does to its clients, in their protocol's words.
_REFUSED = {"dicom": "modalities are being refused (A-ASSOCIATE-RJ transient: they keep their "
                     "images and retry)",
            "hl7": "senders get the gateway's NAK (they keep their messages and resend)",
            "xds": "requests get HTTP 503 with a SOAP Fault (Retry-After)",
            "tcp": "connections are closed"}
_LEGEND = ('<p class="legend"><span class="dot" style="background:#1b873f"></span>every member '
           'up <span class="dot" style="background:#b26b00"></span>some down '
           '<span class="dot" style="background:#c62828"></span>none up: clients refused. '
           'Member states: up, down, drain (keeps its clients, takes no new ones), maint (takes '
           'nothing), unknown (not checked yet).</p>')


def status_page(status: dict) -> str:
    """The status page: one card per VIP, one row per member (a card of its own on a narrow
    screen), green / amber / red, with the last minutes of traffic and check latency."""
    e = html.escape
    cards = []
    for vip in status["vips"]:
        rows = "".join(_member_row(vip, m) for m in vip["members"])
        routes = "".join(
            f'<li><code>{e(route["match"])}</code> &rarr; {e(", ".join(route["members"]))} '
            f'({len(route["members_up"])} up)</li>' for route in vip["routes"])
        routes = (f'<p>routes, first match wins:</p><ol class="routes">{routes}</ol>'
                  if routes else "")
        shadows = "".join(
            f'<li>{e(shadow["name"])} ({e(shadow["address"])}): shadowing {shadow["shadowing"]}, '
            f'{e(shadow["state"])}; {shadow["compared"]} compared, '
            f'{sum(shadow["differences"].values())} differed'
            + (f' ({e(", ".join(f"{k} {n}" for k, n in sorted(shadow["differences"].items())))})'
               if shadow["differences"] else "")
            + f', {shadow["not_compared"]} not answered, {shadow["dropped"]} dropped</li>'
            for shadow in vip.get("shadows", []))
        routes += (f'<p>shadow members (a copy of each unit, never answering a client):</p>'
                   f'<ul class="shadows">{shadows}</ul>' if shadows else "")
        standby = failover_line(vip)
        failover = f'<p class="failover"><b>{e(standby)}</b></p>' if standby else ""
        good = vip["members_up"]
        colour = "#1b873f" if good == len(vip["members"]) else ("#c62828" if not good else "#b26b00")
        secure = vip["tls"]
        tls_text = "no TLS" if secure is None else (
            f"TLS {secure['min_version']}+" + {"required": ", client certificates required",
                                               "optional": ", client certificates optional"}
            .get(secure["verify_client"], ""))
        cards.append(
            f'<section class="vip" data-vip="{e(vip["name"])}">'
            f'<h2><span class="dot" style="background:{colour}"></span>{e(vip["name"])} '
            f'<small>{e(vip["protocol"])} on {e(", ".join(vip["listen"]))}, {e(vip["mode"])}, '
            f'check {e(vip["check"])}, {e(tls_text)}</small></h2>'
            f'<p>{vip["unit"]}: {vip["relayed"]} relayed, {vip["refused"]} refused by the '
            f'gateway ({vip["held_back"]} of them held for their member), {vip["retried"]} '
            f'retried on another member; clients {vip["clients"]} of max_clients '
            f'{vip["max_clients"]}</p>{failover}{routes}'
            f'<div class="scroll"><table><tr class="head"><th>member</th><th>state</th>'
            f'<th>weight</th><th>active / total</th><th>failures</th><th>bytes in / out</th>'
            f'<th>traffic, 5 min</th><th>last check</th></tr>{rows}</table></div></section>')
    banners = "".join(
        f'<p class="banner" role="alert">vip {e(vip["name"])}: no member up: '
        f'{e(_REFUSED.get(vip["protocol"], "clients are refused"))}</p>'
        for vip in status["vips"] if vip["members"] and not vip["members_up"])
    reload_note = banners + (
        f'<p class="error">last reload failed: {e(status["last_reload_error"])}</p>'
        if status["last_reload_error"] else "")
    peers = "".join(
        f'<li class="{"" if peer["in_sync"] else "error"}">{e(peer["address"])}: '
        + "; ".join(
            [e(peer["detail"])] if not peer["ok"] else
            ([f'config differs: {e("; ".join(peer["drift"]))}'] if peer["drift"] else [])
            + ([f'admin state differs: {e("; ".join(peer["disagree"]))}']
               if peer["disagree"] else []) or ["in sync"])
        + '</li>' for peer in status["peers"])
    reload_note += f'<p>peers (shared admin state):</p><ul class="peers">{peers}</ul>' if peers else ""
    workers = ", ".join(
        f'worker {load["worker"]} (pid {load["pid"]}): {load["clients"]} client(s), '
        f'{load["units"]} unit(s)' + (", draining" if load["draining"] else
                                       "" if load["ready"] else ", starting")
        for load in status["workers"])
    serving = sum(not load["draining"] for load in status["workers"])
    reload_note += (f'<p class="workers">{serving} workers, '
                    f'{status["worker_restarts"]} restart(s): {workers}; the figures below '
                    f'are their sums</p>' if workers else "")
    down = "".join(f'<li>worker {item["worker"]}: {e(item["why"])}, since '
                   f'{e(item["since"])}</li>' for item in status.get("workers_down", []))
    reload_note += f'<p>not serving:</p><ul class="workers-down error">{down}</ul>' if down else ""
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
.check {{ color: #444; min-width: 14em; overflow-wrap: anywhere; }}
.spark {{ display: block; }}
.badge {{ font-size: .75em; border: 1px solid #888; border-radius: 3px; padding: 0 .3em; }}
.error {{ color: #c62828; font-weight: bold; }}
.banner {{ background: #c62828; color: #fff; font-weight: bold; padding: .6em .8em; border-radius: 6px; }}
.legend {{ color: #444; font-size: .85em; }}
footer {{ color: #666; font-size: .8em; }}
@media (max-width: 640px) {{
  body {{ padding: .5em; }}
  .scroll {{ overflow-x: visible; }}
  table, tbody, tr, td {{ display: block; width: auto; }}
  tr.head {{ display: none; }}
  tr.member {{ border: 1px solid #ddd; border-radius: 6px; margin: 0 0 .6em; padding: .3em; }}
  td {{ display: flex; gap: .6em; border: 0; padding: .2em .3em; }}
  td::before {{ content: attr(data-label); font-weight: bold; min-width: 6.5em; flex: none; }}
  .check {{ min-width: 0; }}
}}
</style></head><body>
<h1>medgate status</h1>
{reload_note}
{_LEGEND}
{"".join(cards)}
<footer>medgate {e(status["version"])}, config {e(status["config"])}, up {status["uptime_s"]:.0f} s,
{status["reloads"]} reload(s). <a href="/api/status">JSON</a> · <a href="/metrics">metrics</a> · <a href="/inventory">DICOM senders</a>.
This page refreshes every 5 s.</footer>
</body></html>
"""


def _member_row(vip: dict, m: dict) -> str:
    e = html.escape
    check = m["last_check"]
    check_text = "not checked yet" if check is None else (
        f"{'passed' if check['ok'] else 'failed'} {check['latency_ms']:.1f} ms, "
        f"{check['age_s']:.0f} s ago: {check['detail']}")
    if m["state"] == "down" and m["health_detail"] and (check is None or check["ok"]):
        check_text += f" (down: {m['health_detail']})"  # taken out by live traffic
    if m["held_up"]:
        check_text += f" (kept up by min_up: {m['held_up']})"
    if m["certificate_expires"]:
        days = m["certificate_days_left"]
        check_text += (f" (certificate valid until {m['certificate_expires']}"
                       + (f": WARNING, {days:.0f} days left)"
                          if days < tls.EXPIRY_WARNING_DAYS else ")"))
    traffic = m["traffic"]
    latencies = m["check_ms"]
    traffic_title = (f"{sum(traffic)} {vip['unit']} in the last {len(traffic) * 10} s, at most "
                     f"{max(traffic, default=0)} per 10 s")
    latency_title = (f"check latency: last {latencies[-1]:.1f} ms, at most "
                     f"{max(latencies):.1f} ms" if latencies else "no check yet")
    badge = ' <span class="badge">TLS</span>' if m["tls"] else ""
    return (
        f'<tr class="member" data-vip="{e(vip["name"])}" data-member="{e(m["name"])}" '
        f'data-state="{e(m["state"])}">'
        f'<td data-label="member"><span><b>{e(m["name"])}</b>{badge}<br>'
        f'<small>{e(m["address"])}</small></span></td>'
        f'<td data-label="state"><span class="state" '
        f'style="background:{STATE_COLOURS[m["state"]]}">{e(m["state"].upper())}</span></td>'
        f'<td data-label="weight">{m["weight"]}</td>'
        f'<td data-label="active / total">{m["active"]} / {m["total"]}</td>'
        f'<td data-label="failures" class="failures">{m["failed"]}</td>'
        f'<td data-label="bytes in / out">{_size(m["bytes_in"])} / {_size(m["bytes_out"])}</td>'
        f'<td data-label="traffic">{_spark(traffic, traffic_title, "#1b5fa8")}</td>'
        f'<td data-label="last check" class="check"><span>{e(check_text)}'
        f'{_spark(latencies, latency_title, "#7a4fb0")}</span></td></tr>')


def _spark(values: list, title: str, colour: str) -> str:
    """A sparkline as inline SVG (nothing loaded from elsewhere): the newest point at the
    right, scaled to the largest value."""
    e = html.escape
    if len(values) < 2:
        return f'<small title="{e(title)}">-</small>'
    width, height, top = 100, 18, max(values) or 1
    step = width / (HISTORY - 1)
    points = " ".join(f"{width - (len(values) - 1 - index) * step:.1f},"
                      f"{height - 1 - value / top * (height - 2):.1f}"
                      for index, value in enumerate(values))
    return (f'<svg class="spark" viewBox="0 0 {width} {height}" width="{width}" '
            f'height="{height}" role="img" aria-label="{e(title)}"><title>{e(title)}</title>'
            f'<rect width="{width}" height="{height}" fill="#eef1f5"/>'  # the whole 5 minutes
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}"/>'
            f'</svg>')


def _size(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)
