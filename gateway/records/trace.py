"""`gateway trace`: did an image arrive, where, with what status (from the C-STORE receipts);
with --hl7, what became of an HL7 message (from the audit log)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, replace
from pathlib import Path

from gateway.config import ConfigError, load_config
from gateway.privacy import HashKeyError, existing_key
from gateway.records.receipts import Commitment, commitments, trace
from protocols.dimse import status_meaning

EXIT_FOUND, EXIT_NONE, EXIT_USAGE = 0, 1, 3


def add_parser(commands) -> None:
    parser = commands.add_parser(
        "trace", help="did a DICOM instance (or, with --hl7, an HL7 message) arrive, on which "
                      "member, with what answer",
        description="Look up the C-STORE receipts the gateway keeps in [gateway] state_dir: by "
                    "SOP Instance UID, or every instance of a calling AE. The gateway never "
                    "reads data sets, so a Study or Series Instance UID cannot be traced: use an "
                    "instance's UID or the sender's AE title. With --hl7, look up an HL7 "
                    "message by its MSH-10 (or a batch by its BHS-11) in the audit log "
                    "([gateway] audit, and its rotated copies): each time it was relayed, the "
                    "member, and the answer the sender was sent.",
        epilog="Exit status: 0 found, 1 nothing found, 3 usage or config error.")
    parser.add_argument("what", metavar="UID|AE|MSH-10",
                        help="a SOP Instance UID or a calling AE title; with --hl7 an MSH-10")
    parser.add_argument("-c", "--config", metavar="FILE", required=True,
                        help="the gateway's config (for state_dir and the hash key, or "
                             "audit)")
    parser.add_argument("--hl7", action="store_true",
                        help="trace an HL7 message by MSH-10, from the audit log")
    parser.add_argument("--since", default="", metavar="TIME",
                        help="only what happened at or after this ISO time, e.g. "
                             "2026-11-29T08:00")
    parser.add_argument("--json", action="store_true", help="JSON lines instead of a table")


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_config(args.config).gateway
    except ConfigError as exc:
        print(f"gateway trace: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.hl7:
        return _trace_hl7(args, settings.audit)
    if not settings.state_dir:
        print(f"gateway trace: {args.config}: [gateway] state_dir is not set, so no receipts "
              "are kept", file=sys.stderr)
        return EXIT_USAGE
    is_uid = bool(re.fullmatch(r"[0-9.]+", args.what))
    committed: list[Commitment] = []
    try:
        hasher = existing_key(settings.state_dir, settings.hash_key_file)
        found = trace(settings.state_dir, sop_instance=args.what if is_uid else "",
                      calling_ae="" if is_uid else args.what, since=args.since, hasher=hasher)
        if is_uid:
            committed = commitments(settings.state_dir, args.what, hasher, args.since)
    except (OSError, ValueError) as exc:
        print(f"gateway trace: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except HashKeyError as exc:
        print(f"gateway trace: {exc.reason}", file=sys.stderr)
        return EXIT_USAGE
    if is_uid:  # kept as a keyed hash: shown as the UID it was found by
        found = [replace(receipt, sop_instance=args.what) for receipt in found]
        committed = [replace(record, sop_instance=args.what) for record in committed]
    if not found and not committed:
        what = (f"no C-STORE of SOP Instance UID {args.what} passed the gateway (a Study or "
                "Series Instance UID is not visible to it: trace an instance or a calling AE)"
                if is_uid else f"no C-STORE from calling AE {args.what!r}")
        print(what + (f" since {args.since}" if args.since else ""))
        return EXIT_NONE
    if args.json:
        for receipt in found:
            print(json.dumps(asdict(receipt)))
        for record in committed:
            print(json.dumps({"kind": "commitment", **asdict(record)}))
        return EXIT_FOUND
    for record in committed:  # storage commitment results the return path relayed
        print(_commitment_line(record))
    if not found:
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


def _commitment_line(record: Commitment) -> str:
    if record.failure_reason is None:
        return (f"{record.sop_instance}: committed by {record.member} at {record.at} "
                f"(transaction {record.transaction_uid})")
    return (f"{record.sop_instance}: NOT committed by {record.member} at {record.at}: failure "
            f"reason 0x{record.failure_reason:04x} {status_meaning(record.failure_reason)} "
            f"(transaction {record.transaction_uid})")


def hl7_records(audit: str, control_id: str, since: str = "") -> list[dict]:
    """The audit records of HL7 messages (or batches) with this MSH-10, oldest first, from the
    audit log and its rotated copies (`audit.1`, ...; compressed ones are not read)."""
    path = Path(audit)
    files = sorted((p for p in path.parent.glob(f"{path.name}.*") if p.suffix != ".gz"),
                   key=lambda p: p.stat().st_mtime)
    if path.exists():
        files.append(path)
    if not files:
        raise FileNotFoundError(f"{path}: no audit log yet (is [gateway] audit right?)")
    needle = f'"control_id":{json.dumps(control_id)}'  # written so by gateway/records/audit.py
    found = []
    for file in files:
        with open(file, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if needle not in line:
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # a line cut off by a crash: the rest of the file still counts
                if (record.get("kind") == "hl7" and record.get("control_id") == control_id
                        and record.get("time", "") >= since):
                    found.append(record)
    return sorted(found, key=lambda record: record.get("time", ""))


def _trace_hl7(args: argparse.Namespace, audit: str) -> int:
    if audit in ("", "-"):
        print(f"gateway trace: {args.config}: [gateway] audit is not a file, so there is no "
              "HL7 record to read (set audit = \"/var/log/medgate/audit.jsonl\")",
              file=sys.stderr)
        return EXIT_USAGE
    try:
        found = hl7_records(audit, args.what, args.since)
    except OSError as exc:
        print(f"gateway trace: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not found:
        print(f"no HL7 message with MSH-10 {args.what!r} passed the gateway"
              + (f" since {args.since}" if args.since else "") + f" (audit log {audit})")
        return EXIT_NONE
    if args.json:
        for record in found:
            print(json.dumps(record))
        return EXIT_FOUND
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{len(found)} record(s) of HL7 MSH-10 {escape(args.what)}")
    for column in ("time", "vip", "client", "type", "member", "the sender got", "tries",
                   "members tried", "why"):
        table.add_column(column, overflow="fold")
    for record in found:
        kind = record.get("message_type", "")
        if record.get("batch_messages"):
            kind = f"batch of {record['batch_messages']}"
        # Every member the message was written or tried on, with what each did: a delivery
        # to two members shows here.
        tried = "; ".join(record.get("attempts") or (
            [f"{record['member']}: {record.get('ack') or '-'}"] if record.get("member") else []))
        table.add_row(*map(escape, (record.get("time", ""), record.get("vip", ""),
                                    record.get("client", ""), kind, record.get("member") or "-",
                                    record.get("told", ""), str(record.get("tries", "")),
                                    tried, record.get("reason", ""))))
    Console(width=None if sys.stdout.isatty() else 200).print(table)
    return EXIT_FOUND
