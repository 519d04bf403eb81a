"""Privacy by default: what the gateway keeps or sends names no patient and no instance in clear.
Receipts keep keyed hashes of SOP Instance UIDs (found again by `gateway trace` with the key),
table persistence keeps and pushes keyed hashes of PID-3 and calling AE titles, the audit log
holds identifiers (MSH-10, AE titles) and never a patient's."""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import sys

import pytest
import trio

from gateway.config import ConfigError, parse_config
from gateway.privacy import PREFIX, KeyedHash, is_hashed
from gateway.records.affinity import AffinityStore
from gateway.records.receipts import Receipts, trace
from gateway.service.peers import config_digests, drift
from gateway.testing.simulators.hl7_messages import make_messages
from tests.helpers import start_gateway, vip_port
from tests.helpers.dicom_peers import storescu, write_instances
from tests.helpers.hl7_senders import send_until_acked
from tests.test_balancer import make_pool
from tests.test_config import MINIMAL
from tests.test_dicom_depth import TCP_CHECK
from tests.test_dicom_vip import dicom_vip

KEY = b"k" * 64


def test_the_keyed_hash_needs_the_key():
    hasher, other = KeyedHash(KEY), KeyedHash(b"o" * 64)
    assert hasher("PAT1") == hasher("PAT1") and hasher("PAT1").startswith(PREFIX)
    assert hasher("PAT1") != other("PAT1") and hasher("PAT1") != hasher("PAT2")
    assert hasher.fingerprint() != other.fingerprint() and "k" not in hasher.fingerprint()
    assert is_hashed(hasher("x")) and not is_hashed("1.2.3")


def test_hashes_kept_in_memory_are_those_of_the_key_in_use(tmp_path, monkeypatch):
    hasher = KeyedHash(KEY)
    first = hasher("CT01")
    monkeypatch.setattr("gateway.privacy.RECENT", 2)
    assert [hasher(v) for v in ("CT01", "MR01", "US01", "CT01")] == [
        first, KeyedHash(KEY)("MR01"), KeyedHash(KEY)("US01"), first]  # kept or made again
    (tmp_path / "other.key").write_text("o" * 64)
    hasher.load(str(tmp_path / "other.key"), create=False)
    assert hasher("CT01") == KeyedHash(b"o" * 64)("CT01") != first


def test_a_key_is_made_once_private_and_read_back(tmp_path):
    path = tmp_path / "hash.key"
    made = KeyedHash()
    made.load(str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text().strip()) == 64
    again = KeyedHash()
    again.load(str(path), create=False)
    assert again("1.2.3") == made("1.2.3")
    (tmp_path / "short.key").write_text("too short\n")
    with pytest.raises(ConfigError, match=r"hash_key_file: hash key .*short.key: 9 characters, "
                                          r"at least 32 needed"):
        parse_config(f'[gateway]\nhash_key_file = "{tmp_path / "short.key"}"\n' + MINIMAL)
    with pytest.raises(ConfigError, match=r"hash_key_file: .*'/nowhere' is not a folder"):
        parse_config('[gateway]\nhash_key_file = "/nowhere/hash.key"\n' + MINIMAL)
    assert parse_config(MINIMAL).gateway.receipt_hash_uids  # hashing is the default


def test_a_key_is_made_whole_or_not_at_all_and_an_empty_one_left_by_a_cut_start_is_replaced(
        tmp_path, monkeypatch):
    """The key was written into the file it had just created: a full disk (or a crash) at the
    first start left it empty, and every start after refused ("0 characters, at least 32
    needed") until someone deleted it."""
    from gateway.privacy import HashKeyError

    path = tmp_path / "hash.key"

    def disk_full(descriptor: int) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr("os.fsync", disk_full)
        with pytest.raises(HashKeyError, match="No space left on device"):
            KeyedHash().load(str(path))
    assert list(tmp_path.iterdir()) == []  # neither the key nor its half-made file
    path.write_text("\n")  # what an earlier version's cut start left
    made = KeyedHash()
    made.load(str(path))
    assert len(path.read_text().strip()) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    again = KeyedHash()
    again.load(str(path))  # not made again
    assert again("1.2.3") == made("1.2.3") and list(tmp_path.iterdir()) == [path]


def test_table_persistence_keeps_and_tells_only_hashes():
    hasher = KeyedHash(KEY)
    pool = make_pool([100, 100], persistence_method="table", shared=True, key_hash=hasher)
    chosen = pool.pick("PATIENT-77", now=1.0).name
    assert pool.pick("PATIENT-77", now=2.0).name == chosen
    assert pool.persisted_member("PATIENT-77") == chosen
    assert pool.new_persistence() == [(hasher("PATIENT-77"), chosen)]  # what a peer is sent
    assert [key for key, _, _ in pool.persistence_entries(3.0)] == [hasher("PATIENT-77")]
    # a clear key from an older node or affinity.json is kept hashed
    assert pool.adopt_persistence("PATIENT-88", "m1", 3.0)
    assert pool.persisted_member("PATIENT-88") == "m1"
    assert all(is_hashed(key) for key, _, _ in pool.persistence_entries(4.0))


def test_nodes_with_different_keys_are_named_by_the_drift_check():
    config = parse_config(MINIMAL)
    ours = config_digests(config, KeyedHash(KEY))
    assert drift(ours, config_digests(config, KeyedHash(KEY))) == []
    assert drift(ours, config_digests(config, KeyedHash(b"o" * 64))) == [
        "the hash key differs: give both nodes the same hash_key_file (the peer's persistence "
        "entries do not match this node's)"]
    assert drift(ours, config_digests(config)) == []  # an older peer that sends no fingerprint


def test_clear_receipts_are_hashed_at_start_and_every_form_is_found(tmp_path):
    """0.2 kept UIDs in clear (or, with receipt_hash_uids, as plain SHA-256): clear rows are
    hashed at the first start with a key, SHA-256 rows stay, and trace finds all three."""
    old = Receipts(str(tmp_path))
    old.open()
    old.add("dicom", "CT1", "10.0.0.1:1", "pacs1", "1.2.840.10008.5.1.4.1.1.7", "1.2.3.1", 0)
    old._write(old.pending)
    sha = f"sha256:{hashlib.sha256(b'1.2.3.2').hexdigest()}"
    with sqlite3.connect(tmp_path / "receipts.sqlite") as db:
        db.execute("insert into receipt values ('2026-12-01T00:00:00.000+00:00', 'dicom', "
                   "'CT1', '-', 'pacs1', '-', ?, 0)", (sha,))
    old.close()
    hasher = KeyedHash(KEY)
    new = Receipts(str(tmp_path), hasher=hasher)
    new.open()
    new.close()
    with sqlite3.connect(tmp_path / "receipts.sqlite") as db:
        kept = sorted(row[0] for row in db.execute("select sop_instance from receipt"))
    assert kept == sorted([hasher("1.2.3.1"), sha])
    for uid in ("1.2.3.1", "1.2.3.2"):
        assert [r.member for r in trace(str(tmp_path), sop_instance=uid, hasher=hasher)] == [
            "pacs1"], uid


async def test_receipts_keep_keyed_hashes_that_gateway_trace_finds(nursery, pacs, tmp_path):
    archive = pacs("PACS1")
    state = tmp_path / "state"
    config = dicom_vip([("pacs1", archive.port, "PACS1")], health=TCP_CHECK).replace(
        "[[vip]]", f'[gateway]\nadmin = ""\nstate_dir = "{state}"\n\n[[vip]]', 1)
    (tmp_path / "site.toml").write_text(config)
    gateway = await start_gateway(nursery, config)
    files = write_instances(tmp_path / "files", 3)
    assert (await storescu(vip_port(gateway, "pacs"), sorted(files), "VIP", "CT1")).clean
    await gateway.receipts.flush()
    assert stat.S_IMODE((state / "hash.key").stat().st_mode) == 0o600
    with sqlite3.connect(state / "receipts.sqlite") as db:
        kept = [row[0] for row in db.execute("select sop_instance from receipt")]
    assert len(kept) == 3 and all(is_hashed(value) for value in kept)
    everything = b"".join(path.read_bytes() for path in state.iterdir() if path.is_file())
    assert not any(uid.encode() in everything for uid in files.values())
    uid = next(iter(files.values()))
    with trio.fail_after(30):
        found = await trio.run_process([sys.executable, "-m", "gateway", "trace", "-c",
                                        str(tmp_path / "site.toml"), uid, "--json"],
                                       capture_stdout=True)
    receipt = json.loads(found.stdout)
    assert (receipt["sop_instance"], receipt["member"], receipt["status"]) == (uid, "pacs1", 0)


async def test_receipts_keep_clear_uids_when_told_to(nursery, pacs, tmp_path):
    archive = pacs("PACS1")
    config = dicom_vip([("pacs1", archive.port, "PACS1")], health=TCP_CHECK).replace(
        "[[vip]]", f'[gateway]\nadmin = ""\nstate_dir = "{tmp_path}"\nreceipt_hash_uids = false'
                   '\n\n[[vip]]', 1)
    gateway = await start_gateway(nursery, config)
    files = write_instances(tmp_path / "files", 2)
    assert (await storescu(vip_port(gateway, "pacs"), sorted(files), "VIP", "CT1")).clean
    await gateway.receipts.flush()
    with sqlite3.connect(tmp_path / "receipts.sqlite") as db:
        kept = {row[0] for row in db.execute("select sop_instance from receipt")}
    assert kept == set(files.values())


async def test_no_patient_id_in_the_audit_log_the_affinity_file_or_the_logs(
        nursery, hl7_receiver, tmp_path, caplog):
    receivers = [hl7_receiver("RIS1", parse=False), hl7_receiver("RIS2", parse=False)]
    audit = tmp_path / "audit.jsonl"
    config = (f'[gateway]\nadmin = ""\naudit = "{audit}"\nstate_dir = "{tmp_path / "state"}"\n'
              '[[vip]]\nname = "hl7"\nprotocol = "hl7"\nlisten = "127.0.0.1:0"\n'
              'persistence = { key = "pid-3", method = "table", timeout = "1h" }\n'
              'health = { check = "tcp", interval = "1h" }\n' + "".join(
                  f'[[vip.member]]\nname = "ris{n}"\naddress = "127.0.0.1:{r.port}"\n'
                  for n, r in enumerate(receivers, 1)))
    gateway = await start_gateway(nursery, config)
    messages = make_messages(6, patients=3, prefix="PRIV")  # PID-3: PRIVPAT00001..3
    sent = await send_until_acked(vip_port(gateway, "hl7"), messages)
    assert len(sent.acked) == 6
    store = AffinityStore(str(tmp_path / "state"))
    store.write(store.snapshot(gateway.balancer, trio.current_time()))
    kept = (tmp_path / "state" / "affinity.json").read_text()
    assert len(json.loads(kept)["vips"]["hl7"]["persistence"]) == 3
    records = audit.read_text()
    assert records.count('"control_id":"PRIV0000') == 6  # MSH-10 is kept: operators need it
    for text in (kept, records, caplog.text):
        assert "PRIVPAT" not in text
    assert os.path.getsize(audit) > 0
