"""A small study to send: `gateway simulate study DIR`. Each image is a whole IOD of its modality
(CT Image, MR Image or Secondary Capture, PS3.3 A.3, A.4, A.8) that dciodvfy finds no error in,
with a synthetic patient, so a first store through a new VIP needs no real images."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

SIDE = 64  # pixels per row and column: 8 KiB an image


@dataclass(frozen=True)
class Kind:
    sop_class: str
    bits: int  # BitsAllocated; CT and MR images are 16 bits (PS3.3 C.8.2.1, C.8.3.1)


KINDS = {
    "CT": Kind("1.2.840.10008.5.1.4.1.1.2", 16),
    "MR": Kind("1.2.840.10008.5.1.4.1.1.4", 16),
    "OT": Kind("1.2.840.10008.5.1.4.1.1.7", 8),  # Secondary Capture
}


def make_study(images: int, modality: str = "CT", patient_id: str = "MEDGATE-STUDY-1",
               now: datetime.datetime | None = None) -> list[Dataset]:
    """`images` instances of one series of one new study."""
    kind = KINDS[modality]
    now = now or datetime.datetime.now()
    study = _study(modality, patient_id, now)
    series_uid, frame_uid = generate_uid(), generate_uid()
    return [_image(kind, modality, study, series_uid, frame_uid, number)
            for number in range(1, images + 1)]


def write_study(folder: Path, images: int, modality: str = "CT") -> list[Path]:
    """Write a new study into `folder` (made if needed) as IMG0001.dcm, ...; the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, dataset in enumerate(make_study(images, modality), 1):
        path = folder / f"IMG{number:04d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _study(modality: str, patient_id: str, now: datetime.datetime) -> Dataset:
    """What every image of the study shares: patient, study and equipment."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "SIMULATED^STUDY"
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = now.strftime("SIM%y%m%d%H%M%S")
    ds.StudyDescription = f"medgate simulated {modality} study"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.BodyPartExamined = "HEAD"
    ds.Manufacturer = "medgate"
    ds.InstitutionName = "medgate simulated hospital"
    return ds


def _image(kind: Kind, modality: str, study: Dataset, series_uid: str, frame_uid: str,
           number: int) -> Dataset:
    ds = Dataset()
    ds.update(study)
    ds.SOPClassUID = kind.sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = number
    ds.PatientOrientation = ""
    _pixels(ds, kind, number)
    if modality == "OT":
        ds.ConversionType = "WSD"  # workstation (PS3.3 C.8.6.1)
    else:
        _cross_section(ds, frame_uid, number)
        (_ct if modality == "CT" else _mr)(ds)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return ds


def _pixels(ds: Dataset, kind: Kind, number: int) -> None:
    """A gradient that moves from image to image, so a viewer shows the series as distinct."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = SIDE
    ds.BitsAllocated = kind.bits
    ds.BitsStored = 12 if kind.bits == 16 else 8
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    top = (1 << ds.BitsStored) - 1
    values = [((row + column + 4 * number) * top // (2 * SIDE + 4 * number)) & top
              for row in range(SIDE) for column in range(SIDE)]
    width = kind.bits // 8
    ds.PixelData = b"".join(value.to_bytes(width, "little") for value in values)


def _cross_section(ds: Dataset, frame_uid: str, number: int) -> None:
    """Frame of reference and image plane: axial slices 5 mm apart (PS3.3 C.7.4.1, C.7.6.2)."""
    ds.PatientPosition = "HFS"  # head first, supine: type 2C for CT and MR
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-160, -160, -5.0 * number]
    ds.SliceLocation = -5.0 * number
    ds.PixelSpacing = [5, 5]
    ds.SliceThickness = 5
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.AcquisitionNumber = 1


def _ct(ds: Dataset) -> None:
    """CT Image module (PS3.3 C.8.2.1)."""
    ds.KVP = 120
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"


def _mr(ds: Dataset) -> None:
    """MR Image module (PS3.3 C.8.3.1): a spin-echo sequence."""
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "NONE"
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.RepetitionTime = 500
    ds.EchoTime = 20
    ds.EchoTrainLength = 1
    ds.MagneticFieldStrength = 1.5
