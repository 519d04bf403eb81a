"""Parsers for the values of config keys: durations, sizes, addresses, names, lists.

Each raises ValueError with a sentence the loader puts after the file, line and key.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from enum import StrEnum
from typing import Any, TypeVar

from gateway.config.model import Address


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"b": 1, "kb": 1000, "kib": 1024, "mb": 1000**2, "mib": 1024**2,
               "gb": 1000**3, "gib": 1024**3, None: 1}


def parse_duration(value: Any) -> float:
    """'500ms', '4s', '2m', '1h', '1d' or a plain number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration (use e.g. \"500ms\", \"4s\", \"1h\")")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{value!r} is negative")
        return float(value)
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match:
            return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    raise ValueError(f"{value!r} is not a duration (use e.g. \"500ms\", \"4s\", \"1h\")")


def parse_size(value: Any) -> int:
    """'16MB', '512KiB', or a plain number of bytes -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            unit = match.group(2).lower() if match.group(2) else None
            size = int(match.group(1)) * _SIZE_UNITS[unit]
            if size > 0:
                return size
    raise ValueError(f"{value!r} is not a size (use e.g. \"16MB\", \"512KiB\" or bytes)")


def _bracketed(value: str, text: str) -> tuple[str, str]:
    """'[::1]:104' -> ('::1', '104')."""
    host, sep, rest = text[1:].partition("]")
    if not sep:
        raise ValueError(f"{value!r}: missing ']' after the IPv6 address")
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"{value!r}: {host!r} is not an IPv6 address") from None
    if not rest.startswith(":"):
        raise ValueError(f"{value!r}: missing port")
    return host, rest[1:]


def parse_address(value: Any, *, default_host: str | None = None) -> Address:
    """'10.0.0.1:104', '[::1]:104', 'pacs1.example.org:104' -> Address."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{value!r} is not an address (use \"host:port\" or \"[v6]:port\")")
    text = value.strip()
    if text.startswith("["):
        host, port_text = _bracketed(value, text)
    else:
        if text.count(":") > 1:
            raise ValueError(f"{value!r}: write IPv6 addresses in brackets, e.g. \"[::1]:104\"")
        host, sep, port_text = text.rpartition(":")
        if not sep:
            if default_host is None:
                raise ValueError(f"{value!r}: missing port")
            host, port_text = default_host, text
        if not host:
            raise ValueError(f"{value!r}: missing host")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", host):
            raise ValueError(f"{value!r}: {host!r} is not a host name or IPv4 address")
        if re.fullmatch(r"[\d.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"{value!r}: {host!r} is not an IPv4 address") from None
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r}: port {port_text!r} is not a number from 0 to 65535")
    return Address(host, int(port_text))



def string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    return value


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


_CERT_NAME = re.compile(r"(CN=|DNS:|IP:|email:|URI:).+")


def certificate_aes(value: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """{ "CN=ct1" = ["CT1"], "DNS:us2.example.org" = ["US2"] }: what each certificate may call."""
    if not isinstance(value, dict) or not value:
        raise ValueError('must be a table of certificate name -> AE titles, e.g. '
                         '{ "CN=ct1.hospital.local" = ["CT1"] }')
    pairs = []
    for name, titles in value.items():
        if not _CERT_NAME.fullmatch(name):
            raise ValueError(f"{name!r}: name a certificate by CN=..., DNS:..., IP:..., "
                             "email:... or URI:...")
        try:
            pairs.append((name, ae_list(titles if isinstance(titles, list) else [titles])))
        except ValueError as exc:
            raise ValueError(f"{name!r}: {exc}") from None
    return tuple(pairs)


def positive_int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{value!r} is not a whole number >= 1")
    return value


def count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not a whole number >= 0 (0 = the default)")
    return value


def whole_number(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not a whole number >= 0")
    return value


def hl7_name(value: Any) -> str:
    """An HL7 namespace ID (MSH-3, MSH-4 of the gateway's own NAKs): 1 to 180 characters of
    printable ASCII with none of HL7's delimiters |^~\\& in it."""
    text = string(value)
    if not 0 < len(text) <= 180 or not text.isprintable() or not text.isascii() or any(
            char in text for char in "|^~\\&"):
        raise ValueError(f"{text!r}: 1 to 180 printable ASCII characters, none of | ^ ~ \\ &")
    return text


def did_you_mean(word: str, allowed: Iterable[str]) -> str:
    """' (did you mean 'x'?)' when one allowed word is close to `word`, else ''. Close: by
    difflib's ratio, or the same words in another order (timeout_connect, connect_timeout)."""
    allowed = list(allowed)
    close = difflib.get_close_matches(word, allowed, n=1, cutoff=0.6)
    reordered = [name for name in allowed if sorted(name.split("_")) == sorted(word.split("_"))]
    found = close or reordered
    return f" (did you mean {found[0]!r}?)" if found else ""


def unknown_key(key: str, allowed: Iterable[str]) -> str:
    """The text for a key its table does not have: the closest allowed one, then them all."""
    allowed = sorted(allowed)
    return f"unknown key{did_you_mean(key, allowed)} (allowed: {', '.join(allowed)})"


Choice = TypeVar("Choice", bound=StrEnum)


def choice(value: Any, choices: type[Choice], allowed: Sequence[Choice] | None = None) -> Choice:
    """`value` as a member of `choices` (of `allowed`, where only some apply here)."""
    allowed = list(choices) if allowed is None else allowed
    if isinstance(value, str) and value in allowed:
        return choices(value)
    names = [c.value for c in allowed]
    hint = did_you_mean(value, names) if isinstance(value, str) else ""
    raise ValueError(f"{value!r} is not one of {', '.join(map(repr, names))}{hint}")


def one_of(choices: type[Choice]) -> Callable[[Any], Choice]:
    """A parser that takes one of `choices`' values."""
    return lambda value: choice(value, choices)


def prefixed(prefix: str, parser: Callable[[Any], Any], value: Any) -> Any:
    """`parser(value)`, its error led by `prefix` (the key inside a table such as health)."""
    try:
        return parser(value)
    except ValueError as exc:
        raise ValueError(f"{prefix}: {exc}") from None


def positive_duration(value: Any) -> float:
    seconds = parse_duration(value)
    if seconds <= 0:
        raise ValueError("must be more than 0")
    return seconds


def networks(value: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    if not isinstance(value, list):
        raise ValueError('must be a list of addresses or networks, e.g. ["10.1.0.0/16"]')
    networks = []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(string(item), strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an address or network (CIDR)") from None
    return tuple(networks)


def host_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError('must be a list of host names, e.g. ["gw1.hospital.local"]')
    for item in value:
        if not isinstance(item, str) or not re.fullmatch(r"[A-Za-z0-9.:_\[\]-]+", item):
            raise ValueError(f"{item!r} is not a host name")
    return tuple(item.lower() for item in value)


def port_number(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ValueError(f"{value!r} is not a port from 1 to 65535")
    return value


def oid(value: Any) -> str:
    """An ISO OID as XDS writes them: '1.3.6.1.4.1.21367.2010.1.2.1125' (at most 64 characters)."""
    if not isinstance(value, str) or not re.fullmatch(r"[0-2](\.(0|[1-9][0-9]*))+", value) \
            or len(value) > 64:
        raise ValueError(f"{value!r} is not an OID (digits and dots, e.g. \"1.3.6.1.4.1.21367.1\")")
    return value


def home_community_id(value: Any) -> str:
    """An XCA homeCommunityId: 'urn:oid:' and an OID (ITI TF-3 §4.2.3.2.12)."""
    if not isinstance(value, str) or not value.startswith("urn:oid:"):
        raise ValueError(f"{value!r} is not a homeCommunityId (\"urn:oid:\" and an OID, e.g. "
                         "\"urn:oid:1.3.6.1.4.1.21367.13.70.1\")")
    oid(value.removeprefix("urn:oid:"))
    return value


def ae_title(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{value!r} is not an AE title")
    title = value.strip()
    if len(title) > 16 or not title.isascii() or "\\" in title or not title.isprintable():
        raise ValueError(f"{value!r} is not an AE title (1-16 printable ASCII characters, no '\\')")
    return title


def ae_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError("must be a list of AE titles")
    return tuple(ae_title(v) for v in value)


def is_ip(host: str) -> bool:
    """Whether `host` is an IP address (not a name)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_unspecified(host: str) -> bool:
    """0.0.0.0 or :: (every address of the host), as a listen address means it."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def is_loopback(host: str) -> bool:
    """localhost or a loopback address literal."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

