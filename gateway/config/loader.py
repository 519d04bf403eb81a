"""Reads a TOML file or document into the model, section by section.

Rule: every error is a `ConfigError` whose text names the file, the line where it can be found,
and the key path (`examples/x.toml:14: vip "dicom" member "pacs1": address "10.0.0.1": missing
port`), so an engineer can fix the file without reading code.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import replace
from pathlib import Path
from typing import Any

from gateway.config.gateway_section import GatewaySection
from gateway.config.model import (Address, Config, ConfigError, GatewaySettings, Mode, Protocol,
                                  VipConfig)
from gateway.config.reader import Section
from gateway.config.values import did_you_mean, unknown_key
from gateway.config.vip_section import DEFAULTABLE, VipSection

def file_digest(path: str) -> str:
    """The first 16 hex digits of a config file's SHA-256 ('' when it cannot be read): which
    content was running before and after a reload, and whether the file still is it."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return ""


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; raises ConfigError naming the file, line and key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    return parse_config(text, source=str(path))


def parse_config(text: str, source: str = "<string>") -> Config:
    """Validate TOML text; `source` names it in error messages."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = re.search(r"at line (\d+)", str(exc))
        where = f"{source}:{line.group(1)}" if line else source
        raise ConfigError(f"{where}: not valid TOML: {exc}") from None
    return replace(_Loader(text, source).load(document), text=text)


def config_from_dict(document: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a config given as data (the TOML document's shape), e.g. from a test."""
    return _Loader("", source).load(document)


class _Loader(GatewaySection, VipSection):
    """Walks the TOML document, keeping where it is so errors can name file, line and key."""

    # -- top level

    def load(self, document: dict[str, Any]) -> Config:
        top: Section = ("", -1, -1)
        for key in document:
            if key not in ("gateway", "defaults", "vip"):
                self.fail(top, "", key, "unknown section (expected [gateway], [defaults], "
                          f"[[vip]]){did_you_mean(key, ('gateway', 'defaults', 'vip'))}")
        gateway = self.load_gateway(document.get("gateway", {}))
        defaults = document.get("defaults", {})
        if not isinstance(defaults, dict):
            self.fail(top, "", "defaults", "must be a table")
        for key in defaults:
            if key not in DEFAULTABLE:
                self.fail(("defaults", -1, -1), "[defaults]", key, unknown_key(key, DEFAULTABLE))
        raw_vips = document.get("vip", [])
        if not isinstance(raw_vips, list) or not raw_vips:
            self.fail(top, "", "vip", "define at least one [[vip]]")
        vips: list[VipConfig] = []
        for index, raw in enumerate(raw_vips):
            vip = self.load_vip(index, raw, defaults)
            if any(v.name == vip.name for v in vips):
                self.fail(("vip", index, -1), f"vip {vip.name!r}", "name", "duplicate VIP name")
            vips.append(vip)
        self.check_listen_conflicts(vips)
        self.check_workflow_with_workers(gateway, vips, raw_vips)
        return Config(gateway=gateway, vips=tuple(vips), source=self.source,
                      warnings=tuple(self.warnings))

    def check_workflow_with_workers(self, gateway: GatewaySettings, vips: list[VipConfig],
                                    raw_vips: list[Any]) -> None:
        """Warn where workers can split a modality's workflow: without study affinity, a
        storage commitment (an MPPS N-SET) follows its images (its N-CREATE) only through
        the workflow memory, which reaches the other workers ~150 ms after it is made."""
        if gateway.workers < 2:
            return
        for index, vip in enumerate(vips):
            if (vip.protocol == Protocol.DICOM and vip.persistence is None
                    and vip.mode == Mode.BALANCE and len(vip.members) > 1):
                key = "study_window" if "study_window" in raw_vips[index] else "persistence"
                self.warn(("vip", index, -1), f"vip {vip.name!r}", key,
                          f"with workers = {gateway.workers} and no study affinity, a storage "
                          "commitment or MPPS N-SET sent right after its images or N-CREATE "
                          "may reach another member: the other workers learn where they "
                          "went ~150 ms later; keep a study window (the default)")

    def check_listen_conflicts(self, vips: list[VipConfig]) -> None:
        seen: dict[Address, str] = {}
        for index, vip in enumerate(vips):
            for address in vip.listen:
                if address.port == 0:
                    continue  # ephemeral: the kernel picks distinct ports
                if address in seen:
                    self.fail(("vip", index, -1), f"vip {vip.name!r}", "listen",
                              f"{address} is already used by vip {seen[address]!r}")
                seen[address] = vip.name
