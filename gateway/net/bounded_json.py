"""JSON from outside the process (admin requests, peers' answers), bounded before it is parsed.

The standard parser recurses once per level of nesting: `[[[[...]]]]` a thousand deep raises
RecursionError, which is no ValueError and would cross every handler. Here the depth is counted
first (strings left out), so such a body is refused with a ValueError like any other bad JSON.
"""

from __future__ import annotations

import json
import re

MAX_DEPTH = 32  # the admin API's documents nest 4 deep; a config's status about 6
MAX_BYTES = 16 * 1024 * 1024  # a peer's /api/status for thousands of members fits

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]")


def loads(data: bytes, max_depth: int = MAX_DEPTH, max_bytes: int = MAX_BYTES):
    """The document in `data`; ValueError (saying why) when it is not JSON, is bigger than
    `max_bytes` or nests deeper than `max_depth`."""
    if len(data) > max_bytes:
        raise ValueError(f"JSON of {len(data)} bytes: more than {max_bytes}")
    depth = 0
    for bracket in _BRACKETS.finditer(_STRING.sub(b'""', data)):
        depth += 1 if bracket.group() in b"[{" else -1
        if depth > max_depth:
            raise ValueError(f"JSON nested more than {max_depth} levels deep")
    try:
        return json.loads(data)
    except RecursionError:  # depth counted on malformed text can miss; the parser cannot
        raise ValueError(f"JSON nested more than {max_depth} levels deep") from None
