"""The pure balancer: algorithms, states and persistence, exhaustively with hypothesis."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.balancer import (AdminState, Health, MemberSpec, NoMemberAvailable, NoMemberReason,
                              Pool, stable_hash)


def make_pool(weights, *, up=None, **settings_) -> Pool:
    specs = [MemberSpec(f"m{i}", w) for i, w in enumerate(weights)]
    pool = Pool.from_specs("vip", specs, **settings_)
    for i, member in enumerate(pool.members):
        if up is None or up[i]:
            pool.record_check(member.name, True, "ok", 0.001, 0.0)
        else:
            pool.record_check(member.name, False, "refused", 0.001, 0.0)
    return pool


weights = st.lists(st.integers(min_value=0, max_value=20), min_size=1, max_size=6)


@given(weights)
def test_round_robin_gives_each_member_exactly_its_weight_share(ws):
    pool = make_pool(ws)
    total = sum(ws)
    if total == 0:
        with pytest.raises(NoMemberAvailable):
            pool.pick()
        return
    picks = Counter(pool.pick().name for _ in range(total * 3))
    assert picks == Counter({f"m{i}": w * 3 for i, w in enumerate(ws) if w})


@given(weights, st.lists(st.booleans(), min_size=6, max_size=6))
def test_failover_picks_the_first_available_member_in_order(ws, up):
    pool = make_pool(ws, up=up[:len(ws)], mode="failover")
    expected = next((f"m{i}" for i, w in enumerate(ws) if w and up[i]), None)
    for _ in range(5):
        if expected is None:
            with pytest.raises(NoMemberAvailable):
                pool.pick()
        else:
            assert pool.pick().name == expected


def test_failover_returns_to_the_first_member_when_it_is_back():
    pool = make_pool([100, 100], mode="failover", rise=2, fall=1)
    assert pool.pick(now=0.0).name == "m0"
    pool.record_check("m0", False, "refused", 0.0, 1.0)
    assert pool.pick(now=1.0).name == "m1"
    pool.record_check("m0", True, "ok", 0.0, 2.0)
    assert pool.pick(now=2.0).name == "m1"  # rise = 2: one pass is not enough
    pool.record_check("m0", True, "ok", 0.0, 3.0)
    assert pool.pick(now=3.0).name == "m0"  # failback_after 0 (the pool's default)


@given(st.lists(st.sampled_from(list(AdminState)), min_size=1, max_size=6),
       st.sampled_from(["roundrobin", "leastconn"]),
       st.sampled_from([None, "table", "hash"]),
       st.lists(st.text(min_size=1, max_size=8), min_size=1, max_size=20))
def test_drain_and_maint_are_never_picked_for_new_keys(states, algorithm, method, keys):
    pool = make_pool([100] * len(states), algorithm=algorithm, persistence_method=method)
    for member, state in zip(pool.members, states):
        pool.set_admin_state(member.name, state)
    ready = {m.name for m, s in zip(pool.members, states) if s is AdminState.READY}
    for key in keys:
        if not ready:
            with pytest.raises(NoMemberAvailable) as info:
                pool.pick(key, now=1.0)
            assert info.value.reason is NoMemberReason.NONE_HEALTHY
        else:
            assert pool.pick(key, now=1.0).name in ready


@given(st.lists(st.integers(1, 10), min_size=2, max_size=5),
       st.sampled_from(["table", "hash"]),
       st.lists(st.tuples(st.text(min_size=1, max_size=4), st.floats(0, 2)), max_size=40))
def test_persistence_is_stable_until_timeout_or_member_down(ws, method, visits):
    pool = make_pool(ws, persistence_method=method, persistence_timeout=100.0)
    first: dict[str, str] = {}
    now = 0.0
    for key, step in visits:
        now += step  # at most 40 steps of at most 2 s: the 100 s timeout is never reached
        member = pool.pick(key, now=now).name
        assert first.setdefault(key, member) == member
    if not first:
        return
    key, member = next(iter(first.items()))
    pool.report_failure(pool.member(member), "reset")
    pool.report_failure(pool.member(member), "reset")
    pool.report_failure(pool.member(member), "reset")  # error_limit 3: now down
    assert pool.member(member).health is Health.DOWN
    assert pool.pick(key, now=now).name != member
    assert pool.persisted_member(key) != member


def test_table_persistence_expires_after_its_timeout():
    pool = make_pool([100, 100], persistence_method="table", persistence_timeout=10.0)
    assert pool.pick("k", now=0.0).name == "m0"
    assert pool.pick("k", now=9.0).name == "m0"   # refreshed on use
    assert pool.pick("k", now=18.0).name == "m0"
    assert pool.pick("other", now=18.0).name == "m1"
    assert pool.pick("k", now=40.0).name == "m0"  # expired: picked afresh by round robin
    assert pool.persisted_member("other") is None  # stale entries go as new ones come
    assert pool.expire(100.0) == 1 and pool.persisted_member("k") is None


def test_table_is_bounded():
    pool = make_pool([1, 1], persistence_method="table", persistence_max_entries=100)
    for n in range(1000):
        pool.pick(f"key{n}", now=float(n))
    assert len(pool._sticky) == 100
    assert pool.persisted_member("key999") is not None and pool.persisted_member("key0") is None


def test_hash_persistence_is_the_same_in_every_process_and_weighted():
    a = make_pool([100, 100, 200], persistence_method="hash")
    b = make_pool([100, 100, 200], persistence_method="hash")
    keys = [f"10.0.0.{n}" for n in range(2000)]
    picks = [a.pick(k).name for k in keys]
    assert picks == [b.pick(k).name for k in reversed(keys)][::-1]
    share = Counter(picks)
    assert 0.4 < share["m2"] / len(keys) < 0.6  # weight 200 of 400


def test_workers_place_a_new_table_key_alike_whatever_each_balanced_before():
    """A worker's pool (report_to_leader) places a key its table does not hold by rendezvous
    hash: the others learn of its entries only later, and a study's associations opened at
    once on several workers went to different PACS. One process balances new keys as it
    did; the table keeps each key where it was first placed in both."""
    workers = [make_pool([1, 1, 2], persistence_method="table", persistence_timeout=600.0)
               for _ in range(3)]
    for worker in workers:
        worker.report_to_leader()
    for turn, worker in enumerate(workers):
        for _ in range(turn):
            worker.pick()  # each balanced other clients before: its rotation differs
    studies = [f"CT{n:02d}" for n in range(200)]
    placed = [[worker.pick(ae, 1.0).name for ae in studies] for worker in workers]
    assert placed[0] == placed[1] == placed[2]
    assert 0.4 < Counter(placed[0])["m2"] / len(studies) < 0.6  # weighted as balanced
    hashed = make_pool([1, 1, 2], persistence_method="hash")
    assert placed[0] == [hashed.pick(ae).name for ae in studies]
    one_process = make_pool([1, 1, 2], persistence_method="table")
    assert [one_process.pick(ae, 1.0).name for ae in studies[:4]] == ["m2", "m0", "m1", "m2"]
    workers[0].record_check(placed[0][0], False, "refused", 0.001, 2.0)
    workers[0].record_check(placed[0][0], False, "refused", 0.001, 2.0)
    workers[0].record_check(placed[0][0], False, "refused", 0.001, 2.0)
    moved = workers[0].pick(studies[0], 3.0).name  # its member down: placed afresh, alike
    assert moved != placed[0][0] and moved == workers[0].pick(studies[0], 4.0).name


def test_a_worker_places_a_unit_without_a_key_by_its_own_hash_and_one_process_balances_it():
    """`place` (an HL7 message's stable hash): a worker's pool places a unit that no
    persistence key decides by it, alike in every worker and weighted; one process keeps
    its round robin."""
    units = [stable_hash(f"RIS\x00HOSP\x00MSG{n}") for n in range(400)]
    workers = [make_pool([1, 1, 2]) for _ in range(2)]
    for worker in workers:
        worker.report_to_leader()
    workers[1].pick()  # a unit ahead
    placed = [[worker.pick(place=unit).name for unit in units] for worker in workers]
    assert placed[0] == placed[1]
    assert 0.4 < Counter(placed[0])["m2"] / len(units) < 0.6
    one_process = make_pool([1, 1, 2])
    assert [one_process.pick(place=unit).name for unit in units[:4]] == ["m2", "m0", "m1", "m2"]


@given(st.lists(st.text(), min_size=1, max_size=5))
def test_stable_hash_is_blake2b_of_8_bytes_whatever_came_before(texts):
    # What a pair's nodes, the workers and a restart agree on: not a function of this
    # process, nor of the texts hashed before (the hasher copied for each is never changed).
    for text in texts:
        expected = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8)
        assert stable_hash(text) == int.from_bytes(expected.digest(), "big")
    assert stable_hash("PID1^^^HOSP^MR") == 0xE1B4DAB864524619  # as in every earlier version


def test_hash_persistence_moves_only_the_keys_of_a_member_that_goes():
    """Rendezvous: a member taking no new clients moves its own keys, spread evenly over the
    others, and no other key (fresh pools: no table entry holds a key)."""
    keys = [f"PID{n}^^^HOSP^MR" for n in range(3000)]
    before = [make_pool([100] * 4, persistence_method="hash").pick(k).name for k in keys]
    assert all(700 < count < 800 for count in Counter(before).values())
    pool = make_pool([100] * 4, persistence_method="hash")
    pool.set_admin_state("m1", AdminState.DRAIN)
    after = [pool.pick(k).name for k in keys]
    moved = [a for b, a in zip(before, after) if b != a]
    assert all(b == "m1" for b, a in zip(before, after) if b != a)
    assert len(moved) == before.count("m1")
    assert all(200 < count < 300 for count in Counter(moved).values())


def test_drained_member_still_serves_its_persisted_keys_with_hash_method():
    pool = make_pool([100, 100], persistence_method="hash")
    owner = pool.pick("client").name
    pool.set_admin_state(owner, AdminState.DRAIN)
    assert pool.pick("client").name == owner
    fresh = [k for k in (f"new{n}" for n in range(50))]
    assert owner not in {pool.pick(k).name for k in fresh}


def test_weight_zero_is_never_picked_even_when_persisted():
    pool = make_pool([100, 100], persistence_method="table")
    owner = pool.pick("k").name
    pool.set_weight(owner, 0)
    assert pool.pick("k").name != owner


def test_max_connections_and_the_reason_given():
    pool = make_pool([100, 100])
    for member in pool.members:
        member.max_connections = 1
    first, second = pool.pick(), pool.pick()
    pool.take_conn(first)
    pool.take_conn(second)
    with pytest.raises(NoMemberAvailable) as info:
        pool.pick()
    assert info.value.reason is NoMemberReason.ALL_FULL
    pool.drop_conn(first)
    assert pool.pick().name == first.name


def test_leastconn_prefers_the_member_with_fewest_connections_per_weight():
    pool = make_pool([100, 200], algorithm="leastconn")
    m0, m1 = pool.members
    for _ in range(3):
        pool.take_conn(m1)
    pool.take_conn(m0)  # m0: 1/100 = 0.01, m1: 3/200 = 0.015
    assert pool.pick().name == "m0"
    pool.take_conn(m0)  # m0: 0.02
    assert pool.pick().name == "m1"


def test_first_check_decides_then_rise_and_fall_apply():
    pool = Pool.from_specs("vip", [MemberSpec("m0")], rise=2, fall=3)
    member = pool.member("m0")
    assert member.health is Health.UNKNOWN
    with pytest.raises(NoMemberAvailable):
        pool.pick()  # never traffic before the first check
    transition = pool.record_check("m0", False, "refused", 0.0, 0.0)
    assert transition and transition.new is Health.DOWN
    assert pool.record_check("m0", True, "ok", 0.0, 1.0) is None
    assert pool.record_check("m0", True, "ok", 0.0, 2.0).new is Health.UP
    assert pool.record_check("m0", False, "x", 0.0, 3.0) is None
    assert pool.record_check("m0", False, "x", 0.0, 4.0) is None
    assert pool.record_check("m0", False, "timeout", 0.0, 5.0).new is Health.DOWN


@settings(max_examples=50)
@given(st.integers(2, 6))
def test_live_failures_mark_down_at_once_and_need_rise_checks_to_return(limit):
    pool = make_pool([100, 100], error_limit=limit, rise=2)
    member = pool.member("m0")
    pool.report_failure(member, "reset")
    pool.report_success(member)  # a success in between resets the count
    for n in range(limit):
        assert member.health is Health.UP
        transition = pool.report_failure(member, "no answer in 4s")
    assert member.health is Health.DOWN and transition is not None
    assert "no answer in 4s" in transition.detail
    pool.record_check("m0", True, "ok", 0.0, 1.0)
    assert member.health is Health.DOWN
    pool.record_check("m0", True, "ok", 0.0, 2.0)
    assert member.health is Health.UP


def test_routes_restrict_the_choice():
    pool = make_pool([100, 100, 100])
    assert {pool.pick(among=["m2"]).name for _ in range(5)} == {"m2"}
    with pytest.raises(NoMemberAvailable):
        pool.pick(among=["m1"], exclude={"m1"})


def test_traffic_samples_and_check_history_keep_the_last_points_only():
    from gateway.balancer import HISTORY

    pool = Pool.from_specs("web", [MemberSpec("a"), MemberSpec("b")])
    a = pool.member("a")
    for round_ in range(HISTORY + 5):
        for _ in range(round_ % 3):
            pool.take_conn(a)
            pool.report_success(a)
            pool.drop_conn(a)
        pool.sample_traffic()
        pool.record_check("a", True, "ok", round_ / 1000, float(round_))
    assert len(a.traffic) == HISTORY and list(a.traffic)[-3:] == [
        (HISTORY + 2) % 3, (HISTORY + 3) % 3, (HISTORY + 4) % 3]
    assert sum(a.traffic) == sum(r % 3 for r in range(5, HISTORY + 5))  # units per sample
    assert list(pool.member("b").traffic) == [0] * HISTORY
    assert len(a.check_history) == HISTORY and a.check_history[-1] == (HISTORY + 4) / 1000


def test_a_resent_unit_counts_once_against_a_member():
    pool = make_pool([100, 100], error_limit=3)
    member = pool.member("m0")
    for _ in range(10):  # one message, resent ten times, fails ten times
        pool.report_failure(member, "no ACK", unit=("HIS", "MSG1"))
    assert member.live_failures == 1 and member.health is Health.UP
    for unit in ("MSG2", "MSG3"):
        pool.report_failure(member, "no ACK", unit=unit)
    assert member.health is Health.DOWN  # three different messages


def test_unwell_statuses_count_only_from_enough_sources_within_the_window():
    pool = make_pool([100, 100], error_limit=3, status_sources=2, status_window=600.0)
    member = pool.member("m0")
    for now in (1.0, 2.0, 3.0, 4.0):
        pool.report_status(member, True, "0xa700", now=now, source="CT1")
    assert member.health is Health.UP  # one modality, however often
    pool.report_status(member, True, "0xa700", now=700.0, source="MR1")
    assert member.health is Health.UP  # CT1's refusals are older than the window
    pool.report_status(member, True, "0xa700", now=701.0, source="CT1")
    assert member.health is Health.DOWN
    other = pool.member("m1")
    for source in ("CT1", "MR1", "US1"):
        pool.report_status(other, True, "0xa700", now=800.0, source=source)
        pool.report_status(other, False, "", now=800.0)  # a good status ends the run
    assert other.health is Health.UP


def test_passive_signals_never_take_the_vip_below_min_up():
    pool = make_pool([100, 100], error_limit=1)
    first, second = pool.members
    assert pool.report_failure(first, "reset").new is Health.DOWN
    held = pool.report_failure(second, "reset")
    assert held.held and held.new is Health.UP and second.floor_held == (
        "1 consecutive live failures, last: reset")
    assert pool.report_failure(second, "reset") is None  # said once
    pool.report_success(second)
    assert second.floor_held == ""
    pool.record_check("m1", False, "timeout", 1.0, 5.0)
    pool.record_check("m1", False, "timeout", 1.0, 6.0)
    pool.record_check("m1", False, "timeout", 1.0, 7.0)
    assert second.health is Health.DOWN  # the checks still can
    none = make_pool([100], error_limit=1, min_up=0)
    assert none.report_failure(none.members[0], "reset").new is Health.DOWN
