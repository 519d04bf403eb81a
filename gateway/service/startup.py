"""What the gateway makes sure of before it serves anything: open-files limit, the way back
for transparent VIPs, a writable state_dir; StartupError says in one line what is missing."""

from __future__ import annotations

import logging
import os
import resource

import trio

from gateway.config import Config
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
