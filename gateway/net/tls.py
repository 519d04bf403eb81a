"""TLS on the wire for VIPs (terminate), members and checks (originate): handshakes bounded in
time, the names a peer's certificate carries, and certificate problems in words.

The contexts are built by `gateway.config.tls_contexts` while a config loads (and again on every
reload, so SIGHUP re-reads the certificate files); a live connection keeps the context it started
with.
"""

from __future__ import annotations

import datetime
import ssl
from collections.abc import Callable
from dataclasses import dataclass

import trio

from gateway.config.model import ClientTls
from gateway.config.tls_contexts import CIPHERS, TlsSetupError, client_ssl_context, server_context
from gateway.net.channel import open_tcp
from gateway.net.link import Link
from gateway.net.tls_stream import TlsChannel

HANDSHAKE_TIMEOUT = 10.0  # a client's handshake must be done within this (2 s under pressure)
EXPIRY_WARNING_DAYS = 30


@dataclass(frozen=True)
class MemberTls:
    """A built client context and the name the member's certificate must carry."""

    context: ssl.SSLContext
    server_name: str | None
    ca: str  # for messages: which trust store said no

    async def wrap(self, stream: Link) -> TlsChannel:
        """Handshake over `stream` (the caller bounds the time); raises TlsFailed."""
        tls = TlsChannel(stream, self.context, server_hostname=self.server_name)
        try:
            await tls.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise TlsFailed(describe_tls_error(exc, self.ca)) from None
        return tls


class TlsFailed(Exception):
    """A handshake failed; the message says why in words."""


def client_context(config: ClientTls, host: str) -> MemberTls:
    """The context the gateway opens TLS to `host` with."""
    return MemberTls(client_ssl_context(config), config.server_name or host,
                     config.ca or "the system CA store")


async def accept(stream: Link, context: ssl.SSLContext,
                 timeout: float = HANDSHAKE_TIMEOUT,
                 heard: Callable[[], None] | None = None) -> TlsChannel:
    """The server side of a handshake, bounded by `timeout`; raises TlsFailed. `heard` is
    called once the client has sent its first bytes."""
    tls = TlsChannel(stream, context, server_side=True)
    try:
        with trio.fail_after(timeout):
            await tls.do_handshake(heard)
    except trio.TooSlowError:
        raise TlsFailed(f"no TLS handshake within {timeout:g}s") from None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise TlsFailed(describe_tls_error(exc, "")) from None
    return tls


# -- what a certificate says

def certificate_names(certificate: dict) -> tuple[str, ...]:
    """'CN=x', 'DNS:y', 'IP:z', 'email:w' for a peer certificate from `getpeercert()`."""
    names = [f"CN={value}" for rdn in certificate.get("subject", ())
             for key, value in rdn if key == "commonName"]
    names += [f"{'IP' if kind == 'IP Address' else kind}:{value.strip()}"
              for kind, value in certificate.get("subjectAltName", ())]
    return tuple(names)


def certificate_subject(certificate: dict) -> str:
    """The subject as 'CN=x,O=y' (RFC 4514 order: most specific first)."""
    short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
             "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST"}
    parts = [f"{short.get(key, key)}={value}" for rdn in certificate.get("subject", ())
             for key, value in rdn]
    return ",".join(reversed(parts))


def certificate_expires(certificate: dict) -> float | None:
    """notAfter as a Unix time, or None when the peer sent no (verified) certificate."""
    not_after = certificate.get("notAfter")
    return ssl.cert_time_to_seconds(not_after) if not_after else None


def peer_certificate(stream: trio.abc.Stream) -> dict:
    """The verified peer certificate of a TLS stream ({} when none, or not TLS)."""
    if isinstance(stream, TlsChannel):
        return stream.getpeercert() or {}
    return {}


def day(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M UTC")


@dataclass(frozen=True)
class Certificate:
    """What a certificate says, read without trusting it (to explain why it was refused)."""

    subject: str
    issuer: str
    names: tuple[str, ...]
    not_before: float
    not_after: float


async def fetch_certificate(host: str, port: int) -> Certificate | None:
    """The certificate a TLS server presents, without verifying it; None if it sends none.
    The caller bounds the time."""
    from cryptography import x509  # only when a certificate was refused

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        stream = await open_tcp(host, port)
    except OSError:
        return None
    tls = TlsChannel(stream, context)
    try:
        await tls.do_handshake()
        der = tls.getpeercert(binary_form=True)
    except (trio.BrokenResourceError, ssl.SSLError):
        return None
    finally:
        await trio.aclose_forcefully(stream)
    if not der:
        return None
    parsed = x509.load_der_x509_certificate(der)
    try:
        alternative = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = tuple([f"DNS:{n}" for n in alternative.get_values_for_type(x509.DNSName)]
                      + [f"IP:{n}" for n in alternative.get_values_for_type(x509.IPAddress)])
    except x509.ExtensionNotFound:
        names = ()
    return Certificate(parsed.subject.rfc4514_string(), parsed.issuer.rfc4514_string(), names,
                       parsed.not_valid_before_utc.timestamp(),
                       parsed.not_valid_after_utc.timestamp())


# -- failures in words

_REASONS = {
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS here (plain TCP?)",
    "HTTP_REQUEST": "the peer sent plain HTTP to a TLS port",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust our certificate (unknown CA)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refused our certificate (bad certificate)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer says our certificate has expired",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a client certificate",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no client certificate (verify_client = required)",
    "TLSV1_ALERT_PROTOCOL_VERSION": "no TLS version in common (min_version)",
    "UNSUPPORTED_PROTOCOL": "no TLS version in common (min_version)",
    "NO_SHARED_CIPHER": "no cipher in common (the gateway allows BCP 195 ciphers only)",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the peer ended the handshake (no cipher or version in "
                                     "common, or it wants a client certificate)",
    "UNEXPECTED_EOF_WHILE_READING": "the peer closed the connection during the handshake",
}


def describe_tls_error(exc: BaseException, ca: str) -> str:
    """Why a handshake failed, as an engineer would say it ('certificate expired', 'unknown
    CA', 'hostname mismatch: ...'); `ca` names the trust store for 'unknown CA'."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLCertVerificationError):
        code, message = cause.verify_code, cause.verify_message or ""
        if code == 10:
            return "certificate expired"
        if code == 9:
            return "certificate not yet valid"
        if code in (2, 18, 19, 20, 21):
            return f"unknown CA: the certificate is not signed by a CA in {ca or 'our trust store'}"
        if code == 62 or "hostname" in message.lower() or "ip address mismatch" in message.lower():
            return f"hostname mismatch: {message}"
        return f"certificate refused: {message}"
    if isinstance(cause, ssl.SSLError):
        reason = cause.reason or ""
        return _REASONS.get(reason, f"TLS error: {reason or cause}").strip()
    if cause is None and exc.__cause__ is None and not str(exc):
        return "the peer closed the connection during the handshake"
    return f"TLS handshake failed: {exc.__cause__ or exc}"


__all__ = ["CIPHERS", "Certificate", "fetch_certificate", "EXPIRY_WARNING_DAYS", "HANDSHAKE_TIMEOUT", "MemberTls", "TlsFailed",
           "TlsSetupError", "accept", "certificate_expires", "certificate_names",
           "certificate_subject", "client_context", "day", "describe_tls_error",
           "peer_certificate", "server_context"]
