"""Muster's certificate authority: root + online intermediate, agent and server certificates."""

from muster.server.ca.authority import (
    CA_FILES,
    DEFAULT_AGENT_LIFETIME,
    DEFAULT_BACKDATE,
    CAError,
    CertificateAuthority,
    IssuedCertificate,
)
from muster.server.ca.csr import (
    AgentPublicKey,
    CsrError,
    public_key_fingerprint,
    public_key_from_csr,
)
from muster.server.ca.server_cert import (
    ServerCertificate,
    ServerCertificates,
    certificate_not_after,
    ensure_server_certificate,
)
from muster.server.ca.signer import (
    KEY_TYPES,
    FileSigner,
    InMemorySigner,
    KeySigner,
    Signer,
    SoftwareKey,
    sign_certificate,
    sign_crl,
)

__all__ = [
    "CA_FILES",
    "DEFAULT_AGENT_LIFETIME",
    "DEFAULT_BACKDATE",
    "KEY_TYPES",
    "AgentPublicKey",
    "CAError",
    "CertificateAuthority",
    "CsrError",
    "FileSigner",
    "InMemorySigner",
    "IssuedCertificate",
    "KeySigner",
    "ServerCertificate",
    "ServerCertificates",
    "Signer",
    "SoftwareKey",
    "certificate_not_after",
    "ensure_server_certificate",
    "public_key_fingerprint",
    "public_key_from_csr",
    "sign_certificate",
    "sign_crl",
]
