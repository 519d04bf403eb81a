"""An HL7 sender as interface engines are: it sends one message at a time on one connection
and keeps each until its AA comes; a NAK, no answer or a closed connection make it wait a
moment and send the same message again (on a new connection when the old one is gone)."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from protocols.mllp import Message, MllpReader, frame, peek_ack, peek_header


@dataclass
class Sent:
    """What the sender saw: the control IDs acked (AA) in order, and each other outcome."""

    acked: list[str] = field(default_factory=list)
    resends: int = 0
    closed: int = 0  # the connection closed (or reset) without an answer
    naks: list[tuple[str, bytes]] = field(default_factory=list)  # (control ID, the NAK)


async def send_until_acked(port: int, messages: list[bytes], *, pause: float = 0.2,
                           answer_within: float = 10.0, give_up: float = 60.0) -> Sent:
    """Send every message until it is acked (see the module); TooSlowError after `give_up`."""
    sent = Sent()
    stream: trio.SocketStream | None = None
    reader = MllpReader()
    with trio.fail_after(give_up):
        for message in messages:
            control_id = peek_header(message).control_id
            while True:
                answer = b""
                try:
                    if stream is None:
                        stream = await trio.open_tcp_stream("127.0.0.1", port)
                        reader = MllpReader()
                    await stream.send_all(frame(message))
                    with trio.fail_after(answer_within):
                        while (event := reader.next_event()) is None:
                            data = await stream.receive_some(65536)
                            if not data:
                                raise trio.BrokenResourceError("closed")
                            reader.feed(data)
                    answer = event.payload if isinstance(event, Message) else b""
                except (OSError, trio.BrokenResourceError, trio.TooSlowError):
                    sent.closed += 1
                    if stream is not None:
                        await trio.aclose_forcefully(stream)
                    stream = None
                if answer and peek_ack(answer).code == "AA":
                    sent.acked.append(control_id)
                    break
                if answer:
                    sent.naks.append((control_id, answer))
                sent.resends += 1
                await trio.sleep(pause)
    if stream is not None:
        await stream.aclose()
    return sent
