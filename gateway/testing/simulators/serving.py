"""How the trio-based simulators run: as a task in a test's nursery, or in a thread of their own."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import trio

log = logging.getLogger("medgate.simulate")


async def wait_on(condition: threading.Condition, ready: Callable[[], bool], timeout: float,
                  what: str) -> None:
    """Until `ready()` holds, tested under `condition` each time it is notified: a server that
    runs in a thread of its own is waited for from any trio loop, without polling.
    TimeoutError naming `what` after `timeout` seconds."""
    def wait() -> bool:
        with condition:
            return condition.wait_for(ready, timeout)

    if not await trio.to_thread.run_sync(wait, abandon_on_cancel=True):
        raise TimeoutError(f"{what} not within {timeout:g}s")


class TrioServer:
    """A TCP server on `host:port` (port 0: any free one; `.port` then says which).

    Subclasses give `_handle(stream)` and `describe()`. `serve()` runs it in a nursery;
    `start()` in a thread of its own, for tests that are not trio tests and for `gateway
    simulate`. `stop()` closes the listener and every connection, as a crash looks from the
    network; `restart()` listens again on the same port, keeping what the server recorded.
    """

    host: str
    port: int
    tls = None  # an ssl.SSLContext (server side): serve over TLS
    _thread = None
    _token = None
    _scope = None

    def describe(self) -> str:
        return type(self).__name__

    async def _handle(self, stream: trio.abc.Stream) -> None:
        raise NotImplementedError

    async def _handle_tls(self, stream: trio.SocketStream) -> None:
        assert self.tls is not None  # serve() hands TLS connections here only
        tls = trio.SSLStream(stream, self.tls, server_side=True, https_compatible=True)
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            log.warning("%s: TLS handshake failed: %s", self.describe(), exc.__cause__ or exc)
            await trio.aclose_forcefully(stream)
            return
        await self._handle(tls)

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen and answer until cancelled; `started` once listening."""
        with trio.CancelScope() as scope:
            self._scope = scope
            listeners = await trio.open_tcp_listeners(self.port, host=self.host)
            self.port = listeners[0].socket.getsockname()[1]
            log.info("%s listening on %s:%d", self.describe(), self.host, self.port)
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._one_connection, listeners)
                task_status.started(self)

    async def _one_connection(self, stream: trio.SocketStream) -> None:
        """One client's connection: a bug it meets ends that connection, logged, and never
        the server (which every other test client of it would then find gone)."""
        try:
            await (self._handle(stream) if self.tls is None else self._handle_tls(stream))
        except Exception:
            log.exception("%s: a connection failed", self.describe())
            await trio.aclose_forcefully(stream)

    def start(self):
        ready = threading.Event()

        async def main():
            self._token = trio.lowlevel.current_trio_token()
            async with trio.open_nursery() as nursery:
                await nursery.start(self.serve)
                ready.set()

        self._thread = threading.Thread(target=trio.run, args=(main,), daemon=True,
                                        name=self.describe())
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"{self.describe()} did not start")
        return self

    def restart(self):
        return self.start()

    def stop(self) -> None:
        if self._thread is not None and self._token is not None and self._scope is not None:
            try:
                self._token.run_sync_soon(self._scope.cancel)  # thread-safe, never blocks
            except trio.RunFinishedError:
                pass
            self._thread.join(10)
            self._thread = None
        elif self._scope is not None:
            self._scope.cancel()
