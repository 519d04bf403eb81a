"""Operations: status page in a real browser, metrics, gateway ctl, reload, audit log."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest
import trio
from lxml import html as lxml_html
from prometheus_client.parser import text_string_to_metric_families

from gateway.balancer import Health
from tests.helpers.dicom_peers import echoscu, write_instances
from tests.helpers import (eventually, logged_port, refused_port, start_backends, start_gateway,
                           stop_process, wait_until)

ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic"]


def chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail("chromium is not installed: apt-get install chromium (.ci/run does this)")
    return path


def admin_toml(members: list[tuple[str, int]], extra: str = "", token: str = "") -> str:
    text = f"""
[gateway]
admin = "127.0.0.1:0"
admin_token = "{token}"
audit = ""
[[vip]]
name = "web"
protocol = "tcp"
listen = "127.0.0.1:0"
health = {{ check = "tcp", interval = "200ms", timeout = "1s", rise = 1, fall = 1 }}
{extra}
"""
    for name, port in members:
        text += f'[[vip.member]]\nname = "{name}"\naddress = "127.0.0.1:{port}"\n'
    return text


async def get(url: str) -> tuple[int, bytes]:
    def fetch():
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
    return await trio.to_thread.run_sync(fetch)


MEASURE = """<script>
const page = document.documentElement;
document.body.dataset.overflow = String(page.scrollWidth > page.clientWidth);
for (const row of document.querySelectorAll("tr.member")) {
  for (const [name, cell] of [["check", "td.check"], ["failures", "td.failures"]]) {
    const box = row.querySelector(cell).getBoundingClientRect();
    row.dataset[name] = String(box.width > 0 && box.left >= 0 && box.right <= innerWidth);
  }
}
</script></body>"""


async def chromium_run(profile: str, *args: str) -> bytes:
    with trio.fail_after(60):
        result = await trio.run_process([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                         *args], capture_stdout=True, capture_stderr=True)
    return result.stdout


async def test_status_page_in_chromium_shows_one_member_up_one_down(nursery, tmp_path):
    (alive,) = await start_backends(nursery, "alive")
    dead_port = refused_port()
    gateway = await start_gateway(nursery, admin_toml([("pacs-a", alive.port),
                                                       ("pacs-b", dead_port)]), admin=True)
    pool = gateway.balancer.pool("web")
    for connections in (2, 5, 1):  # three traffic samples for the sparkline
        for _ in range(connections):
            stream = await trio.open_tcp_stream("127.0.0.1", gateway.bound["web"][0].port)
            await stream.receive_some(100)
            await stream.aclose()
        pool.sample_traffic()
    await eventually(lambda: len(pool.member("pacs-b").check_history) >= 3, 10)
    url = f"http://{gateway.admin_address}/"
    profile = tempfile.mkdtemp(prefix="medgate-chromium-")
    try:
        dom = await chromium_run(profile, "--dump-dom", url)
        ARTIFACTS.mkdir(exist_ok=True)
        for width, height in ((1280, 800), (400, 900)):
            shot = ARTIFACTS / f"status-page-{width}.png"
            await chromium_run(profile, f"--window-size={width},{height}",
                               f"--screenshot={shot}", url)
            assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
        # On a phone (400 px): the page as served, measured where it is laid out
        status, html_text = await get(url)
        measured = tmp_path / "narrow.html"
        measured.write_text(html_text.decode().replace("</body>", MEASURE))
        narrow = await chromium_run(profile, "--window-size=400,900", "--dump-dom",
                                    measured.as_uri())
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    page = lxml_html.fromstring(dom)
    rows = {row.get("data-member"): row for row in page.xpath('//tr[@class="member"]')}
    assert rows["pacs-a"].get("data-state") == "up"
    assert rows["pacs-b"].get("data-state") == "down"
    assert rows["pacs-a"].xpath('.//span[@class="state"]')[0].text_content() == "UP"
    assert "connection refused" in rows["pacs-b"].xpath('.//td[@class="check"]')[0].text_content()
    assert "tcp on 127.0.0.1:" in page.xpath("//h2/small")[0].text_content()
    assert "no TLS" in page.xpath("//h2/small")[0].text_content()
    traffic = rows["pacs-a"].xpath('.//td[@data-label="traffic"]//polyline')[0].get("points")
    assert len(traffic.split()) == 3  # one point per sample
    assert rows["pacs-b"].xpath('.//td[@class="check"]//polyline')  # its check latencies
    small = lxml_html.fromstring(narrow)
    assert small.xpath("//body")[0].get("data-overflow") == "false"  # no sideways scrolling
    for row in small.xpath('//tr[@class="member"]'):
        assert (row.get("data-check"), row.get("data-failures")) == ("true", "true"), \
            row.get("data-member")


async def test_metrics_parse_and_count_the_traffic(nursery):
    backends = await start_backends(nursery, "a", "b")
    gateway = await start_gateway(nursery, admin_toml([(b.name, b.port) for b in backends]),
                                  admin=True)
    port = gateway.bound["web"][0].port
    sent = 0
    for _ in range(10):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(b"ping")
        with trio.fail_after(5):
            received = b""
            while len(received) < 2 + 4:  # greeting "a\n" or "b\n", then the echo
                received += await stream.receive_some(100)
        await stream.aclose()
        sent += 4
    pool = gateway.balancer.pool("web")
    await eventually(lambda: not any(m.active for m in pool.members), 5)
    status, body = await get(f"http://{gateway.admin_address}/metrics")
    assert status == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body.decode())
               for s in family.samples}
    routed = {m: samples[("medgate_member_routed_total", (("member", m), ("vip", "web")))]
              for m in ("a", "b")}
    assert routed == {"a": 5, "b": 5}
    assert samples[("medgate_vip_relayed_total", (("unit", "connections"), ("vip", "web")))] == 10
    bytes_in = sum(samples[("medgate_member_bytes_in_total", (("member", m), ("vip", "web")))]
                   for m in ("a", "b"))
    assert bytes_in == sent
    assert samples[("medgate_member_up", (("member", "a"), ("vip", "web")))] == 1
    checks = samples[("medgate_check_seconds_count", (("member", "a"), ("vip", "web")))]
    assert checks >= 1
    assert samples[("medgate_vip_clients", (("vip", "web"),))] == 0  # all 10 have gone
    assert samples[("medgate_vip_max_clients", (("vip", "web"),))] == gateway.total.limit
    status, body = await get(f"http://{gateway.admin_address}/api/status")
    document = json.loads(body)
    assert document["vips"][0]["relayed"] == 10 and document["vips"][0]["unit"] == "connections"


def dicom_site(path: Path, vip_port: int, admin_port: int, members: list[tuple[str, int]],
               token: str = "", audit: str = "") -> Path:
    text = f"""
[gateway]
admin = "127.0.0.1:{admin_port}"
admin_token = "{token}"
audit = "{audit}"
[[vip]]
name = "pacs"
protocol = "dicom"
listen = "127.0.0.1:{vip_port}"
persistence = {{ key = "calling-ae", timeout = "1h" }}
health = {{ check = "dicom-echo", interval = "300ms", timeout = "1s" }}
"""
    for name, port in members:
        text += f'[[vip.member]]\nname = "{name}"\naddress = "127.0.0.1:{port}"\nae_title = "{name.upper()}"\n'
    path.write_text(text)
    return path


async def ctl(*args: str) -> subprocess.CompletedProcess:
    with trio.fail_after(60):
        return await trio.run_process([sys.executable, "-m", "gateway", "ctl", *args],
                                      capture_stdout=True, capture_stderr=True, check=False)


async def test_ctl_drain_keeps_persisted_clients_and_ready_restores(nursery, pacs, tmp_path):
    pacs1, pacs2 = pacs("PACS1"), pacs("PACS2")
    from gateway.config import load_config
    from gateway.service.server import Gateway

    config = dicom_site(tmp_path / "site.toml", 0, 0, [("pacs1", pacs1.port),
                                                       ("pacs2", pacs2.port)], token="s3cret")
    gateway = Gateway(load_config(config))
    await nursery.start(gateway.run)
    port = gateway.bound["pacs"][0].port
    admin = f"http://{gateway.admin_address}"
    assert (await echoscu(port, "VIP", "CT01")).clean
    home = gateway.balancer.pool("pacs").persisted_member("CT01")
    other = "pacs2" if home == "pacs1" else "pacs1"

    refused = await ctl("--admin", admin, "drain", f"pacs/{home}")
    assert refused.returncode == 1 and b"HTTP 401" in refused.stderr
    drained = await ctl("--admin", admin, "--token", "s3cret", "drain", f"pacs/{home}", "--wait")
    assert drained.returncode == 0, drained.stderr
    assert f"pacs/{home}: drain".encode() in drained.stdout and b"drained" in drained.stdout
    for calling in ("CT01", "CT01", "MR01", "CR01", "US01"):
        assert (await echoscu(port, "VIP", calling)).clean
    pool = gateway.balancer.pool("pacs")
    assert pool.persisted_member("CT01") == home  # the persisted client stayed
    assert {pool.persisted_member(c) for c in ("MR01", "CR01", "US01")} == {other}

    status = await ctl("-c", str(config), "--admin", admin, "status")
    assert status.returncode == 0 and b"DRAIN" in status.stdout
    ready = await ctl("-c", str(config), "--admin", admin, "ready", f"pacs/{home}")
    assert ready.returncode == 0 and f"pacs/{home}: up".encode() in ready.stdout
    for calling in ("XA01", "NM01", "PT01", "DX01"):
        await echoscu(port, "VIP", calling)
    assert home in {pool.persisted_member(c) for c in ("XA01", "NM01", "PT01", "DX01")}

    weight = await ctl("--admin", admin, "--token", "s3cret", "weight", f"pacs/{home}", "0")
    assert weight.returncode == 0 and pool.member(home).weight == 0
    assert (await ctl("--admin", admin, "drain", "pacs-without-member")).returncode == 3
    missing = await ctl("--admin", admin, "--token", "s3cret", "drain", "pacs/nope")
    assert missing.returncode == 1 and b"HTTP 404" in missing.stderr


async def test_ctl_finds_the_gateway_from_medgate_config_or_says_what_to_give(nursery,
                                                                            tmp_path):
    from gateway.config import load_config
    from gateway.service.server import Gateway

    (backend,) = await start_backends(nursery, "a")
    config = tmp_path / "site.toml"
    config.write_text(admin_toml([("a", backend.port)], token="t0k"))
    gateway = Gateway(load_config(config))
    await nursery.start(gateway.run)
    config.write_text(config.read_text().replace(  # where ctl finds it: the port as bound
        'admin = "127.0.0.1:0"', f'admin = "{gateway.admin_address}"'))
    env = {**os.environ, "MEDGATE_CONFIG": str(config)}
    env.pop("MEDGATE_ADMIN_TOKEN", None)
    with trio.fail_after(60):
        found = await trio.run_process([sys.executable, "-m", "gateway", "ctl", "status"],
                                       capture_stdout=True, capture_stderr=True, check=False,
                                       env=env)
        assert found.returncode == 0, found.stderr
        assert b"web" in found.stdout
        del env["MEDGATE_CONFIG"]
        lost = await trio.run_process([sys.executable, "-m", "gateway", "ctl", "--admin",
                                       f"http://127.0.0.1:{refused_port()}", "status"],
                                      capture_stdout=True, capture_stderr=True, check=False,
                                      env=env)
        assert lost.returncode == 1 and b"give the gateway" not in lost.stderr  # it was named
    # Neither named: the default address, and if nothing answers there, what to give
    from gateway.commands import ctl as ctl_command

    guessed = ctl_command.connect(argparse.Namespace(admin=None, token="", ca=None,
                                                     config=None))
    assert guessed.base == "http://127.0.0.1:9090"
    guessed.base = f"http://127.0.0.1:{refused_port()}"  # (9090 may be in use on this machine)
    with pytest.raises(ctl_command.CtlError, match=r"that is only the default: give the "
                       r"gateway's config with -c FILE \(or set MEDGATE_CONFIG=FILE\), or its "
                       r"address with --admin URL"):
        await trio.to_thread.run_sync(guessed.status)


async def test_admin_api_refuses_bad_requests(nursery):
    (backend,) = await start_backends(nursery, "a")
    gateway = await start_gateway(nursery, admin_toml([("a", backend.port)], token="t0k"),
                                  admin=True)
    base = f"http://{gateway.admin_address}"

    def post(path: str, body: bytes, token: str = "t0k"):
        request = urllib.request.Request(base + path, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    assert (await trio.to_thread.run_sync(post, "/api/vips/web/members/a", b'{"state":"drain"}',
                                          ""))[0] == 401
    code, answer = await trio.to_thread.run_sync(post, "/api/vips/web/members/a", b'{"state":"x"}')
    assert code == 400 and "'x' is not a valid AdminState" in answer["error"]
    code, answer = await trio.to_thread.run_sync(post, "/api/vips/web/members/a", b'{"weight":7}')
    assert code == 200 and answer["weight"] == 7
    assert (await trio.to_thread.run_sync(post, "/api/vips/nope/members/a", b"{}"))[0] == 404
    assert (await get(base + "/nothing"))[0] == 404


def test_sighup_during_storescu_loses_nothing_and_new_member_takes_traffic(tmp_path, pacs):
    pacs1, pacs2 = pacs("PACS1"), pacs("PACS2")
    audit = tmp_path / "audit.jsonl"
    config = dicom_site(tmp_path / "site.toml", 0, 0, [("pacs1", pacs1.port)],
                        audit=str(audit))
    log_path = tmp_path / "gateway.log"
    process = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(config)],
                               stdout=subprocess.DEVNULL, stderr=open(log_path, "wb"),
                               start_new_session=True)
    env = {**os.environ, "TCP_NODELAY": "1"}
    try:
        vip_port = logged_port(log_path.read_text, "pacs")
        admin_port = logged_port(log_path.read_text)
        files = write_instances(tmp_path / "files", 100, pixel_bytes=256 * 1024)
        sender = subprocess.Popen(["/usr/bin/storescu", "-aec", "VIP", "127.0.0.1", str(vip_port),
                                   *sorted(files)], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        wait_until(lambda: pacs1.stored_count() >= 10, what="storescu under way")
        dicom_site(config, 0, 0, [("pacs1", pacs1.port), ("pacs2", pacs2.port)],
                   audit=str(audit))  # the same listeners (port 0 read back stays bound)
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: "reloaded" in log_path.read_text(), what="reload")
        assert pacs1.stored_count() < 100, "storescu ended before the reload: make it longer"
        _, errors = sender.communicate(timeout=120)
        assert sender.returncode == 0 and "E:" not in errors and "F:" not in errors, errors
        assert set(pacs1.stored) == set(files.values())  # all 100 stored, none aborted
        for calling in ("CT01", "MR01", "CR01", "US01", "XA01", "NM01"):
            echo = subprocess.run(["/usr/bin/echoscu", "-aet", calling, "-aec", "VIP",
                                   "127.0.0.1", str(vip_port)], env=env, capture_output=True,
                                  text=True, timeout=30)
            assert echo.returncode == 0 and "E:" not in echo.stderr
        assert pacs2.echoes >= 2  # the member added by the reload takes traffic

        (tmp_path / "site.toml").write_text("[[vip]]\nname = broken\n")
        process.send_signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in log_path.read_text(), what="reload refused")
        echo = subprocess.run(["/usr/bin/echoscu", "-aec", "VIP", "127.0.0.1", str(vip_port)],
                              env=env, capture_output=True, text=True, timeout=30)
        assert echo.returncode == 0  # the old config keeps running
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/api/status") as response:
            assert "not valid TOML" in json.load(response)["last_reload_error"]
    finally:
        stop_process(process)
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    stores = [r for r in records if r["kind"] == "dicom" and r["calling_ae"] == "STORESCU"]
    assert len(stores) == 1 and stores[0]["outcome"] == "released"
    assert stores[0]["member"] == "pacs1" and stores[0]["pdus_in"] > 100
    assert all(r["outcome"] == "released" for r in records if r["kind"] == "dicom")
    reloads = [(r["user"], r["client"], r["outcome"]) for r in records
               if r["kind"] == "admin" and r["action"] == "reload"]
    assert reloads == [("SIGHUP", "signal", "reloaded"), ("SIGHUP", "signal", "refused")]
    reopens = [r["outcome"] for r in records if r.get("action") == "reopen-logs"]
    assert reopens == ["reopened", "reopened"]  # SIGHUP reopens the audit log each time
    assert "SIMULATED" not in audit.read_text()  # identifiers only, no patient names


async def test_audit_log_for_hl7_and_xds(nursery, hl7_receiver, xds_registry, tmp_path):
    receiver, registry = hl7_receiver("RIS1"), xds_registry()
    audit = tmp_path / "audit.jsonl"
    gateway = await start_gateway(nursery, f"""
[gateway]
audit = "{audit}"
[[vip]]
name = "hl7"
protocol = "hl7"
listen = "127.0.0.1:0"
[[vip.member]]
name = "ris1"
address = "127.0.0.1:{receiver.port}"
[[vip]]
name = "xds"
protocol = "xds"
listen = "127.0.0.1:0"
[[vip.member]]
name = "reg1"
address = "127.0.0.1:{registry.port}"
role = "registry"
""")
    from gateway.testing.simulators.hl7 import send_messages
    from gateway.testing.simulators.hl7_messages import make_messages

    results = await trio.to_thread.run_sync(
        send_messages, "127.0.0.1", gateway.bound["hl7"][0].port, make_messages(2))
    assert [r.code for r in results] == ["AA", "AA"]
    body = (Path(__file__).parent / "fixtures" / "iti18-find-documents.xml").read_bytes()

    def query():
        request = urllib.request.Request(
            f"http://127.0.0.1:{gateway.bound['xds'][0].port}/registry", data=body,
            headers={"Content-Type": 'application/soap+xml; action="urn:ihe:iti:2007:RegistryStoredQuery"'})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status

    assert await trio.to_thread.run_sync(query) == 200
    # the line is written just after the response went out
    await eventually(lambda: '"kind":"xds"' in audit.read_text(), 5)
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    hl7 = [r for r in records if r["kind"] == "hl7"]
    assert [(r["control_id"], r["ack"], r["member"], r["tries"]) for r in hl7] == [
        ("SIM000001", "AA", "ris1", 1), ("SIM000002", "AA", "ris1", 1)]
    (xds,) = [r for r in records if r["kind"] == "xds"]
    assert (xds["action"], xds["member"], xds["status"]) == ("ITI-18", "reg1", 200)
    text = audit.read_text()
    assert "TEST^PATIENT" not in text and "SIMPAT" not in text  # no names, no patient IDs
    assert gateway.balancer.pool("hl7").member("ris1").health is Health.UP
