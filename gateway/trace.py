"""`gateway trace`: did an image arrive, where, with what status (from the C-STORE receipts)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict

from gateway.config import ConfigError, load_config
from gateway.receipts import trace
from protocols.dimse import status_meaning

EXIT_FOUND, EXIT_NONE, EXIT_USAGE = 0, 1, 3


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "trace", help="did a DICOM instance arrive, on which member, with what status",
        description="Look up the C-STORE receipts the gateway keeps in [gateway] state_dir: by "
                    "SOP Instance UID, or every instance of a calling AE. The gateway never "
                    "reads data sets, so a Study or Series Instance UID cannot be traced: use an "
                    "instance's UID or the sender's AE title.",
        epilog="Exit status: 0 receipts found, 1 none, 3 usage or config error.")
    parser.add_argument("what", metavar="UID|AE", help="a SOP Instance UID, or a calling AE title")
    parser.add_argument("-c", "--config", metavar="FILE", required=True,
                        help="the gateway's config (for state_dir and receipt_hash_uids)")
    parser.add_argument("--since", default="", metavar="TIME",
                        help="only receipts at or after this ISO time, e.g. 2026-11-29T08:00")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_config(args.config).gateway
    except ConfigError as exc:
        print(f"gateway trace: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not settings.state_dir:
        print(f"gateway trace: {args.config}: [gateway] state_dir is not set, so no receipts "
              "are kept", file=sys.stderr)
        return EXIT_USAGE
    is_uid = bool(re.fullmatch(r"[0-9.]+", args.what))
    try:
        found = trace(settings.state_dir, sop_instance=args.what if is_uid else "",
                      calling_ae="" if is_uid else args.what, since=args.since,
                      hashed=settings.receipt_hash_uids)
    except (OSError, ValueError) as exc:
        print(f"gateway trace: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not found:
        what = (f"no C-STORE of SOP Instance UID {args.what} passed the gateway (a Study or "
                "Series Instance UID is not visible to it: trace an instance or a calling AE)"
                if is_uid else f"no C-STORE from calling AE {args.what!r}")
        print(what + (f" since {args.since}" if args.since else ""))
        return EXIT_NONE
    if args.json:
        for receipt in found:
            print(json.dumps(asdict(receipt)))
        return EXIT_FOUND
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{len(found)} C-STORE receipt(s)")
    for column in ("time", "vip", "calling AE", "client", "member", "SOP instance", "status"):
        table.add_column(column, overflow="fold")
    for receipt in found:
        status = ("no response (the association ended first: not stored)" if receipt.status < 0
                  else f"0x{receipt.status:04x} {status_meaning(receipt.status)}")
        table.add_row(*map(escape, (receipt.at, receipt.vip, receipt.calling_ae, receipt.client,
                                    receipt.member, receipt.sop_instance, status)))
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    return EXIT_FOUND
