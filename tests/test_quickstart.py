"""The README's first quick-start command, as written, on Debian's own python3 (PEP 668)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
SYSTEM_PYTHON = Path("/usr/bin/python3")
SKIPPED = shutil.ignore_patterns(".git", ".venv", "test-artifacts", "__pycache__", "*.egg-info",
                                 ".pytest_cache", ".hypothesis", "build", "dist")


@pytest.mark.slow
def test_the_first_quick_start_command_works_with_debians_python(tmp_path):
    if not SYSTEM_PYTHON.exists():
        pytest.fail("/usr/bin/python3 is missing: apt-get install python3 python3-venv "
                    "(.ci/run does this)")
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"```bash\n# 1\..*?\n(?:#.*\n)*(.+)\n", readme).group(1)
    assert command.startswith("python3 -m venv .venv") and command.endswith("gateway demo")
    clone = tmp_path / "medgate"
    shutil.copytree(ROOT, clone, ignore=SKIPPED)
    # Debian's python3 first on PATH: what a fresh machine has.
    result = subprocess.run(["bash", "-c", command.replace("gateway demo",
                                                           "gateway demo --duration 4s")],
                            cwd=clone, capture_output=True, text=True, timeout=900,
                            env={"PATH": f"{SYSTEM_PYTHON.parent}:/usr/sbin:/bin:/sbin",
                                 "HOME": str(tmp_path), "COLUMNS": "80", "TERM": "dumb"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "nothing lost" in result.stdout
    venv_python = (clone / ".venv" / "bin" / "python3").resolve()
    assert venv_python == SYSTEM_PYTHON.resolve()  # the venv is on Debian's python
