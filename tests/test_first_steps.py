"""What a newcomer following the README sends first: a study written by `gateway simulate study`
(checked by dciodvfy, stored by DCMTK's storescu through a VIP into Orthanc), and an ITI-41 from
`gateway simulate xds-consumer --provide`."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from pydicom import dcmread

from gateway.commands.cli import STUDY_MODALITIES
from gateway.testing.simulators.study import KINDS
from tests.helpers import start_gateway, vip_port
from tests.helpers.dicom_peers import Orthanc, storescu
from tests.test_dicom_vip import dicom_vip
from tests.test_xds_vip import PATIENT, xds_vip

GATEWAY = [sys.executable, "-m", "gateway"]


def dciodvfy(path: Path) -> list[str]:
    """dicom3tools' IOD checker: its errors about `path` (warnings left out)."""
    binary = shutil.which("dciodvfy")
    if binary is None:
        pytest.fail("dciodvfy is not installed: apt-get install dicom3tools (.ci/run does this)")
    result = subprocess.run([binary, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("Error")]


@pytest.mark.parametrize("modality", STUDY_MODALITIES)
def test_the_study_is_a_whole_iod_of_its_modality(modality, tmp_path):
    written = subprocess.run([*GATEWAY, "simulate", "study", str(tmp_path / "study"),
                              "--images", "2", "--modality", modality],
                             capture_output=True, text=True, timeout=60)
    assert written.returncode == 0, written.stderr
    assert written.stdout.strip() == f"2 {modality} image(s) of one study in {tmp_path / 'study'}"
    paths = sorted((tmp_path / "study").iterdir())
    assert [path.name for path in paths] == ["IMG0001.dcm", "IMG0002.dcm"]
    for path in paths:
        assert dciodvfy(path) == [], path
    first, second = (dcmread(path) for path in paths)
    assert first.SOPClassUID == KINDS[modality].sop_class and first.Modality == modality
    assert first.StudyInstanceUID == second.StudyInstanceUID
    assert first.SOPInstanceUID != second.SOPInstanceUID and first.PixelData != second.PixelData


def test_the_modalities_offered_are_the_ones_written():
    assert STUDY_MODALITIES == list(KINDS)


def test_a_bad_image_count_is_a_usage_error(tmp_path):
    refused = subprocess.run([*GATEWAY, "simulate", "study", str(tmp_path), "--images", "0"],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 3 and "'0' is not a whole number >= 1" in refused.stderr


async def test_storescu_stores_the_study_through_a_vip_into_orthanc(nursery, tmp_path):
    written = await trio.run_process([*GATEWAY, "simulate", "study", str(tmp_path / "study"),
                                      "--images", "5", "--modality", "CT"], capture_stdout=True)
    assert written.returncode == 0
    orthanc = Orthanc(tmp_path / "orthanc").start()
    try:
        gateway = await start_gateway(nursery, dicom_vip([("orthanc", orthanc.dicom_port,
                                                           "ORTHANC")]))
        files = sorted(str(path) for path in (tmp_path / "study").iterdir())
        result = await storescu(vip_port(gateway, "pacs"), files, "ARCHIVE", "CT01")
        assert result.clean, result.stderr
        studies = orthanc.get("/studies?expand")
        assert len(studies) == 1 and len(studies[0]["Series"]) == 1
        assert orthanc.instance_count() == 5
        series = orthanc.get(f"/series/{studies[0]['Series'][0]}")
        assert series["MainDicomTags"]["Modality"] == "CT"
    finally:
        orthanc.stop()


async def test_an_iti41_from_the_command_line_is_stored_and_found(
        nursery, xds_registry, xds_repository, tmp_path):
    registry = xds_registry()
    repository = xds_repository(registry_url=f"{registry.url}registry")
    gateway = await start_gateway(nursery, xds_vip([registry.port], [repository.port]))
    base = f"http://127.0.0.1:{vip_port(gateway, 'xds')}"
    report = tmp_path / "report.pdf"
    report.write_bytes(b"%PDF-1.4\r\n" + bytes(range(256)) * 400 + b"\r\n")
    provided = await trio.run_process(
        [*GATEWAY, "simulate", "xds-consumer", base, "--provide", str(report), "--patient", PATIENT],
        capture_stdout=True, capture_stderr=True, check=False)
    out = provided.stdout.decode().splitlines()
    assert provided.returncode == 0, provided.stderr.decode()
    assert out[0].startswith("ITI-41 Success: report.pdf as document 2.25.")
    assert out[1:] == ["ITI-18 Success: 1 document(s)", f"  {registry.entries[0].entry_uuid}"]
    unique_id = out[0].rsplit(" ", 1)[1]
    stored = repository.documents[unique_id]
    assert stored.mime_type == "application/pdf"
    assert stored.sha256 == hashlib.sha256(report.read_bytes()).hexdigest()
    assert registry.entries[0].unique_id == unique_id and registry.entries[0].patient_id == PATIENT
    usage = await trio.run_process([*GATEWAY, "simulate", "xds-consumer", base, "--provide",
                                    str(report), "--retrieve", "1.2.3", "--repository", "1.2"],
                                   capture_stderr=True, check=False)
    assert usage.returncode == 3 and b"--provide needs --patient" in usage.stderr
    missing = await trio.run_process([*GATEWAY, "simulate", "xds-consumer", base, "--provide",
                                      str(tmp_path / "absent.pdf"), "--patient", PATIENT],
                                     capture_stderr=True, check=False)
    assert missing.returncode == 1 and b"absent.pdf: No such file or directory" in missing.stderr
