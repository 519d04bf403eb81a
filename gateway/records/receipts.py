"""Delivery receipts: per C-STORE through a DICOM VIP, the SOP Instance UID, the member, the
status the modality was sent, and when, in a bounded SQLite file in `[gateway] state_dir`, so
`gateway trace` can answer "did it arrive, where, with what status" (the Study Instance UID is in
the data set, which the gateway never reads: trace by instance or by calling AE).

Each receipt is first one line appended to `receipts.journal` (one write(2), before the
C-STORE response reaches the modality: it survives kill -9, as the audit log does); `run` then
writes them to SQLite in batches (sqlite3 is blocking I/O: it runs in a worker thread). A batch
moves the journal aside first (`receipts.journal.flushing`; a worker process's are
`receipts.journal.wN-PID`: one per process, since a worker of the same number from before a
reload may still be draining), so a crash during the batch leaves its lines there; `open`
takes back whatever journal a crash left, and the leader a worker's once it has exited (rows
already in SQLite are not added twice). A batch that cannot be written (the database locked,
the disk full) is kept for the next, in memory and aside (the next batch's lines are added to
it there). At most MAX_PENDING wait in memory; rows older than `receipt_days` are deleted as
it goes.

By default each UID is kept as its keyed hash (gateway.privacy; `receipt_hash_uids = false` keeps
it clear). Rows an earlier version wrote in clear are hashed at start; rows of 0.2's plain
SHA-256 option cannot be, and stay as they are: `trace` looks a UID up in all three forms.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import os
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import trio

from gateway.privacy import PREFIX, KeyedHash
from gateway.records import unreadable_name
from protocols.commitment import CommitmentResult

log = logging.getLogger("medgate.receipts")

FILE_NAME = "receipts.sqlite"
JOURNAL = "receipts.journal"
FLUSHING = JOURNAL + ".flushing"  # the journal of a batch being written
FLUSH_EVERY = 1.0  # seconds between batches
MAX_PENDING = 100_000  # receipts waiting for the next batch; past it they are counted, dropped
_SCHEMA = """
create table if not exists receipt (
    at text not null, vip text not null, calling_ae text not null, client text not null,
    member text not null, sop_class text not null, sop_instance text not null,
    status integer not null);
create index if not exists receipt_instance on receipt (sop_instance);
create index if not exists receipt_calling on receipt (calling_ae, at);
create table if not exists commitment (
    at text not null, vip text not null, member text not null, transaction_uid text not null,
    sop_class text not null, sop_instance text not null, failure_reason integer);
create index if not exists commitment_instance on commitment (sop_instance);
"""


@dataclass(frozen=True)
class Receipt:
    at: str
    vip: str
    calling_ae: str
    client: str
    member: str
    sop_class: str
    sop_instance: str  # its keyed hash, with hashing on (0.2 wrote clear or "sha256:<hex>")
    status: int


@dataclass(frozen=True)
class Commitment:
    """One instance of a storage commitment result the return path relayed: committed by
    `member` (failure_reason None), or not, and why (PS3.4 J.3.3.1.1)."""

    at: str
    vip: str
    member: str
    transaction_uid: str
    sop_class: str
    sop_instance: str  # kept as the receipts keep it
    failure_reason: int | None


def instance_keys(uid: str, hasher: KeyedHash | None) -> list[str]:
    """Every form a row may hold `uid` in: its keyed hash (with the key), 0.2's plain SHA-256,
    and as it is."""
    keys = [hasher(uid)] if hasher is not None else []
    return keys + [f"sha256:{hashlib.sha256(uid.encode()).hexdigest()}", uid]


def _instance_in(keys: list[str]) -> str:
    """The SQL condition a row meets when it holds one of `keys` (their values bound after)."""
    return f"sop_instance in ({', '.join('?' * len(keys))})"


class Receipts:
    """Collects receipts and writes them to `folder/receipts.sqlite` (see the module)."""

    def __init__(self, folder: str, days: float = 30.0, hasher: KeyedHash | None = None,
                 journal: str = JOURNAL) -> None:
        """`journal`: its file name; each worker process has its own (worker_journal), since
        a batch moves the journal aside under its writer only."""
        self.path = Path(folder) / FILE_NAME
        self.journal_path = Path(folder) / journal
        self.flushing_path = Path(folder) / _aside(journal)
        self.days = days
        self.hasher = hasher  # None: UIDs kept as they are
        self.pending: list[Receipt | Commitment] = []
        self.dropped = 0
        self.written = 0
        self.journal_errors = 0
        self.write_errors = 0  # batches in a row that could not be written (kept, retried)
        self._journal: int | None = None
        self._writing = trio.Lock()
        self._added = trio.Event()  # set (and replaced) when a receipt is pending

    def add(self, vip: str, calling_ae: str, client: str, member: str, sop_class: str,
            sop_instance: str, status: int) -> None:
        receipt = Receipt(_now(), vip, calling_ae, client, member, sop_class,
                          self._kept(sop_instance), status)
        self._pend(receipt, json.dumps(dataclasses.astuple(receipt)))

    def add_commitment(self, vip: str, member: str, result: CommitmentResult) -> None:
        """Each instance a storage commitment result names, committed or failed."""
        at = _now()
        for reference in result.committed:
            self._commitment(Commitment(at, vip, member, result.transaction_uid,
                                        reference.sop_class,
                                        self._kept(reference.sop_instance), None))
        for failure in result.failed:
            self._commitment(Commitment(at, vip, member, result.transaction_uid,
                                        failure.sop_class, self._kept(failure.sop_instance),
                                        failure.reason if failure.reason is not None else 0))

    def _commitment(self, commitment: Commitment) -> None:
        self._pend(commitment, json.dumps({"commitment": dataclasses.astuple(commitment)}))

    def _kept(self, uid: str) -> str:
        return self.hasher(uid) if self.hasher else uid

    def _pend(self, record: Receipt | Commitment, line: str) -> None:
        if len(self.pending) >= MAX_PENDING:
            if not self.dropped:
                log.error("receipts: %d waiting to be written; further ones are dropped "
                          "(is %s on a full or slow disk?)", MAX_PENDING, self.path)
            self.dropped += 1
            return
        self.pending.append(record)
        self._added.set()
        if self._journal is not None:
            try:
                os.write(self._journal, (line + "\n").encode())
                if self.journal_errors:
                    log.warning("receipts: %s writable again after %d failed write(s)",
                                self.journal_path, self.journal_errors)
                    self.journal_errors = 0
            except OSError as exc:  # the batch still writes it; a crash before would lose it
                if not self.journal_errors:
                    log.error("receipts: cannot write %s: %s", self.journal_path,
                              exc.strerror or exc)
                self.journal_errors += 1

    def open(self) -> None:
        """Create the file and its table, take back a journal a crash left, and open a new
        journal; OSError/sqlite3.Error say why not. A file that is not a database (damaged)
        is kept aside and a new one started: receipts are not worth an outage."""
        try:
            self._create()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):  # locked, cannot open: not damage
                raise
            kept = unreadable_name(self.path)
            for suffix in ("", "-journal", "-wal", "-shm"):
                damaged = Path(f"{self.path}{suffix}")
                if damaged.exists():
                    os.replace(damaged, f"{kept}{suffix}")
            log.error("receipts: %s cannot be read (%s): kept as %s, and a new one started "
                      "(gateway trace finds the receipts from now on and those of the journal)",
                      self.path, exc, kept.name)
            self._create()
        journals = [self.flushing_path, self.journal_path]
        if self.journal_path.name == JOURNAL:  # the gateway's start: no worker runs yet
            journals += sorted(self.journal_path.parent.glob(JOURNAL + ".w*"))  # theirs too
        taken = self._take_back(journals)
        if taken:
            log.info("receipts: %d receipt(s) taken back from the journal of an earlier run",
                     taken)
        if self.hasher is not None:
            self._hash_clear_rows(self.hasher)
        self._open_journal()

    def take_back(self, journal: str) -> int:
        """The receipts of a worker process that has exited, from its journal (`journal`,
        and what a batch had moved aside): a crash's, or none after a clean exit. Blocking
        (SQLite): run it in a thread. How many were taken; 0 and logged if they could not be
        (they stay for the next start)."""
        try:
            return self._take_back([self.path.with_name(journal),
                                    self.path.with_name(_aside(journal))])
        except (OSError, sqlite3.Error) as exc:
            log.error("receipts: cannot take back %s (%s): the next start does", journal, exc)
            return 0

    def _take_back(self, journals: list[Path]) -> int:
        """The receipts of `journals` into SQLite (those not there yet), then the files gone."""
        left = [receipt for path in journals for receipt in _read_journal(path)]
        if left:
            self._write(left, only_new=True)
        for path in journals:
            path.unlink(missing_ok=True)
        return len(left)

    def _create(self) -> None:
        with sqlite3.connect(self.path) as db:
            db.executescript(_SCHEMA)

    def _hash_clear_rows(self, hasher: KeyedHash) -> None:
        """Hash the UIDs an earlier version (or `receipt_hash_uids = false`) kept in clear."""
        with sqlite3.connect(self.path, timeout=10) as db:
            db.create_function("keyed_hash", 1, hasher, deterministic=True)
            changed = db.execute(
                "update receipt set sop_instance = keyed_hash(sop_instance) where "
                f"sop_instance not like '{PREFIX}%' and sop_instance not like 'sha256:%'").rowcount
        if changed:
            log.info("receipts: %d SOP Instance UID(s) kept in clear are now kept as keyed "
                     "hashes", changed)

    def _open_journal(self) -> None:
        self._journal = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)

    def close(self) -> None:
        if self._journal is not None:
            os.close(self._journal)
            self._journal = None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Write batches until cancelled, FLUSH_EVERY after the first receipt of each (an
        idle gateway does not wake for them); what is pending is written at the end too."""
        task_status.started()
        try:
            while True:
                await self._added.wait()
                await trio.sleep(FLUSH_EVERY)
                self._added = trio.Event()  # before the batch is taken: later ones wake it
                await self.flush()
        finally:
            with trio.CancelScope(shield=True):
                await self.flush()

    async def flush(self) -> None:
        """Write what is pending; on return, every receipt added before the call is in SQLite,
        or, if it could not be written (logged), kept for the next batch, in memory and in
        the journal aside (a flush already under way, which holds earlier ones, is waited for
        first)."""
        async with self._writing:
            batch, self.pending = self.pending, []
            if not batch:
                return
            journal = self._journal
            journaled = journal is not None
            if journal is not None:  # the batch's lines aside, new ones to a new journal
                try:
                    os.close(journal)
                    self._set_aside()
                finally:
                    self._open_journal()
            try:
                await trio.to_thread.run_sync(self._write, batch)
                self.written += len(batch)
            except (OSError, sqlite3.Error) as exc:
                # Kept for the next batch, FLUSH_EVERY later: a database locked or a disk full
                # for a while loses no receipt (past MAX_PENDING in all, new ones are dropped)
                self.pending[:0] = batch
                self._added.set()
                if not self.write_errors:
                    log.error("receipts: cannot write %s (%s): %d receipt(s) kept, tried again "
                              "every %gs", self.path, exc, len(self.pending), FLUSH_EVERY)
                self.write_errors += 1
                return
            if self.write_errors:
                log.warning("receipts: %s written again after %d failed batch(es), with the "
                            "%d receipt(s) kept", self.path, self.write_errors, len(batch))
                self.write_errors = 0
            if journaled:
                self.flushing_path.unlink(missing_ok=True)

    def _set_aside(self) -> None:
        """The journal's lines to the aside file: moved there, or added to what a batch not
        yet written left there. If they cannot be added (a full disk), they stay where they
        are: a start takes back both files, and a row already in SQLite is not added twice."""
        if not self.flushing_path.exists():
            os.replace(self.journal_path, self.flushing_path)
            return
        try:
            with open(self.journal_path, "rb") as lines, open(self.flushing_path, "ab") as aside:
                aside.write(b"\n")  # after a line an earlier copy may have cut (a blank one
                shutil.copyfileobj(lines, aside)  # is left out when the file is read)
        except OSError:
            return
        self.journal_path.unlink()

    def _write(self, batch: list[Receipt | Commitment], only_new: bool = False) -> None:
        """Insert `batch` (`only_new`: leaving out rows already there, for a journal taken
        back after a crash) and delete the rows older than receipt_days."""
        oldest = (datetime.datetime.now(datetime.timezone.utc)
                  - datetime.timedelta(days=self.days)).isoformat(timespec="milliseconds")
        receipts = [dataclasses.astuple(r) for r in batch if isinstance(r, Receipt)]
        commitments = [dataclasses.astuple(r) for r in batch if isinstance(r, Commitment)]
        with sqlite3.connect(self.path, timeout=10) as db:
            if only_new:  # (a line may be in two journals: one copied aside in part)
                receipts, commitments = list(dict.fromkeys(receipts)), list(
                    dict.fromkeys(commitments))
                receipts = [row for row in receipts if not db.execute(
                    "select 1 from receipt where at = ? and sop_instance = ? and member = ? "
                    "and status = ?", (row[0], row[6], row[4], row[7])).fetchone()]
                commitments = [row for row in commitments if not db.execute(
                    "select 1 from commitment where at = ? and sop_instance = ? and member = ?",
                    (row[0], row[5], row[2])).fetchone()]
            db.executemany("insert into receipt values (?, ?, ?, ?, ?, ?, ?, ?)", receipts)
            db.executemany("insert into commitment values (?, ?, ?, ?, ?, ?, ?)", commitments)
            db.execute("delete from receipt where at < ?", (oldest,))
            db.execute("delete from commitment where at < ?", (oldest,))


def _aside(journal: str) -> str:
    """The name of `journal`'s lines set aside during a batch."""
    return journal + FLUSHING.removeprefix(JOURNAL)


def worker_journal(number: int, pid: int) -> str:
    """The journal's file name of worker `number` in process `pid`."""
    return f"{JOURNAL}.w{number}-{pid}"


def _read_journal(path: Path) -> list[Receipt | Commitment]:
    """The records of a journal file; a line cut off by a crash is left out."""
    if not path.exists():
        return []
    records: list[Receipt | Commitment] = []
    with open(path, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            try:
                value = json.loads(line)
                records.append(Commitment(*value["commitment"]) if isinstance(value, dict)
                               else Receipt(*value))
            except (ValueError, TypeError, KeyError):
                continue
    return records


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def trace(folder: str, *, sop_instance: str = "", calling_ae: str = "", since: str = "",
          hasher: KeyedHash | None = None, limit: int = 1000) -> list[Receipt]:
    """Receipts for an instance UID (in any form it may be kept in) or a calling AE (since an
    ISO time), oldest first."""
    path = Path(folder) / FILE_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: no receipts yet (is [gateway] state_dir right?)")
    where, values = ["at >= ?"], [since or ""]
    if sop_instance:
        keys = instance_keys(sop_instance, hasher)
        where.append(_instance_in(keys))
        values += keys
    if calling_ae:
        where.append("calling_ae = ?")
        values.append(calling_ae)
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
        rows = db.execute(f"select * from receipt where {' and '.join(where)} "
                          "order by at limit ?", (*values, limit)).fetchall()
    return [Receipt(*row) for row in rows]


def commitments(folder: str, sop_instance: str, hasher: KeyedHash | None = None,
                since: str = "") -> list[Commitment]:
    """What storage commitment results said of an instance UID, oldest first."""
    path = Path(folder) / FILE_NAME
    keys = instance_keys(sop_instance, hasher)
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10) as db:
        rows = db.execute(f"select * from commitment where at >= ? and {_instance_in(keys)} "
                          "order by at", (since, *keys)).fetchall()
    return [Commitment(*row) for row in rows]


__all__ = ["Commitment", "Receipt", "Receipts", "commitments", "instance_keys", "trace"]
