"""The `gateway` command as a user runs it: exit codes, error lines, SIGTERM drain."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.helpers import logged_port, refused_port, stop_process, wait_until

GATEWAY = [sys.executable, "-m", "gateway"]


def run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([*GATEWAY, *args], capture_output=True, text=True, timeout=timeout)


def test_version_and_help():
    assert re.fullmatch(r"medgate \d+\.\d+\.\d+\S*\n", run("--version").stdout)
    help_text = run("--help").stdout
    assert "run" in help_text and "Exit status" in help_text


@pytest.mark.parametrize("content, expected", [
    ('[[vip]]\nname = "x"\nprotocol = "tcp"\nlisten = "127.0.0.1:0"\n[[vip.member]]\n'
     'name = "m"\naddress = "10.0.0.1"\n', r"bad\.toml:7: vip 'x' member 'm': address: "
                                            r"'10\.0\.0\.1': missing port"),
    ("[[vip]\n", r"bad\.toml:1: not valid TOML"),
])
def test_config_error_is_one_line_and_exit_3(tmp_path, content, expected):
    path = tmp_path / "bad.toml"
    path.write_text(content)
    result = run("run", "-c", str(path))
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(expected, lines[0]), result.stderr
    assert "Traceback" not in result.stderr


def test_usage_error_exits_3():
    result = run("run")
    assert result.returncode == 3 and "-c/--config" in result.stderr


def test_check_config_summarises(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text('[[vip]]\nname = "viewer"\nprotocol = "tcp"\nlisten = "127.0.0.1:0"\n'
                    '[[vip.member]]\nname = "v1"\naddress = "10.0.0.1:443"\n')
    result = run("run", "-c", str(path), "--check-config")
    assert result.returncode == 0
    assert "vip viewer: tcp on 127.0.0.1:0, balance, 1 member(s), check tcp" in result.stdout
    (tmp_path / "beat.hl7").write_text("not HL7 at all\n")
    path.write_text('[[vip]]\nname = "ris"\nprotocol = "hl7"\nlisten = "127.0.0.1:0"\n'
                    'health = { check = "hl7-ack", message = "beat.hl7" }\n'
                    '[[vip.member]]\nname = "r1"\naddress = "10.0.0.1:2575"\n')
    result = run("run", "-c", str(path), "--check-config")
    assert result.returncode == 0  # a warning, not an error
    assert (f"warning: {path}:5: vip 'ris': health: message: '{tmp_path / 'beat.hl7'}': hl7apy "
            "rejects its structure (ParserError: Invalid message); sent as it is") in result.stdout


def test_port_in_use_is_a_startup_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "busy.toml"
        path.write_text(f'[gateway]\nadmin = ""\n[[vip]]\nname = "viewer"\nprotocol = "tcp"\nlisten = "127.0.0.1:{port}"\n'
                        '[[vip.member]]\nname = "v1"\naddress = "127.0.0.1:9"\n')
        result = run("run", "-c", str(path))
    assert result.returncode == 1
    assert f"vip 'viewer': cannot listen on 127.0.0.1:{port}: address already in use" in (
        result.stderr.lower())


def echo_server() -> tuple[socket.socket, threading.Thread]:
    """A blocking echo server on 127.0.0.1 (a plain-socket peer, not written with our code)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


def test_sigterm_lets_an_open_connection_finish_then_exits_0(tmp_path):
    server, _ = echo_server()
    path = tmp_path / "drain.toml"
    path.write_text(f"""
[gateway]
drain_timeout = "20s"
admin = "127.0.0.1:0"
[[vip]]
name = "echo"
protocol = "tcp"
listen = "127.0.0.1:0"
health = {{ check = "tcp", interval = "200ms" }}
[[vip.member]]
name = "e1"
address = "127.0.0.1:{server.getsockname()[1]}"
""")
    log = open(tmp_path / "gateway.log", "w+")
    process = subprocess.Popen([*GATEWAY, "run", "-c", str(path)], stdout=log, stderr=log,
                               start_new_session=True)
    try:
        port = logged_port((tmp_path / "gateway.log").read_text, "echo")
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        client.sendall(b"before")
        assert client.recv(100) == b"before"
        process.send_signal(signal.SIGTERM)
        wait_until(lambda: "stopped accepting" in (tmp_path / "gateway.log").read_text(),
                   what="drain start")
        with pytest.raises(ConnectionRefusedError):  # no new clients while draining
            socket.create_connection(("127.0.0.1", port), timeout=5)
        time.sleep(0.3)
        client.sendall(b"after")  # the live connection still works
        assert client.recv(100) == b"after"
        assert process.poll() is None
        client.close()
        assert process.wait(10) == 0
    finally:
        stop_process(process)
        server.close()
    text = (tmp_path / "gateway.log").read_text()
    assert "1 live connection(s)" in text and "gateway stopped" in text
    assert re.search(r"vip=echo last [\d.]+s: 1 connections \(e1 1\), 0 retried", text), text
    assert "bytes_in=11 bytes_out=11" in text


def test_check_watch_redraws_until_interrupted():
    dead = refused_port()
    process = subprocess.Popen([*GATEWAY, "check", f"tcp://127.0.0.1:{dead}", "--watch",
                                "--interval", "200ms"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(2)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=10)
    assert process.returncode == 130, err  # stopped by Ctrl-C
    assert "medgate check at" in out and "connection refused" in out
    assert "Traceback" not in err


def tcp_site(gateway: str) -> str:
    """A config of one TCP VIP with these [gateway] lines."""
    return (f'[gateway]\nadmin = ""\n{gateway}[[vip]]\nname = "web"\nprotocol = "tcp"\n'
            'listen = "127.0.0.1:0"\n[[vip.member]]\nname = "a"\naddress = "127.0.0.1:9"\n')


def test_unwritable_audit_log_is_a_startup_error_not_a_traceback(tmp_path):
    path = tmp_path / "audit.toml"
    path.write_text(tcp_site(f'audit = "{tmp_path}/no/such/folder/audit.jsonl"\n'))
    checked = run("run", "-c", str(path), "--check-config")
    assert checked.returncode == 3 and checked.stderr == (
        f"gateway: config error: {path}: [gateway] audit: {tmp_path}/no/such/folder/audit.jsonl: "
        f"its directory {tmp_path}/no/such/folder does not exist\n")
    result = run("run", "-c", str(path))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "[gateway] audit: cannot write" in result.stderr


SITE = ('[gateway]\nadmin = ""\naudit = ""\n[[vip]]\nname = "web"\nprotocol = "tcp"\n'
        'listen = "127.0.0.1:0"\n[[vip.member]]\nname = "a"\naddress = "127.0.0.1:{port}"\n')


@pytest.mark.parametrize("command, ready, after", [
    (["run", "-c", "{site}"], "listening on 127.0.0.1:", "gateway stopped"),
    (["agent", "-c", "{site}", "--listen", "127.0.0.1:0"], "agent listening", "stopping"),
    # (rich draws a live view into a file only when it ends)
    (["check", "--watch", "--interval", "200ms", "tcp://127.0.0.1:{port}"], "",
     "medgate check at"),
    (["demo", "--duration", "60s"], "status page:", "stopped early"),
    (["demo", "--duration", "1s", "--keep-running", "--no-faults"], "still running",
     "nothing lost"),
    (["simulate", "pacs", "--listen", "127.0.0.1:0"], "READY", ""),
    (["simulate", "hl7-receiver", "--listen", "127.0.0.1:0"], "READY", "received 0"),
    (["simulate", "xds-registry", "--listen", "127.0.0.1:0"], "READY", ""),
    (["simulate", "hl7-sender", "127.0.0.1:{hanging}", "--timeout", "60"], "", "interrupted"),
], ids=lambda value: value[0] + ("-" + value[1] if value[0] in ("simulate", "demo") and
                                  len(value) > 1 and not value[1].startswith("-") else "")
    if isinstance(value, list) else None)
def test_ctrl_c_ends_each_long_running_command_without_a_traceback(tmp_path, hl7_receiver,
                                                                     command, ready, after):
    hanging = hl7_receiver("RIS1", mode="hang")
    site = tmp_path / "site.toml"
    dead = refused_port()
    site.write_text(SITE.format(port=dead))
    args = [part.format(site=site, port=dead, hanging=hanging.port) for part in command]
    out_path, err_path = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out_path, "w") as out, open(err_path, "w") as err:
        process = subprocess.Popen([*GATEWAY, *args], stdout=out, stderr=err,
                                   env={**os.environ, "COLUMNS": "100"},
                                   start_new_session=True)
    try:
        text = lambda: out_path.read_text() + err_path.read_text()  # noqa: E731
        if ready:
            wait_until(lambda: ready in text(), timeout=60, what=ready)
        if command[0] == "demo" and "--keep-running" not in command:
            time.sleep(4)  # in the middle of the traffic (drawn into the file only at its end)
        elif not ready:
            time.sleep(3)  # the sender waits for its first ACK; check --watch has checked
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 130, text()
    finally:
        stop_process(process)
    assert "Traceback" not in text(), text()
    assert after in text()
    if command[0] == "demo":
        assert "summary" in text() and "lost" in text()


def test_agent_whose_port_is_taken_says_so_in_one_line(tmp_path):
    site = tmp_path / "site.toml"
    site.write_text(SITE.format(port=refused_port()))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run("agent", "-c", str(site), "--listen", f"127.0.0.1:{taken.getsockname()[1]}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot listen on 127.0.0.1:" in result.stderr
    assert len([line for line in result.stderr.splitlines() if "ERROR" in line]) == 1


def test_a_ctrl_c_inside_a_nursery_comes_out_as_keyboard_interrupt_itself():
    import trio

    from gateway import exits

    async def main():
        async def task():
            raise KeyboardInterrupt
        async with trio.open_nursery() as nursery:
            nursery.start_soon(task)

    with pytest.raises(KeyboardInterrupt):
        exits.run(main)

    async def broken():
        async def task():
            raise ValueError("a bug")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(task)

    with pytest.raises(BaseExceptionGroup):  # anything else is left as it is
        exits.run(broken)


def test_check_config_says_what_run_would_refuse_on_this_host(tmp_path):
    """A port below 1024 without the capability (it said OK and run failed), a state_dir or
    ATNA spool that cannot be made, a hash key file whose folder is missing."""
    from gateway.config import parse_config
    from gateway.service.startup import host_problems, lowest_bindable_port

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = parse_config(
        f'[gateway]\nadmin = "127.0.0.1:80"\naudit = ""\nstate_dir = "{blocker}/state"\n'
        f'atna = {{ repository = "127.0.0.1:6514", spool = "{blocker}" }}\n'
        '[[vip]]\nname = "pacs"\nprotocol = "dicom"\nlisten = "0.0.0.0:104"\n'
        '[[vip.member]]\nname = "p"\naddress = "127.0.0.1:11112"\n')
    assert host_problems(config, lowest_port=1024) == [
        "vip 'pacs': listen 0.0.0.0:104: ports below 1024 need root or CAP_NET_BIND_SERVICE, "
        "which this process has not",
        "[gateway] admin 127.0.0.1:80: ports below 1024 need root or CAP_NET_BIND_SERVICE, "
        "which this process has not",
        f"[gateway] state_dir: {blocker}/state cannot be made: {blocker} is not a writable "
        "folder",
        f"[gateway] atna spool: {blocker} is not a folder"]
    assert host_problems(config, lowest_port=0)[0].startswith("[gateway] state_dir")
    # /proc's words: the capability bit, else the sysctl
    assert lowest_bindable_port("CapEff:\t0000000000000400\n", "1024") == 0
    assert lowest_bindable_port("CapEff:\t0000000000000000\n", "1024\n") == 1024
    assert lowest_bindable_port("CapEff:\t0000000000000000\n", "80") == 80
    path = tmp_path / "low.toml"
    path.write_text(tcp_site(f'audit = ""\nstate_dir = "{blocker}/state"\n'))
    checked = run("run", "-c", str(path), "--check-config")
    assert checked.returncode == 3 and checked.stderr == (
        f"gateway: config error: {path}: [gateway] state_dir: {blocker}/state cannot be made: "
        f"{blocker} is not a writable folder\n")
