"""The storage commitment result reader: what pydicom writes (implicit and explicit VR, defined
and undefined lengths) is read back exactly; any other bytes give DataSetError, never a crash."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from protocols import commitment

uids = st.lists(st.integers(1, 10**12), max_size=12).map(
    lambda numbers: [f"1.2.826.0.1.{n}" for n in numbers])


def result_bytes(committed: list[str], failed: list[tuple[str, int]], implicit: bool,
                 undefined: bool) -> bytes:
    ds = Dataset()
    ds.TransactionUID = "1.2.3.4.5"
    ds.RetrieveAETitle = "ARCHIVE"  # an element the reader skips
    ds.ReferencedSOPSequence = Sequence()
    for uid in committed:
        item = Dataset()
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", uid
        ds.ReferencedSOPSequence.append(item)
    if failed:
        ds.FailedSOPSequence = Sequence()
        for uid, reason in failed:
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = "1.2.3", uid
            item.FailureReason = reason
            ds.FailedSOPSequence.append(item)
    for sequence in ("ReferencedSOPSequence", "FailedSOPSequence"):
        if sequence in ds:
            ds[sequence].is_undefined_length = undefined
            for item in ds[sequence].value:
                item.is_undefined_length_sequence_item = undefined
    out = DicomBytesIO()
    out.is_little_endian, out.is_implicit_VR = True, implicit
    write_dataset(out, ds)
    return out.getvalue()


@given(uids, uids, st.booleans(), st.booleans())
def test_what_pydicom_writes_is_read_back(committed, failed, implicit, undefined):
    reasons = [(uid, 0x0110 + n % 3) for n, uid in enumerate(failed)]
    data = result_bytes(committed, reasons, implicit, undefined)
    syntax = commitment.IMPLICIT_LE if implicit else commitment.EXPLICIT_LE
    result = commitment.read_result(data, syntax)
    assert result.transaction_uid == "1.2.3.4.5"
    assert [r.sop_instance for r in result.committed] == committed
    assert [(f.sop_instance, f.reason) for f in result.failed] == reasons


@given(st.binary(max_size=600), st.sampled_from([commitment.IMPLICIT_LE,
                                                 commitment.EXPLICIT_LE, "1.2.840.10008.1.2.2"]))
def test_any_bytes_give_a_result_or_a_data_set_error(data, syntax):
    try:
        commitment.read_result(data, syntax)
    except commitment.DataSetError:
        pass


@given(st.integers(0, 300))
def test_a_cut_result_is_an_error_not_a_crash(cut):
    data = result_bytes(["1.2.3.4"], [("1.2.3.5", 0x0112)], implicit=False, undefined=True)
    try:
        commitment.read_result(data[:cut], commitment.EXPLICIT_LE)
    except commitment.DataSetError:
        pass


def test_nesting_and_item_counts_are_bounded():
    item_start = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"  # an item of undefined length
    sequence = b"\x08\x00\x99\x11\xff\xff\xff\xff"  # (0008,1199) of undefined length, implicit
    deep = (sequence + item_start) * (commitment.MAX_DEPTH + 2)
    try:
        commitment.read_result(deep, commitment.IMPLICIT_LE)
    except commitment.DataSetError as exc:
        assert "nested deeper" in exc.reason
    else:
        raise AssertionError("no error for sequences nested too deep")
