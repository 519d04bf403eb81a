"""Run a Python program with trio's clock slowed down N times, for a relay counted under
valgrind (calls.py --instructions, --cycles): there the relay runs 20 to 60 times slower,
and with the real clock its timers (the HL7 quick way's 200 ms watch of a member's
answer, a deadline moved once 100 ms have gone) come due after a fraction of the units
they come due after at full speed. Slowed as the relay is, its clock lets the same work
pass between two timers as at full speed.

    python3 bench/slowed_clock.py N (-m module | script) [args...]

Every `trio.run` of the program that names no clock gets one that runs N times slower than
the real one (SlowedClock); a wait of one second sleeps N.
"""

from __future__ import annotations

import random
import runpy
import sys
import time
from pathlib import Path

# bench/ itself is no place to import from: bench/profile.py would stand in for the standard
# library's, bench/hl7.py for an `hl7` package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import trio  # noqa: E402


class SlowedClock(trio.abc.Clock):
    """trio's clock, `slowdown` times slower than the system's; one Python call a read, as
    trio's own (it starts at a large random offset, as trio's does, so no code can take a
    time for a duration)."""

    def __init__(self, slowdown: float) -> None:
        self.slowdown, self.rate = slowdown, 1 / slowdown
        self.offset = random.uniform(10000, 200000)

    def start_clock(self) -> None:
        self.offset -= time.perf_counter() * self.rate

    def current_time(self) -> float:
        return self.offset + time.perf_counter() * self.rate

    def deadline_to_sleep_time(self, deadline: float) -> float:
        return (deadline - self.current_time()) * self.slowdown


def main() -> None:
    slowdown, target = float(sys.argv[1]), sys.argv[2:]
    run = trio.run

    def run_slowed(*args, clock: trio.abc.Clock | None = None, **kwargs):
        return run(*args, clock=clock or SlowedClock(slowdown), **kwargs)

    trio.run = run_slowed  # type: ignore[assignment]
    run_program(target)


def run_program(target: list[str]) -> None:
    """Run `target` (`-m module args` or `script args`) in this process, as its own
    `python` would."""
    if target[0] == "-m":
        sys.argv = [target[1], *target[2:]]
        runpy.run_module(target[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = target
        runpy.run_path(target[0], run_name="__main__")


if __name__ == "__main__":
    main()
