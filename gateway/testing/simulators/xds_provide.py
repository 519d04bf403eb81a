"""ITI-41 Provide and Register Document Set-b as a Document Source sends it (ITI TF-2b §3.41):
one document with the metadata a registry checks (ITI TF-3 §4.2.3: a submission set, a document
entry and their association, with the classification and identifier schemes of ITI TF-3
§4.2.5), in an MTOM/XOP package (the document a MIME part the envelope includes).

The codes (class, type, format, facility, practice setting, confidentiality, content type) are
the IHE Connectathon's examples: enough for a simulated repository or one that checks the
metadata's form; an affinity domain with its own code sets needs its own. Built here, not with
zeep, which sends attachments as SwA and not as MTOM.
"""

from __future__ import annotations

import datetime
import uuid
from dataclasses import dataclass
from xml.sax.saxutils import escape, quoteattr

ACTION = "urn:ihe:iti:2007:ProvideAndRegisterDocumentSet-b"
SOURCE_ID = "1.3.6.1.4.1.21367.2017.2.6.1"  # the submission set's sourceId: medgate's simulator
_EXAMPLE_SCHEME = "1.3.6.1.4.1.21367.100.1"  # Connectathon example codes


@dataclass(frozen=True)
class ProvideRequest:
    content_type: str  # multipart/related with the action, as the request's Content-Type
    body: bytes
    unique_id: str  # the document's XDSDocumentEntry.uniqueId


def provide_request(document: bytes, mime_type: str, patient_id: str,
                    unique_id: str | None = None,
                    now: datetime.datetime | None = None) -> ProvideRequest:
    """An ITI-41 of `document` for `patient_id` (CX: `ID^^^&OID&ISO`)."""
    unique_id = unique_id or f"2.25.{uuid.uuid4().int}"
    set_id = f"2.25.{uuid.uuid4().int}"
    stamp = (now or datetime.datetime.now(datetime.timezone.utc)).strftime("%Y%m%d%H%M%S")
    envelope = _ENVELOPE.format(
        patient_text=escape(patient_id), mime_type=quoteattr(mime_type), now=stamp, action=ACTION,
        message_id=uuid.uuid4(), set_class_id=uuid.uuid4(), association_id=uuid.uuid4(),
        document_ids=_identifier(_PATIENT_ID, patient_id, "XDSDocumentEntry.patientId",
                                 "Document01")
        + _identifier(_UNIQUE_ID, unique_id, "XDSDocumentEntry.uniqueId", "Document01"),
        set_ids=_identifier(_SET_UNIQUE_ID, set_id, "XDSSubmissionSet.uniqueId", "SubmissionSet01")
        + _identifier(_SOURCE_ID, SOURCE_ID, "XDSSubmissionSet.sourceId", "SubmissionSet01")
        + _identifier(_SET_PATIENT_ID, patient_id, "XDSSubmissionSet.patientId",
                      "SubmissionSet01"),
        classifications="".join(_code(scheme, code, name, "Document01")
                                for scheme, code, name in _DOCUMENT_CODES),
        content_type_code=_code(_CONTENT_TYPE_CODE, "Imaging", "Imaging", "SubmissionSet01"))
    boundary = f"MIMEBoundary_{uuid.uuid4().hex}"
    body = (f"--{boundary}\r\nContent-Type: application/xop+xml; charset=UTF-8; "
            f"type=\"application/soap+xml\"\r\nContent-Transfer-Encoding: binary\r\n"
            f"Content-ID: <root.message@medgate>\r\n\r\n").encode() + envelope.encode() + (
            f"\r\n--{boundary}\r\nContent-Type: {mime_type}\r\nContent-Transfer-Encoding: "
            f"binary\r\nContent-ID: <doc1@medgate>\r\n\r\n").encode() + document + (
            f"\r\n--{boundary}--\r\n").encode()
    content_type = (f'multipart/related; type="application/xop+xml"; boundary="{boundary}"; '
                    f'start="<root.message@medgate>"; start-info="application/soap+xml"; '
                    f'action="{ACTION}"')
    return ProvideRequest(content_type, body, unique_id)


def _code(scheme: str, code: str, name: str, target: str) -> str:
    return (f'<rim:Classification classificationScheme="{scheme}" classifiedObject="{target}" '
            f'nodeRepresentation={quoteattr(code)} id="urn:uuid:{uuid.uuid4()}">'
            f'<rim:Slot name="codingScheme"><rim:ValueList><rim:Value>{_EXAMPLE_SCHEME}'
            f'</rim:Value></rim:ValueList></rim:Slot><rim:Name><rim:LocalizedString '
            f'value={quoteattr(name)}/></rim:Name></rim:Classification>')


def _identifier(scheme: str, value: str, name: str, target: str) -> str:
    return (f'<rim:ExternalIdentifier identificationScheme="{scheme}" value={quoteattr(value)} '
            f'id="urn:uuid:{uuid.uuid4()}" registryObject="{target}"><rim:Name>'
            f'<rim:LocalizedString value="{name}"/></rim:Name></rim:ExternalIdentifier>')


# Identification schemes (ITI TF-3 §4.2.5.1 and 4.2.5.3)
_PATIENT_ID = "urn:uuid:58a6f841-87b3-4a3e-92fd-a8ffeff98427"
_UNIQUE_ID = "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"
_SET_UNIQUE_ID = "urn:uuid:96fdda7c-d067-4183-912e-bf5ee74998a8"
_SOURCE_ID = "urn:uuid:554ac39e-e3fe-47fe-b233-965d2a147832"
_SET_PATIENT_ID = "urn:uuid:6b5aea1a-874d-4603-a4bc-96a0a7b38446"
_CONTENT_TYPE_CODE = "urn:uuid:aa543740-bdda-424e-8c96-df4873be8500"
_DOCUMENT_CODES = (  # (classification scheme, code, display name) of a document entry
    ("urn:uuid:41a5887f-8865-4c09-adf7-e362475b143a", "REPORTS", "Reports"),  # classCode
    ("urn:uuid:f4f85eac-e6cb-4883-b524-f2705394840f", "N", "Normal"),  # confidentialityCode
    ("urn:uuid:a09d5840-386c-46f2-b5ad-9c3699a4309d", "urn:ihe:iti:xds:2017:mimeTypeSufficient",
     "mimeType Sufficient"),  # formatCode
    ("urn:uuid:f33fb8ac-18af-42cc-ae0e-ed0b0bdb91e1", "Hospital Setting",
     "Hospital Setting"),  # healthcareFacilityTypeCode
    ("urn:uuid:cccf5598-8b07-4b77-a05e-ae952c785ead", "Radiology", "Radiology"),  # practiceSetting
    ("urn:uuid:f0306f51-975f-434e-a61c-c59651d33983", "18748-4",
     "Diagnostic imaging study"),  # typeCode (LOINC)
)

_ENVELOPE = """<?xml version="1.0" encoding="UTF-8"?>
<env:Envelope xmlns:env="http://www.w3.org/2003/05/soap-envelope"
 xmlns:wsa="http://www.w3.org/2005/08/addressing"><env:Header>
<wsa:Action env:mustUnderstand="1">{action}</wsa:Action>
<wsa:MessageID>urn:uuid:{message_id}</wsa:MessageID></env:Header><env:Body>
<xdsb:ProvideAndRegisterDocumentSetRequest xmlns:xdsb="urn:ihe:iti:xds-b:2007">
<lcm:SubmitObjectsRequest xmlns:lcm="urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0">
<rim:RegistryObjectList xmlns:rim="urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0">
<rim:ExtrinsicObject id="Document01" mimeType={mime_type}
 objectType="urn:uuid:7edca82f-054d-47f2-a032-9b2a5b5186c1">
<rim:Slot name="creationTime"><rim:ValueList><rim:Value>{now}</rim:Value></rim:ValueList></rim:Slot>
<rim:Slot name="languageCode"><rim:ValueList><rim:Value>en-US</rim:Value></rim:ValueList></rim:Slot>
<rim:Slot name="sourcePatientId"><rim:ValueList><rim:Value>{patient_text}</rim:Value></rim:ValueList></rim:Slot>
<rim:Name><rim:LocalizedString value="medgate simulated document"/></rim:Name>
{classifications}
{document_ids}
</rim:ExtrinsicObject>
<rim:RegistryPackage id="SubmissionSet01">
<rim:Slot name="submissionTime"><rim:ValueList><rim:Value>{now}</rim:Value></rim:ValueList></rim:Slot>
<rim:Name><rim:LocalizedString value="medgate simulated submission"/></rim:Name>
{content_type_code}
{set_ids}
</rim:RegistryPackage>
<rim:Classification classifiedObject="SubmissionSet01" id="urn:uuid:{set_class_id}"
 classificationNode="urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd"/>
<rim:Association associationType="urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember"
 sourceObject="SubmissionSet01" targetObject="Document01" id="urn:uuid:{association_id}">
<rim:Slot name="SubmissionSetStatus"><rim:ValueList><rim:Value>Original</rim:Value></rim:ValueList></rim:Slot>
</rim:Association>
</rim:RegistryObjectList></lcm:SubmitObjectsRequest>
<xdsb:Document id="Document01"><xop:Include xmlns:xop="http://www.w3.org/2004/08/xop/include"
 href="cid:doc1%40medgate"/></xdsb:Document>
</xdsb:ProvideAndRegisterDocumentSetRequest></env:Body></env:Envelope>"""
