"""The `gateway` command line.

Exit status: 0 done, 1 could not start (port in use, permission), 3 usage or config error.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import trio

from gateway import __version__
from gateway.config import ConfigError, load_config
from gateway.server import Gateway, StartupError

EXIT_OK, EXIT_STARTUP, EXIT_USAGE = 0, 1, 3
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
        epilog="Exit status: 0 ok, 1 could not start, 3 usage or config error.")
    parser.add_argument("--version", action="version", version=f"medgate {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    run = commands.add_parser(
        "run", help="serve every VIP of a config file",
        description="Serve every VIP of the config with its health checks. SIGTERM or SIGINT: "
                    "stop accepting, let live connections finish (up to [gateway] "
                    "drain_timeout), exit 0.")
    run.add_argument("-c", "--config", required=True, type=Path, metavar="FILE",
                     help="the TOML config (see examples/)")
    run.add_argument("--check-config", action="store_true",
                     help="validate the config, print a summary and exit")
    run.add_argument("--log-level", default="info",
                     choices=["debug", "info", "warning", "error"],
                     help="debug also logs every health check result (default: info)")
    add_simulate_parser(commands)
    return parser


def add_simulate_parser(commands) -> None:
    simulate = commands.add_parser(
        "simulate", help="run a simulated PACS, modality, ... (for tests and demos)",
        description="Simulated peers for trying a gateway configuration without the real "
                    "systems. Servers print 'READY host:port' on stdout once they listen and run "
                    "until SIGTERM or Ctrl-C.")
    kinds = simulate.add_subparsers(dest="kind", metavar="KIND", parser_class=_Parser)
    kinds.required = True
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
    receiver = kinds.add_parser(
        "hl7-receiver", help="MLLP receiver that records messages and ACKs them",
        description="An HL7 v2 receiver over MLLP (a RIS or interface engine). It records each "
                    "message before answering and logs its MSH-10.")
    receiver.add_argument("--listen", default="127.0.0.1:2575", metavar="HOST:PORT",
                          help="where to listen (default 127.0.0.1:2575; port 0 = any free port)")
    receiver.add_argument("--name", default="RIS", help="its name in ACKs and logs (default RIS)")
    receiver.add_argument("--mode", default="AA", choices=["AA", "AE", "AR", "hang", "close", "slow"],
                          help="answer AA (default), AE or AR; hang: never answer; close: drop the "
                               "connection before answering; slow: AA after --delay seconds")
    receiver.add_argument("--delay", type=float, default=1.0, help="seconds, for --mode slow")
    receiver.add_argument("--record", type=Path, metavar="FILE",
                          help="append each message's MSH-10 to FILE before answering")
    sender = kinds.add_parser(
        "hl7-sender", help="send generated HL7 messages and report each ACK",
        description="Send ADT^A01 or ORU^R01 messages with distinct MSH-10 over one MLLP "
                    "connection, each after the previous ACK. Exit status 0 when every message "
                    "got AA or CA, 1 otherwise.")
    sender.add_argument("target", metavar="HOST:PORT", help="the receiver or gateway VIP")
    sender.add_argument("--count", type=int, default=10, help="messages to send (default 10)")
    sender.add_argument("--patients", type=int, help="spread over this many patient IDs "
                                                     "(default: one per message)")
    sender.add_argument("--type", default="ADT", choices=["ADT", "ORU"], dest="message_type")
    sender.add_argument("--prefix", default="SIM", help="MSH-10 and patient ID prefix")
    sender.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each ACK")
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


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%Y-%m-%dT%H:%M:%S")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "simulate":
        from gateway.simulators.cli import run_simulator  # pynetdicom loads only when needed

        setup_logging("info")
        return run_simulator(args)
    return EXIT_USAGE  # unreachable: argparse requires a known command


def cmd_run(args: argparse.Namespace) -> int:
    setup_logging(args.log_level)
    try:
        config = load_config(args.config)
        gateway = Gateway(config)
    except ConfigError as exc:
        print(f"gateway: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.check_config:
        for vip in config.vips:
            print(f"vip {vip.name}: {vip.protocol} on {', '.join(map(str, vip.listen))}, "
                  f"{vip.mode}, {len(vip.members)} member(s), check {vip.health.check}")
        print(f"{config.source}: OK")
        return EXIT_OK
    try:
        trio.run(_serve_until_signalled, gateway)
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_STARTUP
    return EXIT_OK


async def _serve_until_signalled(gateway: Gateway) -> None:
    await gateway.bind()  # outside the nursery, so a StartupError arrives as itself
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as hard_stop:
                nursery.start_soon(_stop_on_signal, gateway, signals, hard_stop)
                await gateway.run()
            nursery.cancel_scope.cancel()


async def _stop_on_signal(gateway: Gateway, signals, hard_stop: trio.CancelScope) -> None:
    async for signum in signals:
        log.info("%s received: draining", signal.Signals(signum).name)
        gateway.stop()
        break
    async for signum in signals:
        log.warning("%s received again: closing live connections now", signal.Signals(signum).name)
        hard_stop.cancel()
        return
