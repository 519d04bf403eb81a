"""Where the gateway's CPU goes: py-spy samples a `gateway run` (audit log on, INFO logs) while
one workload runs through it, and prints the functions by own and by inclusive time.

    python3 bench/profile.py hl7|hl7-tls|associations|xds [--seconds 15] [--out FILE]

hl7: one sender, each message after the previous ACK, to two HL7 receiver simulators.
hl7-tls: the same over MLLP/TLS (the gateway terminates TLS; plain receivers behind).
associations: sequential A-ASSOCIATE + C-ECHO + A-RELEASE against bench/dicom.py's echo SCP.
xds: ITI-18 queries on one keep-alive connection to the XDS registry simulator.
Needs py-spy (`pip install py-spy`, not a dependency of medgate) and ptrace rights.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import dicom, hl7, tls, xds  # noqa: E402
from bench.common import Lab, free_port, wait_port  # noqa: E402


def start_workload(lab: Lab, kind: str) -> tuple[subprocess.Popen, list[str]]:
    """The gateway for `kind` and the command that loads it (repeated until stopped)."""
    gate = free_port()
    if kind.startswith("hl7"):
        receivers = [free_port(), free_port()]
        for n, port in enumerate(receivers):
            lab.start([sys.executable, "-m", "gateway", "simulate", "hl7-receiver", "--listen",
                       f"127.0.0.1:{port}", "--name", f"RIS{n}", "--no-parse"], f"receiver{n}")
            wait_port(port, what="receiver")
        vip, ca = hl7.medgate_vip(gate, receivers), []
        if kind == "hl7-tls":
            pki = tls.write_certificates(lab.folder)
            vip = vip.replace('protocol = "hl7"\n', f'protocol = "hl7"\ntls = {{ cert = '
                              f'"{pki["server"]}", key = "{pki["server_key"]}" }}\n')
            ca = ["--ca", pki["ca"]]
        gateway = lab.medgate(vip, "hl7")
        load = [sys.executable, hl7.__file__, "--sender", str(gate), "100000", "1", *ca]
    elif kind == "xds":
        registry = free_port()
        lab.start([sys.executable, "-m", "gateway", "simulate", "xds-registry", "--listen",
                   f"127.0.0.1:{registry}"], "registry")
        wait_port(registry, what="registry")
        gateway = lab.medgate(xds.medgate_vip(gate, registry, registry), "xds")
        load = [sys.executable, xds.__file__, "--query-client", str(gate), "1000000", "1"]
    else:
        scp = free_port()
        lab.start([sys.executable, dicom.__file__, "--serve-echo", str(scp)], "echo-scp")
        wait_port(scp, what="echo SCP")
        gateway = lab.medgate(dicom.medgate_vip(gate, scp, "echo"), "echo")
        load = [sys.executable, dicom.__file__, "--echo-client", str(gate), "100000"]
    wait_port(gate, what="gateway")
    return gateway, load


def summarize(raw: str, top: int) -> str:
    """Own and inclusive sample counts per function from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        samples = int(count)
        total += samples
        frames = [frame.split(" (")[0] + " (" + frame.split(" (")[-1].rsplit(":", 1)[0] + ")"
                  if " (" in frame else frame for frame in stack.split(";")]
        own[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    lines = [f"{total} samples"]
    for title, counter in (("own time", own), ("inclusive time", inclusive)):
        lines.append(f"\n{title}:")
        lines += [f"  {100 * n / total:5.1f}%  {frame}" for frame, n in counter.most_common(top)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", choices=("hl7", "hl7-tls", "associations", "xds"))
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", type=Path, help="also write the summary here")
    args = parser.parse_args()
    if not shutil.which("py-spy"):
        raise SystemExit("py-spy is missing: pip install py-spy")
    with Lab() as lab:
        gateway, load = start_workload(lab, args.workload)
        client = lab.start(load, "load")
        raw = lab.folder / "profile.txt"
        subprocess.run(["py-spy", "record", "--pid", str(gateway.pid), "--duration",
                        str(args.seconds), "--rate", "500", "--format", "raw", "--output",
                        str(raw)], check=True, capture_output=True)
        client.kill()
        summary = summarize(raw.read_text(), args.top)
    print(summary, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(f"# python3 bench/profile.py {args.workload} --seconds "
                            f"{args.seconds}\n{summary}")


if __name__ == "__main__":
    main()
