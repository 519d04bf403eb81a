"""Running as a service: systemd's notify protocol, /healthz and /readyz, the unit file and the
container image's commands (no systemd or docker needed: the protocols and commands are real)."""

from __future__ import annotations

import configparser
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from gateway.service.server import STOP_AFTER_DRAIN, Gateway
from gateway.config import parse_config
from tests.helpers import (logged_port, refused_port, reserved_port, start_backends,
                           start_gateway, stop_process, wait_until)
from tests.test_admin import get

ROOT = Path(__file__).parent.parent
GATEWAY = [sys.executable, "-m", "gateway"]


def site(tmp_path: Path, member_port: int, admin: str = "") -> Path:
    path = tmp_path / "site.toml"
    path.write_text(f'[gateway]\nadmin = "{admin}"\naudit = ""\ndrain_timeout = "5s"\n'
                    '[[vip]]\nname = "web"\nprotocol = "tcp"\nlisten = "127.0.0.1:0"\n'
                    'health = { check = "tcp", interval = "60s" }\n'
                    f'[[vip.member]]\nname = "a"\naddress = "127.0.0.1:{member_port}"\n')
    return path


def notifications(listener: socket.socket, until: str, timeout: float = 20) -> list[dict]:
    """Datagrams (as dicts of their KEY=VALUE lines) until one holds `until` (e.g. READY=1)."""
    received = []
    deadline = time.monotonic() + timeout
    key, _, value = until.partition("=")
    while time.monotonic() < deadline:
        listener.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            data = listener.recv(4096)
        except socket.timeout:
            break
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        received.append(fields)
        if fields.get(key) == value:
            return received
    raise AssertionError(f"no {until} within {timeout}s; got {received}")


def unit_command(line: str, config: Path) -> list[str]:
    """An Exec line of packaging/medgate.service as it would run here: this Python's gateway,
    the test's config."""
    words = shlex.split(line)
    assert words[0] == "/opt/medgate/bin/gateway", line
    return [*GATEWAY, *(str(config) if w == "/etc/medgate/medgate.toml" else w
                        for w in words[1:])]


def test_the_unit_file_runs_and_systemd_hears_ready_reloading_watchdog_and_stopping(tmp_path):
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read(ROOT / "packaging" / "medgate.service")
    service = unit["Service"]
    assert (service["Type"], service["KillSignal"], service["User"]) == (
        "notify", "SIGTERM", "medgate")
    assert service["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    with socket.socket(socket.AF_INET) as member:
        member.bind(("127.0.0.1", 0))
        member.listen()
        config = site(tmp_path, member.getsockname()[1])
        check = subprocess.run(unit_command(service["ExecStartPre"], config),
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0 and check.stdout.endswith(": OK\n"), check.stderr
        address = f"@medgate-test-{os.getpid()}-{time.monotonic_ns()}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.bind("\0" + address[1:])
            log = tmp_path / "gateway.log"
            process = subprocess.Popen(
                unit_command(service["ExecStart"], config), stderr=open(log, "wb"),
                env={**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"},
                start_new_session=True)
            try:
                ready = notifications(listener, "READY=1")[-1]
                # READY=1 only once the VIP listens and its member has been checked
                assert "listening on 127.0.0.1:" in log.read_text()
                assert ready["STATUS"] == "serving 1 VIP(s), 1 of 1 member(s) up"
                assert len(notifications(listener, "WATCHDOG=1")) <= 3  # every 0.2 s
                notifications(listener, "WATCHDOG=1", timeout=1)
                process.send_signal(signal.SIGHUP)
                around = notifications(listener, "READY=1")
                reloading = next(n for n in around if n.get("RELOADING") == "1")
                assert int(reloading["MONOTONIC_USEC"]) > 0
                assert around.index(reloading) < len(around) - 1  # then READY=1 again
                process.send_signal(signal.SIGTERM)
                stopping = notifications(listener, "STOPPING=1")[-1]
                assert stopping["STATUS"] == "draining"
                # drain_timeout (5 s) and what may follow it: a longer drain than the unit's
                # TimeoutStopSec is not cut by its SIGKILL
                assert stopping["EXTEND_TIMEOUT_USEC"] == str(int(
                    (5 + STOP_AFTER_DRAIN) * 1_000_000))
                assert process.wait(20) == 0
            finally:
                stop_process(process)


async def test_readyz_says_starting_ready_and_draining_and_healthz_stays_alive(nursery,
                                                                               tmp_path):
    arrivals = []  # connections to member "a": its first check's, then the client's
    relayed = trio.Event()

    async def web(stream: trio.SocketStream) -> None:  # answers HTTP; waits for the rest
        arrivals.append(stream)
        if len(arrivals) == 2:
            relayed.set()
        request = b""
        while b"\r\n\r\n" not in request:
            data = await stream.receive_some(4096)
            if not data:
                return
            request += data
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    listeners = await nursery.start(partial(trio.serve_tcp, web, 0, host="127.0.0.1"))
    web_port = listeners[0].socket.getsockname()[1]
    # A member whose first check takes 1.5 s (a port that accepts and then says nothing to an
    # http check): the gateway stays STARTING that long.
    silent = trio.socket.socket()
    await silent.bind(("127.0.0.1", 0))
    silent.listen()
    config = parse_config(
        '[gateway]\nadmin = "127.0.0.1:0"\naudit = ""\ndrain_timeout = "10s"\n'
        '[[vip]]\nname = "web"\nprotocol = "tcp"\nlisten = "127.0.0.1:0"\n'
        'health = { check = "http", interval = "60s", timeout = "1500ms" }\n'
        f'[[vip.member]]\nname = "a"\naddress = "127.0.0.1:{web_port}"\n'
        f'[[vip.member]]\nname = "s"\naddress = "127.0.0.1:{silent.getsockname()[1]}"\n',
        source="test.toml")
    gateway = Gateway(config)
    await gateway.bind()  # the admin address is known from here on
    ready = trio.Event()

    async def run() -> None:
        await nursery.start(gateway.run)  # returns once READY
        ready.set()

    nursery.start_soon(run)
    base = f"http://{gateway.admin_address}"
    assert await get(f"{base}/readyz") == (503, b"starting: listeners open, first health "
                                                b"checks running\n")
    assert await get(f"{base}/healthz") == (200, b"alive\n")
    with trio.fail_after(10):
        await ready.wait()
    assert await get(f"{base}/readyz") == (200, b"ready\n")
    client = await trio.open_tcp_stream("127.0.0.1", gateway.bound["web"][0].port)
    with trio.fail_after(10):
        await relayed.wait()  # the member waits for a request: a live connection
    gateway.stop()
    await trio.testing.wait_all_tasks_blocked()  # the gateway has seen it: draining
    assert await get(f"{base}/readyz") == (503, b"draining: no new clients, live ones "
                                                b"finishing\n")
    assert await get(f"{base}/healthz") == (200, b"alive\n")
    status, body = await get(f"{base}/metrics")
    assert re.search(rb'medgate_build_info\{python="[\d.]+",version="[^"]+"\} 1\.0', body)
    assert b"process_cpu_seconds_total" in body and b"process_open_fds" in body
    await client.aclose()
    silent.close()


def dockerfile_instruction(name: str) -> list[str]:
    """The exec-form arguments of a Dockerfile instruction (ENTRYPOINT; for HEALTHCHECK, its
    CMD's)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return json.loads(line[line.index("["):])


def test_the_container_image_commands_run_and_its_healthcheck_passes_when_ready(tmp_path):
    """No docker needed: ENTRYPOINT and the HEALTHCHECK command, run as the image runs them
    (the config mounted at /etc/medgate/medgate.toml: here the test's)."""
    entrypoint = dockerfile_instruction("ENTRYPOINT")
    health = dockerfile_instruction("HEALTHCHECK")
    assert entrypoint[:4] == ["gateway", "run", "-c", "/etc/medgate/medgate.toml"]
    with socket.socket(socket.AF_INET) as member:
        member.bind(("127.0.0.1", 0))
        member.listen()
        config = site(tmp_path, member.getsockname()[1], admin="127.0.0.1:0")
        command = [*GATEWAY, *(str(config) if w == "/etc/medgate/medgate.toml" else w
                               for w in entrypoint[1:])]
        assert health[:2] == ["gateway", "probe"]
        healthcheck = [*GATEWAY, *(str(config) if w == "/etc/medgate/medgate.toml" else w
                                   for w in health[1:])]
        nothing = {**os.environ, "MEDGATE_ADMIN_PORT": str(refused_port())}
        assert subprocess.run(healthcheck, env=nothing, capture_output=True).returncode != 0
        log = tmp_path / "gateway.log"
        process = subprocess.Popen(command, stderr=open(log, "wb"), start_new_session=True)
        try:
            env = {**os.environ, "MEDGATE_ADMIN_PORT": str(logged_port(log.read_text))}
            wait_until(lambda: subprocess.run(healthcheck, env=env, capture_output=True,
                                              timeout=10).returncode == 0,
                       timeout=30, what="HEALTHCHECK passing")
            process.send_signal(signal.SIGTERM)  # the image's STOPSIGNAL
            assert process.wait(30) == 0
        finally:
            stop_process(process)


async def test_the_probe_asks_an_admin_server_with_tls_as_its_config_says(nursery, tmp_path,
                                                                        certs):
    """The container's layout: the admin server off loopback must speak HTTPS; the probe
    trusts admin_tls's CA (no token) and asks it on loopback when it listens everywhere."""
    (backend,) = await start_backends(nursery, "a")
    port = reserved_port()
    cert, key = certs.server
    path = tmp_path / "medgate.toml"
    path.write_text(f'[gateway]\nadmin = "0.0.0.0:{port}"\nadmin_token = "{"t" * 32}"\n'
                    f'admin_tls = {{ cert = "{cert}", key = "{key}", ca = "{certs.ca}" }}\n'
                    'audit = ""\n[[vip]]\nname = "web"\nprotocol = "tcp"\n'
                    'listen = "127.0.0.1:0"\n[[vip.member]]\nname = "a"\n'
                    f'address = "127.0.0.1:{backend.port}"\n')
    probe = [*GATEWAY, *dockerfile_instruction("HEALTHCHECK")[1:3], str(path)]
    down = await trio.run_process(probe, capture_stdout=True, check=False)
    assert down.returncode == 1 and f"https://127.0.0.1:{port}/readyz".encode() in down.stdout
    await start_gateway(nursery, path.read_text(), admin=True)
    ready = await trio.run_process(probe, capture_stdout=True, check=False)
    assert ready.returncode == 0 and ready.stdout.strip().endswith(b": ready"), ready.stdout
    off = tmp_path / "off.toml"
    off.write_text(path.read_text().replace(f'admin = "0.0.0.0:{port}"', 'admin = ""'))
    refused = await trio.run_process([*probe[:-1], str(off)], capture_stderr=True, check=False)
    assert refused.returncode == 3 and b"[gateway] admin is off" in refused.stderr


def hl7_site(tmp_path: Path, receiver_port: int, workers: int = 1) -> Path:
    """A gateway config whose admin address is the one `gateway ctl -c` finds it at."""
    (tmp_path / "log").mkdir()
    path = tmp_path / "hl7.toml"
    path.write_text(f'[gateway]\nworkers = {workers}\nadmin = "127.0.0.1:{reserved_port()}"\n'
                    f'audit = "{tmp_path / "log" / "audit.jsonl"}"\n'
                    '[[vip]]\nname = "hl7"\nprotocol = "hl7"\nlisten = "127.0.0.1:0"\n'
                    'health = { check = "tcp", interval = "60s" }\n'
                    f'[[vip.member]]\nname = "ris1"\naddress = "127.0.0.1:{receiver_port}"\n')
    return path


def send_acked(port: int, count: int, prefix: str) -> None:
    """`count` HL7 messages whose control IDs start with `prefix`, each answered AA."""
    from gateway.testing.simulators.hl7 import send_messages
    from gateway.testing.simulators.hl7_messages import make_messages

    results = send_messages("127.0.0.1", port, make_messages(count, prefix=prefix))
    assert [r.code for r in results] == ["AA"] * count


def control_ids(path: Path) -> list[str]:
    return [json.loads(line)["control_id"] for line in path.read_text().splitlines()
            if '"kind":"hl7"' in line]


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_moves_the_audit_log_in_every_process(tmp_path, hl7_receiver, workers):
    """A reload that changed [gateway] audit: one process wrote on to the old file (a reload
    said done), and with workers the leader did while the new workers wrote the new one. A
    path that cannot be written refuses the reload; keys read only at start say so."""
    receiver = hl7_receiver("RIS1")
    config = hl7_site(tmp_path, receiver.port, workers)
    audit, moved = tmp_path / "log" / "audit.jsonl", tmp_path / "log" / "moved.jsonl"
    log = tmp_path / "gateway.log"
    process = subprocess.Popen([*GATEWAY, "run", "-c", str(config)], stderr=open(log, "wb"),
                               start_new_session=True)

    def reload(text: str) -> subprocess.CompletedProcess:
        config.write_text(text)
        return subprocess.run([*GATEWAY, "ctl", "-c", str(config), "reload"],
                              capture_output=True, text=True, timeout=60)

    try:
        send = partial(send_acked, logged_port(log.read_text, "hl7"), 3)
        send("OLD")
        started = config.read_text()
        refused = reload(started.replace(str(audit), str(tmp_path / "none" / "a.jsonl")))
        assert refused.returncode == 1 and "cannot write" in refused.stderr, refused.stderr
        assert reload(started.replace(str(audit), str(moved)).replace(
            "[gateway]\n", f'[gateway]\nstate_dir = "{tmp_path / "state"}"\n')).returncode == 0
        send("NEW")
        assert control_ids(audit) == [f"OLD{n:06d}" for n in range(1, 4)]
        assert control_ids(moved) == [f"NEW{n:06d}" for n in range(1, 4)]
        actions = [json.loads(line).get("outcome") for line in moved.read_text().splitlines()]
        assert actions[0] == "reloaded"  # the leader's own records moved too
        text = log.read_text()
        assert f"the audit log is now {moved} (was {audit})" in text
        assert "[gateway] state_dir changed; it takes effect at restart" in text
        assert not (tmp_path / "state").exists()  # no worker of the new config made it
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        stop_process(process)


@pytest.mark.parametrize("workers", [1, 2])
def test_logrotate_with_the_shipped_config_then_sighup_lose_no_audit_record(tmp_path,
                                                                            hl7_receiver,
                                                                            workers):
    """With workers, each writes its units' records: `ctl reopen-logs` (logrotate's
    postrotate) reaches them too; they wrote on into the moved file, which `compress` removes
    a day later."""
    receiver = hl7_receiver("RIS1")
    config = hl7_site(tmp_path, receiver.port, workers)
    audit = tmp_path / "log" / "audit.jsonl"
    log = tmp_path / "gateway.log"
    process = subprocess.Popen([*GATEWAY, "run", "-c", str(config)], stderr=open(log, "wb"),
                               start_new_session=True)
    try:
        send = partial(send_acked, logged_port(log.read_text, "hl7"), 5)
        send("BEFORE")
        # The shipped logrotate file, pointed at this test's folder and gateway
        rotation = (ROOT / "packaging" / "logrotate.d" / "medgate").read_text()
        rotation = (rotation.replace("/var/log/medgate", str(tmp_path / "log"))
                    .replace("/opt/medgate/bin/gateway", f"{sys.executable} -m gateway")
                    .replace("/etc/medgate/medgate.toml", str(config))
                    .replace("create 0640 medgate medgate", "create 0640"))
        (tmp_path / "logrotate.conf").write_text(rotation)
        rotated = subprocess.run(["logrotate", "--force", "--state", str(tmp_path / "state"),
                                  str(tmp_path / "logrotate.conf")], capture_output=True,
                                 text=True, timeout=60, cwd=ROOT)
        assert rotated.returncode == 0, rotated.stderr
        send("AFTER")
        assert control_ids(audit.with_name("audit.jsonl.1")) == [
            f"BEFORE{n:06d}" for n in range(1, 6)]
        assert control_ids(audit) == [f"AFTER{n:06d}" for n in range(1, 6)]  # reopened
        assert "audit log reopened (asked by" in log.read_text()

        audit.rename(audit.with_name("moved.jsonl"))  # by hand, then SIGHUP
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: log.read_text().count("audit log reopened") == 2, timeout=20,
                   what="the reopen on SIGHUP")
        send("HUP")
        assert control_ids(audit) == [f"HUP{n:06d}" for n in range(1, 6)]

        wait_until(lambda: "reloaded " in log.read_text(), timeout=20, what="the reload")
        audit.parent.rename(tmp_path / "gone")  # a file that cannot be reopened: each says so
        refused = subprocess.run([*GATEWAY, "ctl", "-c", str(config), "reopen-logs"],
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode == 1
        assert refused.stderr.count(f"cannot reopen {audit}") == 1, refused.stderr
        assert ("(the leader, worker 1, worker 2" in refused.stderr) == (workers > 1)
        send("KEPT")  # to the file each has: records are not lost
        assert control_ids(tmp_path / "gone" / audit.name)[5:] == [
            f"KEPT{n:06d}" for n in range(1, 6)]
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        stop_process(process)


def test_json_logs_carry_each_key_as_a_field_and_text_logs_milliseconds_and_zone(tmp_path):
    with socket.socket(socket.AF_INET) as member:
        member.bind(("127.0.0.1", 0))
        member.listen()
        config = site(tmp_path, member.getsockname()[1])
        text = config.read_text()
        for log_format, level in (("json", "info"), ("text", "info"), ("text", "warning")):
            variant = text.replace('[gateway]\n', f'[gateway]\nlog_format = "{log_format}"\n'
                                                 f'log_level = "{level}"\n')
            if level == "warning":  # a member down: its health change is a WARNING
                variant = variant.replace(f":{member.getsockname()[1]}", f":{refused_port()}")
            config.write_text(variant)
            log = tmp_path / f"{log_format}-{level}.log"
            process = subprocess.Popen([*GATEWAY, "run", "-c", str(config)],
                                       stderr=open(log, "wb"), start_new_session=True)
            try:
                # Serving (INFO), or the member's health change (the WARNING it must show)
                wait_until(lambda: ("health unknown -> down" if level == "warning" else
                                    "listening on") in log.read_text(), timeout=30,
                           what=f"{log_format} {level} log")
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
            finally:
                stop_process(process)
            lines = log.read_text().splitlines()
            if log_format == "json":
                entries = [json.loads(line) for line in lines]
                listening = next(e for e in entries if "listening on" in e["message"])
                assert listening["level"] == "INFO" and listening["logger"] == "medgate"
                assert listening["vip"] == "web" and listening["protocol"] == "tcp"
                assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d",
                                    listening["time"])
            elif level == "warning":
                assert any("health unknown -> down" in line for line in lines), lines
                assert not any(" INFO " in line for line in lines), lines
            else:
                assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d INFO    "
                                r"medgate: ", next(line for line in lines if "listening on" in line))


def test_the_image_builds_where_docker_or_podman_is_installed(tmp_path):
    """Only where an engine is installed (the CI machine has none: the test above runs the
    image's commands instead)."""
    import shutil

    engine = shutil.which("docker") or shutil.which("podman")
    if engine is None or subprocess.run([engine, "info"], capture_output=True,
                                        timeout=60).returncode != 0:
        import pytest

        pytest.skip("no docker or podman that can build here (not installed, or no daemon): "
                    "the image's commands are tested without it "
                    "(test_the_container_image_commands_run_...)")
    tag = f"medgate-test-{os.getpid()}"
    try:
        built = subprocess.run([engine, "build", "-t", tag, str(ROOT)], capture_output=True,
                               text=True, timeout=900)
        assert built.returncode == 0, built.stderr[-3000:]
        version = subprocess.run([engine, "run", "--rm", "--entrypoint", "gateway", tag,
                                  "--version"], capture_output=True, text=True, timeout=120)
        assert version.returncode == 0 and version.stdout.startswith("medgate ")
    finally:
        subprocess.run([engine, "rmi", "-f", tag], capture_output=True, timeout=120)
