"""The counting tools of bench/calls.py: cachegrind's counts read and weighed, and the trio
clock a relay under valgrind is given (bench/slowed_clock.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from bench.calls import CACHE_EVENTS, estimated_cycles, instructions
from bench.slowed_clock import SlowedClock

ROOT = Path(__file__).resolve().parent.parent

EVENTS = "Ir I1mr ILmr Dr D1mr DLmr Dw D1mw DLmw"
# two functions: what cachegrind --cache-sim=yes writes, trimmed
CACHEGRIND_OUTPUT = f"""desc: I1 cache: 32768 B, 64 B, 8-way associative
cmd: python3 relay.py
events: {EVENTS}
fl=/usr/src/Python/ceval.c
fn=_PyEval_EvalFrameDefault
10 1000 10 1 400 20 2 100 5 1
11 500 0 0 100 0 0 0 0 0
fl=/usr/src/Python/obmalloc.c
fn=_PyObject_Malloc
7 200 4 0 50 6 1 20 2 0
summary: 1700 14 1 550 26 3 120 7 1
"""


def test_estimated_cycles_weigh_hits_and_misses_as_the_documented_estimate():
    events = dict(zip(EVENTS.split(), [1000, 10, 1, 400, 20, 2, 100, 5, 1]))
    # 35 misses of level 1, 4 of them to memory: 1465 level-1 hits, 31 LL hits, 4 memory
    assert estimated_cycles(events) == 1465 + 5 * 31 + 35 * 4


def test_cachegrind_output_read_as_instructions_or_estimated_cycles(tmp_path):
    output = tmp_path / "relay.cg"
    output.write_text(CACHEGRIND_OUTPUT)
    total, per_function = instructions(output)
    assert total == 1700
    assert per_function == {"ceval.c:_PyEval_EvalFrameDefault": 1500,
                            "obmalloc.c:_PyObject_Malloc": 200}
    total, per_function = instructions(output, cycles=True)
    summary = dict(zip(EVENTS.split(), [1700, 14, 1, 550, 26, 3, 120, 7, 1]))
    assert total == estimated_cycles(summary)
    eval_frame = dict(zip(EVENTS.split(), [1500, 10, 1, 500, 20, 2, 100, 5, 1]))
    assert per_function["ceval.c:_PyEval_EvalFrameDefault"] == estimated_cycles(eval_frame)
    assert [per_function[entry] for entry in CACHE_EVENTS] == [1700, 14, 26 + 7, 1 + 3 + 1]


def test_waits_counted_by_perf_stat_are_read_beside_the_instructions(tmp_path):
    output = tmp_path / "relay.cg"
    output.write_text(CACHEGRIND_OUTPUT)
    output.with_suffix(".waits").write_text(
        "# started on Mon Dec  7\n\n412,,syscalls:sys_enter_epoll_wait,1000,100.00,,\n")
    assert instructions(output)[1]["(waits: epoll_wait calls)"] == 412


def test_the_slowed_clock_runs_as_many_times_slower_as_it_is_told():
    clock = SlowedClock(20)
    clock.start_clock()
    now = clock.current_time()
    # a deadline one second of the clock away is twenty seconds of sleep, less what passed
    assert 19.9 < clock.deadline_to_sleep_time(now + 1) <= 20
    assert clock.deadline_to_sleep_time(now - 1) < 0  # past: no sleep


def test_a_program_run_with_the_slowed_clock_has_it_in_every_trio_run(tmp_path):
    program = tmp_path / "relay.py"
    program.write_text("import sys, trio\n"
                       "async def main():\n"
                       "    clock = trio.lowlevel.current_clock()\n"
                       "    print(type(clock).__name__, clock.slowdown, sys.argv[1:])\n"
                       "trio.run(main)\n")
    said = subprocess.run([sys.executable, str(ROOT / "bench" / "slowed_clock.py"), "7",
                           str(program), "--listen", "1"], capture_output=True, text=True,
                          check=True, timeout=60).stdout
    assert said.split(maxsplit=2) == ["SlowedClock", "7.0", "['--listen', '1']\n"]
