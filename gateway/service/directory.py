"""Admin logins from a directory (LDAP, Active Directory): a name and password (HTTP Basic on
the admin server, over TLS) become a user with the role of the group it is in.

A login is three steps, each bounded by `timeout`: the service account (`bind_dn`) finds the
one entry `user_filter` matches under `user_base`; a bind as that entry with the password given
proves the password; the service account then asks whether the entry is in `group_operate`,
else in `group_read` (nested groups followed: by walking `member`/`uniqueMember` up from the user,
or in one query with Active Directory's LDAP_MATCHING_RULE_IN_CHAIN). Only TLS: ldaps://, or
ldap:// with StartTLS, the directory's certificate verified (`ca`, else the system's).

python-ldap is blocking: every login runs in a worker thread (`trio.to_thread`), at most
THREADS at once. An accepted login is remembered for `cache` seconds (a keyed hash of the
password, never the password); a refused one never is.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum

import trio

from gateway.config import AdminRole, GroupSearch, LdapSettings

log = logging.getLogger("medgate.admin")

THREADS = 4  # logins asked of the directory at once; more wait
MAX_NAME = 256  # characters of a user name; longer ones are refused unasked
MAX_PASSWORD = 1024
CACHED_USERS = 1024  # remembered logins at most (the oldest are forgotten first)
MAX_DEPTH = 8  # levels of nested groups followed (member)
IN_CHAIN = "1.2.840.113556.1.4.1941"  # LDAP_MATCHING_RULE_IN_CHAIN (Active Directory)


class LoginOutcome(StrEnum):
    ACCEPTED = "accepted"
    REFUSED = "refused"  # no such user, or a wrong password
    NO_ROLE = "no-role"  # the password is right, the user is in neither group
    UNAVAILABLE = "unavailable"  # the directory could not be asked (down, TLS, service account)


@dataclass(frozen=True)
class DirectoryLogin:
    outcome: LoginOutcome
    detail: str  # what happened, for the log and the audit (never the password)
    role: AdminRole | None = None


@dataclass
class _Remembered:
    digest: bytes
    role: AdminRole
    until: float


class Directory:
    """The logins of one admin_ldap setting."""

    def __init__(self, settings: LdapSettings) -> None:
        self.settings = settings
        self._limiter = trio.CapacityLimiter(THREADS)
        self._key = os.urandom(32)  # for the cache's password digests; this process only
        self._remembered: OrderedDict[str, _Remembered] = OrderedDict()

    async def login(self, name: str, password: str) -> DirectoryLogin:
        """Whether `name` with `password` may use the admin server, and as what."""
        if not name or not password:
            return DirectoryLogin(LoginOutcome.REFUSED, "no name or no password")
        if len(name) > MAX_NAME or len(password) > MAX_PASSWORD:
            return DirectoryLogin(LoginOutcome.REFUSED, "name or password too long")
        digest = hmac.new(self._key, password.encode("utf-8", "replace"), hashlib.sha256).digest()
        now = trio.current_time()
        remembered = self._remembered.get(name)
        if remembered is not None and remembered.until > now and hmac.compare_digest(
                remembered.digest, digest):
            return DirectoryLogin(LoginOutcome.ACCEPTED, "remembered", remembered.role)
        # Each LDAP operation has `timeout`; a login is at most a few of them (and the walk).
        with trio.move_on_after(self.settings.timeout * (4 + MAX_DEPTH)):
            answer = await trio.to_thread.run_sync(self._ask, name, password,
                                                   limiter=self._limiter, abandon_on_cancel=True)
            if answer.outcome is LoginOutcome.ACCEPTED and answer.role and self.settings.cache:
                self._remember(name, _Remembered(digest, answer.role,
                                                 trio.current_time() + self.settings.cache))
            return answer
        return DirectoryLogin(LoginOutcome.UNAVAILABLE, "the directory did not answer in time")

    def _remember(self, name: str, remembered: _Remembered) -> None:
        self._remembered[name] = remembered
        self._remembered.move_to_end(name)
        while len(self._remembered) > CACHED_USERS:
            self._remembered.popitem(last=False)

    # -- in a worker thread

    def _ask(self, name: str, password: str) -> DirectoryLogin:
        import ldap

        settings = self.settings
        try:
            service = self._connect()
        except ldap.LDAPError as exc:
            return DirectoryLogin(LoginOutcome.UNAVAILABLE, f"{settings.url}: {_reason(exc)}")
        try:
            try:
                service.simple_bind_s(settings.bind_dn, settings.password)
            except ldap.INVALID_CREDENTIALS:
                return DirectoryLogin(LoginOutcome.UNAVAILABLE, "the service account's bind "
                                      "was refused (bind_dn, password_file)")
            found = self._find_user(service, name)
            if isinstance(found, DirectoryLogin):
                return found
            try:
                self._check_password(found, password)
            except ldap.INVALID_CREDENTIALS:
                return DirectoryLogin(LoginOutcome.REFUSED, "wrong password")
            for group, role in ((settings.group_operate, AdminRole.OPERATE),
                                (settings.group_read, AdminRole.READ)):
                if group and self._in_group(service, found, group):
                    return DirectoryLogin(LoginOutcome.ACCEPTED, f"in {group}", role)
            return DirectoryLogin(LoginOutcome.NO_ROLE, "in neither group_operate nor "
                                  "group_read")
        except ldap.LDAPError as exc:
            return DirectoryLogin(LoginOutcome.UNAVAILABLE, f"{settings.url}: {_reason(exc)}")
        finally:
            _unbind(service)

    def _connect(self):
        """A connection over TLS (ldaps://, or StartTLS on ldap://), certificate verified."""
        import ldap

        settings = self.settings
        connection = ldap.initialize(settings.url)
        connection.set_option(ldap.OPT_PROTOCOL_VERSION, 3)
        connection.set_option(ldap.OPT_REFERRALS, 0)
        connection.set_option(ldap.OPT_NETWORK_TIMEOUT, settings.timeout)
        connection.set_option(ldap.OPT_TIMEOUT, settings.timeout)
        connection.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
        connection.set_option(ldap.OPT_X_TLS_PROTOCOL_MIN, 0x303)  # TLS 1.2
        if settings.ca:
            connection.set_option(ldap.OPT_X_TLS_CACERTFILE, settings.ca)
        connection.set_option(ldap.OPT_X_TLS_NEWCTX, 0)  # the TLS options above take effect
        if settings.url.lower().startswith("ldap://"):
            connection.start_tls_s()
        return connection

    def _find_user(self, service, name: str) -> str | DirectoryLogin:
        """The DN of the one entry the filter matches, or why there is none."""
        import ldap
        from ldap.filter import escape_filter_chars

        query = self.settings.user_filter.replace("{user}", escape_filter_chars(name))
        entries = [dn for dn, _ in service.search_s(self.settings.user_base, ldap.SCOPE_SUBTREE,
                                                    query, ["1.1"]) if dn]
        if len(entries) != 1:
            return DirectoryLogin(LoginOutcome.REFUSED, "no such user" if not entries else
                                  f"{len(entries)} entries match the name")
        return entries[0]

    def _check_password(self, user_dn: str, password: str) -> None:
        """A bind as the user (its own connection): INVALID_CREDENTIALS if the password is
        wrong. Never with an empty password, which binds unauthenticated (RFC 4513 5.1.2)."""
        assert password
        connection = self._connect()
        try:
            connection.simple_bind_s(user_dn, password)
        finally:
            _unbind(connection)

    def _in_group(self, service, user_dn: str, group_dn: str) -> bool:
        import ldap
        from ldap.filter import escape_filter_chars

        if self.settings.group_search is GroupSearch.IN_CHAIN:
            found = service.search_s(
                user_dn, ldap.SCOPE_BASE,
                f"(memberOf:{IN_CHAIN}:={escape_filter_chars(group_dn)})", ["1.1"])
            return any(dn for dn, _ in found)
        # Up from the user: the groups that list it, then the groups that list those, ...
        wanted = _normal(group_dn)
        base = self.settings.group_base or _domain(group_dn)
        level, seen = [user_dn], {_normal(user_dn)}
        for _ in range(MAX_DEPTH):
            query = "(|" + "".join(f"(member={escape_filter_chars(dn)})"
                                   f"(uniqueMember={escape_filter_chars(dn)})"
                                   for dn in level) + ")"
            groups = [dn for dn, _ in service.search_s(base, ldap.SCOPE_SUBTREE, query, ["1.1"])
                      if dn]
            if any(_normal(dn) == wanted for dn in groups):
                return True
            level = [dn for dn in groups if _normal(dn) not in seen]
            seen.update(map(_normal, level))
            if not level:
                return False
        return False


def _unbind(connection) -> None:
    """End a connection whatever state it is in (a broken one cannot be unbound politely)."""
    import ldap

    try:
        connection.unbind_s()
    except ldap.LDAPError:
        pass


def _normal(dn: str) -> tuple:
    """A DN to compare: its attribute types and values without case or spacing."""
    import ldap
    from ldap.dn import str2dn

    try:
        return tuple(tuple((kind.lower(), str(value).lower()) for kind, value, _ in rdn)
                     for rdn in str2dn(dn))
    except ldap.DECODING_ERROR:  # not a DN python-ldap can read: compare the text
        return (dn.lower(),)


def _domain(dn: str) -> str:
    """Where groups are searched by default: the DN's trailing dc= parts (the directory's
    domain), or its parent when it has none."""
    from ldap.dn import dn2str, str2dn

    parts = str2dn(dn)
    tail: list = []
    for rdn in reversed(parts):
        if rdn[0][0].lower() != "dc":
            break
        tail.insert(0, rdn)
    return dn2str(tail or parts[1:])


def _reason(exc: Exception) -> str:
    """What python-ldap says, in one line: its description and diagnostic message."""
    details = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
    words = [str(details.get("desc", "")) or type(exc).__name__]
    if details.get("info"):
        words.append(str(details["info"]))
    return ": ".join(words)


__all__ = ["Directory", "DirectoryLogin", "LoginOutcome"]
