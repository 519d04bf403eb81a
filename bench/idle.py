"""Memory per idle client: 1,000 idle clients on each of an HL7, an XDS and a TCP VIP, then
closed again. Prints the gateway's RSS at start, with the clients, and after they have gone,
beside HAProxy (TCP mode) holding the same 3,000 idle connections.

    python3 bench/idle.py [--clients 1000]
"""

from __future__ import annotations

import argparse
import resource
import selectors
import socket
import threading
import time
from pathlib import Path

from common import Lab, free_port, wait_port


class DrainServer:
    """A member that takes connections and closes each when its peer does (one thread)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
        self.listener.setblocking(False)
        self.port = self.listener.getsockname()[1]
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.running = True
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while self.running:
            for key, _ in self.selector.select(0.2):
                if key.fileobj is self.listener:
                    try:
                        conn, _ = self.listener.accept()
                    except BlockingIOError:
                        continue
                    conn.setblocking(False)
                    self.selector.register(conn, selectors.EVENT_READ)
                else:
                    try:
                        data = key.fileobj.recv(65536)
                    except (BlockingIOError, ConnectionError):
                        data = b""
                    if not data:
                        self.selector.unregister(key.fileobj)
                        key.fileobj.close()

    def close(self) -> None:
        self.running = False


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def open_idle(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(count)]


def measure(pid: int, ports: list[int], count: int, rounds: int = 3) -> list[int]:
    """RSS at start, then holding and after closing, for each round of clients."""
    time.sleep(1)
    samples = [rss_kib(pid)]
    for _ in range(rounds):
        clients = [sock for port in ports for sock in open_idle(port, count)]
        time.sleep(2)
        samples.append(rss_kib(pid))
        for sock in clients:
            sock.close()
        time.sleep(3)
        samples.append(rss_kib(pid))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000, help="idle clients per VIP")
    count = parser.parse_args().clients
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    member = DrainServer()
    with Lab() as lab:
        member_port = member.port
        ports = {name: free_port() for name in ("hl7", "xds", "tcp")}
        config = ""
        for name, port in ports.items():
            config += f"""
[[vip]]
name = "{name}"
protocol = "{name}"
listen = "127.0.0.1:{port}"
max_clients = {count * 2}
{'header_timeout = "60s"' if name == "xds" else ""}
health = {{ check = "tcp", interval = "1h" }}
[[vip.member]]
name = "m1"
address = "127.0.0.1:{member_port}"
"""
        gateway = lab.medgate(config, "idle")
        for port in ports.values():
            wait_port(port, what="medgate")
        haproxy_port = free_port()
        haproxy = lab.haproxy(haproxy_port, [member_port], "idle")
        wait_port(haproxy_port, what="haproxy")
        rows = {"medgate": measure(gateway.pid, list(ports.values()), count),
                "haproxy": measure(haproxy.pid, [haproxy_port] * 3, count)}
    member.close()
    total = count * 3
    print(f"\nRSS with {count} idle clients on each of 3 VIPs ({total} in all), then closed "
          f"again, {len(rows['medgate']) // 2} rounds, in KiB")
    for name, samples in rows.items():
        start, held, closed = samples[0], samples[1::2], samples[2::2]
        print(f"  {name:8s} start {start:7d}  holding {' / '.join(map(str, held))}  "
              f"closed {' / '.join(map(str, closed))}  "
              f"({(held[0] - start) * 1024 / total:.0f} B per idle client; last round "
              f"{closed[-1] - closed[0]:+d} KiB over the first)")
    medgate, haproxy = (samples[1] - samples[0] for samples in rows.values())
    print(f"  medgate / haproxy memory per idle client = {medgate / max(haproxy, 1):.2f}")
    print("  (memory freed by closed clients stays in Python's allocator and serves the next "
          "ones: a later round must not grow)")


if __name__ == "__main__":
    main()
