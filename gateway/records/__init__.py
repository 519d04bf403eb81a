"""What the gateway writes down: audit, ATNA, receipts, inventory, traces, summaries, affinity.

Above the network layer (ATNA sends over it), below the VIPs that produce the records.
"""

from __future__ import annotations

import time
from pathlib import Path


def unreadable_name(path: Path) -> Path:
    """Where a file the gateway cannot read (damaged, cut by a stop) is kept aside for whoever
    looks, beside it: `NAME.unreadable-TIME`."""
    return path.with_name(f"{path.name}.unreadable-{time.strftime('%Y%m%dT%H%M%S')}")
