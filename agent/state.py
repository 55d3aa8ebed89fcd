"""The agent's state dir: key, certificate chain, trust bundle, identity, outbox.

Layout (dir 0700)::

    agent.key      private key, 0600, made here and never sent anywhere
    agent.pem      certificate chain from the server (leaf first)
    bundle.pem     roots that verify the server
    bundle.version the version the server gave bundle.pem (absent: unknown)
    identity.json  agent_id, spiffe_id, agent_endpoint, pool, labels, not_after
    outbox/        one file per Result not yet acknowledged

With a key passphrase every key file (``agent.key``, its ``.next``, ``agent.key.reenroll``)
is encrypted PKCS#8, and a plain ``agent.key`` found at start is encrypted in place.

``identity.json`` is written last at enrollment, so its presence means "enrolled".
A renewal stages ``*.next`` files and commits by renaming them, ``agent.pem``
last; a crash half-way is rolled forward on the next load. A re-enrollment does the
same (with ``identity.json``), so the old key and certificate stay in place until the
new ones are complete: its key waits in ``agent.key.reenroll`` meanwhile, reused by a
retry so that the server returns the same certificate.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from muster.agent import keys
from muster.errors import ConfigError
from muster.files import (
    PRIVATE_FILE_MODE,
    PUBLIC_FILE_MODE,
    ensure_private_dir,
    fsync_dir,
    remove_durably,
    write_atomic,
)

log = logging.getLogger(__name__)

KEY_FILE = "agent.key"
CHAIN_FILE = "agent.pem"
BUNDLE_FILE = "bundle.pem"
BUNDLE_VERSION_FILE = "bundle.version"
IDENTITY_FILE = "identity.json"
OUTBOX_DIR = "outbox"
NEXT = ".next"
REENROLL_KEY_FILE = "agent.key.reenroll"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who the server says we are, as returned by enrollment."""

    agent_id: str
    spiffe_id: str
    agent_endpoint: str
    pool: str
    labels: dict[str, str] = field(default_factory=dict)
    not_after: str = ""
    """ISO 8601 expiry, for operators; the certificate itself is authoritative."""

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> Identity:
        raw: Any = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("identity.json must hold an object")
        labels = raw.get("labels") or {}
        if not isinstance(labels, dict):
            raise ValueError("identity.json labels must be an object")
        return cls(
            agent_id=str(raw["agent_id"]),
            spiffe_id=str(raw["spiffe_id"]),
            agent_endpoint=str(raw["agent_endpoint"]),
            pool=str(raw.get("pool", "")),
            labels={str(k): str(v) for k, v in labels.items()},
            not_after=str(raw.get("not_after", "")),
        )


@dataclass(frozen=True, slots=True)
class Credentials:
    """The PEM material for an mTLS channel. ``repr`` hides the key."""

    key_pem: bytes = field(repr=False)
    chain_pem: bytes
    bundle_pem: bytes

    @property
    def leaf(self) -> keys.LeafInfo:
        return keys.leaf_info(self.chain_pem)


class StateDir:
    """Reads and writes the state dir; every write is atomic and durable."""

    def __init__(self, path: Path, *, key_passphrase: bytes | None = None) -> None:
        self.path = path
        self._key_passphrase = key_passphrase
        """Encrypts the key files at rest when set (``--key-passphrase-file``)."""

    @property
    def key_path(self) -> Path:
        return self.path / KEY_FILE

    @property
    def chain_path(self) -> Path:
        return self.path / CHAIN_FILE

    @property
    def bundle_path(self) -> Path:
        return self.path / BUNDLE_FILE

    @property
    def bundle_version_path(self) -> Path:
        return self.path / BUNDLE_VERSION_FILE

    @property
    def identity_path(self) -> Path:
        return self.path / IDENTITY_FILE

    @property
    def reenroll_key_path(self) -> Path:
        return self.path / REENROLL_KEY_FILE

    @property
    def outbox_path(self) -> Path:
        return self.path / OUTBOX_DIR

    def ensure(self) -> None:
        """Create the dir (0700) and the outbox, and finish a renewal a crash interrupted."""
        ensure_private_dir(self.path)
        ensure_private_dir(self.outbox_path)
        self._recover_renewal()

    # Enrollment -----------------------------------------------------------

    def is_enrolled(self) -> bool:
        return self.identity_path.is_file()

    def enrollment_key(self) -> ec.EllipticCurvePrivateKey:
        """The key to enroll with: the one left by an interrupted enrollment, or a new one.

        Reusing it makes a retried Enroll (same token, same public key) return
        the same certificate instead of failing on a used-up token.
        """
        if self.key_path.is_file():
            key = self._read_key(self.key_path)
            log.info("reusing the key from an earlier, unfinished enrollment")
            return key
        key = keys.generate_key()
        write_atomic(self.key_path, self._key_file_pem(key), mode=PRIVATE_FILE_MODE)
        return key

    def discard_key(self) -> None:
        """Forget the enrollment key, so the next enrollment makes a fresh one."""
        with contextlib.suppress(FileNotFoundError):
            self.key_path.unlink()
            fsync_dir(self.path)

    def forget_identity(self) -> None:
        """Undo enrollment; the outbox stays. (Re-enrollment does not need this: it swaps
        the new credentials in atomically, see :meth:`save_reenrollment`.)"""
        for path in (self.identity_path, self.key_path, self.chain_path):
            path.unlink(missing_ok=True)
        fsync_dir(self.path)

    # Re-enrollment ----------------------------------------------------------

    def reenrollment_key(self) -> ec.EllipticCurvePrivateKey:
        """The key to re-enroll with, beside the current one (which stays in use until the
        new certificate is stored): the one an interrupted re-enrollment left, or a new
        one. Reusing it makes a retry with the same token return the same certificate."""
        path = self.reenroll_key_path
        if path.is_file():
            key = self._read_key(path)
            current = self.chain_path.read_bytes() if self.chain_path.is_file() else b""
            if not (current and keys.cert_matches_key(current, key)):
                log.info("reusing the key from an earlier, unfinished re-enrollment")
                return key
        key = keys.generate_key()
        write_atomic(path, self._key_file_pem(key), mode=PRIVATE_FILE_MODE)
        return key

    def save_reenrollment(
        self, chain_pem: bytes, bundle_pem: bytes, identity: Identity
    ) -> Credentials:
        """Swap in the re-enrolled key, certificate and identity together: staged as
        ``*.next`` files and committed by renaming, so a crash at any point leaves either
        the old credentials or the new ones, never a mix."""
        key = self._read_key(self.reenroll_key_path)
        if not keys.cert_matches_key(chain_pem, key):
            raise ConfigError("the server re-enrolled a certificate for a different key")
        key_pem = keys.key_to_pem(key)
        _check_roots(bundle_pem)
        remove_durably(self.bundle_version_path)  # first: the new bundle's version is unknown
        staged = [
            (self.key_path, self._key_file_pem(key), PRIVATE_FILE_MODE),
            (self.bundle_path, bundle_pem, PUBLIC_FILE_MODE),
            (self.identity_path, identity.to_json(), PRIVATE_FILE_MODE),
            (self.chain_path, chain_pem, PUBLIC_FILE_MODE),  # last: its .next marks "complete"
        ]
        for path, data, mode in staged:
            write_atomic(_next(path), data, mode=mode)
        self._recover_renewal()
        self.reenroll_key_path.unlink(missing_ok=True)
        fsync_dir(self.path)
        return Credentials(key_pem=key_pem, chain_pem=chain_pem, bundle_pem=bundle_pem)

    def save_enrollment(self, chain_pem: bytes, bundle_pem: bytes, identity: Identity) -> None:
        """Store what Enroll returned; ``identity.json`` goes last as the commit."""
        _check_roots(bundle_pem)
        remove_durably(self.bundle_version_path)  # first: the new bundle's version is unknown
        write_atomic(self.bundle_path, bundle_pem, mode=PUBLIC_FILE_MODE)
        write_atomic(self.chain_path, chain_pem, mode=PUBLIC_FILE_MODE)
        write_atomic(self.identity_path, identity.to_json(), mode=PRIVATE_FILE_MODE)

    # Loading --------------------------------------------------------------

    def load_identity(self) -> Identity:
        try:
            return Identity.from_json(self.identity_path.read_bytes())
        except FileNotFoundError as err:
            raise ConfigError(
                f"{self.path} holds no agent identity: enroll first with --server and --token"
            ) from err
        except (ValueError, KeyError) as err:
            raise ConfigError(f"{self.identity_path} is damaged: {err}") from err

    def load_credentials(self) -> Credentials:
        """Key, chain and bundle, checked to belong together."""
        try:
            key_pem = self.key_path.read_bytes()
            chain_pem = self.chain_path.read_bytes()
            bundle_pem = self.bundle_path.read_bytes()
        except FileNotFoundError as err:
            raise ConfigError(
                f"{self.path} is incomplete ({Path(str(err.filename)).name} is missing); "
                "enroll again with a new bootstrap token"
            ) from err
        mode = self.key_path.stat().st_mode & 0o777
        if mode & 0o077:
            log.warning("%s had mode %o; tightening to 600", self.key_path, mode)
            self.key_path.chmod(PRIVATE_FILE_MODE)
        key = self._read_key(self.key_path, key_pem)
        if not keys.cert_matches_key(chain_pem, key):
            raise ConfigError(
                f"{self.chain_path} was not issued for {self.key_path}; "
                "enroll again with a new bootstrap token"
            )
        return Credentials(key_pem=keys.key_to_pem(key), chain_pem=chain_pem, bundle_pem=bundle_pem)

    # Trust bundle ---------------------------------------------------------

    def bundle_version(self) -> int:
        """The stored bundle's version; 0 when unknown (it came from Enroll, or from a
        server that does not version its bundle)."""
        try:
            return int(self.bundle_version_path.read_text())
        except FileNotFoundError:
            return 0
        except ValueError:
            log.warning(
                "%s is damaged; the trust bundle's version is unknown", self.bundle_version_path
            )
            return 0

    def save_trust_bundle(self, roots_pem: bytes, version: int) -> bytes | None:
        """Store the server's trust bundle if it is newer than ours, for the next
        connection; the roots stored, or None. A lower version (a replica that has not
        caught up) and a bundle without a PEM certificate are ignored. Version 0 (a server
        that does not version it) replaces only a bundle of unknown version. The bundle
        is written before its version: after a crash between the two, the next copy of
        that version writes it again."""
        stored = self.bundle_version()
        if version < stored or (version == stored and version > 0):
            if version < stored:
                log.info("ignoring trust bundle version %d: version %d is stored", version, stored)
            return None
        try:
            count = _check_roots(roots_pem)
        except ConfigError as err:
            log.warning("ignoring trust bundle version %d: %s", version, err)
            return None
        write_atomic(self.bundle_path, roots_pem, mode=PUBLIC_FILE_MODE)
        if version > 0:
            write_atomic(self.bundle_version_path, f"{version}\n".encode(), mode=PUBLIC_FILE_MODE)
        log.info(
            "stored trust bundle version %d (%d root(s)); the next connection verifies the "
            "server with it",
            version,
            count,
        )
        return roots_pem

    # Renewal --------------------------------------------------------------

    def save_renewal(
        self, key: ec.EllipticCurvePrivateKey, chain_pem: bytes, bundle_pem: bytes
    ) -> Credentials:
        """Swap in a renewed key and certificate so that a crash never pairs old with new."""
        key_pem = keys.key_to_pem(key)
        if not keys.cert_matches_key(chain_pem, key):
            raise ConfigError("the server renewed a certificate for a different key")
        staged = [
            (self.key_path, self._key_file_pem(key), PRIVATE_FILE_MODE),
            (self.bundle_path, bundle_pem or self.bundle_path.read_bytes(), PUBLIC_FILE_MODE),
            (self.chain_path, chain_pem, PUBLIC_FILE_MODE),  # last: its .next marks "complete"
        ]
        for path, data, mode in staged:
            write_atomic(_next(path), data, mode=mode)
        self._recover_renewal()
        with contextlib.suppress(ConfigError):
            identity = self.load_identity()
            not_after = keys.leaf_info(chain_pem).not_after.isoformat()
            fields = {**asdict(identity), "not_after": not_after}
            write_atomic(self.identity_path, Identity(**fields).to_json())
        return Credentials(
            key_pem=key_pem, chain_pem=chain_pem, bundle_pem=self.bundle_path.read_bytes()
        )

    # Key files -------------------------------------------------------------

    def _key_file_pem(self, key: ec.EllipticCurvePrivateKey) -> bytes:
        """The bytes a key file holds: encrypted when a passphrase is configured."""
        return keys.key_to_pem(key, self._key_passphrase)

    def _read_key(self, path: Path, pem: bytes | None = None) -> ec.EllipticCurvePrivateKey:
        """Load the key file ``path`` (``pem``: its bytes, if already read); with a
        passphrase configured, a plain file is replaced by an encrypted one at once."""
        if pem is None:
            pem = path.read_bytes()
        key = keys.load_key(pem, self._key_passphrase, name=str(path))
        if self._key_passphrase is not None and not keys.is_encrypted_pkcs8(pem):
            write_atomic(path, self._key_file_pem(key), mode=PRIVATE_FILE_MODE)
            log.info("encrypted %s with the key passphrase", path)
        return key

    def _recover_renewal(self) -> None:
        """Roll a staged renewal forward if it was complete, else drop the partial files."""
        complete = _next(self.chain_path).exists()
        for path in (self.key_path, self.bundle_path, self.identity_path, self.chain_path):
            staged = _next(path)
            if not staged.exists():
                continue
            if complete:
                staged.replace(path)
            else:
                staged.unlink()
        fsync_dir(self.path)


def _check_roots(roots_pem: bytes) -> int:
    """How many certificates a trust bundle holds; ConfigError if it holds none."""
    try:
        return len(x509.load_pem_x509_certificates(roots_pem))
    except ValueError:
        raise ConfigError("the trust bundle holds no readable PEM certificate") from None


def _next(path: Path) -> Path:
    return path.with_name(path.name + NEXT)
