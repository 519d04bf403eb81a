"""TOML configuration -> frozen, typed model (`load_config`, `parse_config`).

`model` holds the dataclasses, `values` the value parsers, `loader` the file-and-line-aware
reader with one module per section (`gateway_section`, `vip_section`, `tls_section`).
"""

from gateway.config.loader import config_from_dict, load_config, parse_config
from gateway.config.model import (ADMIN_ROLES, ALGORITHMS, CHECKS, MODES, NAK_CODES,
                                  PERSISTENCE_KEYS, PERSISTENCE_METHODS, PROTOCOL_KEYS, PROTOCOLS,
                                  ROLES, Address, AdminUser, AtnaSettings, ClientTls, Config,
                                  ConfigError, Failback, GatewaySettings, HealthConfig, InDoubt,
                                  InDoubtAnswer, MemberConfig, MessageRoute, OnBusy, Persistence,
                                  ServerTls, VipConfig, WhenNoneUp)
from gateway.config.values import is_loopback, parse_address, parse_duration, parse_size

__all__ = ["ADMIN_ROLES", "ALGORITHMS", "CHECKS", "MODES", "NAK_CODES", "PERSISTENCE_KEYS",
           "PERSISTENCE_METHODS", "PROTOCOL_KEYS", "PROTOCOLS", "ROLES", "Address", "AdminUser",
           "AtnaSettings", "ClientTls", "Config", "ConfigError", "Failback", "GatewaySettings",
           "HealthConfig", "InDoubt", "InDoubtAnswer", "MemberConfig", "MessageRoute", "OnBusy",
           "Persistence", "ServerTls", "VipConfig", "WhenNoneUp", "config_from_dict",
           "is_loopback", "load_config", "parse_address", "parse_config", "parse_duration",
           "parse_size"]
