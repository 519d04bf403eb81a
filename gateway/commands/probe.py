"""`gateway probe`: is the gateway on this host ready? Asks its admin server's /readyz as the
config sets it up (HTTPS with `admin_tls`, trusting its certificate or CA; no token needed), for
a container's HEALTHCHECK and keepalived's track script. Exit 0 ready, 1 not, 3 config error."""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path

from gateway.commands.ctl import trust_context
from gateway.config import Address, ConfigError, GatewaySettings, is_unspecified, load_config

EXIT_READY, EXIT_NOT_READY, EXIT_USAGE = 0, 1, 3
PORT_VARIABLE = "MEDGATE_ADMIN_PORT"  # overrides the config's admin port (older containers)


def add_parser(commands) -> None:
    probe = commands.add_parser(
        "probe", help="is the gateway on this host ready? (its /readyz, as the config says)",
        description="Ask the admin server of the gateway that runs with FILE whether it is "
                    "ready (listeners open, first checks done, not draining): over HTTPS when "
                    "admin_tls is set, trusting its CA (or its certificate); no token needed. "
                    f"{PORT_VARIABLE}, when set, names the port instead of the config's.",
        epilog="Exit status: 0 ready, 1 not ready or not answering, 3 config error.")
    probe.add_argument("-c", "--config", required=True, type=Path, metavar="FILE")
    probe.add_argument("--timeout", type=float, default=2.0, metavar="SECONDS",
                       help="how long to wait for the answer (default 2)")


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_config(args.config).gateway
        url, context = readyz(settings, os.environ.get(PORT_VARIABLE, ""))
    except ConfigError as exc:
        print(f"gateway probe: {exc}", file=sys.stderr)
        return EXIT_USAGE
    request = urllib.request.Request(url, headers={"Host": "localhost"})
    try:
        with urllib.request.urlopen(request, timeout=args.timeout, context=context) as answer:
            print(f"{url}: {answer.read(200).decode(errors='replace').strip()}")
            return EXIT_READY
    except urllib.error.HTTPError as exc:
        print(f"{url}: HTTP {exc.code}: {exc.read(200).decode(errors='replace').strip()}")
    except (urllib.error.URLError, OSError) as exc:
        print(f"{url}: {getattr(exc, 'reason', exc)}")
    return EXIT_NOT_READY


def readyz(settings: GatewaySettings, port: str = "") -> tuple[str, ssl.SSLContext | None]:
    """/readyz's URL on this host, and the TLS context that trusts the admin server."""
    admin = settings.admin
    if admin is None:
        raise ConfigError("[gateway] admin is off: there is no /readyz to ask")
    host = admin.host
    if is_unspecified(host):
        host = "::1" if ":" in host else "127.0.0.1"  # listening everywhere: ask on loopback
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        raise ConfigError(f"{PORT_VARIABLE}={port!r} is not a port")
    where = Address(host, int(port) if port else admin.port)
    url = f"{'https' if settings.admin_tls else 'http'}://{where}/readyz"
    if settings.admin_tls is None:
        return url, None
    trust = settings.admin_tls.ca or settings.admin_tls.cert
    try:
        context = trust_context(trust)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"[gateway] admin_tls: {trust}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    # The gateway on this host, asked on its own address or loopback: the chain is checked,
    # not the name (the certificate names the address clients use).
    context.check_hostname = False
    return url, context

