"""What the benchmarks share: ports, processes, HAProxy config, and the side-by-side report."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
from typing import Callable

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # Debian DCMTK keeps Nagle on otherwise
PATHS = ("direct", "haproxy", "medgate")


def worker_counts(text: str) -> list[int]:
    """The value of --workers: "2,4,8"."""
    return [int(part) for part in text.split(",") if part]


_GIVEN: set[int] = set()  # ports free_port handed out in this run


def free_port() -> int:
    """A port nothing listens on, never one handed out before in this run: the kernel may
    offer a port again once its probe socket closes, before the process it was meant for
    binds it (two relays given one port: the second cannot start, and the first carried its
    rounds)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


CACHEGRIND = ["valgrind", "--tool=cachegrind", "--cache-sim=no"]
# The caches cachegrind simulates for calls.py --cycles: fixed, not the host's (which it reads
# from CPUID, and which on these VMs says a direct-mapped LL of 320 MB), so that a count is
# the same on any machine: L1 as on nearly every x86-64 core, an LL of a server's L3 share.
CACHEGRIND_SIMULATED = ["valgrind", "--tool=cachegrind", "--cache-sim=yes",
                        "--I1=32768,8,64", "--D1=32768,8,64", "--LL=16777216,16,64"]
# BENCH_PEERS_SLOWED's values, and the valgrind each runs a relay and its peers under
VALGRIND = {"1": CACHEGRIND, "cache-sim": CACHEGRIND_SIMULATED}


def peer_python() -> list[str]:
    """The command that runs a benchmark's peers (senders, clients, simulated members): Python,
    or, with BENCH_PEERS_SLOWED=1 (calls.py --instructions; =cache-sim: --cycles), Python
    under cachegrind, slowed as the relay it counts is, so that the relay meets its peers'
    bytes as it would at full speed (a relay slowed alone finds the next request already
    there, and skips a wait)."""
    valgrind = _peers_valgrind()
    if valgrind:
        return [*valgrind, "--log-file=/dev/null", "--cachegrind-out-file=/dev/null",
                sys.executable]
    return [sys.executable]


def _peers_valgrind() -> list[str]:
    """The valgrind command the peers run under; none at full speed."""
    return VALGRIND.get(os.environ.get("BENCH_PEERS_SLOWED", ""), [])


def wait_port(port: int, timeout: float = 15, what: str = "") -> None:
    if _peers_valgrind():
        timeout *= 10  # a peer under cachegrind takes that much longer to start
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on port {port} ({what}) after {timeout}s")


class Lab:
    """A temporary folder and the processes a benchmark starts in it; all stopped at the end.

    On an error the logs of every process are printed, then the error goes on.
    """

    def __enter__(self) -> Lab:
        # `timeout` (bench/quiet.sh) ends a benchmark with SIGTERM: an exit, so that what it
        # started is stopped too and does not take the CPUs from the next benchmark
        self.on_sigterm = signal.signal(signal.SIGTERM, _exit_on_signal)
        pinned = pinned_cpus()
        if pinned is not None:  # what it starts inherits it; a round's proxy moves (Rounds)
            os.sched_setaffinity(0, pinned[1])
        self.folder = Path(tempfile.mkdtemp(prefix="medgate-bench-"))
        self.processes: list[subprocess.Popen] = []
        return self

    def start(self, args: list[str], name: str, **kwargs) -> subprocess.Popen:
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                   stderr=open(self.folder / f"{name}.log", "wb"),
                                   start_new_session=True, **kwargs)
        self.processes.append(process)
        return process

    def haproxy(self, listen: int, targets: list[int], name: str, mode: str = "tcp",
                backend_extra: str = "", bind_extra: str = "") -> subprocess.Popen:
        """HAProxy in the foreground, balancing `listen` round robin over `targets`."""
        servers = "\n".join(f"    server m{n} 127.0.0.1:{port}" for n, port in enumerate(targets))
        path = self.folder / f"haproxy-{name}.cfg"
        path.write_text(f"""global
    maxconn 4096
defaults
    mode {mode}
    timeout connect 4s
    timeout client 1h
    timeout server 1h
frontend fe
    bind 127.0.0.1:{listen}{bind_extra}
    default_backend be
backend be
    balance roundrobin
{backend_extra}{servers}
""")
        return self.start(["haproxy", "-db", "-f", str(path)], f"haproxy-{name}")

    def medgate(self, config_text: str, name: str, tree: Path | None = None,
                workers: int = 1) -> subprocess.Popen:
        """`gateway run` on this config as a site runs it: the audit log on (a file here) and
        INFO logs (to a file), so their cost is part of what is measured. `tree`: a checkout
        of another version of medgate to run instead of this one (--against); `workers`: its
        [gateway] workers (their CPU counts with the leader's: cpu_by_process)."""
        path = self.folder / f"medgate-{name}.toml"
        path.write_text(f'[gateway]\nadmin = "127.0.0.1:{free_port()}"\n'
                        f'audit = "{self.folder / f"audit-{name}.jsonl"}"\n'
                        + (f"workers = {workers}\n" if workers > 1 else "") + config_text)
        # `python -m gateway` imports the package from the working directory first.
        return self.start([sys.executable, "-m", "gateway", "run", "-c", str(path),
                           "--log-level", "info"], f"medgate-{name}", cwd=tree or ROOT)

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if error is not None:
                for log in sorted(self.folder.glob("*.log")):
                    print(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}",
                          file=sys.stderr)
        except BrokenPipeError:  # `| head` has gone: the processes are stopped all the same
            pass
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
        keep = os.environ.get("BENCH_KEEP")  # a folder to keep the logs and configs in
        if keep:
            shutil.copytree(self.folder, keep, dirs_exist_ok=True)
        shutil.rmtree(self.folder, ignore_errors=True)
        signal.signal(signal.SIGTERM, self.on_sigterm)


def _exit_on_signal(number: int, _frame) -> None:
    raise SystemExit(128 + number)


def cpu_by_process(pid: int) -> dict[int, float]:
    """CPU time so far of a process and of each process it started, by pid: the sum of each
    one's threads' run time in nanoseconds (/proc/PID/task/*/schedstat), where /proc/PID/stat
    counts 10 ms ticks, too coarse for HAProxy's 60 ms over a round of 1,000 HL7 messages. A
    thread that ended during the round would be missed: HAProxy's live as long as it does,
    medgate relays on its main thread and trio keeps its worker threads for 10 s after their
    last job."""
    total = 0
    for schedstat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            total += int(schedstat.read_text().split()[0])
        except (OSError, IndexError, ValueError):
            pass  # the thread ended while it was being read
    found = {pid: total / 1e9}
    for child in _children(pid):
        found.update(cpu_by_process(child))
    return found


def split_line(rounds: list[tuple[float, list[float]]], per: str) -> str:
    """Where a proxy with workers spent its CPU, medians of the rounds: the leader's share,
    and the least and the most a worker spent (how evenly the clients were shared)."""
    leader = statistics.median(own for own, _ in rounds)
    least = statistics.median(workers[0] for _, workers in rounds)
    most = statistics.median(workers[-1] for _, workers in rounds)
    count = len(rounds[-1][1])
    return (f"leader {leader:.1f} us/{per}, {count} workers {least:.1f} to {most:.1f} "
            f"us/{per} each (most / least {most / least if least else float('inf'):.2f})")


def _children(pid: int) -> list[int]:
    """The processes `pid` started (a medgate leader's workers)."""
    found = []
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(child) for child in children.read_text().split()]
        except (OSError, ValueError):
            pass
    return found


def pinned_cpus() -> tuple[set[int], set[int]] | None:
    """With BENCH_PIN=1 on a machine of two CPUs or more: (the proxy's CPU, the others'). The
    proxy of each round runs alone on the first CPU and the clients and servers on the rest,
    so that a peer woken on the proxy's CPU does not preempt it (a shared 2-core machine: the
    CPU per unit then moves less between runs; the rates fall, the peers having fewer CPUs).
    Not for a machine with cores to spare (HAProxy's threads would share one)."""
    return cpu_split() if os.environ.get("BENCH_PIN") == "1" else None


def cpu_split() -> tuple[set[int], set[int]] | None:
    """(the first CPU, the others) of those this process started with; None with one."""
    return ({_CPUS[0]}, set(_CPUS[1:])) if len(_CPUS) > 1 else None


_CPUS = sorted(os.sched_getaffinity(0))  # before the Lab narrows this process's


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` and of the processes it started (medgate's workers) on `cpus`."""
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except (OSError, ValueError):
            pass  # the thread ended meanwhile
    for child in _children(pid):
        set_affinity(child, cpus)


class Rounds:
    """One benchmark row: for each path, the rate of every round and the proxy's CPU time per
    unit (none for the direct path); medians reported side by side. With BENCH_PIN=1 the
    round's proxy has a CPU of its own (pinned_cpus)."""

    def __init__(self, title: str, unit: str, per: str, paths: tuple[str, ...] = PATHS) -> None:
        self.title, self.unit, self.per, self.paths = title, unit, per, paths
        self.rates: dict[str, list[float]] = {path: [] for path in paths}
        self.cpu: dict[str, list[float]] = {path: [] for path in paths}
        # a proxy with workers: (its own CPU per unit, each worker's, least first) each round
        self.split: dict[str, list[tuple[float, list[float]]]] = {path: [] for path in paths}

    def measure(self, path: str, proxy: subprocess.Popen | None, units: float,
                run: Callable[[], float]) -> float:
        """Run one round on `path`: `run()` returns the rate; the CPU time `proxy` spent
        meanwhile is divided by `units` (the messages, associations or MB of the round)."""
        if proxy is not None and proxy.poll() is not None:
            raise SystemExit(f"{path}: its proxy exited with {proxy.returncode} (its log is "
                             "printed below)")
        pinned = pinned_cpus() if proxy is not None else None
        if pinned is not None and proxy is not None:
            set_affinity(proxy.pid, pinned[0])  # the others are on the rest (Lab)
        before = cpu_by_process(proxy.pid) if proxy is not None else {}
        rate = run()
        if proxy is not None:
            spent = {pid: (cpu - before.get(pid, 0.0)) / units * 1e6  # a restarted worker: all
                     for pid, cpu in cpu_by_process(proxy.pid).items()}
            self.cpu[path].append(sum(spent.values()))
            if len(spent) > 1:
                leader = spent.pop(proxy.pid)
                self.split[path].append((leader, sorted(spent.values())))
        if pinned is not None and proxy is not None:
            set_affinity(proxy.pid, pinned[1])
        self.rates[path].append(rate)
        return rate

    def report(self) -> dict[str, float]:
        medians = {path: statistics.median(values) for path, values in self.rates.items()}
        print(f"\n{self.title}")
        for path in self.paths:
            values = ", ".join(f"{v:.1f}" for v in self.rates[path])
            cpu = (f"   proxy CPU {statistics.median(self.cpu[path]):7.1f} us/{self.per}"
                   if self.cpu[path] else "")
            print(f"  {path:8s} {medians[path]:10.1f} {self.unit}{cpu}   (rounds: {values})")
        for path in self.paths:
            if self.split[path]:
                print(f"  {path}: {split_line(self.split[path], self.per)}")
        print(f"  rate: medgate / direct = {medians['medgate'] / medians['direct']:.2f}, "
              f"medgate / haproxy = {medians['medgate'] / medians['haproxy']:.2f}" + "".join(
                  f", {path} / haproxy = {medians[path] / medians['haproxy']:.2f}"
                  for path in self.paths  # wN: medgate with N workers (--workers)
                  if path in ("floor", "lean", "against") or path.startswith("w")))
        cpu = {path: statistics.median(values) for path, values in self.cpu.items() if values}
        if "medgate" in cpu and "haproxy" in cpu:
            floors = "".join(
                f", {path} / haproxy = {cpu[path] / cpu['haproxy']:.2f}, medgate / {path} = "
                f"{cpu['medgate'] / cpu[path]:.2f}" for path in ("floor", "lean", "against")
                if path in cpu)
            print(f"  CPU per {self.per}: medgate / haproxy = {cpu['medgate'] / cpu['haproxy']:.2f}"
                  + floors)
        return medians

