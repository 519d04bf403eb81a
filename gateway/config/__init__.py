"""TOML configuration -> frozen, typed model (`load_config`, `parse_config`).

`model` holds the dataclasses and the choices (`StrEnum`s), `values` the value parsers, `reader`
what every section's loader shares (file, line, key in each error), and one module per section
(`gateway_section`, `vip_section`, `tls_section`); `loader` walks the document.
"""

from gateway.config.loader import config_from_dict, file_digest, load_config, parse_config
from gateway.config.model import (PERSISTENCE_KEYS, PROTOCOL_KEYS, Address, AdminRole, AdminUser,
                                  GroupSearch, LdapSettings,
                                  Algorithm, AtnaSettings, AtnaTransport, Check, ClientTls,
                                  Config, ConfigError, Failback, GatewaySettings, HealthConfig,
                                  Destination, InDoubt, InDoubtAnswer, MemberConfig,
                                  MessageRoute, Mode,
                                  NakCode, OnBusy, Persistence, PersistenceKey,
                                  PersistenceMethod, Protocol, Role, ServerTls, TlsVersion,
                                  Validation, VerifyClient, VipConfig, WhenNoneUp)
from gateway.config.values import (is_ip, is_loopback, is_unspecified, parse_address, parse_duration,
                                   parse_size)

__all__ = ["PERSISTENCE_KEYS", "PROTOCOL_KEYS", "Address", "AdminRole", "AdminUser", "Algorithm",
           "GroupSearch", "LdapSettings",
           "AtnaSettings", "AtnaTransport", "Check", "ClientTls", "Config", "ConfigError",
           "Destination", "Failback", "GatewaySettings", "HealthConfig", "InDoubt",
           "InDoubtAnswer",
           "MemberConfig", "MessageRoute", "Mode", "NakCode", "OnBusy", "Persistence",
           "PersistenceKey", "PersistenceMethod", "Protocol", "Role", "ServerTls", "TlsVersion",
           "Validation", "VerifyClient", "VipConfig", "WhenNoneUp", "config_from_dict",
           "file_digest", "is_ip", "is_loopback", "is_unspecified", "load_config", "parse_address", "parse_config", "parse_duration",
           "parse_size"]
