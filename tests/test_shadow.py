"""Shadow members (`shadow = true`): a copy of each HL7 message a VIP relays goes to them, their
answers are compared with the real member's and never reach the client.

Real peers: python-hl7's MLLP server is the engine in service; the shadow, the new engine on
trial, is `gateway simulate hl7-receiver --validate` (hl7apy's strict structure check), which
answers AE with ERR-3 100 to a message without its PV1, where the old engine answers AA.
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from functools import partial

import pytest
import trio

from gateway.config import ConfigError, parse_config
from gateway.records.shadow import FILE_NAME
from gateway.testing.simulators.hl7_messages import make_messages
from gateway.vips import shadow as shadow_module
from protocols.mllp import MllpReader, frame, peek_ack
from tests.helpers import refused_port, start_gateway, vip_port
from tests.helpers.hl7_peers import LibraryReceiver
from tests.helpers.hl7_senders import send_until_acked
from tests.test_hl7_vip import ReceiverProcess, hl7_vip

GATEWAY = [sys.executable, "-m", "gateway"]


def broken(prefix: str, count: int) -> list[bytes]:
    """Messages without their required PV1: the old engine takes them, hl7apy refuses them."""
    return [m.replace(b"PV1||I|WARD1^101^A\r", b"") for m in make_messages(count, prefix=prefix)]


def shadow_config(tmp_path, real: int, shadow: int, extra: str = "",
                  ack_timeout: str = "2s") -> str:
    return (f'[gateway]\nadmin = "127.0.0.1:0"\naudit = "{tmp_path / "audit.jsonl"}"\n'
            f'state_dir = "{tmp_path / "state"}"\n'
            + hl7_vip([("engine", real), ("new-engine", shadow)], extra=extra,
                      member_extra={"new-engine": "shadow = true"}, ack_timeout=ack_timeout))


async def eventually(predicate, what: str, timeout: float = 20) -> None:
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"{what}: not within {timeout}s")


async def admin_get(gateway, path: str):
    """GET from the admin server of a gateway running in this process (from a thread)."""
    import urllib.request

    def get():
        with urllib.request.urlopen(f"http://{gateway.admin_address}{path}",
                                    timeout=10) as answer:
            return answer.read()

    body = await trio.to_thread.run_sync(get)
    return json.loads(body) if path.startswith("/api") else body.decode()


def shown(gateway) -> dict:
    """The shadow as /api/status shows it (read in process, to wait on)."""
    return gateway.handlers["hl7"].shadows["new-engine"].show()


@pytest.fixture
def engines(tmp_path):
    (tmp_path / "old").mkdir()
    real = LibraryReceiver(tmp_path / "old", "python-hl7")
    trial = ReceiverProcess(tmp_path / "new", "NEWRIS", "--validate").start()
    yield real, trial
    real.stop()
    trial.stop()


async def test_the_shadow_gets_every_message_and_its_differences_are_kept(nursery, engines,
                                                                         tmp_path):
    real, trial = engines
    gateway = await start_gateway(nursery, shadow_config(tmp_path, real.port, trial.port),
                                  admin=True)
    messages = make_messages(6, prefix="GOOD") + broken("NOPV", 3)
    sent = await send_until_acked(vip_port(gateway, "hl7"), messages)
    assert len(sent.acked) == 9 and not sent.naks  # the client heard the engine in service
    await eventually(lambda: shown(gateway)["compared"] == 9, "nine compared")
    assert sorted(real.recorded()) == sorted(trial.recorded()) == sorted(sent.acked)
    vip = next(v for v in (await admin_get(gateway, "/api/status"))["vips"]
               if v["name"] == "hl7")
    status = vip["shadows"][0]
    assert status["name"] == "new-engine"
    assert status["differences"] == {"ack-code": 3} and status["state"] == "answering"
    assert status["dropped"] == status["not_compared"] == 0
    assert [(d["member_answer"], d["shadow_answer"]) for d in status["recent"]] == [
        ("AA", "AE 100")] * 3
    # The pool never picks it: every message went to the engine, none to the shadow as member
    pool = gateway.balancer.pool("hl7")
    assert [m.name for m in pool.members] == ["engine"] and pool.member("engine").total == 9
    # Kept in state_dir, the unit by its type and a keyed hash of its MSH-10, no content
    kept = (tmp_path / "state" / FILE_NAME).read_text()
    lines = [json.loads(line) for line in kept.splitlines()]
    assert [(d["kind"], d["unit"]) for d in lines] == [("ack-code", "ADT^A01^ADT_A01")] * 3
    assert "NOPV" not in kept and all(d["unit_id"].startswith("hmac:") for d in lines), kept
    metrics = await admin_get(gateway, "/metrics")
    assert 'medgate_shadow_differences_total{kind="ack-code",shadow="new-engine",vip="hl7"} 3.0' \
        in metrics
    assert 'medgate_shadow_units_total{shadow="new-engine",vip="hl7"} 9.0' in metrics
    page = await admin_get(gateway, "/")
    assert "new-engine (127.0.0.1:" in page and "3 differed (ack-code 3)" in page
    config = tmp_path / "site.toml"
    config.write_text(shadow_config(tmp_path, real.port, trial.port))
    report = await trio.run_process([*GATEWAY, "shadow", "report", "-c", str(config)],
                                    capture_stdout=True, check=False)
    text = report.stdout.decode()
    assert report.returncode == 0 and "3 difference(s):" in text
    assert "vip hl7 shadow new-engine: 3 ack-code" in text
    assert "engine answered AA, the shadow AE 100" in text
    csv = await trio.run_process([*GATEWAY, "shadow", "report", "-c", str(config), "--csv",
                                  "--since", "1h"], capture_stdout=True, check=False)
    assert csv.returncode == 0 and len(csv.stdout.decode().splitlines()) == 4
    later = await trio.run_process([*GATEWAY, "shadow", "report", "-c", str(config), "--since",
                                    "2999-01-01T00:00"], capture_stdout=True, check=False)
    assert later.returncode == 1 and b"no difference kept since" in later.stdout


async def test_a_shadow_that_is_down_changes_nothing_for_clients(nursery, engines, tmp_path):
    real, _ = engines
    gateway = await start_gateway(nursery, shadow_config(tmp_path, real.port, refused_port()),
                                  admin=True)
    sent = await send_until_acked(vip_port(gateway, "hl7"), make_messages(5, prefix="DN"))
    assert len(sent.acked) == 5 and sent.resends == 0
    await eventually(lambda: shown(gateway)["not_compared"] == 5, "five not compared")
    assert shown(gateway)["state"].startswith("not answering: ")
    assert shown(gateway)["differences"] == {}


async def test_a_stopped_shadow_only_fills_its_queue(nursery, engines, tmp_path, monkeypatch):
    """SIGSTOP on the shadow during traffic: each client's answer comes from the engine at
    once (the ACK wait the shadow never answers is its copy task's, not the client's); past
    its queue, copies are dropped and counted."""
    monkeypatch.setattr(shadow_module, "SHADOW_QUEUE", 5)
    real, trial = engines
    gateway = await start_gateway(nursery, shadow_config(tmp_path, real.port, trial.port,
                                                         ack_timeout="5s"), admin=True)
    port = vip_port(gateway, "hl7")

    async def latencies(prefix: str) -> list[float]:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        reader, taken = MllpReader(), []
        for message in make_messages(30, prefix=prefix):
            started = time.perf_counter()
            await stream.send_all(frame(message))
            while (event := reader.next_event()) is None:
                reader.feed(await stream.receive_some(65536))
            assert peek_ack(event.payload).code == "AA"
            taken.append(time.perf_counter() - started)
        await stream.aclose()
        return taken

    running = await latencies("RUN")
    await eventually(lambda: shown(gateway)["compared"] + shown(gateway)["dropped"] == 30,
                     "the running shadow's copies")
    dropped_before = shown(gateway)["dropped"]  # the queue holds five: it may drop some
    os.kill(trial.process.pid, signal.SIGSTOP)
    try:
        stopped = await latencies("STOP")
        # No client waited for the shadow: each answer came well within the ack_timeout that
        # a copy to the stopped shadow waits
        assert max(stopped) < 5.0
        print(f"\np50 with the shadow answering {statistics.median(running) * 1000:.2f} ms, "
              f"stopped {statistics.median(stopped) * 1000:.2f} ms")
        status = shown(gateway)
        # Five wait, one is being copied: the rest were dropped, counted
        assert status["dropped"] - dropped_before >= 30 - 5 - 1 and status["waiting"] <= 5
    finally:
        os.kill(trial.process.pid, signal.SIGCONT)

    def accounted() -> int:
        status = shown(gateway)
        return status["compared"] + status["not_compared"] + status["dropped"]

    await eventually(lambda: accounted() == 60, "every copy compared, or counted as not")
    assert len(real.recorded()) == 60


async def test_shadowing_is_switched_off_and_on_by_ctl_and_audited(nursery, engines, tmp_path):
    real, trial = engines
    gateway = await start_gateway(nursery, shadow_config(tmp_path, real.port, trial.port),
                                  admin=True)
    ctl = [*GATEWAY, "ctl", "--admin", f"http://{gateway.admin_address}", "shadow"]
    off = await trio.run_process([*ctl, "hl7/new-engine", "off"], capture_stdout=True)
    assert b"hl7/new-engine: shadowing off" in off.stdout
    await send_until_acked(vip_port(gateway, "hl7"), make_messages(3, prefix="OFF"))
    on = await trio.run_process([*ctl, "hl7/new-engine", "on"], capture_stdout=True)
    assert b"shadowing on" in on.stdout
    await send_until_acked(vip_port(gateway, "hl7"), make_messages(2, prefix="ON"))
    await eventually(lambda: shown(gateway)["compared"] == 2, "two compared")
    assert sorted(trial.recorded()) == ["ON000001", "ON000002"]
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [(r["after"]["shadowing"]) for r in audit if r.get("action") == "shadow"] == [
        "off", "on"]
    missing = await trio.run_process([*ctl, "hl7/engine", "off"], capture_stderr=True,
                                     check=False)
    assert missing.returncode == 1 and b"has no shadow member 'engine'" in missing.stderr


@pytest.mark.parametrize("text, error", [
    ('protocol = "tcp"', "on dicom, hl7, xds VIPs only"),
    ("all", "every member is a shadow")])
def test_what_a_shadow_cannot_be(text, error):
    member = ('[[vip.member]]\nname = "new"\naddress = "127.0.0.1:2576"\nshadow = true\n')
    serving = '[[vip.member]]\nname = "old"\naddress = "127.0.0.1:2575"\n'
    protocol = text if text.startswith("protocol") else 'protocol = "hl7"'
    document = (f'[[vip]]\nname = "v"\n{protocol}\nlisten = "127.0.0.1:0"\n'
                + ("" if text == "all" else serving) + member)
    with pytest.raises(ConfigError) as refused:
        parse_config(document, "site.toml")
    assert error in str(refused.value) and "new" in str(refused.value)


def test_exports_and_checks_leave_shadows_out(tmp_path):
    config = tmp_path / "site.toml"
    config.write_text(hl7_vip([("old", 2575), ("new", 2576)],
                              member_extra={"new": "shadow = true"}))
    exported = subprocess.run([*GATEWAY, "export", "haproxy", "-c", str(config)],
                              capture_output=True, text=True, timeout=60)
    assert exported.returncode == 0 and "127.0.0.1:2575" in exported.stdout
    assert "2576" not in exported.stdout


async def test_a_reload_keeps_a_shadows_counts_and_can_take_it_away(nursery, engines, tmp_path):
    real, trial = engines
    text = shadow_config(tmp_path, real.port, trial.port)
    gateway = await start_gateway(nursery, text, admin=True)
    await send_until_acked(vip_port(gateway, "hl7"), make_messages(2, prefix="R1-"))
    await eventually(lambda: shown(gateway)["compared"] == 2, "two compared")
    await gateway.reload(parse_config(text.replace('ack_timeout = "2s"', 'ack_timeout = "3s"'),
                                      "test.toml"))
    assert shown(gateway)["compared"] == 2  # the same shadow, its counts kept
    await gateway.reload(parse_config(text.replace("shadow = true", ""), "test.toml"))
    assert gateway.handlers["hl7"].shadows == {}  # a member now: picked like any other
    assert sorted(m.name for m in gateway.balancer.pool("hl7").members) == [
        "engine", "new-engine"]


async def test_an_xds_registry_shadow_that_finds_fewer_documents_is_reported(
        nursery, xds_registry, xds_repository, tmp_path):
    """The new registry on trial never got the document the old one registered: the ITI-18
    the consumer sends finds one in service, none in the shadow: a result-count difference.
    ITI-41, a write, is not copied."""
    from tests.test_xds_vip import PATIENT, xds_vip

    registry, trial = xds_registry(), xds_registry()
    repository = xds_repository(registry_url=f"{registry.url}registry")
    config = (f'[gateway]\nadmin = "127.0.0.1:0"\nstate_dir = "{tmp_path / "state"}"\n'
              + xds_vip([registry.port], [repository.port])
              + f'\n[[vip.member]]\nname = "new-registry"\naddress = "127.0.0.1:{trial.port}"'
                f'\nrole = "registry"\nshadow = true\n')
    gateway = await start_gateway(nursery, config, admin=True)
    base = f"http://127.0.0.1:{vip_port(gateway, 'xds')}"
    report = tmp_path / "report.pdf"
    report.write_bytes(b"%PDF-1.4\r\n" + bytes(range(256)) * 40 + b"\r\n")
    provided = await trio.run_process(
        [*GATEWAY, "simulate", "xds-consumer", base, "--provide", str(report), "--patient",
         PATIENT], capture_stdout=True, check=False)
    assert provided.returncode == 0
    assert provided.stdout.decode().splitlines()[1] == "ITI-18 Success: 1 document(s)"
    other = await trio.run_process([*GATEWAY, "simulate", "xds-consumer", base, "--patient",
                                    "PAT0404^^^&1.2.3.4.5&ISO"], capture_stdout=True)
    assert b"ITI-18 Success: 0 document(s)" in other.stdout
    shadow = gateway.handlers["xds"].shadows["new-registry"]
    await eventually(lambda: shadow.copied == 2, "both queries compared")
    assert shadow.show()["differences"] == {"result-count": 1}
    assert [(d.member_answer, d.shadow_answer, d.unit) for d in shadow.recent] == [
        ("1", "0", "ITI-18")]
    assert len(registry.requests) >= 2 and not trial.entries  # no ITI-42 reached the shadow


async def test_a_shadow_whose_response_cannot_be_read_is_described_without_its_bytes(
        nursery, xds_registry):
    """h11 quotes the bytes it could not read: the shadow's state and the log give its
    reason only (a response may carry patient data)."""
    from tests.test_xds_vip import PATIENT, xds_vip

    async def garbles(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some(4096)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nnot a header DOE^JANE\r\n\r\n")
        await trio.sleep_forever()

    registry = xds_registry()
    listeners = await nursery.start(partial(trio.serve_tcp, garbles, 0, host="127.0.0.1"))
    config = (xds_vip([registry.port], []) + '\n[[vip.member]]\nname = "new-registry"\n'
              f'address = "127.0.0.1:{listeners[0].socket.getsockname()[1]}"\n'
              'role = "registry"\nshadow = true\n')
    gateway = await start_gateway(nursery, config)
    found = await trio.run_process(
        [*GATEWAY, "simulate", "xds-consumer", f"http://127.0.0.1:{vip_port(gateway, 'xds')}",
         "--patient", PATIENT], capture_stdout=True)
    assert b"ITI-18 Success" in found.stdout  # the client has the registry's answer
    shadow = gateway.handlers["xds"].shadows["new-registry"]
    await eventually(lambda: shadow.not_compared == 1, "the shadow's answer given up")
    assert shadow.state == "not answering: illegal header line"


async def test_a_pacs_shadow_that_refuses_a_sop_class_is_reported_and_the_real_one_has_all(
        nursery, pacs, tmp_path):
    """Orthanc in service; on trial a PACS that refuses MR Image Storage (0x0122). Debian's
    Orthanc (1.10.1) cannot be that shadow: its Lua ReceivedInstanceFilter (and
    ReceivedCStoreInstanceFilter) discard an instance but answer Success, which no C-STORE
    comparison can see (seen here), so the trial PACS is the simulator. Every image is stored
    on Orthanc; each MR image is one dimse-status difference kept by its UID as a keyed hash;
    a C-ECHO and a C-FIND are copied and compared too."""
    from pydicom import dcmread

    from gateway.testing.simulators.study import KINDS
    from tests.helpers.dicom_peers import Orthanc, echoscu, run_dcmtk, storescu
    from tests.test_dicom_vip import dicom_vip

    for modality in ("CT", "MR"):
        written = await trio.run_process([*GATEWAY, "simulate", "study", str(tmp_path / modality),
                                          "--images", "2", "--modality", modality],
                                         capture_stdout=True)
        assert written.returncode == 0
    files = sorted(str(p) for m in ("CT", "MR") for p in (tmp_path / m).iterdir())
    real = Orthanc(tmp_path / "real").start()
    trial = pacs("NEWPACS", refuse_classes=frozenset({KINDS["MR"].sop_class}))
    try:
        config = (f'[gateway]\nadmin = "127.0.0.1:0"\nstate_dir = "{tmp_path / "state"}"\n'
                  + dicom_vip([("orthanc", real.dicom_port, "ORTHANC"),
                               ("new-pacs", trial.port, "NEWPACS")],
                              extra='ae_titles = ["ARCHIVE"]',
                              member_extra={"new-pacs": "shadow = true"}))
        gateway = await start_gateway(nursery, config, admin=True)
        port = vip_port(gateway, "pacs")
        stored = await storescu(port, files, "ARCHIVE", "CT01")
        assert stored.clean, stored.stderr  # the modality heard the PACS in service
        assert real.instance_count() == 4
        assert (await echoscu(port, "ARCHIVE", "CT01")).clean
        found = await run_dcmtk("findscu", "-S", "-aet", "CT01", "-aec", "ARCHIVE",
                                "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
                                "127.0.0.1", str(port))
        assert found.returncode == 0
        shadow = gateway.handlers["pacs"].shadows["new-pacs"]
        await eventually(lambda: shadow.copied + shadow.not_compared == 3,
                         "three associations copied")
        assert len(trial.stored) == 2 and trial.echoes >= 1  # the CTs; the MRs refused
        assert shadow.not_compared == 0
        # An association the modality aborts: as cut on the shadow, and not compared
        cut = await storescu(port, files[:1], "ARCHIVE", "CT01", "--abort")
        assert cut.returncode == 0
        await eventually(lambda: shadow.not_compared == 1, "the cut association")
        assert "cut mid-way" in shadow.state
        show = shadow.show()
        assert show["differences"].get("dimse-status") == 2, show
        mr = [d for d in shadow.recent if d.kind == "dimse-status"]
        assert {(d.unit, d.member_answer, d.shadow_answer) for d in mr} == {
            ("C-STORE-RQ", "0x0000", "0x0122")}
        kept = (tmp_path / "state" / FILE_NAME).read_text()
        uids = [str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
        assert "hmac:" in kept and not any(uid in kept for uid in uids)
        print(f"\n{show}")
    finally:
        real.stop()


@pytest.mark.parametrize("side_effects", [False, True])
async def test_a_dicom_copy_never_carries_what_makes_the_shadow_act_outward(side_effects):
    """Of an association's tape, only C-STORE, C-FIND and C-ECHO on contexts the shadow took
    as the member did go on; a C-MOVE (it would send images to a workstation) does not,
    unless shadow_side_effects; nothing on a context the shadow refused; a long PDV is
    re-fragmented to its PDU size."""
    from gateway.config import MemberConfig, Address
    from gateway.vips.shadow import DicomShadow
    from protocols import dicom, dimse
    from tests.helpers.memory_link import memory_link_pair

    def command(context: int, field: int, message_id: int) -> dicom.Pdv:
        return dicom.Pdv(context, True, True, dicom.encode_command({
            dicom.TAG_AFFECTED_SOP_CLASS: "1.2.3", dicom.TAG_COMMAND_FIELD: field,
            dicom.TAG_MESSAGE_ID: message_id, dicom.TAG_DATA_SET_TYPE: 0x0000}))

    tape = b"".join(dicom.encode_p_data([pdv]) for pdv in (
        command(1, dimse.C_MOVE_RQ, 1), dicom.Pdv(1, False, True, b"move identifier"),
        command(3, dimse.C_STORE_RQ, 2), dicom.Pdv(3, False, True, bytes(range(250)) * 4),
        command(5, dimse.C_STORE_RQ, 3), dicom.Pdv(5, False, True, b"refused context"),
        command(1, dimse.C_ECHO_RQ, 4))) + dicom.RELEASE_RQ
    ours, theirs = memory_link_pair("shadow")
    shadow = DicomShadow("pacs", MemberConfig("new", Address("127.0.0.1", 104)), None,
                         copies_everything=side_effects)
    sent: dict[int, dimse.Command] = {}
    reader, pdvs = dicom.PduReader(), []

    async def shadow_reads() -> None:
        while data := await theirs.receive_some(65536):
            reader.feed(data)
            while (pdu := reader.next_pdu()) is not None:
                assert len(pdu) - 6 <= 400 + 6
                pdvs.extend(dicom.decode_p_data(pdu))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(shadow_reads)
        await shadow._send_tape(ours, tape, usable={1, 3}, largest=400, sent=sent)
        await ours.send_eof()
    moved = [(dimse.C_MOVE_RQ, 1)] if side_effects else []
    assert [(c.field, c.message_id) for c in sent.values()] == [
        *moved, (dimse.C_STORE_RQ, 2), (dimse.C_ECHO_RQ, 4)]
    data = [p for p in pdvs if not p.is_command]
    image = bytes(range(250)) * 4
    moved_data = b"move identifier" if side_effects else b""
    assert b"".join(p.data for p in data) == moved_data + image
    stored = data[1:] if side_effects else data  # never anything of the refused context
    assert [p.is_last for p in stored] == [False, False, True] and len(stored[0].data) == 400


async def test_with_shadow_writes_an_iti41_reaches_the_shadow_repository_too(
        nursery, xds_registry, xds_repository, tmp_path):
    """shadow_writes = true: a provide-and-register (a write: never to a second member) is
    copied to the repository on trial, which registers it in its own registry; without the
    key it is not (the test of the registry shadow above)."""
    from tests.test_xds_vip import PATIENT, xds_vip

    registry, trial_registry = xds_registry(), xds_registry()
    repository = xds_repository(registry_url=f"{registry.url}registry")
    trial = xds_repository(registry_url=f"{trial_registry.url}registry")
    config = ('[gateway]\nadmin = "127.0.0.1:0"\n'
              + xds_vip([registry.port], [repository.port], extra="shadow_writes = true")
              + f'\n[[vip.member]]\nname = "new-repository"\naddress = "127.0.0.1:{trial.port}"'
                f'\nrole = "repository"\nshadow = true\n')
    gateway = await start_gateway(nursery, config, admin=True)
    report = tmp_path / "report.pdf"
    report.write_bytes(b"%PDF-1.4\r\n" + bytes(range(256)) * 40 + b"\r\n")
    provided = await trio.run_process(
        [*GATEWAY, "simulate", "xds-consumer", f"http://127.0.0.1:{vip_port(gateway, 'xds')}",
         "--provide", str(report), "--patient", PATIENT], capture_stdout=True, check=False)
    assert provided.returncode == 0
    shadow = gateway.handlers["xds"].shadows["new-repository"]
    await eventually(lambda: shadow.copied == 1, "the ITI-41 compared")
    assert shadow.show()["differences"] == {}
    assert len(repository.documents) == len(trial.documents) == 1
    assert len(registry.entries) == len(trial_registry.entries) == 1


def test_shadow_writes_and_side_effects_belong_to_their_protocols():
    for key, protocol in (("shadow_writes", "dicom"), ("shadow_side_effects", "xds")):
        with pytest.raises(ConfigError) as refused:
            parse_config(f'[[vip]]\nname = "v"\nprotocol = "{protocol}"\n{key} = true\n'
                         'listen = "127.0.0.1:0"\n[[vip.member]]\nname = "m"\n'
                         'address = "127.0.0.1:104"\n', "site.toml")
        assert key in str(refused.value) and "only for protocol" in str(refused.value)
