"""The PACS and modality simulators, through the plugin's fixtures and `gateway simulate`."""

from __future__ import annotations

import subprocess
import sys

import trio

from gateway.balancer import Health
from tests.dicom_peers import PacsProcess, echoscu, storescu, write_instances
from tests.helpers import start_gateway, vip_port
from tests.test_dicom_vip import dicom_vip


def test_modality_stores_on_pacs_and_reports_each_instance(pacs, modality):
    archive = pacs("PACS1")
    results = modality.send("127.0.0.1", archive.port, count=5, called_ae="PACS1")
    assert [r.stored for r in results] == [True] * 5
    assert set(archive.stored) == {r.sop_instance_uid for r in results}


def test_abort_after_n_stores_is_seen_by_the_modality(pacs, modality):
    archive = pacs("PACS1", abort_after=2)
    results = modality.send("127.0.0.1", archive.port, count=4, called_ae="PACS1", timeout=2)
    assert [r.stored for r in results] == [True, True, False, False]
    assert all(r.error for r in results[2:]) and archive.stored_count() == 2


async def test_hanging_pacs_is_redispatched_then_released(nursery, pacs, tmp_path):
    hung, live = pacs("PACS1"), pacs("PACS2")
    gateway = await start_gateway(nursery, dicom_vip(
        [("pacs1", hung.port, "PACS1"), ("pacs2", live.port, "PACS2")], extra="error_limit = 1"))
    hung.set_hang(True)
    assert (await echoscu(vip_port(gateway, "pacs"))).clean  # waited 1s on pacs1, then pacs2
    pool = gateway.balancer.pool("pacs")
    assert pool.member("pacs1").health is Health.DOWN
    hung.set_hang(False)
    with trio.fail_after(10):
        while pool.member("pacs1").health is not Health.UP:
            await trio.sleep(0.05)
    files = write_instances(tmp_path, 4)
    for path in files:
        assert (await storescu(vip_port(gateway, "pacs"), [path])).clean
    assert hung.stored_count() > 0 and live.stored_count() > 0


def test_gateway_simulate_modality_and_pacs_processes(tmp_path):
    archive = PacsProcess(tmp_path / "pacs", "ARCHIVE").start()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "simulate", "modality", f"127.0.0.1:{archive.port}",
             "--count", "3", "--called-ae", "ARCHIVE"], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().endswith("3 of 3 stored")
        assert len(archive.stored()) == 3
    finally:
        archive.stop()
    refused = subprocess.run(
        [sys.executable, "-m", "gateway", "simulate", "modality", f"127.0.0.1:{archive.port}",
         "--count", "2", "--timeout", "3"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "0 of 2 stored" in refused.stdout
