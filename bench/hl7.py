"""HL7 benchmark: medgate (balancing per message) against the direct path and HAProxy (mode tcp).

    python3 bench/hl7.py [--messages 3000] [--connections 20] [--rounds 3] [--floor] [--validate]
                         [--against CHECKOUT] [--workers N[,N...]]

Senders wait for each ACK before the next message, as MLLP senders do. Measured over one
connection and over --connections concurrent connections: messages/s and the latency of each
message (send to ACK), whose p50/p99 above the direct path's is the added latency. The receiver
is medgate's HL7 receiver simulator; medgate balances per message over two of them, HAProxy (per
connection) over the same two. Paths are measured in interleaved rounds of one run; medians.
--floor adds two paths: "floor", a bare trio relay that only copies bytes both ways (raw
sockets, one reused buffer, no protocol work, no logs), the least a trio relay costs; and
"lean" (bench/lean.py), that relay plus the protocol work medgate may not drop (MLLP framing,
the MSH peek and MSA-2 check, a pick per message, one audit line), the least a protocol-aware
trio relay costs.
--validate adds "validating": medgate with `validate = "structure"` (hl7apy checks each message
before it is relayed), whose CPU per message against "medgate" is what the check costs.
--workers 2,4 adds "w2" and "w4": medgate with `[gateway] workers` = 2 and 4 (CPU: the leader
and its workers together).
--against CHECKOUT adds "against": the medgate of another checkout (e.g. `git worktree add
/tmp/before REV`) on the same config, for a before/after measured in one run.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (PATHS, Lab, Rounds, free_port, peer_python, wait_port,  # noqa: E402
                          worker_counts)


WARM_UP = 400  # messages each path carries before the rounds


def medgate_vip(listen: int, targets: list[int], extra: str = "") -> str:
    members = "".join(f'[[vip.member]]\nname = "ris{n}"\naddress = "127.0.0.1:{port}"\n'
                      for n, port in enumerate(targets))
    return f"""[[vip]]
name = "hl7"
protocol = "hl7"
listen = "127.0.0.1:{listen}"
health = {{ check = "hl7-ack", interval = "5s" }}
{extra}
{members}"""


def start_receivers(lab: Lab) -> list[int]:
    """Two simulated HL7 receivers that answer without parsing (the direct path is not
    bounded by hl7apy); their ports, once they listen."""
    receivers = [free_port(), free_port()]
    for n, port in enumerate(receivers):
        lab.start([*peer_python(), "-m", "gateway", "simulate", "hl7-receiver", "--listen",
                   f"127.0.0.1:{port}", "--name", f"RIS{n}", "--no-parse"], f"receiver{n}")
    for port in receivers:
        wait_port(port, what="receiver")
    return receivers


def run_senders(port: int, messages: int, connections: int,
                ca: str = "") -> tuple[float, list[float]]:
    """(messages/s, per-message latencies in ms) from a trio sender process (over TLS
    trusting `ca` when one is given)."""
    result = subprocess.run([*peer_python(), __file__, "--sender", str(port), str(messages),
                             str(connections), *(["--ca", ca] if ca else [])],
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"sender failed on port {port}: {result.stderr}")
    lines = result.stdout.split()
    return float(lines[0]), [float(x) for x in lines[1:]]


def sender(port: int, messages: int, connections: int, ca: str = "") -> None:
    """Print messages/s, then every latency in ms (the orchestrator computes percentiles)."""
    import ssl

    import trio

    from gateway.testing.simulators.hl7_messages import make_messages
    from protocols.mllp import Message, MllpReader, frame, peek_ack

    per_connection = messages // connections
    latencies: list[float] = []

    async def one(index: int) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        if ca:
            stream = trio.SSLStream(stream, ssl.create_default_context(cafile=ca),
                                    server_hostname="127.0.0.1")
        reader = MllpReader()
        for payload in make_messages(per_connection, prefix=f"B{index}X"):
            started = time.perf_counter()
            await stream.send_all(frame(payload))
            while (event := reader.next_event()) is None:
                data = await stream.receive_some(65536)
                if not data:
                    raise SystemExit("connection closed before the ACK")
                reader.feed(data)
            if not isinstance(event, Message) or peek_ack(event.payload).code != "AA":
                raise SystemExit(f"not an AA: {event!r}")
            latencies.append((time.perf_counter() - started) * 1000)
        await stream.aclose()

    async def main() -> float:
        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for index in range(connections):
                nursery.start_soon(one, index)
        return per_connection * connections / (time.perf_counter() - started)

    rate = trio.run(main)
    print(rate, *(f"{x:.4f}" for x in latencies))


def serve_floor(listen: int, target: int) -> None:
    """The bare trio relay of --floor: per client, a connection to `target` and two tasks
    copying bytes with recv_into a reused buffer, waiting in epoll only on EAGAIN."""
    import socket

    import trio

    async def pump(source: socket.socket, sink: socket.socket) -> None:
        buffer = bytearray(65536)
        while True:
            try:
                size = source.recv_into(buffer)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(source)
                continue
            if not size:
                return
            sink.sendall(buffer[:size])  # small messages: the socket takes them at once

    async def handle(stream: trio.SocketStream) -> None:
        client = socket.socket(fileno=stream.socket.detach())
        member = socket.create_connection(("127.0.0.1", target))
        for sock in (client, member):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, member)
            nursery.start_soon(pump, member, client)

    trio.run(lambda: trio.serve_tcp(handle, listen, host="127.0.0.1"))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--floor", action="store_true",
                        help="also measure a bare trio relay (the floor of any trio relay) "
                             "and bench/lean.py (the floor of a protocol-aware one)")
    parser.add_argument("--validate", action="store_true",
                        help='also measure medgate with validate = "structure" (hl7apy)')
    parser.add_argument("--against", type=Path, metavar="CHECKOUT",
                        help="also measure the medgate of another checkout (before/after)")
    parser.add_argument("--workers", type=worker_counts, default=[], metavar="N[,N...]",
                        help="also measure medgate with [gateway] workers = N (path wN)")
    parser.add_argument("--sender", nargs=3, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-floor", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ca", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sender:
        return sender(*args.sender, ca=args.ca)
    if args.serve_floor:
        return serve_floor(*args.serve_floor)
    if not shutil.which("haproxy"):
        raise SystemExit("haproxy is missing: apt-get install haproxy")
    with Lab() as lab:
        receivers = start_receivers(lab)
        ports = {"direct": receivers[0], "haproxy": free_port(), "medgate": free_port()}
        proxies = {"direct": None, "haproxy": lab.haproxy(ports["haproxy"], receivers, "hl7"),
                   "medgate": lab.medgate(medgate_vip(ports["medgate"], receivers), "hl7")}
        paths = PATHS
        if args.floor:  # one receiver only: it relays per connection, as HAProxy does
            paths, ports["floor"] = (*PATHS, "floor"), free_port()
            proxies["floor"] = lab.start([sys.executable, __file__, "--serve-floor",
                                          str(ports["floor"]), str(receivers[1])], "floor")
            paths, ports["lean"] = (*paths, "lean"), free_port()
            proxies["lean"] = lab.start([sys.executable, str(ROOT / "bench" / "lean.py"),
                                         str(ports["lean"]), *map(str, receivers), "--audit",
                                         str(lab.folder / "audit-lean.jsonl")], "lean")
        if args.against:
            paths, ports["against"] = (*paths, "against"), free_port()
            proxies["against"] = lab.medgate(medgate_vip(ports["against"], receivers),
                                             "hl7-against", tree=args.against)
        for workers in args.workers:
            path = f"w{workers}"
            paths, ports[path] = (*paths, path), free_port()
            proxies[path] = lab.medgate(medgate_vip(ports[path], receivers), f"hl7-{path}",
                                        workers=workers)
        if args.validate:
            paths, ports["validating"] = (*paths, "validating"), free_port()
            proxies["validating"] = lab.medgate(medgate_vip(
                ports["validating"], receivers, 'validate = "structure"'), "hl7-validating")
        for path, port in ports.items():
            wait_port(port, what=path)
        # Warm: member connections pooled (by every worker), the receivers' first-message cost
        # paid, before anything is measured.
        for path, port in ports.items():
            run_senders(port, WARM_UP, max(8, 2 * max(args.workers, default=1)))
        print(f"{args.messages} messages per run, each after the previous ACK; "
              f"{args.rounds} interleaved rounds")
        for connections in (1, args.connections):
            rates = Rounds(f"Messages/s over {connections} connection(s)", "msg/s", "msg", paths)
            latencies = {path: [] for path in paths}
            count = args.messages if connections > 1 else args.messages // 3

            def run(path: str) -> float:
                rate, samples = run_senders(ports[path], count, connections)
                latencies[path].extend(samples)
                return rate

            for _ in range(args.rounds):
                for path in paths:
                    rates.measure(path, proxies[path], count, lambda: run(path))
            rates.report()
            p50 = {path: statistics.median(latencies[path]) for path in paths}
            p99 = {path: percentile(latencies[path], 0.99) for path in paths}
            for path in paths:
                print(f"  {path:8s} latency p50 {p50[path]:.3f} ms, p99 {p99[path]:.3f} ms")
            for path in paths[1:]:
                print(f"  {path} added latency: p50 {p50[path] - p50['direct']:+.3f} ms, "
                      f"p99 {p99[path] - p99['direct']:+.3f} ms")

if __name__ == "__main__":
    main()
