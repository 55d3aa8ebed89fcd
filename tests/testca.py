"""Certificates for tests, minted by Muster's own CA code (in the spirit of spire's test/testca).

``TestCA.new()`` is an in-memory root + intermediate; ``mint_agent`` goes through
the real issuing policy, ``mint_client`` signs whatever SANs and dates a
negative test needs through the same Signer seam. A second ``TestCA.new()`` is
the foreign CA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from muster.server.ca import CertificateAuthority
from muster.server.ca.authority import INTERMEDIATE_LIFETIME, random_serial
from muster.server.ca.signer import SigningKey, private_key_pem, sign_certificate

DEFAULT_TEST_LIFETIME = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class Credentials:
    """A client identity as an agent would hold it on disk."""

    private_key_pem: bytes
    chain_pem: bytes
    """The leaf, then the intermediate."""
    serial: str
    spiffe_id: str | None
    """The URI SAN when there is exactly one, else None."""
    certificate: x509.Certificate

    def channel_credentials(self, trust_bundle_pem: bytes) -> grpc.ChannelCredentials:
        """mTLS credentials presenting this identity and trusting ``trust_bundle_pem``."""
        return grpc.ssl_channel_credentials(
            root_certificates=trust_bundle_pem,
            private_key=self.private_key_pem,
            certificate_chain=self.chain_pem,
        )


class TestCA:
    """One trust domain's CA for a test session; cheap enough to make many."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca

    @classmethod
    def new(
        cls,
        trust_domain: str = "example.org",
        *,
        key_type: str = "ec-p256",
        name_constraints: bool = False,
        intermediate_lifetime: timedelta = INTERMEDIATE_LIFETIME,
    ) -> TestCA:
        return cls(
            CertificateAuthority.generate(
                trust_domain,
                key_type=key_type,
                name_constraints=name_constraints,
                intermediate_lifetime=intermediate_lifetime,
            )
        )

    @property
    def trust_domain(self) -> str:
        return self.ca.trust_domain

    @property
    def bundle_pem(self) -> bytes:
        return self.ca.bundle_pem

    def mint_agent(
        self,
        agent_id: str,
        *,
        lifetime: timedelta = DEFAULT_TEST_LIFETIME,
        key: SigningKey | None = None,
    ) -> Credentials:
        """An agent certificate exactly as enrollment would issue it."""
        key = key or ec.generate_private_key(ec.SECP256R1())
        issued = self.ca.issue_agent_certificate(key.public_key(), agent_id, lifetime=lifetime)
        return Credentials(
            private_key_pem=private_key_pem(key),
            chain_pem=issued.chain_pem,
            serial=issued.serial,
            spiffe_id=issued.spiffe_id,
            certificate=issued.certificate,
        )

    def mint_client(
        self,
        *,
        uris: Sequence[str],
        dns_names: Sequence[str] = (),
        lifetime: timedelta = DEFAULT_TEST_LIFETIME,
        not_before: datetime | None = None,
        key: SigningKey | None = None,
        usages: Sequence[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.CLIENT_AUTH,),
        common_name: str = "test client",
    ) -> Credentials:
        """A client certificate outside the issuing policy: any SANs, any dates.

        Valid from ``not_before`` (default now) for ``lifetime``; pass a past
        ``not_before`` and a short lifetime for an expired certificate.
        """
        key = key or ec.generate_private_key(ec.SECP256R1())
        issuer = self.ca.signer.certificate
        start = not_before or datetime.now(UTC) - timedelta(minutes=1)
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        sans += [x509.DNSName(d) for d in dns_names]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(issuer.subject)
            .public_key(key.public_key())
            .serial_number(random_serial())
            .not_valid_before(start)
            .not_valid_after(start + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                    issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
                ),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if usages:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        cert = sign_certificate(self.ca.signer, builder)
        return Credentials(
            private_key_pem=private_key_pem(key),
            chain_pem=cert.public_bytes(serialization.Encoding.PEM) + self.ca.intermediate_pem,
            serial=format(cert.serial_number, "x"),
            spiffe_id=uris[0] if len(uris) == 1 else None,
            certificate=cert,
        )

    def server_credentials(
        self,
        hostnames: Sequence[str] = ("localhost",),
        ips: Sequence[str] = ("127.0.0.1",),
    ) -> tuple[bytes, bytes]:
        """(chain PEM, key PEM) for a server listener, as the real server gets them."""
        return self.ca.issue_server_certificate(dns_names=hostnames, ip_addresses=ips)
