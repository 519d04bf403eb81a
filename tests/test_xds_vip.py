"""The XDS VIP with curl (an independent client), prepared envelopes and simulated actors."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import h11
import pytest
import trio
from lxml import etree

from gateway.balancer import Health
from gateway.testing.simulators.xds import registry_response
from protocols import soap
from tests.helpers.faulty_members import ScriptedServer, http_response
from tests.helpers import (eventually, logged_port, start_gateway, stop_process,
                           vip_port, wait_for_health)

FIXTURES = Path(__file__).parent / "fixtures"
PATIENT = "PAT0001^^^&1.2.3.4.5&ISO"
UNIQUE_ID = "1.2.3.4.5.6.7.8.9.20261126.1"
BOUNDARY = "MIMEBoundary_medgate"
MTOM_TYPE = (f'multipart/related; type="application/xop+xml"; boundary="{BOUNDARY}"; '
             f'start="<root.message@medgate>"; start-info="application/soap+xml"; '
             f'action="{soap.ITI41}"')
ITI18_TYPE = f'application/soap+xml; charset=UTF-8; action="{soap.ITI18}"'
PLAIN_TYPE = "application/soap+xml; charset=UTF-8"  # no action: the gateway reads wsa:Action


def xds_vip(registries: list[int], repositories: list[int], extra: str = "",
            health: str = "") -> str:
    health = health or (f'health = {{ check = "xds-query", path = "/registry", '
                        f'patient_id = "{PATIENT}", interval = "200ms", timeout = "1s", '
                        f'rise = 2, fall = 2 }}')
    text = f"""
[[vip]]
name = "xds"
protocol = "xds"
listen = "127.0.0.1:0"
connect_timeout = "1s"
ack_timeout = "2s"
{health}
{extra}
"""
    for role, ports in (("registry", registries), ("repository", repositories)):
        for n, port in enumerate(ports, 1):
            text += f'\n[[vip.member]]\nname = "{role}{n}"\naddress = "127.0.0.1:{port}"\n' \
                    f'role = "{role}"\n'
    return text


def write_mtom(path: Path, megabytes: int, edges: bytes = b"") -> str:
    """An ITI-41 MTOM body with a document of random bytes between `edges` (its first and last
    bytes, e.g. CR LF, which a MIME reader must not take for the part's framing); returns the
    document's SHA-256."""
    digest = hashlib.sha256(edges)
    with open(path, "wb") as out:
        out.write(f"--{BOUNDARY}\r\nContent-Type: application/xop+xml; charset=UTF-8; "
                  f"type=\"application/soap+xml\"\r\nContent-Transfer-Encoding: binary\r\n"
                  f"Content-ID: <root.message@medgate>\r\n\r\n".encode())
        out.write((FIXTURES / "iti41-envelope.xml").read_bytes())
        out.write(f"\r\n--{BOUNDARY}\r\nContent-Type: application/pdf\r\nContent-Transfer-"
                  f"Encoding: binary\r\nContent-ID: <doc1@medgate>\r\n\r\n".encode() + edges)
        for _ in range(megabytes):
            block = os.urandom(1024 * 1024)
            digest.update(block)
            out.write(block)
        digest.update(edges)
        out.write(edges)
        out.write(f"\r\n--{BOUNDARY}--\r\n".encode())
    return digest.hexdigest()


async def curl(url: str, content_type: str, data: Path, *extra: str, scratch: Path,
               output: Path | None = None) -> tuple[int, str, bytes]:
    """(HTTP status, response headers, body) from curl --data-binary; files go in `scratch`."""
    name = os.urandom(4).hex()
    headers_file = scratch / f"curl-{name}.headers"
    body_file = output or scratch / f"curl-{name}.out"
    with trio.fail_after(120):
        result = await trio.run_process(
            ["curl", "-sS", "-o", str(body_file), "-D", str(headers_file), "-w", "%{http_code}",
             "-H", f"Content-Type: {content_type}", "--data-binary", f"@{data}", *extra, url],
            capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode()
    body = b"" if output else body_file.read_bytes()
    return int(result.stdout), headers_file.read_text(errors="replace"), body


def document_from_mtom(path: Path, content_type: str) -> str:
    """SHA-256 of the attachment of an MTOM response, read a chunk at a time."""
    _, params = soap.content_type_params(content_type)
    reader = soap.MultipartReader(params["boundary"])
    digest, part = hashlib.sha256(), -1
    with open(path, "rb") as source:
        while chunk := source.read(1 << 20):
            reader.feed(chunk)
            while (event := reader.next_event()) is not None:
                if isinstance(event, soap.PartStart):
                    part += 1
                elif isinstance(event, soap.PartData) and part == 1:
                    digest.update(event.data)
    return digest.hexdigest()


def response_content_type(headers: str) -> str:
    for line in headers.splitlines():
        if line.lower().startswith("content-type:"):
            return line.split(":", 1)[1].strip()
    return ""


async def test_iti41_iti18_iti43_through_one_vip_byte_identical(nursery, xds_registry,
                                                                 xds_repository, tmp_path):
    registry = xds_registry()
    repository = xds_repository(registry_url=f"{registry.url}registry")
    gateway = await start_gateway(nursery, xds_vip([registry.port], [repository.port]))
    base = f"http://127.0.0.1:{vip_port(gateway, 'xds')}"
    sha = write_mtom(tmp_path / "iti41.bin", 50)

    status, headers, body = await curl(f"{base}/repository", MTOM_TYPE, tmp_path / "iti41.bin", scratch=tmp_path)
    assert status == 200 and soap.parse_registry_response(body).success, body[:500]
    assert repository.documents[UNIQUE_ID].sha256 == sha
    assert registry.entries and registry.entries[0].patient_id == PATIENT

    status, _, body = await curl(f"{base}/registry", ITI18_TYPE, FIXTURES / "iti18-find-documents.xml", scratch=tmp_path)
    answer = soap.parse_registry_response(body)
    assert status == 200 and answer.success and answer.object_refs == (registry.entries[0].entry_uuid,)

    status, headers, _ = await curl(f"{base}/repository", PLAIN_TYPE, FIXTURES / "iti43-retrieve.xml",
                                    output=tmp_path / "retrieved.bin", scratch=tmp_path)
    assert status == 200
    assert document_from_mtom(tmp_path / "retrieved.bin", response_content_type(headers)) == sha
    assert registry.requests.count("ITI-18") >= 1 and "ITI-42" in registry.requests
    assert repository.requests.count("ITI-41") == 1 and repository.requests.count("ITI-43") == 1
    assert {f for f in repository.forwarded_for if f} == {"127.0.0.1"}  # X-Forwarded-For added


def posted(client: h11.Connection, target: str, content_type: str, body: bytes) -> bytes:
    """A whole POST as the h11 client `client` writes it (its state moves on as it does)."""
    return b"".join(client.send(event) for event in (
        h11.Request(method="POST", target=target, headers=[
            ("Host", "gw"), ("Content-Type", content_type), ("Content-Length", str(len(body)))]),
        h11.Data(data=body), h11.EndOfMessage()))


async def answer(stream: trio.SocketStream, client: h11.Connection) -> tuple[h11.Response, bytes]:
    """The next response `client` reads from `stream`, with its body; the client is then
    ready for its next request."""
    head, body = None, bytearray()
    while not isinstance(event := client.next_event(), h11.EndOfMessage):
        if event is h11.NEED_DATA:
            client.receive_data(await stream.receive_some(262144))
        elif isinstance(event, h11.Response):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
    assert head is not None
    client.start_next_cycle()
    return head, bytes(body)


async def test_a_large_body_goes_past_h11_and_a_pipelined_request_after_it_is_served(
        nursery, xds_registry, xds_repository, tmp_path):
    """An ITI-41 larger than RAW_BODY_AT is read by its length past h11: an ITI-18 the client
    writes right behind it, on the same connection, is neither taken into the document nor
    lost, and is answered after it (the connection's next request)."""
    registry = xds_registry()
    repository = xds_repository(registry_url=f"{registry.url}registry")
    gateway = await start_gateway(nursery, xds_vip([registry.port], [repository.port]))
    sha = write_mtom(tmp_path / "iti41.bin", 3)
    requests = [("/repository", MTOM_TYPE, (tmp_path / "iti41.bin").read_bytes()),
                ("/registry", ITI18_TYPE, (FIXTURES / "iti18-find-documents.xml").read_bytes())]
    stream = await trio.open_tcp_stream("127.0.0.1", vip_port(gateway, "xds"))
    client = h11.Connection(h11.CLIENT)
    with trio.fail_after(60):
        # Both at once (an h11 client writes one at a time: a writer each), then the answers
        await stream.send_all(b"".join(posted(h11.Connection(h11.CLIENT), *request)
                                       for request in requests))
        answers = []
        for request in requests:
            posted(client, *request)  # what was sent, for the client's state machine
            head, body = await answer(stream, client)
            answers.append((head.status_code, soap.parse_registry_response(body)))
    await stream.aclose()
    assert [(status, reply.success) for status, reply in answers] == [(200, True), (200, True)]
    assert repository.documents[UNIQUE_ID].sha256 == sha  # the document, and nothing else
    assert answers[1][1].object_refs == (registry.entries[0].entry_uuid,)


async def test_a_client_that_cuts_its_large_body_leaves_nothing_stored(
        nursery, xds_registry, xds_repository, tmp_path, caplog):
    """The body spliced socket to socket: a client that closes after a third of it ends its
    own connection (logged); the repository never sees a whole request, and the next client
    is served."""
    registry = xds_registry()
    repository = xds_repository(registry_url=f"{registry.url}registry")
    gateway = await start_gateway(nursery, xds_vip([registry.port], [repository.port]))
    write_mtom(tmp_path / "iti41.bin", 3)
    body = (tmp_path / "iti41.bin").read_bytes()
    request = posted(h11.Connection(h11.CLIENT), "/repository", MTOM_TYPE, body)
    port = vip_port(gateway, "xds")
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(30):
        await stream.send_all(request[:len(request) // 3])
        repository1 = gateway.balancer.pool("xds").member("repository1")
        await eventually(lambda: repository1.active == 1, what="the request under way")
        await stream.aclose()
        await eventually(lambda: any("in the middle of its request" in r.getMessage()
                                     for r in caplog.records), what="the cut logged")
    assert repository.documents == {}  # its head came; never the whole request
    status, _, reply = await curl(f"http://127.0.0.1:{port}/repository", MTOM_TYPE,
                                  tmp_path / "iti41.bin", scratch=tmp_path)
    assert status == 200 and soap.parse_registry_response(reply).success


async def test_a_large_response_goes_past_h11_and_the_connection_serves_the_next(nursery):
    """A member's response of a declared length of 3 MB (an ITI-43's documents) reaches the
    client byte for byte, socket to socket; the client's connection then carries its next
    request (its h11 state machine started afresh), the member's is not pooled."""
    documents = [os.urandom(3 * 1024 * 1024), os.urandom(3 * 1024 * 1024 + 7)]
    served = []

    async def repository(stream):
        server = h11.Connection(h11.SERVER)
        while True:
            while not isinstance(event := server.next_event(), h11.EndOfMessage):
                if event is h11.NEED_DATA:
                    if not (data := await stream.receive_some(65536)):
                        return
                    server.receive_data(data)
            if len(served) == 2:  # the third: a third of the body, then the connection ends
                await stream.send_all(http_response(documents[0])[:len(documents[0]) // 3])
                return
            body = documents[len(served)]
            served.append(len(body))
            await stream.send_all(http_response(body))
            server = h11.Connection(h11.SERVER)  # written by hand: the next request afresh

    member = await ScriptedServer(repository).start(nursery)
    gateway = await start_gateway(nursery, xds_vip([], [member.port], health=(
        'health = { check = "tcp", interval = "1h" }')))
    checked = member.connections  # the first TCP check's
    stream = await trio.open_tcp_stream("127.0.0.1", vip_port(gateway, "xds"))
    client = h11.Connection(h11.CLIENT)
    envelope = (FIXTURES / "iti43-retrieve.xml").read_bytes()
    with trio.fail_after(60):
        for expected in documents:
            await stream.send_all(posted(client, "/repository", PLAIN_TYPE, envelope))
            _, received = await answer(stream, client)
            assert hashlib.sha256(received).digest() == hashlib.sha256(expected).digest()
        # A member that breaks off such a response: the client's connection ends (its length
        # was promised), the member is struck.
        await stream.send_all(posted(client, "/repository", PLAIN_TYPE, envelope))
        cut = bytearray()
        while data := await stream.receive_some(262144):
            cut += data
    await stream.aclose()
    assert 0 < len(cut) < len(documents[0])
    assert served == [len(documents[0]), len(documents[1])]
    assert member.connections - checked == 3  # not pooled after a spliced body
    assert gateway.balancer.pool("xds").member("repository1").failed >= 1


async def test_a_fault_after_a_large_body_keeps_the_connection(nursery, xds_registry,
                                                                xds_repository, tmp_path):
    """A 502 for an ITI-41 whose body went past h11 whole (its repository hung): the client
    was told nothing about closing, and its next request on the connection is answered."""
    registry, repository = xds_registry(), xds_repository()
    repository.mode = "hang"
    gateway = await start_gateway(nursery, xds_vip(
        [registry.port], [repository.port], health='health = { check = "tcp", interval = "1h" }'))
    write_mtom(tmp_path / "iti41.bin", 1)
    stream = await trio.open_tcp_stream("127.0.0.1", vip_port(gateway, "xds"))
    client = h11.Connection(h11.CLIENT)
    answers = []
    with trio.fail_after(60):
        for request in [("/repository", MTOM_TYPE, (tmp_path / "iti41.bin").read_bytes()),
                        ("/registry", ITI18_TYPE,
                         (FIXTURES / "iti18-find-documents.xml").read_bytes())]:
            await stream.send_all(posted(client, *request))
            head, _ = await answer(stream, client)
            answers.append((head.status_code, dict(head.headers).get(b"connection")))
    await stream.aclose()
    assert answers == [(502, None), (200, None)]


async def test_expect_100_continue_is_answered(nursery, xds_registry, xds_repository, tmp_path):
    registry = xds_registry()
    repository = xds_repository(registry_url=f"{registry.url}registry")
    gateway = await start_gateway(nursery, xds_vip([registry.port], [repository.port]))
    write_mtom(tmp_path / "iti41.bin", 2)  # curl asks for 100-continue above 1 MB
    with trio.fail_after(60):
        result = await trio.run_process(
            ["curl", "-sS", "-v", "-o", "/dev/null", "-H", f"Content-Type: {MTOM_TYPE}",
             "--data-binary", f"@{tmp_path / 'iti41.bin'}",
             f"http://127.0.0.1:{vip_port(gateway, 'xds')}/repository"],
            capture_stdout=True, capture_stderr=True, check=False)
    log = result.stderr.decode()
    assert "> Expect: 100-continue" in log and "< HTTP/1.1 100 Continue" in log, log
    assert "< HTTP/1.1 200" in log


async def test_registry_killed_mid_run_queries_go_on(nursery, xds_registry, tmp_path):
    first, second = xds_registry(), xds_registry()
    gateway = await start_gateway(nursery, xds_vip(
        [first.port, second.port], [],
        health=f'health = {{ check = "xds-query", path = "/registry", patient_id = "{PATIENT}", '
               f'interval = "1h" }}'))  # only live traffic can notice the death
    url = f"http://127.0.0.1:{vip_port(gateway, 'xds')}/registry"
    statuses = []
    for n in range(30):
        if n == 10:
            first.stop()
        status, _, body = await curl(url, PLAIN_TYPE, FIXTURES / "iti18-find-documents.xml", scratch=tmp_path)
        statuses.append((status, soap.parse_registry_response(body).success))
    assert statuses == [(200, True)] * 30
    assert gateway.balancer.pool("xds").member("registry1").health is Health.DOWN


async def test_all_down_gives_503_with_a_well_formed_fault(nursery, xds_registry, tmp_path):
    registry = xds_registry()
    gateway = await start_gateway(nursery, xds_vip([registry.port], []))
    registry.stop()
    pool = gateway.balancer.pool("xds")
    await wait_for_health(pool, "registry1", Health.DOWN, 10)
    status, headers, body = await curl(f"http://127.0.0.1:{vip_port(gateway, 'xds')}/registry",
                                       ITI18_TYPE, FIXTURES / "iti18-find-documents.xml", scratch=tmp_path)
    assert status == 503
    assert response_content_type(headers).startswith("application/soap+xml")
    assert "Retry-After: 5" in headers
    envelope = etree.fromstring(body)
    env = "{http://www.w3.org/2003/05/soap-envelope}"
    (fault,) = envelope.find(f"{env}Body")  # the Fault is the only child of Body
    assert fault.tag == f"{env}Fault"
    assert fault.findtext(f"{env}Code/{env}Value") == "env:Receiver"
    assert "vip 'xds'" in fault.findtext(f"{env}Reason/{env}Text")


async def test_check_marks_a_registry_answering_failure_down_with_its_error(nursery,
                                                                            xds_registry):
    good, failing = xds_registry(), xds_registry(mode="failure", name="REG2")
    gateway = await start_gateway(nursery, xds_vip([good.port, failing.port], []))
    member = gateway.balancer.pool("xds").member("registry2")
    assert member.health is Health.DOWN
    assert member.last_check.detail == "Failure: XDSRegistryError: REG2: simulated failure"
    assert gateway.balancer.pool("xds").member("registry1").health is Health.UP


@pytest.mark.parametrize("mode, reason", [("http500", "HTTP 500"), ("fault", "SOAP Fault env:Receiver"),
                                          ("hang", "timeout after 1s")])
async def test_check_reasons(nursery, xds_registry, mode, reason):
    registry = xds_registry(mode=mode)
    gateway = await start_gateway(nursery, xds_vip([registry.port], []))
    assert reason in gateway.balancer.pool("xds").member("registry1").last_check.detail


async def test_queries_are_retried_writes_are_not(nursery, xds_registry, xds_repository,
                                                  tmp_path):
    hung_registry, registry = xds_registry(), xds_registry()
    hung_repository, repository = xds_repository(), xds_repository()
    gateway = await start_gateway(nursery, xds_vip(
        [hung_registry.port, registry.port], [hung_repository.port, repository.port],
        extra='mode = "failover"\nerror_limit = 10',
        health='health = { check = "tcp", interval = "1h" }'))
    hung_registry.mode = hung_repository.mode = "hang"
    base = f"http://127.0.0.1:{vip_port(gateway, 'xds')}"
    status, _, body = await curl(f"{base}/registry", ITI18_TYPE, FIXTURES / "iti18-find-documents.xml", scratch=tmp_path)
    assert status == 200 and soap.parse_registry_response(body).success  # ITI-18: next member
    write_mtom(tmp_path / "iti41.bin", 1)
    status, _, body = await curl(f"{base}/repository", MTOM_TYPE, tmp_path / "iti41.bin", scratch=tmp_path)
    assert status == 502  # ITI-41 already sent to the hung repository: not sent twice
    assert "may or may not have been applied" in soap.parse_registry_response(body).fault
    assert repository.requests == [] and hung_repository.requests == ["ITI-41"]


async def test_unroutable_action_is_a_sender_fault(nursery, xds_registry, tmp_path):
    registry = xds_registry()
    gateway = await start_gateway(nursery, xds_vip([registry.port], []))
    status, _, body = await curl(f"http://127.0.0.1:{vip_port(gateway, 'xds')}/registry",
                                 'application/soap+xml; action="urn:example:NotATransaction"',
                                 FIXTURES / "iti18-find-documents.xml", scratch=tmp_path)
    assert status == 400
    assert soap.parse_registry_response(body).fault.startswith("env:Sender")
    (tmp_path / "not-soap.txt").write_text("hello")
    status, _, body = await curl(f"http://127.0.0.1:{vip_port(gateway, 'xds')}/registry",
                                 "text/plain", tmp_path / "not-soap.txt", scratch=tmp_path)
    assert status == 400 and b"not XML" in body


def rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def test_memory_stays_bounded_relaying_200_mb(tmp_path, xds_registry, xds_repository):
    registry = xds_registry()
    repository = xds_repository(registry_url=f"{registry.url}registry")
    config = tmp_path / "xds.toml"
    config.write_text('[gateway]\nadmin = "127.0.0.1:0"\n' + xds_vip(
        [registry.port], [repository.port]))
    log = open(tmp_path / "gateway.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(config)],
                               stdout=log, stderr=log, start_new_session=True)
    try:
        port = logged_port((tmp_path / "gateway.log").read_text, "xds")
        sha = write_mtom(tmp_path / "iti41.bin", 200)
        before = rss_kib(process.pid, "VmRSS")
        result = subprocess.run(
            ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H",
             f"Content-Type: {MTOM_TYPE}", "--data-binary", f"@{tmp_path / 'iti41.bin'}",
             f"http://127.0.0.1:{port}/repository"], capture_output=True, text=True, timeout=300)
        peak = rss_kib(process.pid, "VmHWM")
        assert result.stdout == "200", result.stderr
        assert repository.documents[UNIQUE_ID].sha256 == sha
        growth_mb = (peak - before) / 1024
        print(f"\ngateway RSS before {before / 1024:.1f} MB, peak {peak / 1024:.1f} MB "
              f"during a 200 MB ITI-41: +{growth_mb:.1f} MB")
        assert growth_mb < 30
    finally:
        stop_process(process)


async def test_iti43_goes_to_the_repository_its_repository_unique_id_names(
        nursery, xds_registry, xds_repository, tmp_path):
    registry = xds_registry()
    ids = ("1.3.6.1.4.1.21367.2010.1.2.1125", "1.3.6.1.4.1.21367.2010.1.2.2000")
    repositories = [xds_repository(registry_url=f"{registry.url}registry",
                                   repository_unique_id=unique_id) for unique_id in ids]
    sha = write_mtom(tmp_path / "iti41.bin", 1)
    for repository in repositories:  # the same document in each, provided to it directly
        status, _, body = await curl(f"{repository.url}repository", MTOM_TYPE,
                                     tmp_path / "iti41.bin", scratch=tmp_path)
        assert status == 200 and soap.parse_registry_response(body).success, body[:300]
    text = xds_vip([registry.port], [r.port for r in repositories])
    for n, unique_id in enumerate(ids, 1):
        text = text.replace(f'name = "repository{n}"\n',
                            f'name = "repository{n}"\nrepository_unique_id = "{unique_id}"\n')
    gateway = await start_gateway(nursery, text)
    base = f"http://127.0.0.1:{vip_port(gateway, 'xds')}"
    request = (FIXTURES / "iti43-retrieve.xml").read_text()
    for rounds in range(3):
        for unique_id, repository in zip(ids, repositories):
            (tmp_path / "iti43.xml").write_text(request.replace(ids[0], unique_id))
            before = repository.requests.count("ITI-43")
            status, headers, _ = await curl(f"{base}/repository", PLAIN_TYPE, tmp_path / "iti43.xml",
                                            output=tmp_path / "retrieved.bin", scratch=tmp_path)
            assert status == 200 and repository.requests.count("ITI-43") == before + 1
            assert document_from_mtom(tmp_path / "retrieved.bin",
                                      response_content_type(headers)) == sha
    assert [r.requests.count("ITI-43") for r in repositories] == [3, 3]
    (tmp_path / "iti43.xml").write_text(request.replace(ids[0], "1.2.3.999"))
    status, _, body = await curl(f"{base}/repository", PLAIN_TYPE, tmp_path / "iti43.xml",
                                 scratch=tmp_path)
    fault = soap.parse_registry_response(body)
    assert status == 400 and "RepositoryUniqueId 1.2.3.999 names no repository member" in fault.describe()


async def test_a_zeep_consumer_finds_and_retrieves_through_the_vip(nursery, xds_registry,
                                                                    xds_repository, xds_consumer,
                                                                    tmp_path):
    """ITI-18 and ITI-43 from zeep (built from the project's WSDL, reading the MTOM answer
    itself): an independent SOAP client, against the XDS VIP."""
    registry = xds_registry()
    repository = xds_repository(registry_url=f"{registry.url}registry")
    gateway = await start_gateway(nursery, xds_vip([registry.port], [repository.port]))
    base = f"http://127.0.0.1:{vip_port(gateway, 'xds')}"
    sha = write_mtom(tmp_path / "iti41.bin", 1, edges=b"\r\n")
    status, _, _ = await curl(f"{base}/repository", MTOM_TYPE, tmp_path / "iti41.bin",
                              scratch=tmp_path)
    assert status == 200
    consumer = xds_consumer(base)
    found = await trio.to_thread.run_sync(consumer.find_documents, PATIENT)
    assert found.success and found.refs == [registry.entries[0].entry_uuid]
    assert (await trio.to_thread.run_sync(consumer.find_documents, "NOBODY^^^&1.2&ISO")).refs == []
    retrieved = await trio.to_thread.run_sync(consumer.retrieve,
                                              repository.repository_unique_id, UNIQUE_ID)
    assert retrieved.success and len(retrieved.documents) == 1
    document = retrieved.documents[0]
    assert (document.unique_id, document.mime_type) == (
        UNIQUE_ID, repository.documents[UNIQUE_ID].mime_type)
    assert hashlib.sha256(document.content).hexdigest() == sha
    missing = await trio.to_thread.run_sync(consumer.retrieve,
                                            repository.repository_unique_id, "1.2.3.404")
    assert not missing.success and missing.errors[0].startswith("XDSDocumentUniqueIdError")
    assert registry.requests.count("ITI-18") >= 2 and repository.requests.count("ITI-43") == 2
    # medgate's own reader agrees with zeep on that ITI-43 failure (its status is nested)
    answer = soap.parse_registry_response(registry_response(
        soap.STATUS_FAILURE, ("XDSDocumentUniqueIdError", "x"),
        root="xdsb:RetrieveDocumentSetResponse"))
    assert not answer.success and answer.errors[0].code == "XDSDocumentUniqueIdError"


def test_gateway_simulate_xds_consumer_as_a_process(xds_registry, xds_repository, tmp_path):
    registry = xds_registry()
    repository = xds_repository(registry_url=f"{registry.url}registry")
    # A document that begins and ends with CR LF: the one in 64 random documents that failed
    # here once, because zeep strips those bytes from a binary attachment.
    sha = write_mtom(tmp_path / "iti41.bin", 1, edges=b"\r\n")
    subprocess.run(["curl", "-sS", "-o", os.devnull, "-H", f"Content-Type: {MTOM_TYPE}",
                    "--data-binary", f"@{tmp_path / 'iti41.bin'}", f"{repository.url}repository"],
                   check=True, timeout=60)
    consumer = [sys.executable, "-m", "gateway", "simulate", "xds-consumer"]
    saved = tmp_path / "document.bin"
    # the registry and the repository are on different ports here: one at a time
    found = subprocess.run([*consumer, registry.url, "--patient", PATIENT],
                           capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    assert found.stdout.splitlines() == ["ITI-18 Success: 1 document(s)",
                                         f"  {registry.entries[0].entry_uuid}"]
    got = subprocess.run([*consumer, repository.url, "--retrieve", UNIQUE_ID, "--repository",
                          repository.repository_unique_id, "--save", str(saved)],
                         capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    assert got.stdout.startswith("ITI-43 Success: 1 document(s)")
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == sha
    missing = subprocess.run([*consumer, repository.url, "--retrieve", "1.2.3", "--repository",
                              repository.repository_unique_id], capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 1 and "error XDSDocumentUniqueIdError" in missing.stdout
    usage = subprocess.run([*consumer, registry.url], capture_output=True, text=True, timeout=60)
    assert usage.returncode == 3 and "give --patient" in usage.stderr


async def test_a_draining_gateway_closes_an_idle_client_at_once_and_bounds_a_stalled_one(
        xds_registry, caplog):
    """Draining: a client idle between requests (a keep-alive after its answer) is closed at
    once, not held until drain_timeout (60 s) and then cut; one that stalls in the middle of
    a request head is still bounded by header_timeout (1 s): the time limits' task outlives
    the connections' drain (gateway/net/deadlines.py)."""
    caplog.set_level("INFO", logger="medgate")
    registry = xds_registry()
    toml = '[gateway]\naudit = ""\ndrain_timeout = "60s"\n' + xds_vip(
        [registry.port], [], extra='header_timeout = "1s"',
        health='health = { check = "tcp", interval = "1h" }')
    async with trio.open_nursery() as nursery:
        gateway = await start_gateway(nursery, toml)
        idle = await trio.open_tcp_stream("127.0.0.1", vip_port(gateway, "xds"))
        client = h11.Connection(h11.CLIENT)
        await idle.send_all(posted(client, "/registry", ITI18_TYPE,
                                   (FIXTURES / "iti18-find-documents.xml").read_bytes()))
        head, _ = await answer(idle, client)
        assert head.status_code == 200
        stalled = await trio.open_tcp_stream("127.0.0.1", vip_port(gateway, "xds"))
        await stalled.send_all(b"POST /registry HTTP/1.1\r\nHost: x\r\n")  # and no more
        await eventually(lambda: len(gateway.admission.clients["xds"].slots) == 2,
                         what="both clients admitted")
        gateway.stop()  # draining
        assert await idle.receive_some(100) == b""
        assert await stalled.receive_some(100) == b""
        await idle.aclose()
        await stalled.aclose()
    assert re.search(r"idle for [0-9.]+s, closed: the gateway is draining", caplog.text)
    assert "request head not complete after 1s: closed" in caplog.text
    assert "drain timeout" not in caplog.text
