"""Enrolled agents for the scale scenarios, made without the enrollment RPC.

Enrolling 10,000 agents through ``EnrollmentService`` takes minutes per run on this
machine (the enrollment scenario measures that path). Idle agents and the reconnect
storm only need what enrollment leaves behind: a key, a certificate from the CA, and
the ``agents`` and ``certificates`` rows the identity interceptor checks. This writes
exactly those, with the server's own CA code and models.
"""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from bench.fleet import write_creds
from bench.simagent import Creds
from bench.stack import Stack
from muster.server.ca import CertificateAuthority
from muster.server.storage.database import Database
from muster.server.storage.models import Agent, Certificate
from muster.server.storage.types import utcnow

TRUST_DOMAIN = "muster.local"
POOL = "default"
BATCH = 1000


async def seed_agents(stack: Stack, count: int, path: Path, prefix: str) -> None:
    """Certify ``count`` fresh P-256 keys as agents ``prefix-<i>``, record them, and write
    their credentials to ``path`` for the fleet processes."""
    ca = CertificateAuthority.load(stack.workdir / "ca-src" / "ca", TRUST_DOMAIN)
    db = Database(stack.database_url, audit_chain="bench-seed")
    creds: list[Creds] = []
    try:
        for start in range(0, count, BATCH):
            rows: list[Agent | Certificate] = []
            now = utcnow()
            for i in range(start, min(count, start + BATCH)):
                agent_id = f"{prefix}-{i}"
                key = ec.generate_private_key(ec.SECP256R1())
                issued = ca.issue_agent_certificate(key.public_key(), agent_id)
                rows.append(
                    Agent(agent_id=agent_id, pool=POOL, labels={}, enabled=True,
                          token_id="bench-seed", enrolled_at=now)
                )  # fmt: skip
                rows.append(
                    Certificate(serial=issued.serial, agent_id=agent_id,
                                public_key_fingerprint=issued.public_key_fingerprint,
                                token_id=None, reason="enroll", chain_pem=issued.chain_pem,
                                not_before=issued.not_before, not_after=issued.not_after)
                )  # fmt: skip
                key_pem = key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                creds.append(
                    Creds(agent_id, key_pem.decode(), issued.chain_pem.decode(),
                          ca.bundle_pem.decode())
                )  # fmt: skip
            async with db.transaction() as session:
                # Agents first: the certificates reference them.
                session.add_all([r for r in rows if isinstance(r, Agent)])
                await session.flush()
                session.add_all([r for r in rows if isinstance(r, Certificate)])
    finally:
        await db.close()
    write_creds(path, creds)
