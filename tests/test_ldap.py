"""Admin logins from a directory (`admin_ldap`), against a real OpenLDAP slapd: a user's group
gives its role (nested groups too), only over TLS (LDAPS, StartTLS) with the directory's
certificate verified, a wrong password is an ATNA User Authentication failure, and an accepted
login is remembered for `cache` seconds only."""

from __future__ import annotations

import json
import os
import sys

import pytest
import trio
from lxml import etree

from gateway.config import (AdminRole, ConfigError, GroupSearch, LdapSettings, load_config,
                            parse_config)
from gateway.service.server import Gateway
from gateway.service.directory import Directory, LoginOutcome
from tests.helpers import start_gateway
from tests.helpers.slapd import (OPERATORS, PASSWORDS, READERS, SERVICE_DN, SERVICE_PASSWORD,
                                 SUFFIX, start_slapd)
from tests.test_tls import server_context


@pytest.fixture
def slapd(tmp_path, certs):
    server = start_slapd(tmp_path / "slapd", certs)
    yield server
    server.stop()


def settings(slapd, certs, **more) -> LdapSettings:
    values = dict(url=f"ldaps://127.0.0.1:{slapd.ldaps}", user_base=f"ou=people,{SUFFIX}",
                  bind_dn=SERVICE_DN, password=SERVICE_PASSWORD, group_operate=OPERATORS,
                  group_read=READERS, ca=certs.ca)
    return LdapSettings(**{**values, **more})


async def test_a_users_group_gives_its_role_nested_groups_too(slapd, certs):
    directory = Directory(settings(slapd, certs))
    alice = await directory.login("alice", PASSWORDS["alice"])  # radiology-it, in operators
    assert (alice.outcome, alice.role) == (LoginOutcome.ACCEPTED, AdminRole.OPERATE), alice
    bob = await directory.login("bob", PASSWORDS["bob"])  # uniqueMember of the readers
    assert (bob.outcome, bob.role) == (LoginOutcome.ACCEPTED, AdminRole.READ), bob
    carol = await directory.login("carol", PASSWORDS["carol"])
    assert carol.outcome is LoginOutcome.NO_ROLE and carol.role is None
    for name, password, why in [("alice", "wrong", "wrong password"),
                                ("dave", "any-password", "no such user"),
                                ("*", PASSWORDS["alice"], "no such user"),  # escaped, not a wildcard
                                ("alice)(uid=*", "x", "no such user"),
                                ("alice", "", "no name or no password")]:  # never an anonymous bind
        answer = await directory.login(name, password)
        assert (answer.outcome, answer.detail) == (LoginOutcome.REFUSED, why), (name, answer)


async def test_starttls_and_only_a_directory_whose_certificate_is_trusted(slapd, certs):
    starttls = Directory(settings(slapd, certs, url=f"ldap://127.0.0.1:{slapd.ldap}"))
    assert (await starttls.login("alice", PASSWORDS["alice"])).outcome is LoginOutcome.ACCEPTED
    for wrong in (settings(slapd, certs, ca=certs.stranger_ca),
                  settings(slapd, certs, url=f"ldap://127.0.0.1:{slapd.ldap}",
                           ca=certs.stranger_ca)):
        answer = await Directory(wrong).login("alice", PASSWORDS["alice"])
        assert answer.outcome is LoginOutcome.UNAVAILABLE, answer
    refused = await Directory(settings(slapd, certs, password="not-it")).login(
        "alice", PASSWORDS["alice"])
    assert refused.outcome is LoginOutcome.UNAVAILABLE and "service account" in refused.detail


async def test_in_chain_grants_nothing_where_the_directory_lacks_the_rule(slapd, certs):
    """Active Directory's in-chain rule asked of OpenLDAP (which has no such rule): an error
    or no match, never a role."""
    directory = Directory(settings(slapd, certs, group_search=GroupSearch.IN_CHAIN))
    answer = await directory.login("alice", PASSWORDS["alice"])
    assert answer.outcome in (LoginOutcome.UNAVAILABLE, LoginOutcome.NO_ROLE), answer


async def test_an_accepted_login_is_remembered_for_cache_only(slapd, certs):
    remembering = Directory(settings(slapd, certs, cache=60.0))
    forgetting = Directory(settings(slapd, certs, cache=0.0))
    for directory in (remembering, forgetting):
        assert (await directory.login("alice", PASSWORDS["alice"])).outcome is LoginOutcome.ACCEPTED
    slapd.stop()
    again = await remembering.login("alice", PASSWORDS["alice"])
    assert (again.outcome, again.detail, again.role) == (LoginOutcome.ACCEPTED, "remembered",
                                                         AdminRole.OPERATE)
    # A remembered login is for that password only; the directory is asked, and is down.
    assert (await remembering.login("alice", "wrong")).outcome is LoginOutcome.UNAVAILABLE
    assert (await forgetting.login("alice", PASSWORDS["alice"])).outcome is LoginOutcome.UNAVAILABLE


def ldap_site(slapd, certs, tmp_path, extra: str = "") -> str:
    """A gateway on HTTPS with admin_ldap against `slapd`, one TCP VIP; `extra` more
    [gateway] keys."""
    (tmp_path / "service.pw").write_text(SERVICE_PASSWORD + "\n")
    return f"""
[gateway]
admin = "127.0.0.1:0"
audit = ""
admin_tls = {{ cert = "{certs.server[0]}", key = "{certs.server[1]}" }}
admin_ldap = {{ url = "ldaps://127.0.0.1:{slapd.ldaps}", ca = "{certs.ca}", bind_dn = "{SERVICE_DN}", password_file = "{tmp_path / 'service.pw'}", user_base = "ou=people,{SUFFIX}", group_operate = "{OPERATORS}", group_read = "{READERS}" }}
{extra}
[[vip]]
name = "web"
protocol = "tcp"
listen = "127.0.0.1:0"
health = {{ check = "tcp", interval = "1h" }}
[[vip.member]]
name = "a"
address = "127.0.0.1:9"
"""


async def curl(url: str, certs, user: str, password: str, *post: str) -> tuple[int, str]:
    args = ["curl", "-sS", "--cacert", certs.ca, "-u", f"{user}:{password}", "-o", "-",
            "-w", "\n%{http_code}"]
    if post:
        args += ["-X", "POST", "-H", "Content-Type: application/json", "--data", post[0]]
    result = await trio.run_process([*args, url], capture_stdout=True, capture_stderr=True,
                                    check=False)
    body, _, code = result.stdout.decode().rpartition("\n")
    return int(code), body


async def test_the_admin_server_signs_directory_users_in_by_group(nursery, slapd, certs,
                                                                  audit_repository, tmp_path):
    repository = audit_repository(tls=server_context(certs.server))
    spool = tmp_path / "spool"
    gateway = await start_gateway(nursery, ldap_site(
        slapd, certs, tmp_path, f'atna = {{ repository = "127.0.0.1:{repository.port}", '
                                f'ca = "{certs.ca}", spool = "{spool}" }}'),
        admin=True)
    base = f"https://localhost:{gateway.admin_address.port}"
    member = f"{base}/api/vips/web/members/a"
    drain = json.dumps({"state": "drain"})
    assert (await curl(f"{base}/api/status", certs, "bob", PASSWORDS["bob"]))[0] == 200
    assert (await curl(member, certs, "bob", PASSWORDS["bob"], drain))[0] == 403  # read only
    assert (await curl(member, certs, "carol", PASSWORDS["carol"], drain))[0] == 401  # no group
    assert (await curl(member, certs, "alice", "wrong-password", drain))[0] == 401
    status, body = await curl(member, certs, "alice", PASSWORDS["alice"], drain)
    assert status == 200, body
    assert gateway.balancer.pool("web").member("a").admin.value == "drain"
    gateway.stop()
    received = await repository.wait_received(6, timeout=20)  # start, 3 logins, drain, stop
    logins = [(p.get("UserID"), root.find("EventIdentification").get("EventOutcomeIndicator"))
              for root in (etree.fromstring(m.xml) for m in received)
              if root.find("EventIdentification/EventID").get("csd-code") == "110114"
              for p in root.iter("ActiveParticipant") if p.get("UserIsRequestor") == "true"]
    # carol (no role) and alice's wrong password failed; alice's change succeeded
    assert logins == [("carol", "4"), ("alice", "4"), ("alice", "0")], logins


async def test_gateway_ctl_signs_in_as_a_directory_user(nursery, slapd, certs, tmp_path):
    """`gateway ctl --user NAME`: the password from MEDGATE_ADMIN_PASSWORD (else asked),
    sent as HTTP Basic over HTTPS only; the user's group decides what it may do."""
    gateway = await start_gateway(nursery, ldap_site(slapd, certs, tmp_path), admin=True)

    async def ctl(user: str, password: str, *command: str,
                  url: str = f"https://localhost:{gateway.admin_address.port}"):
        return await trio.run_process(
            [sys.executable, "-m", "gateway", "ctl", "--admin", url, "--ca", certs.ca,
             "--user", user, *command], capture_stdout=True, capture_stderr=True, check=False,
            env={**os.environ, "MEDGATE_ADMIN_PASSWORD": password})

    read_only = await ctl("bob", PASSWORDS["bob"], "drain", "web/a")
    assert read_only.returncode == 1 and b"may only read" in read_only.stderr
    wrong = await ctl("alice", "not-her-password", "drain", "web/a")
    assert wrong.returncode == 1 and b"HTTP 401" in wrong.stderr
    done = await ctl("alice", PASSWORDS["alice"], "drain", "web/a")
    assert done.returncode == 0, done.stderr
    assert gateway.balancer.pool("web").member("a").admin.value == "drain"
    plain = await ctl("alice", PASSWORDS["alice"], "status",
                      url=f"http://127.0.0.1:{gateway.admin_address.port}")
    assert plain.returncode == 3 and b"over HTTPS only" in plain.stderr  # a usage error


def test_admin_ldap_is_checked_at_load(tmp_path, certs):
    (tmp_path / "pw").write_text("service-secret\n")
    good = (f'url = "ldaps://dc1.hospital.test", bind_dn = "cn=medgate", '
            f'password_file = "{tmp_path / "pw"}", user_base = "ou=people", '
            f'group_operate = "cn=ops"')
    tls = f'admin_tls = {{ cert = "{certs.server[0]}", key = "{certs.server[1]}" }}\n'
    vip = ('[[vip]]\nname = "web"\nprotocol = "tcp"\nlisten = "127.0.0.1:0"\n'
           '[[vip.member]]\nname = "a"\naddress = "127.0.0.1:9"\n')

    def load(ldap: str, *, with_tls: bool = True):
        return parse_config(f"[gateway]\n{tls if with_tls else ''}admin_ldap = {{ {ldap} }}\n"
                            + vip, source=str(tmp_path / "site.toml"))

    loaded = load(good).gateway.admin_ldap
    assert loaded is not None and loaded.password == "service-secret"
    assert loaded.user_filter == "(uid={user})" and loaded.cache == 60.0
    for ldap, with_tls, words in [
            (good, False, "set admin_tls"),
            (good.replace("ldaps://", "http://"), True, "no clear text"),
            (good.replace('group_operate = "cn=ops"', 'user_filter = "(cn={user})"'), True,
             "group_operate"),
            (good + ', user_filter = "(cn=admin)"', True, "must contain {user}"),
            (good + ', cache = "1h"', True, "at most 600s"),
            (good + ', group_search = "nested"', True, "in-chain"),
            (good.replace(str(tmp_path / "pw"), str(tmp_path / "none")), True, "cannot read"),
            (good + ', sizelimit = 3', True, "sizelimit")]:
        with pytest.raises(ConfigError, match=words.replace("{", r"\{").replace("}", r"\}")):
            load(ldap, with_tls=with_tls)



async def test_a_reload_cannot_add_directory_logins_to_a_plain_http_admin_server(
        nursery, certs, tmp_path):
    (tmp_path / "pw").write_text("service-secret\n")
    site = tmp_path / "site.toml"
    vip = ('[[vip]]\nname = "web"\nprotocol = "tcp"\nlisten = "127.0.0.1:0"\n'
           'health = { check = "tcp", interval = "1h" }\n'
           '[[vip.member]]\nname = "a"\naddress = "127.0.0.1:9"\n')
    site.write_text('[gateway]\nadmin = "127.0.0.1:0"\naudit = ""\n' + vip)
    gateway = Gateway(load_config(site))
    await nursery.start(gateway.run)
    site.write_text(f'''[gateway]
admin = "127.0.0.1:0"
audit = ""
admin_tls = {{ cert = "{certs.server[0]}", key = "{certs.server[1]}" }}
admin_ldap = {{ url = "ldaps://127.0.0.1:636", bind_dn = "cn=medgate", password_file = "pw", user_base = "ou=people", group_operate = "cn=ops" }}
''' + vip)
    error = await gateway.reload_from_file()
    assert "admin_ldap" in error and "restart" in error, error
    assert gateway.config.gateway.admin_ldap is None
    gateway.stop()
