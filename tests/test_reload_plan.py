"""What a reload changes, worked out from two configs with no socket opened (reload_plan)."""

from __future__ import annotations

import json

from gateway.config import Address, parse_config
from gateway.logs import LogFormat
from gateway.service.listeners import listen_key
from gateway.service.reload_plan import WORKER_AT_RESTART, plan_reload


def config(*vips: tuple[str, str, str], admin: str = "127.0.0.1:9090") -> str:
    text = f'[gateway]\nadmin = "{admin}"\n'
    for name, protocol, listen in vips:
        text += (f'[[vip]]\nname = "{name}"\nprotocol = "{protocol}"\nlisten = "{listen}"\n'
                 f'[[vip.member]]\nname = "m1"\naddress = "127.0.0.1:1"\n')
    return text


def test_kept_new_removed_and_moved_vips_and_their_listeners():
    old = parse_config(config(("dicom", "dicom", "127.0.0.1:11104"), ("web", "tcp", "127.0.0.1:0"),
                              ("hl7", "hl7", "127.0.0.1:12575")))
    new = parse_config(config(("dicom", "dicom", "127.0.0.1:11104"), ("web", "hl7", "127.0.0.1:0"),
                              ("xds", "xds", "127.0.0.1:18080"), admin="127.0.0.1:9091"))
    listening = [listen_key(vip.name, address) for vip in old.vips for address in vip.listen]
    plan = plan_reload(old, new, listening, admin_tls_on=False)
    assert [vip.name for vip in plan.reconfigured] == ["dicom"]
    assert [vip.name for vip in plan.replaced] == ["web", "xds"]  # web changed its protocol
    assert plan.removed == ("hl7",)
    # A fixed address is kept by whichever VIP lists it; port 0 is one socket per VIP.
    assert plan.to_bind == (("xds", Address("127.0.0.1", 18080)),)
    assert plan.to_close == (listen_key("hl7", Address("127.0.0.1", 12575)),)
    assert plan.kept_for_restart == ("admin",)
    assert plan.describe() == ("reconfigured dicom; new web, xds; removed hl7; new listeners "
                               "127.0.0.1:18080; closed listeners 127.0.0.1:12575")


def test_nothing_changed_and_admin_tls_turned_on_waits_for_a_restart(tmp_path):
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "admin.pem"))
    same = config(("dicom", "dicom", "127.0.0.1:11104"))
    old = parse_config(same)
    with_tls = parse_config(same.replace(
        'admin = "127.0.0.1:9090"\n',
        f'admin = "127.0.0.1:9090"\nadmin_tls = {{ cert = "{tmp_path / "admin.pem"}" }}\n'))
    listening = [listen_key("dicom", Address("127.0.0.1", 11104))]
    unchanged = plan_reload(old, old, listening, admin_tls_on=False)
    assert unchanged.describe() == "reconfigured dicom" and not unchanged.kept_for_restart
    assert plan_reload(old, with_tls, listening, admin_tls_on=False).kept_for_restart == (
        "admin_tls",)
    # Already on: new certificate files are taken at once.
    assert plan_reload(with_tls, with_tls, listening, admin_tls_on=True).kept_for_restart == ()


def test_what_is_read_at_start_stays_as_it_runs_and_the_rest_takes_effect():
    """A reload that changed state_dir, the ATNA repository or the log format kept the old
    ones in the leader (made once) while the workers it started read the new ones: receipts
    and keyed hashes in two folders, two log formats in one journal."""
    from gateway.service.reload_plan import in_force
    from gateway.service.worker import as_the_leaders

    vip = config(("hl7", "hl7", "127.0.0.1:0")).split("\n", 2)[2]
    old = parse_config('[gateway]\nadmin = ""\nstate_dir = "/var/lib/a"\naudit = "a.jsonl"\n'
                       'drain_timeout = "30s"\nlog_format = "text"\nreceipt_days = 30\n' + vip)
    new = parse_config('[gateway]\nadmin = ""\nstate_dir = "/var/lib/b"\naudit = "b.jsonl"\n'
                       'drain_timeout = "5s"\nlog_format = "json"\nreceipt_days = 7\n'
                       'atna = { repository = "127.0.0.1:514", transport = "udp" }\n' + vip)
    plan = plan_reload(old, new, [], admin_tls_on=False)
    assert plan.kept_for_restart == ("state_dir", "receipt_days", "atna", "log_format")
    running = in_force(old.gateway, new.gateway)
    assert (running.state_dir, running.receipt_days, running.atna, running.log_format) == (
        "/var/lib/a", 30, None, "text")
    assert (running.audit, running.drain_timeout) == ("b.jsonl", 5.0)  # these apply at once
    # A worker of the next generation reads the new text; its hello says what stays
    told = json.loads(json.dumps({key: getattr(running, key) for key in WORKER_AT_RESTART}))
    worker = as_the_leaders(new, told).gateway
    assert (worker.state_dir, worker.receipt_days, worker.log_format) == (
        "/var/lib/a", 30, LogFormat.TEXT)
    assert worker.atna is None and (worker.audit, worker.drain_timeout) == ("b.jsonl", 5.0)
