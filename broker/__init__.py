"""sse-broker: a Server-Sent Events fan-out broker."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("sse-broker")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
