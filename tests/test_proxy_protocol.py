"""PROXY protocol v2: members that ask for it learn the client's address; a medgate behind
HAProxy (`send-proxy-v2`) learns it from HAProxy, and from no one else."""

from __future__ import annotations

import ipaddress
import struct

import trio

from tests.helpers import reserved_port, start_gateway, vip_port
from tests.test_check_export import HAProxy

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def read_v2(data: bytes) -> tuple[tuple[str, int], tuple[str, int], int]:
    """The test's own reading of a v2 header (independent of protocols.proxy): source,
    destination, header length."""
    assert data[:12] == SIGNATURE, data[:16]
    assert data[12] == 0x21, "version 2, command PROXY"
    family, (length,) = data[13], struct.unpack("!H", data[14:16])
    size = {0x11: 4, 0x21: 16}[family]
    body = data[16:16 + length]
    src = ipaddress.ip_address(body[:size])
    dst = ipaddress.ip_address(body[size:2 * size])
    sport, dport = struct.unpack("!HH", body[2 * size:2 * size + 4])
    plain = lambda ip: str(getattr(ip, "ipv4_mapped", None) or ip)  # noqa: E731
    return (plain(src), sport), (plain(dst), dport), 16 + length


class HeaderReader:
    """A member that reads a PROXY v2 header, then answers 'src=... dst=...' and echoes."""

    def __init__(self) -> None:
        self.port = 0
        self.seen: list[tuple] = []

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, stream: trio.SocketStream) -> None:
        data = b""
        try:
            while len(data) < 16 or len(data) < 16 + struct.unpack("!H", data[14:16])[0]:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    return
                data += chunk
            if data[12] != 0x21:
                return  # LOCAL (a health check of ours would not send one; nothing to record)
            source, destination, length = read_v2(data)
            self.seen.append((source, destination))
            await stream.send_all(f"src={source[0]}:{source[1]} dst={destination[0]}:"
                                  f"{destination[1]}\n".encode() + data[length:])
            while chunk := await stream.receive_some(4096):
                await stream.send_all(chunk)
        except trio.BrokenResourceError:
            pass


def tcp_vip(port_line: str, member_port: int, extra: str = "") -> str:
    return f"""
[[vip]]
name = "web"
protocol = "tcp"
{port_line}
health = {{ check = "tcp", interval = "1s" }}
{extra}
[[vip.member]]
name = "reader"
address = "127.0.0.1:{member_port}"
send_proxy = true
"""


async def first_line(host: str, port: int, send: bytes = b"", source: str | None = None):
    """(local port, the line the member answered) for one connection."""
    family = trio.socket.AF_INET6 if ":" in host else trio.socket.AF_INET
    sock = trio.socket.socket(family)
    await sock.bind((source or host, 0))
    await sock.connect((host, port))
    stream = trio.SocketStream(sock)
    local_port = sock.getsockname()[1]
    with trio.fail_after(10):
        if send:
            await stream.send_all(send)
        data = b""
        while b"\n" not in data:
            try:
                chunk = await stream.receive_some(4096)
            except trio.BrokenResourceError:  # closed with our bytes unread: a reset
                break
            if not chunk:
                break
            data += chunk
    await stream.aclose()
    return local_port, data.decode(errors="replace")


async def test_a_member_with_send_proxy_learns_the_client_and_the_vip_address(nursery):
    reader = HeaderReader()
    await nursery.start(reader.serve)
    gateway = await start_gateway(nursery, tcp_vip('listen = "127.0.0.1:0"', reader.port))
    port = vip_port(gateway)
    client_port, line = await first_line("127.0.0.1", port)
    assert line.startswith(f"src=127.0.0.1:{client_port} dst=127.0.0.1:{port}\n"), line
    # The health check connects too, but sends no header and is not recorded as a client.
    assert reader.seen == [(("127.0.0.1", client_port), ("127.0.0.1", port))]


async def test_behind_haproxy_send_proxy_v2_the_real_client_is_named_to_the_member(
        nursery, tmp_path):
    reader = HeaderReader()
    await nursery.start(reader.serve)
    gateway = await start_gateway(nursery, tcp_vip(
        'listen = ["127.0.0.1:0", "[::1]:0"]', reader.port,
        'accept_proxy = true\ntrusted_proxies = ["127.0.0.1"]'))
    v4_port, v6_port = (address.port for address in gateway.bound["web"])
    front = reserved_port()
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(f"""
defaults
    mode tcp
    timeout connect 2s
    timeout client 10s
    timeout server 10s
listen front
    bind 127.0.0.1:{front}
    server medgate 127.0.0.1:{v4_port} send-proxy-v2
""")
    haproxy = await trio.to_thread.run_sync(HAProxy, cfg, tmp_path, front)
    try:
        client_port, line = await first_line("127.0.0.1", front)
        # medgate believed HAProxy: the member sees the modality's port, and the address the
        # modality reached (HAProxy's front), not HAProxy's own outgoing connection.
        assert line.startswith(f"src=127.0.0.1:{client_port} dst=127.0.0.1:{front}\n"), line

        # A client that is not a trusted proxy (::1) claims to be 10.9.9.9: not believed, and
        # its bytes reach the member as data after the gateway's own header.
        fake = SIGNATURE + bytes((0x21, 0x11)) + struct.pack("!H", 12) + bytes(
            (10, 9, 9, 9, 10, 0, 0, 1)) + struct.pack("!HH", 4000, 104)
        client_port, line = await first_line("::1", v6_port, fake)
        assert line.startswith(f"src=::1:{client_port} dst=::1:{v6_port}\n"), line

        # A trusted proxy without a header is closed: nothing reaches the member. (HAProxy
        # relays the readiness probe above too: records are told apart by the client port.)
        client_port, line = await first_line("127.0.0.1", v4_port, b"hello, no header\n")
        await trio.sleep(0.2)
        assert line == "" and client_port not in {source[1] for source, _ in reader.seen}
    finally:
        haproxy.stop()
