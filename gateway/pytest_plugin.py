"""pytest fixtures for testing a medgate deployment with simulated peers (entry point `pytest11`).

Installing medgate makes them available in any pytest run (a complete example a site can copy:
examples/test_my_site.py):

    def test_store(pacs, modality, gateway):
        archive = pacs("PACS1")
        vip = gateway({"vip": [{"name": "archive", "protocol": "dicom", "listen": "127.0.0.1:0",
                                "member": [{"name": "pacs1", "ae_title": "PACS1",
                                            "address": f"127.0.0.1:{archive.port}"}]}]})
        results = modality.send("127.0.0.1", vip.port("archive"), count=5, called_ae="ARCHIVE")
        assert all(r.stored for r in results) and archive.stored_count() == 5

Simulators stop with stop() (a crash, seen from the network), come back with restart() on the
same port, and hang with set_hang(True) (PACS) or mode = "hang" (HL7, XDS). Every simulator and
gateway a fixture starts is stopped when the test ends.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Callable

import pytest
import trio

from gateway.config import Config, config_from_dict, parse_config
from gateway.server import Gateway

from gateway.simulators.audit_repository import AuditRepository
from gateway.simulators.hl7 import HL7Receiver, SendResult, send_messages
from gateway.simulators.hl7_messages import make_messages
from gateway.simulators.modality import StoreResult, make_instances, send
from gateway.simulators.pacs import PacsSimulator
from gateway.simulators.xds import XdsRegistry, XdsRepository
from gateway.simulators.xds_consumer import XdsConsumer


class Modality:
    """Sends C-STOREs; `send` blocks, `asend` runs it in a worker thread for trio tests."""

    def send(self, host: str, port: int, *, count: int = 1, datasets=None,
             called_ae: str = "ANY-SCP", calling_ae: str = "MODALITY",
             timeout: float = 30) -> list[StoreResult]:
        datasets = datasets if datasets is not None else make_instances(count)
        return send(host, port, datasets, called_ae=called_ae, calling_ae=calling_ae,
                    timeout=timeout)

    async def asend(self, host: str, port: int, **options) -> list[StoreResult]:
        import trio

        return await trio.to_thread.run_sync(lambda: self.send(host, port, **options))


@pytest.fixture
def pacs() -> Callable[..., PacsSimulator]:
    """Factory: `pacs(ae_title="PACS1", reject=False, abort_after=None, hang=False)` -> started."""
    started: list[PacsSimulator] = []

    def start(ae_title: str = "PACS", **options) -> PacsSimulator:
        simulator = PacsSimulator(ae_title=ae_title, **options).start()
        started.append(simulator)
        return simulator

    yield start
    for simulator in started:
        simulator.stop()


@pytest.fixture
def modality() -> Modality:
    """A C-STORE SCU: `modality.send(host, port, count=N, called_ae=...)` -> [StoreResult]."""
    return Modality()


@pytest.fixture
def audit_repository() -> Callable[..., AuditRepository]:
    """Factory: `audit_repository(tls=ssl_context)` -> started ATNA audit record repository;
    `.received()` lists the syslog messages (priority, msgid, xml) in arrival order."""
    yield from _servers(AuditRepository)


def _servers(make: Callable):
    """The body of a factory fixture of trio-based servers: `start(..., tls=None, **options)`
    makes one with `make`, serves it (over TLS with a server-side context), and every server
    started is stopped when the test ends."""
    started = []

    def start(*args, tls=None, **options):
        server = make(*args, **options)
        server.tls = tls
        started.append(server.start())
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def hl7_receiver() -> Callable[..., HL7Receiver]:
    """Factory: `hl7_receiver(name="RIS1", mode="AA"|"AE"|"AR"|"hang"|"close"|"slow",
    parse=True, validate=False)` -> started (parse: hl7apy reads each message and builds the
    ACK, ~10 ms; validate: strictly, AE + ERR for a bad structure).

    Runs in a thread of its own; `.mode` may be changed while it runs; `.control_ids` lists what
    it received; `tls=` an ssl.SSLContext (server side) serves MLLP over TLS. Stopped when the
    test ends.
    """
    yield from _servers(lambda name="RIS", **options: HL7Receiver(name=name, **options))


class HL7Sender:
    """Sends generated messages on one MLLP connection; `asend` for trio tests."""

    make_messages = staticmethod(make_messages)

    def send(self, host: str, port: int, *, count: int = 1, messages=None, kind: str = "ADT",
             patients: int | None = None, timeout: float = 30) -> list[SendResult]:
        messages = messages if messages is not None else make_messages(count, kind, patients)
        return send_messages(host, port, messages, timeout=timeout)

    async def asend(self, host: str, port: int, **options) -> list[SendResult]:
        import trio

        return await trio.to_thread.run_sync(lambda: self.send(host, port, **options))


@pytest.fixture
def hl7_sender() -> HL7Sender:
    """An MLLP sender: `hl7_sender.send(host, port, count=N)` -> [SendResult] (one per message)."""
    return HL7Sender()


@pytest.fixture
def xds_registry() -> Callable[..., XdsRegistry]:
    """Factory: `xds_registry(mode="ok"|"http500"|"fault"|"failure"|"hang"|"close")` -> started.

    `.url`, `.entries` (what ITI-42 registered), `.requests` (transactions received); `.mode`
    may change while it runs; `tls=` an ssl.SSLContext serves HTTPS. Stopped when the test ends.
    """
    yield from _servers(XdsRegistry)


@pytest.fixture
def xds_repository(tmp_path) -> Callable[..., XdsRepository]:
    """Factory: `xds_repository(registry_url=registry.url + "registry")` -> started.

    Documents are kept under the test's tmp_path; `.documents` maps uniqueId -> stored file.
    """
    numbers = itertools.count(1)

    def make(**options) -> XdsRepository:
        options.setdefault("store_dir", tmp_path / f"repository{next(numbers)}")
        return XdsRepository(**options)

    yield from _servers(make)


@pytest.fixture
def xds_consumer() -> Callable[..., XdsConsumer]:
    """Factory: `xds_consumer("http://127.0.0.1:PORT")` -> an XDS.b Document Consumer built with
    zeep: `.find_documents(patient_id)` (ITI-18 to /registry), `.retrieve(repository_unique_id,
    document_unique_id)` (ITI-43 to /repository). Blocking: from trio, use trio.to_thread."""
    return lambda base_url, timeout=30.0: XdsConsumer(f"{base_url.rstrip('/')}/registry",
                                                      f"{base_url.rstrip('/')}/repository",
                                                      timeout)


class RunningGateway:
    """A gateway serving in a thread of its own, for tests of a site's configuration."""

    def __init__(self, config: Config) -> None:
        self.gateway = Gateway(config)
        self._token: trio.lowlevel.TrioToken | None = None
        self._error: BaseException | None = None
        ready = threading.Event()

        async def main():
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                await nursery.start(self.gateway.run)
                ready.set()

        def thread():
            try:
                trio.run(main)
            except BaseException as exc:  # reported by start(), not lost in the thread
                self._error = exc
                ready.set()

        self._thread = threading.Thread(target=thread, daemon=True, name="medgate-gateway")
        self._thread.start()
        ready.wait(60)
        if self._error is not None:
            raise RuntimeError(f"the gateway did not start: {self._error!r}") from self._error

    @property
    def balancer(self):
        return self.gateway.balancer

    def port(self, vip: str) -> int:
        """The port a VIP listens on (its first listen address; port 0 gets a free one)."""
        return self.gateway.bound[vip][0].port

    @property
    def admin_url(self) -> str:
        return f"http://{self.gateway.admin_address}" if self.gateway.admin_address else ""

    def state(self, vip: str, member: str) -> str:
        """up, down, drain, maint or unknown."""
        return self.gateway.balancer.pool(vip).member(member).state

    def wait_for(self, vip: str, member: str, state: str, timeout: float = 15.0) -> None:
        """Block until the member reaches `state` (its checks decide, on their interval)."""
        deadline = time.monotonic() + timeout
        while self.state(vip, member) != state:
            if time.monotonic() > deadline:
                raise AssertionError(f"{vip}/{member} is {self.state(vip, member)}, not {state}, "
                                     f"after {timeout}s")
            time.sleep(0.05)

    def fail_back(self, vip: str) -> str:
        """Failover mode: new clients go to the first member that takes them again (as
        `gateway ctl failback VIP`); returns its name. Calling AEs within their study window
        stay where they are."""
        pool = self.gateway.balancer.pool(vip)
        return trio.from_thread.run_sync(lambda: pool.fail_back(trio.current_time()),
                                         trio_token=self._token)

    def stop(self) -> None:
        if self._token is not None and self._thread.is_alive():
            self._token.run_sync_soon(self.gateway.stop)
            self._thread.join(60)


@pytest.fixture
def gateway() -> Callable[..., RunningGateway]:
    """Factory: `gateway(config)` with a dict (the TOML document's shape) or TOML text.

    The admin server is off unless the config sets `[gateway] admin` (use "127.0.0.1:0"), and
    the audit log is off unless it sets `audit`. Stopped when the test ends.
    """
    started: list[RunningGateway] = []

    def start(config: dict | str) -> RunningGateway:
        if isinstance(config, str):
            if "[gateway]" not in config:
                config = '[gateway]\nadmin = ""\naudit = ""\n' + config
            parsed = parse_config(config, source="test config")
        else:
            document = dict(config)
            document["gateway"] = {"admin": "", "audit": "", **document.get("gateway", {})}
            parsed = config_from_dict(document, source="test config")
        running = RunningGateway(parsed)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
