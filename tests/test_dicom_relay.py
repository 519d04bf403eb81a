"""DICOM VIP edge cases that real clients cannot be made to show, byte for byte, with fake peers."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

import pytest
import trio

from gateway.balancer import Health
from gateway.net.channel import Channel
from gateway.vips.dicom import PeerClosed, pdu_at_hand, read_pdu
from protocols import dicom
from tests.helpers.dicom_peers import next_pdu
from tests.helpers import start_gateway, vip_port

VERIFICATION = [(1, dicom.VERIFICATION_SOP_CLASS, [dicom.IMPLICIT_VR_LITTLE_ENDIAN])]


@dataclass
class FakeMember:
    """A scripted association acceptor: `mode` is accept, close, abort or silent.

    The gateway's health check (calling AE MEDGATE) is answered in every mode, so that a member
    can look healthy and still fail live associations, as a half-broken PACS does.
    """

    name: str
    mode: str = "accept"
    crash_after_pdata: bool = False
    waits_for_close: bool = False  # after its A-RELEASE-RP, as an acceptor in Sta13 does
    port: int = 0
    called_aes: list[str] = field(default_factory=list)
    received: bytearray = field(default_factory=bytearray)  # bytes after the RQ
    closed: trio.Event = field(default_factory=trio.Event)

    async def start(self, nursery) -> FakeMember:
        listeners = await nursery.start(trio.serve_tcp, self.handle, 0)
        self.port = listeners[0].socket.getsockname()[1]
        return self

    async def handle(self, stream) -> None:
        reader = dicom.PduReader()
        client = False
        try:
            while (pdu := reader.next_pdu()) is None:
                data = await stream.receive_some(65536)
                if not data:
                    return
                reader.feed(data)
            request = dicom.Association.decode(pdu)
            if request.presentation_contexts[0].abstract_syntax != dicom.VERIFICATION_SOP_CLASS:
                return  # a health check would propose Verification only; this is a client
            if request.calling_ae == "MEDGATE":  # the health check: answered in every mode
                await stream.send_all(dicom.encode_associate_ac(request))
                return await self._answer_echo(stream, reader)
            self.called_aes.append(request.called_ae)
            client = True
            if self.mode == "close":
                return
            if self.mode == "abort":
                await stream.send_all(dicom.ABORT_PROVIDER.encode())
                return
            if self.mode == "silent":
                await trio.sleep_forever()
            await stream.send_all(dicom.encode_associate_ac(request))
            self.received += reader.leftover()
            while data := await stream.receive_some(65536):
                self.received += data
                if self.crash_after_pdata and data[0] == dicom.P_DATA_TF:
                    return  # gone mid-association, without a word
                if data == dicom.RELEASE_RQ:
                    await stream.send_all(dicom.RELEASE_RP)
                    if self.waits_for_close:
                        with trio.fail_after(5):
                            while data := await stream.receive_some(65536):
                                self.received += data
                    return
        except trio.BrokenResourceError:
            pass
        finally:
            if client:
                self.closed.set()

    async def _answer_echo(self, stream, reader) -> None:
        """Answer the gateway's dicom-echo health check (C-ECHO-RQ, then release)."""
        while (pdu := await next_pdu(stream, reader)) is not None:
            if pdu[0] == dicom.P_DATA_TF:
                await stream.send_all(dicom.encode_c_echo_rsp(1, 1))
            elif pdu[0] == dicom.A_RELEASE_RQ:
                await stream.send_all(dicom.RELEASE_RP)
                return


class Client:
    """A raw association requestor that shows exactly which bytes arrive."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.reader = dicom.PduReader()

    @classmethod
    async def connect(cls, port: int) -> Client:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def associate(self, called: str = "VIP", calling: str = "CT01") -> bytes:
        await self.stream.send_all(dicom.encode_associate_rq(called, calling, VERIFICATION))
        return await self.next_pdu()

    async def next_pdu(self) -> bytes | None:
        with trio.fail_after(10):
            while (pdu := self.reader.next_pdu()) is None:
                data = await self.stream.receive_some(65536)
                if not data:
                    return None
                self.reader.feed(data)
        return pdu


def vip_for(members: list[FakeMember], extra: str = "", member_extra: str = "") -> str:
    text = f"""
[[vip]]
name = "pacs"
protocol = "dicom"
listen = "127.0.0.1:0"
connect_timeout = "1s"
assoc_timeout = "500ms"
health = {{ check = "dicom-echo", interval = "1h", timeout = "1s" }}
{extra}
"""
    for member in members:
        text += f"""
[[vip.member]]
name = "{member.name}"
address = "127.0.0.1:{member.port}"
ae_title = "{member.name.upper()}"
{member_extra}
"""
    return text


async def test_members_that_fail_before_answering_are_skipped_unseen(nursery):
    members = [await FakeMember(name, mode).start(nursery) for name, mode in
               [("closes", "close"), ("hangs", "silent"), ("works", "accept")]]
    gateway = await start_gateway(nursery, vip_for(members, 'mode = "failover"'))
    client = await Client.connect(vip_port(gateway, "pacs"))
    answer = await client.associate("VIP")
    assert answer[0] == dicom.A_ASSOCIATE_AC
    assert dicom.Association.decode(answer).called_ae == "VIP"  # the client's own title back
    assert [m.called_aes for m in members] == [["CLOSES"], ["HANGS"], ["WORKS"]]
    pool = gateway.balancer.pool("pacs")
    assert [pool.member(m.name).failed for m in members] == [1, 1, 0]
    await client.stream.aclose()


async def test_a_members_a_abort_to_the_request_is_relayed_and_not_a_strike(nursery):
    """Its answer to a request the gateway checked as far as it can: the modality gets it as
    from a direct connection, no other member is tried (the request may be the cause), and it
    counts nothing against the member (a malformed request must not take members down)."""
    members = [await FakeMember(name, mode).start(nursery) for name, mode in
               [("aborts", "abort"), ("works", "accept")]]
    gateway = await start_gateway(nursery, vip_for(members, 'mode = "failover"\n'
                                                            'error_limit = 1'))
    client = await Client.connect(vip_port(gateway, "pacs"))
    answer = await client.associate("VIP")
    assert answer[0] == dicom.A_ABORT
    assert [m.called_aes for m in members] == [["ABORTS"], []]
    member = gateway.balancer.pool("pacs").member("aborts")
    assert member.failed == 0 and member.health is Health.UP
    await client.stream.aclose()


async def test_member_lost_mid_association_sends_a_abort_to_the_client(nursery):
    member = await FakeMember("pacs1", crash_after_pdata=True).start(nursery)
    gateway = await start_gateway(nursery, vip_for([member]))
    client = await Client.connect(vip_port(gateway, "pacs"))
    assert (await client.associate())[0] == dicom.A_ASSOCIATE_AC
    await client.stream.send_all(dicom.encode_c_echo_rq(1, 1))
    assert await client.next_pdu() == dicom.ABORT_PROVIDER.encode()  # 07 00 00000004 00 00 02 00
    assert await client.next_pdu() is None


async def test_client_lost_mid_association_sends_a_abort_to_the_member(nursery):
    member = await FakeMember("pacs1").start(nursery)
    gateway = await start_gateway(nursery, vip_for([member]))
    client = await Client.connect(vip_port(gateway, "pacs"))
    await client.associate()
    echo = dicom.encode_c_echo_rq(1, 1)
    await client.stream.send_all(echo)
    await client.stream.aclose()  # gone without A-RELEASE-RQ
    with trio.fail_after(5):
        await member.closed.wait()
    assert bytes(member.received) == echo + dicom.ABORT_PROVIDER.encode()


async def test_release_passes_through_without_an_abort(nursery):
    member = await FakeMember("pacs1").start(nursery)
    gateway = await start_gateway(nursery, vip_for([member]))
    client = await Client.connect(vip_port(gateway, "pacs"))
    await client.associate()
    await client.stream.send_all(dicom.RELEASE_RQ)
    assert await client.next_pdu() == dicom.RELEASE_RP
    assert await client.next_pdu() is None
    await client.stream.aclose()
    with trio.fail_after(5):
        await member.closed.wait()
    assert bytes(member.received) == dicom.RELEASE_RQ


async def test_a_released_association_is_closed_both_ways_at_once(nursery):
    # Neither side closes first: the member waits for the requester's close (PS3.8 Sta13) and
    # so does this client. The gateway, requester towards the member, closes both once the
    # release is answered, rather than holding two connections until client_timeout.
    member = await FakeMember("pacs1", waits_for_close=True).start(nursery)
    gateway = await start_gateway(nursery, vip_for([member], extra='client_timeout = "1h"'))
    client = await Client.connect(vip_port(gateway, "pacs"))
    await client.associate()
    await client.stream.send_all(dicom.RELEASE_RQ)
    assert await client.next_pdu() == dicom.RELEASE_RP
    assert await client.next_pdu() is None  # closed by the gateway, not by this client
    with trio.fail_after(5):
        await member.closed.wait()
    assert bytes(member.received) == dicom.RELEASE_RQ  # no A-ABORT after the release
    await client.stream.aclose()


async def test_client_that_sends_nothing_is_closed_after_assoc_timeout(nursery):
    member = await FakeMember("pacs1").start(nursery)
    gateway = await start_gateway(nursery, vip_for([member]))
    client = await Client.connect(vip_port(gateway, "pacs"))
    started = trio.current_time()
    assert await client.next_pdu() is None
    assert 0.4 < trio.current_time() - started < 5


async def test_garbage_gets_an_a_abort_not_a_traceback(nursery):
    member = await FakeMember("pacs1").start(nursery)
    gateway = await start_gateway(nursery, vip_for([member]))
    client = await Client.connect(vip_port(gateway, "pacs"))
    await client.stream.send_all(b"GET / HTTP/1.1\r\nHost: pacs\r\n\r\n")
    assert await client.next_pdu() == dicom.Abort(2, 1).encode()  # unrecognized-PDU
    assert await client.next_pdu() is None
    assert member.called_aes == []


async def test_calling_ae_persistence(nursery):
    members = [await FakeMember(f"pacs{n}").start(nursery) for n in (1, 2, 3)]
    gateway = await start_gateway(nursery, vip_for(
        members, 'persistence = { key = "calling-ae", timeout = "1h" }'))
    port = vip_port(gateway, "pacs")
    for calling in ("CT01", "MR01", "CR01"):
        for _ in range(4):
            client = await Client.connect(port)
            await client.associate("VIP", calling)
            await client.stream.aclose()
    homes = {calling: {m.name for m in members
                       if m.called_aes and gateway.balancer.pool("pacs").persisted_member(calling)
                       == m.name} for calling in ("CT01", "MR01", "CR01")}
    assert all(len(home) == 1 for home in homes.values())
    assert sorted(len(m.called_aes) for m in members) == [4, 4, 4]  # each AE stuck to one PACS


async def test_all_members_full_gives_local_limit_exceeded(nursery):
    member = await FakeMember("pacs1").start(nursery)
    gateway = await start_gateway(nursery, vip_for([member], member_extra="max_connections = 1"))
    port = vip_port(gateway, "pacs")
    holder = await Client.connect(port)
    assert (await holder.associate())[0] == dicom.A_ASSOCIATE_AC
    second = await Client.connect(port)
    assert await second.associate() == dicom.REJECT_ALL_FULL.encode()  # 03 00 .. 00 02 03 02
    assert gateway.balancer.pool("pacs").member("pacs1").health is Health.UP
    await holder.stream.aclose()


async def test_an_rq_already_here_is_taken_at_once_and_one_in_pieces_is_left_to_wait_for():
    """pdu_at_hand (read_request's first look, which needs no timer): a whole RQ waiting on
    the socket is the PDU; half of one is kept in the reader for the read that waits; the
    end of the stream is left to that read; a reset is PeerClosed."""
    def pair() -> tuple[socket.socket, Channel]:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            outside = socket.create_connection(listener.getsockname())
            inside, _ = listener.accept()
        return outside, Channel(inside)

    rq = dicom.encode_associate_rq("PACS", "MODALITY", VERIFICATION)
    outside, link = pair()
    reader = dicom.PduReader()
    assert pdu_at_hand(link, reader) is None  # nothing sent yet
    outside.sendall(rq)
    await trio.lowlevel.wait_readable(link.socket)
    assert pdu_at_hand(link, reader) == rq
    outside.sendall(rq[:20])
    await trio.lowlevel.wait_readable(link.socket)
    assert pdu_at_hand(link, reader) is None  # half an RQ: kept for the read that waits
    outside.sendall(rq[20:])
    with trio.fail_after(5):
        assert await read_pdu(link, reader) == rq
    outside.shutdown(socket.SHUT_WR)
    await trio.lowlevel.wait_readable(link.socket)
    assert pdu_at_hand(link, reader) is None  # the end: read_pdu says so
    with pytest.raises(PeerClosed):
        await read_pdu(link, reader)
    outside.close()
    link.close()

    outside, link = pair()
    outside.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    outside.close()  # a reset
    await trio.lowlevel.wait_readable(link.socket)
    with pytest.raises(PeerClosed):
        pdu_at_hand(link, dicom.PduReader())
    link.close()
