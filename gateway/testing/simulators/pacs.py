"""A simulated PACS: pynetdicom storage + verification SCP that records what it stored.

Failure modes, switchable while it runs: `reject` (every association gets A-ASSOCIATE-RJ
permanent, calling-AE-not-recognized), `abort_after` (A-ABORT after that many stores), `hang`
(accept TCP, never answer: what a frozen PACS looks like from the network).

pynetdicom runs its own threads; the simulator is for tests and demos, not for the gateway's
hot path, so that is acceptable here.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification

log = logging.getLogger("medgate.simulate.pacs")

# Accept every storage SOP class, not only those pynetdicom knows (private ones included).
_config.UNRESTRICTED_STORAGE_SERVICE = True
SOP_CLASS_NOT_SUPPORTED = 0x0122  # PS3.7 C.4.2.1.4: Refused, SOP Class not supported


@dataclass
class PacsSimulator:
    """A storage SCP on `host:port` (port 0 picks a free one; `.port` says which)."""

    ae_title: str = "PACS"
    host: str = "127.0.0.1"
    port: int = 0
    store_dir: Path | None = None  # write each instance as <SOPInstanceUID>.dcm when set
    reject: bool = False
    abort_after: int | None = None
    hang: bool = False
    store_status: int = 0  # answer every C-STORE with this status, storing nothing (0xA700: disk full)
    refuse_classes: frozenset[str] = frozenset()  # SOP classes answered 0x0122, not stored
    require_called_aet: bool = False  # reject a called AE title other than ae_title, as many PACS do
    stored: list[str] = field(default_factory=list)
    echoes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _release_hang: threading.Event = field(default_factory=threading.Event, repr=False)
    _server: Any = field(default=None, repr=False)  # pynetdicom's ThreadedAssociationServer

    def start(self) -> PacsSimulator:
        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        ae.maximum_associations = 64
        ae.require_called_aet = self.require_called_aet
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = 30
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_CONN_OPEN, self._on_connect), (evt.EVT_REQUESTED, self._on_request)]
        self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        self.port = self._server.server_address[1]
        self.set_hang(self.hang)
        log.info("PACS %s listening on %s:%d", self.ae_title, self.host, self.port)
        return self

    def stop(self) -> None:
        """Close the listener and every association (a crash, seen from the network)."""
        self._release_hang.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def restart(self) -> PacsSimulator:
        """Start again on the same port after stop(), keeping what it stored."""
        return self.start()

    def set_hang(self, hang: bool) -> None:
        self.hang = hang
        if hang:
            self._release_hang.clear()
        else:
            self._release_hang.set()

    def stored_count(self) -> int:
        with self._lock:
            return len(self.stored)

    # -- pynetdicom event handlers (run in pynetdicom's threads)

    def _on_connect(self, event) -> None:
        if self.hang:
            # Hold this association's thread before it reads the A-ASSOCIATE-RQ: the peer's TCP
            # connect succeeded and nothing ever answers, as with a frozen PACS.
            self._release_hang.wait()

    def _on_request(self, event) -> None:
        if self.reject:
            event.assoc.acceptor.ae_title = self.ae_title
            event.assoc.ae.require_calling_aet = ["NOBODY-ALLOWED"]
        else:
            event.assoc.ae.require_calling_aet = []

    def _on_echo(self, event) -> int:
        with self._lock:
            self.echoes += 1
        return 0x0000

    def _on_store(self, event) -> int:
        with self._lock:
            if self.abort_after is not None and len(self.stored) >= self.abort_after:
                event.assoc.abort()
                return 0xA700
            if self.store_status:
                return self.store_status
        if str(event.request.AffectedSOPClassUID) in self.refuse_classes:
            return SOP_CLASS_NOT_SUPPORTED
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        uid = str(dataset.SOPInstanceUID)
        if self.store_dir is not None:
            dataset.save_as(self.store_dir / f"{uid}.dcm", enforce_file_format=True)
        with self._lock:
            self.stored.append(uid)
        log.info("PACS %s stored %s from %s", self.ae_title, uid,
                 event.assoc.requestor.ae_title)
        return 0x0000
