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
from collections.abc import Iterator
from typing import TYPE_CHECKING, Callable

import pytest

if TYPE_CHECKING:
    from gateway.testing.harness import HL7Sender, Modality, RunningGateway
    from gateway.testing.simulators.audit_repository import AuditRepository
    from gateway.testing.simulators.hl7 import HL7Receiver
    from gateway.testing.simulators.pacs import PacsSimulator
    from gateway.testing.simulators.xds import XdsRegistry, XdsRepository, XdsResponder
    from gateway.testing.simulators.xds_consumer import XdsConsumer


@pytest.fixture
def pacs() -> Iterator[Callable[..., PacsSimulator]]:
    """Factory: `pacs(ae_title="PACS1", reject=False, abort_after=None, hang=False)` -> started."""
    from gateway.testing.simulators.pacs import PacsSimulator

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
    from gateway.testing.harness import Modality

    return Modality()


@pytest.fixture
def audit_repository() -> Iterator[Callable[..., AuditRepository]]:
    """Factory: `audit_repository(tls=ssl_context)` -> started ATNA audit record repository;
    `.received()` lists the syslog messages (priority, msgid, xml) in arrival order."""
    from gateway.testing.simulators.audit_repository import AuditRepository

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
def hl7_receiver() -> Iterator[Callable[..., HL7Receiver]]:
    """Factory: `hl7_receiver(name="RIS1", mode="AA"|"AE"|"AR"|"hang"|"close"|"slow",
    parse=True, validate=False)` -> started (parse: hl7apy reads each message and builds the
    ACK, ~10 ms; validate: strictly, AE + ERR for a bad structure).

    Runs in a thread of its own; `.mode` may be changed while it runs; `.control_ids` lists what
    it received; `tls=` an ssl.SSLContext (server side) serves MLLP over TLS. Stopped when the
    test ends.
    """
    from gateway.testing.simulators.hl7 import HL7Receiver

    yield from _servers(lambda name="RIS", **options: HL7Receiver(name=name, **options))


@pytest.fixture
def hl7_sender() -> HL7Sender:
    """An MLLP sender: `hl7_sender.send(host, port, count=N)` -> [SendResult] (one per message)."""
    from gateway.testing.harness import HL7Sender

    return HL7Sender()


@pytest.fixture
def xds_registry() -> Iterator[Callable[..., XdsRegistry]]:
    """Factory: `xds_registry(mode="ok"|"http500"|"fault"|"failure"|"hang"|"close")` -> started.

    `.url`, `.entries` (what ITI-42 registered), `.requests` (transactions received); `.mode`
    may change while it runs; `tls=` an ssl.SSLContext serves HTTPS. Stopped when the test ends.
    """
    from gateway.testing.simulators.xds import XdsRegistry

    yield from _servers(XdsRegistry)


@pytest.fixture
def xds_repository(tmp_path) -> Iterator[Callable[..., XdsRepository]]:
    """Factory: `xds_repository(registry_url=registry.url + "registry")` -> started.

    Documents are kept under the test's tmp_path; `.documents` maps uniqueId -> stored file.
    """
    from gateway.testing.simulators.xds import XdsRepository

    numbers = itertools.count(1)

    def make(**options) -> XdsRepository:
        options.setdefault("store_dir", tmp_path / f"repository{next(numbers)}")
        return XdsRepository(**options)

    yield from _servers(make)


@pytest.fixture
def xds_responder() -> Iterator[Callable[..., XdsResponder]]:
    """Factory: `xds_responder(name="IMG1")` -> started: answers any SOAP request Success;
    `.requests` (transactions received) and `.routed` (the repository and community ids each
    request named). For the roles the registry and repository simulators do not play."""
    from gateway.testing.simulators.xds import XdsResponder

    yield from _servers(XdsResponder)


@pytest.fixture
def xds_consumer() -> Callable[..., XdsConsumer]:
    """Factory: `xds_consumer("http://127.0.0.1:PORT")` -> an XDS.b Document Consumer built with
    zeep: `.find_documents(patient_id)` (ITI-18 to /registry), `.retrieve(repository_unique_id,
    document_unique_id)` (ITI-43 to /repository). Blocking: from trio, use trio.to_thread."""
    from gateway.testing.simulators.xds_consumer import XdsConsumer

    return lambda base_url, timeout=30.0: XdsConsumer(f"{base_url.rstrip('/')}/registry",
                                                      f"{base_url.rstrip('/')}/repository",
                                                      timeout)


@pytest.fixture
def gateway() -> Iterator[Callable[..., RunningGateway]]:
    """Factory: `gateway(config)` with a dict (the TOML document's shape) or TOML text.

    The admin server is off unless the config sets `[gateway] admin` (use "127.0.0.1:0"), and
    the audit log is off unless it sets `audit`. Stopped when the test ends.
    """
    from gateway.config import config_from_dict, parse_config
    from gateway.testing.harness import RunningGateway

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
