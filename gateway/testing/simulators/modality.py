"""A simulated modality: a pynetdicom C-STORE SCU that reports what happened to each instance."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE

log = logging.getLogger("medgate.simulate.modality")

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@dataclass(frozen=True)
class StoreResult:
    """One instance: stored (status 0x0000), refused (other status) or not confirmed (error)."""

    sop_instance_uid: str
    status: int | None
    error: str = ""

    @property
    def stored(self) -> bool:
        return self.status == 0x0000


def make_instances(count: int, pixel_bytes: int = 64, patient_id: str = "MEDGATE-SIM-1",
                   study_uid: str | None = None) -> list[Dataset]:
    """`count` small Secondary Capture instances of one study, each with its own SOP Instance UID."""
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    side = max(1, int(pixel_bytes ** 0.5))
    instances = []
    for number in range(1, count + 1):
        ds = Dataset()
        ds.SOPClassUID = SECONDARY_CAPTURE
        ds.SOPInstanceUID = generate_uid()
        ds.Modality = "OT"
        ds.PatientName = "SIMULATED^PATIENT"
        ds.PatientID = patient_id
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = number
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = side
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = bytes(number % 256 for _ in range(side * side))
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        instances.append(ds)
    return instances


def load_instances(paths: list[Path]) -> list[Dataset]:
    return [dcmread(path) for path in paths]


def send(host: str, port: int, datasets: list[Dataset], called_ae: str = "ANY-SCP",
         calling_ae: str = "MODALITY", timeout: float = 30) -> list[StoreResult]:
    """C-STORE every dataset in one association; blocking (call via trio.to_thread in trio code)."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate(host, port, ae_title=called_ae)
    results: list[StoreResult] = []
    if not assoc.is_established:
        why = "association rejected" if assoc.is_rejected else (
            "association aborted" if assoc.is_aborted else "association not established")
        return [StoreResult(str(ds.SOPInstanceUID), None, why) for ds in datasets]
    try:
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            if not assoc.is_established:
                results.append(StoreResult(uid, None, "association aborted before this store"))
                continue
            status = assoc.send_c_store(ds)
            if status and "Status" in status:
                results.append(StoreResult(uid, int(status.Status)))
            else:
                results.append(StoreResult(uid, None, "no C-STORE response (aborted or timed out)"))
    finally:
        if assoc.is_established:
            assoc.release()
    return results
