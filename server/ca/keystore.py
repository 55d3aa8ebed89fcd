"""Where CA private keys live, named by a reference that the database may store.

A key reference is ``file:<path relative to the CA directory>`` (a PEM key, mode
0600) or, with an HSM configured, ``pkcs11:<label>`` (see
:mod:`muster.server.ca.pkcs11`). The reference is all that leaves the key store:
the CA's state in the database names keys, never holds them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cryptography import x509

from muster.files import PRIVATE_FILE_MODE, ensure_private_dir, write_atomic
from muster.server.ca.signer import (
    CAPublicKey,
    KeySigner,
    SoftwareKey,
    generate_key,
    load_private_key,
    private_key_pem,
)

if TYPE_CHECKING:
    from muster.server.config import ServerConfig

FILE_PREFIX = "file:"
PKCS11_PREFIX = "pkcs11:"
KEYS_DIR = "keys"
"""Keys made by rotations live in ``<ca dir>/keys/``; ``init``'s keep their old names."""


class KeyStore(Protocol):
    """Makes and opens CA keys by reference."""

    def create(self, key_type: str, name: str) -> tuple[KeySigner, str]:
        """A new key of ``key_type`` (see ``signer.KEY_TYPES``) called ``name``: (signer, ref).

        Raises FileExistsError (or the backend's equivalent) if ``name`` is taken."""
        ...

    def open(self, ref: str) -> KeySigner:
        """The key ``ref`` names; ValueError when it is missing, unreadable or foreign."""
        ...


class FileKeyStore:
    """Keys as unencrypted PKCS#8 PEM files (0600) in the CA directory."""

    def __init__(self, ca_dir: Path) -> None:
        self.ca_dir = Path(ca_dir)

    def create(self, key_type: str, name: str) -> tuple[KeySigner, str]:
        key = generate_key(key_type)
        ensure_private_dir(self.ca_dir / KEYS_DIR)
        relative = f"{KEYS_DIR}/{name}.key"
        write_atomic(
            self.ca_dir / relative, private_key_pem(key), mode=PRIVATE_FILE_MODE, overwrite=False
        )
        return SoftwareKey(key), FILE_PREFIX + relative

    def open(self, ref: str) -> KeySigner:
        if not ref.startswith(FILE_PREFIX):
            raise ValueError(f"key reference {ref[:80]!r} is not a file key")
        relative = Path(ref.removeprefix(FILE_PREFIX))
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"key reference {ref[:80]!r} leaves the CA directory")
        path = self.ca_dir / relative
        try:
            pem = path.read_bytes()
        except OSError as err:
            raise ValueError(f"cannot read CA key {path}: {err.strerror or err}") from None
        return SoftwareKey(load_private_key(pem, what=str(path)))


def key_store(config: ServerConfig) -> KeyStore:
    """The key store the configuration names: key files in the CA directory, or with
    ``ca_signer = pkcs11:...`` an HSM, which makes every new key while ``file:`` keys
    (a root imported from the CA directory) still open from their files."""
    files = FileKeyStore(config.ca_dir)
    if not config.ca_signer.startswith(PKCS11_PREFIX):
        return files
    from muster.server.ca.pkcs11 import Pkcs11KeyStore  # only with an HSM: loads its binding

    return _ByPrefix(Pkcs11KeyStore.from_spec(config.ca_signer), files)


class _ByPrefix:
    """Creates keys in ``primary``; opens each reference from the store its prefix names."""

    def __init__(self, primary: KeyStore, files: FileKeyStore) -> None:
        self._primary = primary
        self._files = files

    def create(self, key_type: str, name: str) -> tuple[KeySigner, str]:
        return self._primary.create(key_type, name)

    def open(self, ref: str) -> KeySigner:
        if ref.startswith(FILE_PREFIX):
            return self._files.open(ref)
        return self._primary.open(ref)


class CertifiedKey:
    """A :class:`~muster.server.ca.signer.Signer`: a key from any store and its certificate."""

    def __init__(self, certificate: x509.Certificate, key: KeySigner) -> None:
        if certificate.public_key() != key.public_key():
            raise ValueError("the CA key does not belong to its certificate")
        self._certificate = certificate
        self._key = key

    @property
    def certificate(self) -> x509.Certificate:
        return self._certificate

    def public_key(self) -> CAPublicKey:
        return self._key.public_key()

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)
