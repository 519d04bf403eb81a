"""The admin server under a browser's attacks (CSRF, DNS rebinding) and with named users."""

from __future__ import annotations

import json

import h11
import trio

from gateway.service.admin import SEND_TIMEOUT, AdminServer
from gateway.config import Address, parse_config
from tests.helpers import start_backends, start_gateway
from tests.helpers.memory_link import memory_link_pair


async def ask(gateway, method: str, path: str, *, host: str = "", body: bytes = b"",
              headers: dict[str, str] | None = None) -> tuple[int, dict]:
    address = gateway.admin_address
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host or address}", "Connection: close",
             f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    stream = await trio.open_tcp_stream(address.host, address.port)
    raw = bytearray()
    with trio.fail_after(10):
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        while data := await stream.receive_some(65536):
            raw += data
    await stream.aclose()
    head, _, payload = bytes(raw).partition(b"\r\n\r\n")
    status = int(head.split()[1])
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, {"text": payload.decode(errors="replace")}


def site(port: int, gateway_extra: str = "") -> str:
    return f"""
[gateway]
admin = "127.0.0.1:0"
audit = "-"
{gateway_extra}
[[vip]]
name = "web"
protocol = "tcp"
listen = "127.0.0.1:0"
health = {{ check = "tcp", interval = "1h" }}
[[vip.member]]
name = "a"
address = "127.0.0.1:{port}"
"""


DRAIN = b'{"state": "drain"}'
JSON = {"Content-Type": "application/json"}


async def test_foreign_host_names_are_refused_dns_rebinding(nursery):
    (backend,) = await start_backends(nursery, "a")
    gateway = await start_gateway(nursery, site(backend.port, 'admin_hosts = ["gw1.hospital.local"]'),
                                  admin=True)
    port = gateway.admin_address.port
    assert (await ask(gateway, "GET", "/api/status", host=f"evil.example:{port}"))[0] == 403
    assert (await ask(gateway, "POST", "/api/vips/web/members/a", host="evil.example",
                      body=DRAIN, headers=JSON))[0] == 403
    for allowed in (f"127.0.0.1:{port}", f"localhost:{port}", f"gw1.hospital.local:{port}"):
        assert (await ask(gateway, "GET", "/api/status", host=allowed))[0] == 200, allowed
    assert gateway.balancer.pool("web").member("a").admin.value == "ready"


async def test_cross_site_posts_cannot_change_anything(nursery):
    (backend,) = await start_backends(nursery, "a")
    gateway = await start_gateway(nursery, site(backend.port), admin=True)
    origin = f"http://{gateway.admin_address}"
    for headers in ({"Content-Type": "text/plain"},  # a form or no-CORS fetch from any page
                    {"Content-Type": "application/x-www-form-urlencoded", "Origin": origin},
                    {**JSON, "Origin": "http://evil.example"}, {**JSON, "Origin": "null"}):
        status, _ = await ask(gateway, "POST", "/api/vips/web/members/a", body=DRAIN,
                              headers=headers)
        assert status == 403, headers
    assert (await ask(gateway, "POST", "/api/reload", body=b"{}",
                      headers={"Content-Type": "text/plain"}))[0] == 403
    assert gateway.balancer.pool("web").member("a").admin.value == "ready"
    status, member = await ask(gateway, "POST", "/api/vips/web/members/a", body=DRAIN,
                               headers={**JSON, "Origin": origin})  # the page itself
    assert status == 200 and member["admin"] == "drain"


async def test_named_users_roles_and_who_changed_what(nursery, tmp_path, capsys):
    (backend,) = await start_backends(nursery, "a")
    (tmp_path / "ops.token").write_text("ops-token-0123456789abcdef\n")
    (tmp_path / "viewer.token").write_text("viewer-token-0123456789abcdef")
    users = f"""
[[gateway.admin_user]]
name = "alice"
token_file = "{tmp_path / 'ops.token'}"
role = "operate"
[[gateway.admin_user]]
name = "monitor"
token_file = "{tmp_path / 'viewer.token'}"
role = "read"
"""
    gateway = await start_gateway(nursery, site(backend.port) + users.replace(
        "[[gateway.admin_user]]", "[[gateway.admin_user]]"), admin=True)
    path = "/api/vips/web/members/a"
    assert (await ask(gateway, "POST", path, body=DRAIN, headers=JSON))[0] == 401
    assert (await ask(gateway, "POST", path, body=DRAIN, headers={
        **JSON, "Authorization": "Bearer wrong-token-0123456789"}))[0] == 401
    status, answer = await ask(gateway, "POST", path, body=DRAIN, headers={
        **JSON, "Authorization": "Bearer viewer-token-0123456789abcdef"})
    assert status == 403 and "monitor" in answer["error"]
    status, _ = await ask(gateway, "POST", path, body=b'{"state": "maint", "weight": 5}',
                          headers={**JSON, "Authorization": "Bearer ops-token-0123456789abcdef"})
    assert status == 200
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()
               if '"kind":"admin"' in line]
    (record,) = records
    assert record["user"] == "alice" and record["client"].startswith("127.0.0.1:")
    assert record["before"] == {"state": "ready", "weight": 100}
    assert record["after"] == {"state": "maint", "weight": 5}
    assert "ops-token" not in capsys.readouterr().err


def test_off_loopback_reads_need_a_token_too(certs):
    cert, key = certs.server
    config = parse_config(site(1).replace('admin = "127.0.0.1:0"', 'admin = "10.0.0.1:9090"\n'
                                          'admin_token = "op-token-0123456789"\n'
                                          f'admin_tls = {{ cert = "{cert}", key = "{key}" }}'))

    class Running:  # what AdminServer sees of a gateway (gateway.service.admin.Gateway)
        balancer = None
        audit = None
        bound: dict = {}
        clients: dict = {}
        admin_address = Address("10.0.0.1", 9090)
        started_at = reloads = 0
        last_reload_error = ""

    Running.config = config
    admin = AdminServer.__new__(AdminServer)
    admin.gateway = Running()

    def request(**headers) -> h11.Request:
        return h11.Request(method="GET", target="/api/status",
                           headers=[("Host", "10.0.0.1:9090"), *headers.items()])

    assert trio.run(admin.route, request(), b"")[0] == 401
    assert trio.run(admin._user, request(Authorization="Bearer op-token-0123456789"))[0].name \
        == "admin"
    basic = "Basic " + __import__("base64").b64encode(b"x:op-token-0123456789").decode()
    assert trio.run(admin._user, request(Authorization=basic))[0].name == "admin"


async def test_a_client_that_does_not_read_its_response_is_let_go(autojump_clock):
    """A response must be taken within SEND_TIMEOUT: a client that asks and never reads holds
    its admin slot 10 s, not for ever; one that reads gets its answer."""
    class Running:  # what AdminServer sees of a gateway (gateway.service.admin.Gateway)
        config = parse_config(site(1))
        admin_address = Address("127.0.0.1", 9090)

    admin = AdminServer.__new__(AdminServer)
    admin.gateway = Running()
    asked = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:9090\r\nConnection: close\r\n\r\n"
    for reads in (True, False):
        client, served = memory_link_pair("admin client")
        client.inbox_limit = None if reads else 0
        client.send_now(asked)
        started = trio.current_time()
        with trio.fail_after(3600):  # fake time: an unbounded send fails here, not hangs
            await admin.handle(served, "127.0.0.1:40000")
        if reads:
            assert trio.current_time() == started
            assert (await client.receive_some()).startswith(b"HTTP/1.1 200 ")
        else:
            assert trio.current_time() - started == SEND_TIMEOUT


async def test_an_unknown_vip_or_member_is_named_whole(nursery):
    """0.2 cut the closing quote off the name ("no VIP named 'x")."""
    (backend,) = await start_backends(nursery, "a")
    gateway = await start_gateway(nursery, site(backend.port), admin=True)
    status, answer = await ask(gateway, "POST", "/api/vips/nope/members/a",
                               body=b'{"state": "drain"}', headers=JSON)
    assert (status, answer) == (404, {"error": "no VIP named 'nope'"})
    status, answer = await ask(gateway, "POST", "/api/vips/web/members/zz",
                               body=b'{"state": "drain"}', headers=JSON)
    assert status == 404 and answer["error"].endswith("'zz'")


async def test_the_status_page_says_when_a_vip_refuses_everyone(nursery):
    """A banner per VIP with no member up, in its protocol's words; a legend for the colours."""
    from gateway.balancer import Health
    from tests.helpers import refused_port, wait_for_health
    from tests.test_admin import get

    (backend,) = await start_backends(nursery, "a")
    text = site(backend.port) + (
        '[[vip]]\nname = "pacs"\nprotocol = "dicom"\nlisten = "127.0.0.1:0"\n'
        'health = { check = "tcp", interval = "1h", fall = 1 }\n'
        f'[[vip.member]]\nname = "p"\naddress = "127.0.0.1:{refused_port()}"\n')
    gateway = await start_gateway(nursery, text, admin=True)
    await wait_for_health(gateway.balancer.pool("pacs"), "p", Health.DOWN)
    status, page = await get(f"http://127.0.0.1:{gateway.admin_address.port}/")
    assert status == 200
    assert page.count(b'class="banner"') == 1
    assert b"vip pacs: no member up: modalities are being refused" in page
    assert b'class="legend"' in page and b"none up: clients refused" in page
