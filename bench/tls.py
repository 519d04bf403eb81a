"""TLS benchmark: medgate terminating TLS against HAProxy terminating it on the same
certificates, and against TLS straight to the server, side by side.

    python3 bench/tls.py [--megabytes 100] [--files 20] [--messages 1000] [--rounds 3] [--floor]

1. Bulk DICOM over TLS: DCMTK `storescu +tls` (with a client certificate) sends --files
   instances in one association. direct: to `storescp +tls`; haproxy: `bind ... ssl crt ...
   verify required` in front of a plain storescp; medgate: a DICOM VIP with `tls` and
   `verify_client = "required"` in front of the same plain storescp. --megabytes 0 leaves it
   out, and DCMTK is then not needed (bench/quiet.sh).
2. HL7 over MLLP/TLS: one sender connection, each message after the previous ACK. direct: to a
   TLS receiver; haproxy and medgate terminate TLS in front of a plain receiver. --floor adds
   "lean" (bench/lean.py terminating TLS the same way): the least a protocol-aware relay on
   trio and the standard library's ssl costs per message.

Certificates come from trustme (RSA, one CA). Rounds are interleaved; medians and ratios.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import DCMTK_ENV, PATHS, Lab, Rounds, free_port, wait_port  # noqa: E402
from bench.dicom import make_files, store_throughput  # noqa: E402
from bench.hl7 import run_senders  # noqa: E402


def write_certificates(folder: Path) -> dict[str, str]:
    """A CA and two RSA leaves it signed (the server's for 127.0.0.1 and localhost, the
    client's), as PEM files in `folder`, made with `cryptography` (a dependency of medgate,
    so the bench runs where only medgate's wheels are installed: bench-bundle.sh)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(subject: str, key, issuer: x509.Name, signer, *, ca: bool = False,
              names: tuple[x509.GeneralName, ...] = ()) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=2))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(list(names)),
                                            critical=False)
        if not ca:
            builder = builder.add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
        return builder.sign(signer, hashes.SHA256())

    def pem(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "medgate bench CA")])
    ca_cert = issue("medgate bench CA", ca_key, ca_name, ca_key, ca=True)
    paths = {"ca": str(folder / "ca.crt")}
    Path(paths["ca"]).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for name, names in (("server", (x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                    x509.DNSName("localhost"))),
                        ("client", (x509.DNSName("bench"),))):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = issue(name, key, ca_name, ca_key, names=names).public_bytes(
            serialization.Encoding.PEM)
        (folder / f"{name}.crt").write_bytes(cert)
        (folder / f"{name}.key").write_bytes(pem(key))
        (folder / f"{name}.pem").write_bytes(cert + pem(key))  # HAProxy's crt: cert and key
        paths.update({name: str(folder / f"{name}.crt"), f"{name}_key": str(folder / f"{name}.key"),
                      f"{name}_pem": str(folder / f"{name}.pem")})
    return paths


def serve_hl7(port: int, cert: str, key: str) -> None:
    """An HL7 receiver simulator over TLS (cert/key) or plain ('-')."""
    import ssl
    import threading

    from gateway.testing.simulators.hl7 import HL7Receiver

    receiver = HL7Receiver(name="RIS", port=port, parse=False)  # ACKs at wire speed
    if cert != "-":
        receiver.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        receiver.tls.load_cert_chain(cert, key)
    receiver.start()
    threading.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=100)
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--floor", action="store_true",
                        help="also measure HL7 over TLS through bench/lean.py")
    parser.add_argument("--serve-hl7", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_hl7:
        return serve_hl7(int(args.serve_hl7[0]), *args.serve_hl7[1:])
    bulk = args.megabytes > 0  # --megabytes 0: HL7 only, and no DCMTK needed
    needed = ("/usr/bin/storescu", "/usr/bin/storescp") if bulk else ()
    for tool in (*needed, shutil.which("haproxy") or "haproxy"):
        if not Path(tool).exists():
            raise SystemExit(f"{tool} is missing: apt-get install dcmtk haproxy")
    with Lab() as lab:
        pki = write_certificates(lab.folder)
        bind_tls = f" ssl crt {pki['server_pem']} ca-file {pki['ca']} verify required"
        server_tls = f"tls = {{ cert = \"{pki['server']}\", key = \"{pki['server_key']}\""
        plain_scp, tls_scp = free_port(), free_port()
        if bulk:
            lab.start(["/usr/bin/storescp", "--fork", "--ignore", "-aet", "PACS",
                       str(plain_scp)], "storescp", env=DCMTK_ENV)
            lab.start(["/usr/bin/storescp", "--fork", "--ignore", "-aet", "PACS", "+tls",
                       pki["server_key"], pki["server"], "-pw", "+cf", pki["ca"], str(tls_scp)],
                      "storescp-tls", env=DCMTK_ENV)
        plain_ris, tls_ris = free_port(), free_port()
        lab.start([sys.executable, __file__, "--serve-hl7", str(plain_ris), "-", "-"], "ris")
        lab.start([sys.executable, __file__, "--serve-hl7", str(tls_ris), pki["server"],
                   pki["server_key"]], "ris-tls")
        ports = {"store": {"direct": tls_scp, "haproxy": free_port(), "medgate": free_port()},
                 "hl7": {"direct": tls_ris, "haproxy": free_port(), "medgate": free_port()}}
        store_haproxy = lab.haproxy(ports["store"]["haproxy"], [plain_scp], "store",
                                    bind_extra=bind_tls)
        hl7_haproxy = lab.haproxy(ports["hl7"]["haproxy"], [plain_ris], "hl7",
                                  bind_extra=f" ssl crt {pki['server_pem']}")  # no client cert
        gateway = lab.medgate(f"""[[vip]]
name = "store"
protocol = "dicom"
listen = "127.0.0.1:{ports['store']['medgate']}"
{server_tls}, ca = "{pki['ca']}", verify_client = "required" }}
health = {{ check = "dicom-echo", interval = "5s" }}
[[vip.member]]
name = "m1"
address = "127.0.0.1:{plain_scp}"
ae_title = "PACS"

[[vip]]
name = "hl7"
protocol = "hl7"
listen = "127.0.0.1:{ports['hl7']['medgate']}"
{server_tls} }}
health = {{ check = "hl7-ack", interval = "5s" }}
[[vip.member]]
name = "ris"
address = "127.0.0.1:{plain_ris}"
""", "tls")
        proxies = {"store": {"direct": None, "haproxy": store_haproxy, "medgate": gateway},
                   "hl7": {"direct": None, "haproxy": hl7_haproxy, "medgate": gateway}}
        hl7_paths = PATHS
        if args.floor:
            hl7_paths, ports["hl7"]["lean"] = (*PATHS, "lean"), free_port()
            proxies["hl7"]["lean"] = lab.start([
                sys.executable, str(ROOT / "bench" / "lean.py"), str(ports["hl7"]["lean"]),
                str(plain_ris), "--audit", str(lab.folder / "audit-lean.jsonl"), "--cert",
                pki["server"], "--key", pki["server_key"]], "lean")
        if not bulk:
            del ports["store"]
        for kind in ports.values():
            for path, port in kind.items():
                wait_port(port, what=path)
        files = make_files(lab.folder, args.files, args.megabytes) if bulk else []
        client = ["+tls", pki["client_key"], pki["client"], "-pw", "+cf", pki["ca"]]
        print(f"bulk over TLS: {args.files} files, {args.megabytes:g} MB in one association; "
              f"HL7 over TLS: {args.messages} messages on one connection; {args.rounds} "
              f"interleaved rounds; {os.cpu_count()} cores")
        megabytes = sum(os.path.getsize(f) for f in files) / 1e6
        store = Rounds("C-STORE throughput over TLS (one association)", "MB/s", "MB")
        hl7 = Rounds("HL7 over MLLP/TLS, one connection", "msg/s", "msg", hl7_paths)
        for _ in range(args.rounds):
            for path in PATHS if bulk else ():
                store.measure(path, proxies["store"][path], megabytes,
                              lambda: store_throughput(ports["store"][path], files, client))
            for path in hl7_paths:
                hl7.measure(path, proxies["hl7"][path], args.messages, lambda: run_senders(
                    ports["hl7"][path], args.messages, 1, pki["ca"])[0])
        if bulk:
            store.report()
        hl7.report()


if __name__ == "__main__":
    main()
