"""The `gateway` command line.

Exit status: 0 done, 1 could not start (port in use, permission), 3 usage or config error,
130 stopped by Ctrl-C (SIGINT; every long-running command stops what it started, no traceback).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from gateway import __version__, exits
from gateway.commands import ctl, probe
from gateway.config import ConfigError, load_config, parse_address, parse_duration
from gateway.exits import EXIT_INTERRUPTED
from gateway.logs import LogLevel, setup_logging
from gateway.commands import shadow_report
from gateway.records import trace
from gateway.testing.simulators.hl7_messages import KINDS

if TYPE_CHECKING:  # the service layer loads only for `gateway run`, not for --help or ctl
    from gateway.service.server import Gateway

EXIT_OK, EXIT_STARTUP, EXIT_USAGE = 0, 1, 3
STUDY_MODALITIES = ["CT", "MR", "OT"]  # gateway.testing.simulators.study.KINDS, not imported here
log = logging.getLogger("medgate")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse exits 2 by default; ours is 3 for usage errors
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="gateway",
        description="medgate: a protocol-aware gateway for DICOM, HL7 v2 (MLLP), IHE XDS.b and "
                    "TCP services. It balances per association, message or request, checks "
                    "members at the protocol level and refuses in the protocol's own words when "
                    "nothing healthy is left, so senders keep and retry their data.",
        epilog="Exit status: 0 ok, 1 could not start, 3 usage or config error, 130 stopped by "
               "Ctrl-C (SIGTERM: 0).")
    parser.add_argument("--version", action="version", version=f"medgate {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True
    _add_run_parser(commands)
    _add_check_parser(commands)
    _add_agent_parser(commands)
    probe.add_parser(commands)
    _add_export_parser(commands)
    _add_demo_parser(commands)
    ctl.add_parser(commands)
    trace.add_parser(commands)
    shadow_report.add_parser(commands)
    add_simulate_parser(commands)
    return parser


def _add_run_parser(commands) -> None:
    """gateway run: serve a config."""
    run = commands.add_parser(
        "run", help="serve every VIP of a config file",
        description="Serve every VIP of the config with its health checks. SIGTERM: stop "
                    "accepting, let live connections finish (up to [gateway] drain_timeout), "
                    "exit 0; SIGINT (Ctrl-C): the same, exit 130. SIGHUP: re-read the config; "
                    "live connections go on, an invalid file is refused with a log line and "
                    "the old config stays.")
    run.add_argument("-c", "--config", required=True, type=Path, metavar="FILE",
                     help="the TOML config (see examples/)")
    run.add_argument("--check-config", action="store_true",
                     help="validate the config, print a summary and exit")
    run.add_argument("--log-level", choices=list(LogLevel),
                     help="debug also logs every health check result (default: [gateway] "
                          "log_level, else info)")


def _add_check_parser(commands) -> None:
    """gateway check: the negotiate checks, once."""
    check = commands.add_parser(
        "check", help="run the negotiate checks once and say who answers and why not",
        description="Run each member's configured check (or each URL's) once, all at once, and "
                    "print who answers at the protocol level and why not. URLs: "
                    "dicom://[CALLING@]CALLED@host:port, hl7://host:port[?message=FILE], "
                    "xds://host:port/path?patient=ID, http(s)://host[:port]/path[?expect=TEXT], "
                    "tcp://host:port. Over TLS: dicoms://, hl7s://, xdss://, https:// with "
                    "?ca=FILE (default: the system CAs), ?cert=FILE&key=FILE (a client "
                    "certificate) and ?server_name=NAME. A member certificate that ends within "
                    "30 days is warned about.",
        epilog="Exit status: 0 all up, 1 some down, 2 a VIP (or every URL) with nothing up, 3 "
               "usage or config error; fit for a keepalived MISC_CHECK (without misc_dynamic).")
    check.add_argument("urls", nargs="*", metavar="URL", help="ad-hoc targets (no config needed)")
    check.add_argument("-c", "--config", type=Path, metavar="FILE", help="check every member of it")
    check.add_argument("--vip", metavar="NAME", help="only this VIP of the config")
    check.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    check.add_argument("--peer", action="store_true",
                       help="with -c: also compare the config with each of [gateway] peers' "
                            "(a digest per VIP and member) and name what differs")
    check.add_argument("--timeout", metavar="DURATION",
                       help="per check (default: the VIP's health timeout; 4s for URLs)")
    check.add_argument("--watch", action="store_true",
                       help="repeat every --interval and redraw, until Ctrl-C")
    check.add_argument("--interval", default="5s", metavar="DURATION",
                       help="with --watch (default 5s)")


def _add_agent_parser(commands) -> None:
    """gateway agent: HAProxy's agent-check responder."""
    agent = commands.add_parser(
        "agent", help="HAProxy agent-check responder fed by medgate's negotiate checks",
        description="Run every member's negotiate check on its interval and answer HAProxy "
                    "agent checks with the result: 'NN% ready up', 'NN% drain up', "
                    "'NN% ready down #reason'. HAProxy names the member with agent-send "
                    "\"vip/member\\n\" on the --listen port, or asks on port --listen + 1 + the "
                    "member's index (VIPs, then members, in file order).")
    agent.add_argument("-c", "--config", required=True, type=Path, metavar="FILE")
    agent.add_argument("--listen", default="127.0.0.1:5555", metavar="HOST:PORT",
                       help="where HAProxy asks (default 127.0.0.1:5555)")
    agent.add_argument("--log-level", choices=list(LogLevel),
                       help="default: the config's [gateway] log_level, else info")


def _add_export_parser(commands) -> None:
    """gateway export haproxy|keepalived."""
    export = commands.add_parser(
        "export", help="write the VIPs as a haproxy.cfg or keepalived.conf",
        description="Write the config's VIPs for HAProxy or keepalived/LVS, with medgate's "
                    "protocol checks plugged in.")
    engines = export.add_subparsers(dest="engine", metavar="ENGINE", parser_class=_Parser)
    engines.required = True
    _add_haproxy_parser(engines)
    _add_keepalived_parser(engines)


def _add_haproxy_parser(engines) -> None:
    """gateway export haproxy."""
    haproxy = engines.add_parser(
        "haproxy", help="haproxy.cfg: tcp mode for dicom/hl7/tcp, http mode for xds",
        description="A haproxy.cfg with the same VIPs: balance mode, weights (scaled to 256), "
                    "failover via backup servers, source-IP stick tables, timeouts; checks "
                    "through the medgate agent, or HAProxy's own protocol sequences.")
    haproxy.add_argument("-c", "--config", required=True, type=Path, metavar="FILE")
    haproxy.add_argument("--checks", default="agent", choices=["agent", "native", "tcp"],
                         help="agent: agent-check to `gateway agent` (default); native: HAProxy "
                              "speaks DICOM/HL7/XDS itself (tcp-check/http-check); tcp: connects")
    haproxy.add_argument("--agent", default="127.0.0.1:5555", metavar="HOST:PORT",
                         help="where `gateway agent` listens (default 127.0.0.1:5555)")
    haproxy.add_argument("--stats-socket", default="/run/haproxy/admin.sock", metavar="PATH")
    haproxy.add_argument("--chain", metavar="HOST[,HOST...]",
                         help="the chain layout: HAProxy balances TCP over these medgate "
                              "gateways (each serving the same VIPs, checked on its admin "
                              "server's /readyz), which balance the members and rewrite called "
                              "AE titles. Needed when a DICOM VIP's members have different "
                              "ae_title")
    haproxy.add_argument("--bind", default="", metavar="HOST",
                         help="with --chain: the address HAProxy's frontends listen on (the "
                              "floating VIP address; default: each VIP's listen host)")
    haproxy.add_argument("-o", "--output", type=Path, metavar="FILE", help="default: stdout")


def _add_keepalived_parser(engines) -> None:
    """gateway export keepalived."""
    keepalived = engines.add_parser(
        "keepalived", help="keepalived.conf virtual_server blocks with MISC_CHECKs",
        description="keepalived.conf virtual_server blocks (lb_algo wrr, persistence_timeout, "
                    "real_server weights), each real server checked by a MISC_CHECK running "
                    "`gateway check URL` (exit 0 up, non-zero down; no misc_dynamic).")
    keepalived.add_argument("-c", "--config", required=True, type=Path, metavar="FILE")
    keepalived.add_argument("--vip-address", default="", metavar="IP",
                            help="the virtual address for VIPs that listen on 0.0.0.0 or ::")
    keepalived.add_argument("--lb-kind", default="NAT", choices=["NAT", "DR", "TUN"])
    keepalived.add_argument("--vrrp", action="store_true",
                            help="a pair of medgate gateways instead of LVS: this node's "
                                 "vrrp_instance floating every VIP's address, with a track "
                                 "script on the gateway's /readyz (needs --virtual-router-id, "
                                 "--interface, --unicast-src, --unicast-peer)")
    keepalived.add_argument("--virtual-router-id", type=int, metavar="N",
                            help="1-255, one the network's own VRRP does not use (no default)")
    keepalived.add_argument("--interface", metavar="IF", help="the client-facing link")
    keepalived.add_argument("--unicast-src", metavar="IP", help="this node's address on it")
    keepalived.add_argument("--unicast-peer", metavar="IP", help="the other node's")
    keepalived.add_argument("--priority", type=int, default=100,
                            help="higher holds the VIPs (default 100; e.g. 150 on the primary)")
    keepalived.add_argument("--no-preempt", action="store_true",
                            help="a node that comes back does not take the VIPs back")
    keepalived.add_argument("--chain", metavar="HOST[,HOST...]",
                            help="real servers are these medgate gateways (checked on /readyz), "
                                 "not the members: needed when a DICOM VIP's members have "
                                 "different ae_title")
    keepalived.add_argument("--gateway-command", default="", metavar="PATH",
                            help="how keepalived runs medgate (default: this gateway's full path)")
    keepalived.add_argument("-o", "--output", type=Path, metavar="FILE", help="default: stdout")


def _add_demo_parser(commands) -> None:
    """gateway demo."""
    demo = commands.add_parser(
        "demo", help="simulated PACS, RIS and XDS behind a gateway, with traffic and faults",
        description="Start on loopback two simulated PACS, two HL7 receivers, an XDS registry "
                    "and repository, two web servers and a gateway with a DICOM, HL7, XDS and "
                    "TCP VIP; send images, HL7 messages, XDS documents and queries through it; "
                    "kill a PACS and an HL7 receiver half-way and bring them back; end with a "
                    "summary. No config, no root. Exit status 0 when nothing was lost.")
    demo.add_argument("--duration", default="20s", metavar="DURATION",
                      help="how long traffic runs (default 20s)")
    demo.add_argument("--no-faults", action="store_true", help="kill nothing")
    demo.add_argument("--keep-running", action="store_true",
                      help="after the summary, leave everything up until Ctrl-C")
    demo.add_argument("--workers", type=_positive, default=1, metavar="N",
                      help="the gateway's [gateway] workers: N > 1 relays in N worker "
                           "processes beside a leader (default 1: one process)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def add_simulate_parser(commands) -> None:
    simulate = commands.add_parser(
        "simulate", help="run a simulated PACS, modality, ... (for tests and demos)",
        description="Simulated peers for trying a gateway configuration without the real "
                    "systems. Servers print 'READY host:port' on stdout once they listen and run "
                    "until SIGTERM or Ctrl-C.")
    kinds = simulate.add_subparsers(dest="kind", metavar="KIND", parser_class=_Parser)
    kinds.required = True
    _add_dicom_simulators(kinds)
    servers = [*_add_hl7_simulators(kinds), *_add_xds_simulators(kinds),
               _add_audit_simulator(kinds)]
    for server in servers:  # each can serve TLS
        server.add_argument("--tls-cert", metavar="FILE", help="serve TLS with this certificate")
        server.add_argument("--tls-key", metavar="FILE", help="its private key")
        server.add_argument("--tls-ca", metavar="FILE",
                            help="require client certificates signed by this CA")


def _add_dicom_simulators(kinds) -> None:
    """gateway simulate pacs|modality|study."""
    pacs = kinds.add_parser("pacs", help="storage + verification SCP that records what it stored",
                            description="A DICOM storage and verification SCP (pynetdicom) that "
                                        "accepts every storage SOP class and logs each stored "
                                        "SOP Instance UID.")
    pacs.add_argument("--listen", default="127.0.0.1:11112", metavar="HOST:PORT",
                      help="where to listen (default 127.0.0.1:11112; port 0 = any free port)")
    pacs.add_argument("--ae-title", default="PACS", help="its AE title (default PACS)")
    pacs.add_argument("--store-dir", type=Path, metavar="DIR",
                      help="write each instance to DIR/<SOPInstanceUID>.dcm")
    pacs.add_argument("--reject", action="store_true",
                      help="reject every association (permanent, calling AE not recognized)")
    pacs.add_argument("--abort-after", type=int, metavar="N",
                      help="A-ABORT the association at the store after the first N")
    pacs.add_argument("--hang", action="store_true",
                      help="accept TCP connections and never answer (a frozen PACS)")
    modality = kinds.add_parser(
        "modality", help="C-STORE SCU sending generated or given instances",
        description="Send DICOM instances in one association and print what happened to each. "
                    "Exit status 0 when every instance was stored, 1 otherwise.")
    modality.add_argument("target", metavar="HOST:PORT", help="the PACS or gateway VIP")
    modality.add_argument("files", nargs="*", type=Path, metavar="FILE",
                          help="DICOM files to send (default: generate --count instances)")
    modality.add_argument("--count", type=int, default=10, help="instances to generate (default 10)")
    modality.add_argument("--called-ae", default="ANY-SCP", help="Called AE Title (default ANY-SCP)")
    modality.add_argument("--calling-ae", default="MODALITY",
                          help="Calling AE Title (default MODALITY)")
    modality.add_argument("--timeout", type=float, default=30.0, help="network timeouts in seconds")
    study = kinds.add_parser(
        "study", help="write a small study to send (a whole CT, MR or SC series)",
        description="Write a new study of one series into DIR as IMG0001.dcm, ...: each image a "
                    "whole IOD of its modality (dciodvfy finds no error), 64 x 64 pixels, a "
                    "synthetic patient. For a first store through a VIP.",
        epilog="Example: gateway simulate study study --images 5 --modality CT && "
               "storescu -aet CT01 -aec ARCHIVE 127.0.0.1 104 study/*.dcm")
    study.add_argument("folder", type=Path, metavar="DIR", help="where to write (made if needed)")
    study.add_argument("--images", type=_positive, default=5, metavar="N",
                       help="images in the series (default 5)")
    study.add_argument("--modality", default="CT", choices=STUDY_MODALITIES,
                       help="CT (default), MR or OT (secondary capture)")


def _add_hl7_simulators(kinds) -> list[argparse.ArgumentParser]:
    """gateway simulate hl7-receiver|hl7-sender; returns the servers."""
    receiver = kinds.add_parser(
        "hl7-receiver", help="MLLP receiver that records messages and ACKs them",
        description="An HL7 v2 receiver over MLLP (a RIS or interface engine). It records each "
                    "message before answering, parses it with hl7apy (AE with an ERR segment "
                    "if it cannot) and answers with an ACK built with hl7apy.")
    receiver.add_argument("--listen", default="127.0.0.1:2575", metavar="HOST:PORT",
                          help="where to listen (default 127.0.0.1:2575; port 0 = any free port)")
    receiver.add_argument("--name", default="RIS", help="its name in ACKs and logs (default RIS)")
    receiver.add_argument("--mode", default="AA", choices=["AA", "AE", "AR", "hang", "close", "slow"],
                          help="answer AA (default), AE or AR; hang: never answer; close: drop the "
                               "connection before answering; slow: AA after --delay seconds")
    receiver.add_argument("--delay", type=float, default=1.0, help="seconds, for --mode slow")
    receiver.add_argument("--record", type=Path, metavar="FILE",
                          help="append each message's MSH-10 and the address it came from to FILE "
                               "before answering")
    receiver.add_argument("--validate", action="store_true",
                          help="parse strictly: answer AE with an ERR segment when a message's "
                               "structure is not what its MSH-9 and version require")
    receiver.add_argument("--no-parse", action="store_false", dest="parse",
                          help="answer from the MSH alone, without hl7apy (which costs about "
                               "10 ms a message): for benchmarks and floods")
    sender = kinds.add_parser(
        "hl7-sender", help="send generated HL7 messages and report each ACK",
        description="Send realistic HL7 v2.5 messages (built and validated with hl7apy) with "
                    "distinct MSH-10 over one MLLP connection, each after the previous ACK. "
                    "Exit status 0 when every message got AA or CA, 1 otherwise.")
    sender.add_argument("target", metavar="HOST:PORT", help="the receiver or gateway VIP")
    sender.add_argument("--count", type=int, default=10, help="messages to send (default 10)")
    sender.add_argument("--patients", type=int, help="spread over this many patient IDs "
                                                     "(default: one per message)")
    sender.add_argument("--type", default="ADT", choices=list(KINDS), dest="message_type",
                        metavar="TYPE", help=f"message type: {', '.join(KINDS)} (default ADT: "
                                             "ADT^A01; ORU: ORU^R01; ORM: ORM^O01; NMD: NMD^N02)")
    sender.add_argument("--prefix", default="SIM", help="MSH-10 and patient ID prefix")
    sender.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each ACK")
    sender.add_argument("--tls-ca", metavar="FILE", help="speak MLLP over TLS, trusting this CA")
    sender.add_argument("--tls-cert", metavar="FILE", help="with --tls-ca: a client certificate")
    sender.add_argument("--tls-key", metavar="FILE", help="its private key")
    return [receiver]


def _add_xds_simulators(kinds) -> list[argparse.ArgumentParser]:
    """gateway simulate xds-registry|xds-repository|xds-consumer; returns the servers."""
    modes = ["ok", "http500", "fault", "failure", "hang", "close"]
    modes_help = ("ok (default); http500: plain HTTP 500; fault: HTTP 500 + SOAP Fault; failure: "
                  "HTTP 200 with ResponseStatusType Failure; hang: never answer; close: send half "
                  "the response, then close")
    registry = kinds.add_parser(
        "xds-registry", help="XDS.b document registry (ITI-18, ITI-42)",
        description="An XDS.b document registry over SOAP 1.2: answers ITI-18 FindDocuments by "
                    "patient ID from what ITI-42 registered.")
    registry.add_argument("--listen", default="127.0.0.1:17035", metavar="HOST:PORT",
                          help="where to listen (default 127.0.0.1:17035; port 0 = any free port)")
    registry.add_argument("--mode", default="ok", choices=modes, help=modes_help)
    repository = kinds.add_parser(
        "xds-repository", help="XDS.b document repository (ITI-41, ITI-43)",
        description="An XDS.b document repository over SOAP 1.2 with MTOM: stores ITI-41 "
                    "documents on disk, registers them with --registry (ITI-42) and serves them "
                    "to ITI-43.")
    repository.add_argument("--listen", default="127.0.0.1:17036", metavar="HOST:PORT",
                            help="where to listen (default 127.0.0.1:17036; port 0 = any free port)")
    repository.add_argument("--registry", default="", metavar="URL",
                            help="registry to send ITI-42 to, e.g. http://127.0.0.1:17035/registry")
    repository.add_argument("--store-dir", type=Path, metavar="DIR",
                            help="where documents are kept (default: a new temporary folder)")
    repository.add_argument("--mode", default="ok", choices=modes, help=modes_help)
    consumer = kinds.add_parser(
        "xds-consumer", help="XDS.b document consumer built with zeep (ITI-18, ITI-43; ITI-41)",
        description="An XDS.b document consumer, a SOAP client built with zeep from medgate's "
                    "WSDL: finds a patient's documents (ITI-18 FindDocuments to URL/registry) "
                    "and, with --retrieve, fetches one (ITI-43 to URL/repository); with "
                    "--provide, first sends a document (ITI-41 to URL/repository). Exit status "
                    "0 when every transaction answered Success, 1 otherwise.",
        epilog="Example: gateway simulate xds-consumer http://127.0.0.1:8080 "
               "--patient 'PAT0001^^^&1.2.3.4.5&ISO' --retrieve 1.2.3.4.5.6.7.8.9.1 "
               "--repository 1.3.6.1.4.1.21367.2010.1.2.1125")
    consumer.add_argument("url", metavar="URL", help="the XDS VIP (or a registry and repository "
                                                      "on one host), e.g. http://127.0.0.1:8080")
    consumer.add_argument("--patient", metavar="CX", help="ITI-18: the patient ID to query "
                                                        "(and with --provide, the document's)")
    consumer.add_argument("--provide", type=Path, metavar="FILE",
                          help="ITI-41 first: provide and register FILE (MTOM) for --patient")
    consumer.add_argument("--mime-type", metavar="TYPE",
                          help="with --provide: the document's MIME type (default: from its name)")
    consumer.add_argument("--retrieve", metavar="UID", help="ITI-43: a document's uniqueId")
    consumer.add_argument("--repository", metavar="OID", help="with --retrieve: its repository's "
                                                             "repositoryUniqueId")
    consumer.add_argument("--save", type=Path, metavar="FILE", help="write the document there")
    consumer.add_argument("--timeout", type=float, default=30.0, help="seconds per transaction")
    return [registry, repository]


def _add_audit_simulator(kinds) -> argparse.ArgumentParser:
    """gateway simulate audit-repository."""
    audit = kinds.add_parser(
        "audit-repository", help="ATNA audit record repository (syslog TLS, RFC 5425)",
        description="An ATNA audit record repository (IHE ITI-20 receiver): syslog with octet "
                    "counting over TLS (or plain TCP without --tls-cert); logs each message's "
                    "priority and size, and prints how many arrived at exit.")
    audit.add_argument("--listen", default="127.0.0.1:6514", metavar="HOST:PORT",
                       help="where to listen (default 127.0.0.1:6514; port 0 = any free port)")
    audit.add_argument("--save", type=Path, metavar="DIR",
                       help="write each message's XML to DIR/NNNNNN.xml as it arrives")
    return audit


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [WORKER]:  # started by a leader ([gateway] workers), not by people
        return _worker(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "check":
        return cmd_check(args)
    if args.command == "agent":
        return cmd_agent(args)
    if args.command == "probe":
        return probe.run(args)
    if args.command == "export":
        return cmd_export(args)
    if args.command == "ctl":
        return ctl.run(args)
    if args.command == "inventory":
        return ctl.run_inventory(args)
    if args.command == "trace":
        return trace.run(args)
    if args.command == "shadow":
        return shadow_report.run(args)
    if args.command == "demo":
        return cmd_demo(args)
    if args.command == "simulate":
        from gateway.testing.simulators.cli import run_simulator  # pynetdicom loads only when needed

        setup_logging("info")
        return run_simulator(args)
    return EXIT_USAGE  # unreachable: argparse requires a known command


WORKER = "worker"


def _worker(argv: list[str]) -> int:
    from gateway.service.worker import main as worker_main

    parser = argparse.ArgumentParser(prog="gateway worker")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--leader", type=int, required=True)
    parser.add_argument("--code", required=True, help="the digest of the leader's code")
    args = parser.parse_args(argv)
    return worker_main(args.control_fd, args.leader, args.code)


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.service.server import Gateway, StartupError

    # SIGHUP's default action ends the process. It is served by the signal receiver while the
    # gateway runs; before it opens (the config is being read anyway) and after it closes
    # (trio hands a SIGHUP still pending back to this handler) it is ignored, never fatal.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    setup_logging(args.log_level or "info")
    try:
        config = load_config(args.config)
        _log_as_configured(args, config)
        gateway = Gateway(config)
    except ConfigError as exc:
        print(f"gateway: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.check_config:
        from gateway.service.startup import host_problems

        problems = host_problems(config)
        for problem in problems:
            print(f"gateway: config error: {config.source}: {problem}", file=sys.stderr)
        if problems:
            return EXIT_USAGE
        for vip in config.vips:
            print(f"vip {vip.name}: {vip.protocol} on {', '.join(map(str, vip.listen))}, "
                  f"{vip.mode}, {len(vip.members)} member(s), check {vip.health.check}")
        for warning in config.warnings:
            print(f"warning: {warning}")
        print(f"{config.source}: OK")
        return EXIT_OK
    try:
        stopped_by = exits.run(_serve_until_signalled, gateway)
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_STARTUP
    except KeyboardInterrupt:  # before the signal receiver was open
        return EXIT_INTERRUPTED
    return EXIT_INTERRUPTED if stopped_by == signal.SIGINT else EXIT_OK


async def _serve_until_signalled(gateway: Gateway) -> int | None:
    """Serve until SIGTERM or SIGINT (which it returns), reloading on SIGHUP."""
    stopped_by: list[int] = []
    await gateway.bind()  # outside the nursery, so a StartupError arrives as itself
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as hard_stop:
                nursery.start_soon(_stop_on_signal, gateway, signals, hard_stop, stopped_by)
                await gateway.run()
            nursery.cancel_scope.cancel()
    return stopped_by[0] if stopped_by else None


async def _stop_on_signal(gateway: Gateway, signals, hard_stop: trio.CancelScope,
                          stopped_by: list[int]) -> None:
    async for signum in signals:
        if signum == signal.SIGHUP:
            # SIGHUPs that arrive meanwhile wait in the receiver (several as one): one more
            # reload after this one.
            log.info("SIGHUP received: reloading %s, reopening the audit log",
                     gateway.config.source)
            await gateway.reopen_logs()
            await gateway.reload_from_file()
            continue
        log.info("%s received: draining", signal.Signals(signum).name)
        stopped_by.append(signum)
        gateway.stop()
        break
    async for signum in signals:
        if signum == signal.SIGHUP:
            continue  # no reloads while draining
        log.warning("%s received again: closing live connections now", signal.Signals(signum).name)
        if gateway.workers is not None:
            gateway.workers.hurry()
        hard_stop.cancel()
        return


def _log_as_configured(args: argparse.Namespace, config) -> None:
    """[gateway] log_format and log_level, once the config is read (--log-level wins)."""
    settings = config.gateway
    setup_logging(args.log_level or settings.log_level, settings.log_format)


def cmd_check(args: argparse.Namespace) -> int:
    from gateway.commands import diagnose

    try:
        timeout = parse_duration(args.timeout) if args.timeout else None
        interval = parse_duration(args.interval)
        if bool(args.config) == bool(args.urls):
            raise ConfigError("give either -c FILE or one or more URLs (see gateway check --help)")
        config = None
        if args.config:
            config = load_config(args.config)
            specs = diagnose.specs_from_config(config, args.vip, timeout)
        else:
            specs = [diagnose.spec_from_url(url, timeout or 4.0) for url in args.urls]
    except (ConfigError, ValueError) as exc:
        print(f"gateway check: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not args.watch:
        reports = trio.run(diagnose.run_all, specs)
        routes = diagnose.route_reports(config, reports) if config else []
        missing = diagnose.host_problems(config, args.vip) if config else []
        if args.peer and config is not None:
            from gateway.service.peers import compare_with_peers

            if not config.gateway.peers:
                print(f"gateway check: {config.source}: --peer: [gateway] peers is not set",
                      file=sys.stderr)
                return EXIT_USAGE
            missing += trio.run(compare_with_peers, config)
        if args.json:
            print(diagnose.to_json(reports, routes, missing))
        else:
            console = diagnose.console()
            console.print(diagnose.table(reports))
            if routes:
                console.print(diagnose.routes_table(routes))
            for problem in missing:
                console.print(f"[bold red]{problem}[/]", markup=True, highlight=False)
        status = diagnose.exit_status(reports)
        return max(status, diagnose.EXIT_SOME_DOWN) if missing else status
    return _watch(specs, interval)


def _watch(specs, interval: float) -> int:
    import datetime

    from rich.live import Live

    from gateway.commands import diagnose

    with Live(console=diagnose.console(), auto_refresh=False) as live:
        try:
            while True:
                reports = exits.run(diagnose.run_all, specs)
                stamp = datetime.datetime.now().strftime("%H:%M:%S")
                live.update(diagnose.table(reports, title=f"medgate check at {stamp} "
                                           f"(every {interval:g}s, Ctrl-C to stop)"), refresh=True)
                time.sleep(interval)
        except KeyboardInterrupt:  # the one way out
            pass
    return EXIT_INTERRUPTED


def cmd_export(args: argparse.Namespace) -> int:
    import shutil

    from gateway.commands import export

    try:
        config = load_config(args.config)
        chain = export.chain_hosts(args.chain) if args.chain is not None else None
        if args.engine == "haproxy":
            text = export.haproxy(config, agent=parse_address(args.agent), checks=args.checks,
                                  stats_socket=args.stats_socket, chain=chain, bind=args.bind)
        elif args.vrrp:
            command = args.gateway_command or shutil.which("gateway") or "gateway"
            needed = {"--virtual-router-id": args.virtual_router_id,
                      "--interface": args.interface, "--unicast-src": args.unicast_src,
                      "--unicast-peer": args.unicast_peer}
            missing = [flag for flag, value in needed.items() if value is None]
            if missing:
                raise ConfigError(f"--vrrp needs {', '.join(missing)}")
            text = export.keepalived_pair(config, export.Vrrp(
                args.virtual_router_id, args.interface, args.unicast_src, args.unicast_peer,
                args.priority, preempt=not args.no_preempt), vip_address=args.vip_address,
                gateway_command=command)
        else:
            command = args.gateway_command or shutil.which("gateway") or "gateway"
            text = export.keepalived(config, gateway_command=command,
                                     vip_address=args.vip_address, lb_kind=args.lb_kind,
                                     chain=chain)
    except (ConfigError, ValueError) as exc:
        print(f"gateway export: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.output:
        args.output.write_text(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_agent(args: argparse.Namespace) -> int:
    from gateway.balancer import Balancer
    from gateway.service.server import build_pool
    from health.agent import Agent
    from health.monitor import Monitor

    setup_logging(args.log_level or "info")
    try:
        config = load_config(args.config)
        _log_as_configured(args, config)
        listen = parse_address(args.listen)
    except (ConfigError, ValueError) as exc:
        print(f"gateway agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    balancer = Balancer([build_pool(vip) for vip in config.vips])
    agent = Agent(balancer, config.vips)

    async def main() -> int | None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            try:
                listeners = await agent.open(listen)  # outside the nursery: errors as themselves
            except OSError as exc:
                log.error("cannot listen on %s: %s", listen, exc.strerror or exc)
                return None
            async with trio.open_nursery() as nursery:
                await nursery.start(Monitor(balancer, config.vips).run)
                addresses = await nursery.start(agent.serve_on, listeners)
                log.info("agent listening on %s (members named by agent-send), %s",
                         addresses[0], ", ".join(f"{vip}/{name} on port {a.port}" for
                                                 (vip, name, _), a in
                                                 zip(agent.members, addresses[1:])))
                async for signum in signals:
                    log.info("%s received: stopping", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return signum
        return None

    try:
        stopped_by = exits.run(main)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    if stopped_by is None:
        return EXIT_STARTUP
    return EXIT_INTERRUPTED if stopped_by == signal.SIGINT else EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from gateway.testing.demo import run_demo

    try:
        duration = parse_duration(args.duration)
    except ValueError as exc:
        print(f"gateway demo: --duration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.CRITICAL)  # the live view says what happens
    try:
        return exits.run(run_demo, duration, not args.no_faults, args.keep_running, Console(),
                         args.workers)
    except KeyboardInterrupt:  # before the demo's own handler was set up
        return EXIT_INTERRUPTED
