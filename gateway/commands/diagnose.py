"""`gateway check`: run negotiate checks once (or every interval) and say who answers and why not.

Exit status, usable as a keepalived MISC_CHECK script as it is (without misc_dynamic):
0 every target up, 1 some down, 2 a VIP (or every URL) with nothing up, 3 usage or config error.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import trio

from gateway.net import tls
from gateway.config import Check, ClientTls, Config, ConfigError, HealthConfig, parse_address
from health.checks import CheckOutcome, Target, check_target, run_check

EXIT_UP, EXIT_SOME_DOWN, EXIT_NOTHING_UP, EXIT_USAGE = 0, 1, 2, 3
URL_SCHEMES = ("dicom", "dicoms", "hl7", "hl7s", "xds", "xdss", "http", "https", "tcp")


@dataclass(frozen=True)
class CheckSpec:
    """One thing to check: which VIP and member (or URL) it is, and how."""

    vip: str
    member: str
    target: Target
    health: HealthConfig


@dataclass(frozen=True)
class CheckReport:
    vip: str
    member: str
    address: str
    check: str
    ok: bool
    latency_ms: float
    reason: str
    certificate_expires: str | None = None
    warning: str = ""  # e.g. the member's certificate expires within 30 days


def specs_from_config(config: Config, vip_name: str | None = None,
                      timeout: float | None = None) -> list[CheckSpec]:
    """Every member of every VIP (or of one), each with its VIP's configured check."""
    vips = config.vips
    if vip_name is not None:
        vips = tuple(v for v in vips if v.name == vip_name)
        if not vips:
            names = ", ".join(v.name for v in config.vips)
            raise ConfigError(f"{config.source}: no VIP named {vip_name!r} (VIPs: {names})")
    specs = []
    for vip in vips:
        health = vip.health if timeout is None else replace(vip.health, timeout=timeout)
        for member in vip.members:
            specs.append(CheckSpec(vip.name, member.name, check_target(member, health), health))
    return specs


def spec_from_url(url: str, timeout: float = 4.0) -> CheckSpec:
    """`dicom://[CALLING@]CALLED@host:port[?find=PATIENT-ID]` (C-ECHO, or C-FIND with `find`),
    `hl7://host:port[?message=FILE]`,
    `xds://host:port/path?patient=ID`, `http(s)://host[:port]/path[?expect=TEXT]`, `tcp://host:port`;
    `dicoms`, `hl7s`, `xdss` and `https` speak TLS (`?ca=`, `?cert=`, `?key=`, `?server_name=`).
    """
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in URL_SCHEMES:
        raise ConfigError(f"{url}: unknown scheme {parts.scheme!r} "
                          f"(use {', '.join(s + '://' for s in URL_SCHEMES)})")
    userinfo, _, hostport = parts.netloc.rpartition("@")
    query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    default_port = {"http": 80, "https": 443, "xdss": 443, "dicoms": 2762}.get(scheme)
    try:
        if default_port and ":" not in hostport.rpartition("]")[2]:
            hostport = f"{hostport}:{default_port}"
        address = parse_address(hostport)
    except ValueError as exc:
        raise ConfigError(f"{url}: {exc}") from None
    if address.port == 0:
        raise ConfigError(f"{url}: give the port")
    secure = _url_tls(url, scheme, query, address.host)
    if secure is not None:
        scheme = scheme.rstrip("s") if scheme != "https" else "http"
    spec = _plain_spec(url, scheme, parts, userinfo, query, address, timeout)
    return replace(spec, target=replace(spec.target, tls=secure))


def _url_tls(url: str, scheme: str, query: dict, host: str) -> tls.MemberTls | None:
    """TLS for dicoms://, hl7s://, xdss://, https:// (?ca=, ?cert=, ?key=, ?server_name=)."""
    if scheme not in ("dicoms", "hl7s", "xdss", "https"):
        return None
    for key in ("ca", "cert", "key"):
        if query.get(key) and not Path(query[key]).is_file():
            raise ConfigError(f"{url}: {key}={query[key]!r}: no such file")
    settings = ClientTls(ca=query.get("ca", ""), cert=query.get("cert", ""),
                         key=query.get("key", ""), server_name=query.get("server_name", ""))
    try:
        return tls.client_context(settings, host)
    except tls.TlsSetupError as exc:
        raise ConfigError(f"{url}: {exc}") from None


def _plain_spec(url: str, scheme: str, parts, userinfo: str, query: dict, address,
                timeout: float) -> CheckSpec:
    name = url
    if scheme == "dicom":
        calling, _, called = urllib.parse.unquote(userinfo).rpartition("@")
        if not called:
            raise ConfigError(f"{url}: give the called AE title, as dicom://[CALLING@]CALLED@host:port")
        for title in (calling, called):
            if len(title) > 16:
                raise ConfigError(f"{url}: AE title {title!r} is longer than 16 characters")
        health = HealthConfig(Check.DICOM_FIND if "find" in query else Check.DICOM_ECHO, timeout=timeout,
                              calling_ae=calling or "MEDGATE", patient_id=query.get("find", ""))
        return CheckSpec("-", name, Target(address, called), health)
    if scheme == "hl7":
        return CheckSpec("-", name, Target(address),
                         HealthConfig(Check.HL7_ACK, timeout=timeout, message=query.get("message", "")))
    if scheme == "xds":
        if not query.get("patient"):
            raise ConfigError(f"{url}: give the test patient, as xds://host:port/path?patient=ID")
        return CheckSpec("-", name, Target(address), HealthConfig(
            Check.XDS_QUERY, timeout=timeout, path=parts.path or "/", patient_id=query["patient"]))
    if scheme == "http":
        return CheckSpec("-", name, Target(address), HealthConfig(
            Check.HTTP, timeout=timeout, path=parts.path or "/", expect=query.get("expect", "")))
    return CheckSpec("-", name, Target(address), HealthConfig(Check.TCP, timeout=timeout))


async def run_all(specs: list[CheckSpec]) -> list[CheckReport]:
    """Every check at once; reports in the order of `specs`."""
    outcomes: dict[int, CheckOutcome] = {}

    async def one(index: int, spec: CheckSpec) -> None:
        outcomes[index] = await run_check(spec.target, spec.health)

    async with trio.open_nursery() as nursery:
        for index, spec in enumerate(specs):
            nursery.start_soon(one, index, spec)
    return [CheckReport(spec.vip, spec.member, str(spec.target.address), spec.health.check,
                        outcome.ok, round(outcome.latency * 1000, 1), outcome.detail,
                        *_expiry(outcome.certificate_expires))
            for spec, outcome in zip(specs, (outcomes[i] for i in range(len(specs))))]


def _expiry(expires: float | None) -> tuple[str | None, str]:
    """The certificate's end as a date, and a warning within EXPIRY_WARNING_DAYS of it."""
    if expires is None:
        return None, ""
    days = (expires - time.time()) / 86400
    warning = (f"certificate expires in {days:.0f} days ({tls.day(expires)})"
               if days < tls.EXPIRY_WARNING_DAYS else "")
    return tls.day(expires), warning


def exit_status(reports: list[CheckReport]) -> int:
    """0 all up, 1 some down, 2 a VIP (URLs count as one group) with nothing up."""
    groups: dict[str, list[bool]] = {}
    for report in reports:
        groups.setdefault(report.vip, []).append(report.ok)
    if any(not any(states) for states in groups.values()):
        return EXIT_NOTHING_UP
    if not all(report.ok for report in reports):
        return EXIT_SOME_DOWN
    return EXIT_UP


def route_reports(config: Config, reports: list[CheckReport]) -> list[dict]:
    """Each route of the checked VIPs, in the order tried, with which of its members are up."""
    up = {(report.vip, report.member) for report in reports if report.ok}
    checked = {report.vip for report in reports}
    return [{"vip": vip.name, "route": number, "match": match, "members": list(members),
             "members_up": [name for name in members if (vip.name, name) in up]}
            for vip in config.vips if vip.name in checked
            for number, (match, members) in enumerate(vip.route_table(), 1)]


def host_problems(config: Config, vip_name: str | None = None) -> list[str]:
    """What this host lacks for the config's transparent VIPs, one line each."""
    from gateway.net import transparent

    return [f"vip {vip.name}: transparent: {problem}" for vip in config.vips
            if vip.transparent and vip_name in (None, vip.name)
            for problem in transparent.problems(vip)]


def to_json(reports: list[CheckReport], routes: Sequence[dict] = (), problems: Sequence[str] = ()) -> str:
    status = exit_status(reports)
    if problems:
        status = max(status, EXIT_SOME_DOWN)
    word = {EXIT_UP: "up", EXIT_SOME_DOWN: "degraded", EXIT_NOTHING_UP: "down"}[status]
    return json.dumps({"status": word, "exit": status,
                       "checks": [asdict(report) for report in reports],
                       "routes": list(routes), "problems": list(problems)}, indent=2)


def table(reports: list[CheckReport], title: str = ""):
    """A rich table of the reports (rich is imported here: only the CLI needs it)."""
    from rich.table import Table

    urls_only = all(report.vip == "-" for report in reports)
    columns = ("target",) if urls_only else ("VIP", "member", "address")
    grid = Table(title=title or None, expand=False)
    for column in (*columns, "check", "result", "latency", "reason"):
        grid.add_column(column, overflow="fold", no_wrap=column in ("result", "latency"))
    for report in reports:
        result = "[green]UP[/]" if report.ok else "[bold red]DOWN[/]"
        where = (report.member,) if urls_only else (report.vip, report.member, report.address)
        reason = report.reason + (f" [yellow]WARNING: {report.warning}[/]" if report.warning
                                  else "")
        grid.add_row(*where, report.check, result, f"{report.latency_ms:.1f} ms", reason)
    return grid


def routes_table(routes: list[dict]):
    """A rich table of route_reports: what each route sends where, and what of it is up."""
    from rich.table import Table

    grid = Table(title="routes (first match wins)", expand=False)
    for column in ("VIP", "#", "match", "members", "up"):
        grid.add_column(column, overflow="fold")
    for route in routes:
        up = route["members_up"]
        grid.add_row(route["vip"], str(route["route"]), route["match"],
                     ", ".join(route["members"]),
                     f"[green]{len(up)}[/]" if up else "[bold red]none: refused[/]")
    return grid


def console():
    """A rich console; wide when not on a terminal, so logs and keepalived get whole lines."""
    import sys

    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 160)
