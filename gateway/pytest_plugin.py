"""pytest fixtures for testing a medgate deployment with simulated peers (entry point `pytest11`).

Installing medgate makes them available in any pytest run:

    def test_store(pacs, modality):
        archive = pacs(ae_title="PACS1")
        results = modality.send("127.0.0.1", archive.port, count=5, called_ae="PACS1")
        assert all(r.stored for r in results) and archive.stored_count() == 5

Every simulator a fixture starts is stopped when the test ends.
"""

from __future__ import annotations

from typing import Callable

import pytest

from gateway.simulators.hl7 import HL7Receiver, SendResult, make_messages, send_messages
from gateway.simulators.modality import StoreResult, make_instances, send
from gateway.simulators.pacs import PacsSimulator
from gateway.simulators.xds import XdsRegistry, XdsRepository


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

    def start(ae_title: str = "PACS", *, hang: bool = False, **options) -> PacsSimulator:
        simulator = PacsSimulator(ae_title=ae_title, **options).start()
        if hang:
            simulator.set_hang(True)
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
def hl7_receiver() -> Callable[..., HL7Receiver]:
    """Factory: `hl7_receiver(name="RIS1", mode="AA"|"AE"|"AR"|"hang"|"close"|"slow")` -> started.

    Runs in a thread of its own; `.mode` may be changed while it runs; `.control_ids` lists what
    it received. Stopped when the test ends.
    """
    started: list[HL7Receiver] = []

    def start(name: str = "RIS", **options) -> HL7Receiver:
        receiver = HL7Receiver(name=name, **options).start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


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
    may change while it runs. Stopped when the test ends.
    """
    started: list[XdsRegistry] = []

    def start(**options) -> XdsRegistry:
        registry = XdsRegistry(**options).start()
        started.append(registry)
        return registry

    yield start
    for registry in started:
        registry.stop()


@pytest.fixture
def xds_repository(tmp_path) -> Callable[..., XdsRepository]:
    """Factory: `xds_repository(registry_url=registry.url + "registry")` -> started.

    Documents are kept under the test's tmp_path; `.documents` maps uniqueId -> stored file.
    """
    started: list[XdsRepository] = []

    def start(**options) -> XdsRepository:
        options.setdefault("store_dir", tmp_path / f"repository{len(started) + 1}")
        repository = XdsRepository(**options).start()
        started.append(repository)
        return repository

    yield start
    for repository in started:
        repository.stop()
