"""One version from one place: pyproject.toml, `gateway --version`, medgate_build_info and the
Implementation Version Name of the gateway's own DICOM associations agree; the CHANGELOG has
it, and an Unreleased section for what comes next."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from functools import partial
import urllib.request
from pathlib import Path

import trio

from gateway import IMPLEMENTATION_VERSION, __version__
from gateway.config import Address, HealthConfig
from health.checks import Target, run_check
from protocols import dicom
from tests.helpers import start_backends, start_gateway

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_the_installed_version_is_pyprojects():
    assert __version__ == VERSION
    shown = subprocess.run([sys.executable, "-m", "gateway", "--version"], capture_output=True,
                           text=True, timeout=60)
    assert shown.stdout.strip() == f"medgate {VERSION}"


def test_the_changelog_has_this_version_and_an_unreleased_section():
    headings = re.findall(r"^## \[([^\]]+)\]", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert headings[:2] == ["Unreleased", VERSION] and "0.1.0" in headings


async def test_build_info_carries_the_version(nursery):
    (backend,) = await start_backends(nursery, "a")
    gateway = await start_gateway(nursery, '[gateway]\nadmin = "127.0.0.1:0"\naudit = ""\n'
                                  '[[vip]]\nname = "web"\nprotocol = "tcp"\n'
                                  'listen = "127.0.0.1:0"\n[[vip.member]]\nname = "a"\n'
                                  f'address = "127.0.0.1:{backend.port}"\n', admin=True)
    address = gateway.admin_address
    body = await trio.to_thread.run_sync(lambda: urllib.request.urlopen(
        f"http://127.0.0.1:{address.port}/metrics", timeout=10).read())
    assert b'medgate_build_info{python="' in body
    assert f'version="{VERSION}"}} 1.0'.encode() in body


async def test_the_health_check_names_this_version_in_its_association(nursery):
    """The dicom-echo check's A-ASSOCIATE-RQ, read by a peer that answers nothing."""
    received: list[bytes] = []
    done = trio.Event()

    async def peer(stream: trio.SocketStream) -> None:
        reader = dicom.PduReader()
        while (pdu := reader.next_pdu()) is None:
            data = await stream.receive_some(65536)
            if not data:
                return
            reader.feed(data)
        received.append(pdu)
        done.set()
        await stream.aclose()

    listeners = await nursery.start(partial(trio.serve_tcp, peer, 0, host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    await run_check(Target(Address("127.0.0.1", port), "PACS"),
                    HealthConfig("dicom-echo", calling_ae="MEDGATE", timeout=5.0))
    with trio.fail_after(10):
        await done.wait()
    request = dicom.Association.decode(received[0])
    assert request.implementation_version == IMPLEMENTATION_VERSION == f"MEDGATE_{VERSION}"
