"""What transparent mode needs from the host, checked before the first client would fail.

A transparent VIP opens each member connection from the client's own address (IP_TRANSPARENT,
which needs CAP_NET_ADMIN). The member's replies go to that client address, so they must come
back through the gateway (it is the members' route to the clients) and be delivered to the
gateway's socket rather than forwarded: a policy rule for packets from the member-side
interface into a table with `local` routes for the client networks (docs/operations.md "Transparent mode").
"""

from __future__ import annotations

import errno
import ipaddress
import json
import socket
import subprocess

from gateway.net.channel import TRANSPARENT, set_ip_flag
from gateway.config import VipConfig

LAYOUT = "docs/operations.md \"Transparent mode\""


def problems(vip: VipConfig) -> list[str]:
    """What is missing for `vip` to run transparently, each in one line ([] when nothing)."""
    families = {ipaddress.ip_address(m.address.host).version for m in vip.members}
    for version in sorted(families):
        missing = _capability(version)
        if missing:
            return [missing]
    try:
        rules = {version: _ip(version, "rule", "show") for version in families}
        found = []
        for member in vip.members:
            version = ipaddress.ip_address(member.address.host).version
            route = _ip(version, "route", "get", member.address.host)
            device = route[0].get("dev", "?") if route else "?"
            if not _comes_back(version, rules[version], device):
                found.append(
                    f"replies from member {member.name} ({member.address.host}, reached via "
                    f"{device}) to client addresses would not come back to the gateway: add "
                    f"`ip {'-6 ' if version == 6 else ''}rule add iif {device} lookup 100` and "
                    f"`ip {'-6 ' if version == 6 else ''}route add local <client network> dev lo "
                    f"table 100` ({LAYOUT})")
        return found
    except FileNotFoundError:
        return ["cannot check the routes: the `ip` command (iproute2) is missing"]


def _capability(version: int) -> str:
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            set_ip_flag(probe, TRANSPARENT)
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EACCES):
                return ("needs CAP_NET_ADMIN (or CAP_NET_RAW) to open member connections from "
                        "client addresses (IP_TRANSPARENT): run as root, or add CAP_NET_ADMIN "
                        "to the unit's AmbientCapabilities and CapabilityBoundingSet")
            return f"IP_TRANSPARENT: {exc.strerror or exc}"
    return ""


def _comes_back(version: int, rules: list[dict], device: str) -> bool:
    """A rule for packets arriving on `device` (or any fwmark rule, the iptables layout) into
    a table that delivers some non-local destination locally."""
    for rule in rules:
        table = rule.get("table", "")
        if table in ("local", "main", "default") or not (rule.get("iif") == device
                                                         or "fwmark" in rule):
            continue
        if any(route.get("type") == "local"
               for route in _ip(version, "route", "show", "table", table)):
            return True
    return False


def _ip(version: int, *args: str) -> list[dict]:
    result = subprocess.run(["ip", "-j", f"-{version}", *args], capture_output=True, text=True,
                            timeout=10)
    if result.returncode != 0 or not result.stdout.strip():
        return []
    return json.loads(result.stdout)
