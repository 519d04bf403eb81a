"""A [[vip]] table with its health, persistence, members and routes."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any

from gateway.config.model import (ALGORITHMS, CHECK_KEYS, CHECK_PROTOCOLS, CHECKS, MODES,
                                  NAK_CODES, PERSISTENCE_KEYS, VALIDATIONS, PERSISTENCE_METHODS,
                                  PROTOCOL_KEYS, PROTOCOLS, ROLES, ROUTE_FIELDS, Failback,
                                  HealthConfig, InDoubt, InDoubtAnswer, MemberConfig,
                                  MessageRoute, OnBusy, Persistence, VipConfig, WhenNoneUp)
from protocols.hl7_structure import structure_problem
from gateway.config.values import (Unknown, ae_list, ae_title, boolean, certificate_aes, choice,
                                   count, hl7_name, networks, oid, parse_address,
                                   parse_duration, parse_size, port_number, positive_int,
                                   string, whole_number)

_CHOICES = {"failback": Failback, "on_busy": OnBusy, "in_doubt": InDoubt,
            "in_doubt_answer": InDoubtAnswer, "when_none_up": WhenNoneUp}

_DEFAULTABLE = frozenset({
    "connect_timeout", "assoc_timeout", "ack_timeout", "client_timeout", "server_timeout",
    "error_limit", "mode", "algorithm", "persistence", "health", "max_message_bytes", "nak_code",
    "message_timeout", "header_timeout", "trusted_proxies", "max_clients", "unwell_acks",
    "min_up", "study_window", "failback", "failback_after", "on_busy", "status_window",
    "in_doubt", "in_doubt_answer", "resend_memory", "hl7_application", "hl7_facility",
    "when_none_up", "max_clients_per_source",
})
_VIP_KEYS = _DEFAULTABLE | {"name", "protocol", "listen", "member", "allowed_calling_aes", "routes",
                            "tls", "accept_proxy", "allowed_clients", "forward_client_cert",
                            "ae_titles", "validate", "transparent"}
_HEALTH_KEYS = ("check", "interval", "timeout", "rise", "fall", "port", "path", "expect", "tls",
                "calling_ae", "message", "patient_id", "partial_success", "accept_reject",
                "skip_when_live")


class VipSection:
    """Loads [[vip]] tables; mixed into the loader (uses its `fail` and `source`)."""

    def load_vip(self, index: int, raw: Any, defaults: dict[str, Any]) -> VipConfig:
        section = ("vip", index, -1)
        if not isinstance(raw, dict):
            self.fail(section, f"vip #{index + 1}", None, "must be a table")
        name = raw.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""):
            self.fail(section, f"vip #{index + 1}", "name",
                      "required: letters, digits, '.', '_' or '-'")
        context = f"vip {name!r}"
        merged = {k: v for k, v in defaults.items() if k not in ("health", "persistence")}
        merged.update(raw)
        for key in merged:
            if key not in _VIP_KEYS:
                self.fail(section, context, key, f"unknown key (allowed: {', '.join(sorted(_VIP_KEYS))})")
        for key in raw:  # a [defaults] key applies to the VIPs it means something for
            if key in PROTOCOL_KEYS and raw.get("protocol") not in PROTOCOL_KEYS[key]:
                self.fail(section, context, key, f"only for protocol "
                          f"{' or '.join(PROTOCOL_KEYS[key])} (this VIP is {raw.get('protocol')!r})")

        def want(key: str, parse, *args):
            try:
                return parse(merged[key], *args)
            except (ValueError, TypeError) as exc:
                self.fail(section, context, key, str(exc))

        protocol = merged.get("protocol")
        if protocol not in PROTOCOLS:
            self.fail(section, context, "protocol", f"{protocol!r} is not one of {', '.join(PROTOCOLS)}")
        if "listen" not in merged:
            self.fail(section, context, "listen", "required: one address or a list of them")
        listen_raw = merged["listen"] if isinstance(merged["listen"], list) else [merged["listen"]]
        listen = tuple(want("listen", lambda _v, a=a: parse_address(a)) for a in listen_raw)
        if not listen:
            self.fail(section, context, "listen", "give at least one address")
        values: dict[str, Any] = {"name": name, "protocol": protocol, "listen": listen}
        for key in ("mode", "algorithm", "nak_code", "validate"):
            if key in merged:
                allowed = {"mode": MODES, "algorithm": ALGORITHMS, "nak_code": NAK_CODES,
                           "validate": VALIDATIONS}[key]
                if merged[key] not in allowed:
                    self.fail(section, context, key,
                              f"{merged[key]!r} is not one of {', '.join(allowed)}")
                values[key] = merged[key]
        if "unwell_acks" in merged:
            codes = merged["unwell_acks"]
            if not isinstance(codes, list) or any(code not in NAK_CODES for code in codes):
                self.fail(section, context, "unwell_acks",
                          f"{codes!r}: a list of {', '.join(NAK_CODES)} (or [] for none)")
            values["unwell_acks"] = tuple(codes)
        for key in ("connect_timeout", "assoc_timeout", "ack_timeout", "client_timeout",
                    "server_timeout", "message_timeout", "header_timeout", "status_window"):
            if key in merged:
                values[key] = want(key, parse_duration)
                if values[key] <= 0:
                    self.fail(section, context, key, "must be more than 0")
        for key in ("study_window", "failback_after"):  # 0 = off / at once
            if key in merged:
                values[key] = want(key, parse_duration)
        for key, choices in _CHOICES.items():
            if key in merged:
                values[key] = want(key, choice, choices)
        for key in ("min_up", "resend_memory"):
            if key in merged:
                values[key] = want(key, whole_number)
        for key in ("hl7_application", "hl7_facility"):
            if key in merged:
                values[key] = want(key, hl7_name)
        if "assoc_timeout" not in values:
            values["assoc_timeout"] = values.get("connect_timeout", VipConfig.connect_timeout)
        if "error_limit" in merged:
            values["error_limit"] = want("error_limit", positive_int)
        if "max_message_bytes" in merged:
            values["max_message_bytes"] = want("max_message_bytes", parse_size)
        for key in ("max_clients", "max_clients_per_source"):
            if key in merged:
                values[key] = want(key, count)
        if "trusted_proxies" in merged:
            values["trusted_proxies"] = want("trusted_proxies", networks)
        for key in ("allowed_calling_aes", "ae_titles"):
            if key in merged:
                values[key] = want(key, ae_list)
        for key in ("accept_proxy", "forward_client_cert", "transparent"):
            if key in merged:
                values[key] = want(key, boolean)
        if values.get("accept_proxy") and not values.get("trusted_proxies"):
            self.fail(section, context, "accept_proxy", "set trusted_proxies too: a PROXY "
                      "header is believed only from the proxies listed there")
        if "tls" in merged:
            values["tls"] = self.load_server_tls(section, context, merged["tls"])
        if "allowed_clients" in merged:
            values["allowed_clients"] = want("allowed_clients", certificate_aes)
            tls = values.get("tls")
            if tls is None or tls.verify_client == "none":
                self.fail(section, context, "allowed_clients", "needs tls with verify_client "
                          "= \"required\" (or \"optional\"): it ties AE titles to client "
                          "certificates")
        if values.get("forward_client_cert") and values.get("tls") is None:
            self.fail(section, context, "forward_client_cert", "needs tls on this VIP")
        values["health"] = self.load_health(section, context, protocol, defaults.get("health"),
                                            merged.get("health"))
        values["persistence"] = self.load_persistence(section, context, protocol,
                                                      defaults.get("persistence"),
                                                      merged.get("persistence"))
        values["members"] = self.load_members(index, name, protocol, merged.get("member"))
        if values["persistence"] is None and "persistence" not in merged and (
                "persistence" not in defaults):
            values["persistence"] = self._implicit_persistence(protocol, values)
            values["persistence_implicit"] = values["persistence"] is not None
        elif "study_window" in raw and protocol == "dicom":
            self.warn(section, context, "study_window", "not used: persistence is set, and its "
                      "timeout is the window")
        if values.get("transparent"):
            self._check_transparent(section, context, values["members"])
        if "routes" in merged and protocol == "hl7":
            values["message_routes"] = self.load_message_routes(section, context, merged["routes"],
                                                                values["members"])
        elif "routes" in merged:
            values["routes"] = self.load_routes(section, context, merged["routes"],
                                                values["members"])
            missing = [called for called, _ in values["routes"]
                       if called != "*" and values.get("ae_titles")
                       and called not in values["ae_titles"]]
            if missing:
                self.fail(section, context, "routes", f"{missing[0]!r} is not one of ae_titles "
                          "(a route for a called AE the VIP refuses)")
        return VipConfig(**values)

    @staticmethod
    def _implicit_persistence(protocol: str, values: dict[str, Any]) -> Persistence | None:
        """The persistence a VIP without one gets: a DICOM calling AE stays on its member for
        study_window (study affinity); HL7 messages of one patient go to one member, in order
        (pid-3 by rendezvous hash: nothing to share between nodes) when several balance."""
        if protocol == "dicom":
            window = values.get("study_window", VipConfig.study_window)
            return Persistence("calling-ae", window, "table") if window > 0 else None
        if (protocol == "hl7" and values.get("mode", "balance") == "balance"
                and len(values["members"]) > 1):
            return Persistence("pid-3", 3600.0, "hash")
        return None

    def load_health(self, section, context, protocol, default_raw, raw) -> HealthConfig:
        merged: dict[str, Any] = {}
        for part in (default_raw, raw):
            if part is None:
                continue
            if not isinstance(part, dict):
                self.fail(section, context, "health", "must be a table, e.g. { check = \"tcp\" }")
            merged.update(part)
        values: dict[str, Any] = {}
        for key, value in merged.items():
            try:
                if key == "check":
                    if value not in CHECKS:
                        raise ValueError(f"{value!r} is not one of {', '.join(CHECKS)}")
                    values[key] = value
                elif key in ("interval", "timeout"):
                    values[key] = parse_duration(value)
                    if values[key] <= 0:
                        raise ValueError("must be more than 0")
                elif key in ("rise", "fall"):
                    values[key] = positive_int(value)
                elif key == "port":
                    values[key] = port_number(value)
                elif key in ("path", "expect", "calling_ae", "message", "patient_id"):
                    values[key] = string(value)
                elif key in ("tls", "partial_success", "accept_reject", "skip_when_live"):
                    if not isinstance(value, bool):
                        raise ValueError(f"{value!r} is not true or false")
                    values[key] = value
                else:
                    raise Unknown(f"unknown key (allowed: {', '.join(_HEALTH_KEYS)})")
            except (ValueError, Unknown) as exc:
                self.fail(section, context, "health", f"{key}: {exc}")
        self._check_fits(section, context, protocol, values, default_raw, raw)
        if values.get("message"):
            message = Path(values["message"])
            if not message.is_absolute():  # relative to the config file, not to the cwd
                message = Path(self.source).parent / message
            if not message.is_file():
                self.fail(section, context, "health", f"message: {str(message)!r}: no such file")
            values["message"] = str(message)
            self._check_heartbeat(section, context, message)
        health = HealthConfig(**values)
        if health.check == "xds-query" and not health.patient_id:
            self.fail(section, context, "health", "check xds-query needs patient_id")
        if "path" in values and not health.path.startswith("/"):
            self.fail(section, context, "health", f"path: {health.path!r} must start with '/'")
        if health.check in ("dicom-echo", "dicom-find") and not 0 < len(health.calling_ae) <= 16:
            self.fail(section, context, "health", "calling_ae: 1 to 16 characters")
        return health

    def _check_heartbeat(self, section, context, path: Path) -> None:
        """A heartbeat file hl7apy rejects is a warning, not an error: real heartbeats often
        carry Z-segments or a site's own message types, and the receiver is the judge."""
        try:
            payload = path.read_bytes().strip(b"\x0b\x1c\r\n")
        except OSError as exc:
            self.fail(section, context, "health", f"message: {str(path)!r}: {exc.strerror}")
        problem = structure_problem(payload)
        if problem is not None:
            self.warn(section, context, "health", f"message: {str(path)!r}: hl7apy rejects "
                      f"its structure ({problem.kind}: {problem.detail}); sent as it is")

    def _check_fits(self, section, context, protocol, values, default_raw, raw) -> None:
        """The check speaks the VIP's protocol, and the VIP's own health keys are ones its check
        reads; keys from [defaults] that this check does not read are dropped."""
        check = values.get("check", HealthConfig.check)
        if protocol not in CHECK_PROTOCOLS[check]:
            fitting = ", ".join(c for c in CHECKS if protocol in CHECK_PROTOCOLS[c])
            self.fail(section, context, "health",
                      f"check {check!r} does not speak {protocol} (for a {protocol} VIP: {fitting})")
        for key in list(values):
            if key in CHECK_KEYS and check not in CHECK_KEYS[key]:
                if key in (raw or {}):
                    self.fail(section, context, "health", f"{key}: check {check!r} does not "
                              f"read it (only {', '.join(CHECK_KEYS[key])} do)")
                del values[key]

    def load_persistence(self, section, context, protocol, default_raw, raw) -> Persistence | None:
        if raw is None and default_raw is None:
            return None
        merged: dict[str, Any] = {}
        for part in (default_raw, raw):
            if part is None:
                continue
            if not isinstance(part, dict):
                self.fail(section, context, "persistence",
                          "must be a table, e.g. { key = \"source-ip\", timeout = \"1h\" }")
            merged.update(part)
        values: dict[str, Any] = {}
        for key, value in merged.items():
            if key == "key":
                if value not in PERSISTENCE_KEYS[protocol]:
                    self.fail(section, context, "persistence",
                              f"key: {value!r} is not one of {', '.join(PERSISTENCE_KEYS[protocol])}"
                              f" for protocol {protocol}")
                values[key] = value
            elif key == "timeout":
                try:
                    values[key] = parse_duration(value)
                except ValueError as exc:
                    self.fail(section, context, "persistence", f"timeout: {exc}")
            elif key == "method":
                if value not in PERSISTENCE_METHODS:
                    self.fail(section, context, "persistence",
                              f"method: {value!r} is not one of {', '.join(PERSISTENCE_METHODS)}")
                values[key] = value
            else:
                self.fail(section, context, "persistence",
                          f"{key}: unknown key (allowed: key, timeout, method)")
        persistence = Persistence(**values)
        return None if persistence.key == "none" else persistence

    def load_members(self, vip_index: int, vip_name: str, protocol: str, raw: Any):
        section = ("vip", vip_index, -1)
        context = f"vip {vip_name!r}"
        if not isinstance(raw, list) or not raw:
            self.fail(section, context, "member", "define at least one [[vip.member]]")
        members: list[MemberConfig] = []
        for index, entry in enumerate(raw):
            msection = ("member", vip_index, index)
            name = entry.get("name") if isinstance(entry, dict) else None
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name or ""):
                self.fail(msection, f"{context} member #{index + 1}", "name",
                          "required: letters, digits, '.', '_' or '-'")
            mcontext = f"{context} member {name!r}"
            if any(m.name == name for m in members):
                self.fail(msection, mcontext, "name", "duplicate member name in this VIP")
            values: dict[str, Any] = {"name": name}
            for key, value in entry.items():
                try:
                    if key == "name":
                        continue
                    if key == "address":
                        values[key] = parse_address(value)
                        if values[key].port == 0:
                            raise ValueError(f"{value!r}: port 0 is not a member port")
                    elif key == "weight":
                        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1000:
                            raise ValueError(f"{value!r} is not a whole number from 0 to 1000")
                        values[key] = value
                    elif key == "max_connections":
                        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                            raise ValueError(f"{value!r} is not a whole number >= 0 (0 = unlimited)")
                        values[key] = value
                    elif key == "ae_title":
                        values[key] = ae_title(value)
                    elif key == "role":
                        if value not in ROLES:
                            raise ValueError(f"{value!r} is not one of {', '.join(ROLES)}")
                        values[key] = value
                    elif key == "send_proxy":
                        values[key] = boolean(value)
                    elif key == "repository_unique_id":
                        if protocol != "xds":
                            raise ValueError(f"only for protocol xds (this VIP is {protocol!r})")
                        values[key] = oid(value)
                    elif key == "tls":
                        continue  # below, once the address (the default server name) is known
                    else:
                        raise Unknown("unknown key (allowed: name, address, weight, "
                                       "max_connections, ae_title, role, tls, send_proxy, "
                                       "repository_unique_id)")
                except (ValueError, Unknown) as exc:
                    self.fail(msection, mcontext, key, str(exc))
            if "address" not in values:
                self.fail(msection, mcontext, "address", "required, e.g. \"10.12.1.110:104\"")
            if "tls" in entry:
                values["tls"] = self.load_client_tls(msection, mcontext, entry["tls"])
            if values.get("repository_unique_id") and values.get("role") == "registry":
                self.fail(msection, mcontext, "repository_unique_id", "a registry has none "
                          "(role = \"registry\")")
            members.append(MemberConfig(**values))
        return tuple(members)

    def _check_transparent(self, section, context, members) -> None:
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

    def load_message_routes(self, section, context, raw, members) -> tuple[MessageRoute, ...]:
        """HL7 routes: an ordered list of { match = { "MSH-9" = "ORU^R01*" }, members = [...] },
        `match = "*"` for the fallback; a route after the fallback could never be used."""
        example = '[{ match = { "MSH-9" = "ORU^R01*" }, members = ["lab1"] }, ...]'
        if not isinstance(raw, list) or not raw:
            self.fail(section, context, "routes", f"must be a list of routes, e.g. {example}")
        names = {m.name for m in members}
        routes = []
        for number, entry in enumerate(raw, 1):
            where = f"route #{number}"
            if not isinstance(entry, dict) or set(entry) != {"match", "members"}:
                self.fail(section, context, "routes", f"{where}: give exactly match and members, "
                          f"e.g. {example}")
            if routes and not routes[-1].match:
                self.fail(section, context, "routes", f"{where} comes after the \"*\" route, "
                          "which matches every message: it would never be used")
            match = entry["match"]
            if match == "*":
                match = {}
            elif not isinstance(match, dict) or not match:
                self.fail(section, context, "routes", f"{where}: match must be \"*\" or a table "
                          f"of MSH field -> glob, e.g. {{ \"MSH-9\" = \"ADT^*\" }}")
            pairs = []
            for name, glob in match.items():
                name = name.strip().upper()
                if name not in ROUTE_FIELDS:
                    self.fail(section, context, "routes", f"{where}: {name!r} is not a field a "
                              f"route matches on ({', '.join(ROUTE_FIELDS)})")
                if not isinstance(glob, str) or not glob:
                    self.fail(section, context, "routes", f"{where}: {name}: give a glob such "
                              "as \"ORU^R01*\" (* any text, ? one character)")
                pairs.append((name, glob))
            targets = entry["members"]
            if isinstance(targets, str):
                targets = [targets]
            if not isinstance(targets, list) or not targets:
                self.fail(section, context, "routes", f"{where}: members: give a list of "
                          "member names")
            for target in targets:
                if target not in names:
                    self.fail(section, context, "routes",
                              f"{where}: no member named {target!r} in this VIP")
            routes.append(MessageRoute(tuple(pairs), tuple(targets)))
        return tuple(routes)

    def load_routes(self, section, context, raw, members):
        if not isinstance(raw, dict) or not raw:
            self.fail(section, context, "routes",
                      "must be a table of called AE title -> member names, e.g. { \"*\" = [\"pacs1\"] }")
        names = {m.name for m in members}
        routes = []
        for called, targets in raw.items():
            if called != "*":
                try:
                    ae_title(called)
                except ValueError as exc:
                    self.fail(section, context, "routes", f"{called!r}: {exc}")
            if isinstance(targets, str):
                targets = [targets]
            if not isinstance(targets, list) or not targets:
                self.fail(section, context, "routes", f"{called!r}: give a list of member names")
            for target in targets:
                if target not in names:
                    self.fail(section, context, "routes",
                              f"{called!r}: no member named {target!r} in this VIP")
            routes.append((called.strip(), tuple(targets)))
        return tuple(routes)
