"""What every section loader shares: where the text came from, and how to fail or warn there."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from gateway.config.model import ConfigError

# ("gateway" | "defaults" | "vip" | "member" | "destination" | "", vip index, member or
# destination index); -1 where none.
Section = tuple[str, int, int]
Parsed = TypeVar("Parsed")


class SectionReader:
    """Keeps the source's name and lines so that every error can name file, line and key."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.lines = text.splitlines()
        self.warnings: list[str] = []

    def fail(self, section: Section, context: str, key: str | None, why: str) -> NoReturn:
        raise ConfigError(self._where(section, key) + ": ".join(
            part for part in (context, key, why) if part))

    def warn(self, section: Section, context: str, key: str | None, why: str) -> None:
        """Something allowed but likely wrong: kept with file:line, logged at start."""
        self.warnings.append(self._where(section, key) + ": ".join(
            part for part in (context, key, why) if part))

    def parse(self, section: Section, context: str, key: str,
              parser: Callable[[Any], Parsed], value: Any) -> Parsed:
        """`parser(value)`; its ValueError becomes this file's error at `key`."""
        try:
            return parser(value)
        except ValueError as exc:
            self.fail(section, context, key, str(exc))

    def beside_config(self, text: str) -> Path:
        """A path from the file: relative ones are relative to the config file, not the cwd."""
        path = Path(text)
        return path if path.is_absolute() else Path(self.source).parent / path

    def _where(self, section: Section, key: str | None) -> str:
        line = self.find_line(section, key)
        return f"{self.source}:{line}: " if line else f"{self.source}: "

    def find_line(self, section: Section, key: str | None) -> int | None:
        """Line number of `key` in a section, else of the section's header."""
        vips = members = destinations = -1
        current: Section | None = None
        header_line = None
        for number, raw in enumerate(self.lines, start=1):
            line = raw.strip()
            if line.startswith("[[vip.member]]"):
                members += 1
                current = ("member", vips, members)
            elif line.startswith("[[vip.destination]]"):
                destinations += 1
                current = ("destination", vips, destinations)
            elif line.startswith("[[vip]]"):
                vips, members, destinations = vips + 1, -1, -1
                current = ("vip", vips, -1)
            elif line.startswith("["):
                current = (line.strip("[] ").split(".")[0], -1, -1)
            else:
                if current == section and key and re.match(rf"{re.escape(key)}\s*=", line):
                    return number
                continue
            if current == section:
                header_line = number
        return header_line
