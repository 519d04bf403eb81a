"""ATNA delivery is at-least-once: a repository process killed (kill -9) between events,
or frozen and then killed with bytes its TCP had taken, loses none of them; each leaves the
spool only once acknowledged and followed by no reset (RFC 5425 has no acknowledgement)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import trio
from lxml import etree

from gateway.config import Address, AtnaSettings, ClientTls
from gateway.records.atna import Actor, AtnaSender
from protocols import atna
from tests.helpers.faulty_members import ScriptedServer
from tests.test_tls import server_context
from tests.helpers import eventually, listening, reserved_port, stop_process

GATEWAY = [sys.executable, "-m", "gateway"]


def start_repository(port: int, saved: Path, certs, log: Path) -> subprocess.Popen:
    with open(log, "a") as out:
        return subprocess.Popen(
            [*GATEWAY, "simulate", "audit-repository", "--listen", f"127.0.0.1:{port}",
             "--tls-cert", certs.server[0], "--tls-key", certs.server[1], "--save", str(saved)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def users(saved: Path) -> list[str]:
    """The requesting user of each saved message, in arrival order (duplicates kept)."""
    return [p.get("UserID") for path in sorted(saved.glob("*.xml"))
            for p in etree.parse(str(path)).iter("ActiveParticipant")
            if p.get("UserIsRequestor") == "true"]


async def test_a_repository_killed_between_events_loses_none(certs, tmp_path):
    port, saved, log = reserved_port(), tmp_path / "saved", tmp_path / "repository.log"
    sender = AtnaSender(AtnaSettings(Address("127.0.0.1", port), tls=ClientTls(ca=certs.ca),
                                     spool=str(tmp_path / "spool")))
    sender.open()
    repository = start_repository(port, saved, certs, log)
    try:
        async with trio.open_nursery() as nursery:
            await eventually(lambda: listening(port), timeout=30, what="the repository")
            await nursery.start(sender.run)
            expected = []
            for round_ in range(4):
                user = f"user{round_}"
                expected.append(user)
                sender.user_authentication(False, Actor(user, "127.0.0.1"), "wrong token")
                await eventually(lambda: user in users(saved), timeout=30, what=user)
                await eventually(lambda: spooled(tmp_path) == 0, what=f"{user} confirmed")
                frozen = round_ % 2 == 1
                if frozen:  # its TCP still takes bytes that the process never reads
                    repository.send_signal(signal.SIGSTOP)
                user = f"user{round_}-after-kill"
                expected.append(user)
                sender.user_authentication(False, Actor(user, "127.0.0.1"), "wrong token")
                if frozen:
                    await eventually(lambda: unread_at(port) > 0,
                                     what="bytes the frozen process's TCP took")
                os.kill(repository.pid, signal.SIGKILL)
                repository.wait()
                repository = start_repository(port, saved, certs, log)
                await eventually(lambda: listening(port), timeout=30, what="the restart")
            await eventually(lambda: set(expected) <= set(users(saved)), timeout=60,
                             what="every event at the repository")
            await eventually(lambda: sender.sent >= len(expected), what="all confirmed")
            nursery.cancel_scope.cancel()
    finally:
        stop_process(repository)
    received = users(saved)
    assert set(received) == set(expected), (received, log.read_text())
    # In order, each at least once: a resent batch may repeat what a killed process had read.
    assert [user for user in dict.fromkeys(received)] == expected
    assert sender.dropped == 0 and spooled(tmp_path) == 0


def spooled(tmp_path: Path) -> int:
    return (tmp_path / "spool" / "atna.spool").stat().st_size


def unread_at(port: int) -> int:
    """Bytes received and not read on the established connections to `port` (the rx_queue of
    /proc/net/tcp, as `ss` shows it in Recv-Q)."""
    unread = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":  # ESTABLISHED
            unread += int(fields[4].split(":")[1], 16)
    return unread


async def test_a_repository_that_closes_after_reading_confirms_and_is_not_resent_forever(
        nursery, certs, tmp_path):
    """A repository that reads what it gets and closes (a FIN, not a reset): what it read is
    confirmed, sent once, and the spool drains; the next message goes on a new connection."""
    frames: list[bytes] = []

    async def read_then_close(stream):
        reader = atna.SyslogReader()
        while data := await stream.receive_some(65536):
            reader.feed(data)
            if (message := reader.next_message()) is not None:
                frames.append(message)
                while (message := reader.next_message()) is not None:
                    frames.append(message)
                break
        await stream.aclose()  # with nothing unread: a FIN

    repository = await ScriptedServer(read_then_close, tls=server_context(certs.server)).start(
        nursery)
    sender = AtnaSender(AtnaSettings(Address("127.0.0.1", repository.port),
                                     tls=ClientTls(ca=certs.ca), spool=str(tmp_path / "spool")))
    sender.open()
    for n in range(3):
        sender.user_authentication(False, Actor(f"user{n}", "127.0.0.1"), "wrong token")
    await nursery.start(sender.run)
    await eventually(lambda: spooled(tmp_path) == 0, timeout=20, what="the spool drained")
    sender.user_authentication(False, Actor("user3", "127.0.0.1"), "wrong token")
    await eventually(lambda: spooled(tmp_path) == 0 and len(frames) >= 4, timeout=20,
                     what="the fourth sent")
    await sender.finish()
    received = [p.get("UserID") for frame in frames
                for p in etree.fromstring(atna.parse_syslog(frame).xml).iter("ActiveParticipant")
                if p.get("UserIsRequestor") == "true"]
    assert received == ["user0", "user1", "user2", "user3"]  # each once: none sent again


def _spooled_users(sender: AtnaSender) -> list[str]:
    """The requesting user of each message the sender would send next, in order."""
    reader = atna.SyslogReader()
    reader.feed(sender._pending()[1])
    found = []
    while (frame := reader.next_message()) is not None:
        found += [p.get("UserID") for p in etree.fromstring(atna.parse_syslog(frame).xml).iter(
            "ActiveParticipant") if p.get("UserIsRequestor") == "true"]
    return found


def test_a_spool_a_stop_cut_is_made_whole_at_the_next_start(tmp_path, caplog):
    """A kill or power cut in a write left a message cut at the spool's end, or the sent
    mark inside a message: the gateway sent the repository bytes from inside a message (and
    every message after a cut one was read as part of it), or did not start at all (the
    spool's count raised). The cut message is set aside and sending resumes at the start of
    the message the mark was in: sent twice, never lost."""
    spool = tmp_path / "spool"
    settings = AtnaSettings(Address("127.0.0.1", 9), spool=str(spool))
    first = AtnaSender(settings)
    first.open()
    for n in range(3):
        first.user_authentication(False, Actor(f"user{n}", "127.0.0.1"), "wrong token")
    whole = (spool / "atna.spool").read_bytes()
    ends = atna.whole_frames(whole)
    assert len(ends) == 3 and ends[-1] == len(whole)
    with open(spool / "atna.spool", "ab") as file:
        file.write(whole[:40])  # a fourth message, cut
    (spool / "atna.offset").write_text(str(ends[0] + 7))  # the mark inside the second
    second = AtnaSender(settings)
    second.open()
    assert second.spooled == 2 and _spooled_users(second) == ["user1", "user2"]
    assert (spool / "atna.spool").read_bytes() == whole
    assert [path.read_bytes() for path in spool.glob("atna.spool.unreadable-*")] == [whole[:40]]
    assert (spool / "atna.offset").read_text() == str(ends[0])
    warned = [r.getMessage() for r in caplog.records if r.name == "medgate.atna"]
    assert any("last 40 bytes of the spool" in line for line in warned)
    assert any(f"sending again from byte {ends[0]}" in line for line in warned)

    # A mark past the end: the spool emptied, its mark not (a stop between the two, in the
    # order up to 0.3.0): the messages spooled next were skipped, then sent from their middle
    (spool / "atna.offset").write_text(str(len(whole) + 500))
    third = AtnaSender(settings)
    third.open()
    assert _spooled_users(third) == ["user0", "user1", "user2"]


def test_a_message_a_full_disk_cuts_leaves_no_part_in_the_spool(tmp_path, monkeypatch):
    """A write the disk took only part of left the part in the spool, and the messages after
    it unreadable to the repository (and the delivery task failed on them)."""
    import gateway.records.atna as sender_module

    spool = tmp_path / "spool" / "atna.spool"
    sender = AtnaSender(AtnaSettings(Address("127.0.0.1", 9), spool=str(spool.parent)))
    sender.open()
    sender.user_authentication(False, Actor("user0", "127.0.0.1"), "wrong token")
    written = os.write
    monkeypatch.setattr(sender_module.os, "write", lambda fd, data: written(fd, data[:50]))
    sender.user_authentication(False, Actor("lost", "127.0.0.1"), "wrong token")
    monkeypatch.undo()
    sender.user_authentication(False, Actor("user1", "127.0.0.1"), "wrong token")
    assert sender.dropped == 1 and sender.spooled == 2
    assert _spooled_users(sender) == ["user0", "user1"]
    assert atna.whole_frames(spool.read_bytes())[-1] == spool.stat().st_size
