"""Function calls per HL7 message, DICOM association or ITI-18 request (cProfile), medgate
beside lean: the measure of the
performance goal that does not move with the machine (CPU per unit does, by a third on the
shared 2-core machines). Each relay runs under cProfile twice, once carrying N messages and
once 3N; the difference of the two call counts over 2N is its calls per message, with start,
stop and everything else a run does once cancelled out.

    python3 bench/calls.py [--messages 1000] [--connections 1] [--top 25] [--repeat N]
                           [--dicom | --tls | --xds]
                           [--syscalls | --exceptions | --instructions | --cycles
                            | --bytecodes]

medgate runs as a site runs it (audit log to a file, INFO logs, passive health, limits); its
health checks are hourly here, so that they, which cost per second and not per message, do not
count. `--top` prints medgate's functions by their calls per unit (of the last run).
`--repeat N` measures each relay N times, the two taking turns, and reports the medians.
The relay under test runs alone on one CPU, its peers on the others (`--no-pin`: all share
them): a peer woken on the relay's CPU could preempt it between a write and the read of the
answer, which then took no wait, and with many connections the counts moved by tens of calls
from run to run; pinned, they agree within a few.
`--syscalls` counts system calls per unit instead (perf stat's syscall tracepoints, which do
not slow the relay as strace or cProfile would, so its waits come as they would): what a unit
costs in the kernel and in the exceptions of reads that meet EAGAIN, which the Python call
counts do not show. `--exceptions` counts the exceptions raised per unit, by kind and place
(a raise and its catch cost about as much as a dozen calls, and cProfile counts none).
`--instructions` counts the machine instructions the relay executes per unit in user space
(valgrind's cachegrind, about 11 x slower; by C function): a call is not a fixed cost (an
enum member's attribute costs Python 3.11 four plain ones), and this is CPU per unit that
the machine's load does not move, less the kernel's part. Its peers run under cachegrind
too, slowed as the relay is, so that the relay meets their bytes as it would at full speed
(`--fast-peers`: not slowed; lean then found the next ITI-18 request already there and
waited once a request, not twice); with perf, the relay's waits per unit are printed beside
the counts, to hold against `--syscalls`. The relay's trio clock is slowed as much as the
relay (`--slowdown`, bench/slowed_clock.py), so that its timers come due after as many
units as at full speed: with the real clock, over 64 connections, medgate's 200 ms watch
of a member's answer came due as it does not at full speed (1.90 x lean, not 1.22).
`--cycles` weighs the instructions with the misses of simulated caches (an estimate of
cycles: what a larger working set costs).
`--bytecodes` counts the bytecodes executed per unit, by Python function (sys.settrace).
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/profile.py would stand in for the standard library's profile, which cProfile imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import cProfile  # noqa: E402
import pstats  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator, Mapping  # noqa: E402
from enum import StrEnum  # noqa: E402
from functools import partial  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (VALGRIND, Lab, _children, cpu_split, free_port,  # noqa: E402
                          peer_python, wait_port)
from bench.dicom import association_rate, medgate_vip as dicom_vip  # noqa: E402
from bench.hl7 import medgate_vip, run_senders, start_receivers  # noqa: E402
from bench.slowed_clock import run_program  # noqa: E402
from bench.tls import write_certificates  # noqa: E402
from bench.xds import medgate_vip as xds_vip, queries_per_second, start_members  # noqa: E402


RELAY_CPUS: set[int] | None = None  # the CPU of the relay under test; its peers get the others


class Measure(StrEnum):
    """What is counted per unit."""

    CALLS = "calls"  # Python function calls (cProfile)
    SYSCALLS = "system calls"  # perf stat's syscall tracepoints
    EXCEPTIONS = "exceptions"  # raised, by where (sys.settrace): each costs as a dozen calls
    INSTRUCTIONS = "instructions"  # user-space, counted by valgrind (cachegrind)
    CYCLES = "estimated cycles"  # the instructions and the simulated caches' misses, weighed
    BYTECODES = "bytecodes"  # the interpreter's, by Python function (sys.settrace)

    @property
    def suffix(self) -> str:
        return {"calls": "prof", "system calls": "perf", "exceptions": "json",
                "instructions": "cg", "estimated cycles": "cg",
                "bytecodes": "json"}[self.value]

    @property
    def under_valgrind(self) -> str:
        """The key of common.VALGRIND this count runs under (BENCH_PEERS_SLOWED's value for
        its peers); "" for the counts taken at full speed."""
        return {"instructions": "1", "estimated cycles": "cache-sim"}.get(self.value, "")


def profiled(output: str, target: list[str], measure: Measure) -> None:
    """Run `target` (`-m module args` or `script args`) in this process under cProfile, or
    with `measure` EXCEPTIONS a tracer of the exceptions raised, and write what it counted to
    `output` when it ends (SIGTERM ends it, as a service)."""
    def interrupt(_signal, _frame):
        raise KeyboardInterrupt  # for a target without its own SIGTERM handling (lean)

    signal.signal(signal.SIGTERM, interrupt)
    counted = {Measure.EXCEPTIONS: exceptions_counted,
               Measure.BYTECODES: bytecodes_counted}.get(measure, calls_counted)
    with counted(output):
        try:
            run_program(target)
        except (SystemExit, KeyboardInterrupt):
            pass


@contextlib.contextmanager
def calls_counted(output: str) -> Iterator[None]:
    """cProfile over the block; its statistics to `output`."""
    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        profile.dump_stats(output)


@contextlib.contextmanager
def exceptions_counted(output: str) -> Iterator[None]:
    """The exceptions raised in the block, by kind and place, to `output` (JSON): counted
    where raised (the traceback has the one frame), not in each frame they pass; not
    StopIteration, which is how a coroutine returns to the task that resumed it."""
    raised: collections.Counter[str] = collections.Counter()

    def frame_events(frame, event, arg):
        if (event == "exception" and arg[0] is not StopIteration
                and getattr(arg[2], "tb_next", None) is None):
            code = frame.f_code
            raised[f"{arg[0].__name__} at {Path(code.co_filename).name}:"
                   f"{frame.f_lineno}({code.co_name})"] += 1
        return frame_events

    sys.settrace(lambda frame, event, arg: frame_events)
    try:
        yield
    finally:
        sys.settrace(None)
        Path(output).write_text(json.dumps(raised))


@contextlib.contextmanager
def bytecodes_counted(output: str) -> Iterator[None]:
    """The bytecodes executed in the block, by function, to `output` (JSON)."""
    executed: collections.Counter[str] = collections.Counter()
    names: dict[object, str] = {}

    def frame_events(frame, event, arg):
        if event == "opcode":
            code = frame.f_code
            name = names.get(code)
            if name is None:
                name = names[code] = (f"{Path(code.co_filename).name}:{code.co_firstlineno}"
                                      f"({code.co_name})")
            executed[name] += 1
        elif event == "call":
            frame.f_trace_opcodes = True
        return frame_events

    sys.settrace(frame_events)
    try:
        yield
    finally:
        sys.settrace(None)
        Path(output).write_text(json.dumps(executed))


def calls(stats_file: Path) -> tuple[int, dict[str, int]]:
    """Total calls, and calls per function ('file:line(name)')."""
    stats = pstats.Stats(str(stats_file))
    per_function = {f"{Path(file).name}:{line}({name})": row[1]
                    for (file, line, name), row in stats.stats.items()}  # type: ignore[attr-defined]
    return stats.total_calls, per_function  # type: ignore[attr-defined]


def counted_by_place(output: Path) -> tuple[int, dict[str, int]]:
    """Exceptions raised or bytecodes executed in all, and by place (the tracers' JSON)."""
    by_place = json.loads(output.read_text())
    return sum(by_place.values()), by_place


SYSCALLS = ("read", "recvfrom", "write", "sendto", "epoll_wait", "epoll_ctl", "ioctl",
            "getsockopt", "setsockopt", "accept4", "connect", "socket", "close", "fcntl",
            "getpid", "futex", "poll")


def syscalls(perf_output: Path) -> tuple[int, dict[str, int]]:
    """Total system calls, and the count of each of SYSCALLS, from `perf stat -x,`'s file."""
    counts = {}
    for line in perf_output.read_text().splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[0].isdigit():
            counts[fields[2].rpartition(":")[2].removeprefix("sys_enter_")] = int(fields[0])
    total = counts.pop("raw_syscalls", 0) or counts.pop("sys_enter", 0)
    if not total:
        raise SystemExit(f"perf stat counted no system calls ({perf_output}): root, or "
                         "kernel.perf_event_paranoid <= -1, is needed for its tracepoints")
    return total, counts


# How many times slower a relay runs under cachegrind, without and with its caches simulated
# (HL7's CPU a message, lean and medgate alike: 11 and 27 x on the 2-core machine)
SLOWDOWN = {Measure.INSTRUCTIONS: 11.0, Measure.CYCLES: 27.0}
WAITS = "(waits: epoll_wait calls)"  # instructions' entry for perf stat's count of them
# --cycles' entries for what the estimate weighs: cachegrind's events, summed
CACHE_EVENTS = {"(instructions)": ("Ir",), "(I1 misses)": ("I1mr",),
                "(D1 misses)": ("D1mr", "D1mw"), "(LL misses)": ("ILmr", "DLmr", "DLmw")}


def estimated_cycles(events: Mapping[str, int]) -> int:
    """Cycles from cachegrind's counts, weighed as Itamar Turner-Trauring's estimate (a
    level-1 hit 1, a last-level hit 5, a memory access 35; pythonspeed.com, "CI for
    performance: reliable benchmarking in noisy environments"). An estimate: it knows
    nothing of branch prediction or of instructions run side by side, but it weighs what a
    larger working set costs, which a count of instructions does not see."""
    l1_misses = events["I1mr"] + events["D1mr"] + events["D1mw"]
    memory = events["ILmr"] + events["DLmr"] + events["DLmw"]
    l1_hits = events["Ir"] + events["Dr"] + events["Dw"] - l1_misses
    return l1_hits + 5 * (l1_misses - memory) + 35 * memory


def instructions(cachegrind_output: Path, cycles: bool = False) -> tuple[int, dict[str, int]]:
    """Instructions executed (`cycles`: estimated cycles) in all, and by function
    ('file:function', the interpreter's own for Python code), from cachegrind's output
    file; with `cycles`, CACHE_EVENTS' entries too; and WAITS, perf stat's count of the
    relay's waits, where there is one."""
    by_function: dict[str, collections.Counter[str]] = collections.defaultdict(
        collections.Counter)
    names: list[str] = []
    where = ""
    source = ""
    for line in cachegrind_output.read_text().splitlines():
        if line.startswith("fl="):
            source = Path(line[3:]).name
        elif line.startswith("fn="):
            where = f"{source}:{line[3:]}"
        elif line.startswith("events:"):
            names = line.split()[1:]
        elif line.startswith("summary:"):
            summary = dict(zip(names, map(int, line.split()[1:])))
        elif line[:1].isdigit():
            by_function[where].update(dict(zip(names, map(int, line.split()[1:]))))
    weigh = estimated_cycles if cycles else (lambda events: events["Ir"])
    per_function = {where: weigh(events) for where, events in by_function.items()}
    if cycles:
        per_function.update({entry: sum(summary[event] for event in events)
                             for entry, events in CACHE_EVENTS.items()})
    waits = cachegrind_output.with_suffix(".waits")
    if waits.exists():
        per_function[WAITS] = sum(int(fields[0]) for line in waits.read_text().splitlines()
                                  if (fields := line.split(","))[0].isdigit())
    return weigh(summary), per_function


def measure(lab: Lab, name: str, command: list[str], port: int, messages: int,
            connections: int, workload: str, ca: str = "",
            tag: str = "", counted: Measure = Measure.CALLS,
            slowdown: float = 1) -> tuple[int, dict[str, int]]:
    """What the relay did for `messages` units of `workload` ("hl7", "dicom" associations,
    "xds" ITI-18 requests), in all and by function, system call, exception or place: one run
    of it under cProfile, `perf stat` (tracepoints: no slowdown to speak of, so the waits
    come as they would), cachegrind (its trio clock `slowdown` times slower) or a tracer,
    its counts in NAME-TAG.SUFFIX (TAG: `messages` unless given)."""
    tag = tag or str(messages)
    output = lab.folder / f"{name}-{tag}.{counted.suffix}"
    perf: list[str] = []  # perf stat around the relay: the relay is its child
    if counted is Measure.SYSCALLS:
        events = ",".join(["raw_syscalls:sys_enter",
                           *(f"syscalls:sys_enter_{call}" for call in SYSCALLS)])
        perf = ["perf", "stat", "-x,", "-o", str(output), "-e", events, "--"]
        process = lab.start([*perf, sys.executable, *command], f"{name}-{tag}", cwd=ROOT)
    elif counted.under_valgrind:
        if shutil.which("perf"):  # where there is one, it counts the waits valgrind makes
            perf = ["perf", "stat", "-x,", "-o", str(output.with_suffix(".waits")), "-e",
                    "syscalls:sys_enter_epoll_wait", "--"]
        clock = ([str(ROOT / "bench" / "slowed_clock.py"), f"{slowdown:g}"]
                 if slowdown != 1 else [])
        process = lab.start([*perf, *VALGRIND[counted.under_valgrind],
                             f"--cachegrind-out-file={output}",
                             sys.executable, *clock, *command], f"{name}-{tag}", cwd=ROOT)
    else:
        process = lab.start([sys.executable, __file__, "--profiled", str(output),
                             "--measure", counted.name, "--", *command], f"{name}-{tag}",
                            cwd=ROOT)
    if RELAY_CPUS is not None:
        os.sched_setaffinity(process.pid, RELAY_CPUS)
    wait_port(port, timeout=120, what=name)
    if workload == "dicom":
        association_rate(port, messages, connections)
    elif workload == "xds":
        queries_per_second(port, messages, connections)
    else:
        run_senders(port, messages, connections, ca)
    for relay in _children(process.pid) if perf else [process.pid]:
        os.kill(relay, signal.SIGTERM)  # perf stat writes its counts when its command ends
    process.wait(60)
    deadline = time.monotonic() + 30
    while not (output.exists() and output.stat().st_size) and time.monotonic() < deadline:
        time.sleep(0.1)
    return {Measure.CALLS: calls, Measure.SYSCALLS: syscalls,
            Measure.EXCEPTIONS: counted_by_place, Measure.BYTECODES: counted_by_place,
            Measure.INSTRUCTIONS: instructions,
            Measure.CYCLES: partial(instructions, cycles=True)}[counted](output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--dicom", action="store_true",
                        help="associations (A-ASSOCIATE, C-ECHO, A-RELEASE) instead of HL7 "
                             "messages, against bench/dicom.py's verification SCP")
    parser.add_argument("--tls", action="store_true",
                        help="HL7 over MLLP/TLS from the sender (both relays terminate TLS)")
    parser.add_argument("--xds", action="store_true",
                        help="ITI-18 FindDocuments requests over keep-alive connections, "
                             "against bench/xds.py's registry simulator")
    parser.add_argument("--repeat", type=int, default=1, metavar="N",
                        help="measure each relay N times, taking turns; report the medians "
                             "(lean's own count moves by 10-30 calls between runs with many "
                             "connections)")
    parser.add_argument("--no-pin", action="store_true",
                        help="let the relay under test share the CPUs with its peers")
    counting = parser.add_mutually_exclusive_group()
    counting.add_argument("--syscalls", action="store_const", dest="counted",
                          const=Measure.SYSCALLS, default=Measure.CALLS,
                          help="count system calls per unit (perf stat's tracepoints), not "
                               "Python calls")
    counting.add_argument("--exceptions", action="store_const", dest="counted",
                          const=Measure.EXCEPTIONS,
                          help="count the exceptions raised per unit, by kind and place "
                               "(sys.settrace; a StopIteration, how a coroutine returns, is "
                               "not counted)")
    counting.add_argument("--instructions", action="store_const", dest="counted",
                          const=Measure.INSTRUCTIONS,
                          help="count the relay's user-space instructions per unit (valgrind's "
                               "cachegrind; about 11 x slower), by C function: the CPU measure "
                               "that does not move with the machine, less the kernel's part")
    counting.add_argument("--cycles", action="store_const", dest="counted",
                          const=Measure.CYCLES,
                          help="estimate the relay's user-space cycles per unit: its "
                               "instructions and the misses of simulated caches (cachegrind "
                               "--cache-sim, fixed sizes; about 27 x slower), weighed")
    counting.add_argument("--bytecodes", action="store_const", dest="counted",
                          const=Measure.BYTECODES,
                          help="count the bytecodes executed per unit, by Python function "
                               "(sys.settrace: where the interpreter's instructions go)")
    parser.add_argument("--fast-peers", action="store_true",
                        help="with --instructions or --cycles: the peers at full speed, not "
                             "slowed as the relay is (the relay then finds its next request "
                             "already there more often than it would)")
    parser.add_argument("--slowdown", type=float, metavar="F",
                        help="with --instructions or --cycles: how many times slower the "
                             "relay's trio clock runs (bench/slowed_clock.py), so that its "
                             "timers come due after as many units as at full speed; by "
                             f"default {SLOWDOWN[Measure.INSTRUCTIONS]:g} and "
                             f"{SLOWDOWN[Measure.CYCLES]:g}, as much slower as the relay runs "
                             "under each (1: the real clock)")
    parser.add_argument("--save", type=Path, metavar="DIR",
                        help="keep each run's counts there (cProfile's pstats files, perf "
                             "stat's, cachegrind's, the tracers' JSON)")
    parser.add_argument("--profiled", help=argparse.SUPPRESS)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.profiled:
        return profiled(args.profiled, rest[1:] if rest[:1] == ["--"] else rest,
                        Measure[args.measure])
    if args.counted is Measure.SYSCALLS and not shutil.which("perf"):
        raise SystemExit("--syscalls needs perf: apt-get install linux-perf")
    slowed = args.counted.under_valgrind
    if args.slowdown is None or not slowed:
        args.slowdown = SLOWDOWN.get(args.counted, 1)
    if slowed and not shutil.which("valgrind"):
        raise SystemExit("--instructions and --cycles need valgrind: apt-get install valgrind")
    if slowed and not args.fast_peers:  # the peers started from here (peer_python)
        os.environ["BENCH_PEERS_SLOWED"] = slowed
    small, large = args.messages, 3 * args.messages
    global RELAY_CPUS
    split = None if args.no_pin else cpu_split()
    if split is not None:
        RELAY_CPUS, peers = split
        os.sched_setaffinity(0, peers)  # the peers, started from here, inherit it
    workload = "dicom" if args.dicom else "xds" if args.xds else "hl7"
    unit = {"dicom": "association", "xds": "request"}.get(workload, "message")
    with Lab() as lab:
        if args.dicom:
            receivers = [free_port()]
            lab.start([*peer_python(), str(ROOT / "bench" / "dicom.py"), "--serve-echo",
                       str(receivers[0])], "echo-scp")
            wait_port(receivers[0], what="echo SCP")
        elif args.xds:
            receivers = list(start_members(lab))  # the registry, the repository
        else:
            receivers = start_receivers(lab)
        pki = write_certificates(lab.folder) if args.tls else {}
        def run_pair(name: str, attempt: int) -> tuple[float, dict[str, float]]:
            """`name`'s calls per unit (the N and 3N runs' difference), and per function."""
            per_run = []
            tags = {messages: f"{messages}" if attempt == 0 else f"{messages}-{attempt}"
                    for messages in (small, large)}
            for messages, tag in tags.items():
                port = free_port()
                if name == "lean":
                    command = [str(ROOT / "bench" / "lean.py"), str(port), *map(str, receivers),
                               "--audit", str(lab.folder / f"audit-lean-{tag}.jsonl"),
                               *([f"--{workload}"] if workload != "hl7" else []),
                               *(["--cert", pki["server"], "--key", pki["server_key"]]
                                 if args.tls else [])]
                else:
                    tls = (f'tls = {{ cert = "{pki["server"]}", key = "{pki["server_key"]}" }}'
                           if args.tls else "")
                    vip = (dicom_vip(port, receivers[0], "pacs") if args.dicom
                           else xds_vip(port, *receivers) if args.xds
                           else medgate_vip(port, receivers, tls))
                    config = lab.folder / f"medgate-{tag}.toml"
                    config.write_text(
                        f'[gateway]\nadmin = "127.0.0.1:{free_port()}"\n'
                        f'audit = "{lab.folder / f"audit-medgate-{tag}.jsonl"}"\n'
                        + vip.replace('interval = "5s"', 'interval = "1h"'))
                    command = ["-m", "gateway", "run", "-c", str(config), "--log-level", "info"]
                per_run.append(measure(lab, name, command, port, messages, args.connections,
                                       workload, pki.get("ca", ""), tag, args.counted,
                                       args.slowdown))
            (total_small, functions_small), (total_large, functions_large) = per_run
            if args.save:
                args.save.mkdir(parents=True, exist_ok=True)
                for tag in tags.values():
                    shutil.copy(lab.folder / f"{name}-{tag}.{args.counted.suffix}", args.save)
            per_message = {function: (functions_large.get(function, 0)
                                      - functions_small.get(function, 0)) / (large - small)
                           for function in functions_large}
            return (total_large - total_small) / (large - small), per_message

        # lean and medgate take turns, so that a busy spell of the machine falls on both
        counts: dict[str, list[float]] = {"lean": [], "medgate": []}
        functions: dict[str, dict[str, float]] = {}
        for attempt in range(args.repeat):
            for name in ("lean", "medgate"):
                total, functions[name] = run_pair(name, attempt)
                counts[name].append(total)
        lean, medgate = statistics.median(counts["lean"]), statistics.median(counts["medgate"])
        what = ("DICOM associations" if args.dicom else "ITI-18 requests" if args.xds else
                "HL7 messages over TLS" if args.tls else "HL7 messages")
        print(f"{what} over {args.connections} client(s), {small} and {large}"
              + (f", {args.repeat} times (medians; each run's count after it)"
                 if args.repeat > 1 else "") + ":")
        for name, median in (("lean", lean), ("medgate", medgate)):
            each = (" (" + ", ".join(f"{count:.1f}" for count in counts[name]) + ")"
                    if args.repeat > 1 else "")
            ratio = f" ({medgate / lean:.2f} x lean)" if name == "medgate" else ""
            print(f"  {name:<8} {median:7.1f} {args.counted} per {unit}{ratio}{each}")
        if WAITS in functions["lean"]:
            print("  waits per " + unit + ": " + ", ".join(
                f"{name} {functions[name].pop(WAITS, 0):.2f}" for name in ("lean", "medgate"))
                  + " (epoll_wait under valgrind, last run; --syscalls: at full speed)")
        if args.counted is Measure.CYCLES:
            print(f"\n{'lean':>11} {'medgate':>11}  per {unit}, what the estimate weighs "
                  "(last run)")
            for entry in CACHE_EVENTS:
                each = [functions[name].pop(entry) for name in ("lean", "medgate")]
                ratio = f" ({each[1] / each[0]:.2f} x lean)" if each[0] >= 1 else ""
                print(f"{each[0]:11.1f} {each[1]:11.1f}  {entry[1:-1]}{ratio}")
        if args.counted is Measure.SYSCALLS:
            print(f"\n{'system call':<12} {'lean':>7} {'medgate':>8}  (per {unit}, last run)")
            for call in SYSCALLS:
                print(f"  {call:<12} {functions['lean'].get(call, 0):7.2f} "
                      f"{functions['medgate'].get(call, 0):8.2f}")
        elif args.counted is not Measure.CALLS:
            what_by = {Measure.EXCEPTIONS: "by kind and place",
                       Measure.INSTRUCTIONS: "by C function",
                       Measure.CYCLES: "by C function",
                       Measure.BYTECODES: "by Python function"}[args.counted]
            print(f"\n{'lean':>9} {'medgate':>9}  {args.counted} per {unit} {what_by} "
                  f"(top {args.top} by the larger, last run)")
            places = functions["lean"].keys() | functions["medgate"].keys()
            ranked = sorted(places, key=lambda place: -max(
                functions["lean"].get(place, 0), functions["medgate"].get(place, 0)))
            for place in ranked[:args.top]:
                counts_here = [functions[name].get(place, 0) for name in ("lean", "medgate")]
                if max(counts_here) >= 0.05:  # not what start and stop do once
                    print(f"{counts_here[0]:9.2f} {counts_here[1]:9.2f}  {place}")
        elif args.top:
            print(f"\nmedgate's functions by calls per {unit} (top {args.top}, last run):")
            ranked = sorted(functions["medgate"].items(), key=lambda item: -item[1])
            for function, count in ranked[:args.top]:
                print(f"  {count:6.2f}  {function}")

if __name__ == "__main__":
    main()
