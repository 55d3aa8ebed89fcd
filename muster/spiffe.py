"""SPIFFE IDs: the one identity format Muster issues and accepts.

Agents are ``spiffe://<trust-domain>/agent/<agent-id>``; the server is
``spiffe://<trust-domain>/server``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Anchored with \A and \Z, never $ (which matches before a trailing newline), and used
# with fullmatch: an id that ends in a newline or holds a NUL must not pass.
_TRUST_DOMAIN = re.compile(r"\A[a-z0-9._-]{1,255}\Z")
_SEGMENT = re.compile(r"\A[A-Za-z0-9._-]+\Z")
AGENT_ID = re.compile(r"\A[a-z0-9][a-z0-9._-]{0,62}\Z")
"""What an agent id may look like: a DNS-label-like name, also safe in a URI path.

The one name grammar: the server checks pools, tenants and API token names with it too
(``muster.server.services.validation.NAME``). Use ``fullmatch``."""


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A parsed SPIFFE ID; construct with :meth:`parse` or the helpers below."""

    trust_domain: str
    path: str
    """The path without its leading slash, e.g. ``agent/build-01``."""

    @classmethod
    def parse(cls, value: str) -> SpiffeId:
        """Parse and validate ``spiffe://td/path``; raise ValueError saying what is wrong."""
        prefix = "spiffe://"
        if not value.startswith(prefix):
            raise ValueError(f"not a SPIFFE ID (must start with {prefix!r}): {value[:80]!r}")
        rest = value[len(prefix) :]
        trust_domain, sep, path = rest.partition("/")
        if not _TRUST_DOMAIN.fullmatch(trust_domain):
            raise ValueError(f"invalid trust domain in SPIFFE ID: {trust_domain[:80]!r}")
        if not sep or not path:
            raise ValueError("SPIFFE ID has no path")
        if any(not _SEGMENT.fullmatch(seg) or seg in (".", "..") for seg in path.split("/")):
            raise ValueError(f"invalid path in SPIFFE ID: {path[:80]!r}")
        return cls(trust_domain, path)

    @classmethod
    def for_agent(cls, trust_domain: str, agent_id: str) -> SpiffeId:
        if not AGENT_ID.fullmatch(agent_id):
            raise ValueError(
                f"invalid agent id {agent_id[:80]!r}: use 1-63 lower-case letters, digits, "
                "'.', '_' or '-', starting with a letter or digit"
            )
        return cls.parse(f"spiffe://{trust_domain}/agent/{agent_id}")

    @classmethod
    def for_server(cls, trust_domain: str) -> SpiffeId:
        return cls.parse(f"spiffe://{trust_domain}/server")

    @property
    def agent_id(self) -> str | None:
        """The agent id when this names an agent, else None."""
        kind, _, name = self.path.partition("/")
        if kind == "agent" and AGENT_ID.fullmatch(name):
            return name
        return None

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/{self.path}"
