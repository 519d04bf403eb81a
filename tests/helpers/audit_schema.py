"""Validation of ATNA audit messages against DICOM PS3.15 A.5.1's schema
(tests/fixtures/audit-message.rng, the standard's RELAX NG in XML syntax)."""

from __future__ import annotations

import functools
from pathlib import Path

from lxml import etree

SCHEMA = Path(__file__).parent.parent / "fixtures" / "audit-message.rng"


@functools.cache
def _schema() -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(str(SCHEMA)))


def valid_audit_message(xml: bytes) -> etree._Element:
    """The parsed AuditMessage; AssertionError naming every schema error otherwise."""
    root = etree.fromstring(xml)
    schema = _schema()
    assert schema.validate(root), "; ".join(
        f"{error.message} (line {error.line})" for error in schema.error_log)
    return root
