"""`gateway demo` as a newcomer runs it, in an 80-column terminal."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest


@pytest.mark.parametrize("workers", [1, 2])
def test_demo_ends_with_nothing_lost_and_fits_80_columns(workers):
    """With `--workers 2` too: every protocol through two worker processes, a PACS and an
    HL7 receiver killed and brought back, and nothing lost."""
    result = subprocess.run([sys.executable, "-m", "gateway", "demo", "--duration", "8s",
                             "--workers", str(workers)],
                            capture_output=True, text=True, timeout=180,
                            env={**os.environ, "COLUMNS": "80", "TERM": "dumb"})
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "status page: http://127.0.0.1:" in out
    assert ("2 worker processes relay" in out) == (workers == 2)
    assert "killed PACS1 and RIS1" in out and "PACS1 and RIS1 are back" in out
    rows = {name: re.search(rf"{re.escape(name)}.*?│\s+(\d+) │\s+(\d+) │\s+(\d+) │\s+(\d+) │",
                            out) for name in ("DICOM C-STORE", "HL7 ADT", "XDS ITI-41",
                                              "XDS ITI-18", "viewer (TCP)")}
    for name, row in rows.items():
        assert row, f"no summary row for {name}:\n{out}"
        sent, stored, retried, lost = map(int, row.groups())
        assert sent > 0 and stored == sent and lost == 0, (name, row.group(0))
    assert "nothing lost" in out
    assert max(len(line) for line in out.splitlines()) <= 80, out
    assert "Traceback" not in result.stderr
