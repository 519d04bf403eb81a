"""The least a protocol-aware relay on trio can cost: the "lean" path the benchmarks' --floor
adds. For HL7 (bench/hl7.py, bench/tls.py) it does the protocol work medgate may not drop and
nothing else:

- MLLP framing both ways (protocols/mllp.py's reader), the MSH peek of every message and the
  MSA-2 check of every answer;
- a pick per message (round robin over the members) and pooled member connections;
- one JSON audit line per message, one write(2), before the ACK goes back;
- one task per sender connection taking turns (message, then answer), one cancel scope per
  connection, the system call first and epoll only on EAGAIN; optionally TLS towards the
  sender (the standard library's SSLObject over memory buffers, as gateway/net/tls_stream.py).

With --dicom, the same for DICOM associations: the A-ASSOCIATE-RQ and -AC decoded
(protocols/dicom.py), a member per association, every PDU after the AC followed both ways
with protocols/dimse.py's CommandPeek (commands read, data sets skipped), one audit line per
association; turn-based (a PDU from the client, then one from the member), which suffices for
the one-operation-at-a-time associations of bench/dicom.py, not for DICOM at large.

With --xds REGISTRY REPOSITORY (member ports), the same for IHE XDS.b over HTTP/1.1 with
h11, as gateway/vips/xds.py parses it: each request and response read into h11 events and
written again, the SOAP action taken from the Content-Type (else the body, with
protocols/soap.py's ActionPeek), the member chosen by role, pooled keep-alive member
connections, one audit line per request.

No retries, no health, no limits, no logs, no persistence: a medgate that costs no more than
this per unit has nothing left to remove but features. Not for use: errors end the
connection and the lines it writes have no timestamp format a site would want.

    python3 bench/lean.py LISTEN MEMBER_PORT [MEMBER_PORT ...] --audit FILE
                          [--cert C --key K | --dicom | --xds]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import ssl
import sys
import time
from pathlib import Path

import trio
from trio.lowlevel import wait_readable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocols import dicom, soap  # noqa: E402
from protocols.dimse import CommandPeek  # noqa: E402
from protocols.mllp import Message, MllpReader, frame, peek_ack, peek_header  # noqa: E402

TIMEOUT = 60.0  # per connection, moved per message


def move(scope: trio.CancelScope) -> None:
    """TIMEOUT from now, moved at most once a second (as medgate's relay.move_deadline)."""
    deadline = trio.current_time() + TIMEOUT
    if abs(scope.deadline - deadline) > 1.0:
        scope.deadline = deadline


async def receive(sock: socket.socket) -> bytes:
    while True:
        try:
            return sock.recv(65536)
        except BlockingIOError:
            await wait_readable(sock)


class Plain:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    async def receive(self) -> bytes:
        return await receive(self.sock)

    def send(self, data: bytes) -> None:
        # Small units (messages, PDUs, ITI-18 answers): the socket takes them at once.
        self.sock.sendall(data)


class Tls(Plain):
    """Server-side TLS on a non-blocking socket, records read and written through memory."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        super().__init__(sock)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=True)

    async def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                if not await self._fill():
                    raise ConnectionError("closed during the handshake") from None
        self.sock.sendall(self.outgoing.read())

    async def _fill(self) -> bool:
        data = await receive(self.sock)
        if data:
            self.incoming.write(data)
        return bool(data)

    async def receive(self) -> bytes:
        while True:
            try:
                return self.tls.read(65536)
            except ssl.SSLWantReadError:
                if self.outgoing.pending:
                    self.sock.sendall(self.outgoing.read())
                if not await self._fill():
                    return b""
            except ssl.SSLZeroReturnError:
                return b""

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self.sock.sendall(self.outgoing.read())


async def next_frame(connection: Plain, reader: MllpReader) -> Message | None:
    while (event := reader.next_event()) is None:
        data = await connection.receive()
        if not data:
            return None
        reader.feed(data)
    return event


def serve_hl7(listen: int, members: list[int], audit: str,
              context: ssl.SSLContext | None) -> None:
    fd = os.open(audit, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    idle: dict[int, list[tuple[Plain, MllpReader]]] = {port: [] for port in members}
    turn = [0]

    def member_connection(port: int) -> tuple[Plain, MllpReader]:
        if idle[port]:
            return idle[port].pop()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Plain(sock), MllpReader()

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await relay(stream)
        except (OSError, ssl.SSLError):
            pass  # the connection ends; the port probes of bench/common.py close at once

    async def relay(stream: trio.SocketStream) -> None:
        sock = socket.socket(fileno=stream.socket.detach())
        sock.setblocking(False)
        client = Tls(sock, context) if context else Plain(sock)
        reader = MllpReader()
        with trio.CancelScope() as scope, sock:
            if context:
                await client.handshake()
            while True:
                move(scope)
                message = await next_frame(client, reader)
                if message is None:
                    return
                header = peek_header(message.payload)
                started = trio.current_time()
                turn[0] = (turn[0] + 1) % len(members)
                port = members[turn[0]]
                member, member_reader = member_connection(port)
                member.send(frame(message.payload))
                answer = await next_frame(member, member_reader)
                if answer is None:
                    return
                ack = peek_ack(answer.payload)
                if ack.control_id != header.control_id:
                    return
                os.write(fd, (json.dumps({
                    "time": time.time(), "kind": "hl7", "client": "lean",
                    "message_type": header.message_type, "control_id": header.control_id,
                    "member": str(port), "ack": ack.code,
                    "latency_ms": round((trio.current_time() - started) * 1000, 1)}) + "\n")
                    .encode())
                idle[port].append((member, member_reader))
                client.send(frame(answer.payload))

    trio.run(lambda: trio.serve_tcp(handle, listen, host="127.0.0.1"))


async def next_pdu(connection: Plain, reader: dicom.PduReader) -> bytes:
    while (pdu := reader.next_pdu()) is None:
        data = await connection.receive()
        if not data:
            raise ConnectionError("closed")
        reader.feed(data)
    return pdu


def serve_dicom(listen: int, members: list[int], audit: str) -> None:
    fd = os.open(audit, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    turn = [0]

    async def relay(stream: trio.SocketStream) -> None:
        sock = socket.socket(fileno=stream.socket.detach())
        sock.setblocking(False)
        client, reader = Plain(sock), dicom.PduReader()
        with trio.CancelScope(deadline=trio.current_time() + TIMEOUT), sock:
            started = trio.current_time()
            request_pdu = await next_pdu(client, reader)
            request = dicom.Association.decode(request_pdu)
            turn[0] = (turn[0] + 1) % len(members)
            upstream = socket.create_connection(("127.0.0.1", members[turn[0]]))
            with upstream:
                upstream.setblocking(False)
                upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                member, member_reader = Plain(upstream), dicom.PduReader()
                member.send(request_pdu)
                accept = await next_pdu(member, member_reader)
                dicom.Association.decode(accept)
                client.send(accept)
                peeks = {"client": CommandPeek(), "member": CommandPeek()}
                while peeks["member"].last_type != dicom.A_RELEASE_RP:
                    for source, sink, pdu_reader, side in (
                            (client, member, reader, "client"),
                            (member, client, member_reader, "member")):
                        pdu = await next_pdu(source, pdu_reader)
                        peeks[side].feed(pdu)
                        peeks[side].take()
                        sink.send(pdu)
            os.write(fd, (json.dumps({
                "time": time.time(), "kind": "dicom", "calling_ae": request.calling_ae,
                "called_ae": request.called_ae, "member": str(members[turn[0]]),
                "outcome": "released", "pdus_in": peeks["client"].pdus,
                "duration_ms": round((trio.current_time() - started) * 1000, 1)}) + "\n")
                .encode())

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await relay(stream)
        except (OSError, dicom.ProtocolError):
            pass  # the connection ends; the port probes of bench/common.py close at once

    trio.run(lambda: trio.serve_tcp(handle, listen, host="127.0.0.1", backlog=1024))


async def next_http(connection: Plain, parser):
    """The next h11 event (import h11 lazily: the HL7 and DICOM paths do not need it)."""
    import h11

    while (event := parser.next_event()) is h11.NEED_DATA:
        parser.receive_data(await connection.receive())
    return event


async def read_http_message(connection: Plain, parser) -> tuple[object, bytes] | None:
    """A request or response head and its whole body; None at the end of the connection."""
    import h11

    head = await next_http(connection, parser)
    if isinstance(head, h11.ConnectionClosed):
        return None
    body = bytearray()
    while not isinstance(event := await next_http(connection, parser), h11.EndOfMessage):
        body += event.data
    return head, bytes(body)


def serve_xds(listen: int, registry: int, repository: int, audit: str) -> None:
    import h11

    fd = os.open(audit, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    idle: dict[int, list[tuple[Plain, h11.Connection]]] = {registry: [], repository: []}

    def member_connection(port: int) -> tuple[Plain, h11.Connection]:
        if idle[port]:
            return idle[port].pop()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Plain(sock), h11.Connection(h11.CLIENT)

    async def relay(stream: trio.SocketStream) -> None:
        sock = socket.socket(fileno=stream.socket.detach())
        sock.setblocking(False)
        client, parser = Plain(sock), h11.Connection(h11.SERVER)
        with trio.CancelScope() as scope, sock:
            while True:
                move(scope)
                message = await read_http_message(client, parser)
                if message is None:
                    return
                request, body = message
                started = trio.current_time()
                content_type = dict(request.headers).get(b"content-type", b"").decode("latin-1")
                action = soap.action_from_content_type(content_type) or soap.ActionPeek(
                    content_type).feed(body)
                port = registry if action == soap.ITI18 else repository
                member, upstream = member_connection(port)
                member.send(upstream.send(request) + upstream.send(h11.Data(data=body))
                            + upstream.send(h11.EndOfMessage()))
                response, answer = await read_http_message(member, upstream)
                client.send(parser.send(response) + parser.send(h11.Data(data=answer))
                            + parser.send(h11.EndOfMessage()))
                os.write(fd, (json.dumps({
                    "time": time.time(), "kind": "xds", "client": "lean", "action": action,
                    "member": str(port), "status": response.status_code, "bytes_in": len(body),
                    "bytes_out": len(answer),
                    "duration_ms": round((trio.current_time() - started) * 1000, 1)}) + "\n")
                    .encode())
                upstream.start_next_cycle()
                idle[port].append((member, upstream))
                parser.start_next_cycle()

    async def handle(stream: trio.SocketStream) -> None:
        try:
            await relay(stream)
        except (OSError, h11.ProtocolError, soap.SoapError):
            pass  # the connection ends; the port probes of bench/common.py close at once

    trio.run(lambda: trio.serve_tcp(handle, listen, host="127.0.0.1"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("listen", type=int)
    parser.add_argument("members", type=int, nargs="+")
    parser.add_argument("--audit", required=True)
    parser.add_argument("--cert")
    parser.add_argument("--key")
    parser.add_argument("--dicom", action="store_true")
    parser.add_argument("--xds", action="store_true", help="members: registry, repository")
    args = parser.parse_args()
    if args.dicom:
        return serve_dicom(args.listen, args.members, args.audit)
    if args.xds:
        return serve_xds(args.listen, *args.members[:2], args.audit)
    context = None
    if args.cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.cert, args.key)
    serve_hl7(args.listen, args.members, args.audit, context)


if __name__ == "__main__":
    main()
