"""What an on-call team is given (packaging/prometheus, packaging/grafana): the alerting rules
pass promtool's checks and their own tests, and every metric the rules and the dashboard use is
one a running gateway serves, with the values the alerts read."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway.config import load_config
from gateway.service.server import Gateway
from tests.helpers import eventually, refused_port, start_backends
from tests.test_admin import get
from tests.test_docs import copy_blocks

ROOT = Path(__file__).parent.parent
RULES = ROOT / "packaging" / "prometheus" / "medgate-rules.yml"
DASHBOARD = ROOT / "packaging" / "grafana" / "medgate-dashboard.json"
# medgate's own metrics and the process collector's (functions and labels are not metrics)
METRIC = re.compile(r"\b(?:medgate_[a-z_]+|process_[a-z_]+)\b")

def test_the_rules_pass_promtool_check_and_their_tests():
    checked = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True,
                             text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(["promtool", "test", "rules", "medgate-rules.test.yml"],
                            cwd=RULES.parent, capture_output=True, text=True)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout + tested.stderr, (
        tested.stdout + tested.stderr)
    alerts = re.findall(r"^\s+- alert: (\w+)$", RULES.read_text(), re.M)
    tests = (RULES.parent / "medgate-rules.test.yml").read_text()
    untested = [name for name in alerts if f"alertname: {name}\n" not in tests]
    assert not untested, f"alerts without a promtool test: {untested}"


def used_metrics() -> dict[str, set[str]]:
    """Every metric name the rules and the dashboard's queries use, by where."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    queries += [dashboard["templating"]["list"][1]["definition"]]
    return {"rules": set(METRIC.findall(RULES.read_text())),
            "dashboard": {name for query in queries for name in METRIC.findall(query)}}


async def test_every_metric_the_rules_and_dashboard_use_is_served(nursery, tmp_path):
    (backend,) = await start_backends(nursery, "a")
    site = tmp_path / "site.toml"
    site.write_text(f"""
[gateway]
admin = "127.0.0.1:0"
admin_token = "pair-token-0123456789"
audit = ""
peers = ["127.0.0.1:{refused_port()}"]
atna = {{ repository = "127.0.0.1:{refused_port()}", spool = "{tmp_path / 'spool'}" }}
[[vip]]
name = "web"
protocol = "tcp"
listen = "127.0.0.1:0"
health = {{ check = "tcp", interval = "200ms", timeout = "1s" }}
[[vip.member]]
name = "a"
address = "127.0.0.1:{backend.port}"
""")
    gateway = Gateway(load_config(site))
    await nursery.start(gateway.run)
    await eventually(lambda: gateway.peers.links[0].ok is False, what="the peer asked")

    async def scrape() -> dict[str, float]:
        status, body = await get(f"http://{gateway.admin_address}/metrics")
        assert status == 200
        families = list(text_string_to_metric_families(body.decode()))
        served.update(family.name for family in families)  # also those with no sample now
        return {sample.name: sample.value for family in families for sample in family.samples}

    served: set[str] = set()
    samples = await scrape()
    served |= set(samples)
    for where, names in used_metrics().items():
        missing = sorted(name for name in names if name not in served)
        assert not missing, f"{where} use metrics /metrics does not serve: {missing}"
    # What the alerts read, as this gateway is: ATNA spooling (its repository is down),
    # its peer unreachable, its config file the one running.
    assert samples["medgate_atna_spool_records"] >= 1  # Application Start at least
    assert samples["medgate_atna_spool_bytes"] > 0
    assert samples["medgate_atna_connect_failures_total"] >= 1
    assert samples["medgate_peer_reachable"] == 0 and samples["medgate_peer_in_sync"] == 0
    assert samples["medgate_config_file_differs"] == 0
    assert samples["medgate_config_reload_refused"] == 0
    assert samples["medgate_workers_down"] == 0  # one process: none
    site.write_text(site.read_text().replace('interval = "200ms"', 'interval = "300ms"'))
    assert (await scrape())["medgate_config_file_differs"] == 1  # edited, not reloaded
    assert await gateway.reload_from_file() == ""
    assert (await scrape())["medgate_config_file_differs"] == 0
    site.write_text(site.read_text().replace('protocol = "tcp"', 'protocol = "nope"'))
    assert await gateway.reload_from_file() != ""
    after = await scrape()
    assert after["medgate_config_reload_refused"] == 1 and after["medgate_config_file_differs"] == 1
    gateway.stop()


def test_the_prometheus_and_alertmanager_configs_of_the_docs_pass_their_checks(tmp_path):
    """docs/operations.md's prometheus.yml (its files moved here) and the README's
    alertmanager.yml, as written."""
    blocks = copy_blocks()
    alertmanager = tmp_path / "alertmanager.yml"
    alertmanager.write_text(blocks["alertmanager.yml"])
    checked = subprocess.run(["amtool", "check-config", str(alertmanager)], capture_output=True,
                             text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "2 receivers" in checked.stdout, checked.stdout
    (tmp_path / "medgate-ca.crt").write_text("")
    (tmp_path / "medgate-read.token").write_text("read-token-0123456789\n")
    prometheus = tmp_path / "prometheus.yml"
    prometheus.write_text(blocks["prometheus.yml"]
                          .replace("/etc/prometheus/rules/medgate-rules.yml", str(RULES))
                          .replace("/etc/prometheus/", f"{tmp_path}/"))
    checked = subprocess.run(["promtool", "check", "config", str(prometheus)],
                             capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "13 rules found" in checked.stdout + checked.stderr
