"""Client counts that every worker process of one gateway sees (`[gateway] workers` > 1), so
that the limits are the gateway's, not multiplied by the workers: no worker refuses while its
VIP has room elsewhere, none admits past it by more than the clients admitted at the same
instant in other workers.

One shared memory file (memfd, inherited) of int32 counters, one row per worker process: a
row has one writer, its worker, which publishes its own counts; the others only read it, so
no lock is needed (an aligned 4-byte store is atomic on every platform Linux runs on). A row
is cleared by the leader when its worker has gone.

A row: the worker's clients in all, per VIP slot (the leader numbers VIPs by name, stable
across reloads), and per (VIP, client address) bucket: addresses are hashed into
SOURCE_BUCKETS buckets, so two addresses of one VIP that share a bucket share the count that
the *other* workers hold for them (a worker's own count per address is exact); then its
connections to each member with `max_connections`, per member slot (numbered by the leader,
as VIPs are): that limit is the gateway's too.
"""

from __future__ import annotations

import mmap
import os
import zlib

VIP_SLOTS = 256  # VIPs a gateway may serve with workers (more: a config error)
SOURCE_BUCKETS = 16384
MEMBER_SLOTS = 1024  # members with max_connections a gateway may have with workers
_VIPS_AT = 1
_SOURCES_AT = _VIPS_AT + VIP_SLOTS
_MEMBERS_AT = _SOURCES_AT + SOURCE_BUCKETS
ROW = _MEMBERS_AT + MEMBER_SLOTS  # int32 counters per row
_ITEM = 4


def source_bucket(vip_slot: int, source: str) -> int:
    """The bucket of client address `source` on VIP slot `vip_slot` (the same in every
    process: no per-process hash seed)."""
    return zlib.crc32(f"{vip_slot}/{source}".encode()) % SOURCE_BUCKETS


class SharedCounts:
    """The counters of `rows` workers; `row` is this process's (None: the leader, which only
    reads)."""

    def __init__(self, fd: int, rows: int, row: int | None = None) -> None:
        self.fd, self.rows, self.row = fd, rows, row
        self._map = mmap.mmap(fd, rows * ROW * _ITEM)
        self._cells = memoryview(self._map).cast("i")

    @classmethod
    def create(cls, rows: int) -> SharedCounts:
        """A new, zeroed file for `rows` workers (the leader's); its descriptor is inherited."""
        fd = os.memfd_create("medgate-client-counts", 0)  # no MFD_CLOEXEC: workers inherit it
        os.ftruncate(fd, rows * ROW * _ITEM)
        return cls(fd, rows)

    def clear(self, row: int) -> None:
        """Forget a row whose worker has gone (its clients went with it)."""
        start = row * ROW
        self._cells[start:start + ROW] = memoryview(bytes(ROW * _ITEM)).cast("i")

    # -- this worker's own row (one writer)

    def publish_total(self, count: int) -> None:
        assert self.row is not None
        self._cells[self.row * ROW] = count

    def publish_vip(self, vip_slot: int, count: int) -> None:
        assert self.row is not None
        self._cells[self.row * ROW + _VIPS_AT + vip_slot] = count

    def publish_member(self, member_slot: int, count: int) -> None:
        assert self.row is not None
        self._cells[self.row * ROW + _MEMBERS_AT + member_slot] = count

    def add_source(self, bucket: int, change: int) -> None:
        assert self.row is not None
        cell = self.row * ROW + _SOURCES_AT + bucket
        self._cells[cell] += change

    # -- what the others hold (this row left out)

    def _elsewhere(self, offset: int) -> int:
        cells, row = self._cells, self.row
        return sum(cells[r * ROW + offset] for r in range(self.rows) if r != row)

    def total_elsewhere(self) -> int:
        return self._elsewhere(0)

    def vip_elsewhere(self, vip_slot: int) -> int:
        return self._elsewhere(_VIPS_AT + vip_slot)

    def source_elsewhere(self, bucket: int) -> int:
        return self._elsewhere(_SOURCES_AT + bucket)

    def member_elsewhere(self, member_slot: int) -> int:
        return self._elsewhere(_MEMBERS_AT + member_slot)

    def vip_by_row(self, vip_slot: int) -> list[int]:
        """Each row's clients of one VIP (the status page's per-worker load)."""
        return [self._cells[r * ROW + _VIPS_AT + vip_slot] for r in range(self.rows)]

    def total_by_row(self) -> list[int]:
        return [self._cells[r * ROW] for r in range(self.rows)]

    def close(self) -> None:
        self._cells.release()
        self._map.close()
