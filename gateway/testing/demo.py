"""`gateway demo`: simulated back ends, a gateway in front of them, traffic, faults, a summary.

Everything runs on loopback in this process: two PACS, two HL7 receivers, an XDS registry and
repository, two web servers, and a gateway with a DICOM, an HL7, an XDS and a TCP VIP. Traffic
streams behave as real senders do: what is not confirmed (A-ABORT, NAK, 503) is kept and sent
again. Half-way one PACS and one HL7 receiver are killed, and brought back a little later. The
summary counts what was sent, confirmed, refused-and-retried, and lost (confirmed but nowhere to
be found, or never confirmed): lost must be 0.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from functools import partial
from dataclasses import dataclass, field

import h11
import trio
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table

from gateway.net import http
from gateway.config import parse_config
from gateway.exits import EXIT_INTERRUPTED
from gateway.service.server import Gateway
from gateway.testing.simulators.hl7 import HL7Receiver
from gateway.testing.simulators.hl7_messages import make_messages
from gateway.testing.simulators.modality import make_instances, send
from gateway.testing.simulators.pacs import PacsSimulator
from gateway.testing.simulators.xds import XdsRegistry, XdsRepository
from gateway.testing.simulators.xds_consumer import ConsumerError, Found, Retrieved, XdsConsumer
from gateway.testing.simulators.xds_provide import provide_request
from protocols import soap
from protocols.mllp import Message, MllpReader, frame, peek_ack, peek_header

PATIENT = "DEMO-PATIENT^^^&1.2.3.4.5&ISO"
# ITI-41 metadata, abridged to what the simulated actors index by (patient ID, uniqueId).
RETRY_PAUSE = 0.3  # a sender's pause before resending what was not confirmed


@dataclass
class Stream:
    """One traffic stream's counts, as the summary shows them."""

    name: str
    unit: str
    target: int
    sent: int = 0  # distinct units handed to the gateway at least once
    confirmed: int = 0  # stored / acked / accepted
    retried: int = 0  # refusals and failures the sender answered by sending again
    confirmed_ids: set[str] = field(default_factory=set)
    pending: list = field(default_factory=list)  # not confirmed yet: will be sent again


class Demo:
    def __init__(self, duration: float, faults: bool, console: Console,
                 workers: int = 1) -> None:
        self.duration = duration
        self.faults = faults
        self.workers = workers  # the gateway's [gateway] workers
        self.console = console
        self.events: list[str] = []
        self.pacs = [PacsSimulator(ae_title=f"PACS{n}") for n in (1, 2)]
        self.receivers = [HL7Receiver(name=f"RIS{n}") for n in (1, 2)]
        self.registry = XdsRegistry()
        self.repository = XdsRepository()
        self.webs: list[int] = []
        self.streams = {
            "dicom": Stream("DICOM C-STORE", "images", target=0),
            "hl7": Stream("HL7 ADT", "messages", target=0),
            "xds": Stream("XDS ITI-41", "documents", target=0),
            "query": Stream("XDS ITI-18/43", "queries", target=0),  # zeep
            "web": Stream("viewer (TCP)", "requests", target=0),
        }
        self.gateway: Gateway | None = None
        self.started = 0.0  # trio time when the traffic starts
        self.interrupted = False  # Ctrl-C
        self.phase = trio.CancelScope()  # what Ctrl-C ends: the traffic, or the final wait

    # -- set-up

    async def start_backends(self, nursery: trio.Nursery) -> None:
        for pacs in self.pacs:
            await trio.to_thread.run_sync(pacs.start)
        for receiver in self.receivers:
            await nursery.start(receiver.serve)
        await nursery.start(self.registry.serve)
        self.repository.registry_url = f"{self.registry.url}registry"
        await nursery.start(self.repository.serve)
        for _ in range(2):
            listeners = await nursery.start(partial(trio.serve_tcp, host="127.0.0.1"),
                                            _web_page, 0)
            self.webs.append(listeners[0].socket.getsockname()[1])

    def config_text(self) -> str:
        pacs = "".join(f'[[vip.member]]\nname = "pacs{n}"\naddress = "127.0.0.1:{p.port}"\n'
                       f'ae_title = "PACS{n}"\n' for n, p in enumerate(self.pacs, 1))
        ris = "".join(f'[[vip.member]]\nname = "ris{n}"\naddress = "127.0.0.1:{r.port}"\n'
                      for n, r in enumerate(self.receivers, 1))
        web = "".join(f'[[vip.member]]\nname = "web{n}"\naddress = "127.0.0.1:{p}"\n'
                      for n, p in enumerate(self.webs, 1))
        check = 'interval = "500ms", timeout = "1s", rise = 2, fall = 2'
        return f"""
[gateway]
admin = "127.0.0.1:0"
audit = ""
workers = {self.workers}
[defaults]
connect_timeout = "1s"
assoc_timeout = "2s"
ack_timeout = "2s"
[[vip]]
name = "dicom"
protocol = "dicom"
listen = "127.0.0.1:0"
health = {{ check = "dicom-echo", {check} }}
{pacs}
[[vip]]
name = "hl7"
protocol = "hl7"
listen = "127.0.0.1:0"
persistence = {{ key = "pid-3", timeout = "1h" }}
health = {{ check = "hl7-ack", {check} }}
{ris}
[[vip]]
name = "xds"
protocol = "xds"
listen = "127.0.0.1:0"
health = {{ check = "xds-query", path = "/registry", patient_id = "{PATIENT}", {check} }}
[[vip.member]]
name = "registry"
address = "127.0.0.1:{self.registry.port}"
role = "registry"
[[vip.member]]
name = "repository"
address = "127.0.0.1:{self.repository.port}"
role = "repository"
[[vip]]
name = "viewer"
protocol = "tcp"
listen = "127.0.0.1:0"
health = {{ check = "http", path = "/", expect = "viewer", {check} }}
{web}
"""

    def port(self, vip: str) -> int:
        assert self.gateway is not None, "the gateway is started first"
        return self.gateway.bound[vip][0].port

    def note(self, text: str) -> None:
        stamp = trio.current_time() - self.started
        self.events.append(f"{stamp:5.1f}s {text}")

    # -- traffic

    async def dicom_traffic(self, until: float) -> None:
        stream = self.streams["dicom"]
        while trio.current_time() < until or stream.pending:
            if stream.pending:
                batch, stream.pending = stream.pending, []
            else:
                batch = make_instances(5, pixel_bytes=4096, patient_id="DEMO-PATIENT")
                stream.sent += len(batch)
            results = await trio.to_thread.run_sync(
                lambda: send("127.0.0.1", self.port("dicom"), batch, called_ae="ARCHIVE",
                             calling_ae="CT01", timeout=5))
            for ds, result in zip(batch, results):
                if result.stored:
                    stream.confirmed += 1
                    stream.confirmed_ids.add(result.sop_instance_uid)
                else:
                    stream.retried += 1
                    stream.pending.append(ds)  # unconfirmed: the modality keeps it
            if stream.pending:
                await trio.sleep(RETRY_PAUSE)
            if trio.current_time() > until + 30:
                break

    async def hl7_traffic(self, until: float) -> None:
        stream = self.streams["hl7"]
        counter = 0
        connection: trio.SocketStream | None = None
        reader = MllpReader()
        while trio.current_time() < until or stream.pending:
            if stream.pending:
                message = stream.pending.pop(0)
            else:
                counter += 1
                message = make_messages(1, patients=7, prefix="DEMO", first=counter)[0]
                stream.sent += 1
            control_id = peek_header(message).control_id
            try:
                if connection is None:
                    connection = await trio.open_tcp_stream("127.0.0.1", self.port("hl7"))
                    reader = MllpReader()
                await connection.send_all(frame(message))
                with trio.fail_after(10):
                    while (event := reader.next_event()) is None:
                        data = await connection.receive_some(65536)
                        if not data:
                            raise OSError("connection closed")
                        reader.feed(data)
                code = peek_ack(event.payload).code if isinstance(event, Message) else ""
            except (OSError, trio.BrokenResourceError, trio.TooSlowError):
                code = ""
                connection = None
            if code == "AA":
                stream.confirmed += 1
                stream.confirmed_ids.add(control_id)
            else:  # a NAK from the gateway, or no answer: the sender keeps it and resends
                stream.retried += 1
                stream.pending.append(message)
                await trio.sleep(RETRY_PAUSE)
            await trio.sleep(0.02)
            if trio.current_time() > until + 30:
                break
        if connection is not None:
            await connection.aclose()

    async def xds_traffic(self, until: float) -> None:
        documents, queries = self.streams["xds"], self.streams["query"]
        # The queries come from a consumer built with zeep (blocking: in a worker thread).
        base = f"http://127.0.0.1:{self.port('xds')}"
        consumer = await trio.to_thread.run_sync(
            lambda: XdsConsumer(f"{base}/registry", f"{base}/repository", timeout=15))
        number = 0
        while trio.current_time() < until or documents.pending:
            if documents.pending:
                unique_id = documents.pending.pop(0)
            else:
                number += 1
                unique_id = f"1.2.3.4.5.6.7.8.9.{os.getpid()}.{number}"
                documents.sent += 1
            status, body = await self._post("/repository", *_iti41(unique_id))
            if status == 200 and soap.parse_registry_response(body).success:
                documents.confirmed += 1
                documents.confirmed_ids.add(unique_id)
            else:
                documents.retried += 1
                documents.pending.append(unique_id)
            stored = max(documents.confirmed_ids, default="")  # any document stored so far
            queries_now: list[Callable[[], Found | Retrieved]] = [
                lambda: consumer.find_documents(PATIENT)] * 2
            if stored:
                queries_now.append(
                    lambda: consumer.retrieve(self.repository.repository_unique_id, stored))
            for query in queries_now:
                queries.sent += 1  # counted once answered: a query cut off at the end is no loss
                try:
                    answer = await trio.to_thread.run_sync(query)
                except ConsumerError:
                    queries.retried += 1
                    continue
                if answer.success:
                    queries.confirmed += 1
                else:
                    queries.retried += 1
            await trio.sleep(0.2)
            if trio.current_time() > until + 30:
                break

    async def web_traffic(self, until: float) -> None:
        stream = self.streams["web"]
        while trio.current_time() < until:
            try:
                with trio.fail_after(5):
                    tcp = await trio.open_tcp_stream("127.0.0.1", self.port("viewer"))
                    reply = await http.request(tcp, "GET", "/", "viewer")
                    await tcp.aclose()
                ok = reply.status == 200
            except (OSError, http.PeerGone, trio.TooSlowError):
                ok = False
            stream.sent += 1
            if ok:
                stream.confirmed += 1
            else:
                stream.retried += 1
            await trio.sleep(0.1)

    async def _post(self, path: str, content_type: str, body: bytes) -> tuple[int, bytes]:
        try:
            with trio.fail_after(15):
                tcp = await trio.open_tcp_stream("127.0.0.1", self.port("xds"))
                try:
                    reply = await http.request(tcp, "POST", path, "xds", [
                        ("Content-Type", content_type)], body)
                finally:
                    await tcp.aclose()
            return reply.status, reply.body
        except (OSError, http.PeerGone, trio.TooSlowError, h11.ProtocolError,
                soap.SoapError):
            return 0, b""

    async def faults_script(self, nursery: trio.Nursery, until: float) -> None:
        if not self.faults:
            return
        half = self.started + (until - self.started) / 2
        await trio.sleep_until(half)
        port = self.pacs[0].port
        await trio.to_thread.run_sync(self.pacs[0].stop)
        self.receivers[0].stop()
        self.note("killed PACS1 and RIS1")
        await trio.sleep((until - self.started) * 0.2)
        self.pacs[0] = PacsSimulator(ae_title="PACS1", port=port, stored=self.pacs[0].stored)
        await trio.to_thread.run_sync(self.pacs[0].start)
        old = self.receivers[0]
        self.receivers[0] = HL7Receiver(name="RIS1", port=old.port, received=old.received)
        await nursery.start(self.receivers[0].serve)
        self.note("PACS1 and RIS1 are back")

    # -- views

    def members_table(self) -> Table:
        table = Table(title="medgate demo", expand=False, padding=(0, 1))
        for column in ("VIP", "member", "state", "routed", "fail"):
            table.add_column(column, no_wrap=True)
        colours = {"up": "green", "drain": "yellow", "maint": "yellow", "down": "bold red",
                   "unknown": "dim"}
        if self.gateway is None:
            return table
        for vip in self.gateway.config.vips:
            for member in self.gateway.balancer.pool(vip.name).members:
                table.add_row(vip.name, member.name,
                              f"[{colours[member.state]}]{member.state}[/]", str(member.total),
                              str(member.failed))
        return table

    def lost(self) -> dict[str, int]:
        """Units confirmed to the sender but found nowhere, plus (after a whole run, whose
        senders retry until confirmed) units never confirmed; after Ctrl-C those are the
        senders' to keep, not lost."""
        stored = {uid for pacs in self.pacs for uid in pacs.stored}
        received = {m.control_id for r in self.receivers for m in r.received}
        documents = set(self.repository.documents)
        found = {"dicom": stored, "hl7": received, "xds": documents}
        return {key: len(self.streams[key].confirmed_ids - held)
                + (0 if self.interrupted else len(self.streams[key].pending))
                for key, held in found.items()} | {"query": 0, "web": 0}

    def summary(self) -> Table:
        lost = self.lost()
        table = Table(title="summary", expand=False, padding=(0, 1))
        for column in ("stream", "sent", "stored/acked", "refused+retried", "lost"):
            table.add_column(column, no_wrap=True, justify="left" if column == "stream"
                             else "right")
        for key, stream in self.streams.items():
            colour = "green" if lost[key] == 0 else "bold red"
            table.add_row(f"{stream.name} ({stream.unit})", str(stream.sent),
                          str(stream.confirmed), str(stream.retried),
                          f"[{colour}]{lost[key]}[/]")
        return table


async def _web_page(stream: trio.SocketStream) -> None:
    connection = h11.Connection(h11.SERVER)
    try:
        while True:
            event = await http.next_event(stream, connection)
            if not isinstance(event, h11.Request):
                return
            while not isinstance(await http.next_event(stream, connection), h11.EndOfMessage):
                pass
            body = b"<html><body>the image viewer</body></html>"
            await http.send(stream, connection, h11.Response(status_code=200, headers=[
                ("Content-Type", "text/html"), ("Content-Length", str(len(body)))]))
            await http.send(stream, connection, h11.Data(data=body))
            await http.send(stream, connection, h11.EndOfMessage())
            if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                return
            connection.start_next_cycle()
    except (http.PeerGone, h11.ProtocolError):
        return


def _iti41(unique_id: str) -> tuple[str, bytes]:
    document = f"%PDF-1.4 demo report {unique_id}\n".encode() * 2000
    request = provide_request(document, "application/pdf", PATIENT, unique_id)
    return request.content_type, request.body


async def run_demo(duration: float, faults: bool, keep_running: bool, console: Console,
                   workers: int = 1) -> int:
    """The whole demo; returns the exit status (0 when nothing was lost, 130 after Ctrl-C:
    the summary of what was done so far, then everything started is stopped)."""
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    demo = Demo(duration, faults, console, workers)
    try:
        with trio.open_signal_receiver(signal.SIGINT) as interrupts:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_interrupt, demo, interrupts, nursery.cancel_scope)
                lost = await _phases(demo, nursery, keep_running)
                nursery.cancel_scope.cancel()
    finally:
        if demo.gateway is not None:
            demo.gateway.stop()
        for pacs in demo.pacs:
            pacs.stop()
    if demo.interrupted:
        console.print("interrupted (Ctrl-C): everything the demo started is stopped")
        return EXIT_INTERRUPTED
    return 0 if lost == 0 else 1


async def _interrupt(demo: Demo, interrupts, everything: trio.CancelScope) -> None:
    """Ctrl-C ends the phase under way (traffic, or the wait of --keep-running); a second one
    ends everything at once."""
    async for _ in interrupts:
        if demo.interrupted:
            everything.cancel()
            return
        demo.interrupted = True
        demo.phase.cancel()


async def _phases(demo: Demo, nursery: trio.Nursery, keep_running: bool) -> int:
    """Set-up, traffic, summary, then (--keep-running) wait; returns how many units were lost."""
    console = demo.console
    await demo.start_backends(nursery)
    demo.gateway = Gateway(parse_config(demo.config_text(), source="gateway demo"))
    await nursery.start(demo.gateway.run)
    console.print(f"status page: [bold]http://{demo.gateway.admin_address}/[/] "
                  f"(JSON /api/status, /metrics)")
    if demo.workers > 1:
        console.print(f"{demo.workers} worker processes relay; this one leads (the checks, "
                      "the admin server)")
    console.print("VIPs: " + ", ".join(f"{vip} 127.0.0.1:{demo.port(vip)}"
                                       for vip in ("dicom", "hl7", "xds", "viewer")))
    with demo.phase:
        await _traffic(demo, nursery)
    console.print()
    console.print(demo.summary())
    rerouted = {vip: demo.gateway.balancer.pool(vip).retried for vip in ("dicom", "hl7", "xds")}
    console.print(f"meanwhile the gateway moved {rerouted['dicom']} association(s), "
                  f"{rerouted['hl7']} message(s) and {rerouted['xds']} request(s) to another "
                  "member when one failed, unseen by the senders")
    lost = sum(demo.lost().values())
    if demo.interrupted:
        in_flight = sum(max(stream.sent - stream.confirmed, 0)
                        for stream in demo.streams.values())
        console.print(f"[bold yellow]stopped early[/] with {in_flight} unit(s) sent and not yet "
                      "confirmed: their senders keep them, as real senders do")
    console.print("[bold green]nothing lost[/]" if lost == 0 else f"[bold red]{lost} lost[/]")
    if keep_running and not demo.interrupted:
        console.print(f"still running: status page http://{demo.gateway.admin_address}/, "
                      f"DICOM VIP 127.0.0.1:{demo.port('dicom')} (e.g. echoscu -aec ARCHIVE "
                      f"127.0.0.1 {demo.port('dicom')}), HL7 127.0.0.1:{demo.port('hl7')}, "
                      f"XDS 127.0.0.1:{demo.port('xds')}; Ctrl-C to stop")
        demo.phase = trio.CancelScope()
        with demo.phase:
            await trio.sleep_forever()
    return lost


async def _traffic(demo: Demo, nursery: trio.Nursery) -> None:
    """Every stream at once, drawn live, until each has stopped by itself after `duration`."""
    demo.started = trio.current_time()
    until = demo.started + demo.duration
    progress = Progress(TextColumn("{task.description:<22}"), BarColumn(bar_width=20),
                        MofNCompleteColumn(), console=demo.console)
    tasks = {key: progress.add_task(stream.name, total=None)
             for key, stream in demo.streams.items()}

    def view():
        for key, stream in demo.streams.items():
            progress.update(tasks[key], completed=stream.confirmed, total=max(stream.sent, 1))
        return Group(demo.members_table(), progress, *demo.events[-3:])

    with Live(view(), console=demo.console, auto_refresh=False) as live:
        async def redraw():
            while True:
                live.update(view(), refresh=True)
                await trio.sleep(0.5)

        try:
            async with trio.open_nursery() as screen:
                screen.start_soon(redraw)
                # Each stream stops by itself after `until`, once nothing it sent is left
                # unconfirmed: a unit in flight is never cut off and miscounted.
                async with trio.open_nursery() as traffic:
                    traffic.start_soon(demo.dicom_traffic, until)
                    traffic.start_soon(demo.hl7_traffic, until)
                    traffic.start_soon(demo.xds_traffic, until)
                    traffic.start_soon(demo.web_traffic, until)
                    traffic.start_soon(demo.faults_script, nursery, until)
                screen.cancel_scope.cancel()
        finally:
            live.update(view(), refresh=True)
