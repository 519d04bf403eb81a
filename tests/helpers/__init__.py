"""What the tests share. Here: small real-socket peers (back ends that say who they are) and
gateway runners; beside it `dicom_peers` (DCMTK and Orthanc), `hl7_peers` and `hl7_senders`
(python-hl7, hl7apy), `faulty_members` (members that misbehave on purpose)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from gateway.config import parse_config
from gateway.service.server import Gateway


@dataclass
class Backend:
    """A TCP back end on 127.0.0.1: greets each connection with its name, then echoes.

    `stop()` closes the listener and every live connection (as a crashed server would);
    `start()` listens again on the same port.
    """

    name: str
    greet: bool = True
    port: int = 0
    accepted: int = 0
    _scope: trio.CancelScope | None = None
    _nursery: trio.Nursery | None = field(default=None, repr=False)

    async def start(self, nursery: trio.Nursery | None = None) -> Backend:
        self._nursery = nursery or self._nursery
        assert self._nursery is not None
        await self._nursery.start(self._serve)
        return self

    async def _serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            self._scope = scope
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            self.port = listeners[0].socket.getsockname()[1]
            async with trio.open_nursery() as handlers:
                handlers.start_soon(trio.serve_listeners, self._handle, listeners)
                task_status.started()

    async def _handle(self, stream: trio.SocketStream) -> None:
        self.accepted += 1
        try:
            if self.greet:
                await stream.send_all(f"{self.name}\n".encode())
            while data := await stream.receive_some(65536):
                await stream.send_all(data)
        except trio.BrokenResourceError:
            pass

    def stop(self) -> None:
        if self._scope is not None:
            self._scope.cancel()
            self._scope = None


async def start_backends(nursery: trio.Nursery, *names: str, greet: bool = True) -> list[Backend]:
    return [await Backend(name, greet=greet).start(nursery) for name in names]


async def start_gateway(nursery: trio.Nursery, toml: str, *, admin: bool = False) -> Gateway:
    """Run a gateway for this TOML text in the nursery; returns it once it is serving.

    Without `admin`, no admin server (the default admin port would collide across tests)."""
    gateway = Gateway(parse_config(toml, source="test.toml"), serve_admin=admin)
    await nursery.start(gateway.run)
    return gateway


def vip_port(gateway: Gateway, vip: str = "web") -> int:
    return gateway.bound[vip][0].port


async def ask_who(port: int, source: str = "127.0.0.1") -> str:
    """Connect to the VIP (from `source`), read the back end's greeting, close."""
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    with trio.fail_after(5):
        data = b""
        while not data.endswith(b"\n"):
            chunk = await stream.receive_some(100)
            if not chunk:
                break
            data += chunk
    await stream.aclose()
    return data.decode().strip()


def tcp_vip(members: list[Backend], *, extra: str = "", health: str = "",
            member_extra: dict[str, str] | None = None) -> str:
    """TOML for one tcp VIP named 'web' on an ephemeral port in front of these back ends."""
    health = health or 'health = { check = "tcp", interval = "100ms", timeout = "1s", rise = 2, fall = 2 }'
    text = f"""
[[vip]]
name = "web"
protocol = "tcp"
listen = "127.0.0.1:0"
connect_timeout = "1s"
{health}
{extra}
"""
    for member in members:
        text += f"""
[[vip.member]]
name = "{member.name}"
address = "127.0.0.1:{member.port}"
{(member_extra or {}).get(member.name, "")}
"""
    return text


# -- subprocess helpers (for the `gateway` command itself)

_HELD: list[socket.socket] = []  # bound for the whole run, so no other test can take them


def reserved_port() -> int:
    """A port for a peer that must be given one on its command line or in its config (DCMTK,
    Orthanc, HAProxy, keepalived's peers): held for the rest of the run by a socket bound to
    it with SO_REUSEADDR and never listening. The kernel gives a held port to no other bind
    to port 0 and no outgoing connection, so no other test can take it (a port found free
    and let go could be); the peer, binding with SO_REUSEADDR as every server here does, can
    listen on it. A `gateway` process needs none: it binds port 0 and logs what it bound
    (`logged_port`).

    Held on every address (0.0.0.0), not only 127.0.0.1: a port the machine uses on another
    address (an outgoing connection from its network address) can be bound on 127.0.0.1,
    and then a peer that listens on every address (Orthanc, storescp) finds it "already in
    use"; a bind to the wildcard address is refused such a port, so it is never given."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", 0))
    _HELD.append(sock)
    return sock.getsockname()[1]


def reserved_ports(count: int) -> list[int]:
    """`count` consecutive ports, each held as reserved_port holds one (for `gateway agent`,
    which listens on its port and the ones after it, one per member)."""
    while True:
        first = reserved_port()
        held = []
        try:
            for port in range(first + 1, first + count):
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                held.append(sock)
                sock.bind(("0.0.0.0", port))
        except OSError:
            for sock in held:
                sock.close()
            continue
        _HELD.extend(held)
        return list(range(first, first + count))


def refused_port() -> int:
    """A port on 127.0.0.1 where every connection is refused, for the rest of the test run:
    bound (without SO_REUSEADDR: nothing else can bind it) and never listening (a member or
    admin address that is down)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _HELD.append(sock)
    return sock.getsockname()[1]


def wait_until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} not reached after {timeout}s")


def logged_port(log: Callable[[], str], vip: str | None = None, timeout: float = 30) -> int:
    """The port a `gateway run` process bound, read from its log (`log()` its text so far):
    VIP `vip`'s first listening address, or with no `vip` the admin server's (a config may
    say port 0 for either), once the line is there."""
    pattern = re.compile(rf"vip={re.escape(vip)} protocol=\S+ listening on \S*?:(\d+)" if vip
                         else r"admin: status page https?://\S*?:(\d+)/")
    wait_until(lambda: pattern.search(log()) is not None, timeout=timeout,
               what=f"the log line with {vip or 'the admin server'}'s port")
    match = pattern.search(log())
    assert match is not None
    return int(match.group(1))


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts connections on `host`:`port` now."""
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def wait_started(process: subprocess.Popen, ready: Callable[[], bool], what: str,
                 timeout: float = 30, log: Path | None = None) -> subprocess.Popen:
    """`process` once `ready()` (it listens, answers); AssertionError if it exits first,
    with the end of its `log` if it has one (why it exited)."""
    wait_until(lambda: process.poll() is not None or ready(), timeout=timeout, what=what)
    if process.poll() is not None:
        said = log.read_text(errors="replace")[-1500:] if log and log.exists() else ""
        raise AssertionError(f"{what}: exited with status {process.returncode}"
                             + (f"; its log ends:\n{said}" if said else ""))
    return process


def stop_process(process: subprocess.Popen, timeout: float = 10) -> None:
    """Stop a process started with start_new_session=True, with everything it forked."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


async def eventually(predicate: Callable[[], bool], timeout: float = 10,
                     what: str = "condition") -> None:
    """Wait (in trio) until `predicate()` holds, looking every 20 ms; TimeoutError after
    `timeout` s, naming `what`."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.02)
        return
    raise TimeoutError(f"{what} not reached after {timeout}s")


async def wait_for_health(pool, name: str, health, timeout: float = 10) -> None:
    """Wait (in trio) until a pool member's health is `health`."""
    await eventually(lambda: pool.member(name).health is health, timeout,
                     f"{pool.name}/{name} {health}")


class GatewayProcess:
    """`gateway run` as a process (optionally with a lower open-files limit, or medgate
    imported from a copy of its packages in folder `code`), its log in a file."""

    def __init__(self, folder, toml: str, *, open_files: int | None = None,
                 code: Path | None = None) -> None:
        self.config = folder / "gateway.toml"
        self.config.write_text(toml)
        self.log = folder / "gateway.log"
        self.open_files = open_files
        self.code = code
        self.process: subprocess.Popen | None = None

    def start(self) -> GatewayProcess:
        import resource
        import sys

        def limit() -> None:
            if self.open_files:
                resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files, self.open_files))

        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "wb"), start_new_session=True,
            preexec_fn=limit, **({} if self.code is None else {
                "cwd": self.code, "env": {**os.environ, "PYTHONPATH": str(self.code)}}))
        wait_until(lambda: "listening on" in self.text() or self.process.poll() is not None,
                   what="gateway listening")
        assert self.process.poll() is None, self.text()
        return self

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def port(self, vip: str | None = None) -> int:
        """The port VIP `vip` (None: the admin server) listens on, as bound."""
        return logged_port(self.text, vip)

    def cpu_seconds(self) -> float:
        fields = open(f"/proc/{self.process.pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None
