"""What the gateway makes sure of before it serves anything: open-files limit, the way back
for transparent VIPs, a writable state_dir; StartupError says in one line what is missing.
`host_problems` tells `run --check-config` what `run` would refuse on this host."""

from __future__ import annotations

import logging
import os
import resource
from pathlib import Path

import trio

from gateway.config import Address, Config
from gateway.privacy import key_path
from gateway.net import transparent

log = logging.getLogger("medgate")


class StartupError(Exception):
    """The gateway could not start (a port in use, no permission); the message says which VIP."""


def raise_fd_limit() -> int:
    """A proxy holds two sockets per client: lift the soft open-files limit to the hard one.
    Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # an unlimited or too large hard limit
            return soft
        log.debug("open files limit raised from %d to %d", soft, hard)
        return hard
    return soft


async def check_transparent(config: Config) -> None:
    """StartupError naming what is missing for a `transparent = true` VIP (the capability,
    the way back for members' replies), before any client would fail."""
    for vip in config.vips:
        if vip.transparent:
            missing = await trio.to_thread.run_sync(transparent.problems, vip)
            if missing:
                more = (f" (and {len(missing) - 1} more: gateway check -c)"
                        if len(missing) > 1 else "")
                raise StartupError(f"vip {vip.name!r}: transparent: {missing[0]}{more}")
            log.info("vip=%s transparent: members see each client's own address", vip.name)


def make_state_dir(state_dir: str) -> None:
    """The folder kept across restarts, created and writable (StartupError if not)."""
    try:
        os.makedirs(state_dir, exist_ok=True)
    except OSError as exc:
        raise StartupError(f"[gateway] state_dir {state_dir}: {exc.strerror}") from None
    if not os.access(state_dir, os.W_OK):
        raise StartupError(f"[gateway] state_dir {state_dir}: not writable")


CAP_NET_BIND_SERVICE = 10  # capability(7) bit: bind ports below ip_unprivileged_port_start


def lowest_bindable_port(status: str | None = None, unprivileged_start: str | None = None) -> int:
    """The lowest TCP port this process may listen on: 0 with CAP_NET_BIND_SERVICE in its
    effective set, else net.ipv4.ip_unprivileged_port_start (1024 unless changed). `status`
    and `unprivileged_start` are /proc's texts, read when not given."""
    try:
        status = status if status is not None else Path("/proc/self/status").read_text()
        effective = next(int(line.split()[1], 16) for line in status.splitlines()
                         if line.startswith("CapEff:"))
        if effective >> CAP_NET_BIND_SERVICE & 1:
            return 0
        start = (unprivileged_start if unprivileged_start is not None else
                 Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
        return int(start.strip())
    except (OSError, StopIteration, ValueError, IndexError):
        return 0 if os.geteuid() == 0 else 1024


def host_problems(config: Config, lowest_port: int | None = None) -> list[str]:
    """What `run` would refuse on this host that the config's own checks cannot see: ports it
    may not listen on, and files and folders it cannot write."""
    settings, problems = config.gateway, []
    lowest = lowest_bindable_port() if lowest_port is None else lowest_port
    listening: list[tuple[str, Address]] = [
        (f"vip {vip.name!r}: listen", address) for vip in config.vips for address in vip.listen]
    listening += [(f"vip {vip.name!r}: return_listen", vip.return_listen)
                  for vip in config.vips if vip.return_listen is not None]
    if settings.admin is not None:
        listening.append(("[gateway] admin", settings.admin))
    for what, address in listening:
        if 0 < address.port < lowest:
            problems.append(f"{what} {address}: ports below {lowest} need root or "
                            "CAP_NET_BIND_SERVICE, which this process has not")
    if settings.audit not in ("", "-"):
        problems += [f"[gateway] audit: {problem}" for problem in _file_problem(settings.audit)]
    if settings.state_dir:
        problems += [f"[gateway] state_dir: {problem}"
                     for problem in _folder_problem(settings.state_dir)]
    key = key_path(settings.state_dir, settings.hash_key_file)
    if settings.hash_key_file and not Path(key).exists():
        problems += [f"[gateway] hash_key_file: {problem}" for problem in _file_problem(key)]
    if settings.atna is not None:
        problems += [f"[gateway] atna spool: {problem}"
                     for problem in _folder_problem(settings.atna.spool)]
    return problems


def _file_problem(path_text: str) -> list[str]:
    """Why this process could not write the file (checked without creating it)."""
    path = Path(path_text)
    if path.is_dir():
        return [f"{path} is a directory"]
    if path.exists():
        return [] if os.access(path, os.W_OK) else [f"{path} is not writable by this user"]
    if not path.parent.is_dir():
        return [f"{path}: its directory {path.parent} does not exist"]
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return [f"{path}: its directory {path.parent} is not writable by this user"]
    return []


def _folder_problem(path_text: str) -> list[str]:
    """Why this process could not write in the folder, or make it (made at start)."""
    path = Path(path_text)
    if path.exists():
        if not path.is_dir():
            return [f"{path} is not a folder"]
        return [] if os.access(path, os.W_OK | os.X_OK) else [
            f"{path} is not writable by this user"]
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return [f"{path} cannot be made: {parent} is not a writable folder"]
    return []
