"""`gateway shadow report`: what the shadow members answered differently, from the records the
gateway keeps in [gateway] state_dir (gateway.records.shadow)."""

from __future__ import annotations

import argparse
import datetime
import sys
from collections import Counter

from gateway.config import ConfigError, load_config
from gateway.config.values import parse_duration
from gateway.records.shadow import as_csv, read_differences

EXIT_OK, EXIT_NONE, EXIT_USAGE = 0, 1, 3


def add_parser(commands) -> None:
    shadow = commands.add_parser(
        "shadow", help="what shadow members answered differently (a migration's evidence)",
        description="Shadow members (`shadow = true`) get a copy of each unit a VIP relays; "
                    "their answers are compared with the real member's and never reach a "
                    "client. `report` lists every difference kept in [gateway] state_dir: "
                    "when, which VIP and shadow, what differed, both answers, the unit's type "
                    "and its identifier as a keyed hash (never message content).",
        epilog="Exit status: 0 differences listed, 1 none, 3 usage or config error.")
    actions = shadow.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    report = actions.add_parser("report", help="the differences, summed and one a line")
    report.add_argument("-c", "--config", metavar="FILE", required=True,
                        help="the gateway's config (for state_dir)")
    report.add_argument("--since", default="", metavar="WHEN",
                        help='only differences from then on: a duration back from now ("2h", '
                             '"7d") or an ISO date and time ("2026-12-01T08:00")')
    report.add_argument("--csv", action="store_true",
                        help="every difference as CSV on stdout (for a spreadsheet)")


def _since(text: str) -> datetime.datetime | None:
    if not text:
        return None
    now = datetime.datetime.now(datetime.timezone.utc)
    try:
        return now - datetime.timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r}: give a duration (\"2h\") or an ISO date and time "
                         "(\"2026-12-01T08:00\")") from None
    return moment if moment.tzinfo else moment.astimezone()


def run(args: argparse.Namespace) -> int:
    try:
        settings = load_config(args.config).gateway
        since = _since(args.since)
    except (ConfigError, ValueError) as exc:
        print(f"gateway shadow: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not settings.state_dir:
        print(f"gateway shadow: {args.config}: [gateway] state_dir is not set: no differences "
              "are kept (the metrics medgate_shadow_* still count them)", file=sys.stderr)
        return EXIT_USAGE
    differences = read_differences(settings.state_dir, since)
    if args.csv:
        sys.stdout.write(as_csv(differences))
        return EXIT_OK if differences else EXIT_NONE
    when = f" since {args.since}" if args.since else ""
    if not differences:
        print(f"no difference kept{when} in {settings.state_dir}")
        return EXIT_NONE
    print(f"{len(differences)} difference(s){when}:")
    for (vip, shadow, kind), count in sorted(Counter(
            (d.vip, d.shadow, d.kind) for d in differences).items()):
        print(f"  vip {vip} shadow {shadow}: {count} {kind}")
    for d in differences:
        print(f"{d.time} vip={d.vip} shadow={d.shadow} {d.kind}: {d.unit} {d.unit_id} "
              f"{d.member} answered {d.member_answer}, the shadow {d.shadow_answer}")
    return EXIT_OK
