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

from gateway.simulators.modality import StoreResult, make_instances, send
from gateway.simulators.pacs import PacsSimulator


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
