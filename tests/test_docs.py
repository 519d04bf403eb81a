"""The documentation against the code: every key the loader takes is in docs/reference.md, and
every block a reader is told to copy (marked `<!-- copy: NAME -->`) is run here as written,
only its ports moved so that the run collides with nothing."""

from __future__ import annotations

import re
import shlex
import subprocess
import urllib.request
from enum import StrEnum
from pathlib import Path

from gateway import logs
from gateway.commands.cli import build_parser
from gateway.config import gateway_section, model, tls_section, vip_section
from tests.helpers import listening, reserved_port, stop_process, wait_until

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COPY = re.compile(r"<!-- copy: (\S+) -->\n```\w*\n(.*?)```", re.S)
# Each marked block, and the test that runs it.
CHECKED_BY = {
    "quick-start": "tests/test_quickstart.py::test_the_first_quick_start_command_works_with_debians_python",
    "test-certificates": "tests/test_docs.py::test_the_tls_front_walkthrough_runs_as_written",
    "tls-front.toml": "tests/test_docs.py::test_the_tls_front_walkthrough_runs_as_written",
    "tls-servers": "tests/test_docs.py::test_the_tls_front_walkthrough_runs_as_written",
    "tls-echo": "tests/test_docs.py::test_the_tls_front_walkthrough_runs_as_written",
    "prometheus.yml": "tests/test_alerts.py::test_the_prometheus_and_alertmanager_configs_of_the_docs_pass_their_checks",
    "alertmanager.yml": "tests/test_alerts.py::test_the_prometheus_and_alertmanager_configs_of_the_docs_pass_their_checks",
}


def copy_blocks() -> dict[str, str]:
    blocks: dict[str, str] = {}
    for path in DOCS:
        for name, body in COPY.findall(path.read_text()):
            assert name not in blocks, f"{path.name}: a second block named {name!r}"
            blocks[name] = body
    return blocks


def test_every_copy_block_is_run_by_a_test():
    blocks = copy_blocks()
    assert set(blocks) == set(CHECKED_BY), "a marked block with no test, or a test with no block"
    for test in set(CHECKED_BY.values()):
        path, name = test.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), test


def test_every_config_key_and_value_is_in_the_reference():
    reference = (ROOT / "docs" / "reference.md").read_text()
    keys = (vip_section._VIP_KEYS | vip_section._HEALTH_VALUES.keys()
            | vip_section._MEMBER_KEYS | gateway_section._GATEWAY_KEYS
            | gateway_section._ATNA_VALUES.keys() | set(gateway_section._ATNA_TLS_KEYS)
            | gateway_section._LDAP_KEYS
            | set(tls_section.SERVER_TLS_KEYS) | set(tls_section.CLIENT_TLS_KEYS)
            | {"key", "timeout", "method", "token_file", "role"})
    code = " ".join(re.findall(r"`([^`]+)`", reference))  # what the page writes as code
    missing = sorted(key for key in keys if not re.search(rf"(?<![\w-]){key}(?![\w-])", code))
    assert not missing, f"keys the loader takes that docs/reference.md does not name: {missing}"
    choices = [value for module in (model, logs) for item in vars(module).values()
               if isinstance(item, type) and issubclass(item, StrEnum) and item.__module__ in
               (model.__name__, logs.__name__) for value in item]
    unnamed = sorted({str(value) for value in choices if str(value) not in reference})
    assert not unnamed, f"values docs/reference.md does not name: {unnamed}"


def _ready(admin_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=2) as answer:
            return answer.status == 200
    except OSError:
        return False


def test_the_tls_front_walkthrough_runs_as_written(tmp_path):
    """docs/security.md "Try a TLS front": certificates, config, servers, echoscu."""
    blocks = copy_blocks()
    ports = {"2762": reserved_port(), "11112": reserved_port(), "9090": reserved_port()}

    def moved(text: str) -> str:
        return re.sub(r"\b(2762|11112|9090)\b", lambda m: str(ports[m.group(1)]), text)

    made = subprocess.run(["bash", "-e", "-c", blocks["test-certificates"]], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    (tmp_path / "tls-front.toml").write_text(moved(blocks["tls-front.toml"]))
    servers = moved(blocks["tls-servers"]).strip().splitlines()
    assert [line.split()[:2] for line in servers] == [["gateway", "simulate"], ["gateway", "run"]]
    ready = [lambda: listening(ports["11112"]), lambda: _ready(ports["9090"])]
    started: list[subprocess.Popen] = []
    try:
        for line, is_ready in zip(servers, ready):
            process = subprocess.Popen(shlex.split(line), cwd=tmp_path, start_new_session=True,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            started.append(process)
            wait_until(lambda: is_ready() or process.poll() is not None, timeout=30,
                       what=line)
            assert process.poll() is None, f"{line!r} ended with {process.returncode}"
        echo = moved(blocks["tls-echo"]).strip()
        done = subprocess.run(["bash", "-c", echo], cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0 and not re.search(r"^[EF]:", done.stdout + done.stderr, re.M), \
            done.stdout + done.stderr
        # What the page says of the other calling AE and of no certificate.
        other = subprocess.run(["bash", "-c", echo.replace("-aet CT1", "-aet CT9")],
                               cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert "Calling AE Title Not Recognized" in other.stdout + other.stderr
        plain = re.sub(r"\+tls .* \+cf ca\.crt ", "", echo)
        assert plain != echo
        anonymous = subprocess.run(["bash", "-c", plain], cwd=tmp_path, capture_output=True,
                                   text=True, timeout=60)
        assert re.search(r"^[EF]:", anonymous.stdout + anonymous.stderr, re.M)
    finally:
        for process in reversed(started):
            stop_process(process)


def test_every_gateway_command_in_the_docs_parses():
    """The blocks that show commands for a site (its addresses, its files) cannot run here; each
    `gateway ...` line in them must still be one the command line takes, options and all."""
    parser = build_parser()
    seen = 0
    for path in DOCS:
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", path.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line, comments=True)
                if not words or words[0] != "gateway":
                    continue
                operators = [i for i, word in enumerate(words) if word in (">", "|", "&&", "&")]
                words = words[1:operators[0] if operators else None]  # the command's own words
                try:
                    parser.parse_args(words)
                except SystemExit as stop:
                    raise AssertionError(f"{path.name}: {line.strip()!r} does not parse") from stop
                seen += 1
    assert seen > 20  # the blocks were found
