"""Independent DICOM peers for the tests: DCMTK's command-line tools, Orthanc, PACS processes.

DCMTK is called by its Debian path: pynetdicom installs console scripts with the same names
(echoscu, storescu, ...) that may come first on PATH.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from gateway.testing.simulators.modality import make_instances
from tests.helpers import listening, reserved_port, stop_process, wait_started

DCMTK_BIN = Path("/usr/bin")
# Debian's DCMTK keeps Nagle on unless told; without it each C-STORE waits ~40 ms.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def dcmtk(tool: str) -> str:
    path = DCMTK_BIN / tool
    if not path.exists():
        pytest.fail(f"DCMTK's {tool} is not installed at {path}: apt-get install dcmtk "
                    "(.ci/run does this)")
    return str(path)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def clean(self) -> bool:
        """rc 0 and no E:/F: line (echoscu exits 0 even when aborted after the AC)."""
        return self.returncode == 0 and not any(
            line.startswith(("E:", "F:")) for line in self.stderr.splitlines())


async def run_dcmtk(tool: str, *args: str, timeout: float = 60) -> Run:
    with trio.fail_after(timeout):
        result = await trio.run_process([dcmtk(tool), *args], capture_stdout=True,
                                        capture_stderr=True, check=False, env=DCMTK_ENV)
    return Run(result.returncode, result.stdout.decode(), result.stderr.decode())


async def echoscu(port: int, called: str = "VIP", calling: str = "ECHOSCU", *extra: str) -> Run:
    return await run_dcmtk("echoscu", "-ta", "20", "-aet", calling, "-aec", called, *extra,
                           "127.0.0.1", str(port))


async def storescu(port: int, files: list[str], called: str = "VIP", calling: str = "STORESCU",
                   *extra: str) -> Run:
    return await run_dcmtk("storescu", "-ta", "20", "-aet", calling, "-aec", called, *extra,
                           "127.0.0.1", str(port), *files, timeout=120)


async def next_pdu(stream: trio.abc.ReceiveStream, reader) -> bytes | None:
    """The next whole PDU from `stream` (a protocols.dicom.PduReader), None at its end."""
    while (pdu := reader.next_pdu()) is None:
        data = await stream.receive_some(65536)
        if not data:
            return None
        reader.feed(data)
    return pdu


async def association_answer(port: int, called: str, calling: str,
                             abstract_syntax: str) -> bytes:
    """The answer to an A-ASSOCIATE-RQ proposing `abstract_syntax`, read raw: a requestor
    library may take an RJ that comes before it is ready for one as an abort (pynetdicom did,
    under load), where the question is what the gateway sent."""
    from protocols import dicom

    stream = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(10):
        await stream.send_all(dicom.encode_associate_rq(called, calling, [
            (1, abstract_syntax, [dicom.IMPLICIT_VR_LITTLE_ENDIAN])]))
        pdu = await next_pdu(stream, dicom.PduReader())
    await stream.aclose()
    assert pdu is not None, "closed without an answer"
    return pdu


def write_instances(folder: Path, count: int, pixel_bytes: int = 64) -> dict[str, str]:
    """`count` Part 10 files in `folder`: {path: SOP Instance UID}."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for dataset in make_instances(count, pixel_bytes=pixel_bytes):
        path = folder / f"{dataset.SOPInstanceUID}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        files[str(path)] = str(dataset.SOPInstanceUID)
    return files


class PacsProcess:
    """`gateway simulate pacs` as its own process, so a test can SIGKILL or SIGSTOP it."""

    def __init__(self, folder: Path, ae_title: str = "PACS") -> None:
        self.folder = folder
        self.store_dir = folder / "stored"
        self.ae_title = ae_title
        self.process: subprocess.Popen | None = None
        self.port = 0

    def start(self, port: int = 0) -> PacsProcess:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "pacs.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "simulate", "pacs", "--listen",
             f"127.0.0.1:{port}", "--ae-title", self.ae_title, "--store-dir", str(self.store_dir)],
            stdout=subprocess.PIPE, stderr=log, start_new_session=True)
        line = self.process.stdout.readline().decode()
        if not line.startswith("READY"):
            raise RuntimeError(f"PACS simulator did not start: {line!r}, see {log.name}")
        self.port = int(line.rsplit(":", 1)[1])
        return self

    def stored(self) -> set[str]:
        if not self.store_dir.exists():
            return set()
        return {p.name.removesuffix(".dcm") for p in self.store_dir.glob("*.dcm")}

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None


ORTHANC_CONFIG = {
    "Name": "medgate-test-pacs", "Plugins": [], "HttpServerEnabled": True,
    "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomServerEnabled": True,
    "DicomAet": "ORTHANC", "DicomCheckCalledAet": True, "DicomAlwaysAllowEcho": True,
    "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True, "DicomModalities": {}, "SaveJobs": False, "StableAge": 1,
}


class Orthanc:
    """A private Orthanc (Debian package) in the foreground, with its own store and ports."""

    def __init__(self, folder: Path, **settings) -> None:
        """`settings` change ORTHANC_CONFIG's (DicomAet, DicomModalities, ...)."""
        self.folder = folder
        self.settings = settings
        self.dicom_port = reserved_port()
        self.http_port = reserved_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> Orthanc:
        binary = Path("/usr/sbin/Orthanc")
        if not binary.exists():
            pytest.fail("Orthanc is not installed: apt-get install orthanc (.ci/run does this)")
        self.folder.mkdir(parents=True, exist_ok=True)
        config = dict(ORTHANC_CONFIG, StorageDirectory=str(self.folder / "db"),
                      IndexDirectory=str(self.folder / "db"), HttpPort=self.http_port,
                      DicomPort=self.dicom_port, **self.settings)
        (self.folder / "orthanc.json").write_text(json.dumps(config))
        log = self.folder / "orthanc.log"
        self.process = wait_started(subprocess.Popen(
            [str(binary), str(self.folder / "orthanc.json")], env=DCMTK_ENV,
            stdout=subprocess.DEVNULL, stderr=open(log, "wb"), start_new_session=True),
            self._ready, "Orthanc REST API", log=log)
        return self

    def _ready(self) -> bool:
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def get(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=5) as r:
            return json.load(r)

    def instance_count(self) -> int:
        return self.get("/statistics")["CountInstances"]

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()  # its store is a throw-away folder; SIGTERM takes ~3 s
            self.process.wait()
            self.process = None


class Storescp:
    """DCMTK's storescp as an archive: its own process (a test can SIGSTOP it), one file per
    instance it stored in `folder`."""

    def __init__(self, folder: Path, ae_title: str, *options: str) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.options = options  # more of storescp's own (--sleep-during 3: a slow archive)
        self.port = reserved_port()
        self.process: subprocess.Popen | None = None

    def start(self) -> Storescp:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = wait_started(subprocess.Popen(
            [dcmtk("storescp"), "-aet", self.ae_title, "-od", str(self.folder), *self.options,
             str(self.port)],
            env=DCMTK_ENV, stdout=subprocess.DEVNULL,
            stderr=open(self.folder.with_suffix(".log"), "wb"), start_new_session=True),
            lambda: listening(self.port), "storescp listening",
            log=self.folder.with_suffix(".log"))
        return self

    def stored(self) -> int:
        return sum(1 for path in self.folder.iterdir() if path.is_file())

    def stop(self) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGCONT)  # in case a test left it stopped
            stop_process(self.process)
            self.process = None
