"""The Channel byte path (gateway/net/channel.py) over real loopback sockets: each connection gets
its own bytes, whole and in order, however reads interleave; a busy connection cannot starve the
others; closing, end of stream, resets and refused connects read as trio's streams do."""

from __future__ import annotations

import os
import socket
import struct
import threading

import pytest
import trio
import trio.testing

from gateway.net import channel
from gateway.net.channel import Channel

HANG_GUARD = 30  # seconds: a broken channel hangs; these bounds only turn that into a failure


def connected_pair() -> tuple[socket.socket, Channel]:
    """(a plain blocking socket, a Channel for its peer) on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        outside = socket.create_connection(listener.getsockname())
        inside, _ = listener.accept()
    return outside, Channel(inside)


def blast(sock: socket.socket, pattern: bytes, total: int) -> threading.Thread:
    """Send `total` bytes of `pattern` repeated, from a thread, then close."""
    def run() -> None:
        data = (pattern * (total // len(pattern) + 1))[:total]
        with sock:
            try:
                sock.sendall(data)
            except OSError:
                pass  # the reader closed first

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


async def test_connections_read_at_once_keep_their_own_bytes():
    # Eight streams of distinct bytes, always ready to read: every receive succeeds without
    # waiting, every FAIR_EVERY-th hands over to the scheduler, read sizes grow and shrink.
    # Each reader must still get exactly its own stream.
    total = 3_000_000
    pairs = [connected_pair() for _ in range(8)]
    received: dict[int, bytearray] = {n: bytearray() for n in range(len(pairs))}
    threads = [blast(outside, bytes([n]) * 7 + bytes([n + 100]), total)
               for n, (outside, _) in enumerate(pairs)]

    async def read(n: int, stream: Channel) -> None:
        while data := await stream.receive_some(1000 + n * 317):
            received[n] += data
        await stream.aclose()

    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            for n, (_, stream) in enumerate(pairs):
                nursery.start_soon(read, n, stream)
    for thread in threads:
        thread.join()
    for n, data in received.items():
        expected = bytes([n]) * 7 + bytes([n + 100])
        assert len(data) == total
        assert data == (expected * (total // 8 + 1))[:total], f"stream {n} got other bytes"


async def test_a_connection_with_data_always_waiting_does_not_starve_the_others():
    outside, stream = connected_pair()
    thread = blast(outside, b"x", 50_000_000)
    other_ran = trio.Event()

    async def other() -> None:
        await trio.sleep(0)
        other_ran.set()

    reads = 0
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)
            while not other_ran.is_set():
                assert await stream.receive_some(4096)
                reads += 1
    # `other` needs two passes through the scheduler (its start, then after its sleep(0)); in
    # each, trio runs the ready tasks in random order, so the reader may go first, for up to
    # FAIR_EVERY more reads. Starved, it would read until the 50 MB ran out (and fail on b"").
    assert reads <= 4 * channel.FAIR_EVERY
    await stream.aclose()
    thread.join()


async def test_close_wakes_a_reader_with_closed_resource_error():
    outside, stream = connected_pair()
    failure: list[BaseException] = []

    async def reader() -> None:
        try:
            await stream.receive_some()
        except trio.ClosedResourceError as exc:
            failure.append(exc)

    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            stream.close()
    assert failure
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"x")
    outside.close()


async def test_end_of_stream_half_close_and_reset():
    outside, stream = connected_pair()
    with trio.fail_after(HANG_GUARD):
        outside.sendall(b"last words")
        outside.shutdown(socket.SHUT_WR)
        assert await stream.receive_some() == b"last words"
        assert await stream.receive_some() == b""
        await stream.send_all(b"still heard")  # our direction stays open
        await stream.send_eof()
        assert outside.recv(100) == b"still heard"
        assert outside.recv(100) == b""
    outside.close()
    await stream.aclose()

    outside, stream = connected_pair()
    outside.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    outside.close()  # a reset
    with trio.fail_after(HANG_GUARD), pytest.raises(trio.BrokenResourceError):
        while await stream.receive_some():
            pass
        await stream.send_all(b"x" * 100_000)
    await stream.aclose()


async def test_receive_ready_takes_what_waits_and_never_waits():
    outside, stream = connected_pair()
    assert channel.receive_ready(stream, 100) is None  # nothing sent: a read would wait
    outside.sendall(b"x" * (channel.FAIR_EVERY + 2))
    with trio.fail_after(HANG_GUARD):
        await trio.lowlevel.wait_readable(stream.socket)
        taken = [channel.receive_ready(stream, 1) for _ in range(channel.FAIR_EVERY)]
        # every FAIR_EVERY-th success in a row is left to the read that passes the scheduler
        assert taken == [b"x"] * (channel.FAIR_EVERY - 1) + [None]
        assert await stream.receive_some(1) == b"x"
        assert channel.receive_ready(stream, 100) == b"xx"
        outside.shutdown(socket.SHUT_WR)
        await trio.lowlevel.wait_readable(stream.socket)
        assert channel.receive_ready(stream, 100) == b""  # the end of the stream
    left, right = trio.testing.memory_stream_pair()
    await left.send_all(b"waiting")
    assert channel.receive_ready(right, 100) is None  # not a Channel: it cannot tell
    outside.close()
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        channel.receive_ready(stream, 100)


async def test_an_answer_read_waits_first_and_still_takes_what_is_there():
    outside, stream = connected_pair()
    outside.sendall(b"already here")  # an answer that came before its wait began
    with trio.fail_after(HANG_GUARD):
        assert await channel.receive(stream, True) == b"already here"
        # a wait cancelled before its answer came has taken nothing: the next read has it
        for read in (lambda: channel.receive(stream, True),
                     lambda: channel.receive_when_ready(stream, 100)):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
        outside.sendall(b"late")
        assert await channel.receive_when_ready(stream, 100) == b"late"
        outside.shutdown(socket.SHUT_WR)
        assert await channel.receive(stream, True) == b""  # the end of the stream
    outside.close()
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await channel.receive(stream, True)


async def test_a_large_send_waits_for_the_reader_and_arrives_whole():
    outside, stream = connected_pair()
    payload = os.urandom(8_000_000)  # far more than the socket buffers: send_all must wait
    received = bytearray()

    def read() -> None:
        with outside:
            while chunk := outside.recv(1 << 20):
                received.extend(chunk)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    with trio.fail_after(HANG_GUARD):
        await stream.send_all(payload)
        await stream.send_eof()
        await trio.to_thread.run_sync(thread.join)
    assert received == payload
    await stream.aclose()


async def test_connect_to_a_closed_port_is_refused():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        with trio.fail_after(HANG_GUARD), pytest.raises(ConnectionRefusedError):
            await channel.connect(socket.AF_INET, ("127.0.0.1", port))


async def test_an_accepted_channel_has_its_listeners_options_without_setting_them(
        monkeypatch):
    """The Acceptor sets TCP_NODELAY and TCP_NOTSENT_LOWAT once, on the listener; each
    accepted socket has them, inherited, with no setsockopt of its own (two system calls
    fewer a client connection: a DICOM association is one)."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    acceptor = channel.Acceptor(listener)
    set_on_accepted: list[int] = []
    real_channel = channel.Channel

    class Watched(real_channel):  # type: ignore[misc, valid-type]
        def __init__(self, sock: socket.socket, tuned: bool = False) -> None:
            if tuned:
                set_on_accepted.append(sock.fileno())
            super().__init__(sock, tuned)

    monkeypatch.setattr(channel, "Channel", Watched)
    with socket.create_connection(listener.getsockname()):
        with trio.fail_after(HANG_GUARD):
            accepted = await acceptor.accept()
        sock = accepted.socket
        assert set_on_accepted == [sock.fileno()]  # taken as tuned: nothing set on it
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT) == \
            channel.NOTSENT_LOWAT
        accepted.close()
    acceptor.detach()
    listener.close()


# -- TLS over a Channel (gateway/net/tls_stream.py)

def tls_pair(certs) -> tuple:
    """(client TlsChannel, server TlsChannel) over a loopback Channel pair, not yet shaken."""
    import ssl

    from gateway.net.tls_stream import TlsChannel

    with socket.create_server(("127.0.0.1", 0)) as listener:
        outside = socket.create_connection(listener.getsockname())
        inside, _ = listener.accept()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(*certs.server)
    client_context = ssl.create_default_context(cafile=certs.ca)
    return (TlsChannel(Channel(outside), client_context, server_hostname="127.0.0.1"),
            TlsChannel(Channel(inside), server_context, server_side=True))


async def shaken(client, server) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.do_handshake)
        await server.do_handshake()


async def test_tls_both_ways_at_once_arrives_whole_and_in_order(certs):
    # Per side one task sends 4 MB while another reads what the other side sends: each
    # direction's records must arrive whole and in order while the other's flow.
    client, server = tls_pair(certs)
    payloads = {"up": os.urandom(4_000_000), "down": os.urandom(4_000_000)}
    received = {"up": bytearray(), "down": bytearray()}

    async def send(stream, name: str) -> None:
        data = payloads[name]
        for start in range(0, len(data), 300_000):
            await stream.send_all(data[start:start + 300_000])

    async def read(stream, name: str) -> None:
        while len(received[name]) < len(payloads[name]):
            chunk = await stream.receive_some()
            assert chunk, "TLS ended early"
            received[name] += chunk

    with trio.fail_after(HANG_GUARD):
        await shaken(client, server)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, client, "up")
            nursery.start_soon(read, server, "up")
            nursery.start_soon(send, server, "down")
            nursery.start_soon(read, client, "down")
        await client.aclose()  # close_notify: the end of the stream for the other side
        assert await server.receive_some() == b""
    assert received == payloads
    await server.aclose()


async def cancel_once_blocked(call) -> trio.CancelScope:
    """Run `call` until it waits, then cancel it; its scope."""
    scope = trio.CancelScope()

    async def run() -> None:
        with scope:
            await call()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await trio.testing.wait_all_tasks_blocked()
        scope.cancel()
    return scope


async def test_tls_records_a_full_socket_did_not_take_go_first_and_whole(certs):
    # send_now takes every byte and sends what the socket takes; the rest waits in `unsent`,
    # as it does when a send_all waiting for room is cancelled: the next send delivers it
    # first, so the peer reads every byte, in order (records half sent would break TLS).
    client, server = tls_pair(certs)
    received = bytearray()
    with trio.fail_after(HANG_GUARD):
        await shaken(client, server)
        sent = bytearray()
        chunk = os.urandom(100_000)
        while not client.unsent:  # the server does not read: the socket fills
            assert client.send_now(chunk) == len(chunk)
            sent += chunk
        assert client.send_now(b"x") == 0  # records wait: a send now would pass them
        tail = os.urandom(50_000)
        waiting = await cancel_once_blocked(lambda: client.send_all(tail))
        assert waiting.cancelled_caught and client.unsent
        last = b"the end"

        async def read_all() -> None:
            while len(received) < len(sent) + len(tail) + len(last):
                received.extend(await server.receive_some())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            await client.send_all(last)
        assert not client.unsent
    assert received == sent + tail + last
    await client.aclose()
    await server.aclose()


async def test_a_tls_read_cancelled_while_it_waits_loses_nothing(certs):
    # HL7's per-message loop cuts reads short on purpose and reads again.
    client, server = tls_pair(certs)
    with trio.fail_after(HANG_GUARD):
        await shaken(client, server)
        assert (await cancel_once_blocked(server.receive_some)).cancelled_caught
        await client.send_all(b"MSH|^~\\&|after the cut")
        assert await server.receive_some() == b"MSH|^~\\&|after the cut"
    await client.aclose()
    await server.aclose()


async def test_a_tls_handshake_with_a_plain_peer_fails_in_words(certs):
    from gateway.net.tls import describe_tls_error

    client, server = tls_pair(certs)
    plain = client.transport_stream
    with trio.fail_after(HANG_GUARD):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(plain.send_all, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            with pytest.raises(trio.BrokenResourceError) as failure:
                await server.do_handshake()
    assert describe_tls_error(failure.value, "") == "the peer sent plain HTTP to a TLS port"
    plain.close()
    await server.aclose()


async def test_an_answer_read_over_tls_waits_first_and_still_takes_what_is_there(certs):
    client, server = tls_pair(certs)
    with trio.fail_after(HANG_GUARD):
        await shaken(client, server)
        await client.send_all(b"already here")  # before the wait began
        assert await channel.receive(server, True) == b"already here"
        # a wait cancelled before its answer came has taken nothing
        async with trio.open_nursery() as nursery:
            nursery.start_soon(channel.receive, server, True)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        await client.send_all(b"late")
        assert await channel.receive(server, True) == b"late"
        await client.send_all(b"one" * 10_000)  # several records: the rest is read after
        received = await channel.receive(server, True)
        while len(received) < 30_000:
            received += await channel.receive(server, True)
        assert received == b"one" * 10_000
        client.transport_stream.socket.shutdown(socket.SHUT_WR)  # no close_notify
        assert await channel.receive(server, True) == b""  # the end all the same
    client.close()
    server.close()
