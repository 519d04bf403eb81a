"""Which medgate code a process runs, as a digest of its source files.

A worker process is started by the leader as a new Python process, so it imports medgate from
disk. After an upgrade on disk (a package manager, pip) while the gateway runs, that is other
code than the leader's: it may read their control messages otherwise, or fail at every start.
The leader keeps the digest of the code it started with; a worker whose own differs exits
before it serves, and a reload that would start workers with it is refused.
"""

from __future__ import annotations

import hashlib
import importlib
from collections.abc import Iterable
from pathlib import Path

PACKAGES = ("gateway", "protocols", "health")  # what pyproject.toml installs


def package_roots() -> list[Path]:
    """The folders medgate's packages are imported from."""
    return [Path(str(importlib.import_module(name).__file__)).parent for name in PACKAGES]


def code_digest(roots: Iterable[Path] | None = None) -> str:
    """A digest of every .py file under `roots` (medgate's packages), by path within its
    package and content; an unreadable file counts as its error."""
    digest = hashlib.blake2b(digest_size=12)
    for root in roots if roots is not None else package_roots():
        for path in sorted(root.rglob("*.py")):
            try:
                content = path.read_bytes()
            except OSError as exc:
                content = f"unreadable: {exc.strerror}".encode()
            name = path.relative_to(root.parent).as_posix().encode()
            digest.update(len(name).to_bytes(4, "big") + name
                          + len(content).to_bytes(8, "big") + content)
    return digest.hexdigest()
