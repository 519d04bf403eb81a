"""The configuration's frozen, typed model, and the values each key may take."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import StrEnum

from gateway.logs import LogFormat, LogLevel


class Choice(StrEnum):
    """One of a key's fixed values; its repr is the value's, as the config file writes it."""

    def __repr__(self) -> str:
        return repr(self.value)


class Protocol(Choice):
    """What a VIP speaks."""

    DICOM = "dicom"
    HL7 = "hl7"
    XDS = "xds"
    TCP = "tcp"


class Mode(Choice):
    BALANCE = "balance"  # every member takes clients, by `algorithm`
    FAILOVER = "failover"  # the first member able to takes them all


class Algorithm(Choice):
    ROUNDROBIN = "roundrobin"  # smooth weighted round robin
    LEASTCONN = "leastconn"  # fewest connections for its weight


class Check(Choice):
    """The health checks; each speaks the protocols CHECK_PROTOCOLS gives it."""

    TCP = "tcp"
    HTTP = "http"
    DICOM_ECHO = "dicom-echo"
    DICOM_FIND = "dicom-find"
    HL7_ACK = "hl7-ack"
    XDS_QUERY = "xds-query"


class PersistenceKey(Choice):
    """What ties a client to its member (PERSISTENCE_KEYS: which each protocol reads)."""

    SOURCE_IP = "source-ip"
    CALLING_AE = "calling-ae"
    MSH_4 = "msh-4"
    PID_3 = "pid-3"
    NONE = "none"  # hl7: turns the default (pid-3) off


class PersistenceMethod(Choice):
    TABLE = "table"  # remembered picks, each for `timeout`
    HASH = "hash"  # rendezvous hashing: the same pick in every process, nothing remembered


class Role(Choice):
    """xds: what a member serves (protocols.soap.TRANSACTIONS says which role takes which
    transaction)."""

    REGISTRY = "registry"
    REPOSITORY = "repository"
    BOTH = "both"  # a registry and its repository in one server
    IMAGING_SOURCE = "imaging-source"  # XDS-I imaging document source (RAD-69)
    GATEWAY = "gateway"  # XCA responding gateway (ITI-38, ITI-39)
    PIX = "pix"  # PIX manager (ITI-44, ITI-45)
    PDQ = "pdq"  # patient demographics supplier (ITI-47)

    def serves(self, wanted: Role | None) -> bool:
        """Whether a member of this role takes what goes to `wanted` (None: an action with no
        route, which only an all-in-one server is sent, as before actions had routes)."""
        if self is Role.BOTH:
            return wanted in (None, Role.REGISTRY, Role.REPOSITORY)
        return self is wanted


class NakCode(Choice):
    """HL7 MSA-1 codes that say no (original and enhanced acknowledgment mode)."""

    AR = "AR"
    AE = "AE"
    CE = "CE"
    CR = "CR"


class Validation(Choice):
    NONE = "none"
    STRUCTURE = "structure"  # hl7apy checks each message's structure first


class AdminRole(Choice):
    READ = "read"  # may look
    OPERATE = "operate"  # may also change members and reload


class GroupSearch(Choice):
    """How admin_ldap finds that a user is in a group."""

    MEMBER = "member"  # groups list their members (member, uniqueMember); nested ones followed
    IN_CHAIN = "in-chain"  # Active Directory's LDAP_MATCHING_RULE_IN_CHAIN, one query


class VerifyClient(Choice):
    NONE = "none"
    OPTIONAL = "optional"
    REQUIRED = "required"


class TlsVersion(Choice):
    """The oldest TLS a connection may use (BCP 195: nothing older than 1.2)."""

    V1_2 = "1.2"
    V1_3 = "1.3"


class AtnaTransport(Choice):
    TLS = "tls"  # syslog over TLS (RFC 5425, port 6514)
    UDP = "udp"  # syslog over UDP (RFC 5426, port 514)


# The protocols each check can speak to, and the health keys only some checks read.
CHECK_PROTOCOLS: dict[Check, tuple[Protocol, ...]] = {
    Check.TCP: tuple(Protocol), Check.HTTP: (Protocol.XDS, Protocol.TCP),
    Check.DICOM_ECHO: (Protocol.DICOM,), Check.DICOM_FIND: (Protocol.DICOM,),
    Check.HL7_ACK: (Protocol.HL7,), Check.XDS_QUERY: (Protocol.XDS,)}
CHECK_KEYS: dict[str, tuple[Check, ...]] = {
    "path": (Check.HTTP, Check.XDS_QUERY), "expect": (Check.HTTP,),
    "tls": (Check.HTTP, Check.XDS_QUERY), "calling_ae": (Check.DICOM_ECHO, Check.DICOM_FIND),
    "message": (Check.HL7_ACK,), "patient_id": (Check.XDS_QUERY, Check.DICOM_FIND),
    "partial_success": (Check.XDS_QUERY,), "accept_reject": (Check.HL7_ACK,),
    "skip_when_live": (Check.HL7_ACK,)}
PERSISTENCE_KEYS: dict[Protocol, tuple[PersistenceKey, ...]] = {
    Protocol.TCP: (PersistenceKey.SOURCE_IP,),
    Protocol.DICOM: (PersistenceKey.SOURCE_IP, PersistenceKey.CALLING_AE),
    Protocol.HL7: (PersistenceKey.SOURCE_IP, PersistenceKey.MSH_4, PersistenceKey.PID_3,
                   PersistenceKey.NONE),
    Protocol.XDS: (PersistenceKey.SOURCE_IP,),
}


class Failback(Choice):
    """dicom, failover mode: how new clients go back to an earlier member once it is up."""

    AUTO = "auto"  # once it has been up for failback_after
    MANUAL = "manual"  # when an operator says so: gateway ctl failback VIP


class OnBusy(Choice):
    """dicom: what an A-ASSOCIATE-RJ transient (busy) from a member leads to."""

    RELAY = "relay"  # the modality gets it and retries later (failover mode's default)
    NEXT_MEMBER = "next-member"  # the next member is tried (balance mode's default)


class InDoubt(Choice):
    """hl7: a message written whole to a member that then gave no answer."""

    HOLD = "hold"  # the gateway never sends it again: the sender is answered (in_doubt_answer)
    NEXT_MEMBER = "next-member"  # sent on (engines that share one de-duplication store)


class InDoubtAnswer(Choice):
    """hl7: what the sender of an in-doubt message gets."""

    CLOSE = "close"  # its connection closed without an answer: every MLLP sender resends
    NAK = "nak"  # AE (CE in enhanced mode), ERR-3 207 and the reason


class WhenNoneUp(Choice):
    """hl7: what a sender gets when no member can take its message."""

    NAK = "nak"  # the gateway's NAK (nak_code)
    CLOSE = "close"  # its connection closed without an answer (senders that take a NAK as final)


# Keys that mean something for one protocol only: set on a VIP of another, they are an error.
PROTOCOL_KEYS: dict[str, tuple[str, ...]] = {
    "allowed_calling_aes": ("dicom",), "routes": ("dicom", "hl7"), "ae_titles": ("dicom",),
    "max_message_bytes": ("hl7",), "nak_code": ("hl7",), "message_timeout": ("hl7",),
    "unwell_acks": ("hl7",), "validate": ("hl7",),
    "header_timeout": ("xds",), "forward_client_cert": ("xds",), "actions": ("xds",),
    "default_role": ("xds",), "return_listen": ("dicom",), "return_ae_title": ("dicom",),
    "destination": ("dicom",),
    "allowed_clients": ("dicom",), "study_window": ("dicom",), "failback": ("dicom",),
    "failback_after": ("dicom",), "on_busy": ("dicom",), "status_window": ("dicom",),
    "in_doubt": ("hl7",), "in_doubt_answer": ("hl7",), "resend_memory": ("hl7",),
    "hl7_application": ("hl7",), "hl7_facility": ("hl7",), "when_none_up": ("hl7",),
    "shadow_writes": ("xds",), "shadow_side_effects": ("dicom",),
}
# The MSH fields an HL7 route may match on (MSH-n), and the Header attribute each is read from.
ROUTE_FIELDS = {"MSH-3": "sending_application", "MSH-4": "sending_facility",
                "MSH-5": "receiving_application", "MSH-6": "receiving_facility",
                "MSH-9": "message_type", "MSH-11": "processing_id", "MSH-12": "version"}


@dataclass(frozen=True)
class ServerTls:
    """A VIP's (or the admin server's) own certificate, and how it checks its clients'."""

    cert: str
    key: str
    ca: str = ""  # "" = the system CA store, when client certificates are checked
    verify_client: VerifyClient = VerifyClient.NONE
    min_version: TlsVersion = TlsVersion.V1_2


@dataclass(frozen=True)
class ClientTls:
    """How the gateway speaks TLS to a member (or a check URL): trust, and its own certificate."""

    ca: str = ""  # "" = the system CA store
    cert: str = ""
    key: str = ""
    server_name: str = ""  # "" = the member's host
    verify: bool = True
    min_version: TlsVersion = TlsVersion.V1_2


class ConfigError(Exception):
    """A configuration problem; the message is one line a user can act on."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class HealthConfig:
    check: Check = Check.TCP
    interval: float = 5.0
    timeout: float = 4.0
    rise: int = 2
    fall: int = 3
    port: int | None = None  # check a different port than the service port
    path: str = "/"  # http / xds-query
    expect: str = ""  # http: body must contain this text
    tls: bool = False  # http, xds-query: speak HTTPS (with the member's tls, or verified defaults)
    calling_ae: str = "MEDGATE"  # dicom-echo, dicom-find
    message: str = ""  # hl7-ack: path to a test message
    patient_id: str = ""  # xds-query; dicom-find (default: a Patient ID that cannot exist)
    partial_success: bool = False  # xds-query: accept PartialSuccess
    accept_reject: bool = False  # hl7-ack: an AE/AR answer (correlated) passes too
    skip_when_live: bool = True  # hl7-ack: no heartbeat to a member that ACKed live traffic


@dataclass(frozen=True)
class Persistence:
    key: PersistenceKey = PersistenceKey.SOURCE_IP
    timeout: float = 3600.0
    method: PersistenceMethod = PersistenceMethod.TABLE


@dataclass(frozen=True)
class MemberConfig:
    name: str
    address: Address
    weight: int = 100
    max_connections: int = 0
    ae_title: str = ""
    role: Role = Role.BOTH
    tls: ClientTls | None = None
    send_proxy: bool = False  # PROXY protocol v2 header before anything else
    repository_unique_id: str = ""  # xds: the repository's OID, for ITI-43 / RAD-69 routing
    home_community_id: str = ""  # xds, role gateway: "urn:oid:...", for ITI-38 / ITI-39 routing
    shadow: bool = False  # never picked: gets a copy of each unit, its answers compared


@dataclass(frozen=True)
class Destination:
    """dicom: where the return path delivers an association a member opens towards `ae_title`
    (a storage commitment report, a C-MOVE's C-STOREs)."""

    ae_title: str
    address: Address
    tls: ClientTls | None = None


@dataclass(frozen=True)
class MessageRoute:
    """An HL7 route: messages whose MSH fields match every glob go to `members`.

    `match` holds (field, glob) pairs such as ("MSH-9", "ORU^R01*"); empty is the "*" fallback.
    """

    match: tuple[tuple[str, str], ...]
    members: tuple[str, ...]

    def describe(self) -> str:
        return ", ".join(f"{name}={glob}" for name, glob in self.match) or "*"


@dataclass(frozen=True)
class VipConfig:
    name: str
    protocol: Protocol
    listen: tuple[Address, ...]
    members: tuple[MemberConfig, ...]  # the members that serve (shadows are apart)
    mode: Mode = Mode.BALANCE
    algorithm: Algorithm = Algorithm.ROUNDROBIN
    persistence: Persistence | None = None
    health: HealthConfig = field(default_factory=HealthConfig)
    connect_timeout: float = 4.0
    assoc_timeout: float = 4.0
    ack_timeout: float = 30.0
    client_timeout: float = 3600.0
    server_timeout: float = 3600.0
    error_limit: int = 3
    allowed_calling_aes: tuple[str, ...] = ()
    ae_titles: tuple[str, ...] = ()  # dicom: the called AE titles the VIP answers to; () = any
    routes: tuple[tuple[str, tuple[str, ...]], ...] = ()  # dicom: called AE -> member names
    message_routes: tuple[MessageRoute, ...] = ()  # hl7: in order, the first match wins
    max_message_bytes: int = 16 * 1024 * 1024
    nak_code: NakCode | None = None  # "" = AR in original acknowledgment mode, CE in enhanced mode
    # hl7: MSA-1 codes that count against a member; None: AR/CR with no error code or 207
    unwell_acks: tuple[NakCode, ...] | None = None
    message_timeout: float = 20.0  # hl7: all tries of one message; ack_timeout capped by it
    validate: Validation = Validation.NONE  # hl7: "structure": hl7apy checks each message first (AE if not)
    header_timeout: float = 10.0  # xds: a request head must be whole this long after it starts
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    max_clients: int = 0  # 0: a share of the gateway-wide limit
    max_clients_per_source: int = 0  # 0: a quarter of max_clients (one host cannot hold a VIP)
    tls: ServerTls | None = None
    accept_proxy: bool = False  # PROXY protocol header first, from trusted_proxies only
    allowed_clients: tuple[tuple[str, tuple[str, ...]], ...] = ()  # dicom: cert name -> AEs
    forward_client_cert: bool = False  # xds: X-Forwarded-Client-Cert to the member
    actions: tuple[tuple[str, Role], ...] = ()  # xds: SOAP action -> role, added or overriding
    default_role: Role | None = None  # xds: the role that takes actions with no route
    transparent: bool = False  # members see the client's own address (IP_TRANSPARENT)
    persistence_implicit: bool = False  # `persistence` is the protocol's default, not the config's
    min_up: int = 1  # passive signals never take the VIP below this many members up
    study_window: float = 1800.0  # dicom: a calling AE stays on its member this long (0 = off)
    failback: Failback = Failback.AUTO  # dicom, failover mode
    failback_after: float = 300.0  # dicom, failover mode: up this long before taking clients back
    on_busy: OnBusy | None = None  # dicom: None = relay in failover mode, next-member in balance
    status_window: float = 600.0  # dicom: unwell statuses from 2 calling AEs within this count
    in_doubt: InDoubt = InDoubt.HOLD  # hl7
    in_doubt_answer: InDoubtAnswer = InDoubtAnswer.CLOSE  # hl7
    resend_memory: int = 200_000  # hl7: (MSH-3, MSH-4, MSH-10) -> member entries kept (0 = off)
    hl7_application: str = "MEDGATE"  # hl7: MSH-3 of the gateway's own NAKs
    hl7_facility: str = ""  # hl7: MSH-4 of the gateway's own NAKs; "" = the host name
    when_none_up: WhenNoneUp = WhenNoneUp.NAK  # hl7
    return_listen: Address | None = None  # dicom: where members open associations to clients
    return_ae_title: str = ""  # dicom: the calling AE towards a destination ("" = ae_titles[0])
    destinations: tuple[Destination, ...] = ()  # dicom: the return path's called AEs
    shadows: tuple[MemberConfig, ...] = ()  # members with shadow = true (gateway.vips.shadow)
    shadow_writes: bool = False  # xds: writes are copied to shadows too (they change its store)
    shadow_side_effects: bool = False  # dicom: C-MOVE, C-GET, N-services copied to shadows too

    @property
    def busy_moves_on(self) -> bool:
        """dicom: a member's transient A-ASSOCIATE-RJ sends the association to the next member
        (else it is relayed to the modality)."""
        if self.on_busy is None:
            return self.mode is not Mode.FAILOVER
        return self.on_busy is OnBusy.NEXT_MEMBER

    def route_table(self) -> list[tuple[str, tuple[str, ...]]]:
        """The routes in the order they are tried, each as (what it matches, member names)."""
        if self.message_routes:
            return [(route.describe(), route.members) for route in self.message_routes]
        return [(called if called == "*" else f"called AE {called}", members)
                for called, members in sorted(self.routes, key=lambda route: route[0] == "*")]


@dataclass(frozen=True)
class AdminUser:
    """A named admin token: `read` may look, `operate` may also change members and reload."""

    name: str
    token: str = field(repr=False)
    role: AdminRole = AdminRole.OPERATE


@dataclass(frozen=True)
class LdapSettings:
    """Admin users from a directory (LDAP, Active Directory): who they are, and their role by
    group. `url` is ldaps:// (TLS from the start) or ldap:// (StartTLS, always)."""

    url: str
    user_base: str  # where users are searched, with user_filter
    bind_dn: str  # the service account that searches
    password: str = field(repr=False)  # its password (password_file)
    group_operate: str = ""  # the DN of the group whose members may operate
    group_read: str = ""  # ... and of the group whose members may read
    user_filter: str = "(uid={user})"  # {user}: the name given, escaped (RFC 4515)
    group_search: GroupSearch = GroupSearch.MEMBER
    group_base: str = ""  # where groups are searched (member): "" = the groups' domain
    ca: str = ""  # the CA of the directory's certificate; "" = the system's
    cache: float = 60.0  # seconds an accepted login is remembered (0: never)
    timeout: float = 5.0  # seconds per directory operation


@dataclass(frozen=True)
class AtnaSettings:
    """Where ATNA audit messages go (IHE ITI-20), and the spool that keeps them meanwhile."""

    repository: Address
    transport: AtnaTransport = AtnaTransport.TLS
    tls: ClientTls = field(default_factory=ClientTls)
    spool: str = ""  # "" (unset): state_dir/atna, or /var/spool/medgate/atna without one
    spool_max: int = 64 * 1024 * 1024
    source_id: str = ""  # "" = medgate@<host name>
    site_id: str = ""


@dataclass(frozen=True)
class GatewaySettings:
    admin: Address | None = Address("127.0.0.1", 9090)  # None: no admin server
    admin_token: str = field(default="", repr=False)
    audit: str = "-"
    drain_timeout: float = 30.0
    max_clients: int = 0  # 0: derived from the open-files limit at start
    admin_hosts: tuple[str, ...] = ()  # Host names the admin server answers besides its own
    admin_users: tuple[AdminUser, ...] = ()  # admin_token, if set, is the operator "admin"
    admin_tls: ServerTls | None = None  # HTTPS for the admin server
    admin_ldap: LdapSettings | None = None  # named admin users from a directory
    atna: AtnaSettings | None = None  # ATNA audit messages to an audit record repository
    state_dir: str = ""  # where state kept across restarts lives (the DICOM inventory); "" = none
    receipt_days: float = 30.0  # C-STORE receipts older than this are deleted
    receipt_hash_uids: bool = True  # keep SOP Instance UIDs as keyed hashes (gateway trace too)
    hash_key_file: str = ""  # the key of those hashes; "" = state_dir/hash.key (gateway.privacy)
    peers: tuple[Address, ...] = ()  # the other nodes' admin servers (shared admin state)
    peer_max_skew: float = 300.0  # a peer's change stamped further ahead than this is refused
    log_format: LogFormat = LogFormat.TEXT  # json: one object a line, for log shippers
    log_level: LogLevel = LogLevel.INFO  # gateway run --log-level wins
    workers: int = 1  # relaying processes (gateway.service.workers); 1: this process relays


@dataclass(frozen=True)
class Config:
    gateway: GatewaySettings
    vips: tuple[VipConfig, ...]
    source: str = "<string>"
    warnings: tuple[str, ...] = ()  # what is allowed but likely wrong, each with file:line
    text: str = field(default="", repr=False, compare=False)  # the TOML read (workers get it)

    def vip(self, name: str) -> VipConfig:
        """The VIP called `name` (KeyError if there is none)."""
        for vip in self.vips:
            if vip.name == name:
                return vip
        raise KeyError(name)


