"""The periodic INFO summary per VIP that stands in for the per-unit lines (now DEBUG)."""

from __future__ import annotations

from gateway.balancer import MemberSpec, Pool
from gateway.records.summary import TrafficSummary


def serve(pool: Pool, name: str, count: int, size: int = 10) -> None:
    member = pool.member(name)
    for _ in range(count):
        pool.take_conn(member)
        pool.report_success(member)
        pool.drop_conn(member, size, 2 * size)


def test_each_interval_counts_only_what_it_saw_and_quiet_vips_say_nothing():
    hl7 = Pool.from_specs("hl7", [MemberSpec("ris1"), MemberSpec("ris2")])
    dicom = Pool.from_specs("dicom", [MemberSpec("pacs1")])
    summary = TrafficSummary()
    serve(hl7, "ris1", 3)
    serve(hl7, "ris2", 2)
    hl7.count_retried()
    for _ in range(4):
        hl7.count_refused()
    assert summary.lines([(hl7, "hl7"), (dicom, "dicom")], 60) == [
        "vip=hl7 last 60s: 5 messages (ris1 3, ris2 2), 1 retried, 4 refused by the gateway, "
        "bytes_in=50 bytes_out=100"]
    serve(dicom, "pacs1", 1, size=1000)
    assert summary.lines([(hl7, "hl7"), (dicom, "dicom")], 59.96) == [
        "vip=dicom last 60s: 1 associations (pacs1 1), 0 retried, 0 refused by the gateway, "
        "bytes_in=1000 bytes_out=2000"]
    assert summary.lines([(hl7, "hl7"), (dicom, "dicom")], 60) == []
