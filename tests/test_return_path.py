"""The return path of a DICOM VIP: what a member sends back to a modality (a storage commitment
report, a C-MOVE's images) reaches it from the VIP's AE title, whichever member did the work.
Orthanc is the PACS (it sends real N-EVENT-REPORTs and C-MOVE sub-operations); the modality is
pynetdicom, which accepts a report only from the AE title it knows; DCMTK's movescu asks for a
C-MOVE to an Orthanc that takes images only from the VIP's AE title."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import trio
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import AE, evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from gateway.config import ConfigError, parse_config
from gateway.records.receipts import commitments
from protocols import dicom
from protocols.commitment import STORAGE_COMMITMENT
from tests.helpers import eventually, reserved_port, start_gateway, vip_port
from tests.helpers.dicom_peers import (Orthanc, association_answer, run_dcmtk, storescu,
                                      write_instances)

COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known SOP instance (PS3.4 J.3.5)


def return_vip(member_port: int, return_port: int | None, destinations: dict[str, int],
               state_dir: str = "") -> str:
    """A DICOM VIP over one member, with a return path unless `return_port` is None."""
    state = f'[gateway]\nadmin = ""\nstate_dir = "{state_dir}"\n' if state_dir else ""
    returns = f'return_listen = "127.0.0.1:{return_port}"\n' if return_port is not None else ""
    text = (f'{state}[[vip]]\nname = "pacs"\nprotocol = "dicom"\nlisten = "127.0.0.1:0"\n'
            f'ae_titles = ["ARCHIVE"]\n{returns}'
            'connect_timeout = "2s"\nassoc_timeout = "5s"\n'
            'health = { check = "tcp", interval = "1h" }\n'
            f'[[vip.member]]\nname = "orthanc"\naddress = "127.0.0.1:{member_port}"\n'
            'ae_title = "ORTHANC"\n')
    for title, port in destinations.items():
        text += f'[[vip.destination]]\nae_title = "{title}"\naddress = "127.0.0.1:{port}"\n'
    return text


async def answer_to(port: int, called: str) -> bytes:
    """The gateway's answer to an A-ASSOCIATE-RQ for a storage commitment report, read raw."""
    return await association_answer(port, called, "ORTHANC", STORAGE_COMMITMENT)


class Modality:
    """A modality's storage commitment SCU: its own SCP takes N-EVENT-REPORTs, and only from
    the AE title it sent the request to (as most modalities check)."""

    def __init__(self, title: str, trusted: str) -> None:
        self.reports: list[tuple[str, int, Dataset]] = []  # (caller, event type, data set)
        self.arrived = threading.Condition()
        ae = AE(title)
        ae.require_calling_aet = [trusted]
        ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_N_EVENT_REPORT, self._report)])
        self.port = self.server.server_address[1]
        self.title = title

    def _report(self, event) -> tuple[int, None]:
        with self.arrived:
            self.reports.append((event.assoc.requestor.ae_title, event.request.EventTypeID,
                                 event.event_information))
            self.arrived.notify_all()
        return 0x0000, None

    def request(self, port: int, instances: list[tuple[str, str]], transaction: str) -> int:
        """N-ACTION storage commitment request through the VIP; its status."""
        ae = AE(self.title)
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate("127.0.0.1", port, ae_title="ARCHIVE")
        assert assoc.is_established
        try:
            request = Dataset()
            request.TransactionUID = transaction
            request.ReferencedSOPSequence = Sequence()
            for sop_class, sop_instance in instances:
                item = Dataset()
                item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, sop_instance
                request.ReferencedSOPSequence.append(item)
            status, _ = assoc.send_n_action(request, 1, StorageCommitmentPushModel,
                                            COMMITMENT_INSTANCE)
            return int(status.Status)
        finally:
            assoc.release()

    def stop(self) -> None:
        self.server.shutdown()


async def test_a_commitment_report_reaches_the_modality_from_the_vip_and_is_recorded(
        nursery, tmp_path):
    modality = Modality("MOD1", trusted="ARCHIVE")
    return_port = reserved_port()
    orthanc = Orthanc(tmp_path / "orthanc", DicomModalities={
        "mod1": ["MOD1", "127.0.0.1", return_port]})  # where Orthanc sends MOD1's reports
    orthanc.start()
    try:
        state = tmp_path / "state"
        config = return_vip(orthanc.dicom_port, return_port, {"MOD1": modality.port},
                            str(state))
        (tmp_path / "site.toml").write_text(config)
        gateway = await start_gateway(nursery, config)
        files = write_instances(tmp_path / "files", 2)
        assert (await storescu(vip_port(gateway, "pacs"), sorted(files), "ARCHIVE",
                               "MOD1")).clean
        stored = sorted(files.values())
        secondary = "1.2.840.10008.5.1.4.1.1.7"
        asked = [(secondary, uid) for uid in stored] + [(secondary, "1.2.3.4.5.404")]
        status = await trio.to_thread.run_sync(
            modality.request, vip_port(gateway, "pacs"), asked, "1.2.3.4.5.77")
        assert status == 0x0000
        await eventually(lambda: modality.reports, 20, "the N-EVENT-REPORT at the modality")
        caller, event_type, report = modality.reports[0]
        assert caller == "ARCHIVE"  # the VIP's AE title, not ORTHANC: the modality took it
        assert event_type == 2  # failures exist
        assert sorted(item.ReferencedSOPInstanceUID
                      for item in report.ReferencedSOPSequence) == stored
        assert [item.ReferencedSOPInstanceUID for item in report.FailedSOPSequence] == [
            "1.2.3.4.5.404"]
        await gateway.receipts.flush()
        committed = commitments(str(state), stored[0], gateway.hasher)
        assert [(c.member, c.failure_reason, c.transaction_uid) for c in committed] == [
            ("orthanc", None, "1.2.3.4.5.77")]
        failed = commitments(str(state), "1.2.3.4.5.404", gateway.hasher)
        assert [(c.member, c.failure_reason) for c in failed] == [
            ("orthanc", report.FailedSOPSequence[0].FailureReason)]
        with trio.fail_after(30):
            traced = await trio.run_process([sys.executable, "-m", "gateway", "trace", "-c",
                                             str(tmp_path / "site.toml"), stored[0]],
                                            capture_stdout=True,
                                            env={**os.environ, "COLUMNS": "200"})
        assert b"committed by orthanc at" in traced.stdout, traced.stdout
    finally:
        orthanc.stop()
        modality.stop()


async def test_movescu_images_reach_a_destination_that_takes_only_the_vips_ae(nursery,
                                                                             tmp_path):
    """C-MOVE through the VIP to a member (Orthanc ORTHANC), whose C-STORE sub-operations to the
    move destination DEST go by the return path: DEST (another Orthanc, which takes images
    only from the modalities it knows: DicomAlwaysAllowStore false) knows only ARCHIVE, the
    VIP's AE title. Straight from the member, DEST refuses them."""
    return_port = reserved_port()
    destination = Orthanc(tmp_path / "dest", DicomAet="DEST", DicomAlwaysAllowStore=False,
                          DicomModalities={"vip": ["ARCHIVE", "127.0.0.1", 104]}).start()
    archive = Orthanc(tmp_path / "archive", DicomModalities={
        "dest": ["DEST", "127.0.0.1", return_port],  # the return path, as the site sets it
        "direct": ["DIRECT", "127.0.0.1", destination.dicom_port],
        "movescu": ["MOVESCU", "127.0.0.1", 104]}).start()
    try:
        gateway = await start_gateway(nursery, return_vip(
            archive.dicom_port, return_port, {"DEST": destination.dicom_port}))
        port = vip_port(gateway, "pacs")
        files = write_instances(tmp_path / "study", 3)
        assert (await storescu(port, sorted(files), "ARCHIVE", "MOVESCU")).clean
        study = dcmread(next(iter(files))).StudyInstanceUID

        async def move(to: str):
            return await run_dcmtk("movescu", "-S", "-aet", "MOVESCU", "-aec", "ARCHIVE",
                                   "-aem", to, "-k", "QueryRetrieveLevel=STUDY", "-k",
                                   f"StudyInstanceUID={study}", "127.0.0.1", str(port))

        # straight from the member to DEST's own port (as today's main delivers): refused
        direct = await move("DIRECT")
        assert "Failed" in direct.stdout + direct.stderr and destination.instance_count() == 0
        moved = await move("DEST")  # by the return path: DEST sees ARCHIVE calling
        assert moved.returncode == 0 and "E:" not in moved.stderr, moved.stderr
        assert destination.instance_count() == 3
        assert {i["MainDicomTags"]["SOPInstanceUID"]
                for i in destination.get("/instances?expand")} == set(files.values())
    finally:
        archive.stop()
        destination.stop()


async def test_an_unknown_destination_is_refused_permanently(nursery, tmp_path):
    return_port = reserved_port()
    gateway = await start_gateway(nursery, return_vip(reserved_port(), return_port,
                                                      {"MOD1": reserved_port()}))
    assert gateway.bound["pacs/return"][0].port == return_port
    assert await answer_to(return_port, "NOBODY") == dicom.REJECT_CALLED_AE.encode()  # permanent: called AE not recognised


async def test_an_unreachable_destination_is_refused_for_now_and_a_host_mismatch_is_told(
        nursery, pacs, caplog):
    """The member keeps what it could not deliver (A-ASSOCIATE-RJ transient) and retries; a
    calling AE that calls from another host than its destination's is logged once."""
    archive = pacs("ORTHANC")
    return_port = reserved_port()
    config = return_vip(archive.port, return_port, {"MOD1": reserved_port()}).replace(
        '[[vip.destination]]\nae_title = "MOD1"\naddress = "127.0.0.1:',
        '[[vip.destination]]\nae_title = "MOD1"\naddress = "127.0.0.2:')
    gateway = await start_gateway(nursery, config)
    assert await answer_to(return_port, "MOD1") == dicom.REJECT_NO_MEMBER.encode()  # transient: temporary congestion
    for _ in range(2):
        echo = await run_dcmtk("echoscu", "-aet", "MOD1", "-aec", "ARCHIVE", "127.0.0.1",
                               str(vip_port(gateway, "pacs")))
        assert echo.returncode == 0, echo.stderr
    assert caplog.text.count("calling AE 'MOD1' calls from 127.0.0.1, but its return-path "
                             "destination is at 127.0.0.2") == 1


@pytest.mark.parametrize("change, message", [
    (('return_listen = "127.0.0.1:1040"\n', ""), "destination: only with return_listen"),
    (('ae_titles = ["ARCHIVE"]\n', ""), "return_ae_title: required when ae_titles is empty"),
    (('[[vip.destination]]\nae_title = "MOD1"\naddress = "127.0.0.1:11112"\n', ""),
     "destination: list every destination"),
    (('address = "127.0.0.1:11112"\n', 'address = "127.0.0.1:11112"\nport = 4\n'),
     "destination #1: port: unknown key"),
    (('listen = "127.0.0.1:0"', 'listen = "127.0.0.1:1040"'),
     "return_listen: 127.0.0.1:1040 is one of listen"),
])
def test_return_path_keys_are_checked(change, message):
    text = return_vip(104, 1040, {"MOD1": 11112})
    assert change[0] in text
    with pytest.raises(ConfigError, match=message):
        parse_config(text.replace(*change))


def test_the_return_path_is_for_dicom_vips_only():
    with pytest.raises(ConfigError, match="return_listen: only for protocol dicom"):
        parse_config('[[vip]]\nname = "h"\nprotocol = "hl7"\nlisten = "127.0.0.1:0"\n'
                     'return_listen = "127.0.0.1:9"\n[[vip.member]]\nname = "r"\n'
                     'address = "127.0.0.1:1"\n')
    config = parse_config(return_vip(104, 1040, {"MOD1": 11112, "CT01": 104})).vip("pacs")
    assert (config.return_ae_title, [d.ae_title for d in config.destinations]) == (
        "ARCHIVE", ["MOD1", "CT01"])


async def test_a_reload_adds_changes_and_removes_the_return_path(nursery, pacs):
    archive = pacs("ORTHANC")
    gateway = await start_gateway(nursery, return_vip(archive.port, None, {}))
    assert "pacs/return" not in gateway.bound

    first = reserved_port()
    await gateway.reload(parse_config(return_vip(archive.port, first, {"MOD1": reserved_port()}),
                                      source="test.toml"))
    assert gateway.bound["pacs/return"][0].port == first
    assert await answer_to(first, "MOD2") == dicom.REJECT_CALLED_AE.encode()
    assert await answer_to(first, "MOD1") == dicom.REJECT_NO_MEMBER.encode()  # nothing listens
    await gateway.reload(parse_config(return_vip(archive.port, first, {"MOD2": reserved_port()}),
                                      source="test.toml"))
    assert await answer_to(first, "MOD1") == dicom.REJECT_CALLED_AE.encode()  # MOD1 went
    await gateway.reload(parse_config(return_vip(archive.port, None, {}), source="test.toml"))
    assert "pacs/return" not in gateway.bound and "pacs" not in gateway.returns


def test_the_exports_that_cannot_rewrite_ae_titles_refuse_a_return_path():
    from gateway.commands.export import haproxy, keepalived

    config = parse_config(return_vip(104, 1040, {"MOD1": 11112}))
    for export in (lambda: haproxy(config, checks="tcp"), lambda: keepalived(config)):
        with pytest.raises(ConfigError, match="its return path .* forwards AE titles unchanged"):
            export()
