"""DICOM benchmark: medgate against the direct path and HAProxy (mode tcp), side by side.

    python3 bench/dicom.py [--megabytes 100] [--files 20] [--associations 1500] [--rounds 3]
                           [--floor] [--against CHECKOUT] [--workers N,...]

1. Bulk C-STORE throughput: DCMTK storescu sends --files instances (--megabytes in all) in one
   association to DCMTK storescp (--fork --ignore: received, answered, not written);
   --megabytes 0 leaves it out, and DCMTK is then not needed (bench/quiet.sh).
2. Association rate: client processes open associations (A-ASSOCIATE, C-ECHO, A-RELEASE) as fast
   as they can against a minimal verification SCP written on medgate's codec (DCMTK forks per
   association and pynetdicom spawns threads: either would measure the server, not the path).
   --floor adds "lean" (bench/lean.py --dicom): the least a relay on trio that decodes the RQ
   and AC, follows the commands and writes an audit line costs per association. --against
   CHECKOUT adds the medgate of another checkout to the association rate (before/after).

Each path is measured in interleaved rounds in one run (the machine is shared and noisy); the
median of the rounds is reported with ratios against direct and HAProxy. The clients, servers
and proxies all share this machine's cores, so ratios, not absolute numbers, are the result.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import (DCMTK_ENV, PATHS, Lab, Rounds, free_port, peer_python,  # noqa: E402
                          wait_port, worker_counts)
from protocols import dicom  # noqa: E402

def medgate_vip(listen: int, target: int, name: str) -> str:
    return f"""[[vip]]
name = "{name}"
protocol = "dicom"
listen = "127.0.0.1:{listen}"
health = {{ check = "dicom-echo", interval = "5s" }}
[[vip.member]]
name = "m1"
address = "127.0.0.1:{target}"
ae_title = "PACS"
"""


# ---------------------------------------------------------------------------- association rate

def serve_echo(port: int) -> None:
    """A minimal verification SCP (trio + medgate's codec): AC, C-ECHO-RSP, A-RELEASE-RP."""
    import trio

    async def handle(stream):
        reader = dicom.PduReader()
        try:
            while True:
                while (pdu := reader.next_pdu()) is None:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    reader.feed(data)
                if pdu[0] == dicom.A_ASSOCIATE_RQ:
                    await stream.send_all(dicom.encode_associate_ac(dicom.Association.decode(pdu)))
                elif pdu[0] == dicom.P_DATA_TF:
                    await stream.send_all(dicom.encode_c_echo_rsp(1, 1))
                elif pdu[0] == dicom.A_RELEASE_RQ:
                    await stream.send_all(dicom.RELEASE_RP)
                    return
        except trio.BrokenResourceError:
            pass

    trio.run(lambda: trio.serve_tcp(handle, port, host="127.0.0.1", backlog=1024))


def _recv_pdu(sock: socket.socket, reader: dicom.PduReader) -> bytes:
    while (pdu := reader.next_pdu()) is None:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed")
        reader.feed(data)
    return pdu


def echo_client(port: int, count: int) -> None:
    """Open `count` associations one after another; exit 1 on the first failure."""
    rq = dicom.encode_associate_rq("PACS", "BENCH", [(1, dicom.VERIFICATION_SOP_CLASS,
                                                      [dicom.IMPLICIT_VR_LITTLE_ENDIAN])])
    echo = dicom.encode_c_echo_rq(1, 1)
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reader = dicom.PduReader()
            sock.sendall(rq)
            if _recv_pdu(sock, reader)[0] != dicom.A_ASSOCIATE_AC:
                raise SystemExit("association not accepted")
            sock.sendall(echo)
            _recv_pdu(sock, reader)
            sock.sendall(dicom.RELEASE_RQ)
            _recv_pdu(sock, reader)


def association_rate(port: int, total: int, clients: int) -> float:
    per_client = total // clients
    started = time.perf_counter()
    processes = [subprocess.Popen([*peer_python(), __file__, "--echo-client", str(port),
                                   str(per_client)]) for _ in range(clients)]
    if any(p.wait() != 0 for p in processes):
        raise SystemExit("an echo client failed")
    return per_client * clients / (time.perf_counter() - started)


# ---------------------------------------------------------------------------- bulk store

def make_files(folder: Path, count: int, megabytes: float) -> list[str]:
    from gateway.testing.simulators.modality import make_instances

    pixel_bytes = int(megabytes * 1024 * 1024 / count)
    paths = []
    for dataset in make_instances(count, pixel_bytes=pixel_bytes):
        path = folder / f"{dataset.SOPInstanceUID}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(str(path))
    return paths


def store_throughput(port: int, files: list[str], options: list[str] = ()) -> float:
    """MB/s of one storescu association (`options`: e.g. DCMTK's +tls ones)."""
    size = sum(os.path.getsize(f) for f in files)
    started = time.perf_counter()
    result = subprocess.run(["/usr/bin/storescu", "-aet", "BENCH", "-aec", "PACS", *options,
                             "127.0.0.1", str(port), *files], env=DCMTK_ENV,
                            capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0 or "E:" in result.stderr:
        raise SystemExit(f"storescu failed on port {port}: {result.stderr}")
    return size / elapsed / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=100)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--associations", type=int, default=1500)
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--floor", action="store_true",
                        help="also measure the association rate through bench/lean.py --dicom")
    parser.add_argument("--against", type=Path, metavar="CHECKOUT",
                        help="also measure the medgate of another checkout (before/after)")
    parser.add_argument("--workers", type=worker_counts, default=[], metavar="N[,N...]",
                        help="also measure associations through medgate with [gateway] "
                             "workers = N (path wN)")
    parser.add_argument("--echo-client", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-echo", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_client:
        return echo_client(*args.echo_client)
    if args.serve_echo:
        return serve_echo(args.serve_echo)
    bulk = args.megabytes > 0  # --megabytes 0: associations only, and no DCMTK needed
    needed = ("/usr/bin/storescu", "/usr/bin/storescp") if bulk else ()
    for tool in (*needed, shutil.which("haproxy") or "haproxy"):
        if not Path(tool).exists():
            raise SystemExit(f"{tool} is missing: apt-get install dcmtk haproxy")

    with Lab() as lab:
        storescp, echo_scp = free_port(), free_port()
        if bulk:
            lab.start(["/usr/bin/storescp", "--fork", "--ignore", "-aet", "PACS", str(storescp)],
                      "storescp", env=DCMTK_ENV)
            wait_port(storescp)
        lab.start([sys.executable, __file__, "--serve-echo", str(echo_scp)], "echo-scp")
        wait_port(echo_scp)
        targets = {"store": storescp, "echo": echo_scp} if bulk else {"echo": echo_scp}
        ports = {kind: {"direct": target} for kind, target in targets.items()}
        proxies: dict[str, dict] = {kind: {"direct": None} for kind in targets}
        for kind, target in targets.items():
            hap, gate = free_port(), free_port()
            ports[kind].update(haproxy=hap, medgate=gate)
            proxies[kind].update(haproxy=lab.haproxy(hap, [target], kind),
                                 medgate=lab.medgate(medgate_vip(gate, target, kind), kind))
        echo_paths = PATHS
        if args.floor:
            echo_paths, ports["echo"]["lean"] = (*PATHS, "lean"), free_port()
            proxies["echo"]["lean"] = lab.start([
                sys.executable, str(ROOT / "bench" / "lean.py"), str(ports["echo"]["lean"]),
                str(echo_scp), "--audit", str(lab.folder / "audit-lean.jsonl"), "--dicom"],
                "lean")
        if args.against:
            echo_paths, ports["echo"]["against"] = (*echo_paths, "against"), free_port()
            proxies["echo"]["against"] = lab.medgate(
                medgate_vip(ports["echo"]["against"], echo_scp, "echo"), "echo-against",
                tree=args.against)
        for workers in args.workers:
            path = f"w{workers}"
            echo_paths, ports["echo"][path] = (*echo_paths, path), free_port()
            proxies["echo"][path] = lab.medgate(medgate_vip(ports["echo"][path], echo_scp,
                                                            "echo"), f"echo-{path}",
                                                workers=workers)
        for kind, by_path in ports.items():
            for path, port in by_path.items():
                wait_port(port, what=f"{path} path for {kind}")
        files = make_files(lab.folder, args.files, args.megabytes) if bulk else []
        print(f"bulk: {args.files} files, {args.megabytes:g} MB in one association; "
              f"associations: {args.associations} by {args.clients} client processes; "
              f"{args.rounds} interleaved rounds; {os.cpu_count()} cores")
        megabytes = sum(os.path.getsize(f) for f in files) / 1e6
        associations = args.associations // args.clients * args.clients
        store = Rounds("C-STORE throughput (one association)", "MB/s", "MB")
        echo = Rounds("Association rate (A-ASSOCIATE + C-ECHO + A-RELEASE)", "assoc/s", "assoc",
                      echo_paths)
        for _ in range(args.rounds):
            for path in PATHS if bulk else ():
                store.measure(path, proxies["store"][path], megabytes,
                              lambda: store_throughput(ports["store"][path], files))
            for path in echo_paths:
                echo.measure(path, proxies["echo"][path], associations,
                             lambda: association_rate(ports["echo"][path], args.associations,
                                                      args.clients))
        if bulk:
            store.report()
        echo.report()

if __name__ == "__main__":
    main()
