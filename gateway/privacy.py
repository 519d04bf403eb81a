"""Keyed hashes of the identifiers the gateway keeps or sends to its peers: SOP Instance UIDs in
the receipts, PID-3 values and calling AE titles in table persistence (affinity.json, a pair's
pushes). HMAC-SHA-256 (RFC 2104) with a key of the site's, `[gateway] hash_key_file` (by default
`state_dir/hash.key`, made at the first start): without the key a hash cannot be tested against
a guessed patient ID, as a plain SHA-256 of a short identifier can. Both nodes of a pair use the
same file, so their hashes match; the drift check compares the keys' fingerprints.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

PREFIX = "hmac:"  # a hashed value: "hmac:" and the first 128 bits of the HMAC, in hex
KEY_FILE = "hash.key"  # in state_dir, when hash_key_file is not set
MIN_KEY = 32  # characters of a key file (a made one: 64 hex digits, 256 bits)
RECENT = 4096  # values whose hash is kept in memory (a calling AE is hashed a few times an
# association, and the same modalities call all day); all are forgotten when it fills


class HashKeyError(Exception):
    """The key file cannot be read or made; `reason` says which file and why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class KeyedHash:
    """`hasher(value)` -> "hmac:<32 hex digits>"; the key is loaded at start (`load`), or
    made for this process only when the gateway keeps nothing (no state_dir, no key file)."""

    def __init__(self, key: bytes | None = None) -> None:
        self._key = key
        self._recent: dict[str, str] = {}  # value -> its hash, with this key

    def __call__(self, value: str) -> str:
        hashed = self._recent.get(value)
        if hashed is not None:
            return hashed
        if self._key is None:
            self._key = secrets.token_bytes(32)  # nothing kept: a key for this process
        hashed = PREFIX + hmac.digest(self._key, value.encode("utf-8", "surrogateescape"),
                                      "sha256").hex()[:32]
        if len(self._recent) >= RECENT:
            self._recent.clear()
        self._recent[value] = hashed
        return hashed

    def fingerprint(self) -> str:
        """Names the key without giving it away (a pair's drift check compares these)."""
        return self("medgate hash key fingerprint").removeprefix(PREFIX)[:16]

    def load(self, path: str, *, create: bool = True) -> None:
        """Take the key in `path`, made (0600, 64 random hex digits) when absent and
        `create`; HashKeyError when it cannot be read, is too short, or cannot be made."""
        file = Path(path)
        try:
            # An empty file is what a start cut short left (a full disk, a crash): no value
            # was ever hashed with it, and a new key replaces it
            if create and (not file.exists() or not file.read_bytes().strip()):
                _make_key(file)
            text = file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise HashKeyError(f"hash key {path}: {getattr(exc, 'strerror', None) or exc}") \
                from None
        if len(text) < MIN_KEY:
            raise HashKeyError(f"hash key {path}: {len(text)} characters, at least {MIN_KEY} "
                               "needed (a made one has 64 hex digits)")
        self._key = text.encode("utf-8")
        self._recent.clear()  # hashes made with the key before


def _make_key(file: Path) -> None:
    """64 random hex digits in `file` (0600), whole or not at all: written to a file of its
    own first, then linked in place (one made meanwhile by another process is kept), or put
    in place of an empty one."""
    made = file.with_name(f".{file.name}.{os.getpid()}.new")
    try:
        descriptor = os.open(made, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(secrets.token_hex(32) + "\n")
            out.flush()
            os.fsync(out.fileno())
        if file.exists():
            os.replace(made, file)
        else:
            try:
                os.link(made, file)
            except FileExistsError:
                pass  # made meanwhile by another process: that one is read
    finally:
        made.unlink(missing_ok=True)


def is_hashed(value: str) -> bool:
    return value.startswith(PREFIX)


def key_path(state_dir: str, hash_key_file: str) -> str:
    """Where the key is: `hash_key_file`, else state_dir/hash.key, else "" (none kept)."""
    return hash_key_file or (str(Path(state_dir) / KEY_FILE) if state_dir else "")


def existing_key(state_dir: str, hash_key_file: str) -> KeyedHash | None:
    """The key a gateway with these settings made or was given, read without making one (for
    `gateway trace` and `check --peer`); None before there is one, HashKeyError if unreadable."""
    path = key_path(state_dir, hash_key_file)
    if not path or not Path(path).exists():
        return None
    hasher = KeyedHash()
    hasher.load(path, create=False)
    return hasher
