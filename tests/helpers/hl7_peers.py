"""HL7 receivers built on libraries no one here wrote (python-hl7, hl7apy), run as processes.

`python -m tests.helpers.hl7_peers python-hl7|hl7apy RECORD` listens on a free port, prints
`READY <port>`, appends the MSH-10 of each message it takes (each message of a batch) to RECORD
before answering, and answers as a receiver built on that library would:
- python-hl7 (asyncio MLLP server, `hl7.parse_hl7`): a message gets `create_ack()`; a batch
  gets a response batch (BHS-12 = the batch's BHS-11) holding one ACK per message.
- hl7apy (`MLLPServer`, one message per connection): a message is parsed with hl7apy and
  answered with an ACK built with it; a batch (hl7apy's parser reads single messages, so it
  reaches the error handler) is split, each message parsed, and answered by one ACK whose
  MSA-2 is the batch's BHS-11.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.helpers import stop_process

BATCH_STARTS = ("FHS", "BHS")


def _record(path: str, control_ids: list[str]) -> None:
    with open(path, "a", encoding="ascii") as record:
        record.writelines(f"{control_id}\n" for control_id in control_ids)


def _batch_id(segments: list[str]) -> str:
    for segment in segments[:2]:
        fields = segment.split("|")
        if fields[0] == "BHS" and len(fields) > 10 and fields[10]:  # BHS-11
            return fields[10]
    return ""


def serve_python_hl7(record: str) -> None:
    import asyncio

    import hl7
    import hl7.mllp

    async def handle(reader, writer) -> None:
        try:
            while not writer.is_closing():
                block = (await reader.readblock()).decode("ascii")
                parsed = hl7.parse_hl7(block)
                if isinstance(parsed, hl7.Batch):
                    messages = list(parsed)
                    _record(record, [str(m.segment("MSH")[10]) for m in messages])
                    reference = str(parsed.header[11]) if parsed.header else ""
                    answer = "".join(
                        [f"BHS|^~\\&|PYHL7|HOSP|||||||R{reference}|{reference}\r"]
                        + [str(m.create_ack("AA")) for m in messages]
                        + [f"BTS|{len(messages)}\r"])
                else:
                    _record(record, [str(parsed.segment("MSH")[10])])
                    answer = str(parsed.create_ack("AA"))
                writer.writeblock(answer.encode("ascii"))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    async def main() -> None:
        server = await hl7.mllp.start_hl7_server(handle, "127.0.0.1", 0)
        print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def serve_hl7apy(record: str) -> None:
    from hl7apy.core import Message
    from hl7apy.mllp import AbstractErrorHandler, AbstractHandler, MLLPServer
    from hl7apy.parser import parse_message

    def ack(answered: str, version: str) -> str:
        reply = Message("ACK", version=version)
        reply.msh.msh_3 = "HL7APY"
        reply.msh.msh_10 = f"APY{answered}"
        reply.msa.msa_1 = "AA"
        reply.msa.msa_2 = answered
        return reply.to_mllp()

    class Accept(AbstractHandler):
        def reply(self) -> str:
            message = parse_message(self.incoming_message, find_groups=False)
            _record(record, [message.msh.msh_10.value])
            return ack(message.msh.msh_10.value, message.msh.msh_12.value)

    class Batches(AbstractErrorHandler):
        def reply(self) -> str:
            segments = [s for s in self.incoming_message.replace("\n", "\r").split("\r") if s]
            if segments[0][:3] not in BATCH_STARTS:
                raise self.exc
            messages, current = [], []
            for segment in segments:
                if segment.startswith("MSH"):
                    current = [segment]
                    messages.append(current)
                elif current and segment[:3] not in ("BTS", "FTS"):
                    current.append(segment)
            parsed = [parse_message("\r".join(m), find_groups=False) for m in messages]
            _record(record, [m.msh.msh_10.value for m in parsed])
            return ack(_batch_id(segments) or parsed[0].msh.msh_10.value,
                       parsed[0].msh.msh_12.value)

    handlers = {kind: (Accept,) for kind in ("ADT^A01^ADT_A01", "ORU^R01^ORU_R01", "ADT^A01",
                                             "NMD^N02^NMD_N02")}
    handlers["ERR"] = (Batches,)
    server = MLLPServer("127.0.0.1", 0, handlers)
    print(f"READY {server.server_address[1]}", flush=True)
    server.serve_forever()


class LibraryReceiver:
    """One of the receivers above as a process; `recorded()` lists what it took."""

    def __init__(self, folder: Path, kind: str) -> None:
        self.record = folder / f"{kind}.record"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.hl7_peers", kind, str(self.record)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True,
            cwd=Path(__file__).resolve().parents[2])  # the repository
        line = self.process.stdout.readline().decode()
        assert line.startswith("READY"), f"{kind} receiver did not start: {line!r}"
        self.port = int(line.split()[1])

    def recorded(self) -> list[str]:
        if not self.record.exists():
            return []
        return [c for c in self.record.read_text().split() if not c.startswith("MEDGATE")]

    def stop(self) -> None:
        stop_process(self.process)


if __name__ == "__main__":
    {"python-hl7": serve_python_hl7, "hl7apy": serve_hl7apy}[sys.argv[1]](sys.argv[2])
