"""Shared admin state between the nodes of a pair ([gateway] peers).

A member drained, put in maintenance, made ready or re-weighted on one node is so on its peers
within a second: the admin server announces each change here, and one task per peer pushes
what is pending (the latest change per member) with the peer's own admin API, retrying with
backoff while the peer is away. A node that starts asks its peers first (`pull`), before it
reports ready. Health is not shared: each node checks members itself.

Last writer wins, by the wall-clock stamp each change carries: a change made on both sides
while they could not talk resolves to the later one everywhere (the nodes keep time by NTP;
a change an operator made later is the one they meant).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import h11
import trio

from gateway.net import bounded_json, http, tls
from gateway.balancer import AdminState, Balancer, Pool
from gateway.config import Address, ClientTls, Config, GatewaySettings
from gateway.net.channel import open_tcp
from gateway.net.link import Link
from gateway.privacy import HashKeyError, KeyedHash, existing_key

log = logging.getLogger("medgate.peers")

TIMEOUT = 2.0  # seconds for one request to a peer
DRIFT_EVERY = 30.0  # seconds between comparisons of the config with each peer's
PERSISTENCE_EVERY = 1.0  # seconds between batches of new persistence entries to the peers
PERSISTENCE_BATCH = 500  # entries per request at most
# ... and bytes of JSON: the peer's admin server takes 64 KiB bodies (MAX_BODY), and names of
# VIPs and members have no length limit
BATCH_BYTES = 60_000
BACKOFF_MAX = 30.0  # seconds between tries at a peer that is away
PEER_HEADER = "X-Medgate-Peer"  # a change pushed by a peer: applied, not pushed on again
# What a request to a peer that is away, slow or not medgate raises
UNANSWERED = (OSError, http.PeerGone, trio.TooSlowError, ValueError, tls.TlsFailed,
              tls.TlsSetupError, h11.ProtocolError)


@dataclass
class PeerLink:
    """One peer: what is waiting to be pushed to it, and how it answered last."""

    address: Address
    pending: dict[tuple[str, str], dict] = field(default_factory=dict)
    wake: trio.Event = field(default_factory=trio.Event)
    ok: bool | None = None  # None: not asked yet
    detail: str = "not asked yet"
    since: float = 0.0  # wall clock of the last change of `ok`
    drift: list[str] = field(default_factory=list)  # how its config differs from ours
    disagree: list[str] = field(default_factory=list)  # members whose admin state differs


HASH_KEY = "[gateway] hash key"  # the digests' entry for the hash key's fingerprint


def config_digests(config: Config, hasher: KeyedHash | None = None) -> dict[str, str]:
    """A digest per VIP and per member ("vip", "vip/member") of what the config says of it,
    and the hash key's fingerprint: two nodes of a pair should have the same."""
    digests = {HASH_KEY: hasher.fingerprint()} if hasher is not None else {}
    for vip in config.vips:
        whole = dataclasses.asdict(vip)
        members = whole.pop("members")
        digests[vip.name] = _digest(whole)
        for member in members:
            digests[f"{vip.name}/{member['name']}"] = _digest(member)
    return digests


def _digests(status: dict[str, Any]) -> dict[str, str]:
    """A peer's config digests per VIP, from its status ({} when it sent none)."""
    digests = status.get("config_digests")
    return digests if isinstance(digests, dict) else {}


def drift(ours: dict[str, str], theirs: dict[str, str]) -> list[str]:
    """What differs between two nodes' config_digests, in words ([] when in sync)."""
    found = []
    for name in sorted(ours.keys() | theirs.keys()):
        if name == HASH_KEY:
            if name in ours and name in theirs and ours[name] != theirs[name]:
                found.append("the hash key differs: give both nodes the same hash_key_file "
                             "(the peer's persistence entries do not match this node's)")
            continue  # one side has none: an older medgate, or not started yet
        if name not in theirs:
            found.append(f"{'member' if '/' in name else 'vip'} {name} only here")
        elif name not in ours:
            found.append(f"{'member' if '/' in name else 'vip'} {name} only on the peer")
        elif ours[name] != theirs[name]:
            found.append(f"{'member' if '/' in name else 'vip'} {name} differs")
    return found


def peer_stamp(value, now: float, max_skew: float) -> float:
    """A peer's change stamp (wall clock) when it is a time at most `max_skew` seconds ahead of
    `now`; ValueError otherwise: a stamp from the future would win over every later change."""
    stamp = float(value)
    if not math.isfinite(stamp) or stamp < 0:
        raise ValueError(f"stamp {value!r} is not a time")
    if stamp > now + max_skew:
        raise ValueError(f"stamp {stamp:.0f} is {stamp - now:.0f}s ahead of this node's clock "
                         f"(more than peer_max_skew, {max_skew:g}s)")
    return stamp


def later(stamp: float, member) -> bool:
    """Whether a peer's change stamped `stamp` wins over this node's last change of `member`
    (last writer wins)."""
    return stamp > member.admin_changed_at


def _members(status: dict):
    """(vip, member) documents of a peer's /api/status, whatever shape it has."""
    vips = status.get("vips")
    for vip in vips if isinstance(vips, list) else []:
        members = vip.get("members") if isinstance(vip, dict) else None
        for member in members if isinstance(members, list) else []:
            if isinstance(member, dict):
                yield vip, member


def _batches(name: str, entries: list) -> list[dict]:
    """{name: entries} documents of at most PERSISTENCE_BATCH entries and about BATCH_BYTES
    of JSON each (a batch over the peer's body limit was refused whole, and lost)."""
    batches: list[dict] = []
    batch: list = []
    size = 0
    for entry in entries:
        length = len(json.dumps(entry)) + 2  # and ", " before the next
        if batch and (len(batch) == PERSISTENCE_BATCH or size + length > BATCH_BYTES):
            batches.append({name: batch})
            batch, size = [], 0
        batch.append(entry)
        size += length
    if batch:
        batches.append({name: batch})
    return batches


def _digest(value) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class PeerSync:
    """The peers of this node and the admin state they share."""

    def __init__(self, settings: GatewaySettings, balancer: Balancer,
                 digests: Callable[[], dict[str, str]]) -> None:
        self.balancer = balancer
        self.max_skew = settings.peer_max_skew
        self.digests = digests  # this node's config_digests, as of its running config
        self.token = settings.admin_token
        self.links = [PeerLink(address) for address in settings.peers]
        self._active_stamps: dict[str, float] = {}  # VIP -> wall clock of its active member
        self._news = trio.Event()  # set (and replaced) when a pool has something to share
        for pool in balancer.pools.values():
            self.watch(pool)
        self.tls = None
        if settings.admin_tls is not None:  # the peers' admin servers speak HTTPS too
            trust = settings.admin_tls.ca or settings.admin_tls.cert
            self.tls = lambda host: tls.client_context(ClientTls(ca=trust), host)

    def announce(self, vip: str, member: str, change: dict) -> None:
        """A change made here ({"state": ..., "weight": ..., "stamp": ...}): push it."""
        for link in self.links:
            link.pending[(vip, member)] = change
            link.wake.set()

    def apply(self, vip: str, member: str, change: dict) -> bool:
        """A peer's state of a member, read at start: taken when it is newer than what this
        node has. A stamp from beyond peer_max_skew is taken as now (a peer that kept a
        forged or skewed stamp must not pin the member for ever)."""
        pool = self.balancer.pool(vip)
        now = time.time()
        try:
            stamp = peer_stamp(change.get("stamp", 0.0), now, self.max_skew)
        except ValueError as exc:
            log.warning("peer's state of %s/%s: %s; taken as now", vip, member, exc)
            stamp = now
        if not later(stamp, pool.member(member)):
            return False
        if "state" in change:
            pool.set_admin_state(member, AdminState(change["state"]), stamp)
        if "weight" in change:
            pool.set_weight(member, int(change["weight"]), stamp)
        return True

    async def pull(self) -> int:
        """Ask every peer for its admin state and take what is newer; how many changes were
        taken. A peer that does not answer is logged and skipped."""
        taken = 0
        for link in self.links:
            try:
                status = await self._status(link)
            except UNANSWERED as exc:
                self._mark(link, False, f"{type(exc).__name__}: {exc}")
                continue
            self._mark(link, True, "answered")
            for vip, member in _members(status):
                try:
                    taken += self.apply(vip["name"], member["name"], {
                        "state": member["admin"], "weight": member["weight"],
                        "stamp": member.get("admin_changed_at", 0.0)})
                except (KeyError, ValueError, TypeError, AttributeError):
                    continue  # a VIP or member this node does not have: config drift
            self._compare(link, status)
        if taken:
            log.info("took %d admin change(s) from the peers at start", taken)
        return taken

    async def run(self) -> None:
        """Push what is pending to each peer, and compare configs now and then, for as long as
        the gateway runs."""
        async with trio.open_nursery() as nursery:
            for link in self.links:
                nursery.start_soon(self._push, link)
                nursery.start_soon(self._watch_drift, link)
            nursery.start_soon(self._share_persistence)

    def watch(self, pool: Pool) -> None:
        """`pool`'s entries and switches are shared with the peers (a pool a reload made)."""
        pool.tell_news(self._news_came)

    def _news_came(self) -> None:
        self._news.set()

    async def _share_persistence(self) -> None:
        """What the balancer decided here that a peer taking over must decide alike, to
        every peer PERSISTENCE_EVERY after a pool had news (what comes meanwhile goes along),
        best effort: new table-persistence entries (study affinity too) and HL7
        resend-affinity entries, in batches, and a failover VIP's new active member. An
        entry a peer misses only means that client is picked afresh there. Nothing new:
        it sleeps."""
        while True:
            await self._news.wait()
            await trio.sleep(PERSISTENCE_EVERY)
            self._news = trio.Event()  # before looking: news from now on is looked at again
            pools = list(self.balancer.pools.values())
            for document in _batches(
                    "entries", [(pool.name, key, member) for pool in pools
                                for key, member in pool.new_persistence()]) + _batches(
                    "deliveries", [(pool.name, f"{unit:016x}", member) for pool in pools
                                   for unit, member in pool.new_deliveries()]):
                await self._to_every_peer("/api/persistence", document)
            for pool in pools:
                active = pool.new_active()
                if active is not None:
                    self._active_stamps[pool.name] = stamp = time.time()
                    await self._to_every_peer(f"/api/vips/{pool.name}/failover",
                                              {"active": active, "stamp": stamp})

    async def _to_every_peer(self, path: str, document: dict) -> None:
        body = json.dumps(document).encode()
        for link in self.links:
            try:
                await self._call(link, "POST", path, body)
            except UNANSWERED:
                continue  # _push says whether the peer is reachable

    def later_active(self, vip: str, stamp: float) -> bool:
        """Whether a peer's active member stamped `stamp` is newer than this node's (last
        writer wins)."""
        if stamp <= self._active_stamps.get(vip, 0.0):
            return False
        self._active_stamps[vip] = stamp
        return True

    async def _watch_drift(self, link: PeerLink) -> None:
        while True:
            await trio.sleep(DRIFT_EVERY)
            try:
                self._compare(link, await self._status(link))
            except UNANSWERED:
                continue  # _push says whether the peer is reachable

    async def _status(self, link: PeerLink) -> dict:
        """A peer's /api/status; ValueError when it is not a JSON object (bounded)."""
        status = bounded_json.loads(await self._call(link, "GET", "/api/status"))
        if not isinstance(status, dict):
            raise ValueError("/api/status is not a JSON object")
        return status

    def _compare(self, link: PeerLink, status: dict) -> None:
        """How the peer's config and admin state differ from ours (logged when it changes)."""
        theirs = status.get("config_digests")
        found = drift(self.digests(), theirs if isinstance(theirs, dict) else {})
        if found and found != link.drift:
            log.warning("peer %s: its config differs from ours: %s", link.address,
                        "; ".join(found))
        link.drift = found
        differences = []
        for vip, member in _members(status):
            try:
                ours = self.balancer.pool(vip["name"]).member(member["name"])
                theirs_state = (member["admin"], member["weight"])
            except (KeyError, TypeError):
                continue  # config drift, said above
            if (vip["name"], member["name"]) in link.pending:
                continue  # our change is on its way
            if theirs_state != (ours.admin.value, ours.weight):
                differences.append(f"{vip['name']}/{member['name']}: {ours.admin.value} "
                                   f"weight {ours.weight} here, {theirs_state[0]} weight "
                                   f"{theirs_state[1]} on the peer")
        if differences and differences != link.disagree:
            log.warning("peer %s: admin state differs: %s", link.address, "; ".join(differences))
        link.disagree = differences

    async def _push(self, link: PeerLink) -> None:
        backoff = 1.0
        while True:
            while not link.pending:  # (a wake-up may be for a change already pushed)
                await link.wake.wait()
                link.wake = trio.Event()
            (vip, member), change = next(iter(link.pending.items()))
            body = json.dumps(change).encode()
            try:
                answer = bounded_json.loads(
                    await self._call(link, "POST", f"/api/vips/{vip}/members/{member}", body))
            except UNANSWERED as exc:
                self._mark(link, False, f"{type(exc).__name__}: {exc}")
                await trio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            backoff = 1.0
            if link.pending.get((vip, member)) is change:  # not replaced meanwhile
                del link.pending[(vip, member)]
            if isinstance(answer, dict) and "kept" in answer:  # its own change is later
                self._mark(link, True, f"{vip}/{member} pushed, kept by the peer: "
                                       f"{answer['kept']}")
                link.disagree = [f"{vip}/{member}: the peer keeps its own later change"]
                continue
            self._mark(link, True, f"in sync ({vip}/{member} pushed)")

    async def _call(self, link: PeerLink, method: str, path: str, body: bytes = b"") -> bytes:
        address = link.address
        with trio.fail_after(TIMEOUT):
            stream: Link = await open_tcp(address.host, address.port)
            try:
                if self.tls is not None:
                    stream = await self.tls(address.host).wrap(stream)
                headers = [("Content-Type", "application/json"), (PEER_HEADER, "1")]
                if self.token:
                    headers.append(("Authorization", f"Bearer {self.token}"))
                reply = await http.request(stream, method, path, str(address), headers, body)
            finally:
                await trio.aclose_forcefully(stream)
        if reply.status != 200:
            raise ValueError(f"HTTP {reply.status} {reply.reason}")
        return reply.body

    @staticmethod
    def _mark(link: PeerLink, ok: bool, detail: str) -> None:
        if ok != link.ok:
            (log.info if ok else log.warning)("peer %s %s: %s", link.address,
                                               "reachable" if ok else "unreachable", detail)
            link.since = time.time()
        link.ok, link.detail = ok, detail


async def compare_with_peers(config: Config) -> list[str]:
    """`gateway check --peer`: one line per peer, how its config differs from `config` (or why
    it could not be asked); [] when every peer has the same."""
    try:
        hasher = existing_key(config.gateway.state_dir, config.gateway.hash_key_file)
    except HashKeyError as exc:
        return [f"this node's {exc.reason}"]
    ours = config_digests(config, hasher)
    sync = PeerSync(config.gateway, Balancer([]), lambda: ours)
    lines = []
    for link in sync.links:
        try:
            status = await sync._status(link)
        except UNANSWERED as exc:
            lines.append(f"peer {link.address}: not asked: {type(exc).__name__}: {exc}")
            continue
        lines += [f"peer {link.address}: {difference}"
                  for difference in drift(ours, _digests(status))]
    return lines
