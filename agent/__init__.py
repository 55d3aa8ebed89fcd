"""The Muster agent daemon: enrolls once, holds one mTLS stream, runs tasks through executors."""

from muster._version import __version__

__all__ = ["__version__"]
