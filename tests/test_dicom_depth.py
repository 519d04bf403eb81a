"""DICOM depth: a member's transient A-ASSOCIATE-RJ moves the association to the next member,
DIMSE statuses that say a PACS is unwell count against it, the VIP answers only to its own AE
titles, and the `dicom-find` check proves the PACS database answers."""

from __future__ import annotations

import json
import re
import sys
import time

import pytest
import trio

from gateway.balancer import Health
from gateway.service.server import Gateway, StartupError
from gateway.config import Address, HealthConfig, MemberConfig, parse_config
from gateway.records.receipts import FLUSH_EVERY, Receipts, trace
from health.checks import check_target, run_check
from protocols import dicom, dimse
from tests.helpers.dicom_peers import (Orthanc, association_answer, echoscu, next_pdu,
                                      storescu, write_instances)
from tests.helpers.faulty_members import ScriptedServer
from tests.helpers import eventually, start_gateway, vip_port, wait_for_health
from tests.test_dicom_vip import dicom_vip

BUSY = dicom.AssociateReject(dicom.RejectResult.TRANSIENT, 3, 2)  # local-limit-exceeded


class BusyPacs:
    """Answers every A-ASSOCIATE-RQ with A-ASSOCIATE-RJ transient, local-limit-exceeded."""

    def __init__(self) -> None:
        self.requests = 0

    async def __call__(self, stream: trio.SocketStream) -> None:
        if await next_pdu(stream, dicom.PduReader()) is None:  # the RQ, whatever it asks
            return
        self.requests += 1
        await stream.send_all(BUSY.encode())


class FindResponder:
    """A Q/R SCP whose database is in trouble: every C-FIND gets `status` (after the AC)."""

    def __init__(self, status: int) -> None:
        self.status = status

    async def __call__(self, stream: trio.SocketStream) -> None:
        reader = dicom.PduReader()
        peek = dimse.CommandPeek()
        while (pdu := await next_pdu(stream, reader)) is not None:
            if pdu[0] == dicom.A_ASSOCIATE_RQ:
                await stream.send_all(dicom.encode_associate_ac(dicom.Association.decode(pdu)))
            elif pdu[0] == dicom.A_RELEASE_RQ:
                await stream.send_all(dicom.RELEASE_RP)
                return
            elif pdu[0] == dicom.P_DATA_TF:
                peek.feed(pdu)
                for command in peek.take():
                    answer = dicom.encode_command({
                        dicom.TAG_AFFECTED_SOP_CLASS: dicom.STUDY_ROOT_FIND,
                        dicom.TAG_COMMAND_FIELD: 0x8020,
                        dicom.TAG_MESSAGE_ID_RESPONDED: command.message_id,
                        dicom.TAG_DATA_SET_TYPE: dicom.NO_DATA_SET, dicom.TAG_STATUS: self.status})
                    await stream.send_all(dicom.encode_p_data([dicom.Pdv(1, True, True, answer)]))


TCP_CHECK = 'health = { check = "tcp", interval = "1h" }'


async def busy_then_pacs2(nursery, pacs, extra: str):
    """A failover VIP over a member that answers every RQ with a transient RJ, then PACS2."""
    busy = BusyPacs()
    server = await ScriptedServer(busy).start(nursery)
    pacs2 = pacs("PACS2")
    gateway = await start_gateway(nursery, dicom_vip(
        [("busy", server.port, "BUSY"), ("pacs2", pacs2.port, "PACS2")], health=TCP_CHECK,
        extra=f'mode = "failover"\n{extra}'))
    return busy, pacs2, gateway


async def test_with_on_busy_next_member_a_transient_reject_moves_the_association(nursery,
                                                                                   pacs):
    busy, pacs2, gateway = await busy_then_pacs2(nursery, pacs, 'on_busy = "next-member"')
    echo = await echoscu(vip_port(gateway, "pacs"))
    assert echo.clean, echo.stderr
    assert busy.requests == 1 and pacs2.echoes == 1
    assert gateway.balancer.pool("pacs").member("busy").failed == 0  # busy is not dead


async def test_in_failover_mode_a_busy_answer_is_relayed_and_not_a_strike(nursery, pacs):
    """0.2 spilled the association to the standby: a study split over two archives. Busy is
    not dead: the modality gets the member's own answer and retries later."""
    busy, pacs2, gateway = await busy_then_pacs2(nursery, pacs, "error_limit = 1")
    for _ in range(3):
        echo = await echoscu(vip_port(gateway, "pacs"))
        assert "Rejected Transient" in echo.stderr and "Local Limit Exceeded" in echo.stderr
    assert busy.requests == 3 and pacs2.echoes == 0
    member = gateway.balancer.pool("pacs").member("busy")
    assert member.failed == 0 and member.health is Health.UP  # error_limit 1, no strike


async def test_when_every_member_is_busy_the_modality_gets_the_members_own_reject(nursery):
    servers = [await ScriptedServer(BusyPacs()).start(nursery) for _ in range(2)]
    gateway = await start_gateway(nursery, dicom_vip(
        [("busy1", servers[0].port, "B1"), ("busy2", servers[1].port, "B2")], health=TCP_CHECK))
    echo = await echoscu(vip_port(gateway, "pacs"))
    assert not echo.clean
    assert "Association Rejected" in echo.stderr and "Local Limit Exceeded" in echo.stderr, \
        echo.stderr


async def test_out_of_resources_statuses_take_a_pacs_out_while_its_echo_still_passes(
        nursery, pacs, tmp_path):
    full = pacs("FULL", store_status=0xA700)  # a PACS whose disk is full
    good = pacs("GOOD")
    gateway = await start_gateway(nursery, dicom_vip(
        [("full", full.port, "FULL"), ("good", good.port, "GOOD")],
        health='health = { check = "dicom-echo", interval = "1h" }',
        extra='mode = "failover"\nerror_limit = 3'))
    pool = gateway.balancer.pool("pacs")
    files = sorted(write_instances(tmp_path / "files", 3))
    port = vip_port(gateway, "pacs")
    for path in files:  # one association each, each C-STORE answered 0xA700 by "full"
        stored = await storescu(port, [path], "VIP", "CT1")
        assert not stored.clean  # the modality was told (relayed unchanged): it keeps the image
    # One modality's refusals alone never take a member down (it may be that modality's data).
    assert pool.member("full").health is Health.UP
    stored = await storescu(port, [files[0]], "VIP", "US2")  # a second modality: it is full
    assert not stored.clean
    await wait_for_health(pool, "full", Health.DOWN)
    assert "C-STORE-RSP status 0xa700 (refused: out of resources) to calling AE 'US2'" in (
        pool.member("full").health_detail)
    assert "from 2 senders" in pool.member("full").health_detail
    check = await run_check(check_target(MemberConfig("full", Address("127.0.0.1", full.port),
                                                      ae_title="FULL"),
                                         HealthConfig("dicom-echo")), HealthConfig("dicom-echo"))
    assert check.ok  # its C-ECHO is fine: only the statuses showed the trouble
    stored = await storescu(port, files)
    assert stored.clean, stored.stderr
    assert len(good.stored) == 3 and not full.stored


async def test_a_called_ae_the_vip_does_not_answer_to_is_refused_by_the_gateway(nursery, pacs):
    pacs1 = pacs("PACS1")
    gateway = await start_gateway(nursery, dicom_vip(
        [("pacs1", pacs1.port, "PACS1")], extra='ae_titles = ["ARCHIVE", "ARCHIVE_CT"]'))
    port = vip_port(gateway, "pacs")
    typo = await echoscu(port, "TYPO_AE")
    assert not typo.clean and "Called AE Title Not Recognized" in typo.stderr, typo.stderr
    assert gateway.balancer.pool("pacs").member("pacs1").total == 0  # never contacted
    assert (await echoscu(port, "ARCHIVE_CT")).clean


async def test_dicom_find_check_against_orthanc_and_a_pacs_whose_database_is_down(
        nursery, pacs, tmp_path):
    orthanc = Orthanc(tmp_path / "orthanc").start()
    try:
        health = HealthConfig("dicom-find", timeout=5)

        async def check(port: int, ae_title: str) -> tuple[bool, str]:
            member = MemberConfig("m", Address("127.0.0.1", port), ae_title=ae_title)
            outcome = await run_check(check_target(member, health), health)
            return outcome.ok, outcome.detail

        assert await check(orthanc.dicom_port, "ORTHANC") == (
            True, "C-FIND status 0x0000 (success), 0 match(es) for MEDGATE-NO-SUCH-PATIENT")
        url = await trio.run_process(
            [sys.executable, "-m", "gateway", "check", "--json",
             f"dicom://MEDGATE@ORTHANC@127.0.0.1:{orthanc.dicom_port}?find="],
            capture_stdout=True, capture_stderr=True, check=False)
        report = json.loads(url.stdout)["checks"][0]
        assert url.returncode == 0 and report["check"] == "dicom-find", url.stderr
        broken = await ScriptedServer(FindResponder(0xA700)).start(nursery)
        assert await check(broken.port, "PACS") == (
            False, "C-FIND status 0xa700 (refused: out of resources)")
        storage_only = pacs("STORE")  # no Q/R service at all
        ok, detail = await check(storage_only.port, "STORE")
        assert not ok and detail.startswith("Study Root Query/Retrieve FIND not accepted")
    finally:
        orthanc.stop()


async def test_inventory_lists_who_sent_what_and_survives_a_restart(nursery, pacs, tmp_path):
    pacs1 = pacs("PACS1")
    config = dicom_vip([("pacs1", pacs1.port, "PACS1")], health=TCP_CHECK,
                       extra='ae_titles = ["ARCHIVE"]').replace(
        "[[vip]]", f'[gateway]\nadmin = "127.0.0.1:0"\nstate_dir = "{tmp_path / "state"}"\n\n'
                   "[[vip]]", 1)
    gateway = await start_gateway(nursery, config, admin=True)
    port = vip_port(gateway, "pacs")
    files = sorted(write_instances(tmp_path / "files", 50))
    for calling, batch in (("CT1", files[:25]), ("US<2>", files[25:])):
        assert (await storescu(port, batch, "ARCHIVE", calling)).clean
    assert not (await echoscu(port, "TYPO_AE", "CT1")).clean  # refused: counted as such
    base = f"http://{gateway.admin_address}"
    with trio.fail_after(20):
        listed = await trio.run_process(["curl", "-sS", f"{base}/api/inventory?vip=pacs"],
                                        capture_stdout=True)
        page = await trio.run_process(["curl", "-sS", f"{base}/inventory"], capture_stdout=True)
        table = await trio.run_process([sys.executable, "-m", "gateway", "inventory", "--admin",
                                        base, "--csv"], capture_stdout=True)
    senders = {s["calling_ae"]: s for s in json.loads(listed.stdout)["senders"]}
    assert set(senders) == {"CT1", "US<2>"}
    ct1 = senders["CT1"]
    assert (ct1["address"], ct1["associations"], ct1["rejected"]) == ("127.0.0.1", 2, 1)
    assert ct1["called_aes"] == {"ARCHIVE": 1, "TYPO_AE": 1}
    assert "1.2.840.10008.5.1.4.1.1.2" in ct1["sop_classes"]  # CT Image Storage, proposed
    assert "1.2.840.10008.1.2" in ct1["transfer_syntaxes"]
    assert b"US&lt;2&gt;" in page.stdout and b"US<2>" not in page.stdout
    lines = table.stdout.decode().splitlines()
    assert lines[0].startswith("vip,calling_ae,address,associations") and len(lines) == 3
    gateway.stop()
    saved = tmp_path / "state" / "inventory.json"
    await eventually(saved.exists, 10)
    again = await start_gateway(nursery, config)
    assert {s["calling_ae"] for s in again.inventory.entries()} == {"CT1", "US<2>"}
    again.stop()


async def test_a_flush_returns_only_once_everything_added_before_it_is_written(tmp_path):
    # The periodic flush may be writing a batch in its thread when another flush (the test's,
    # or the one at stop) is asked for: that one must wait for it, not find nothing pending.
    receipts = Receipts(str(tmp_path))
    receipts.open()
    write, started = receipts._write, trio.Event()

    def slow_write(batch):  # runs in the flush's thread
        trio.from_thread.run_sync(started.set)
        time.sleep(0.3)
        write(batch)

    receipts._write = slow_write
    receipts.add("pacs", "CT1", "10.0.0.1", "pacs1", "1.2.840.10008.5.1.4.1.1.2", "1.2.3", 0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(receipts.flush)  # the periodic one, now in its thread
        await started.wait()
        await receipts.flush()  # nothing pending: it must still wait for the one under way
        assert [r.member for r in trace(str(tmp_path), sop_instance="1.2.3")] == ["pacs1"]


async def test_receipts_are_written_a_second_after_the_first_of_a_batch_and_idle_never_wakes(
        tmp_path, autojump_clock):
    """The batch task sleeps until a receipt is pending (an idle gateway does not wake every
    FLUSH_EVERY for nothing), then writes the batch FLUSH_EVERY after its first receipt."""
    receipts = Receipts(str(tmp_path))
    flushed: list[tuple[float, int]] = []

    async def flush() -> None:
        flushed.append((trio.current_time(), len(receipts.pending)))
        receipts.pending.clear()

    receipts.flush = flush  # type: ignore[method-assign]
    async with trio.open_nursery() as nursery:
        await nursery.start(receipts.run)
        await trio.sleep(600)
        assert flushed == []
        for n in range(3):
            receipts.add("pacs", "CT1", "10.0.0.1", "pacs1", "1.2.840.10008.5.1.4.1.1.2",
                         f"1.2.{n}", 0)
            await trio.sleep(0.25)
        await trio.sleep(600)
        assert flushed == [(pytest.approx(600 + FLUSH_EVERY), 3)]
        nursery.cancel_scope.cancel()


async def test_each_c_store_is_traced_to_its_member_and_status(nursery, pacs, tmp_path):
    pacs1, pacs2 = pacs("PACS1"), pacs("PACS2")
    config = dicom_vip([("pacs1", pacs1.port, "PACS1"), ("pacs2", pacs2.port, "PACS2")],
                       health=TCP_CHECK).replace(
        "[[vip]]", f'[gateway]\nadmin = ""\nstate_dir = "{tmp_path / "state"}"\n\n[[vip]]', 1)
    (tmp_path / "site.toml").write_text(config)
    gateway = await start_gateway(nursery, config)
    port = vip_port(gateway, "pacs")
    files = write_instances(tmp_path / "files", 50)
    paths = sorted(files)
    for n, calling in enumerate(("CT1", "US2") * 5):  # 10 associations, spread over both
        assert (await storescu(port, paths[n * 5:n * 5 + 5], "VIP", calling)).clean
    await gateway.receipts.flush()
    stored_on = {uid: "pacs1" for uid in pacs1.stored} | {uid: "pacs2" for uid in pacs2.stored}
    assert len(stored_on) == 50 and set(pacs1.stored) and set(pacs2.stored)
    for uid in files.values():  # kept as keyed hashes (the default): found with the key
        receipts = trace(str(tmp_path / "state"), sop_instance=uid, hasher=gateway.hasher)
        assert [(r.member, r.status) for r in receipts] == [(stored_on[uid], 0)], uid
    one = next(iter(files.values()))
    with trio.fail_after(30):
        found = await trio.run_process([sys.executable, "-m", "gateway", "trace", "-c",
                                        str(tmp_path / "site.toml"), one, "--json"],
                                       capture_stdout=True)
        by_ae = await trio.run_process([sys.executable, "-m", "gateway", "trace", "-c",
                                        str(tmp_path / "site.toml"), "US2", "--json"],
                                       capture_stdout=True)
        study = await trio.run_process([sys.executable, "-m", "gateway", "trace", "-c",
                                        str(tmp_path / "site.toml"), "1.2.3.4.5"],
                                       capture_stdout=True, check=False)
    receipt = json.loads(found.stdout)
    assert (receipt["sop_instance"], receipt["member"], receipt["status"], receipt["calling_ae"]
            ) == (one, stored_on[one], 0, receipt["calling_ae"])
    assert len(by_ae.stdout.splitlines()) == 25
    assert study.returncode == 1 and b"Study or Series Instance UID is not visible" in study.stdout


async def test_a_state_dir_that_cannot_be_written_stops_the_start_with_its_name(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = parse_config(dicom_vip([("pacs1", 11112, "PACS1")], health=TCP_CHECK).replace(
        "[[vip]]", f'[gateway]\nadmin = ""\nstate_dir = "{blocker / "state"}"\n\n[[vip]]', 1))
    with pytest.raises(StartupError, match=r"\[gateway\] state_dir .*a-file/state: "):
        await Gateway(config, serve_admin=False).bind()


def patient(config: str) -> str:
    """Longer connect/association timeouts: pynetdicom's threaded SCPs can take over a second
    to answer on a loaded machine, and with an affinity there is no other member to try."""
    return re.sub(r'assoc_timeout = "[^"]*"', 'assoc_timeout = "10s"',
                  config.replace('connect_timeout = "1s"', 'connect_timeout = "10s"'))


class MppsScp:
    """A pynetdicom MPPS SCP recording which instances it got N-CREATE and N-SET for."""

    def __init__(self, ae_title: str) -> None:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import ModalityPerformedProcedureStep, Verification

        self.created: list[str] = []
        self.set: list[str] = []
        self.ae_title = ae_title
        ae = AE(ae_title=ae_title)
        ae.add_supported_context(ModalityPerformedProcedureStep)
        ae.add_supported_context(Verification)
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
            (evt.EVT_N_CREATE, self._create), (evt.EVT_N_SET, self._set)])
        self.port = self.server.server_address[1]

    def _create(self, event):
        self.created.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000, event.attribute_list

    def _set(self, event):
        self.set.append(str(event.request.RequestedSOPInstanceUID))
        return 0x0000, event.attribute_list

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


def mpps_create_then_set(port: int, calling: str, instance: str) -> tuple[int, int]:
    """N-CREATE on one association, N-SET on the next (as a modality does); both statuses."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import ModalityPerformedProcedureStep as MPPS_CLASS

    ae = AE(ae_title=calling)
    ae.add_requested_context(MPPS_CLASS)
    statuses = []
    for step in ("create", "set"):
        assoc = ae.associate("127.0.0.1", port, ae_title="VIP")
        assert assoc.is_established, f"association for N-{step.upper()} not established"
        attributes = Dataset()
        attributes.PerformedProcedureStepStatus = "IN PROGRESS" if step == "create" else "COMPLETED"
        if step == "create":
            status, _ = assoc.send_n_create(attributes, MPPS_CLASS, instance)
        else:
            status, _ = assoc.send_n_set(attributes, MPPS_CLASS, instance)
        statuses.append(status.Status)
        assoc.release()
    return tuple(statuses)


async def mpps_association_answer(port: int, calling: str) -> bytes:
    """The gateway's answer to an A-ASSOCIATE-RQ from `calling` proposing MPPS, read raw."""
    from pynetdicom.sop_class import ModalityPerformedProcedureStep as MPPS_CLASS

    return await association_answer(port, "VIP", calling, str(MPPS_CLASS))


async def gateway_over(nursery, scps):
    """A gateway whose "pacs" VIP balances over `scps`, members named by their AE titles,
    without study affinity (study_window = 0): the workflow memory alone keeps MPPS and
    commitment with their member."""
    return await start_gateway(nursery, patient(dicom_vip(
        [(scp.ae_title.lower(), scp.port, scp.ae_title) for scp in scps], health=TCP_CHECK,
        extra="study_window = 0")))


async def test_mpps_n_set_reaches_the_member_that_got_the_n_create(nursery, caplog):
    scps = [MppsScp("MPPS1"), MppsScp("MPPS2")]
    try:
        gateway = await gateway_over(nursery, scps)
        port = vip_port(gateway, "pacs")
        instances = [f"1.2.826.0.1.3680043.8.498.77.{n}" for n in range(20)]
        for n, instance in enumerate(instances):  # two modalities, taking turns
            statuses = await trio.to_thread.run_sync(
                mpps_create_then_set, port, ("CT1", "MR1")[n % 2], instance)
            assert statuses == (0, 0)
        for scp in scps:
            assert sorted(scp.set) == sorted(scp.created)  # every N-SET where its N-CREATE went
        assert sorted(scps[0].created + scps[1].created) == sorted(instances)
        # Balance without persistence: associations of other kinds still spread (the echo
        # of the health check aside), so the affinity is what kept these together.
        assert gateway.balancer.pool("pacs").member("mpps1").total > 0
        assert gateway.balancer.pool("pacs").member("mpps2").total > 0
        assert "balances each association over 2 members without persistence" in caplog.text
        # The member that has CT1's procedure steps goes away: CT1's next MPPS association is
        # refused (transient: the modality retries), not sent to the other member.
        holder = next(scp for scp in scps if instances[-2] in scp.created)  # CT1's last one
        holder_port = holder.port
        holder.stop()  # its listening socket is closed when this returns
        with pytest.raises(OSError):
            await trio.open_tcp_stream("127.0.0.1", holder_port)
        other = scps[1 - scps.index(holder)]
        before = len(other.set) + len(other.created)
        answer = await mpps_association_answer(port, "CT1")
        assert dicom.AssociateReject.decode(answer) == dicom.REJECT_NO_MEMBER  # it retries
        assert len(other.set) + len(other.created) == before
    finally:
        for scp in scps:
            scp.stop()


def test_workflow_affinity_is_time_limited_bounded_and_forgets_removed_members(monkeypatch):
    from gateway.vips import workflow

    affinity = workflow.WorkflowAffinity()
    assert affinity.kind([workflow.MPPS, workflow.VERIFICATION]) == "mpps"
    assert affinity.kind([workflow.COMMITMENT]) == "commitment"
    assert affinity.kind([workflow.MPPS, "1.2.840.10008.5.1.4.1.1.2"]) is None  # + CT storage
    affinity.created("CT1", "1.2.3", "mpps1", now=0.0)
    affinity.stored("CT1", "pacs2", now=0.0)
    assert affinity.member_for("mpps", "CT1", 10.0) == affinity.created_on("1.2.3", 10.0) == "mpps1"
    assert affinity.member_for("commitment", "CT1", 10.0) == "pacs2"
    assert affinity.member_for("mpps", "CT1", workflow.KEEP_FOR + 1) is None  # expired
    monkeypatch.setattr(workflow, "MAX_ENTRIES", 3)
    affinity = workflow.WorkflowAffinity()
    for n in range(5):
        affinity.created(f"AE{n}", f"1.2.{n}", "mpps2", now=100.0)
    assert affinity.member_for("mpps", "AE0", 100.0) is None
    assert affinity.member_for("mpps", "AE4", 100.0) == "mpps2"
    affinity.forget_member("mpps2")
    assert affinity.member_for("mpps", "AE4", 100.0) is None


class CommitmentScp:
    """A pynetdicom storage SCP that also takes Storage Commitment requests (N-ACTION),
    recording the instances it stored and the Transaction UIDs it was asked to commit."""

    def __init__(self, ae_title: str) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import StorageCommitmentPushModel

        self.stored: list[str] = []
        self.commitments: list[str] = []
        self.ae_title = ae_title
        ae = AE(ae_title=ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax)
        ae.add_supported_context(StorageCommitmentPushModel)
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[
            (evt.EVT_C_STORE, self._store), (evt.EVT_N_ACTION, self._action)])
        self.port = self.server.server_address[1]

    def _store(self, event) -> int:
        self.stored.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def _action(self, event):
        self.commitments.append(str(event.action_information.TransactionUID))
        return 0x0000, None

    def stop(self) -> None:
        self.server.shutdown()


def request_commitment(port: int, calling: str, transaction: str, instance: str) -> int:
    """An N-ACTION (Storage Commitment Push Model) for one instance; its status."""
    from pydicom.dataset import Dataset
    from pynetdicom import AE
    from pynetdicom.sop_class import StorageCommitmentPushModel

    ae = AE(ae_title=calling)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", port, ae_title="VIP")
    assert assoc.is_established
    request = Dataset()
    request.TransactionUID = transaction
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = instance
    request.ReferencedSOPSequence = [item]
    status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel,
                                    "1.2.840.10008.1.20.1.1")
    assoc.release()
    return status.Status


async def test_a_storage_commitment_reaches_the_member_that_took_the_images(nursery, tmp_path):
    scps = [CommitmentScp("PACS1"), CommitmentScp("PACS2")]
    try:
        gateway = await gateway_over(nursery, scps)
        port = vip_port(gateway, "pacs")
        files = write_instances(tmp_path / "files", 10)
        for n, (path, uid) in enumerate(sorted(files.items())):
            assert (await storescu(port, [path], "VIP", "CT1")).clean  # balanced: alternates
            transaction = f"1.2.826.0.1.3680043.8.498.88.{n}"
            status = await trio.to_thread.run_sync(request_commitment, port, "CT1",
                                                   transaction, uid)
            assert status == 0
            holder = next(scp for scp in scps if uid in scp.stored)
            assert holder.commitments[-1] == transaction, n  # asked of the member that has it
        assert all(scp.stored for scp in scps)  # the stores did spread over both
    finally:
        for scp in scps:
            scp.stop()
