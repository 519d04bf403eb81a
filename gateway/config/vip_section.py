"""A [[vip]] table with its health, persistence, members and routes."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from functools import partial
from typing import Any

from gateway.config.model import (CHECK_KEYS, CHECK_PROTOCOLS, PERSISTENCE_KEYS, PROTOCOL_KEYS,
                                  ROUTE_FIELDS, Algorithm, Check, Destination, Failback,
                                  HealthConfig,
                                  InDoubt, InDoubtAnswer, MemberConfig, MessageRoute, Mode,
                                  NakCode, OnBusy, Persistence, PersistenceKey,
                                  PersistenceMethod, Protocol, Role, Validation, VipConfig,
                                  WhenNoneUp)
from gateway.config.reader import Section, SectionReader
from gateway.config.tls_section import TlsSection
from gateway.config.values import (ae_list, ae_title, boolean, certificate_aes, choice, count,
                                   hl7_name, home_community_id, networks, oid, one_of,
                                   parse_address,
                                   parse_duration, parse_size, port_number, positive_duration,
                                   positive_int, prefixed, string, unknown_key,
                                   whole_number)
from protocols.hl7_structure import structure_problem

_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _nak_codes(value: Any) -> tuple[NakCode, ...]:
    try:
        if not isinstance(value, list):
            raise ValueError
        return tuple(choice(code, NakCode) for code in value)
    except ValueError:
        raise ValueError(f"{value!r}: a list of {', '.join(NakCode)} (or [] for none)") from None


_ROUTED_ROLES = [role for role in Role if role is not Role.BOTH]  # "both" is no destination
_ID_ROLES = {"repository_unique_id": (Role.REPOSITORY, Role.BOTH, Role.IMAGING_SOURCE),
             "home_community_id": (Role.GATEWAY,)}  # the member keys routing reads, by role


def _role(value: Any) -> Role:
    return Role(choice(value, Role, _ROUTED_ROLES))


def _actions(value: Any) -> tuple[tuple[str, Role], ...]:
    if not isinstance(value, dict):
        raise ValueError('must be a table of SOAP action = role, e.g. '
                         '{ "urn:ihe:iti:2007:RegistryStoredQuery" = "registry" }')
    for action in value:
        if not action or not action.isprintable() or any(c.isspace() or c in "\"'" for c in action):
            raise ValueError(f"{action!r} is not a SOAP action (a URI, no spaces or quotes)")
    return tuple((action, prefixed(action, _role, role)) for action, role in value.items())


# The VIP keys that are one value each, and how each is read. `name`, `protocol`, `listen`,
# `tls`, `health`, `persistence`, `member` and `routes` have loaders of their own.
_VIP_VALUES: dict[str, Callable[[Any], Any]] = {
    "mode": one_of(Mode), "algorithm": one_of(Algorithm), "nak_code": one_of(NakCode),
    "validate": one_of(Validation), "unwell_acks": _nak_codes,
    **dict.fromkeys(("connect_timeout", "assoc_timeout", "ack_timeout", "client_timeout",
                     "server_timeout", "message_timeout", "header_timeout", "status_window"),
                    positive_duration),
    "study_window": parse_duration, "failback_after": parse_duration,  # 0 = off / at once
    "failback": one_of(Failback), "on_busy": one_of(OnBusy), "in_doubt": one_of(InDoubt),
    "in_doubt_answer": one_of(InDoubtAnswer), "when_none_up": one_of(WhenNoneUp),
    "min_up": whole_number, "resend_memory": whole_number,
    "hl7_application": hl7_name, "hl7_facility": hl7_name,
    "error_limit": positive_int, "max_message_bytes": parse_size,
    "max_clients": count, "max_clients_per_source": count, "trusted_proxies": networks,
    "allowed_calling_aes": ae_list, "ae_titles": ae_list, "allowed_clients": certificate_aes,
    "accept_proxy": boolean, "forward_client_cert": boolean, "transparent": boolean,
    "actions": _actions, "default_role": _role, "return_listen": parse_address,
    "return_ae_title": ae_title, "shadow_writes": boolean, "shadow_side_effects": boolean,
}
# What [defaults] may set for every VIP (keys for one protocol apply to the VIPs of it).
DEFAULTABLE = frozenset({
    "connect_timeout", "assoc_timeout", "ack_timeout", "client_timeout", "server_timeout",
    "error_limit", "mode", "algorithm", "persistence", "health", "max_message_bytes", "nak_code",
    "message_timeout", "header_timeout", "trusted_proxies", "max_clients", "unwell_acks",
    "min_up", "study_window", "failback", "failback_after", "on_busy", "status_window",
    "in_doubt", "in_doubt_answer", "resend_memory", "hl7_application", "hl7_facility",
    "when_none_up", "max_clients_per_source",
})
_VIP_KEYS = _VIP_VALUES.keys() | {"name", "protocol", "listen", "member", "routes", "tls",
                                  "health", "persistence", "destination"}
_HEALTH_VALUES: dict[str, Callable[[Any], Any]] = {
    "check": one_of(Check), "interval": positive_duration, "timeout": positive_duration,
    "rise": positive_int, "fall": positive_int, "port": port_number,
    **dict.fromkeys(("path", "expect", "calling_ae", "message", "patient_id"), string),
    **dict.fromkeys(("tls", "partial_success", "accept_reject", "skip_when_live"), boolean),
}


def _member_address(value: Any) -> Any:
    address = parse_address(value)
    if address.port == 0:
        raise ValueError(f"{value!r}: port 0 is not a member port")
    return address


def _weight(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1000:
        raise ValueError(f"{value!r} is not a whole number from 0 to 1000")
    return value


def _max_connections(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{value!r} is not a whole number >= 0 (0 = unlimited)")
    return value


_MEMBER_VALUES: dict[str, Callable[[Any], Any]] = {
    "address": _member_address, "weight": _weight, "max_connections": _max_connections,
    "ae_title": ae_title, "role": one_of(Role), "send_proxy": boolean,
    "repository_unique_id": oid, "home_community_id": home_community_id, "shadow": boolean,
}
SHADOW_PROTOCOLS = (Protocol.DICOM, Protocol.HL7, Protocol.XDS)  # copying to shadow members
_MEMBER_KEYS = _MEMBER_VALUES.keys() | {"name", "tls"}


class VipSection(TlsSection, SectionReader):
    """Loads [[vip]] tables."""

    def load_vip(self, index: int, raw: Any, defaults: dict[str, Any]) -> VipConfig:
        section: Section = ("vip", index, -1)
        if not isinstance(raw, dict):
            self.fail(section, f"vip #{index + 1}", None, "must be a table")
        name = self._name(section, f"vip #{index + 1}", raw.get("name"))
        context = f"vip {name!r}"
        merged = {k: v for k, v in defaults.items() if k not in ("health", "persistence")}
        merged.update(raw)
        protocol = self._protocol(section, context, raw, merged)
        values: dict[str, Any] = {"name": name, "protocol": protocol,
                                  "listen": self._listen(section, context, merged.get("listen"))}
        for key, parser in _VIP_VALUES.items():
            if key in merged:
                values[key] = self.parse(section, context, key, parser, merged[key])
        values.setdefault("assoc_timeout", values.get("connect_timeout", VipConfig.connect_timeout))
        if "tls" in merged:
            values["tls"] = self.load_server_tls(section, context, merged["tls"])
        self._check_client_rules(section, context, values)
        values["health"] = self.load_health(section, context, protocol, defaults.get("health"),
                                            merged.get("health"))
        members = self.load_members(index, name, protocol, merged.get("member"))
        values["members"] = tuple(m for m in members if not m.shadow)
        values["shadows"] = tuple(m for m in members if m.shadow)
        if values["shadows"]:
            self._check_shadows(section, context, protocol, values)
        self._persistence(section, context, raw, defaults, values)
        self._check_action_roles(section, context, values)
        if "return_listen" in values or "destination" in merged:
            self._return_path(index, context, merged.get("destination"), values)
        if values.get("transparent"):
            self._check_transparent(section, context, values["members"])
        if "routes" in merged:
            self._routes(section, context, merged["routes"], values)
        return VipConfig(**values)

    def _check_shadows(self, section: Section, context: str, protocol: Protocol,
                       values: dict[str, Any]) -> None:
        """Shadow members: where this version copies units to them, and beside members that
        serve (a shadow never answers a client)."""
        shadow = values["shadows"][0]
        if protocol not in SHADOW_PROTOCOLS:
            self.fail(section, f"{context} member {shadow.name!r}", "shadow",
                      f"this version copies units to shadow members on "
                      f"{', '.join(map(str, SHADOW_PROTOCOLS))} VIPs only (this VIP is "
                      f"{str(protocol)!r})")
        if not values["members"]:
            self.fail(section, context, "member", "every member is a shadow ("
                      f"{', '.join(m.name for m in values['shadows'])}): at least one must "
                      "serve the clients (shadow = false)")

    def _name(self, section: Section, context: str, name: Any) -> str:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            self.fail(section, context, "name", "required: letters, digits, '.', '_' or '-'")
        return name

    def _protocol(self, section: Section, context: str, raw: dict[str, Any],
                  merged: dict[str, Any]) -> Protocol:
        """The VIP's protocol, once every key is known and means something for it."""
        for key in merged:
            if key not in _VIP_KEYS:
                self.fail(section, context, key, unknown_key(key, _VIP_KEYS))
        for key in raw:  # a [defaults] key applies to the VIPs it means something for
            if key in PROTOCOL_KEYS and raw.get("protocol") not in PROTOCOL_KEYS[key]:
                self.fail(section, context, key, f"only for protocol "
                          f"{' or '.join(PROTOCOL_KEYS[key])} (this VIP is {raw.get('protocol')!r})")
        return self.parse(section, context, "protocol", one_of(Protocol), merged.get("protocol"))

    def _listen(self, section: Section, context: str, raw: Any) -> tuple[Any, ...]:
        if raw is None:
            self.fail(section, context, "listen", "required: one address or a list of them")
        listen = tuple(self.parse(section, context, "listen", parse_address, address)
                       for address in (raw if isinstance(raw, list) else [raw]))
        if not listen:
            self.fail(section, context, "listen", "give at least one address")
        return listen

    def _check_client_rules(self, section: Section, context: str, values: dict[str, Any]) -> None:
        """Keys that only work together: who may send a PROXY header, certificate checks."""
        if values.get("accept_proxy") and not values.get("trusted_proxies"):
            self.fail(section, context, "accept_proxy", "set trusted_proxies too: a PROXY "
                      "header is believed only from the proxies listed there")
        tls = values.get("tls")
        if "allowed_clients" in values and (tls is None or tls.verify_client == "none"):
            self.fail(section, context, "allowed_clients", "needs tls with verify_client "
                      "= \"required\" (or \"optional\"): it ties AE titles to client "
                      "certificates")
        if values.get("forward_client_cert") and tls is None:
            self.fail(section, context, "forward_client_cert", "needs tls on this VIP")

    def _persistence(self, section: Section, context: str, raw: dict[str, Any],
                     defaults: dict[str, Any], values: dict[str, Any]) -> None:
        protocol = values["protocol"]
        given = raw.get("persistence")
        values["persistence"] = self.load_persistence(section, context, protocol,
                                                      defaults.get("persistence"), given)
        if values["persistence"] is None and given is None and "persistence" not in defaults:
            values["persistence"] = self._implicit_persistence(protocol, values)
            values["persistence_implicit"] = values["persistence"] is not None
        elif "study_window" in raw and protocol == Protocol.DICOM:
            self.warn(section, context, "study_window", "not used: persistence is set, and its "
                      "timeout is the window")

    @staticmethod
    def _implicit_persistence(protocol: Protocol, values: dict[str, Any]) -> Persistence | None:
        """The persistence a VIP without one gets: a DICOM calling AE stays on its member for
        study_window (study affinity); HL7 messages of one patient go to one member, in order
        (pid-3 by rendezvous hash: nothing to share between nodes) when several balance."""
        if protocol == Protocol.DICOM:
            window = values.get("study_window", VipConfig.study_window)
            return (Persistence(PersistenceKey.CALLING_AE, window, PersistenceMethod.TABLE)
                    if window > 0 else None)
        if (protocol == Protocol.HL7 and values.get("mode", Mode.BALANCE) == Mode.BALANCE
                and len(values["members"]) > 1):
            return Persistence(PersistenceKey.PID_3, 3600.0, PersistenceMethod.HASH)
        return None

    def _routes(self, section: Section, context: str, raw: Any, values: dict[str, Any]) -> None:
        if values["protocol"] == Protocol.HL7:
            values["message_routes"] = self.load_message_routes(section, context, raw,
                                                                values["members"])
            return
        values["routes"] = self.load_routes(section, context, raw, values["members"])
        titles = values.get("ae_titles")
        missing = [called for called, _ in values["routes"] if called != "*" and titles
                   and called not in titles]
        if missing:
            self.fail(section, context, "routes", f"{missing[0]!r} is not one of ae_titles "
                      "(a route for a called AE the VIP refuses)")

    def _merged_table(self, section: Section, context: str, key: str, example: str,
                      *parts: Any) -> dict[str, Any]:
        """A table from [defaults] and the VIP's own, the VIP's keys winning."""
        merged: dict[str, Any] = {}
        for part in parts:
            if part is None:
                continue
            if not isinstance(part, dict):
                self.fail(section, context, key, f"must be a table, e.g. {example}")
            merged.update(part)
        return merged

    def load_health(self, section: Section, context: str, protocol: Protocol,
                    default_raw: Any, raw: Any) -> HealthConfig:
        merged = self._merged_table(section, context, "health", '{ check = "tcp" }',
                                    default_raw, raw)
        values: dict[str, Any] = {}
        for key, value in merged.items():
            if key not in _HEALTH_VALUES:
                self.fail(section, context, "health", f"{key}: {unknown_key(key, _HEALTH_VALUES)}")
            values[key] = self.parse(section, context, "health",
                                     partial(prefixed, key, _HEALTH_VALUES[key]),
                                     value)
        self._check_fits(section, context, protocol, values, raw)
        if values.get("message"):
            values["message"] = self._heartbeat(section, context, values["message"])
        health = HealthConfig(**values)
        if health.check == Check.XDS_QUERY and not health.patient_id:
            self.fail(section, context, "health", "check xds-query needs patient_id")
        if "path" in values and not health.path.startswith("/"):
            self.fail(section, context, "health", f"path: {health.path!r} must start with '/'")
        if (health.check in (Check.DICOM_ECHO, Check.DICOM_FIND)
                and not 0 < len(health.calling_ae) <= 16):
            self.fail(section, context, "health", "calling_ae: 1 to 16 characters")
        return health

    def _heartbeat(self, section: Section, context: str, text: str) -> str:
        """The heartbeat file's path. One hl7apy rejects is a warning, not an error: real
        heartbeats often carry Z-segments or a site's own message types, and the receiver is
        the judge."""
        path = self.beside_config(text)
        if not path.is_file():
            self.fail(section, context, "health", f"message: {str(path)!r}: no such file")
        try:
            payload = path.read_bytes().strip(b"\x0b\x1c\r\n")
        except OSError as exc:
            self.fail(section, context, "health", f"message: {str(path)!r}: {exc.strerror}")
        problem = structure_problem(payload)
        if problem is not None:
            self.warn(section, context, "health", f"message: {str(path)!r}: hl7apy rejects "
                      f"its structure ({problem.kind}: {problem.detail}); sent as it is")
        return str(path)

    def _check_fits(self, section: Section, context: str, protocol: Protocol,
                    values: dict[str, Any], raw: Any) -> None:
        """The check speaks the VIP's protocol, and the VIP's own health keys are ones its check
        reads; keys from [defaults] that this check does not read are dropped."""
        check = values.get("check", HealthConfig.check)
        if protocol not in CHECK_PROTOCOLS[check]:
            fitting = ", ".join(c for c in Check if protocol in CHECK_PROTOCOLS[c])
            self.fail(section, context, "health",
                      f"check {check!r} does not speak {protocol} (for a {protocol} VIP: {fitting})")
        for key in list(values):
            if key in CHECK_KEYS and check not in CHECK_KEYS[key]:
                if key in (raw or {}):
                    self.fail(section, context, "health", f"{key}: check {check!r} does not "
                              f"read it (only {', '.join(CHECK_KEYS[key])} do)")
                del values[key]

    def load_persistence(self, section: Section, context: str, protocol: Protocol,
                         default_raw: Any, raw: Any) -> Persistence | None:
        if raw is None and default_raw is None:
            return None
        merged = self._merged_table(section, context, "persistence",
                                    '{ key = "source-ip", timeout = "1h" }', default_raw, raw)
        parsers: dict[str, Callable[[Any], Any]] = {
            "key": lambda value: _persistence_key(protocol, value),
            "timeout": parse_duration, "method": one_of(PersistenceMethod)}
        values: dict[str, Any] = {}
        for key, value in merged.items():
            if key not in parsers:
                self.fail(section, context, "persistence", f"{key}: {unknown_key(key, parsers)}")
            values[key] = self.parse(section, context, "persistence",
                                     partial(prefixed, key, parsers[key]), value)
        persistence = Persistence(**values)
        return None if persistence.key == PersistenceKey.NONE else persistence

    def load_members(self, vip_index: int, vip_name: str, protocol: Protocol,
                     raw: Any) -> tuple[MemberConfig, ...]:
        context = f"vip {vip_name!r}"
        if not isinstance(raw, list) or not raw:
            self.fail(("vip", vip_index, -1), context, "member",
                      "define at least one [[vip.member]]")
        members: list[MemberConfig] = []
        for index, entry in enumerate(raw):
            member = self._member(("member", vip_index, index), context, index, protocol, entry)
            if any(m.name == member.name for m in members):
                self.fail(("member", vip_index, index), f"{context} member {member.name!r}",
                          "name", "duplicate member name in this VIP")
            members.append(member)
        return tuple(members)

    def _member(self, section: Section, vip_context: str, index: int, protocol: Protocol,
                entry: Any) -> MemberConfig:
        name = self._name(section, f"{vip_context} member #{index + 1}",
                          entry.get("name") if isinstance(entry, dict) else None)
        context = f"{vip_context} member {name!r}"
        values: dict[str, Any] = {"name": name}
        for key, value in entry.items():
            if key not in _MEMBER_KEYS:
                self.fail(section, context, key, unknown_key(key, _MEMBER_KEYS))
            if key in _ID_ROLES and protocol != Protocol.XDS:
                self.fail(section, context, key, f"only for protocol xds (this VIP is "
                          f"{str(protocol)!r})")
            if key in _MEMBER_VALUES:
                values[key] = self.parse(section, context, key, _MEMBER_VALUES[key], value)
        if "address" not in values:
            self.fail(section, context, "address", "required, e.g. \"10.12.1.110:104\"")
        if "tls" in entry:  # once the address (the default server name) is known
            values["tls"] = self.load_client_tls(section, context, entry["tls"])
        role = values.get("role", MemberConfig.role)
        for key, roles in _ID_ROLES.items():
            if values.get(key) and role not in roles:
                self.fail(section, context, key, f"only for role {' or '.join(map(repr, roles))} "
                          f"(this member is {str(role)!r})")
        return MemberConfig(**values)

    def _return_path(self, vip_index: int, context: str, raw: Any,
                     values: dict[str, Any]) -> None:
        """return_listen, its destinations and the AE title the gateway calls them as."""
        section: Section = ("vip", vip_index, -1)
        if "return_listen" not in values:
            self.fail(section, context, "destination", "only with return_listen (the address "
                      "members deliver to)")
        if values["return_listen"] in values["listen"]:
            self.fail(section, context, "return_listen", f"{values['return_listen']} is one "
                      "of listen: the return path needs an address of its own")
        if not isinstance(raw, list) or not raw:
            self.fail(section, context, "destination", "list every destination a member "
                      "delivers to: [[vip.destination]] ae_title, address")
        destinations: list[Destination] = []
        for index, entry in enumerate(raw):
            destination = self._destination(("destination", vip_index, index), context, entry)
            if any(d.ae_title == destination.ae_title for d in destinations):
                self.fail(("destination", vip_index, index), context, "ae_title",
                          f"{destination.ae_title!r} is listed twice")
            destinations.append(destination)
        values["destinations"] = tuple(destinations)
        if not values.get("return_ae_title"):
            if not values.get("ae_titles"):
                self.fail(section, context, "return_ae_title", "required when ae_titles is "
                          "empty: the AE title destinations see calling (the PACS they know)")
            values["return_ae_title"] = values["ae_titles"][0]

    def _destination(self, section: Section, vip_context: str, entry: Any) -> Destination:
        context = f"{vip_context} destination #{section[2] + 1}"
        if not isinstance(entry, dict):
            self.fail(section, context, None, "must be a table: ae_title, address")
        for key in entry:
            if key not in ("ae_title", "address", "tls"):
                self.fail(section, context, key, unknown_key(key, ("ae_title", "address", "tls")))
        for key in ("ae_title", "address"):
            if key not in entry:
                self.fail(section, context, key, "required")
        title = self.parse(section, context, "ae_title", ae_title, entry["ae_title"])
        address = self.parse(section, context, "address", _member_address, entry["address"])
        tls = (self.load_client_tls(section, context, entry["tls"]) if "tls" in entry else None)
        return Destination(title, address, tls)

    def _check_action_roles(self, section: Section, context: str,
                            values: dict[str, Any]) -> None:
        """Each role `actions` and `default_role` send to is one some member serves."""
        named = [("default_role", values["default_role"])] if "default_role" in values else []
        named += [("actions", role) for _, role in values.get("actions", ())]
        for key, role in named:
            if not any(member.role.serves(role) for member in values["members"]):
                self.fail(section, context, key, f"role {str(role)!r} is served by no member "
                          f"(give one role = {str(role)!r})")

    def _check_transparent(self, section: Section, context: str,
                           members: tuple[MemberConfig, ...]) -> None:
        """Transparent mode opens member connections from the client's address: members must
        be IP addresses (a name could resolve to another family), and none gets a PROXY
        header too (it would name the same client twice)."""
        for member in members:
            try:
                ipaddress.ip_address(member.address.host)
            except ValueError:
                self.fail(section, context, "transparent", f"member {member.name!r}: give its "
                          f"IP address, not {member.address.host!r}")
            if member.send_proxy:
                self.fail(section, context, "transparent", f"member {member.name!r} has "
                          "send_proxy: a transparent connection already comes from the client")

    def load_message_routes(self, section: Section, context: str, raw: Any,
                            members: tuple[MemberConfig, ...]) -> tuple[MessageRoute, ...]:
        """HL7 routes: an ordered list of { match = { "MSH-9" = "ORU^R01*" }, members = [...] },
        `match = "*"` for the fallback; a route after the fallback could never be used."""
        example = '[{ match = { "MSH-9" = "ORU^R01*" }, members = ["lab1"] }, ...]'
        if not isinstance(raw, list) or not raw:
            self.fail(section, context, "routes", f"must be a list of routes, e.g. {example}")
        routes: list[MessageRoute] = []
        for number, entry in enumerate(raw, 1):
            where = f"route #{number}"
            if not isinstance(entry, dict) or set(entry) != {"match", "members"}:
                self.fail(section, context, "routes", f"{where}: give exactly match and members, "
                          f"e.g. {example}")
            if routes and not routes[-1].match:
                self.fail(section, context, "routes", f"{where} comes after the \"*\" route, "
                          "which matches every message: it would never be used")
            match = self.parse(section, context, "routes",
                               partial(_route_match, where),
                               entry["match"])
            targets = self._route_targets(section, context, where, entry["members"], members)
            routes.append(MessageRoute(match, targets))
        return tuple(routes)

    def load_routes(self, section: Section, context: str, raw: Any,
                    members: tuple[MemberConfig, ...]) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """DICOM routes: called AE title (or "*") -> member names."""
        if not isinstance(raw, dict) or not raw:
            self.fail(section, context, "routes", "must be a table of called AE title -> "
                      "member names, e.g. { \"*\" = [\"pacs1\"] }")
        routes = []
        for called, targets in raw.items():
            if called != "*":
                self.parse(section, context, "routes",
                           partial(prefixed, repr(called), ae_title), called)
            routes.append((called.strip(), self._route_targets(section, context, repr(called),
                                                               targets, members)))
        return tuple(routes)

    def _route_targets(self, section: Section, context: str, where: str, targets: Any,
                       members: tuple[MemberConfig, ...]) -> tuple[str, ...]:
        if isinstance(targets, str):
            targets = [targets]
        if not isinstance(targets, list) or not targets:
            self.fail(section, context, "routes", f"{where}: members: give a list of member "
                      "names")
        names = {m.name for m in members}
        for target in targets:
            if target not in names:
                self.fail(section, context, "routes",
                          f"{where}: no member named {target!r} in this VIP")
        return tuple(targets)


def _persistence_key(protocol: Protocol, value: Any) -> PersistenceKey:
    try:
        return choice(value, PersistenceKey, PERSISTENCE_KEYS[protocol])
    except ValueError as exc:
        raise ValueError(f"{exc} for protocol {protocol}") from None


def _route_match(where: str, match: Any) -> tuple[tuple[str, str], ...]:
    """A route's match: "*" (every message) or a table of MSH field -> glob."""
    if match == "*":
        return ()
    if not isinstance(match, dict) or not match:
        raise ValueError(f"{where}: match must be \"*\" or a table of MSH field -> glob, "
                         "e.g. { \"MSH-9\" = \"ADT^*\" }")
    pairs = []
    for name, glob in match.items():
        name = name.strip().upper()
        if name not in ROUTE_FIELDS:
            raise ValueError(f"{where}: {name!r} is not a field a route matches on "
                             f"({', '.join(ROUTE_FIELDS)})")
        if not isinstance(glob, str) or not glob:
            raise ValueError(f"{where}: {name}: give a glob such as \"ORU^R01*\" (* any text, "
                             "? one character)")
        pairs.append((name, glob))
    return tuple(pairs)
