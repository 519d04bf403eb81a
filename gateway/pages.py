"""The admin server's HTML pages: the status page and the DICOM senders page. Self-contained
(no scripts or fonts from the internet), every value from the wire or the config escaped."""

from __future__ import annotations

import html

from gateway import tls

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
            if m["certificate_expires"]:
                days = m["certificate_days_left"]
                check_text += (f" (certificate valid until {m['certificate_expires']}"
                               + (f": WARNING, {days:.0f} days left)"
                                  if days < tls.EXPIRY_WARNING_DAYS else ")"))
            rows.append(
                f'<tr class="member" data-vip="{e(vip["name"])}" data-member="{e(m["name"])}" '
                f'data-state="{e(m["state"])}">'
                f'<td><b>{e(m["name"])}</b><br><small>{e(m["address"])}</small></td>'
                f'<td><span class="state" style="background:{STATE_COLOURS[m["state"]]}">'
                f'{e(m["state"].upper())}</span></td>'
                f'<td>{m["weight"]}</td><td>{m["active"]} / {m["total"]}</td>'
                f'<td>{m["failed"]}</td><td>{_size(m["bytes_in"])} / {_size(m["bytes_out"])}</td>'
                f'<td class="check">{e(check_text)}</td></tr>')
        routes = "".join(
            f'<li><code>{e(route["match"])}</code> &rarr; {e(", ".join(route["members"]))} '
            f'({len(route["members_up"])} up)</li>' for route in vip["routes"])
        routes = (f'<p>routes, first match wins:</p><ol class="routes">{routes}</ol>'
                  if routes else "")
        good = vip["members_up"]
        colour = "#1b873f" if good == len(vip["members"]) else ("#c62828" if not good else "#b26b00")
        cards.append(
            f'<section class="vip" data-vip="{e(vip["name"])}">'
            f'<h2><span class="dot" style="background:{colour}"></span>{e(vip["name"])} '
            f'<small>{e(vip["protocol"])} on {e(", ".join(vip["listen"]))}, {e(vip["mode"])}, '
            f'check {e(vip["check"])}</small></h2>'
            f'<p>{vip["unit"]}: {vip["relayed"]} relayed, {vip["refused"]} refused by the '
            f'gateway, {vip["retried"]} retried on another member; clients {vip["clients"]} '
            f'of max_clients {vip["max_clients"]}</p>{routes}'
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
{status["reloads"]} reload(s). <a href="/api/status">JSON</a> · <a href="/metrics">metrics</a> · <a href="/inventory">DICOM senders</a>.
This page refreshes every 5 s.</footer>
</body></html>
"""


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)
