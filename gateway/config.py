"""TOML configuration -> frozen, typed model.

Rule: every error is a `ConfigError` whose text names the file, the line where it can be found,
and the key path (`examples/x.toml:14: vip "dicom" member "pacs1": address "10.0.0.1": missing
port`), so an engineer can fix the file without reading code.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROTOCOLS = ("dicom", "hl7", "xds", "tcp")
MODES = ("balance", "failover")
ALGORITHMS = ("roundrobin", "leastconn")
CHECKS = ("tcp", "http", "dicom-echo", "hl7-ack", "xds-query")
PERSISTENCE_KEYS = {
    "tcp": ("source-ip",),
    "dicom": ("source-ip", "calling-ae"),
    "hl7": ("source-ip", "msh-4", "pid-3", "none"),
    "xds": ("source-ip",),
}
PERSISTENCE_METHODS = ("table", "hash")
ROLES = ("registry", "repository", "both")
NAK_CODES = ("AR", "AE", "CE", "CR")
ADMIN_ROLES = ("read", "operate")
# Keys that mean something for one protocol only: set on a VIP of another, they are an error.
PROTOCOL_KEYS = {
    "allowed_calling_aes": ("dicom",), "routes": ("dicom",),
    "max_message_bytes": ("hl7",), "nak_code": ("hl7",), "message_timeout": ("hl7",),
    "header_timeout": ("xds",), "trusted_proxies": ("xds",),
}


class ConfigError(Exception):
    """A configuration problem; the message is one line a user can act on."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class HealthConfig:
    check: str = "tcp"
    interval: float = 5.0
    timeout: float = 4.0
    rise: int = 2
    fall: int = 3
    port: int | None = None  # check a different port than the service port
    path: str = "/"  # http / xds-query
    expect: str = ""  # http: body must contain this text
    tls: bool = False  # http: speak HTTPS (certificate not verified: internal CAs)
    calling_ae: str = "MEDGATE"  # dicom-echo
    message: str = ""  # hl7-ack: path to a test message
    patient_id: str = ""  # xds-query
    partial_success: bool = False  # xds-query: accept PartialSuccess


@dataclass(frozen=True)
class Persistence:
    key: str = "source-ip"
    timeout: float = 3600.0
    method: str = "table"


@dataclass(frozen=True)
class MemberConfig:
    name: str
    address: Address
    weight: int = 100
    max_connections: int = 0
    ae_title: str = ""
    role: str = "both"


@dataclass(frozen=True)
class VipConfig:
    name: str
    protocol: str
    listen: tuple[Address, ...]
    members: tuple[MemberConfig, ...]
    mode: str = "balance"
    algorithm: str = "roundrobin"
    persistence: Persistence | None = None
    health: HealthConfig = field(default_factory=HealthConfig)
    connect_timeout: float = 4.0
    assoc_timeout: float = 4.0
    ack_timeout: float = 30.0
    client_timeout: float = 3600.0
    server_timeout: float = 3600.0
    error_limit: int = 3
    allowed_calling_aes: tuple[str, ...] = ()
    routes: tuple[tuple[str, tuple[str, ...]], ...] = ()
    max_message_bytes: int = 16 * 1024 * 1024
    nak_code: str = ""  # "" = AR in original acknowledgment mode, CE in enhanced mode
    message_timeout: float = 20.0  # hl7: all tries of one message; ack_timeout capped by it
    header_timeout: float = 10.0  # xds: a request head must be whole this long after it starts
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    max_clients: int = 0  # 0: a share of the gateway-wide limit


@dataclass(frozen=True)
class AdminUser:
    """A named admin token: `read` may look, `operate` may also change members and reload."""

    name: str
    token: str = field(repr=False)
    role: str = "operate"


@dataclass(frozen=True)
class GatewaySettings:
    admin: Address | None = Address("127.0.0.1", 9090)  # None: no admin server
    admin_token: str = field(default="", repr=False)
    audit: str = "-"
    drain_timeout: float = 30.0
    max_clients: int = 0  # 0: derived from the open-files limit at start
    admin_hosts: tuple[str, ...] = ()  # Host names the admin server answers besides its own
    admin_users: tuple[AdminUser, ...] = ()  # admin_token, if set, is the operator "admin"


@dataclass(frozen=True)
class Config:
    gateway: GatewaySettings
    vips: tuple[VipConfig, ...]
    source: str = "<string>"

    def vip(self, name: str) -> VipConfig:
        """The VIP called `name` (KeyError if there is none)."""
        for vip in self.vips:
            if vip.name == name:
                return vip
        raise KeyError(name)


# ---------------------------------------------------------------------------- value parsers

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


def parse_address(value: Any, *, default_host: str | None = None) -> Address:
    """'10.0.0.1:104', '[::1]:104', 'pacs1.example.org:104' -> Address."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{value!r} is not an address (use \"host:port\" or \"[v6]:port\")")
    text = value.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"{value!r}: missing ']' after the IPv6 address")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{value!r}: {host!r} is not an IPv6 address") from None
        if not rest.startswith(":"):
            raise ValueError(f"{value!r}: missing port")
        port_text = rest[1:]
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


# ---------------------------------------------------------------------------- loading


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; raises ConfigError naming the file, line and key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse_config(text, source=str(path))


def parse_config(text: str, source: str = "<string>") -> Config:
    """Validate TOML text; `source` names it in error messages."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = re.search(r"at line (\d+)", str(exc))
        where = f"{source}:{line.group(1)}" if line else source
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    return _Loader(text, source).load(document)


def config_from_dict(document: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a config given as data (the TOML document's shape), e.g. from a test."""
    return _Loader("", source).load(document)


class _Loader:
    """Walks the TOML document, keeping where it is so errors can name file, line and key."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.lines = text.splitlines()

    # -- error reporting

    def fail(self, section: tuple[str, int, int], context: str, key: str | None, why: str):
        line = self.find_line(section, key)
        where = f"{self.source}:{line}" if line else self.source
        parts = [p for p in (context, key and f"{key}", why) if p]
        raise ConfigError(f"{where}: " + ": ".join(parts))

    def find_line(self, section: tuple[str, int, int], key: str | None) -> int | None:
        """Line number of `key` in a section: ("gateway"|"defaults"|"vip"|"member", vip#, member#)."""
        kind, vip_index, member_index = section
        vips = members = -1
        current: tuple[str, int, int] | None = None
        header_line = None
        for number, raw in enumerate(self.lines, start=1):
            line = raw.strip()
            if line.startswith("[[vip.member]]"):
                members += 1
                current = ("member", vips, members)
            elif line.startswith("[[vip]]"):
                vips, members = vips + 1, -1
                current = ("vip", vips, -1)
            elif line.startswith("["):
                name = line.strip("[] ").split(".")[0]
                current = (name, -1, -1)
            else:
                if current == section and key and re.match(rf"{re.escape(key)}\s*=", line):
                    return number
                continue
            if current == section:
                header_line = number
        return header_line

    # -- top level

    def load(self, document: dict[str, Any]) -> Config:
        top = ("", -1, -1)
        for key in document:
            if key not in ("gateway", "defaults", "vip"):
                self.fail(top, "", key, "unknown section (expected [gateway], [defaults], [[vip]])")
        gateway = self.load_gateway(document.get("gateway", {}))
        defaults = document.get("defaults", {})
        if not isinstance(defaults, dict):
            self.fail(top, "", "defaults", "must be a table")
        for key in defaults:
            if key not in _DEFAULTABLE:
                self.fail(("defaults", -1, -1), "[defaults]", key,
                          f"unknown key (allowed: {', '.join(sorted(_DEFAULTABLE))})")
        raw_vips = document.get("vip", [])
        if not isinstance(raw_vips, list) or not raw_vips:
            self.fail(top, "", "vip", "define at least one [[vip]]")
        vips: list[VipConfig] = []
        for index, raw in enumerate(raw_vips):
            vip = self.load_vip(index, raw, defaults)
            if any(v.name == vip.name for v in vips):
                self.fail(("vip", index, -1), f"vip {vip.name!r}", "name", "duplicate VIP name")
            vips.append(vip)
        self.check_listen_conflicts(vips)
        return Config(gateway=gateway, vips=tuple(vips), source=self.source)

    def load_gateway(self, raw: Any) -> GatewaySettings:
        section = ("gateway", -1, -1)
        if not isinstance(raw, dict):
            self.fail(("", -1, -1), "", "gateway", "must be a table")
        values: dict[str, Any] = {}
        users: list[AdminUser] = []
        for key, value in raw.items():
            try:
                if key == "admin":
                    values[key] = parse_address(value) if value != "" else None
                elif key in ("admin_token", "audit"):
                    values[key] = _string(value)
                elif key == "admin_token_file":
                    values["admin_token"] = self.read_token(value)
                elif key == "drain_timeout":
                    values[key] = parse_duration(value)
                elif key == "max_clients":
                    values[key] = _count(value)
                elif key == "admin_hosts":
                    values[key] = _host_list(value)
                elif key == "admin_user":
                    users = self.load_admin_users(section, value)
                else:
                    raise _Unknown(f"unknown key (allowed: {', '.join(_GATEWAY_KEYS)})")
            except (ValueError, _Unknown) as exc:
                self.fail(section, "[gateway]", key, str(exc))
        if "admin_token" in raw and "admin_token_file" in raw:
            self.fail(section, "[gateway]", "admin_token_file", "set admin_token or "
                      "admin_token_file, not both")
        if values.get("admin_token"):
            users.insert(0, AdminUser("admin", values["admin_token"], "operate"))
        tokens = [user.token for user in users]
        if len(set(tokens)) != len(tokens):
            self.fail(section, "[gateway]", "admin_user", "two admin users share a token")
        names = [user.name for user in users]
        if len(set(names)) != len(names):
            self.fail(section, "[gateway]", "admin_user", "two admin users share a name "
                      "(admin_token is the user \"admin\")")
        settings = GatewaySettings(**values, admin_users=tuple(users))
        if settings.admin is not None and not users and not is_loopback(settings.admin.host):
            self.fail(section, "[gateway]", "admin",
                      f"{settings.admin} is not a loopback address: set admin_token too")
        return settings

    def read_token(self, value: Any) -> str:
        """A token from a file (relative to the config file); its surrounding space ignored."""
        path = Path(_string(value))
        if not path.is_absolute():
            path = Path(self.source).parent / path
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{str(path)!r}: cannot read: {getattr(exc, 'strerror', exc)}") from None
        if len(token) < 16:
            raise ValueError(f"{str(path)!r}: a token needs at least 16 characters")
        return token

    def load_admin_users(self, section, raw: Any) -> list[AdminUser]:
        if not isinstance(raw, list):
            raise ValueError("write [[gateway.admin_user]] tables with name, token_file, role")
        users = []
        for index, entry in enumerate(raw, 1):
            if not isinstance(entry, dict):
                raise ValueError(f"#{index}: must be a table")
            unknown = set(entry) - {"name", "token_file", "role"}
            if unknown:
                raise ValueError(f"#{index}: {sorted(unknown)[0]}: unknown key (allowed: name, "
                                 "token_file, role)")
            name = entry.get("name")
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.@-]+", name):
                raise ValueError(f"#{index}: name: required: letters, digits, '.', '_', '@', '-'")
            role = entry.get("role", "read")
            if role not in ADMIN_ROLES:
                raise ValueError(f"user {name!r}: role: {role!r} is not one of "
                                 f"{', '.join(ADMIN_ROLES)}")
            if "token_file" not in entry:
                raise ValueError(f"user {name!r}: token_file: required")
            try:
                token = self.read_token(entry["token_file"])
            except ValueError as exc:
                raise ValueError(f"user {name!r}: token_file: {exc}") from None
            users.append(AdminUser(name, token, role))
        return users

    # -- VIPs

    def load_vip(self, index: int, raw: Any, defaults: dict[str, Any]) -> VipConfig:
        section = ("vip", index, -1)
        if not isinstance(raw, dict):
            self.fail(section, f"vip #{index + 1}", None, "must be a table")
        name = raw.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""):
            self.fail(section, f"vip #{index + 1}", "name",
                      "required: letters, digits, '.', '_' or '-'")
        context = f"vip {name!r}"
        merged = {k: v for k, v in defaults.items() if k not in ("health", "persistence")}
        merged.update(raw)
        for key in merged:
            if key not in _VIP_KEYS:
                self.fail(section, context, key, f"unknown key (allowed: {', '.join(sorted(_VIP_KEYS))})")
        for key in raw:  # a [defaults] key applies to the VIPs it means something for
            if key in PROTOCOL_KEYS and raw.get("protocol") not in PROTOCOL_KEYS[key]:
                self.fail(section, context, key, f"only for protocol "
                          f"{' or '.join(PROTOCOL_KEYS[key])} (this VIP is {raw.get('protocol')!r})")

        def want(key: str, parse, *args):
            try:
                return parse(merged[key], *args)
            except (ValueError, TypeError) as exc:
                self.fail(section, context, key, str(exc))

        protocol = merged.get("protocol")
        if protocol not in PROTOCOLS:
            self.fail(section, context, "protocol", f"{protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if "listen" not in merged:
            self.fail(section, context, "listen", "required: one address or a list of them")
        listen_raw = merged["listen"] if isinstance(merged["listen"], list) else [merged["listen"]]
        listen = tuple(want("listen", lambda _v, a=a: parse_address(a)) for a in listen_raw)
        if not listen:
            self.fail(section, context, "listen", "give at least one address")
        values: dict[str, Any] = {"name": name, "protocol": protocol, "listen": listen}
        for key in ("mode", "algorithm", "nak_code"):
            if key in merged:
                allowed = {"mode": MODES, "algorithm": ALGORITHMS, "nak_code": NAK_CODES}[key]
                if merged[key] not in allowed:
                    self.fail(section, context, key,
                              f"{merged[key]!r} is not one of {', '.join(allowed)}")
                values[key] = merged[key]
        for key in ("connect_timeout", "assoc_timeout", "ack_timeout", "client_timeout",
                    "server_timeout", "message_timeout", "header_timeout"):
            if key in merged:
                values[key] = want(key, parse_duration)
                if values[key] <= 0:
                    self.fail(section, context, key, "must be more than 0")
        if "assoc_timeout" not in values:
            values["assoc_timeout"] = values.get("connect_timeout", VipConfig.connect_timeout)
        if "error_limit" in merged:
            values["error_limit"] = want("error_limit", _positive_int)
        if "max_message_bytes" in merged:
            values["max_message_bytes"] = want("max_message_bytes", parse_size)
        if "max_clients" in merged:
            values["max_clients"] = want("max_clients", _count)
        if "trusted_proxies" in merged:
            values["trusted_proxies"] = want("trusted_proxies", _networks)
        if "allowed_calling_aes" in merged:
            values["allowed_calling_aes"] = want("allowed_calling_aes", _ae_list)
        values["health"] = self.load_health(section, context, protocol, defaults.get("health"),
                                            merged.get("health"))
        values["persistence"] = self.load_persistence(section, context, protocol,
                                                      defaults.get("persistence"),
                                                      merged.get("persistence"))
        values["members"] = self.load_members(index, name, protocol, merged.get("member"))
        if "routes" in merged:
            values["routes"] = self.load_routes(section, context, merged["routes"],
                                                values["members"])
        return VipConfig(**values)

    def load_health(self, section, context, protocol, default_raw, raw) -> HealthConfig:
        merged: dict[str, Any] = {}
        for part in (default_raw, raw):
            if part is None:
                continue
            if not isinstance(part, dict):
                self.fail(section, context, "health", "must be a table, e.g. { check = \"tcp\" }")
            merged.update(part)
        values: dict[str, Any] = {}
        for key, value in merged.items():
            try:
                if key == "check":
                    if value not in CHECKS:
                        raise ValueError(f"{value!r} is not one of {', '.join(CHECKS)}")
                    values[key] = value
                elif key in ("interval", "timeout"):
                    values[key] = parse_duration(value)
                    if values[key] <= 0:
                        raise ValueError("must be more than 0")
                elif key in ("rise", "fall"):
                    values[key] = _positive_int(value)
                elif key == "port":
                    values[key] = _port(value)
                elif key in ("path", "expect", "calling_ae", "message", "patient_id"):
                    values[key] = _string(value)
                elif key in ("tls", "partial_success"):
                    if not isinstance(value, bool):
                        raise ValueError(f"{value!r} is not true or false")
                    values[key] = value
                else:
                    raise _Unknown(f"unknown key (allowed: {', '.join(_HEALTH_KEYS)})")
            except (ValueError, _Unknown) as exc:
                self.fail(section, context, "health", f"{key}: {exc}")
        if values.get("message"):
            message = Path(values["message"])
            if not message.is_absolute():  # relative to the config file, not to the cwd
                message = Path(self.source).parent / message
            if not message.is_file():
                self.fail(section, context, "health", f"message: {str(message)!r}: no such file")
            values["message"] = str(message)
        health = HealthConfig(**values)
        if health.check == "xds-query" and not health.patient_id:
            self.fail(section, context, "health", "check xds-query needs patient_id")
        if "path" in values and not health.path.startswith("/"):
            self.fail(section, context, "health", f"path: {health.path!r} must start with '/'")
        if health.check == "dicom-echo" and not 0 < len(health.calling_ae) <= 16:
            self.fail(section, context, "health", "calling_ae: 1 to 16 characters")
        return health

    def load_persistence(self, section, context, protocol, default_raw, raw) -> Persistence | None:
        if raw is None and default_raw is None:
            return None
        merged: dict[str, Any] = {}
        for part in (default_raw, raw):
            if part is None:
                continue
            if not isinstance(part, dict):
                self.fail(section, context, "persistence",
                          "must be a table, e.g. { key = \"source-ip\", timeout = \"1h\" }")
            merged.update(part)
        values: dict[str, Any] = {}
        for key, value in merged.items():
            if key == "key":
                if value not in PERSISTENCE_KEYS[protocol]:
                    self.fail(section, context, "persistence",
                              f"key: {value!r} is not one of {', '.join(PERSISTENCE_KEYS[protocol])}"
                              f" for protocol {protocol}")
                values[key] = value
            elif key == "timeout":
                try:
                    values[key] = parse_duration(value)
                except ValueError as exc:
                    self.fail(section, context, "persistence", f"timeout: {exc}")
            elif key == "method":
                if value not in PERSISTENCE_METHODS:
                    self.fail(section, context, "persistence",
                              f"method: {value!r} is not one of {', '.join(PERSISTENCE_METHODS)}")
                values[key] = value
            else:
                self.fail(section, context, "persistence",
                          f"{key}: unknown key (allowed: key, timeout, method)")
        persistence = Persistence(**values)
        return None if persistence.key == "none" else persistence

    def load_members(self, vip_index: int, vip_name: str, protocol: str, raw: Any):
        section = ("vip", vip_index, -1)
        context = f"vip {vip_name!r}"
        if not isinstance(raw, list) or not raw:
            self.fail(section, context, "member", "define at least one [[vip.member]]")
        members: list[MemberConfig] = []
        for index, entry in enumerate(raw):
            msection = ("member", vip_index, index)
            name = entry.get("name") if isinstance(entry, dict) else None
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""):
                self.fail(msection, f"{context} member #{index + 1}", "name",
                          "required: letters, digits, '.', '_' or '-'")
            mcontext = f"{context} member {name!r}"
            if any(m.name == name for m in members):
                self.fail(msection, mcontext, "name", "duplicate member name in this VIP")
            values: dict[str, Any] = {"name": name}
            for key, value in entry.items():
                try:
                    if key == "name":
                        continue
                    if key == "address":
                        values[key] = parse_address(value)
                        if values[key].port == 0:
                            raise ValueError(f"{value!r}: port 0 is not a member port")
                    elif key == "weight":
                        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1000:
                            raise ValueError(f"{value!r} is not a whole number from 0 to 1000")
                        values[key] = value
                    elif key == "max_connections":
                        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                            raise ValueError(f"{value!r} is not a whole number >= 0 (0 = unlimited)")
                        values[key] = value
                    elif key == "ae_title":
                        values[key] = _ae_title(value)
                    elif key == "role":
                        if value not in ROLES:
                            raise ValueError(f"{value!r} is not one of {', '.join(ROLES)}")
                        values[key] = value
                    else:
                        raise _Unknown("unknown key (allowed: name, address, weight, "
                                       "max_connections, ae_title, role)")
                except (ValueError, _Unknown) as exc:
                    self.fail(msection, mcontext, key, str(exc))
            if "address" not in values:
                self.fail(msection, mcontext, "address", "required, e.g. \"10.12.1.110:104\"")
            members.append(MemberConfig(**values))
        return tuple(members)

    def load_routes(self, section, context, raw, members):
        if not isinstance(raw, dict) or not raw:
            self.fail(section, context, "routes",
                      "must be a table of called AE title -> member names, e.g. { \"*\" = [\"pacs1\"] }")
        names = {m.name for m in members}
        routes = []
        for called, targets in raw.items():
            if called != "*":
                try:
                    _ae_title(called)
                except ValueError as exc:
                    self.fail(section, context, "routes", f"{called!r}: {exc}")
            if isinstance(targets, str):
                targets = [targets]
            if not isinstance(targets, list) or not targets:
                self.fail(section, context, "routes", f"{called!r}: give a list of member names")
            for target in targets:
                if target not in names:
                    self.fail(section, context, "routes",
                              f"{called!r}: no member named {target!r} in this VIP")
            routes.append((called.strip(), tuple(targets)))
        return tuple(routes)

    def check_listen_conflicts(self, vips: list[VipConfig]) -> None:
        seen: dict[Address, str] = {}
        for index, vip in enumerate(vips):
            for address in vip.listen:
                if address.port == 0:
                    continue  # ephemeral: the kernel picks distinct ports
                if address in seen:
                    self.fail(("vip", index, -1), f"vip {vip.name!r}", "listen",
                              f"{address} is already used by vip {seen[address]!r}")
                seen[address] = vip.name


class _Unknown(Exception):
    pass


_DEFAULTABLE = frozenset({
    "connect_timeout", "assoc_timeout", "ack_timeout", "client_timeout", "server_timeout",
    "error_limit", "mode", "algorithm", "persistence", "health", "max_message_bytes", "nak_code",
    "message_timeout", "header_timeout", "trusted_proxies", "max_clients",
})
_GATEWAY_KEYS = ("admin", "admin_token", "admin_token_file", "admin_hosts", "admin_user",
                 "audit", "drain_timeout", "max_clients")
_VIP_KEYS = _DEFAULTABLE | {"name", "protocol", "listen", "member", "allowed_calling_aes", "routes"}
_HEALTH_KEYS = ("check", "interval", "timeout", "rise", "fall", "port", "path", "expect", "tls",
                "calling_ae", "message", "patient_id", "partial_success")


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    return value


def _positive_int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{value!r} is not a whole number >= 1")
    return value


def _count(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not a whole number >= 0 (0 = the default)")
    return value


def _networks(value: Any) -> tuple:
    if not isinstance(value, list):
        raise ValueError('must be a list of addresses or networks, e.g. ["10.1.0.0/16"]')
    networks = []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(_string(item), strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an address or network (CIDR)") from None
    return tuple(networks)


def _host_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError('must be a list of host names, e.g. ["gw1.hospital.local"]')
    for item in value:
        if not isinstance(item, str) or not re.fullmatch(r"[A-Za-z0-9.:_\[\]-]+", item):
            raise ValueError(f"{item!r} is not a host name")
    return tuple(item.lower() for item in value)


def _port(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ValueError(f"{value!r} is not a port from 1 to 65535")
    return value


def _ae_title(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{value!r} is not an AE title")
    title = value.strip()
    if len(title) > 16 or not title.isascii() or "\\" in title or not title.isprintable():
        raise ValueError(f"{value!r} is not an AE title (1-16 printable ASCII characters, no '\\')")
    return title


def _ae_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ValueError("must be a list of AE titles")
    return tuple(_ae_title(v) for v in value)


def is_loopback(host: str) -> bool:
    """localhost or a loopback address literal."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
