"""The installed version of Muster, whichever of its distributions brought this code.

``pip install .`` installs the whole of Muster as one distribution; the SDK, the agent and
the server can also be installed alone, each as its own distribution with the same
version. Whichever owns the installed ``muster`` package answers.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

DISTRIBUTIONS = ("muster-fleet", "muster-fleet-sdk", "muster-fleet-agent", "muster-fleet-server")
"""Every distribution Muster ships, the whole first."""

UNKNOWN = "0+unknown"
"""The version of a source tree that was never installed."""


def installed_version() -> str:
    for name in DISTRIBUTIONS:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return UNKNOWN


__version__ = installed_version()
