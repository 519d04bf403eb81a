"""The [gateway] section: admin server, tokens and users, audit, drain, client limit."""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import replace
from pathlib import Path
from collections.abc import Callable
from typing import Any

from gateway.config.model import (AdminRole, AdminUser, AtnaSettings, AtnaTransport,
                                  GatewaySettings, GroupSearch, LdapSettings)
from gateway.config.reader import Section, SectionReader
from gateway.config.tls_section import TlsSection
from gateway.config.values import (boolean, count, host_list, is_loopback, one_of,
                                   parse_address, parse_duration, parse_size, positive_int,
                                   prefixed, string, unknown_key)
from gateway.logs import LogFormat, LogLevel
from gateway.privacy import HashKeyError, KeyedHash

_SECTION: Section = ("gateway", -1, -1)
_CONTEXT = "[gateway]"


def _admin(value: Any) -> Any:
    return parse_address(value) if value != "" else None  # "": no admin server


def _peers(value: Any) -> tuple[Any, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError('a list of the other nodes\' admin addresses, e.g. ["10.12.0.22:9090"]')
    return tuple(parse_address(v) for v in value)


def _repository(value: Any) -> Any:
    address = parse_address(value)
    if address.port == 0:
        raise ValueError(f"{value!r}: give the port (6514 for TLS, 514 for UDP)")
    return address


MAX_WORKERS = 64


def _workers(value: Any) -> int:
    """A count of worker processes, or "auto": the CPUs this process may run on."""
    if value == "auto":
        return min(len(os.sched_getaffinity(0)), MAX_WORKERS)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ValueError(f'{value!r}: a number of processes from 1 to {MAX_WORKERS}, or "auto" '
                         "(the CPUs the gateway may use)")
    return value


# The [gateway] keys that are one value each; the rest have loaders of their own.
_GATEWAY_VALUES: dict[str, Callable[[Any], Any]] = {
    "admin": _admin, "admin_token": string, "audit": string, "drain_timeout": parse_duration,
    "peer_max_skew": parse_duration, "receipt_days": positive_int, "receipt_hash_uids": boolean,
    "peers": _peers, "log_format": one_of(LogFormat), "log_level": one_of(LogLevel),
    "max_clients": count, "admin_hosts": host_list, "workers": _workers,
}
_GATEWAY_KEYS = _GATEWAY_VALUES.keys() | {"admin_token_file", "admin_user", "admin_tls", "atna",
                                          "state_dir", "hash_key_file", "admin_ldap"}
_ATNA_VALUES: dict[str, Callable[[Any], Any]] = {
    "repository": _repository, "transport": one_of(AtnaTransport), "spool": string,
    "source_id": string, "site_id": string, "spool_max": parse_size,
}
_ATNA_TLS_KEYS = ("ca", "cert", "key", "server_name")
_LDAP_VALUES: dict[str, Callable[[Any], Any]] = {
    "url": string, "user_base": string, "bind_dn": string, "group_operate": string,
    "group_read": string, "user_filter": string, "group_search": one_of(GroupSearch),
    "group_base": string, "cache": parse_duration, "timeout": parse_duration,
}
_LDAP_KEYS = _LDAP_VALUES.keys() | {"password_file", "ca"}
DEFAULT_SPOOL = "/var/spool/medgate/atna"  # the ATNA spool without state_dir
LDAP_CACHE_MAX = 600.0  # a "short" bind cache: a user removed from a group loses it this soon


class GatewaySection(TlsSection, SectionReader):
    """Loads [gateway]."""

    def load_gateway(self, raw: Any) -> GatewaySettings:
        if not isinstance(raw, dict):
            self.fail(("", -1, -1), "", "gateway", "must be a table")
        values: dict[str, Any] = {}
        users: list[AdminUser] = []
        for key, value in raw.items():
            if key not in _GATEWAY_KEYS:
                self.fail(_SECTION, _CONTEXT, key, unknown_key(key, _GATEWAY_KEYS))
            if key in _GATEWAY_VALUES:
                values[key] = self.parse(_SECTION, _CONTEXT, key, _GATEWAY_VALUES[key], value)
            elif key == "state_dir":
                values[key] = self.parse(_SECTION, _CONTEXT, key, self._state_dir, value)
            elif key == "hash_key_file":
                values[key] = self.parse(_SECTION, _CONTEXT, key, self._hash_key_file, value)
            elif key == "admin_token_file":
                values["admin_token"] = self.parse(_SECTION, _CONTEXT, key, self.read_token, value)
            elif key == "admin_user":
                users = self.parse(_SECTION, _CONTEXT, key, self.load_admin_users, value)
            elif key == "admin_tls":
                values[key] = self.load_server_tls(_SECTION, "[gateway] admin_tls", value)
            elif key == "admin_ldap":
                values[key] = self.load_ldap(value)
            else:
                values[key] = self.load_atna(value)
        if "admin_token" in raw and "admin_token_file" in raw:
            self.fail(_SECTION, _CONTEXT, "admin_token_file", "set admin_token or "
                      "admin_token_file, not both")
        if values.get("admin_token"):
            users.insert(0, AdminUser("admin", values["admin_token"], AdminRole.OPERATE))
        atna = values.get("atna")
        if atna is not None and atna.transport != AtnaTransport.UDP and not atna.spool:
            # Beside the other state: the one folder the packaged unit lets it write there
            values["atna"] = replace(atna, spool=str(Path(values["state_dir"]) / "atna")
                                     if values.get("state_dir") else DEFAULT_SPOOL)
        settings = GatewaySettings(**values, admin_users=tuple(users))
        self._check_admin(settings)
        return settings

    def _state_dir(self, value: Any) -> str:
        text = string(value)
        return str(self.beside_config(text)) if text else ""  # "": nothing kept

    def _hash_key_file(self, value: Any) -> str:
        """A key file that exists must be readable and long enough; one that does not is made
        at the first start, in a folder that must exist."""
        path = self.beside_config(string(value))
        if path.exists():
            try:
                KeyedHash().load(str(path), create=False)
            except HashKeyError as exc:
                raise ValueError(exc.reason) from None
        elif not path.parent.is_dir():
            raise ValueError(f"{str(path.parent)!r} is not a folder (the key is made there at "
                             "the first start)")
        return str(path)

    def _check_admin(self, settings: GatewaySettings) -> None:
        """Who may use the admin server, and how it is reached: tokens never in clear text
        across the network, and no two users alike."""
        users = settings.admin_users
        if len({user.token for user in users}) != len(users):
            self.fail(_SECTION, _CONTEXT, "admin_user", "two admin users share a token")
        if len({user.name for user in users}) != len(users):
            self.fail(_SECTION, _CONTEXT, "admin_user", "two admin users share a name "
                      "(admin_token is the user \"admin\")")
        admin = settings.admin
        if settings.admin_ldap is not None and not settings.admin_tls:
            self.fail(_SECTION, _CONTEXT, "admin_ldap", "directory users sign in with their "
                      "password: set admin_tls = { cert, key } too, so that it never crosses "
                      "the network in clear text")
        if admin is not None and not is_loopback(admin.host):
            if not users and settings.admin_ldap is None:
                self.fail(_SECTION, _CONTEXT, "admin",
                          f"{admin} is not a loopback address: set admin_token (or "
                          "admin_ldap) too")
            if not settings.admin_tls:
                self.fail(_SECTION, _CONTEXT, "admin", f"{admin} is not a loopback address: "
                          "set admin_tls = { cert, key } too (tokens must not cross the "
                          "network in clear text)")
        if settings.peers and (admin is None or not settings.admin_token):
            self.fail(_SECTION, _CONTEXT, "peers", "the nodes share admin state through "
                      "their admin servers and authenticate with admin_token: set admin and "
                      "admin_token (the same token on every node)")

    def load_atna(self, raw: Any) -> AtnaSettings:
        context = "[gateway] atna"
        if not isinstance(raw, dict):
            self.fail(_SECTION, context, None, 'must be a table, e.g. { repository = '
                      '"arr.hospital.local:6514", ca = "ca.crt" }')
        allowed = _ATNA_VALUES.keys() | set(_ATNA_TLS_KEYS)
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in allowed:
                self.fail(_SECTION, context, key, unknown_key(key, allowed))
            if key in _ATNA_VALUES:
                values[key] = self.parse(_SECTION, context, key, _ATNA_VALUES[key], value)
        if "repository" not in values:
            self.fail(_SECTION, context, "repository", 'required, e.g. "arr.hospital.local:6514"')
        if values.get("spool"):
            values["spool"] = str(self.beside_config(values["spool"]))
        tls_raw = {key: raw[key] for key in _ATNA_TLS_KEYS if key in raw}
        if values.get("transport") == AtnaTransport.UDP and tls_raw:
            self.fail(_SECTION, context, "transport", "udp carries no TLS: drop ca/cert/key or "
                      "use transport = \"tls\"")
        values["tls"] = self.load_client_tls(_SECTION, context, tls_raw)
        return AtnaSettings(**values)

    def load_ldap(self, raw: Any) -> LdapSettings:
        """admin_ldap = { url, bind_dn, password_file, user_base, group_operate, group_read,
        ... }: checked here, so that a wrong one fails at load, not at the first login."""
        context = "[gateway] admin_ldap"
        if not isinstance(raw, dict):
            self.fail(_SECTION, context, None, 'must be a table, e.g. { url = '
                      '"ldaps://dc1.hospital.local", bind_dn = "...", password_file = "...", '
                      'user_base = "...", group_operate = "..." }')
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in _LDAP_KEYS:
                self.fail(_SECTION, context, key, unknown_key(key, _LDAP_KEYS))
            if key in _LDAP_VALUES:
                values[key] = self.parse(_SECTION, context, key, _LDAP_VALUES[key], value)
        for key in ("url", "user_base", "bind_dn", "password_file"):
            if key not in raw:
                self.fail(_SECTION, context, key, "required")
        url = values["url"]
        if not re.fullmatch(r"ldaps?://[^/?#\s]+/?", url):
            self.fail(_SECTION, context, "url", f"{url!r}: ldaps://HOST[:PORT] (TLS) or "
                      "ldap://HOST[:PORT] (StartTLS, always): no clear text")
        if "{user}" not in values.get("user_filter", "{user}"):
            self.fail(_SECTION, context, "user_filter", "must contain {user}, e.g. "
                      '"(sAMAccountName={user})" (Active Directory) or "(uid={user})"')
        if not values.get("group_operate") and not values.get("group_read"):
            self.fail(_SECTION, context, "group_operate", "give group_operate, group_read or "
                      "both: the DNs of the groups whose members may operate or read")
        if not 0 <= values.get("cache", 0) <= LDAP_CACHE_MAX:
            self.fail(_SECTION, context, "cache", f"at most {LDAP_CACHE_MAX:g}s (a user removed "
                      "from a group keeps the role this long)")
        if values.get("timeout", 1) <= 0:
            self.fail(_SECTION, context, "timeout", "must be more than 0")
        password = self.parse(_SECTION, context, "password_file", self._secret,
                              raw["password_file"])
        ca = ""
        if "ca" in raw:
            ca = str(self.parse(_SECTION, context, "ca", self._readable, raw["ca"]))
        if importlib.util.find_spec("ldap") is None:  # python-ldap: an optional dependency
            self.fail(_SECTION, context, None, "needs python-ldap: pip install 'medgate[ldap]' "
                      "(it builds against libldap: Debian libldap2-dev libsasl2-dev)")
        return LdapSettings(**values, password=password, ca=ca)

    def _secret(self, value: Any) -> str:
        """A password from a file (relative to the config file), its line end dropped."""
        path, text = self._text_beside(value)
        if not (secret := text.rstrip("\r\n")):
            raise ValueError(f"{str(path)!r} is empty")
        return secret

    def _readable(self, value: Any) -> Path:
        path = self.beside_config(string(value))
        try:
            path.read_bytes()
        except OSError as exc:
            raise ValueError(f"{str(path)!r}: cannot read: {exc.strerror or exc}") from None
        return path

    def read_token(self, value: Any) -> str:
        """A token from a file (relative to the config file); its surrounding space ignored."""
        path, text = self._text_beside(value)
        if len(token := text.strip()) < 16:
            raise ValueError(f"{str(path)!r}: a token needs at least 16 characters")
        return token

    def _text_beside(self, value: Any) -> tuple[Path, str]:
        """A file named relative to the config file, and its UTF-8 text; ValueError naming
        it when it cannot be read."""
        path = self.beside_config(string(value))
        try:
            return path, path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{str(path)!r}: cannot read: {getattr(exc, 'strerror', exc)}") from None

    def load_admin_users(self, raw: Any) -> list[AdminUser]:
        """[[gateway.admin_user]] tables: name, token_file, role."""
        if not isinstance(raw, list):
            raise ValueError("write [[gateway.admin_user]] tables with name, token_file, role")
        users = []
        for index, entry in enumerate(raw, 1):
            if not isinstance(entry, dict):
                raise ValueError(f"#{index}: must be a table")
            unknown = sorted(set(entry) - {"name", "token_file", "role"})
            if unknown:
                raise ValueError(f"#{index}: {unknown[0]}: "
                                 f"{unknown_key(unknown[0], ('name', 'token_file', 'role'))}")
            name = entry.get("name")
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.@-]+", name):
                raise ValueError(f"#{index}: name: required: letters, digits, '.', '_', '@', '-'")
            if "token_file" not in entry:
                raise ValueError(f"user {name!r}: token_file: required")
            role = prefixed(f"user {name!r}: role", one_of(AdminRole), entry.get("role", "read"))
            token = prefixed(f"user {name!r}: token_file", self.read_token, entry["token_file"])
            users.append(AdminUser(name, token, role))
        return users
