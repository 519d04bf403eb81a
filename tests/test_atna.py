"""ATNA audit (IHE ITI-20): the security events the gateway knows reach an audit record
repository over syslog TLS as valid DICOM PS3.15 A.5 messages; a repository that is down loses
none of them (the spool sends them in order when it returns)."""

from __future__ import annotations

import base64
import datetime
import json

import trio
from lxml import etree

from gateway.records.atna import Actor, AtnaSender
from gateway.config import Address, AtnaSettings, ClientTls
from protocols import atna
from tests.helpers.audit_schema import valid_audit_message
from tests.helpers.dicom_peers import echoscu
from tests.helpers import eventually, reserved_port, start_gateway, vip_port
from tests.test_tls import dcmtk_tls, server_context, tls_table

TOKEN = "op-token-0123456789"


def check_a5(xml: bytes) -> etree._Element:
    """A PS3.15 A.5.1 AuditMessage (its schema) with what A.5.3 adds for every event medgate
    reports (an action code, an event type, a source type); returns the root."""
    root = valid_audit_message(xml)
    event = root.find("EventIdentification")
    assert event.get("EventActionCode") == "E" and event.find("EventTypeCode") is not None
    assert root.find("AuditSourceIdentification/AuditSourceTypeCode") is not None
    return root


def event_of(root: etree._Element) -> tuple[str, str, str]:
    """(EventID code, EventTypeCode code, outcome) of a checked message."""
    event = root.find("EventIdentification")
    return (event.find("EventID").get("csd-code"), event.find("EventTypeCode").get("csd-code"),
            event.get("EventOutcomeIndicator"))


def check_per_event(root: etree._Element) -> None:
    """What each kind of event must carry besides the general parts (A.5.3)."""
    event_id, type_code, _ = event_of(root)
    participants = list(root.iter("ActiveParticipant"))
    roles = {p.find("RoleIDCode").get("csd-code") for p in participants
             if p.find("RoleIDCode") is not None}
    if event_id == "110100":  # Application Activity: the application started or stopped
        assert type_code in ("110120", "110121") and "110150" in roles
    elif event_id == "110113":  # Security Alert: who reports it, who caused it
        assert type_code in ("110126", "110128", "110131")
        assert any(p.get("UserIsRequestor") == "false" for p in participants)
        assert any(p.get("UserIsRequestor") == "true" for p in participants)
    elif event_id == "110114":  # User Authentication: the user, as requestor
        assert type_code in ("110122", "110123")
        assert any(p.get("UserIsRequestor") == "true" for p in participants)
    else:
        raise AssertionError(f"unexpected EventID {event_id}")


async def post(url: str, body: dict, token: str) -> int:
    result = await trio.run_process(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
         "-H", "Content-Type: application/json", "-H", f"Authorization: Bearer {token}",
         "--data", json.dumps(body), url], capture_stdout=True, capture_stderr=True)
    return int(result.stdout)


async def test_security_events_reach_the_repository_as_valid_a5_messages(
        nursery, audit_repository, pacs, certs, tmp_path):
    repository = audit_repository(tls=server_context(certs.server, ca=certs.ca))
    pacs1 = pacs("PACS1")
    gateway = await start_gateway(nursery, f"""
[gateway]
admin = "127.0.0.1:0"
admin_token = "{TOKEN}"
atna = {{ repository = "127.0.0.1:{repository.port}", ca = "{certs.ca}", cert = "{certs.client[0]}", key = "{certs.client[1]}", spool = "{tmp_path / 'spool'}", site_id = "TEST-HOSPITAL" }}
[[vip]]
name = "pacs"
protocol = "dicom"
listen = "127.0.0.1:0"
tls = {tls_table(certs.server, ca=certs.ca, verify_client='required')}
allowed_clients = {{ "CN=ct1.hospital.local" = ["ECHOSCU"] }}
health = {{ check = "dicom-echo", interval = "1s" }}
[[vip.member]]
name = "pacs1"
address = "127.0.0.1:{pacs1.port}"
ae_title = "PACS1"
""", admin=True)
    port = vip_port(gateway, "pacs")
    assert (await echoscu(port, "VIP", "ECHOSCU", *dcmtk_tls(certs, certs.client))).clean
    refused_ae = await echoscu(port, "VIP", "ECHOSCU", *dcmtk_tls(certs, certs.other_client))
    assert not refused_ae.clean
    assert not (await echoscu(port, "VIP", "ECHOSCU", *dcmtk_tls(certs))).clean  # no cert
    admin = f"http://{gateway.admin_address}/api/vips/pacs/members/pacs1"
    assert await post(admin, {"state": "drain"}, "wrong-token-0123456789") == 401
    assert await post(admin, {"state": "drain"}, TOKEN) == 200
    gateway.stop()  # Application Stop is sent at stop (from the spool, within 2 s)
    # Application Stop is the last one sent: once 7 are here, no other can follow it.
    received = await repository.wait_received(7, timeout=15)
    assert {m.priority for m in received} <= {84, 85}  # facility 10, notice or warning
    assert {m.msgid for m in received} == {"IHE+RFC-3881"}
    roots = [check_a5(m.xml) for m in received]
    for root in roots:
        check_per_event(root)
    events = [event_of(root) for root in roots]
    assert events == [
        ("110100", "110120", "0"),  # Application Start
        ("110113", "110126", "4"),  # Node Authentication: us2's certificate may not be ECHOSCU
        ("110113", "110126", "4"),  # Node Authentication: TLS refused, no client certificate
        ("110114", "110122", "4"),  # Login with a wrong token
        ("110114", "110122", "0"),  # Login of "admin"
        ("110113", "110128", "0"),  # Network Configuration: pacs1 drained
        ("110100", "110121", "0"),  # Application Stop
    ], events
    alert = roots[1]
    assert alert.find("ParticipantObjectIdentification").get("ParticipantObjectID") == "vip:pacs"
    assert any(p.get("UserID") == "ECHOSCU" for p in alert.iter("ActiveParticipant"))
    assert roots[0].find("AuditSourceIdentification").get(
        "AuditEnterpriseSiteID") == "TEST-HOSPITAL"


async def test_repository_down_nothing_lost_sent_in_order_when_it_returns(
        audit_repository, certs, tmp_path):
    port = reserved_port()
    sender = AtnaSender(AtnaSettings(Address("127.0.0.1", port), tls=ClientTls(ca=certs.ca),
                                     spool=str(tmp_path / "spool")))
    sender.open()
    async with trio.open_nursery() as nursery:
        await nursery.start(sender.run)
        sender.application(True)
        for n in range(20):
            sender.user_authentication(False, Actor(f"user{n}", "127.0.0.1"), f"try {n}")
        await eventually(lambda: sender.unreachable >= 1, what="a failed connect")
        assert sender.sent == 0 and (tmp_path / "spool" / "atna.spool").stat().st_size > 0
        repository = audit_repository(tls=server_context(certs.server), port=port)
        await repository.wait_received(21, timeout=20)
        sender.application(False)
        await sender.finish()  # sent and confirmed; the delivery task ends
    users = [p.get("UserID") for m in repository.received()[1:21]
             for p in etree.fromstring(m.xml).iter("ActiveParticipant")
             if p.get("UserIsRequestor") == "true"]
    assert users == [f"user{n}" for n in range(20)]  # in the order they happened
    assert sender.sent == 22 and sender.dropped == 0
    assert (tmp_path / "spool" / "atna.spool").stat().st_size == 0  # drained, emptied


def test_every_record_kind_passes_the_a51_schema(tmp_path):
    """Each event the sender makes, as it lies in the spool: a Security Alert carries its
    subject's name and its detail as base64, the two things A.5.1 asks that were missing."""
    sender = AtnaSender(AtnaSettings(Address("127.0.0.1", 9), spool=str(tmp_path / "spool")))
    sender.open()
    sender.application(True)
    sender.application(False)
    sender.security_alert(atna.NODE_AUTHENTICATION, False, Actor("CT<1>", "10.1.2.3"),
                          "no certificate & no <AE>", "vip:pacs")
    sender.security_alert(atna.NETWORK_CONFIGURATION, True, Actor.at("ops", "[::1]:5000"),
                          "pacs/pacs1: up -> drain", "vip:pacs/member:pacs1")
    sender.security_alert(atna.SOFTWARE_CONFIGURATION, False, Actor("signal"),
                          "reload refused: ünknown key", "config:/etc/medgate/medgate.toml")
    sender.security_alert(atna.SOFTWARE_CONFIGURATION, True, Actor("signal"), "reloaded")
    sender.user_authentication(True, Actor("admin", "127.0.0.1"), "token")
    sender.user_authentication(False, Actor("", "127.0.0.1"), "wrong token")
    reader = atna.SyslogReader()
    reader.feed((tmp_path / "spool" / "atna.spool").read_bytes())
    roots = []
    while (message := reader.next_message()) is not None:
        roots.append(check_a5(atna.parse_syslog(message).xml))
        check_per_event(roots[-1])
    assert len(roots) == 8
    subjects = [(s.get("ParticipantObjectID"), s.findtext("ParticipantObjectName"),
                 base64.b64decode(s.find("ParticipantObjectDetail").get("value")).decode())
                for root in roots for s in root.iter("ParticipantObjectIdentification")]
    assert subjects == [
        ("vip:pacs", "pacs", "no certificate & no <AE>"),
        ("vip:pacs/member:pacs1", "pacs/member:pacs1", "pacs/pacs1: up -> drain"),
        ("config:/etc/medgate/medgate.toml", "/etc/medgate/medgate.toml",
         "reload refused: ünknown key")]


def test_the_spool_is_bounded_and_says_so(tmp_path, caplog):
    sender = AtnaSender(AtnaSettings(Address("127.0.0.1", 9), spool=str(tmp_path / "spool"),
                                     spool_max=4000))
    sender.open()
    for n in range(20):
        sender.user_authentication(False, Actor(f"user{n}", "127.0.0.1"), "wrong token")
    assert (tmp_path / "spool" / "atna.spool").stat().st_size <= 4000
    assert sender.dropped > 0
    assert sum("spool" in r.message and "full" in r.message for r in caplog.records) == 1


def test_syslog_framing_round_trip():
    when = datetime.datetime(2026, 11, 29, 12, 0, tzinfo=datetime.timezone.utc)
    xml = atna.encode_message(atna.AuditEvent(
        atna.SECURITY_ALERT, atna.NODE_AUTHENTICATION, atna.Outcome.MINOR_FAILURE, when,
        (atna.Participant("CT\x01 1", True, network_id="10.1.2.3"),), "medgate@gw1"))
    message = atna.syslog_message(xml, when=when, hostname="gw 1", app_name="medgate",
                                  procid="42", warning=True)
    reader = atna.SyslogReader()
    for byte in atna.octet_counted(message):  # one byte at a time
        reader.feed(bytes([byte]))
    parsed = atna.parse_syslog(reader.next_message())
    assert (parsed.priority, parsed.msgid) == (84, "IHE+RFC-3881")
    root = check_a5(parsed.xml)
    assert root.find("ActiveParticipant").get("UserID") == "CT? 1"  # no control characters
    assert message.startswith(b"<84>1 2026-11-29T12:00:00.000+00:00 gw1 medgate 42 IHE+RFC-3881 - ")
