"""A simulated IHE XDS.b Document Consumer, built with zeep from the project's own WSDL
(`wsdl/xds-consumer.wsdl`): ITI-18 Registry Stored Query (FindDocuments) and ITI-43 Retrieve
Document Set, SOAP 1.2 with WS-Addressing.

An independent SOAP client for the XDS VIP: none of medgate's SOAP code builds or reads what it
sends. zeep is synchronous (requests underneath): under trio call it with trio.to_thread. It
reads ITI-43's MTOM/XOP answer itself, except the documents' bytes: zeep strips CR and LF bytes
from both ends of a `binary` MIME part (zeep.wsdl.attachments.Attachment.content, zeep 4.3),
which changes about one random document in 64, so those are taken from the HTTP response with
requests-toolbelt's multipart decoder. ITI-41 (an MTOM upload) is built by `xds_provide`, not
by zeep, which sends attachments only as SwA, not MTOM, and posted with requests; its answer is
read here with lxml.
"""

from __future__ import annotations

import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WSDL = Path(__file__).parent / "wsdl" / "xds-consumer.wsdl"
BINDINGS = "{urn:medgate:xds-consumer}"
FIND_DOCUMENTS = "urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d"  # ITI TF-2a 3.18.4.1.2.3.7.1
APPROVED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Approved"
SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
XDSB = "urn:ihe:iti:xds-b:2007"
XOP = "http://www.w3.org/2004/08/xop/include"
RS = "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"
ENV = "http://www.w3.org/2003/05/soap-envelope"


class ConsumerError(Exception):
    """The transaction got no ebRS answer (SOAP Fault, HTTP error, no connection): `reason`."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Found:
    """An ITI-18 answer: its status, the entries' ids (ObjectRef), the registry's errors."""

    status: str
    refs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return self.status == SUCCESS


@dataclass(frozen=True)
class Document:
    unique_id: str
    repository_unique_id: str
    mime_type: str
    content: bytes


@dataclass(frozen=True)
class Retrieved:
    """An ITI-43 answer: its status, the documents, the repository's errors."""

    status: str
    documents: list[Document] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return self.status == SUCCESS


@dataclass(frozen=True)
class Provided:
    """An ITI-41 answer: its status, the document's uniqueId, the repository's errors."""

    status: str
    unique_id: str
    errors: list[str] = field(default_factory=list)

    @property
    def success(self) -> bool:
        return self.status == SUCCESS


class XdsConsumer:
    """ITI-18 to `registry_url`, ITI-43 to `repository_url` (both may be the XDS VIP)."""

    def __init__(self, registry_url: str, repository_url: str, timeout: float = 30.0) -> None:
        from zeep import Client, Settings, Transport
        from zeep.wsa import WsAddressingPlugin

        class RecordingTransport(Transport):
            """zeep's transport, keeping each thread's last HTTP response."""

            def post_xml(self, address: str, envelope: Any, headers: Any) -> Any:
                response = super().post_xml(address, envelope, headers)
                last.response = response
                return response

        self.repository_url, self.timeout = repository_url, timeout
        last = self._last = threading.local()
        transport = RecordingTransport(timeout=timeout, operation_timeout=timeout)
        self.client = Client(str(WSDL), transport=transport, plugins=[WsAddressingPlugin()],
                             settings=Settings(strict=False, xml_huge_tree=False))
        self.registry = self.client.create_service(
            f"{BINDINGS}DocumentRegistry_Binding_Soap12", registry_url)
        self.repository = self.client.create_service(
            f"{BINDINGS}DocumentRepository_Binding_Soap12", repository_url)

    def find_documents(self, patient_id: str) -> Found:
        """FindDocuments for `patient_id` (CX, e.g. `P1^^^&1.2.3&ISO`), approved entries, as
        ObjectRefs."""
        slots = [{"name": "$XDSDocumentEntryPatientId", "ValueList": {"Value": [f"'{patient_id}'"]}},
                 {"name": "$XDSDocumentEntryStatus", "ValueList": {"Value": [f"('{APPROVED}')"]}}]
        answer = self._call(self.registry.RegistryStoredQuery,
                            ResponseOption={"returnType": "ObjectRef",
                                            "returnComposedObjects": True},
                            AdhocQuery={"id": FIND_DOCUMENTS, "Slot": slots})
        refs = []
        objects = answer.RegistryObjectList
        for item in (objects._value_1 if objects is not None else None) or []:
            ref = getattr(item, "id", None) if not hasattr(item, "get") else item.get("id")
            if ref:
                refs.append(ref)
        return Found(answer.status, refs, _errors(answer.RegistryErrorList))

    def retrieve(self, repository_unique_id: str, document_unique_id: str) -> Retrieved:
        """One document by its repository and unique id."""
        answer = self._call(self.repository.RetrieveDocumentSet, DocumentRequest=[{
            "RepositoryUniqueId": repository_unique_id, "DocumentUniqueId": document_unique_id}])
        exact = _attached_documents(self._last.response)
        documents = [Document(item.DocumentUniqueId, item.RepositoryUniqueId, item.mimeType,
                              exact.get(item.DocumentUniqueId, item.Document or b""))
                     for item in answer.DocumentResponse or []]
        response = answer.RegistryResponse
        return Retrieved(response.status, documents, _errors(response.RegistryErrorList))

    def provide(self, document: bytes, mime_type: str, patient_id: str) -> Provided:
        """ITI-41 of one document for `patient_id`, MTOM, to the repository."""
        import requests

        from gateway.testing.simulators.xds_provide import provide_request

        request = provide_request(document, mime_type, patient_id)
        try:
            response = requests.post(self.repository_url, data=request.body, timeout=self.timeout,
                                     headers={"Content-Type": request.content_type})
        except requests.RequestException as exc:
            raise ConsumerError(f"{type(exc).__name__}: {exc}") from None
        status, errors = _registry_response(response)
        return Provided(status, request.unique_id, errors)

    @staticmethod
    def _call(operation, **request):
        from requests import RequestException
        from zeep.exceptions import Error as ZeepError
        from zeep.exceptions import Fault

        try:
            return operation(**request)
        except Fault as fault:
            raise ConsumerError(f"SOAP Fault: {fault.message}") from None
        except (ZeepError, RequestException) as exc:
            raise ConsumerError(f"{type(exc).__name__}: {exc}") from None


def _attached_documents(response: Any) -> dict[str, bytes]:
    """Each MTOM-attached document of an ITI-43 answer, by its DocumentUniqueId, exactly as the
    response carries it (a document inline in base64 is left to zeep)."""
    from lxml import etree
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    content_type = response.headers.get("Content-Type", "")
    if not content_type.lower().startswith("multipart/"):
        return {}
    parts = MultipartDecoder(response.content, content_type).parts
    by_content_id = {part.headers.get(b"Content-ID", b"").decode("latin-1").strip().strip("<>"):
                     part.content for part in parts}
    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
    root = etree.fromstring(parts[0].content, parser)
    exact = {}
    for item in root.iter(f"{{{XDSB}}}DocumentResponse"):
        include = item.find(f"{{{XDSB}}}Document/{{{XOP}}}Include")
        if include is None:
            continue
        content_id = urllib.parse.unquote(include.get("href", "").removeprefix("cid:"))
        if content_id in by_content_id:
            exact[item.findtext(f"{{{XDSB}}}DocumentUniqueId") or ""] = by_content_id[content_id]
    return exact


def _registry_response(response: Any) -> tuple[str, list[str]]:
    """The status and errors of an ebRS RegistryResponse answer, plain or MTOM; ConsumerError
    for a SOAP Fault or anything else."""
    from lxml import etree
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    content_type = response.headers.get("Content-Type", "")
    body = response.content
    if content_type.lower().startswith("multipart/"):
        body = MultipartDecoder(body, content_type).parts[0].content
    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
    try:
        root = etree.fromstring(body, parser)
    except etree.XMLSyntaxError:
        raise ConsumerError(f"HTTP {response.status_code}: not a SOAP answer") from None
    answer = next(root.iter(f"{{{RS}}}RegistryResponse"), None)
    if answer is None:
        fault = root.findtext(f".//{{{ENV}}}Reason/{{{ENV}}}Text") or "no RegistryResponse"
        raise ConsumerError(f"HTTP {response.status_code}: SOAP Fault: {fault}")
    errors = [f"{error.get('errorCode')}: {error.get('codeContext') or ''}".rstrip(": ")
              for error in answer.iter(f"{{{RS}}}RegistryError")]
    return answer.get("status", ""), errors


def _errors(error_list) -> list[str]:
    if error_list is None:
        return []
    return [f"{error.errorCode}: {error.codeContext or ''}".rstrip(": ")
            for error in error_list.RegistryError or []]
