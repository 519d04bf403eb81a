"""medgate: a protocol-aware gateway for hospital imaging and information systems."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medgate")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"

# The DICOM Implementation Version Name of the gateway's own associations (health checks):
# 16 characters at most (PS3.7 D.3.3.2), e.g. "MEDGATE_0.3.0".
IMPLEMENTATION_VERSION = f"MEDGATE_{__version__}"[:16]
