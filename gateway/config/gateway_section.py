"""The [gateway] section: admin server, tokens and users, audit, drain, client limit."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from gateway.config.model import (ADMIN_ROLES, ATNA_TRANSPORTS, AdminUser, AtnaSettings,
                                  GatewaySettings)
from gateway.logs import LOG_FORMATS, LOG_LEVELS
from gateway.config.values import (Unknown, boolean, count, host_list, is_loopback,
                                   parse_address, parse_duration, parse_size, positive_int, string)

_GATEWAY_KEYS = ("admin", "admin_token", "admin_token_file", "admin_hosts", "admin_user",
                 "admin_tls", "atna", "audit", "drain_timeout", "max_clients", "state_dir",
                 "receipt_days", "receipt_hash_uids", "log_format", "log_level", "peers",
                 "peer_max_skew")


class GatewaySection:
    """Loads [gateway]; mixed into the loader (uses its `fail` and `source`)."""

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
                    values[key] = string(value)
                elif key == "state_dir":
                    path = Path(string(value))
                    values[key] = str(path if path.is_absolute() or not value
                                      else Path(self.source).parent / path)
                elif key == "admin_token_file":
                    values["admin_token"] = self.read_token(value)
                elif key in ("drain_timeout", "peer_max_skew"):
                    values[key] = parse_duration(value)
                elif key == "receipt_days":
                    values[key] = positive_int(value)
                elif key == "receipt_hash_uids":
                    values[key] = boolean(value)
                elif key == "peers":
                    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                        raise ValueError('a list of the other nodes\' admin addresses, e.g. '
                                         '["10.12.0.22:9090"]')
                    values[key] = tuple(parse_address(v) for v in value)
                elif key in ("log_format", "log_level"):
                    allowed = LOG_FORMATS if key == "log_format" else LOG_LEVELS
                    if value not in allowed:
                        raise ValueError(f"{value!r} is not one of {', '.join(allowed)}")
                    values[key] = value
                elif key == "max_clients":
                    values[key] = count(value)
                elif key == "admin_hosts":
                    values[key] = host_list(value)
                elif key == "admin_user":
                    users = self.load_admin_users(section, value)
                elif key == "admin_tls":
                    values[key] = self.load_server_tls(section, "[gateway] admin_tls", value)
                elif key == "atna":
                    values[key] = self.load_atna(section, value)
                else:
                    raise Unknown(f"unknown key (allowed: {', '.join(_GATEWAY_KEYS)})")
            except (ValueError, Unknown) as exc:
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
        if (settings.admin is not None and not settings.admin_tls
                and not is_loopback(settings.admin.host)):
            self.fail(section, "[gateway]", "admin", f"{settings.admin} is not a loopback "
                      "address: set admin_tls = { cert, key } too (tokens must not cross the "
                      "network in clear text)")
        if settings.peers and (settings.admin is None or not settings.admin_token):
            self.fail(section, "[gateway]", "peers", "the nodes share admin state through "
                      "their admin servers and authenticate with admin_token: set admin and "
                      "admin_token (the same token on every node)")
        return settings

    def load_atna(self, section, raw: Any) -> AtnaSettings:
        context = "[gateway] atna"
        if not isinstance(raw, dict):
            self.fail(section, context, None, 'must be a table, e.g. { repository = '
                      '"arr.hospital.local:6514", ca = "ca.crt" }')
        values: dict[str, Any] = {}
        tls_raw = {key: raw[key] for key in ("ca", "cert", "key", "server_name") if key in raw}
        for key, value in raw.items():
            try:
                if key == "repository":
                    values[key] = parse_address(value)
                    if values[key].port == 0:
                        raise ValueError(f"{value!r}: give the port (6514 for TLS, 514 for UDP)")
                elif key == "transport":
                    if value not in ATNA_TRANSPORTS:
                        raise ValueError(f"{value!r} is not one of {', '.join(ATNA_TRANSPORTS)}")
                    values[key] = value
                elif key in ("spool", "source_id", "site_id"):
                    values[key] = string(value)
                elif key == "spool_max":
                    values[key] = parse_size(value)
                elif key not in tls_raw:
                    raise Unknown("unknown key (allowed: repository, transport, ca, cert, key, "
                                  "server_name, spool, spool_max, source_id, site_id)")
            except (ValueError, Unknown) as exc:
                self.fail(section, context, key, str(exc))
        if "repository" not in values:
            self.fail(section, context, "repository", 'required, e.g. "arr.hospital.local:6514"')
        if values.get("spool") and not Path(values["spool"]).is_absolute():
            values["spool"] = str(Path(self.source).parent / values["spool"])
        if values.get("transport") == "udp" and tls_raw:
            self.fail(section, context, "transport", "udp carries no TLS: drop ca/cert/key or "
                      "use transport = \"tls\"")
        values["tls"] = self.load_client_tls(section, context, tls_raw)
        return AtnaSettings(**values)

    def read_token(self, value: Any) -> str:
        """A token from a file (relative to the config file); its surrounding space ignored."""
        path = Path(string(value))
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
