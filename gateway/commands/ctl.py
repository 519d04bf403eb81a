"""`gateway ctl`: talk to a running gateway's admin API (status, drain, maint, ready, weight,
failback, reload, reopen-logs).

Exit status: 0 done, 1 the gateway refused or could not be reached, 3 usage error.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

from gateway.config import ConfigError, load_config
from gateway.service.pages import failover_line

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 3


class CtlError(Exception):
    """The admin API said no, or could not be reached; the message says which."""


RELOAD_TIMEOUT = 60.0  # seconds `ctl reload` waits: with workers a reload waits up to 30 s for them


class Admin:
    """A small client of the admin API."""

    def __init__(self, base: str, token: str = "", timeout: float = 10.0,
                 context: ssl.SSLContext | None = None, hint: str = "",
                 login: tuple[str, str] | None = None) -> None:
        self.base = base.rstrip("/")
        self.token = token
        self.login = login  # a directory user's name and password (admin_ldap): HTTP Basic
        self.timeout = timeout
        self.context = context  # HTTPS trust (None: the system CAs)
        self.hint = hint  # said when it cannot be reached: how to name the right one

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"{self.base}{path}", data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.login is not None:
            credentials = base64.b64encode(":".join(self.login).encode()).decode()
            request.add_header("Authorization", f"Basic {credentials}")
        elif self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout,
                                        context=self.context) as response:
                return json.load(response)
        except urllib.error.HTTPError as exc:
            try:
                why = json.load(exc).get("error", "")
            except (ValueError, AttributeError):
                why = ""
            raise CtlError(f"{method} {path}: HTTP {exc.code} {exc.reason}"
                           + (f": {why}" if why else "")) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CtlError(f"cannot reach the admin API at {self.base}: {reason}"
                           + (f"; {self.hint}" if self.hint else "")) from None

    def status(self) -> dict:
        return self.call("GET", "/api/status")

    def change(self, target: str, **change) -> dict:
        vip, member = split_member(target)
        return self.call("POST", f"/api/vips/{vip}/members/{member}", change)


def split_member(target: str) -> tuple[str, str]:
    vip, sep, member = target.partition("/")
    if not sep or not vip or not member:
        raise CtlError(f"{target!r}: name the member as VIP/MEMBER, e.g. dicom/pacs1")
    return vip, member


def _connection_arguments(parser) -> None:
    parser.add_argument("--admin", metavar="URL",
                        help="admin API (default: from -c FILE, else http://127.0.0.1:9090)")
    parser.add_argument("--token", default=os.environ.get("MEDGATE_ADMIN_TOKEN", ""),
                        help="bearer token (default: from -c FILE)")
    parser.add_argument("--user", default=os.environ.get("MEDGATE_ADMIN_USER", ""),
                        metavar="NAME",
                        help="sign in as this directory user (admin_ldap, HTTPS only): the "
                             "password is asked, or read from MEDGATE_ADMIN_PASSWORD")
    parser.add_argument("-c", "--config", metavar="FILE",
                        default=os.environ.get("MEDGATE_CONFIG") or None,
                        help="the gateway's config: admin address, token and trust from it "
                             "(default: $MEDGATE_CONFIG)")
    parser.add_argument("--ca", metavar="FILE",
                        help="HTTPS: trust this CA (default: with -c and admin_tls, the admin "
                             "server's own certificate; else the system CAs)")


def add_parser(commands) -> None:
    ctl = commands.add_parser(
        "ctl", help="status of a running gateway; drain, maint, ready, weight, shadow, reload",
        description="Talk to a running gateway's admin API. Members are named VIP/MEMBER.",
        epilog="Exit status: 0 done, 1 refused or unreachable, 3 usage error. The config may "
               "also come from MEDGATE_CONFIG, the token from MEDGATE_ADMIN_TOKEN.")
    _connection_arguments(ctl)
    inventory = commands.add_parser(
        "inventory", help="who sends what to the DICOM VIPs (calling AEs, addresses, SOP classes)",
        description="The interface inventory of a running gateway: per DICOM VIP, every calling "
                    "AE and source address, the called AEs, SOP classes and transfer syntaxes "
                    "it proposed, how many associations (and how many refused), first and last "
                    "seen. No patient data.",
        epilog="Exit status: 0 done, 1 unreachable, 3 usage error.")
    _connection_arguments(inventory)
    inventory.add_argument("--vip", help="only this VIP")
    inventory.add_argument("--csv", action="store_true", help="CSV on stdout (for a spreadsheet)")
    actions = ctl.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    actions.add_parser("status", help="every VIP and member, as a table")
    drain = actions.add_parser("drain", help="no new clients; persisted clients still served")
    drain.add_argument("member", metavar="VIP/MEMBER")
    drain.add_argument("--wait", action="store_true",
                       help="return when the member has no live connections left")
    drain.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                       help="with --wait: give up after this long (exit 1)")
    for name, text in (("maint", "no traffic at all"), ("ready", "back in rotation")):
        action = actions.add_parser(name, help=text)
        action.add_argument("member", metavar="VIP/MEMBER")
    weight = actions.add_parser("weight", help="set a member's weight (0 = never picked)")
    weight.add_argument("member", metavar="VIP/MEMBER")
    weight.add_argument("weight", type=int)
    failback = actions.add_parser(
        "failback", help="failover mode: new clients go to the first member again (calling "
                         "AEs within their study window stay where they are)")
    failback.add_argument("vip", metavar="VIP")
    shadow = actions.add_parser("shadow", help="start or stop copying units to a shadow "
                                               "member (audited)")
    shadow.add_argument("member", metavar="VIP/MEMBER")
    shadow.add_argument("switch", choices=("on", "off"))
    actions.add_parser("reload", help="re-read the config file, as SIGHUP does (which also "
                                      "reopens the audit log)")
    actions.add_parser("reopen-logs", help="reopen the audit log file by its name, after "
                                           "logrotate moved it (no config reload), in every "
                                           "worker too")


def connect(args: argparse.Namespace, command: str = "ctl") -> Admin | None:
    """The admin API client the options name (address, token and trust from -c FILE); None
    after saying why on stderr."""
    base, token, trust = args.admin, args.token, args.ca
    if args.config:
        try:
            settings = load_config(args.config).gateway
        except ConfigError as exc:
            print(f"gateway {command}: {exc}", file=sys.stderr)
            return None
        if settings.admin is not None and not base:
            base = f"{'https' if settings.admin_tls else 'http'}://{settings.admin}"
        token = token or settings.admin_token
        if settings.admin_tls and not trust:
            trust = settings.admin_tls.cert
    context = None
    if trust:
        try:
            context = trust_context(trust)
        except (OSError, ssl.SSLError) as exc:
            print(f"gateway {command}: --ca {trust}: {getattr(exc, 'strerror', None) or exc}",
                  file=sys.stderr)
            return None
    hint = "" if base else (
        "that is only the default: give the gateway's config with -c FILE (or set "
        "MEDGATE_CONFIG=FILE), or its address with --admin URL")
    base = base or "http://127.0.0.1:9090"
    login = None
    if getattr(args, "user", ""):
        if not base.startswith("https://"):
            print(f"gateway {command}: --user: a password goes to {base} over HTTPS only "
                  "(give --admin https://... or -c FILE with admin_tls)", file=sys.stderr)
            return None
        password = os.environ.get("MEDGATE_ADMIN_PASSWORD")
        if password is None:
            try:
                password = getpass.getpass(f"password of {args.user}: ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return None
        login = (args.user, password)
    return Admin(base, token, context=context, hint=hint, login=login)


def trust_context(cafile: str) -> ssl.SSLContext:
    """HTTPS to the admin server, trusting `cafile`: its CA, or its own certificate as such."""
    context = ssl.create_default_context(cafile=cafile)
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return context


def run(args: argparse.Namespace) -> int:
    admin = connect(args)
    if admin is None:
        return EXIT_USAGE
    try:
        if args.action == "status":
            print_status(admin.status())
        elif args.action in ("drain", "maint", "ready"):
            member = admin.change(args.member, state=args.action)
            print(f"{args.member}: {member['state']} (admin {member['admin']}, "
                  f"{member['active']} live)")
            if args.action == "drain" and args.wait:
                return wait_drained(admin, args.member, args.timeout)
        elif args.action == "weight":
            member = admin.change(args.member, weight=args.weight)
            print(f"{args.member}: weight {member['weight']}")
        elif args.action == "failback":
            result = admin.call("POST", f"/api/vips/{urllib.parse.quote(args.vip)}/failback", {})
            print(f"{args.vip}: {result['active']} takes the new clients (was "
                  f"{result['was'] or 'none'})")
        elif args.action == "shadow":
            vip, name = split_member(args.member)
            shadow = admin.call("POST", f"/api/vips/{urllib.parse.quote(vip)}/shadows/"
                                        f"{urllib.parse.quote(name)}", {"on": args.switch == "on"})
            print(f"{args.member}: shadowing {shadow['shadowing']} ({shadow['state']}; "
                  f"{shadow['compared']} compared, {sum(shadow['differences'].values())} "
                  f"differed)")
        elif args.action == "reload":
            admin.timeout = max(admin.timeout, RELOAD_TIMEOUT)
            result = admin.call("POST", "/api/reload", {})
            starting = result.get("workers_starting")
            print(f"reloaded {result['reloaded']} (reload #{result['reloads']})" + (
                f"; new worker(s) {', '.join(map(str, starting))} not ready yet, the earlier "
                f"ones serve meanwhile (`gateway ctl status` says why)" if starting else ""))
        elif args.action == "reopen-logs":
            result = admin.call("POST", "/api/reopen-logs", {})
            print(f"reopened {result['reopened'] or 'nothing (the audit log is not a file)'}")
    except CtlError as exc:
        print(f"gateway ctl: {exc}", file=sys.stderr)
        return EXIT_USAGE if "VIP/MEMBER" in str(exc) else EXIT_FAILED
    return EXIT_OK


INVENTORY_COLUMNS = ("vip", "calling_ae", "address", "associations", "rejected", "called_aes",
                     "sop_classes", "transfer_syntaxes", "first_seen", "last_seen")


def run_inventory(args: argparse.Namespace) -> int:
    admin = connect(args, "inventory")
    if admin is None:
        return EXIT_USAGE
    try:
        path = "/api/inventory" + (f"?vip={urllib.parse.quote(args.vip)}" if args.vip else "")
        senders = admin.call("GET", path)["senders"]
    except CtlError as exc:
        print(f"gateway inventory: {exc}", file=sys.stderr)
        return EXIT_FAILED
    rows = [[str(sender[c]) if not isinstance(sender[c], dict) else
             " ".join(f"{key}({count})" for key, count in sorted(sender[c].items()))
             for c in INVENTORY_COLUMNS] for sender in senders]
    if args.csv:
        import csv
        writer = csv.writer(sys.stdout)
        writer.writerow(INVENTORY_COLUMNS)
        writer.writerows(rows)
        return EXIT_OK
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"DICOM senders ({len(rows)})")
    for column in INVENTORY_COLUMNS:
        table.add_column(column.replace("_", " "), overflow="fold")
    for row in rows:
        table.add_row(*map(escape, row))  # AE titles come off the wire: no markup in them
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    return EXIT_OK


def wait_drained(admin: Admin, target: str, timeout: float) -> int:
    vip, name = split_member(target)
    deadline = time.monotonic() + timeout
    while True:
        status = admin.status()
        member = next((m for v in status["vips"] if v["name"] == vip
                       for m in v["members"] if m["name"] == name), None)
        if member is None:
            raise CtlError(f"{target}: gone from the gateway's config")
        if member["active"] == 0:
            print(f"{target}: drained, no live connections")
            return EXIT_OK
        if time.monotonic() > deadline:
            print(f"gateway ctl: {target} still has {member['active']} live connection(s) after "
                  f"{timeout:g}s", file=sys.stderr)
            return EXIT_FAILED
        time.sleep(0.5)


def print_status(status: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    from gateway.commands.diagnose import console

    grid = Table(title=f"medgate {status['version']}: {status['config']}")
    for column in ("VIP", "member", "address", "state", "weight", "active", "total", "failures",
                   "last check"):
        grid.add_column(column, overflow="fold")
    colours = {"up": "green", "drain": "yellow", "maint": "yellow", "down": "bold red",
               "unknown": "dim"}
    for vip in status["vips"]:
        for member in vip["members"]:
            check = member["last_check"]
            grid.add_row(vip["name"], member["name"], member["address"],
                         f"[{colours[member['state']]}]{member['state'].upper()}[/]",
                         str(member["weight"]), str(member["active"]), str(member["total"]),
                         str(member["failed"]), "" if check is None else check["detail"])
    console().print(grid)
    for vip in status["vips"]:
        line = failover_line(vip)
        if line:
            console().print(f"{vip['name']}: {line}")
    if status["last_reload_error"]:
        console().print(f"[bold red]last reload failed:[/] {status['last_reload_error']}")
    loads = status.get("workers", [])  # an older gateway sends none
    if loads:
        serving = sum(not load.get("draining") for load in loads)
        console().print(f"{serving} workers ({status['worker_restarts']} restarts): " + ", ".join(
            f"{load['worker']}: {load['clients']} clients, {load['units']} units"
            + (" (draining)" if load.get("draining") else "") for load in loads))
    for item in status.get("workers_down", []):  # an older gateway sends none
        console().print(f"[bold red]worker {item['worker']} not serving[/] since "
                        f"{item['since']}: {escape(item['why'])}")

