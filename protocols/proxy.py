"""PROXY protocol (HAProxy's spec, versions 1 and 2): the header a proxy puts before a
connection's bytes to say who the client is. Sans-IO: `encode_v2` builds one, `parse` reads one.

Version 2 is what medgate sends (binary, one write); both versions are read, as HAProxy's
`send-proxy` and `send-proxy-v2` write them. A LOCAL (v2) or UNKNOWN (v1) header carries no
addresses: the proxy's own connection, e.g. a health check.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the spec's bound for a whole v1 line, CRLF included
V2_MAX_EXTRA = 1024  # addresses and TLVs we read past the 16-byte v2 header, at most
_FAMILIES = {0x11: 4, 0x21: 6}  # TCP over IPv4 / IPv6 (UDP and UNIX are not ours to relay)


class ProxyError(Exception):
    """Not a PROXY header (or a broken one); the message says what is wrong."""


@dataclass(frozen=True)
class ProxyHeader:
    """A whole header: its length on the wire and, unless LOCAL/UNKNOWN, both ends' addresses."""

    length: int
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None


def encode_v2(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A v2 PROXY TCP header: `source` is the client, `destination` the address it reached.
    Mixed families are sent as IPv6 (an IPv4 address mapped as ::ffff:a.b.c.d)."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    if src.version == dst.version == 4:
        family, body = 0x11, src.packed + dst.packed
    else:
        family, body = 0x21, _as_v6(src).packed + _as_v6(dst).packed
    body += struct.pack("!HH", source[1], destination[1])
    return V2_SIGNATURE + bytes((0x21, family)) + struct.pack("!H", len(body)) + body


def _as_v6(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv6Address:
    if address.version == 6:
        return address
    return ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)


def parse(data: bytes) -> ProxyHeader | None:
    """The header at the start of `data`; None while more bytes are needed."""
    if data[:len(V2_SIGNATURE)] == V2_SIGNATURE[:len(data)] and data[:1] == b"\r":
        return _parse_v2(data)
    if data[:len(V1_PREFIX)] == V1_PREFIX[:len(data)]:
        return _parse_v1(data)
    raise ProxyError("the connection does not start with a PROXY protocol header")


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) < 16:
        return None
    version_command, family = data[12], data[13]
    (length,) = struct.unpack("!H", data[14:16])
    if version_command >> 4 != 2:
        raise ProxyError(f"PROXY v2 header with version {version_command >> 4}")
    command = version_command & 0x0F
    if command not in (0, 1):
        raise ProxyError(f"PROXY v2 header with unknown command {command}")
    if length > V2_MAX_EXTRA:
        raise ProxyError(f"PROXY v2 header of {16 + length} bytes (at most "
                         f"{16 + V2_MAX_EXTRA} are read)")
    if len(data) < 16 + length:
        return None
    if command == 0 or family not in _FAMILIES:  # LOCAL, or a family we do not relay
        if command == 1 and family != 0:
            raise ProxyError(f"PROXY v2 header for address family 0x{family:02x} (only TCP "
                             "over IPv4 and IPv6)")
        return ProxyHeader(16 + length)
    size = 4 if _FAMILIES[family] == 4 else 16
    if length < 2 * size + 4:
        raise ProxyError(f"PROXY v2 header too short for its addresses ({length} bytes)")
    body = data[16:16 + 2 * size + 4]
    src = ipaddress.ip_address(body[:size])
    dst = ipaddress.ip_address(body[size:2 * size])
    sport, dport = struct.unpack("!HH", body[2 * size:])
    return ProxyHeader(16 + length, (_unmapped(src), sport), (_unmapped(dst), dport))


def _unmapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


def _parse_v1(data: bytes) -> ProxyHeader | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyError(f"PROXY v1 line longer than {V1_MAX} bytes")
        return None
    try:
        words = data[:end].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyError("PROXY v1 line is not ASCII") from None
    if len(words) >= 2 and words[1] == "UNKNOWN":
        return ProxyHeader(end + 2)
    if len(words) != 6 or words[1] not in ("TCP4", "TCP6"):
        raise ProxyError("PROXY v1 line is not 'PROXY TCP4|TCP6 SRC DST SPORT DPORT'")
    try:
        src, dst = ipaddress.ip_address(words[2]), ipaddress.ip_address(words[3])
        sport, dport = _port(words[4]), _port(words[5])
    except ValueError as exc:
        raise ProxyError(f"PROXY v1 line: {exc}") from None
    if src.version != dst.version or src.version != int(words[1][3]):
        raise ProxyError(f"PROXY v1 line: addresses do not match {words[1]}")
    return ProxyHeader(end + 2, (str(src), sport), (str(dst), dport))


def _port(text: str) -> int:
    if not text.isdigit() or (len(text) > 1 and text[0] == "0") or int(text) > 65535:
        raise ValueError(f"{text!r} is not a port")
    return int(text)


__all__ = ["ProxyError", "ProxyHeader", "V2_SIGNATURE", "encode_v2", "parse"]
