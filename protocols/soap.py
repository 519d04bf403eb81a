"""SOAP 1.2 / IHE XDS.b pieces, sans-IO: action peek, MTOM multipart reader, Fault and ITI-18 builders.

Rule: bytes in, values or bytes out. No sockets, no trio, no clocks. XML is read and written
with lxml, never with regular expressions. Every reader is bounded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import StrEnum

from lxml import etree

# Actions (wsa:Action, or the Content-Type's action parameter) of the SOAP transactions an XDS
# affinity domain sends: ITI TF-2a/2b §3.18, 3.38, 3.39, 3.41-3.47; ITI TF-3 / the XDS Metadata
# Update and On-Demand Documents supplements for ITI-57, 61, 62; RAD TF-3 §4.69 for RAD-69.
ITI18 = "urn:ihe:iti:2007:RegistryStoredQuery"
ITI41 = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"  # RAD-68 uses it too
ITI42 = "urn:ihe:iti:2007:RegisterDocumentSet-b"
ITI43 = "urn:ihe:iti:2007:RetrieveDocumentSet"
ITI38 = "urn:ihe:iti:2007:CrossGatewayQuery"
ITI39 = "urn:ihe:iti:2007:CrossGatewayRetrieve"
ITI57 = "urn:ihe:iti:2010:UpdateDocumentSet"
ITI61 = "urn:ihe:iti:2010:RegisterOnDemandDocumentEntry"
ITI62 = "urn:ihe:iti:2010:DeleteDocumentSet"
RAD69 = "urn:ihe:rad:2009:RetrieveImagingDocumentSet"
ITI44_ADD = "urn:hl7-org:v3:PRPA_IN201301UV02"
ITI44_REVISE = "urn:hl7-org:v3:PRPA_IN201302UV02"
ITI44_MERGE = "urn:hl7-org:v3:PRPA_IN201304UV02"
ITI45 = "urn:hl7-org:v3:PRPA_IN201309UV02"
ITI47 = "urn:hl7-org:v3:PRPA_IN201305UV02"
ITI47_CONTINUE = "urn:hl7-org:v3:QUQI_IN000003UV01_Continue"
ITI47_CANCEL = "urn:hl7-org:v3:QUQI_IN000003UV01_Cancel"


class RouteBy(StrEnum):
    """Which of a transaction's own identifiers names the member that must take it."""

    ANY = "any"  # any member of its role
    REPOSITORY = "repository"  # the RepositoryUniqueId of its DocumentRequests
    COMMUNITY = "community"  # its homeCommunityId (AdhocQuery/@home, DocumentRequest)


@dataclass(frozen=True)
class Transaction:
    """What the gateway must know of a SOAP transaction to route it."""

    name: str  # as the technical frameworks write it: "ITI-18"
    role: str  # the member role that serves it (gateway.config.Role's values)
    query: bool  # changes nothing where it is served, so it may be sent to another member
    route_by: RouteBy = RouteBy.ANY


TRANSACTIONS: dict[str, Transaction] = {
    ITI18: Transaction("ITI-18", "registry", True),
    ITI42: Transaction("ITI-42", "registry", False),
    ITI57: Transaction("ITI-57", "registry", False),
    ITI61: Transaction("ITI-61", "registry", False),
    ITI62: Transaction("ITI-62", "registry", False),
    ITI41: Transaction("ITI-41", "repository", False),
    ITI43: Transaction("ITI-43", "repository", True, RouteBy.REPOSITORY),
    RAD69: Transaction("RAD-69", "imaging-source", True, RouteBy.REPOSITORY),
    ITI38: Transaction("ITI-38", "gateway", True, RouteBy.COMMUNITY),
    ITI39: Transaction("ITI-39", "gateway", True, RouteBy.COMMUNITY),
    ITI44_ADD: Transaction("ITI-44", "pix", False),
    ITI44_REVISE: Transaction("ITI-44", "pix", False),
    ITI44_MERGE: Transaction("ITI-44", "pix", False),
    ITI45: Transaction("ITI-45", "pix", True),
    ITI47: Transaction("ITI-47", "pdq", True),
    ITI47_CONTINUE: Transaction("ITI-47", "pdq", True),
    ITI47_CANCEL: Transaction("ITI-47", "pdq", True),
}


def transaction_name(action: str) -> str:
    """The transaction's name for logs and records; the action itself when it is not known."""
    known = TRANSACTIONS.get(action)
    return known.name if known else (action or "-")


NS = {
    "env": "http://www.w3.org/2003/05/soap-envelope",
    "wsa": "http://www.w3.org/2005/08/addressing",
    "xdsb": "urn:ihe:iti:xds-b:2007",
    "query": "urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0",
    "rim": "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0",
    "rs": "urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0",
    "lcm": "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0",
    "xop": "http://www.w3.org/2004/08/xop/include",
}
STATUS_SUCCESS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"
STATUS_FAILURE = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Failure"
STATUS_PARTIAL = "urn:ihe:iti:2007:ResponseStatusType:PartialSuccess"
STATUS_PARTIAL_OASIS = "urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:PartialSuccess"
FIND_DOCUMENTS = "urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d"
APPROVED = "urn:oasis:names:tc:ebxml-regrep:StatusType:Approved"
FAULT_ACTION = "http://www.w3.org/2005/08/addressing/soap/fault"
SOAP_CONTENT_TYPE = "application/soap+xml; charset=utf-8"


class SoapError(Exception):
    """A request the gateway cannot route; `reason` says why (answered with env:Sender)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ---------------------------------------------------------------------------- content type

_PARAMETER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an RFC 9110 token


def content_type_params(value: str) -> tuple[str, dict[str, str]]:
    """('multipart/related', {'boundary': ..., 'action': ...}) from a Content-Type value.

    RFC 9110 §8.3.1 syntax: token or quoted-string values, names compared lower-case, the first
    of a repeated name wins. RFC 2231 forms (`name*=`, `name*0=`) are refused with SoapError,
    not skipped: an action or boundary the gateway did not read must not route a request.
    """
    media, semicolon, rest = value.partition(";")
    params: dict[str, str] = {}
    position, size = 0, len(rest)
    while position < size:
        while position < size and rest[position] in " \t;":
            position += 1
        if position >= size:
            break
        equals = rest.find("=", position)
        name = rest[position:equals if equals >= 0 else size].strip().lower()
        if equals < 0 or ";" in name or not _PARAMETER_NAME.fullmatch(name):
            raise SoapError("malformed Content-Type parameter (expected name=value)")
        if "*" in name:
            raise SoapError(f"Content-Type parameter {name[:40]}: RFC 2231 encoded or continued "
                            "parameters are not supported")
        position = equals + 1
        while position < size and rest[position] in " \t":
            position += 1
        if position < size and rest[position] == '"':
            text, position = _quoted_string(rest, position)
        else:
            end = rest.find(";", position)
            end = size if end < 0 else end
            text, position = rest[position:end].strip(), end
        params.setdefault(name, text)
    return media.strip().lower(), params


_QUOTED_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_QUOTED_PAIR = re.compile(r"\\(.)", re.DOTALL)


def _quoted_string(text: str, position: int) -> tuple[str, int]:
    """The value of the quoted-string at `position` and where it ends (RFC 9110 §5.6.4)."""
    match = _QUOTED_STRING.match(text, position)
    if match is None:
        raise SoapError("unterminated quoted string in a Content-Type parameter")
    return _QUOTED_PAIR.sub(r"\1", match.group(1)), match.end()


def action_from_content_type(value: str) -> str | None:
    """The SOAP action named in a Content-Type, wherever clients put it (see protocols.md §3.4)."""
    media, params = content_type_params(value)
    if params.get("action"):
        return params["action"]
    for inner in ("start-info", "type"):
        if inner in params and "action" in params[inner]:
            _, inner_params = content_type_params(params[inner])
            if inner_params.get("action"):
                return inner_params["action"]
    return None


# ---------------------------------------------------------------------------- multipart (MTOM)

@dataclass(frozen=True)
class PartStart:
    headers: dict[str, str]  # lower-case names

    @property
    def content_id(self) -> str:
        return self.headers.get("content-id", "").strip().strip("<>")


@dataclass(frozen=True)
class PartData:
    data: bytes


@dataclass(frozen=True)
class PartEnd:
    pass


class MultipartReader:
    """Streams a multipart/related body: `feed(bytes)` then `next_event()` until None.

    Part bodies come out as PartData pieces as soon as they cannot be the start of the next
    boundary, so memory stays at about one chunk plus the boundary length. Part headers are
    bounded by `max_header_bytes`.
    """

    def __init__(self, boundary: str, max_header_bytes: int = 16384) -> None:
        # RFC 2046 §5.1.1: 1 to 70 characters (bytes of the header, hence latin-1).
        try:
            encoded = boundary.encode("latin-1")
        except UnicodeEncodeError:
            raise SoapError("the multipart boundary is not plain text") from None
        if not 0 < len(encoded) <= 70:
            raise SoapError("the multipart boundary must be 1 to 70 characters")
        self._delimiter = b"\r\n--" + encoded
        self._buffer = bytearray(b"\r\n")  # so the first boundary matches the same pattern
        self._state = "preamble"  # preamble | after-boundary | headers | body | done
        self.max_header_bytes = max_header_bytes

    def feed(self, data: bytes | bytearray) -> None:
        if self._state != "done":  # the epilogue is ignored
            self._buffer += data

    def next_event(self) -> PartStart | PartData | PartEnd | None:
        while True:
            if self._state == "preamble":
                index = self._buffer.find(self._delimiter)
                if index == -1:
                    del self._buffer[:max(0, len(self._buffer) - len(self._delimiter) + 1)]
                    return None
                del self._buffer[:index + len(self._delimiter)]
                self._state = "after-boundary"
            elif self._state == "after-boundary":
                if len(self._buffer) < 2:
                    return None
                if self._buffer[:2] == b"--":
                    self._state = "done"
                    self._buffer.clear()
                    return None
                line_end = self._buffer.find(b"\r\n")  # transport padding may come first
                if line_end == -1:
                    if len(self._buffer) > 1024:
                        raise SoapError("garbage after a MIME boundary")
                    return None
                del self._buffer[:line_end + 2]
                self._state = "headers"
            elif self._state == "headers":
                if self._buffer[:2] == b"\r\n":
                    end, skip = 0, 2  # a part without headers
                else:
                    end, skip = self._buffer.find(b"\r\n\r\n"), 4
                if end == -1:
                    if len(self._buffer) > self.max_header_bytes:
                        raise SoapError(f"MIME part headers over {self.max_header_bytes} bytes")
                    return None
                raw = bytes(self._buffer[:end]).decode("latin-1")
                del self._buffer[:end + skip]
                headers = {}
                for line in raw.split("\r\n"):
                    name, sep, value = line.partition(":")
                    if sep:
                        headers[name.strip().lower()] = value.strip()
                self._state = "body"
                return PartStart(headers)
            elif self._state == "body":
                index = self._buffer.find(self._delimiter)
                if index == 0:
                    del self._buffer[:len(self._delimiter)]
                    self._state = "after-boundary"
                    return PartEnd()
                if index == -1:
                    index = len(self._buffer) - len(self._delimiter) + 1
                    if index <= 0:
                        return None
                data = bytes(self._buffer[:index])
                del self._buffer[:index]
                return PartData(data)
            else:
                return None


# ---------------------------------------------------------------------------- action peek

class ActionPeek:
    """Finds wsa:Action in the first bytes of a SOAP body (plain or MTOM), reading at most `limit`.

    `feed(bytes)` returns the action once it is known, else None; raises SoapError when the
    envelope has no action within the limit or is not XML.
    """

    def __init__(self, content_type: str, limit: int = 65536) -> None:
        media, params = content_type_params(content_type)
        self.limit = limit
        self.seen = 0
        self.action: str | None = None
        self._parser = etree.XMLPullParser(events=("end",), resolve_entities=False,
                                           no_network=True, huge_tree=False)
        self._multipart = None
        if media.startswith("multipart/"):
            if not params.get("boundary"):
                raise SoapError("multipart request without a boundary")
            self._multipart = MultipartReader(params["boundary"])
            self._in_root = False

    def feed(self, data: bytes) -> str | None:
        if self.action is not None:
            return self.action
        self.seen += len(data)
        if self._multipart is None:
            action = self._parse(data)
        else:
            action = None
            self._multipart.feed(data)
            while action is None and (event := self._multipart.next_event()) is not None:
                if isinstance(event, PartStart):
                    self._in_root = True
                elif isinstance(event, PartData) and self._in_root:
                    action = self._parse(event.data)
                elif isinstance(event, PartEnd):
                    raise SoapError("the root part of the MTOM request has no wsa:Action")
        if action is None and self.seen > self.limit:
            raise SoapError(f"no wsa:Action in the first {self.limit} bytes of the request")
        self.action = action
        return action

    def _parse(self, data: bytes) -> str | None:
        try:
            self._parser.feed(bytes(data))  # h11 hands out bytearrays
            for _, element in self._parser.read_events():
                tag = element.tag
                if tag == f"{{{NS['wsa']}}}Action":
                    return (element.text or "").strip()
                if tag in (f"{{{NS['env']}}}Header", f"{{{NS['env']}}}Body"):
                    raise SoapError("the SOAP header has no wsa:Action")
        except etree.XMLSyntaxError as exc:
            raise SoapError(f"the request body is not XML: {exc}") from None
        return None


# ---------------------------------------------------------------------------- builders

def build_fault(code: str, reason: str, *, subcode: str = "", node: str = "",
                relates_to: str = "") -> bytes:
    """A SOAP 1.2 Fault envelope (Part 1 §5.4): code 'Receiver' (try again later) or 'Sender'."""
    env, wsa = NS["env"], NS["wsa"]
    envelope = etree.Element(f"{{{env}}}Envelope", nsmap={"env": env, "wsa": wsa})
    header = etree.SubElement(envelope, f"{{{env}}}Header")
    etree.SubElement(header, f"{{{wsa}}}Action").text = FAULT_ACTION
    if relates_to:
        etree.SubElement(header, f"{{{wsa}}}RelatesTo").text = relates_to
    fault = etree.SubElement(etree.SubElement(envelope, f"{{{env}}}Body"), f"{{{env}}}Fault")
    code_element = etree.SubElement(fault, f"{{{env}}}Code")
    etree.SubElement(code_element, f"{{{env}}}Value").text = f"env:{code}"
    if subcode:
        sub = etree.SubElement(etree.SubElement(code_element, f"{{{env}}}Subcode"),
                               f"{{{env}}}Value", nsmap={"gw": "urn:medgate"})
        sub.text = f"gw:{subcode}"
    text = etree.SubElement(etree.SubElement(fault, f"{{{env}}}Reason"), f"{{{env}}}Text")
    text.set("{http://www.w3.org/XML/1998/namespace}lang", "en")
    text.text = reason
    if node:
        etree.SubElement(fault, f"{{{env}}}Node").text = node
    encoded: bytes = etree.tostring(envelope, xml_declaration=True, encoding="UTF-8")
    return encoded


def build_find_documents(patient_id: str, message_id: str, to: str = "") -> bytes:
    """An ITI-18 Registry Stored Query, FindDocuments for one patient (approved documents)."""
    env, wsa, query, rim = NS["env"], NS["wsa"], NS["query"], NS["rim"]
    envelope = etree.Element(f"{{{env}}}Envelope", nsmap={"env": env, "wsa": wsa})
    header = etree.SubElement(envelope, f"{{{env}}}Header")
    action = etree.SubElement(header, f"{{{wsa}}}Action")
    action.set(f"{{{env}}}mustUnderstand", "1")
    action.text = ITI18
    etree.SubElement(header, f"{{{wsa}}}MessageID").text = message_id
    if to:
        etree.SubElement(header, f"{{{wsa}}}To").text = to
    reply = etree.SubElement(header, f"{{{wsa}}}ReplyTo")
    etree.SubElement(reply, f"{{{wsa}}}Address").text = (
        "http://www.w3.org/2005/08/addressing/anonymous")
    body = etree.SubElement(envelope, f"{{{env}}}Body")
    request = etree.SubElement(body, f"{{{query}}}AdhocQueryRequest",
                               nsmap={"query": query, "rim": rim})
    option = etree.SubElement(request, f"{{{query}}}ResponseOption")
    option.set("returnType", "ObjectRef")
    option.set("returnComposedObjects", "true")
    adhoc = etree.SubElement(request, f"{{{rim}}}AdhocQuery", id=FIND_DOCUMENTS)
    for name, value in (("$XDSDocumentEntryPatientId", f"'{patient_id}'"),
                        ("$XDSDocumentEntryStatus", f"('{APPROVED}')")):
        slot = etree.SubElement(adhoc, f"{{{rim}}}Slot", name=name)
        etree.SubElement(etree.SubElement(slot, f"{{{rim}}}ValueList"),
                         f"{{{rim}}}Value").text = value
    encoded: bytes = etree.tostring(envelope, xml_declaration=True, encoding="UTF-8")
    return encoded


# ---------------------------------------------------------------------------- responses

@dataclass(frozen=True)
class RegistryError:
    code: str
    context: str
    severity: str


@dataclass(frozen=True)
class RegistryResponse:
    """What an ITI-18/41/42 answer says: status URN, errors, and the object references found."""

    status: str
    errors: tuple[RegistryError, ...] = ()
    object_refs: tuple[str, ...] = field(default=())
    fault: str = ""  # "env:Receiver: reason" when the answer was a SOAP Fault
    documents: tuple[str, ...] = field(default=())  # ids of the ExtrinsicObjects (LeafClass)

    @property
    def entries(self) -> tuple[str, ...]:
        """The ids of what a query found, whichever way it was asked to return them."""
        return self.object_refs + self.documents

    @property
    def success(self) -> bool:
        return self.status == STATUS_SUCCESS

    @property
    def partial(self) -> bool:
        return self.status in (STATUS_PARTIAL, STATUS_PARTIAL_OASIS)

    def describe(self) -> str:
        if self.fault:
            return f"SOAP Fault {self.fault}"
        status = self.status.rsplit(":", 1)[-1] or "no status"
        if not self.errors:
            return status
        first = self.errors[0]
        more = f" (+{len(self.errors) - 1} more)" if len(self.errors) > 1 else ""
        return f"{status}: {first.code}: {first.context}{more}"


def parse_registry_response(envelope: bytes) -> RegistryResponse:
    """Read a SOAP 1.2 envelope holding a registry response or a Fault; SoapError if neither."""
    root = _root_xml(envelope)
    fault = root.find(f".//{{{NS['env']}}}Fault")
    if fault is not None:
        code = fault.findtext(f"{{{NS['env']}}}Code/{{{NS['env']}}}Value", default="").strip()
        reason = fault.findtext(f"{{{NS['env']}}}Reason/{{{NS['env']}}}Text", default="").strip()
        return RegistryResponse("", fault=f"{code}: {reason}")
    body = root.find(f"{{{NS['env']}}}Body")
    answer = body[0] if body is not None and len(body) else None
    if answer is not None and answer.tag == f"{{{NS['xdsb']}}}RetrieveDocumentSetResponse":
        answer = answer.find(f"{{{NS['rs']}}}RegistryResponse")  # ITI-43: its status is inside
    if answer is None or answer.get("status") is None:
        raise SoapError("the answer has no registry response status")
    errors = tuple(RegistryError(e.get("errorCode", ""), e.get("codeContext", ""),
                                 e.get("severity", ""))
                   for e in answer.iter(f"{{{NS['rs']}}}RegistryError"))
    refs = tuple(r.get("id", "") for r in answer.iter(f"{{{NS['rim']}}}ObjectRef"))
    documents = tuple(d.get("id", "") for d in answer.iter(f"{{{NS['rim']}}}ExtrinsicObject"))
    return RegistryResponse(answer.get("status", ""), errors, refs, documents=documents)


def message_id(envelope: bytes) -> str:
    """A request's wsa:MessageID ("" when it has none, or is not SOAP XML, e.g. MTOM)."""
    try:
        root = _root_xml(envelope)
    except SoapError:
        return ""
    return (root.findtext(f".//{{{NS['wsa']}}}MessageID") or "").strip()


def retrieve_repository_ids(envelope: bytes) -> list[str]:
    """The RepositoryUniqueId of each DocumentRequest of an ITI-43, ITI-39 or RAD-69 request
    (RAD-69 nests them in StudyRequest and SeriesRequest), in order."""
    root = _root_xml(envelope)
    return [(request.findtext(f"{{{NS['xdsb']}}}RepositoryUniqueId") or "").strip()
            for request in root.iter(f"{{{NS['xdsb']}}}DocumentRequest")]


def home_community_ids(envelope: bytes) -> list[str]:
    """The homeCommunityId of an ITI-38 (the AdhocQuery's `home` attribute) or ITI-39 request
    (each DocumentRequest's HomeCommunityId), in order; "" where one is missing."""
    root = _root_xml(envelope)
    return ([(query.get("home") or "").strip() for query in root.iter(f"{{{NS['rim']}}}AdhocQuery")]
            + [(request.findtext(f"{{{NS['xdsb']}}}HomeCommunityId") or "").strip()
               for request in root.iter(f"{{{NS['xdsb']}}}DocumentRequest")])


def routing_ids(envelope: bytes, route_by: RouteBy) -> list[str]:
    """The identifiers of `envelope` that `route_by` routes on."""
    if route_by == RouteBy.REPOSITORY:
        return retrieve_repository_ids(envelope)
    if route_by == RouteBy.COMMUNITY:
        return home_community_ids(envelope)
    return []


def _root_xml(data: bytes) -> etree._Element:
    parser = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False)
    try:
        return etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise SoapError(f"not XML: {exc}") from None


def soap_envelope_of(body: bytes, content_type: str) -> bytes:
    """The SOAP envelope of a whole (small) response body, plain or MTOM."""
    media, params = content_type_params(content_type)
    if not media.startswith("multipart/"):
        return body
    reader = MultipartReader(params.get("boundary", ""))
    reader.feed(body)
    root = bytearray()
    started = False
    while (event := reader.next_event()) is not None:
        if isinstance(event, PartStart):
            if started:
                break
            started = True
        elif isinstance(event, PartData):
            root += event.data
        elif isinstance(event, PartEnd):
            break
    return bytes(root)


_QUOTED = re.compile(r"^'(.*)'$")


def slot_value(text: str) -> str:
    """'value' -> value (stored-query slot values are SQL-style quoted)."""
    match = _QUOTED.match(text.strip())
    return match.group(1) if match else text.strip()
