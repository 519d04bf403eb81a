"""medgate: a protocol-aware gateway for hospital imaging and information systems."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medgate")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+source"
