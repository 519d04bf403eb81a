"""Every XDS transaction of an affinity domain has a route: the role that serves it, the member
its own identifier names, and the retry rule of a query or a write. curl is the client."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.config import Address, ConfigError, HealthConfig, Role, parse_config
from gateway.vips.xds_routes import XdsRoutes
from health.checks import Target, run_check
from protocols import soap
from tests.helpers import start_gateway, vip_port
from tests.test_xds_vip import curl

RIM, QUERY, XDSB = soap.NS["rim"], soap.NS["query"], soap.NS["xdsb"]
IMAGING_IDS = ("1.3.6.1.4.1.21367.13.80.110", "1.3.6.1.4.1.21367.13.80.220")
COMMUNITIES = ("urn:oid:1.3.6.1.4.1.21367.13.70.1", "urn:oid:1.3.6.1.4.1.21367.13.70.2")
PLAIN_TYPE = "application/soap+xml; charset=UTF-8"  # no action: the gateway reads wsa:Action


def envelope(action: str, body: str) -> str:
    return (f'<env:Envelope xmlns:env="{soap.NS["env"]}" xmlns:wsa="{soap.NS["wsa"]}">'
            f'<env:Header><wsa:Action env:mustUnderstand="1">{action}</wsa:Action>'
            f'<wsa:MessageID>urn:uuid:1</wsa:MessageID></env:Header><env:Body>{body}</env:Body>'
            f'</env:Envelope>')


def rad69(repository: str) -> str:
    """RAD-69 (RAD TF-3 4.69): its DocumentRequests nested in a study and a series."""
    return envelope(soap.RAD69, (
        f'<iherad:RetrieveImagingDocumentSetRequest xmlns:iherad="urn:ihe:rad:xdsi-b:2009" '
        f'xmlns:ihe="{XDSB}"><iherad:StudyRequest studyInstanceUID="1.2.3">'
        f'<iherad:SeriesRequest seriesInstanceUID="1.2.3.4"><ihe:DocumentRequest>'
        f'<ihe:RepositoryUniqueId>{repository}</ihe:RepositoryUniqueId>'
        f'<ihe:DocumentUniqueId>1.2.3.4.5</ihe:DocumentUniqueId></ihe:DocumentRequest>'
        f'</iherad:SeriesRequest></iherad:StudyRequest><iherad:TransferSyntaxUIDList>'
        f'<iherad:TransferSyntaxUID>1.2.840.10008.1.2.1</iherad:TransferSyntaxUID>'
        f'</iherad:TransferSyntaxUIDList></iherad:RetrieveImagingDocumentSetRequest>'))


def iti38(home: str | None) -> str:
    """ITI-38: the community is the AdhocQuery's `home` attribute (ITI TF-2b 3.38.4.1.2)."""
    attribute = f' home="{home}"' if home else ""
    return envelope(soap.ITI38, (
        f'<query:AdhocQueryRequest xmlns:query="{QUERY}" xmlns:rim="{RIM}">'
        f'<query:ResponseOption returnType="ObjectRef" returnComposedObjects="true"/>'
        f'<rim:AdhocQuery id="{soap.FIND_DOCUMENTS}"{attribute}/></query:AdhocQueryRequest>'))


def iti39(*homes: str) -> str:
    requests = "".join(
        f'<xdsb:DocumentRequest><xdsb:HomeCommunityId>{home}</xdsb:HomeCommunityId>'
        f'<xdsb:RepositoryUniqueId>1.3.6.1.4.1.21367.2010.1.2.1125</xdsb:RepositoryUniqueId>'
        f'<xdsb:DocumentUniqueId>1.2.3.{n}</xdsb:DocumentUniqueId></xdsb:DocumentRequest>'
        for n, home in enumerate(homes))
    return envelope(soap.ITI39, f'<xdsb:RetrieveDocumentSetRequest xmlns:xdsb="{XDSB}">'
                                f'{requests}</xdsb:RetrieveDocumentSetRequest>')


def other(action: str) -> str:
    """A request whose body the gateway does not read (HL7 v3, metadata updates)."""
    return envelope(action, '<v3:Message xmlns:v3="urn:hl7-org:v3"/>')


def member(name: str, port: int, role: str, extra: str = "") -> str:
    return (f'\n[[vip.member]]\nname = "{name}"\naddress = "127.0.0.1:{port}"\n'
            f'role = "{role}"\n{extra}')


def vip(members: str, extra: str = "") -> str:
    return ('[[vip]]\nname = "xds"\nprotocol = "xds"\nlisten = "127.0.0.1:0"\n'
            'connect_timeout = "1s"\nack_timeout = "2s"\n'
            f'health = {{ check = "tcp", interval = "1h" }}\n{extra}\n{members}')


async def post(base: str, text: str, tmp_path: Path, action: str = "") -> tuple[int, bytes]:
    """POST `text`; with `action`, named in the Content-Type, else left to wsa:Action."""
    path = tmp_path / "request.xml"
    path.write_text(text)
    content_type = f'{PLAIN_TYPE}; action="{action}"' if action else PLAIN_TYPE
    status, _, body = await curl(f"{base}/xds", content_type, path, scratch=tmp_path)
    return status, body


async def test_each_transaction_reaches_the_member_of_its_role(nursery, xds_registry,
                                                              xds_responder, tmp_path):
    registry = xds_registry()
    imaging = [xds_responder(name=f"IMG{n}") for n in (1, 2)]
    gateways = [xds_responder(name=f"GW{n}") for n in (1, 2)]
    pix, pdq = xds_responder(name="PIX"), xds_responder(name="PDQ")
    members = (member("registry1", registry.port, "registry")
               + "".join(member(f"imaging{n}", s.port, "imaging-source",
                                f'repository_unique_id = "{IMAGING_IDS[n]}"')
                         for n, s in enumerate(imaging))
               + "".join(member(f"xca{n}", s.port, "gateway",
                                f'home_community_id = "{COMMUNITIES[n]}"')
                         for n, s in enumerate(gateways))
               + member("pix1", pix.port, "pix") + member("pdq1", pdq.port, "pdq"))
    gateway = await start_gateway(nursery, vip(members, (
        'default_role = "registry"\n'
        f'actions = {{ "urn:example:ping" = "pix", "{soap.ITI44_ADD}" = "registry" }}')))
    base = f"http://127.0.0.1:{vip_port(gateway, 'xds')}"

    for action in (soap.ITI57, soap.ITI61, soap.ITI62):
        assert (await post(base, other(action), tmp_path, action))[0] == 200
    assert registry.requests == ["ITI-57", "ITI-61", "ITI-62"]
    for repository, source in zip(reversed(IMAGING_IDS), reversed(imaging)):
        assert (await post(base, rad69(repository), tmp_path))[0] == 200
        assert source.requests == ["RAD-69"] and source.routed == [(repository,)]
    assert (await post(base, iti38(COMMUNITIES[1]), tmp_path))[0] == 200
    assert (await post(base, iti39(COMMUNITIES[0], COMMUNITIES[0]), tmp_path))[0] == 200
    assert gateways[1].requests == ["ITI-38"] and gateways[0].requests == ["ITI-39"]
    for action in (soap.ITI44_REVISE, soap.ITI45, "urn:example:ping"):
        assert (await post(base, other(action), tmp_path))[0] == 200
    assert pix.requests == ["ITI-44", "ITI-45", "urn:example:ping"]
    for action in (soap.ITI47, soap.ITI47_CONTINUE):
        assert (await post(base, other(action), tmp_path))[0] == 200
    assert pdq.requests == ["ITI-47", "ITI-47"]
    # `actions` overrides a known route (ITI-44's feed to the registry); `default_role` takes
    # what has none (the simulated registry refuses it: the member's answer is relayed).
    await post(base, other(soap.ITI44_ADD), tmp_path)
    status, _ = await post(base, other("urn:example:unknown"), tmp_path)
    assert status == 400 and registry.requests[3:] == ["ITI-44", "urn:example:unknown"]

    status, body = await post(base, iti38("urn:oid:1.2.3.999"), tmp_path)
    assert status == 400 and "homeCommunityId urn:oid:1.2.3.999 names no gateway member" \
        in soap.parse_registry_response(body).fault
    status, body = await post(base, iti39(*COMMUNITIES), tmp_path)
    assert status == 400 and "send one request per homeCommunityId" \
        in soap.parse_registry_response(body).fault
    status, body = await post(base, iti38(None), tmp_path)
    assert status == 400 and "ITI-38 request without a homeCommunityId" \
        in soap.parse_registry_response(body).fault
    assert [len(g.requests) for g in gateways] == [1, 1]


async def test_queries_go_to_the_next_member_writes_and_unknown_actions_do_not(
        nursery, xds_responder, tmp_path):
    hung_xca, xca = xds_responder(name="HUNG-XCA"), xds_responder(name="XCA")
    hung_pix, pix = xds_responder(name="HUNG-PIX"), xds_responder(name="PIX")
    gateway = await start_gateway(nursery, vip(
        member("xca1", hung_xca.port, "gateway") + member("xca2", xca.port, "gateway")
        + member("pix1", hung_pix.port, "pix") + member("pix2", pix.port, "pix"),
        'mode = "failover"\nerror_limit = 10\ndefault_role = "pix"'))
    hung_xca.mode = hung_pix.mode = "hang"
    base = f"http://127.0.0.1:{vip_port(gateway, 'xds')}"
    assert (await post(base, iti38(None), tmp_path))[0] == 200  # no ids set: any gateway
    assert hung_xca.requests == ["ITI-38"] and xca.requests == ["ITI-38"]
    assert (await post(base, other(soap.ITI45), tmp_path))[0] == 200  # a query: next member
    for write in (soap.ITI44_ADD, "urn:example:feed"):
        status, body = await post(base, other(write), tmp_path)
        assert status == 502 and "may or may not have been applied" \
            in soap.parse_registry_response(body).fault
    assert hung_pix.requests == ["ITI-45", "ITI-44", "urn:example:feed"]
    assert pix.requests == ["ITI-45"]


def config_of(members: str, extra: str = ""):
    return parse_config(vip(members, extra)).vip("xds")


def test_routes_of_a_config():
    config = config_of(member("reg", 1, "registry") + member("all", 2, "both")
                       + member("img", 3, "imaging-source") + member("pdq", 4, "pdq"),
                       'actions = { "urn:example:a" = "pdq", "urn:ihe:iti:2007:CrossGatewayQuery"'
                       ' = "registry" }')
    routes = XdsRoutes(config)
    assert routes.route(soap.ITI18).members == ("reg", "all") and routes.route(soap.ITI18).query
    assert routes.route(soap.ITI41).members == ("all",) and not routes.route(soap.ITI41).query
    assert routes.route(soap.RAD69).members == ("img",)
    assert routes.route(soap.RAD69).route_by == soap.RouteBy.REPOSITORY
    # overridden: still a query, routed by its community among the registry's members
    assert routes.route(soap.ITI38).members == ("reg", "all") and routes.route(soap.ITI38).query
    assert routes.route("urn:example:a").members == ("pdq",)
    assert not routes.route("urn:example:a").query
    assert routes.route(soap.ITI45).members == ()  # no PIX member: a Sender fault
    # no default_role: what has no route goes only to the all-in-one server, as in 0.2
    assert routes.route("urn:example:b").members == ("all",)
    assert XdsRoutes(config_of(member("reg", 1, "registry"), 'default_role = "registry"')) \
        .route("urn:example:b").members == ("reg",)


def test_every_role_a_transaction_names_is_a_config_role():
    assert {t.role for t in soap.TRANSACTIONS.values()} <= {str(role) for role in Role}


@pytest.mark.parametrize("members, extra, message", [
    (member("reg", 1, "registry"), 'actions = { "urn:x" = "pix" }',
     "actions: role 'pix' is served by no member"),
    (member("reg", 1, "registry"), 'default_role = "gateway"',
     "default_role: role 'gateway' is served by no member"),
    (member("all", 1, "both"), 'default_role = "both"', "default_role: 'both' is not one of"),
    (member("all", 1, "both"), 'actions = { "urn:x y" = "registry" }', "is not a SOAP action"),
    (member("all", 1, "both"), 'actions = "registry"', "actions: must be a table"),
    (member("img", 1, "pix", 'home_community_id = "urn:oid:1.2.3"'), "",
     "home_community_id: only for role 'gateway' (this member is 'pix')"),
    (member("xca", 1, "gateway", 'home_community_id = "1.2.3"'), "",
     "home_community_id: '1.2.3' is not a homeCommunityId"),
    (member("xca", 1, "gateway", 'repository_unique_id = "1.2.3"'), "",
     "repository_unique_id: only for role 'repository' or 'both' or 'imaging-source'"),
])
def test_route_keys_are_checked(members, extra, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_of(members, extra)


def test_route_keys_are_for_xds_vips_only():
    with pytest.raises(ConfigError, match=r"default_role: only for protocol xds"):
        parse_config('[[vip]]\nname = "h"\nprotocol = "hl7"\nlisten = "127.0.0.1:0"\n'
                     'default_role = "registry"\n[[vip.member]]\nname = "r"\n'
                     'address = "127.0.0.1:1"\n')


def test_routing_ids_are_read_from_the_request():
    assert soap.routing_ids(rad69("1.2.3").encode(), soap.RouteBy.REPOSITORY) == ["1.2.3"]
    assert soap.routing_ids(iti38("urn:oid:1.2").encode(), soap.RouteBy.COMMUNITY) == ["urn:oid:1.2"]
    assert soap.routing_ids(iti38(None).encode(), soap.RouteBy.COMMUNITY) == [""]
    assert soap.routing_ids(iti39("urn:oid:1", "urn:oid:2").encode(),
                            soap.RouteBy.COMMUNITY) == ["urn:oid:1", "urn:oid:2"]
    assert soap.routing_ids(iti39("urn:oid:1").encode(), soap.RouteBy.ANY) == []


@given(st.binary(max_size=2000))
def test_routing_ids_of_any_bytes_are_ids_or_a_soap_error(data):
    for route_by in soap.RouteBy:
        try:
            ids = soap.routing_ids(data, route_by)
        except soap.SoapError:
            continue
        assert all(isinstance(found, str) for found in ids)


@pytest.mark.parametrize("role, up", [("gateway", True), ("pix", True), ("pdq", True),
                                      ("imaging-source", True), ("repository", True),
                                      ("registry", False), ("both", False)])
async def test_the_xds_check_asks_only_registries_a_registry_question(xds_repository, role, up):
    """A server that serves no ITI-18 answers it with a Sender fault: a pass for the roles that
    have no stored query, a failure for those that must answer one."""
    server = xds_repository()
    health = HealthConfig("xds-query", path="/", patient_id="P^^^&1.2&ISO", timeout=5.0)
    outcome = await run_check(Target(Address("127.0.0.1", server.port), "", role), health)
    assert outcome.ok is up, outcome.detail
    if up:
        assert f"SOAP stack answers ({role}: ITI-18 not asked of it)" in outcome.detail
