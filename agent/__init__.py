"""The Muster agent daemon: enrolls once, holds one mTLS stream, runs tasks through executors."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("muster")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
