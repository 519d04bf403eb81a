"""The DICOM VIP with unmodified DCMTK clients, simulated and real (Orthanc) PACS members."""

from __future__ import annotations

import logging
import os
import signal
from collections import Counter

import trio

from gateway.balancer import Health
from protocols import dicom
from tests.helpers.dicom_peers import (Orthanc, PacsProcess, Storescp, echoscu, storescu,
                                      write_instances)
from tests.helpers import eventually, start_gateway, vip_port, wait_for_health


def dicom_vip(members: list[tuple[str, int, str]], extra: str = "", health: str = "",
              member_extra: dict[str, str] | None = None, timeout: str = "3s") -> str:
    """TOML for a dicom VIP named 'pacs' in front of (name, port, ae_title) members;
    `timeout`: its assoc_timeout and its health check's (3 s: on a loaded machine the
    in-process PACS simulator, pynetdicom's threads, can take a second to answer)."""
    health = health or ('health = { check = "dicom-echo", interval = "300ms", '
                        f'timeout = "{timeout}", rise = 2, fall = 2 }}')
    text = f"""
[[vip]]
name = "pacs"
protocol = "dicom"
listen = "127.0.0.1:0"
connect_timeout = "1s"
assoc_timeout = "{timeout}"
{health}
{extra}
"""
    for name, port, ae_title in members:
        text += f"""
[[vip.member]]
name = "{name}"
address = "127.0.0.1:{port}"
ae_title = "{ae_title}"
{(member_extra or {}).get(name, "")}
"""
    return text


async def test_echoscu_and_storescu_through_two_pacs_spread_by_weight(nursery, pacs, tmp_path):
    pacs1, pacs2 = pacs("PACS1"), pacs("PACS2")
    gateway = await start_gateway(nursery, dicom_vip(
        [("pacs1", pacs1.port, "PACS1"), ("pacs2", pacs2.port, "PACS2")],
        member_extra={"pacs1": "weight = 300", "pacs2": "weight = 100"},
        extra="study_window = 0"))  # every association its own pick (no study affinity)
    port = vip_port(gateway, "pacs")
    echo = await echoscu(port)
    assert echo.clean, echo.stderr
    files = write_instances(tmp_path / "files", 16)
    paths = sorted(files)
    for batch in range(8):  # 8 associations of 2 instances each
        result = await storescu(port, paths[batch * 2:batch * 2 + 2])
        assert result.clean, result.stderr
    assert set(pacs1.stored) | set(pacs2.stored) == set(files.values())
    # The echo above was the first association (to pacs1); then 8 stores at 3:1 from there on.
    per_member = Counter({"pacs1": len(pacs1.stored) // 2, "pacs2": len(pacs2.stored) // 2})
    assert per_member == {"pacs1": 6, "pacs2": 2}


async def test_called_ae_is_rewritten_for_each_member_and_restored_in_the_ac(nursery, tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc").start()  # checks the called AE: must be ORTHANC
    try:
        gateway = await start_gateway(nursery, dicom_vip([("orthanc", orthanc.dicom_port,
                                                           "ORTHANC")]))
        port = vip_port(gateway, "pacs")
        files = write_instances(tmp_path / "files", 25)
        result = await storescu(port, sorted(files), "HOSPITAL-PACS")  # not ORTHANC
        assert result.clean, result.stderr
        assert orthanc.instance_count() == 25
        instances = orthanc.get("/instances?expand")
        assert {i["MainDicomTags"]["SOPInstanceUID"] for i in instances} == set(files.values())
        # Straight to Orthanc with the VIP's title, the same store is refused: the rewrite did it.
        direct = await echoscu(orthanc.dicom_port, "HOSPITAL-PACS")
        assert direct.returncode != 0 and "Called AE Title Not Recognized" in direct.stderr
    finally:
        orthanc.stop()


async def test_routes_by_called_ae_and_refuses_unknown_calling_aes(nursery, pacs, tmp_path):
    general, cardio = pacs("PACS1"), pacs("CARDIOPACS")
    gateway = await start_gateway(nursery, dicom_vip(
        [("pacs1", general.port, "PACS1"), ("cpacs1", cardio.port, "CARDIOPACS")],
        extra='routes = { "CARDIO" = ["cpacs1"], "ARCHIVE" = ["pacs1"] }\n'
              'allowed_calling_aes = ["CT01", "ECHO01"]'))
    port = vip_port(gateway, "pacs")
    files = write_instances(tmp_path / "files", 3)
    assert (await storescu(port, sorted(files), "CARDIO", "CT01")).clean
    assert set(cardio.stored) == set(files.values()) and not general.stored
    assert (await storescu(port, sorted(files), "ARCHIVE", "CT01")).clean
    assert set(general.stored) == set(files.values())

    unknown_route = await echoscu(port, "NOWHERE", "ECHO01")
    assert unknown_route.returncode == 1
    assert "Rejected Permanent" in unknown_route.stderr
    assert "Called AE Title Not Recognized" in unknown_route.stderr

    stranger = await echoscu(port, "CARDIO", "INTRUDER")
    assert stranger.returncode == 1 and "Rejected Permanent" in stranger.stderr
    assert "Calling AE Title Not Recognized" in stranger.stderr


async def test_all_members_down_gives_a_transient_reject(nursery, pacs):
    archive = pacs("PACS1")
    gateway = await start_gateway(nursery, dicom_vip([("pacs1", archive.port, "PACS1")]))
    archive.stop()
    await wait_for_health(gateway.balancer.pool("pacs"), "pacs1", Health.DOWN)
    result = await echoscu(vip_port(gateway, "pacs"))
    assert result.returncode == 1
    assert "Association Rejected" in result.stderr
    assert "Rejected Transient" in result.stderr  # the modality keeps its data and retries
    assert "Temporary Congestion" in result.stderr


async def test_check_marks_a_pacs_that_rejects_associations_down_with_the_reason(nursery, pacs):
    good, rejecting = pacs("PACS1"), pacs("PACS2", reject=True)
    gateway = await start_gateway(nursery, dicom_vip(
        [("pacs1", good.port, "PACS1"), ("pacs2", rejecting.port, "PACS2")]))
    member = gateway.balancer.pool("pacs").member("pacs2")
    assert member.health is Health.DOWN  # its first check already failed: no traffic, ever
    assert member.last_check.detail == (
        "association rejected (rejected-permanent, service-user, calling-AE-title-not-recognized)")
    for _ in range(4):
        assert (await echoscu(vip_port(gateway, "pacs"))).clean
    assert rejecting.echoes == 0


async def test_frozen_pacs_is_skipped_within_assoc_timeout_and_marked_down(nursery, tmp_path):
    frozen = PacsProcess(tmp_path / "frozen", "PACS1").start()
    live = PacsProcess(tmp_path / "live", "PACS2").start()
    try:
        gateway = await start_gateway(nursery, dicom_vip(
            [("pacs1", frozen.port, "PACS1"), ("pacs2", live.port, "PACS2")]))
        pool = gateway.balancer.pool("pacs")
        os.kill(frozen.process.pid, signal.SIGSTOP)  # accepts TCP (kernel backlog), never answers
        results = [await echoscu(vip_port(gateway, "pacs")) for _ in range(20)]
        assert all(r.clean for r in results), [r.stderr for r in results if not r.clean]
        await wait_for_health(pool, "pacs1", Health.DOWN, 20)
        member = pool.member("pacs1")
        assert "no answer to the A-ASSOCIATE-RQ within 3s" in member.health_detail or (
            "timeout after 3s" in member.health_detail)
        await eventually(lambda: member.last_check is not None  # and the dicom-echo check
                         and "timeout after 3s" in member.last_check.detail, 20)  # sees it too
    finally:
        if frozen.process is not None:
            os.kill(frozen.process.pid, signal.SIGCONT)
        frozen.stop()
        live.stop()


async def test_pacs_killed_mid_store_loses_nothing(nursery, tmp_path):
    first = PacsProcess(tmp_path / "first", "PACS1").start()
    second = PacsProcess(tmp_path / "second", "PACS2").start()
    try:
        gateway = await start_gateway(nursery, dicom_vip(
            [("pacs1", first.port, "PACS1"), ("pacs2", second.port, "PACS2")]))
        port = vip_port(gateway, "pacs")
        files = write_instances(tmp_path / "files", 50, pixel_bytes=256 * 1024)
        victim = None

        async def kill_when_busy():
            nonlocal victim
            with trio.fail_after(60):
                while victim is None:
                    for pacs_process in (first, second):
                        if len(pacs_process.stored()) >= 10:
                            victim = pacs_process
                            os.killpg(pacs_process.process.pid, signal.SIGKILL)
                            break
                    await trio.sleep(0.005)

        async with trio.open_nursery() as inner:
            inner.start_soon(kill_when_busy)
            result = await storescu(port, sorted(files), "VIP", "STORESCU", "-v", "-nh")
        reported = stored_by_storescu(result.stderr, sorted(files))
        on_disk = first.stored() | second.stored()
        confirmed = {files[path] for path in reported}
        assert confirmed <= on_disk  # every instance storescu was told is stored, is stored
        assert 5 <= len(confirmed) < 50  # some made it before the kill, not all
        assert result.returncode != 0  # and the rest failed visibly at storescu
        assert "Store Failed" in result.stderr or "Peer aborted" in result.stderr
        # The modality resends what failed: once the killed PACS is down (until then its
        # associations are refused transient: study affinity), it lands on the live one.
        victim_name = "pacs1" if victim is first else "pacs2"
        await wait_for_health(gateway.balancer.pool("pacs"), victim_name, Health.DOWN)
        unconfirmed = [path for path in sorted(files) if path not in reported]
        retry = await storescu(port, unconfirmed)
        assert retry.clean, retry.stderr
        survivor = second if victim is first else first
        assert {files[path] for path in unconfirmed} <= survivor.stored()
    finally:
        first.stop()
        second.stop()


async def test_a_slow_archive_gets_server_timeout_to_answer_then_counts_against_it(
        nursery, tmp_path, caplog):
    """DCMTK's storescp silent about 3 s before each C-STORE-RSP (--sleep-during 1 sleeps at
    each of its progress steps). An association idle on the modality's side ends at
    client_timeout (1 s here), but one waiting on the archive is not idle: with
    server_timeout 10 s the image is stored, with 1 s the modality gets an A-ABORT (it keeps
    the image) and the stall counts against the archive (as a failure status), the log
    naming what it owed."""
    caplog.set_level(logging.INFO, logger="medgate")
    slow = Storescp(tmp_path / "slow", "PACS1", "--sleep-during", "1").start()
    try:
        (image,) = write_instances(tmp_path / "image", 1)
        for server_timeout, stores in (("10s", True), ("1s", False)):
            gateway = await start_gateway(nursery, dicom_vip(
                [("pacs1", slow.port, "PACS1")], health='health = { check = "tcp" }',
                extra=f'client_timeout = "1s"\nserver_timeout = "{server_timeout}"'))
            result = await storescu(vip_port(gateway, "pacs"), [image], "VIP", "CT01")
            member = gateway.balancer.pool("pacs").member("pacs1")
            if stores:
                assert result.clean, result.stderr
                assert member.status_failures == 0
            else:
                assert not result.clean and "Store Failed" in result.stderr, result.stderr
                await eventually(lambda: member.status_failures == 1)
                assert ("pacs1 sent nothing for 1s, owing a response to a C-STORE-RQ"
                        in caplog.text)
            gateway.stop()
        assert slow.stored() >= 1  # the first; the aborted one as storescp decides
    finally:
        slow.stop()


def stored_by_storescu(stderr: str, paths: list[str]) -> set[str]:
    """Files storescu -v reported as stored: each 'Sending Store Request' line names the file's
    position; a 'Received Store Response (Success)' right after it confirms that file."""
    confirmed: set[str] = set()
    index = -1
    for line in stderr.splitlines():
        if line.startswith("I: Sending Store Request"):
            index += 1
        elif line.startswith("I: Received Store Response (Success)") and 0 <= index < len(paths):
            confirmed.add(paths[index])
    return confirmed


async def capture_rq(tool_args) -> dicom.Association:
    """Run a DCMTK client against a socket that records its A-ASSOCIATE-RQ and rejects it."""
    captured = []

    async def handle(stream):
        reader = dicom.PduReader()
        while (pdu := reader.next_pdu()) is None:
            reader.feed(await stream.receive_some(65536))
        captured.append(dicom.Association.decode(pdu))
        await stream.send_all(dicom.REJECT_NO_MEMBER.encode())

    async with trio.open_nursery() as inner:
        listeners = await inner.start(trio.serve_tcp, handle, 0)
        port = listeners[0].socket.getsockname()[1]
        await tool_args(port)
        inner.cancel_scope.cancel()
    return captured[0]


async def test_codec_reads_what_dcmtk_sends(tmp_path):
    echo_rq = await capture_rq(lambda port: echoscu(port, "PACS1", "CT01"))
    assert (echo_rq.called_ae, echo_rq.calling_ae) == ("PACS1", "CT01")
    assert echo_rq.presentation_contexts[0].abstract_syntax == dicom.VERIFICATION_SOP_CLASS
    assert echo_rq.implementation_version.startswith("OFFIS_DCMTK")
    files = write_instances(tmp_path, 1)
    store_rq = await capture_rq(lambda port: storescu(port, list(files), "ARCHIVE"))
    assert "1.2.840.10008.5.1.4.1.1.7" in {c.abstract_syntax
                                           for c in store_rq.presentation_contexts}
    assert store_rq.max_pdu_length == 16384
