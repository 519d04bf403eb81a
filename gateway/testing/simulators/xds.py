"""Simulated IHE XDS.b actors over SOAP 1.2 / HTTP/1.1: a document registry, a repository and a
responder standing in for the other actors (imaging source, XCA gateway, PIX, PDQ).

Registry: ITI-18 FindDocuments (by patient ID) and ITI-42 Register Document Set-b; ITI-57, 61
and 62 are answered Success without changing anything.
Repository: ITI-41 Provide and Register (MTOM; documents streamed to disk, then registered with
`registry_url` by ITI-42) and ITI-43 Retrieve (MTOM response streamed from disk).

Failure modes for tests, switchable while running (`.mode`): "ok", "http500" (plain HTTP 500),
"fault" (HTTP 500 + SOAP Fault), "failure" (HTTP 200, ResponseStatusType Failure with an
XDSRegistryError / XDSRepositoryError), "hang" (read the request, never answer), "close"
(send half of the response, then close).
"""

from __future__ import annotations

import abc
import base64
import hashlib
import logging
import tempfile
import threading
import urllib.parse
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h11
import trio
from lxml import etree

from gateway.net import http
from gateway.config import parse_address
from gateway.testing.simulators.serving import TrioServer
from protocols import soap
from protocols.soap import NS

log = logging.getLogger("medgate.simulate.xds")

MODES = ("ok", "http500", "fault", "failure", "hang", "close")
PATIENT_ID_SCHEME = "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427"  # XDSDocumentEntry.patientId
UNIQUE_ID_SCHEME = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"  # XDSDocumentEntry.uniqueId
MAX_ENVELOPE = 4 * 1024 * 1024
CHUNK = 65536


@dataclass(frozen=True)
class DocumentEntry:
    entry_uuid: str
    unique_id: str
    patient_id: str
    mime_type: str = "application/octet-stream"


@dataclass(frozen=True)
class StoredDocument:
    unique_id: str
    path: Path
    size: int
    sha256: str
    mime_type: str


class _Request:
    """One request as a handler sees it: head, action and an async body reader."""

    def __init__(self, stream, connection, head: h11.Request, prefix: list[bytes]) -> None:
        self.stream, self.connection, self.head = stream, connection, head
        self.content_type = http.header(head.headers, b"content-type")
        self._prefix = prefix
        self._done = False

    async def chunks(self):
        for piece in self._prefix:
            yield piece
        self._prefix = []
        while not self._done:
            event = await http.next_event(self.stream, self.connection)
            if isinstance(event, h11.Data):
                yield event.data
            elif isinstance(event, h11.EndOfMessage):
                self._done = True
            else:
                raise http.PeerGone("client closed in the middle of its request")

    async def read(self, limit: int = MAX_ENVELOPE) -> bytes:
        body = bytearray()
        async for piece in self.chunks():
            body += piece
            if len(body) > limit:
                raise soap.SoapError(f"request body over {limit} bytes")
        return bytes(body)


@dataclass(frozen=True)
class _Response:
    status: int
    content_type: str
    body: bytes = b""
    stream_path: Path | None = None  # then body is the MTOM head and tail goes after the file
    tail: bytes = b""


@dataclass
class _XdsServer(TrioServer, abc.ABC):
    """What the registry and the repository share: HTTP serving, threads, failure modes."""

    name: str = "XDS"
    host: str = "127.0.0.1"
    port: int = 0
    mode: str = "ok"
    requests: list[str] = field(default_factory=list)  # transaction names, in arrival order
    forwarded_for: list[str] = field(default_factory=list)  # X-Forwarded-For of each request
    client_certs: list[str] = field(default_factory=list)  # X-Forwarded-Client-Cert of each
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    error_code = "XDSRegistryError"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}/"

    def describe(self) -> str:
        return f"XDS {type(self).__name__[3:].lower()} {self.name}"

    async def _handle(self, stream: trio.abc.Stream) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=http.MAX_HEAD)
        try:
            while True:
                event = await http.next_event(stream, connection)
                if not isinstance(event, h11.Request):
                    return
                if connection.they_are_waiting_for_100_continue:
                    await http.send(stream, connection, h11.InformationalResponse(
                        status_code=100, headers=[], reason=b"Continue"))
                if not await self._one(stream, connection, event):
                    return
                if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                    return
                connection.start_next_cycle()
        except (http.PeerGone, h11.ProtocolError, trio.BrokenResourceError):
            pass

    async def _one(self, stream, connection, head: h11.Request) -> bool:
        content_type = http.header(head.headers, b"content-type")
        action = soap.action_from_content_type(content_type) if content_type else None
        prefix: list[bytes] = []
        request = _Request(stream, connection, head, prefix)
        try:
            if action is None:
                peek = soap.ActionPeek(content_type or "application/soap+xml")
                async for piece in request.chunks():
                    prefix.append(piece)
                    if (action := peek.feed(piece)) is not None:
                        break
                request = _Request(stream, connection, head, prefix)
            with self._lock:
                self.requests.append(soap.transaction_name(action or "?"))
                self.forwarded_for.append(http.header(head.headers, b"x-forwarded-for"))
                self.client_certs.append(http.header(head.headers, b"x-forwarded-client-cert"))
            mode = self.mode
            if mode == "hang":
                await trio.sleep_forever()
            if mode in ("http500", "fault", "failure"):
                async for _ in request.chunks():
                    pass
                response = self._failure_response(mode)
            else:
                response = await self.transaction(action or "", request)
        except soap.SoapError as exc:
            response = _Response(400, soap.SOAP_CONTENT_TYPE,
                                 soap.build_fault("Sender", exc.reason))
        return await self._send(stream, connection, response, close_midway=self.mode == "close")

    def _failure_response(self, mode: str) -> _Response:
        if mode == "http500":
            return _Response(500, "text/plain", b"simulated internal error\n")
        if mode == "fault":
            return _Response(500, soap.SOAP_CONTENT_TYPE,
                             soap.build_fault("Receiver", f"{self.name}: simulated fault"))
        return _Response(200, soap.SOAP_CONTENT_TYPE, registry_response(
            soap.STATUS_FAILURE, error=(self.error_code, f"{self.name}: simulated failure")))

    async def _send(self, stream, connection, response: _Response, close_midway: bool) -> bool:
        headers = [("Content-Type", response.content_type)]
        if response.stream_path is None:
            headers.append(("Content-Length", str(len(response.body))))
        await http.send(stream, connection, h11.Response(status_code=response.status,
                                                         headers=headers))
        if close_midway:
            await http.send(stream, connection, h11.Data(data=response.body[:len(response.body) // 2]))
            return False
        await http.send(stream, connection, h11.Data(data=response.body))
        if response.stream_path is not None:
            async with await trio.open_file(response.stream_path, "rb") as file:
                while piece := await file.read(CHUNK):
                    await http.send(stream, connection, h11.Data(data=piece))
            await http.send(stream, connection, h11.Data(data=response.tail))
        await http.send(stream, connection, h11.EndOfMessage())
        return True

    @abc.abstractmethod
    async def transaction(self, action: str, request: _Request) -> _Response:
        """Answer one request whose SOAP action is `action` (SoapError: a 400 Fault)."""


def registry_response(status: str, error: tuple[str, str] | None = None,
                      refs: Sequence[str] = (), root: str = "rs:RegistryResponse") -> bytes:
    """A SOAP envelope with an ebRS RegistryResponse (or AdhocQueryResponse with ObjectRefs,
    or an ITI-43 RetrieveDocumentSetResponse with no document)."""
    env, rs, rim, query = NS["env"], NS["rs"], NS["rim"], NS["query"]
    envelope = etree.Element(f"{{{env}}}Envelope", nsmap={"env": env})
    body = etree.SubElement(envelope, f"{{{env}}}Body")
    prefix, local = root.split(":")
    nsmap = {"rs": rs, "rim": rim, "query": query, "xdsb": NS["xdsb"]}
    answer = etree.SubElement(body, f"{{{NS[prefix]}}}{local}", nsmap=nsmap)
    if root == "xdsb:RetrieveDocumentSetResponse":  # ITI-43: the status is in a RegistryResponse
        answer = etree.SubElement(answer, f"{{{rs}}}RegistryResponse")
    answer.set("status", status)
    if error is not None:
        errors = etree.SubElement(answer, f"{{{rs}}}RegistryErrorList")
        etree.SubElement(errors, f"{{{rs}}}RegistryError", errorCode=error[0],
                         codeContext=error[1],
                         severity="urn:oasis:names:tc:ebxml-regrep:ErrorSeverityType:Error")
    if root == "query:AdhocQueryResponse":
        objects = etree.SubElement(answer, f"{{{rim}}}RegistryObjectList")
        for ref in refs:
            etree.SubElement(objects, f"{{{rim}}}ObjectRef", id=ref)
    return etree.tostring(envelope, xml_declaration=True, encoding="UTF-8")


def _xml(data: bytes):
    parser = etree.XMLParser(resolve_entities=False, no_network=True)
    try:
        return etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise soap.SoapError(f"not XML: {exc}") from None


def document_entries(submit: etree._Element) -> dict[str, DocumentEntry]:
    """ExtrinsicObject id -> entry, from an lcm:SubmitObjectsRequest."""
    entries = {}
    for extrinsic in submit.iter(f"{{{NS['rim']}}}ExtrinsicObject"):
        values = {identifier.get("identificationScheme"): identifier.get("value", "")
                  for identifier in extrinsic.iter(f"{{{NS['rim']}}}ExternalIdentifier")}
        entries[extrinsic.get("id", "")] = DocumentEntry(
            extrinsic.get("id", ""), values.get(UNIQUE_ID_SCHEME, ""),
            values.get(PATIENT_ID_SCHEME, ""),
            extrinsic.get("mimeType") or DocumentEntry.mime_type)
    return entries


@dataclass
class XdsRegistry(_XdsServer):
    """Answers ITI-18 FindDocuments from what ITI-42 registered."""

    name: str = "REGISTRY"
    entries: list[DocumentEntry] = field(default_factory=list)
    error_code = "XDSRegistryError"

    def register(self, entry: DocumentEntry) -> None:
        with self._lock:
            self.entries.append(entry)

    async def transaction(self, action: str, request: _Request) -> _Response:
        root = _xml(await request.read())
        if action == soap.ITI18:
            patient = ""
            for slot in root.iter(f"{{{NS['rim']}}}Slot"):
                if slot.get("name") == "$XDSDocumentEntryPatientId":
                    patient = soap.slot_value(slot.findtext(f".//{{{NS['rim']}}}Value") or "")
            with self._lock:
                refs = [e.entry_uuid for e in self.entries if e.patient_id == patient]
            return _Response(200, soap.SOAP_CONTENT_TYPE, registry_response(
                soap.STATUS_SUCCESS, refs=refs, root="query:AdhocQueryResponse"))
        if action == soap.ITI42:
            for entry in document_entries(root).values():
                self.register(DocumentEntry(f"urn:uuid:{uuid.uuid4()}", entry.unique_id,
                                            entry.patient_id))
            return _Response(200, soap.SOAP_CONTENT_TYPE, registry_response(soap.STATUS_SUCCESS))
        if action in (soap.ITI57, soap.ITI61, soap.ITI62):  # metadata changes: taken as they come
            await request.read()
            return _Response(200, soap.SOAP_CONTENT_TYPE, registry_response(soap.STATUS_SUCCESS))
        raise soap.SoapError(f"the registry does not serve {action}")


@dataclass
class XdsResponder(_XdsServer):
    """Any other SOAP actor of an affinity domain, as far as the gateway's routing goes (an
    imaging document source, an XCA responding gateway, a PIX manager, a PDQ supplier): reads
    each request whole and answers RegistryResponse Success. `.routed` keeps, per request, the
    RepositoryUniqueIds and homeCommunityIds it named, in arrival order."""

    name: str = "RESPONDER"
    routed: list[tuple[str, ...]] = field(default_factory=list)
    error_code = "XDSRegistryError"

    async def transaction(self, action: str, request: _Request) -> _Response:
        envelope = soap.soap_envelope_of(await request.read(), request.content_type or "")
        named = (*soap.retrieve_repository_ids(envelope), *soap.home_community_ids(envelope))
        with self._lock:
            self.routed.append(tuple(name for name in named if name))
        return _Response(200, soap.SOAP_CONTENT_TYPE, registry_response(soap.STATUS_SUCCESS))


@dataclass
class XdsRepository(_XdsServer):
    """Stores ITI-41 documents on disk, registers them with `registry_url`, serves ITI-43."""

    name: str = "REPOSITORY"
    store_dir: Path | None = None
    registry_url: str = ""
    repository_unique_id: str = "1.3.6.1.4.1.21367.2010.1.2.1125"
    documents: dict[str, StoredDocument] = field(default_factory=dict)
    error_code = "XDSRepositoryError"

    def __post_init__(self) -> None:
        if self.store_dir is None:
            self.store_dir = Path(tempfile.mkdtemp(prefix="medgate-repository-"))
        self.store_dir.mkdir(parents=True, exist_ok=True)

    async def transaction(self, action: str, request: _Request) -> _Response:
        if action == soap.ITI41:
            return await self._provide_and_register(request)
        if action == soap.ITI43:
            return await self._retrieve(_xml(await request.read()))
        raise soap.SoapError(f"the repository does not serve {action}")

    async def _provide_and_register(self, request: _Request) -> _Response:
        media, params = soap.content_type_params(request.content_type)
        envelope = bytearray()
        attachments: dict[str, tuple[Path, int, str]] = {}
        store_dir = self.store_dir
        assert store_dir is not None  # start() made it
        if media.startswith("multipart/"):
            reader = soap.MultipartReader(params.get("boundary", ""))
            part = -1
            file = None
            hasher = hashlib.sha256()
            size = 0
            async for piece in request.chunks():
                reader.feed(piece)
                while (event := reader.next_event()) is not None:
                    if isinstance(event, soap.PartStart):
                        part += 1
                        if part > 0:
                            cid = urllib.parse.unquote(event.content_id)
                            path = store_dir / f"incoming-{uuid.uuid4().hex}"
                            file, hasher, size = await trio.open_file(path, "wb"), hashlib.sha256(), 0
                            attachments[cid] = (path, 0, "")
                    elif isinstance(event, soap.PartData):
                        if part == 0:
                            envelope += event.data
                            if len(envelope) > MAX_ENVELOPE:
                                raise soap.SoapError("the SOAP envelope part is too large")
                        elif file is not None:
                            await file.write(event.data)
                            hasher.update(event.data)
                            size += len(event.data)
                    elif isinstance(event, soap.PartEnd) and file is not None:
                        await file.aclose()
                        attachments[cid] = (path, size, hasher.hexdigest())
                        file = None
        else:
            envelope += await request.read()
        root = _xml(bytes(envelope))
        entries = document_entries(root)
        for document in root.iter(f"{{{NS['xdsb']}}}Document"):
            entry = entries.get(document.get("id", ""))
            if entry is None or not entry.unique_id:
                raise soap.SoapError(f"document {document.get('id')!r} has no metadata uniqueId")
            include = document.find(f"{{{NS['xop']}}}Include")
            target = store_dir / hashlib.sha256(entry.unique_id.encode()).hexdigest()
            if include is not None:
                cid = urllib.parse.unquote(include.get("href", "").removeprefix("cid:"))
                if cid not in attachments:
                    raise soap.SoapError(f"no MIME part with Content-ID {cid}")
                path, size, digest = attachments.pop(cid)
                await trio.Path(path).rename(target)
            else:
                data = base64.b64decode(document.text or "")
                await trio.Path(target).write_bytes(data)
                size, digest = len(data), hashlib.sha256(data).hexdigest()
            with self._lock:
                self.documents[entry.unique_id] = StoredDocument(entry.unique_id, target, size,
                                                                 digest, entry.mime_type)
        submit = root.find(f".//{{{NS['lcm']}}}SubmitObjectsRequest")
        if self.registry_url and submit is not None:
            failure = await self._register(submit)
            if failure:
                return _Response(200, soap.SOAP_CONTENT_TYPE, registry_response(
                    soap.STATUS_FAILURE, error=("XDSRepositoryError", failure)))
        return _Response(200, soap.SOAP_CONTENT_TYPE, registry_response(soap.STATUS_SUCCESS))

    async def _register(self, submit: etree._Element) -> str:
        """ITI-42 to the registry; '' on success, else why not."""
        env = NS["env"]
        envelope = etree.Element(f"{{{env}}}Envelope", nsmap={"env": env, "wsa": NS["wsa"]})
        header = etree.SubElement(envelope, f"{{{env}}}Header")
        etree.SubElement(header, f"{{{NS['wsa']}}}Action").text = soap.ITI42
        etree.SubElement(envelope, f"{{{env}}}Body").append(submit)
        body = etree.tostring(envelope, xml_declaration=True, encoding="UTF-8")
        url = urllib.parse.urlsplit(self.registry_url)
        address = parse_address(url.netloc)
        try:
            stream = await trio.open_tcp_stream(address.host, address.port)
        except OSError as exc:
            return f"registry {self.registry_url} unreachable: {exc}"
        try:
            reply = await http.request(stream, "POST", url.path or "/", url.netloc,
                                       [("Content-Type", f'application/soap+xml; charset=UTF-8; '
                                                         f'action="{soap.ITI42}"')], body)
            answer = soap.parse_registry_response(reply.body)
        except (http.PeerGone, soap.SoapError, h11.ProtocolError) as exc:
            return f"registry {self.registry_url}: {exc}"
        finally:
            await trio.aclose_forcefully(stream)
        return "" if answer.success else f"registry said {answer.describe()}"

    async def _retrieve(self, root) -> _Response:
        wanted = [r.findtext(f"{{{NS['xdsb']}}}DocumentUniqueId") or ""
                  for r in root.iter(f"{{{NS['xdsb']}}}DocumentRequest")]
        with self._lock:
            found = [self.documents[u] for u in wanted if u in self.documents]
        if len(found) != len(wanted) or len(found) != 1:
            return _Response(200, soap.SOAP_CONTENT_TYPE, registry_response(
                soap.STATUS_FAILURE, error=("XDSDocumentUniqueIdError",
                                            f"unknown or not exactly one document: {wanted}"),
                root="xdsb:RetrieveDocumentSetResponse"))
        document = found[0]
        boundary = f"MIMEBoundary_{uuid.uuid4().hex}"
        env, xdsb, rs = NS["env"], NS["xdsb"], NS["rs"]
        envelope = etree.Element(f"{{{env}}}Envelope", nsmap={"env": env})
        response = etree.SubElement(etree.SubElement(envelope, f"{{{env}}}Body"),
                                    f"{{{xdsb}}}RetrieveDocumentSetResponse",
                                    nsmap={"xdsb": xdsb, "rs": rs, "xop": NS["xop"]})
        etree.SubElement(response, f"{{{rs}}}RegistryResponse", status=soap.STATUS_SUCCESS)
        item = etree.SubElement(response, f"{{{xdsb}}}DocumentResponse")
        etree.SubElement(item, f"{{{xdsb}}}RepositoryUniqueId").text = self.repository_unique_id
        etree.SubElement(item, f"{{{xdsb}}}DocumentUniqueId").text = document.unique_id
        etree.SubElement(item, f"{{{xdsb}}}mimeType").text = document.mime_type
        etree.SubElement(etree.SubElement(item, f"{{{xdsb}}}Document"), f"{{{NS['xop']}}}Include",
                         href="cid:document1%40medgate")
        xml = etree.tostring(envelope, xml_declaration=True, encoding="UTF-8")
        head = (f"--{boundary}\r\nContent-Type: application/xop+xml; charset=UTF-8; "
                f"type=\"application/soap+xml\"\r\nContent-Transfer-Encoding: binary\r\n"
                f"Content-ID: <root.message@medgate>\r\n\r\n").encode() + xml + (
                f"\r\n--{boundary}\r\nContent-Type: {document.mime_type}\r\n"
                f"Content-Transfer-Encoding: binary\r\nContent-ID: <document1@medgate>\r\n\r\n"
                ).encode()
        content_type = (f'multipart/related; type="application/xop+xml"; boundary="{boundary}"; '
                        f'start="<root.message@medgate>"; start-info="application/soap+xml"; '
                        f'action="urn:ihe:iti:2007:RetrieveDocumentSetResponse"')
        return _Response(200, content_type, head, stream_path=document.path,
                         tail=f"\r\n--{boundary}--\r\n".encode())
