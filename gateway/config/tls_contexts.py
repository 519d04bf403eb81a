"""TLS contexts built from a config's `tls` tables: the policy and the files.

Building a context is how a config load proves its certificate, key and CA files usable, so a
file that cannot be used is a config error naming it; the network layer (`gateway.net.tls`) wraps
these contexts in streams. Only the standard library's `ssl` here, nothing that does I/O on a
socket.

Policy (DICOM PS3.15 Annex B and BCP 195, as DCMTK's default "non-downgrading" profile): TLS 1.2
or later, forward-secret AEAD ciphers only, peers verified unless a member says `verify = false`.
"""

from __future__ import annotations

import ssl

from gateway.config.model import ClientTls, ServerTls

# TLS 1.2 suites of BCP 195 (RFC 9325 §4.2); TLS 1.3 suites are all AEAD and always on.
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!SHA1"
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


class TlsSetupError(Exception):
    """A certificate, key or CA file that cannot be used; the message names the file."""


def _policy(context: ssl.SSLContext, min_version: str) -> None:
    context.minimum_version = _VERSIONS[min_version]
    context.set_ciphers(CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


def _load_chain(context: ssl.SSLContext, cert: str, key: str) -> None:
    try:
        context.load_cert_chain(cert, key or None)
    except FileNotFoundError as exc:
        raise TlsSetupError(f"{exc.filename or cert}: no such file") from None
    except ssl.SSLError as exc:
        raise TlsSetupError(f"cert {cert!r} / key {key or cert!r}: not a certificate and its "
                            f"private key in PEM ({exc.reason or exc})") from None
    except OSError as exc:
        raise TlsSetupError(f"{cert}: cannot read: {exc.strerror or exc}") from None


def _load_ca(context: ssl.SSLContext, ca: str) -> None:
    try:
        context.load_verify_locations(cafile=ca)
    except FileNotFoundError:
        raise TlsSetupError(f"ca {ca!r}: no such file") from None
    except ssl.SSLError as exc:
        raise TlsSetupError(f"ca {ca!r}: no CA certificate in PEM ({exc.reason or exc})") from None
    except OSError as exc:
        raise TlsSetupError(f"ca {ca!r}: cannot read: {exc.strerror or exc}") from None


def server_context(config: ServerTls) -> ssl.SSLContext:
    """The context a VIP (or the admin server) terminates TLS with."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _policy(context, config.min_version)
    _load_chain(context, config.cert, config.key)
    context.verify_mode = _VERIFY[config.verify_client]
    if config.verify_client != "none":
        if config.ca:
            _load_ca(context, config.ca)
        else:
            context.load_default_certs(ssl.Purpose.CLIENT_AUTH)
    # No session tickets: a resumed session would skip the client-certificate check's log line,
    # and nothing here is slow enough at handshake time to need resumption.
    context.num_tickets = 0
    return context


def client_ssl_context(config: ClientTls) -> ssl.SSLContext:
    """The context the gateway opens TLS to a member, a check target or a peer with."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _policy(context, config.min_version)
    if config.verify:
        if config.ca:
            _load_ca(context, config.ca)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if config.cert:
        _load_chain(context, config.cert, config.key)
    return context
