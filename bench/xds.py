"""XDS benchmark: medgate against the direct path and HAProxy (mode http), side by side.

    python3 bench/xds.py [--queries 2000] [--connections 4] [--megabytes 50] [--rounds 3] [--floor]
                         [--against CHECKOUT]

1. ITI-18 requests/s: --connections keep-alive connections post FindDocuments queries to the
   registry simulator (each waits for its answer before the next).
2. ITI-41 of one --megabytes document (MTOM) with curl to the repository simulator, which
   writes it to disk and registers it; the gateway's peak RSS is sampled during its transfers.

HAProxy routes by path (/registry, /repository); medgate by SOAP action. Interleaved rounds of
one run; medians and ratios. --floor adds "lean" to the ITI-18 row (bench/lean.py --xds: h11
both ways, the action from the Content-Type, one audit line): the least an XDS relay on trio
and h11 costs per request. --against CHECKOUT adds the medgate of another checkout to ITI-18
(before/after in one run).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import PATHS, Lab, Rounds, free_port, peer_python, wait_port  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
PATIENT = "PAT0001^^^&1.2.3.4.5&ISO"
BOUNDARY = "MIMEBoundary_medgate"
MTOM_TYPE = (f'multipart/related; type="application/xop+xml"; boundary="{BOUNDARY}"; '
             f'start="<root.message@medgate>"; start-info="application/soap+xml"; '
             f'action="urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"')


def medgate_vip(listen: int, registry: int, repository: int) -> str:
    return f"""[[vip]]
name = "xds"
protocol = "xds"
listen = "127.0.0.1:{listen}"
health = {{ check = "xds-query", path = "/registry", patient_id = "{PATIENT}", interval = "5s" }}
[[vip.member]]
name = "registry1"
address = "127.0.0.1:{registry}"
role = "registry"
[[vip.member]]
name = "repository1"
address = "127.0.0.1:{repository}"
role = "repository"
"""


def start_members(lab: Lab) -> tuple[int, int]:
    """The registry and repository simulators; their ports, once they listen."""
    registry, repository = free_port(), free_port()
    lab.start([*peer_python(), "-m", "gateway", "simulate", "xds-registry", "--listen",
               f"127.0.0.1:{registry}"], "registry")
    lab.start([*peer_python(), "-m", "gateway", "simulate", "xds-repository", "--listen",
               f"127.0.0.1:{repository}", "--store-dir", str(lab.folder / "store"),
               "--registry", f"http://127.0.0.1:{registry}/registry"], "repository")
    wait_port(registry, what="registry")
    wait_port(repository, what="repository")
    return registry, repository


def query_client(port: int, count: int, connections: int) -> None:
    """Print ITI-18 requests/s over keep-alive connections (run as its own process)."""
    import h11
    import trio

    from gateway.net import http

    body = (FIXTURES / "iti18-find-documents.xml").read_bytes()
    headers = [("Host", f"127.0.0.1:{port}"), ("Content-Length", str(len(body))),
               ("Content-Type", 'application/soap+xml; charset=UTF-8; '
                                'action="urn:ihe:iti:2007:RegistryStoredQuery"')]

    async def one() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        connection = h11.Connection(h11.CLIENT)
        for _ in range(count // connections):
            await http.send(stream, connection, h11.Request(method="POST", target="/registry",
                                                            headers=headers))
            await http.send(stream, connection, h11.Data(data=body))
            await http.send(stream, connection, h11.EndOfMessage())
            while not isinstance(event := await http.next_event(stream, connection),
                                 h11.EndOfMessage):
                if isinstance(event, h11.Response) and event.status_code != 200:
                    raise SystemExit(f"HTTP {event.status_code}")
            connection.start_next_cycle()
        await stream.aclose()

    async def main() -> float:
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(connections):
                nursery.start_soon(one)
        return count // connections * connections / (time.perf_counter() - started)

    print(trio.run(main))


def queries_per_second(port: int, count: int, connections: int) -> float:
    result = subprocess.run([*peer_python(), __file__, "--query-client", str(port), str(count),
                             str(connections)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"query client failed on port {port}: {result.stderr}")
    return float(result.stdout)


def write_mtom(path: Path, megabytes: int) -> None:
    with open(path, "wb") as out:
        out.write(f"--{BOUNDARY}\r\nContent-Type: application/xop+xml; charset=UTF-8; "
                  f"type=\"application/soap+xml\"\r\nContent-ID: <root.message@medgate>\r\n\r\n"
                  .encode())
        out.write((FIXTURES / "iti41-envelope.xml").read_bytes())
        out.write(f"\r\n--{BOUNDARY}\r\nContent-Type: application/pdf\r\n"
                  f"Content-ID: <doc1@medgate>\r\n\r\n".encode())
        block = os.urandom(1024 * 1024)
        for _ in range(megabytes):
            out.write(block)
        out.write(f"\r\n--{BOUNDARY}--\r\n".encode())


class PeakRss:
    """Samples a process's resident set every 10 ms while in a `with` block."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()

    def _rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        return 0

    def __enter__(self) -> PeakRss:
        self.before = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def upload_mb_per_s(port: int, body: Path) -> float:
    size = body.stat().st_size
    started = time.perf_counter()
    result = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H",
                             f"Content-Type: {MTOM_TYPE}", "--data-binary", f"@{body}",
                             f"http://127.0.0.1:{port}/repository"], capture_output=True,
                            text=True, timeout=600)
    elapsed = time.perf_counter() - started
    if result.stdout != "200":
        raise SystemExit(f"ITI-41 failed on port {port}: {result.stdout} {result.stderr}")
    return size / elapsed / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--megabytes", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--floor", action="store_true",
                        help="also measure ITI-18 through bench/lean.py --xds")
    parser.add_argument("--against", type=Path, metavar="CHECKOUT",
                        help="also measure the medgate of another checkout (before/after)")
    parser.add_argument("--query-client", nargs=3, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.query_client:
        return query_client(*args.query_client)
    if not shutil.which("haproxy") or not shutil.which("curl"):
        raise SystemExit("haproxy and curl are needed: apt-get install haproxy curl")
    with Lab() as lab:
        registry, repository = start_members(lab)
        hap, gate = free_port(), free_port()
        # HAProxy routes by path: it cannot read the SOAP action as medgate does.
        haproxy = lab.haproxy(hap, [registry], "xds", mode="http", backend_extra=(
            "    option http-keep-alive\n"
            f"    use-server repository if {{ path_beg /repository }}\n"
            f"    server repository 127.0.0.1:{repository} weight 0\n"))
        gateway = lab.medgate(medgate_vip(gate, registry, repository), "xds")
        query_ports = {"direct": registry, "haproxy": hap, "medgate": gate}
        upload_ports = {"direct": repository, "haproxy": hap, "medgate": gate}
        proxies = {"direct": None, "haproxy": haproxy, "medgate": gateway}
        query_paths = PATHS
        if args.floor:
            query_paths, query_ports["lean"] = (*PATHS, "lean"), free_port()
            proxies["lean"] = lab.start([
                sys.executable, str(ROOT / "bench" / "lean.py"), str(query_ports["lean"]),
                str(registry), str(repository), "--audit", str(lab.folder / "audit-lean.jsonl"),
                "--xds"], "lean")
        if args.against:
            query_paths, query_ports["against"] = (*query_paths, "against"), free_port()
            proxies["against"] = lab.medgate(medgate_vip(query_ports["against"], registry,
                                                         repository), "xds-against",
                                             tree=args.against)
        for path, port in query_ports.items():
            wait_port(port, what=path)
        body = lab.folder / "iti41.bin"
        write_mtom(body, args.megabytes)
        print(f"ITI-18: {args.queries} queries over {args.connections} keep-alive connections; "
              f"ITI-41: one {args.megabytes} MB document; {args.rounds} interleaved rounds")
        queries = Rounds("ITI-18 FindDocuments", "req/s", "req", query_paths)
        uploads = Rounds(f"ITI-41 of a {args.megabytes} MB document", "MB/s", "MB")
        megabytes = body.stat().st_size / 1e6
        count = args.queries // args.connections * args.connections
        peaks = []
        for _ in range(args.rounds):
            for path in query_paths:
                queries.measure(path, proxies[path], count, lambda: queries_per_second(
                    query_ports[path], args.queries, args.connections))
            for path in PATHS:
                if path == "medgate":
                    with PeakRss(gateway.pid) as rss:
                        uploads.measure(path, gateway, megabytes,
                                        lambda: upload_mb_per_s(upload_ports[path], body))
                    peaks.append((rss.before, rss.peak))
                else:
                    uploads.measure(path, proxies[path], megabytes,
                                    lambda: upload_mb_per_s(upload_ports[path], body))
        queries.report()
        uploads.report()
        growth = max(peak - before for before, peak in peaks) / 1024
        print(f"\nmedgate RSS during the ITI-41 transfers: before {peaks[0][0] / 1024:.1f} MB, "
              f"peak {max(p for _, p in peaks) / 1024:.1f} MB, largest growth {growth:+.1f} MB")

if __name__ == "__main__":
    main()
