"""What the pytest plugin's fixtures hand a test: a modality, an HL7 sender and a gateway
serving in a thread of its own. Imported when a fixture is first used, not when pytest starts,
so a pytest run that uses none of them does not load pynetdicom or the gateway."""

from __future__ import annotations

import threading
import time

import trio

from gateway.config import Config
from gateway.service.server import Gateway
from gateway.testing.simulators.hl7 import SendResult, send_messages
from gateway.testing.simulators.hl7_messages import make_messages
from gateway.testing.simulators.modality import StoreResult, make_instances, send


class Modality:
    """Sends C-STOREs; `send` blocks, `asend` runs it in a worker thread for trio tests."""

    def send(self, host: str, port: int, *, count: int = 1, datasets=None,
             called_ae: str = "ANY-SCP", calling_ae: str = "MODALITY",
             timeout: float = 30) -> list[StoreResult]:
        datasets = datasets if datasets is not None else make_instances(count)
        return send(host, port, datasets, called_ae=called_ae, calling_ae=calling_ae,
                    timeout=timeout)

    async def asend(self, host: str, port: int, **options) -> list[StoreResult]:
        return await trio.to_thread.run_sync(lambda: self.send(host, port, **options))


class HL7Sender:
    """Sends generated messages on one MLLP connection; `asend` for trio tests."""

    make_messages = staticmethod(make_messages)

    def send(self, host: str, port: int, *, count: int = 1, messages=None, kind: str = "ADT",
             patients: int | None = None, timeout: float = 30) -> list[SendResult]:
        messages = messages if messages is not None else make_messages(count, kind, patients)
        return send_messages(host, port, messages, timeout=timeout)

    async def asend(self, host: str, port: int, **options) -> list[SendResult]:
        return await trio.to_thread.run_sync(lambda: self.send(host, port, **options))


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
