"""`tls = { ... }` tables: a VIP's or the admin server's (terminate) and a member's (originate).

Each table is checked by building its TLS context (`tls_contexts`), so a missing file, a key that
does not match its certificate or a CA file without a certificate is a config error naming the
file.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from gateway.config.model import ClientTls, ServerTls, TlsVersion, VerifyClient
from gateway.config.reader import Section, SectionReader
from gateway.config.tls_contexts import TlsSetupError, client_ssl_context, server_context
from gateway.config.values import boolean, choice, string, unknown_key

SERVER_TLS_KEYS = ("cert", "key", "ca", "verify_client", "min_version")
CLIENT_TLS_KEYS = ("ca", "cert", "key", "server_name", "verify", "min_version")


def _min_version(value: Any) -> TlsVersion:
    try:
        return choice(value, TlsVersion)
    except ValueError as exc:
        raise ValueError(f"{exc} (BCP 195: nothing older than TLS 1.2)") from None


_TLS_VALUES = {"verify": boolean, "server_name": string, "min_version": _min_version,
               "verify_client": lambda value: choice(value, VerifyClient)}


class TlsSection(SectionReader):
    """Loads tls tables."""

    def _tls_values(self, section: Section, context: str, raw: Any,
                    allowed: Collection[str]) -> dict[str, Any]:
        if not isinstance(raw, dict):
            self.fail(section, context, "tls", 'must be a table, e.g. { cert = "gw.crt", '
                      'key = "gw.key" }')
        values: dict[str, Any] = {}
        for key, value in raw.items():
            if key not in allowed:
                self.fail(section, context, "tls", f"{key}: {unknown_key(key, allowed)}")
            values[key] = self.parse(section, context, f"tls.{key}",
                                     _TLS_VALUES.get(key, self._tls_file), value)
        return values

    def _tls_file(self, value: Any) -> str:
        path = self.beside_config(string(value))
        if not path.is_file():
            raise ValueError(f"{str(path)!r}: no such file")
        return str(path)

    def load_server_tls(self, section: Section, context: str, raw: Any) -> ServerTls:
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

    def load_client_tls(self, section: Section, context: str, raw: Any) -> ClientTls:
        values = self._tls_values(section, context, raw, CLIENT_TLS_KEYS)
        if "key" in values and "cert" not in values:
            self.fail(section, context, "tls", "key: given without cert")
        config = ClientTls(**values)
        try:
            client_ssl_context(config)
        except TlsSetupError as exc:
            self.fail(section, context, "tls", str(exc))
        return config
