"""Test your own site's failover with medgate's pytest fixtures: copy this file and adapt it.

Run it with `python3 -m pytest examples/test_my_site.py` once medgate is installed: the fixtures
(`gateway`, `pacs`, `modality`, `hl7_receiver`, `hl7_sender`, `xds_registry`, `xds_repository`)
come with it. Replace the simulated members by your test systems' addresses to test those.
"""

from __future__ import annotations


def archive_vip(primary, backup) -> dict:
    """Our archive: PACS1 first, PACS2 only while PACS1 is unavailable (mode failover); the
    way back to PACS1 is an operator's decision (failback = "manual")."""
    return {"vip": [{
        "name": "archive", "protocol": "dicom", "listen": "127.0.0.1:0", "mode": "failover",
        "assoc_timeout": "2s", "failback": "manual",
        "health": {"check": "dicom-echo", "interval": "300ms", "timeout": "1s",
                   "rise": 2, "fall": 2},
        "member": [
            {"name": "pacs1", "address": f"127.0.0.1:{primary.port}", "ae_title": "PACS1"},
            {"name": "pacs2", "address": f"127.0.0.1:{backup.port}", "ae_title": "PACS2"},
        ],
    }]}


def test_images_go_to_the_backup_pacs_while_the_primary_is_down(pacs, modality, gateway):
    primary, backup = pacs("PACS1"), pacs("PACS2")
    site = gateway(archive_vip(primary, backup))
    port = site.port("archive")
    # The members take clients once their checks say so: on a busy machine a first C-ECHO can
    # miss its 1 s timeout, and a modality sending then would be refused (and retry)
    site.wait_for("archive", "pacs1", "up")

    first = modality.send("127.0.0.1", port, count=5, called_ae="ARCHIVE")
    assert all(result.stored for result in first)
    assert primary.stored_count() == 5 and backup.stored_count() == 0

    primary.stop()  # the primary crashes
    # Until its checks mark it down, the modality's associations are refused (transient: it
    # keeps its images and retries): one failed association never splits a study.
    site.wait_for("archive", "pacs1", "down")
    during = modality.send("127.0.0.1", port, count=5, called_ae="ARCHIVE")
    assert all(result.stored for result in during)
    assert backup.stored_count() == 5

    primary.restart()  # back on the same port
    site.wait_for("archive", "pacs1", "up")
    after = modality.send("127.0.0.1", port, count=5, called_ae="ARCHIVE")
    assert all(result.stored for result in after)
    assert backup.stored_count() == 10  # until failback, the backup keeps taking the studies
    assert site.fail_back("archive") == "pacs1"  # as `gateway ctl failback archive`
    # A modality in the middle of its study stays where it is (study_window); a new one goes
    # to the primary.
    assert all(r.stored for r in modality.send("127.0.0.1", port, count=2, called_ae="ARCHIVE"))
    assert backup.stored_count() == 12
    assert all(r.stored for r in modality.send("127.0.0.1", port, count=2, called_ae="ARCHIVE",
                                               calling_ae="CT02"))
    assert primary.stored_count() == 7


def test_a_frozen_pacs_is_skipped(pacs, modality, gateway):
    primary, backup = pacs("PACS1"), pacs("PACS2")
    site = gateway(archive_vip(primary, backup))
    site.wait_for("archive", "pacs2", "up")
    primary.set_hang(True)  # takes TCP connections, never answers
    results = modality.send("127.0.0.1", site.port("archive"), count=3, called_ae="ARCHIVE")
    assert all(result.stored for result in results) and backup.stored_count() == 3
    primary.set_hang(False)


def test_hl7_sender_keeps_its_messages_when_every_ris_is_down(hl7_receiver, hl7_sender, gateway):
    ris = hl7_receiver("RIS1")
    site = gateway(f"""
[[vip]]
name = "adt"
protocol = "hl7"
listen = "127.0.0.1:0"
persistence = {{ key = "pid-3" }}
health = {{ check = "hl7-ack", interval = "300ms", timeout = "1s", rise = 1, fall = 1 }}
[[vip.member]]
name = "ris1"
address = "127.0.0.1:{ris.port}"
""")
    site.wait_for("adt", "ris1", "up")
    assert [r.code for r in hl7_sender.send("127.0.0.1", site.port("adt"), count=3)] == ["AA"] * 3
    ris.stop()
    site.wait_for("adt", "ris1", "down")
    refused = hl7_sender.send("127.0.0.1", site.port("adt"), count=2)
    assert [r.code for r in refused] == ["AR", "AR"]  # a NAK from the gateway: resend later
    assert all(b"MSA|AR|" in r.ack and b"medgate" in r.ack for r in refused)
    ris.restart()
    site.wait_for("adt", "ris1", "up")
    resent = hl7_sender.send("127.0.0.1", site.port("adt"), count=2)
    assert [r.code for r in resent] == ["AA", "AA"]
