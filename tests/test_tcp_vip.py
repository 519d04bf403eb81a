"""The TCP VIP over real sockets on 127.0.0.1: balancing, health, redispatch, persistence, drain."""

from __future__ import annotations

import socket
import struct
from collections import Counter
from functools import partial
from types import SimpleNamespace

import trio

from gateway.balancer import AdminState, Health
from tests.helpers import (ask_who, eventually, start_backends, start_gateway, tcp_vip,
                           vip_port, wait_for_health)


async def test_members_get_traffic_in_their_weight_ratio(nursery):
    backends = await start_backends(nursery, "a", "b")
    gateway = await start_gateway(nursery, tcp_vip(
        backends, member_extra={"a": "weight = 300", "b": "weight = 100"}))
    seen = Counter([await ask_who(vip_port(gateway)) for _ in range(40)])
    assert seen == {"a": 30, "b": 10}


async def test_stopped_member_goes_down_after_fall_and_back_after_rise(nursery):
    a, b = await start_backends(nursery, "a", "b")
    gateway = await start_gateway(nursery, tcp_vip([a, b]))
    pool = gateway.balancer.pool("web")
    port = a.port
    a.stop()
    await wait_for_health(pool, "a", Health.DOWN, 5)
    last = pool.member("a").last_check
    assert last is not None and "connection refused" in last.detail
    assert pool.member("a").check_failures >= 2  # fall = 2 in tcp_vip()
    assert {await ask_who(vip_port(gateway)) for _ in range(10)} == {"b"}

    a.port = port
    await a.start()
    await wait_for_health(pool, "a", Health.UP, 5)
    assert pool.member("a").check_successes >= 2  # rise = 2
    assert {await ask_who(vip_port(gateway)) for _ in range(10)} == {"a", "b"}


async def test_refused_connect_is_redispatched_and_counts_as_live_failure(nursery):
    a, b = await start_backends(nursery, "a", "b")
    # Checks every hour: only live traffic can notice that "a" died.
    gateway = await start_gateway(nursery, tcp_vip(
        [a, b], health='health = { check = "tcp", interval = "1h" }', extra="error_limit = 3"))
    pool = gateway.balancer.pool("web")
    a.stop()
    answers = [await ask_who(vip_port(gateway)) for _ in range(10)]
    assert answers == ["b"] * 10  # no client noticed
    member = pool.member("a")
    assert member.health is Health.DOWN
    assert member.failed == 3 and "consecutive live failures" in member.health_detail


async def test_all_members_down_closes_the_client_cleanly(nursery):
    (a,) = await start_backends(nursery, "a")
    gateway = await start_gateway(nursery, tcp_vip([a]))
    a.stop()
    pool = gateway.balancer.pool("web")
    await wait_for_health(pool, "a", Health.DOWN, 5)
    assert await ask_who(vip_port(gateway)) == ""  # closed, no data, no hang


async def test_persistence_keeps_a_client_on_its_member(nursery):
    backends = await start_backends(nursery, "a", "b", "c")
    gateway = await start_gateway(nursery, tcp_vip(
        backends, extra='persistence = { key = "source-ip", timeout = "1h" }'))
    for source in ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"):
        answers = {await ask_who(vip_port(gateway), source) for _ in range(6)}
        assert len(answers) == 1, (source, answers)


async def test_hash_persistence_is_the_same_in_two_gateways(nursery):
    backends = await start_backends(nursery, "a", "b", "c")
    toml = tcp_vip(backends, extra='persistence = { key = "source-ip", method = "hash" }')
    first = await start_gateway(nursery, toml)
    second = await start_gateway(nursery, toml)
    sources = [f"127.0.0.{n}" for n in range(1, 13)]
    picks_first = [await ask_who(vip_port(first), s) for s in sources]
    picks_second = [await ask_who(vip_port(second), s) for s in reversed(sources)]
    assert picks_first == list(reversed(picks_second))
    assert len(set(picks_first)) > 1  # and it still spreads keys


async def test_drain_keeps_persisted_clients_and_refuses_new_ones(nursery):
    backends = await start_backends(nursery, "a", "b")
    gateway = await start_gateway(nursery, tcp_vip(
        backends, extra='persistence = { key = "source-ip", timeout = "1h" }'))
    port = vip_port(gateway)
    home = await ask_who(port, "127.0.0.1")
    gateway.balancer.set_admin_state("web", home, AdminState.DRAIN)
    assert [await ask_who(port, "127.0.0.1") for _ in range(5)] == [home] * 5
    newcomers = {await ask_who(port, f"127.0.0.{n}") for n in range(2, 10)}
    assert home not in newcomers and newcomers
    gateway.balancer.set_admin_state("web", home, AdminState.MAINT)
    assert await ask_who(port, "127.0.0.1") != home  # maint: not even persisted clients


async def test_failover_uses_the_first_member_only_while_it_is_up(nursery):
    primary, backup = await start_backends(nursery, "primary", "backup")
    gateway = await start_gateway(nursery, tcp_vip([primary, backup], extra='mode = "failover"'))
    pool = gateway.balancer.pool("web")
    port = vip_port(gateway)
    assert {await ask_who(port) for _ in range(5)} == {"primary"}
    primary_port = primary.port
    primary.stop()
    assert {await ask_who(port) for _ in range(5)} == {"backup"}  # redispatched at once
    primary.port = primary_port
    await primary.start()
    await wait_for_health(pool, "primary", Health.UP, 5)
    assert {await ask_who(port) for _ in range(5)} == {"primary"}


async def test_idle_client_is_closed_at_client_timeout(nursery):
    (silent,) = await start_backends(nursery, "silent", greet=False)
    gateway = await start_gateway(nursery, tcp_vip([silent], extra='client_timeout = "300ms"'))
    stream = await trio.open_tcp_stream("127.0.0.1", vip_port(gateway))
    started = trio.current_time()
    with trio.fail_after(5):
        assert await stream.receive_some(10) == b""
    assert trio.current_time() - started >= 0.25
    await stream.aclose()


async def test_bytes_flow_both_ways_with_half_close(nursery):
    (echo,) = await start_backends(nursery, "echo", greet=False)
    gateway = await start_gateway(nursery, tcp_vip([echo]))
    stream = await trio.open_tcp_stream("127.0.0.1", vip_port(gateway))
    payload = bytes(range(256)) * 4096  # 1 MiB
    received = bytearray()

    async def read_all():
        while chunk := await stream.receive_some(65536):
            received.extend(chunk)

    with trio.fail_after(10):
        async with trio.open_nursery() as inner:
            inner.start_soon(read_all)
            await stream.send_all(payload)
            await stream.send_eof()  # the echo server answers everything, then sees EOF
    assert bytes(received) == payload
    await stream.aclose()
    member = gateway.balancer.pool("web").member("echo")
    await eventually(lambda: not member.active, 5)
    assert member.bytes_in == len(payload) and member.bytes_out == len(payload)


async def test_a_thousand_idle_connections_do_not_block_new_ones(nursery):
    (echo,) = await start_backends(nursery, "echo")
    gateway = await start_gateway(nursery, tcp_vip([echo]))
    port = vip_port(gateway)
    idle = []
    with trio.fail_after(60):
        for _ in range(1000):
            idle.append(await trio.open_tcp_stream("127.0.0.1", port))
        member = gateway.balancer.pool("web").member("echo")
        await eventually(lambda: member.active >= 1000, 60)
        assert await ask_who(port) == "echo"
    for stream in idle:
        await stream.aclose()


async def test_reload_keeps_admin_state_and_health_and_adds_members(nursery):
    from gateway.config import parse_config

    a, b, c = await start_backends(nursery, "a", "b", "c")
    gateway = await start_gateway(nursery, tcp_vip([a, b]))
    pool = gateway.balancer.pool("web")
    gateway.balancer.set_admin_state("web", "a", AdminState.DRAIN)
    gateway.balancer.set_weight("web", "b", 50)
    port = vip_port(gateway)
    stream = await trio.open_tcp_stream("127.0.0.1", port)  # a live connection across the reload
    await stream.send_all(b"hello")

    await gateway.reload(parse_config(tcp_vip([a, b, c]), source="test.toml"))
    assert vip_port(gateway) == port  # the same listener
    assert pool.member("a").admin is AdminState.DRAIN and pool.member("a").health is Health.UP
    assert pool.member("b").weight == 50  # set at run time, and the file did not change it
    assert pool.member("c").health is Health.UP  # checked before it got traffic
    assert {await ask_who(port) for _ in range(6)} == {"b", "c"}
    with trio.fail_after(5):
        received = b""
        while b"hello" not in received:
            received += await stream.receive_some(100)
    await stream.aclose()

    await gateway.reload(parse_config(tcp_vip([c]), source="test.toml"))
    assert [m.name for m in gateway.balancer.pool("web").members] == ["c"]
    assert {await ask_who(port) for _ in range(3)} == {"c"}


async def test_a_member_that_resets_a_live_connection_gets_a_strike_a_client_that_does_not(
        nursery):
    async def resetting_member(stream: trio.SocketStream) -> None:
        try:
            await stream.send_all(b"m\n")
            if await stream.receive_some(100) == b"reset\n":
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                         struct.pack("ii", 1, 0))
        except trio.BrokenResourceError:
            pass  # the gateway passed a client's reset on
        await stream.aclose()  # with SO_LINGER 0: a reset (RST), not a FIN

    listeners = await nursery.start(partial(trio.serve_tcp, resetting_member, 0,
                                            host="127.0.0.1"))
    member_end = SimpleNamespace(name="m", port=listeners[0].socket.getsockname()[1])
    gateway = await start_gateway(nursery, tcp_vip(
        [member_end], health='health = { check = "tcp", interval = "1h" }',
        extra="error_limit = 10"))
    member = gateway.balancer.pool("web").member("m")

    async def session(reset_by: str) -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", vip_port(gateway))
        with trio.fail_after(5):
            assert await stream.receive_some(100) == b"m\n"
            if reset_by == "member":
                await stream.send_all(b"reset\n")
                try:
                    while await stream.receive_some(100):
                        pass
                except trio.BrokenResourceError:
                    pass  # the gateway may pass the reset on
            else:
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                         struct.pack("ii", 1, 0))
            await stream.aclose()
            await eventually(lambda: not member.active, 10)  # the gateway ended its side

    await session("member")
    assert member.failed == 1 and member.live_failures == 1
    await session("client")
    assert member.failed == 1  # the client's reset is not the member's fault
