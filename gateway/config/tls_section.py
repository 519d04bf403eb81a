"""`tls = { ... }` tables: a VIP's or the admin server's (terminate) and a member's (originate).

Each table is checked by building its TLS context (`tls_contexts`), so a missing file, a key that does not match
its certificate or a CA file without a certificate is a config error naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.config.model import TLS_VERSIONS, VERIFY_CLIENT, ClientTls, ServerTls
from gateway.config.tls_contexts import TlsSetupError, client_ssl_context, server_context
from gateway.config.values import string

SERVER_TLS_KEYS = ("cert", "key", "ca", "verify_client", "min_version")
CLIENT_TLS_KEYS = ("ca", "cert", "key", "server_name", "verify", "min_version")


class TlsSection:
    """Loads tls tables; mixed into the loader (uses its `fail` and `source`)."""

    def _tls_values(self, section, context, raw, allowed) -> dict[str, Any]:
        if not isinstance(raw, dict):
            self.fail(section, context, "tls", 'must be a table, e.g. { cert = "gw.crt", '
                      'key = "gw.key" }')
        values: dict[str, Any] = {}
        for key, value in raw.items():
            where = f"tls.{key}"
            if key not in allowed:
                self.fail(section, context, "tls", f"{key}: unknown key (allowed: "
                          f"{', '.join(allowed)})")
            if key == "verify":
                if not isinstance(value, bool):
                    self.fail(section, context, where, f"{value!r} is not true or false")
                values[key] = value
                continue
            try:
                text = string(value)
            except ValueError as exc:
                self.fail(section, context, where, str(exc))
            if key in ("cert", "key", "ca"):
                path = Path(text)
                if not path.is_absolute():  # relative to the config file, not to the cwd
                    path = Path(self.source).parent / path
                if not path.is_file():
                    self.fail(section, context, where, f"{str(path)!r}: no such file")
                text = str(path)
            elif key == "verify_client" and text not in VERIFY_CLIENT:
                self.fail(section, context, where, f"{text!r} is not one of "
                          f"{', '.join(VERIFY_CLIENT)}")
            elif key == "min_version" and text not in TLS_VERSIONS:
                self.fail(section, context, where, f"{text!r} is not one of "
                          f"{', '.join(TLS_VERSIONS)} (BCP 195: nothing older than TLS 1.2)")
            values[key] = text
        return values

    def load_server_tls(self, section, context, raw) -> ServerTls:
        values = self._tls_values(section, context, raw, SERVER_TLS_KEYS)
        if "cert" not in values:
            self.fail(section, context, "tls", "cert: required (the certificate this address "
                      "presents; key: its private key, if not in the same file)")
        config = ServerTls(**{"key": "", **values})
        try:
            server_context(config)
        except TlsSetupError as exc:
            self.fail(section, context, "tls", str(exc))
        return config

    def load_client_tls(self, section, context, raw) -> ClientTls:
        values = self._tls_values(section, context, raw, CLIENT_TLS_KEYS)
        if "key" in values and "cert" not in values:
            self.fail(section, context, "tls", "key: given without cert")
        config = ClientTls(**values)
        try:
            client_ssl_context(config)
        except TlsSetupError as exc:
            self.fail(section, context, "tls", str(exc))
        return config
