"""What the benchmarks share: ports, processes, HAProxy config, and the side-by-side report."""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # Debian DCMTK keeps Nagle on otherwise
PATHS = ("direct", "haproxy", "medgate")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 15, what: str = "") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listening on port {port} ({what}) after {timeout}s")


def start(args: list[str], log: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(log, "wb"),
                            start_new_session=True, **kwargs)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def haproxy_config(listen: int, target: int, folder: Path, name: str) -> Path:
    path = folder / f"haproxy-{name}.cfg"
    path.write_text(f"""global
    maxconn 4096
defaults
    mode tcp
    timeout connect 4s
    timeout client 1h
    timeout server 1h
frontend fe
    bind 127.0.0.1:{listen}
    default_backend be
backend be
    server m1 127.0.0.1:{target}
""")
    return path


def report(title: str, unit: str, samples: dict[str, list[float]]) -> dict[str, float]:
    medians = {path: statistics.median(values) for path, values in samples.items()}
    print(f"\n{title}")
    for path in PATHS:
        values = ", ".join(f"{v:.1f}" for v in samples[path])
        print(f"  {path:8s} {medians[path]:10.1f} {unit}   (rounds: {values})")
    print(f"  medgate / direct  = {medians['medgate'] / medians['direct']:.2f}")
    print(f"  medgate / haproxy = {medians['medgate'] / medians['haproxy']:.2f}")
    return medians


def medgate(config_text: str, folder: Path, name: str) -> subprocess.Popen:
    """`gateway run` on this config, logging warnings only (per-message INFO lines cost time)."""
    path = folder / f"medgate-{name}.toml"
    path.write_text(f'[gateway]\nadmin = "127.0.0.1:{free_port()}"\n' + config_text)
    return start([sys.executable, "-m", "gateway", "run", "-c", str(path), "--log-level",
                  "warning"], folder / f"medgate-{name}.log")


def dump_logs(folder: Path) -> None:
    for log in sorted(folder.glob("*.log")):
        print(f"--- {log.name}\n{log.read_text(errors='replace')[-2000:]}", file=sys.stderr)
