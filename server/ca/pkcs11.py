"""CA keys in a PKCS#11 token (an HSM; SoftHSM2 in tests): made there, used there, never read out.

Selected by ``MUSTER_CA_SIGNER`` (:attr:`ServerConfig.ca_signer`), ``pkcs11:`` then
``;``-separated ``name=value`` attributes, in any order, each exactly once::

    pkcs11:module=/usr/lib/softhsm/libsofthsm2.so;token=muster;pin-file=/etc/muster/hsm.pin

``module``    the PKCS#11 library of the HSM (an absolute path)
``token``     the label of the token that holds the keys
``pin-file``  a file holding the user PIN (one trailing newline is ignored)

The PIN is only ever in that file: never in this setting, on a command line or in an
environment variable, and no message quotes it (nor the value of an attribute that is
not one of the three, which might be one). A key is named by the reference
``pkcs11:<label>`` (its ``CKA_LABEL``, 1 to 64 of ``A-Z a-z 0-9 . _ -``), which the
CA's state records: the token to look in is always the configured one.

Keys are generated in the token as EC P-256, P-384 or Ed25519 pairs, private
``CKA_SENSITIVE`` and not ``CKA_EXTRACTABLE``, allowed to sign and nothing else. Signing
hashes in this process and has the token sign the digest (``CKM_ECDSA``, whose raw
``r || s`` becomes X.509's DER ``Ecdsa-Sig-Value``) or the message (``CKM_EDDSA``).
A process logs in to a token once; each key gets one session, used under a lock.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from muster.errors import ConfigError
from muster.server.ca.authority import CAError
from muster.server.ca.der import DERError, read_element
from muster.server.ca.signer import CAPublicKey, KeySigner, signature_hash

if TYPE_CHECKING:
    import pkcs11

logger = logging.getLogger(__name__)

PREFIX = "pkcs11:"
_ATTRIBUTES = ("module", "token", "pin-file")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# DER of the curve identifiers a token reports in CKA_EC_PARAMS.
_P256 = bytes.fromhex("06082a8648ce3d030107")  # OID prime256v1
_P384 = bytes.fromhex("06052b81040022")  # OID secp384r1
_ED25519 = (
    bytes.fromhex("06032b6570"),  # OID id-Ed25519
    bytes.fromhex("130c") + b"edwards25519",  # PrintableString, as PKCS#11 3.0 also allows
)
_CURVES: dict[bytes, ec.EllipticCurve] = {_P256: ec.SECP256R1(), _P384: ec.SECP384R1()}


class TokenError(CAError, ValueError):
    """The token cannot be reached, logged in to, or asked to make or use a key.

    A :class:`CAError` (issuing answers FAILED_PRECONDITION) and a ``ValueError`` (what
    a :class:`~muster.server.ca.keystore.KeyStore` raises for a key it cannot open)."""


@dataclass(frozen=True, slots=True)
class Pkcs11Spec:
    """A parsed ``MUSTER_CA_SIGNER`` value."""

    module: Path
    token: str
    pin_file: Path


def parse_spec(spec: str) -> Pkcs11Spec:
    """Read ``pkcs11:module=...;token=...;pin-file=...``; ConfigError says what is wrong."""
    if not spec.startswith(PREFIX):
        raise ConfigError(
            "ca_signer: must be empty (key files) or pkcs11:module=LIBRARY;token=LABEL;"
            "pin-file=PATH"
        )
    values: dict[str, str] = {}
    for part in spec.removeprefix(PREFIX).split(";"):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in _ATTRIBUTES:
            # Never echo the part: a PIN put here by mistake must not reach a log.
            hint = " (the PIN goes in a file: pin-file=PATH)" if "pin" in name.lower() else ""
            raise ConfigError(
                f"ca_signer: expected name=value with a name among {', '.join(_ATTRIBUTES)}{hint}"
            )
        if name in values:
            raise ConfigError(f"ca_signer: {name} is given twice")
        if not value.strip():
            raise ConfigError(f"ca_signer: {name} is empty")
        values[name] = value.strip()
    if missing := [name for name in _ATTRIBUTES if name not in values]:
        raise ConfigError(f"ca_signer: missing {', '.join(missing)}")
    module = Path(values["module"])
    if not module.is_absolute():
        raise ConfigError(f"ca_signer: module must be an absolute path, not {values['module']!r}")
    return Pkcs11Spec(module=module, token=values["token"], pin_file=Path(values["pin-file"]))


def read_pin(path: Path) -> str:
    """The PIN in ``path`` without one trailing newline; errors name the file, not the PIN."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise TokenError(f"cannot read the PIN file {path}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise TokenError(f"the PIN file {path} is not UTF-8 text") from None
    pin = text.removesuffix("\n").removesuffix("\r")
    if not pin:
        raise TokenError(f"the PIN file {path} is empty")
    return pin


def label_of(ref: str) -> str:
    """The key label a ``pkcs11:<label>`` reference names."""
    if not ref.startswith(PREFIX):
        raise TokenError(f"key reference {ref[:80]!r} is not a PKCS#11 key ({PREFIX}<label>)")
    label = ref.removeprefix(PREFIX)
    if not _LABEL.match(label):
        raise TokenError(
            f"key reference {ref[:80]!r}: a label is 1-64 of A-Z a-z 0-9 . _ - "
            "(starting with a letter or digit)"
        )
    return label


_stores: dict[Pkcs11Spec, Pkcs11KeyStore] = {}
_stores_lock = threading.Lock()


class Pkcs11KeyStore:
    """A :class:`~muster.server.ca.keystore.KeyStore` over one token, logged in as its user."""

    def __init__(self, spec: Pkcs11Spec, token: pkcs11.Token, session: pkcs11.Session) -> None:
        self.spec = spec
        self._token = token
        self._session = session  # logged in; kept open: login state ends with the last session
        self._lock = threading.Lock()
        self._keys: dict[str, TokenKey] = {}

    @classmethod
    def from_spec(cls, spec: str) -> Pkcs11KeyStore:
        """The store ``spec`` configures, logged in with the PIN from its file.

        One per spec per process: every call with the same spec returns the same store."""
        parsed = parse_spec(spec)
        with _stores_lock:
            store = _stores.get(parsed)
            if store is None:
                store = _stores[parsed] = cls._connect(parsed)
            return store

    @classmethod
    def _connect(cls, spec: Pkcs11Spec) -> Pkcs11KeyStore:
        try:
            import pkcs11
        except ImportError:
            raise ConfigError(
                "ca_signer: PKCS#11 support is not installed "
                "(pip install 'muster-fleet[hsm]' or 'muster-fleet-server[hsm]')"
            ) from None
        if not spec.module.is_file():
            raise TokenError(f"the PKCS#11 module {spec.module} does not exist")
        try:
            library = pkcs11.lib(str(spec.module))
            token = library.get_token(token_label=spec.token)
        except pkcs11.NoSuchToken:
            raise TokenError(f"{spec.module} has no token labelled {spec.token!r}") from None
        except (RuntimeError, OSError) as err:  # PKCS11Error is a RuntimeError
            raise TokenError(
                f"cannot reach token {spec.token!r} through {spec.module}: {type(err).__name__}"
            ) from None
        pin = read_pin(spec.pin_file)
        try:
            session = token.open(user_pin=pin)
        except pkcs11.UserAlreadyLoggedIn:
            # Another store of this process logged in to the token already (one login
            # per application); a session of ours shares it.
            session = token.open()
        except (pkcs11.PinIncorrect, pkcs11.PinLenRange, pkcs11.PinInvalid):
            raise TokenError(
                f"token {spec.token!r} refused the PIN in {spec.pin_file} (wrong PIN)"
            ) from None
        except pkcs11.PKCS11Error as err:
            raise TokenError(
                f"cannot log in to token {spec.token!r} with the PIN in {spec.pin_file}: "
                f"{type(err).__name__}"
            ) from None
        logger.info("logged in to PKCS#11 token %r (%s)", spec.token, spec.module)
        return cls(spec, token, session)

    def create(self, key_type: str, name: str) -> tuple[KeySigner, str]:
        """Generate a key pair called ``name`` in the token; FileExistsError if it is taken."""
        import pkcs11

        ref = PREFIX + name
        label = label_of(ref)
        if key_type not in _KEY_TYPES:
            raise TokenError(
                f"unknown key type {key_type[:40]!r}; choose one of {', '.join(_KEY_TYPES)}"
            )
        kind, params, generate = _KEY_TYPES[key_type]
        with self._lock:
            try:
                if pkcs11.Mechanism[generate] not in self._token.slot.get_mechanisms():
                    raise TokenError(
                        f"token {self.spec.token!r} cannot generate {key_type} keys "
                        f"(no CKM_{generate}); choose another key type"
                    )
                with self._token.open(rw=True) as session:
                    if any(True for _ in session.get_objects({pkcs11.Attribute.LABEL: label})):
                        raise FileExistsError(
                            f"token {self.spec.token!r} already holds a key labelled {label!r}"
                        )
                    session.generate_keypair(
                        pkcs11.KeyType[kind],
                        store=True,
                        label=label,
                        id=secrets.token_bytes(16),
                        capabilities=pkcs11.MechanismFlag.SIGN | pkcs11.MechanismFlag.VERIFY,
                        public_template={pkcs11.Attribute.EC_PARAMS: params},
                        private_template={
                            pkcs11.Attribute.PRIVATE: True,
                            pkcs11.Attribute.SENSITIVE: True,
                            pkcs11.Attribute.EXTRACTABLE: False,
                        },
                    )
            except pkcs11.PKCS11Error as err:
                raise TokenError(
                    f"token {self.spec.token!r} could not generate a {key_type} key "
                    f"{label!r}: {type(err).__name__}"
                ) from None
        logger.info("generated %s key %r in PKCS#11 token %r", key_type, label, self.spec.token)
        return self.open(ref), ref

    def open(self, ref: str) -> KeySigner:
        """The key ``ref`` names, with its own session (the same object for every call)."""
        import pkcs11

        label = label_of(ref)
        with self._lock:
            key = self._keys.get(label)
            if key is not None:
                return key
            try:
                session = self._token.open()
            except pkcs11.PKCS11Error as err:
                raise TokenError(
                    f"cannot open a session on token {self.spec.token!r}: {type(err).__name__}"
                ) from None
            try:
                key = TokenKey(session, self._find(session, label), self.spec.token)
            except BaseException:
                session.close()
                raise
            self._keys[label] = key
            return key

    def _find(self, session: pkcs11.Session, label: str) -> tuple[Any, Any]:
        """The (private, public) key objects labelled ``label``."""
        import pkcs11

        return (
            self._find_one(session, pkcs11.ObjectClass.PRIVATE_KEY, label),
            self._find_one(session, pkcs11.ObjectClass.PUBLIC_KEY, label),
        )

    def _find_one(self, session: pkcs11.Session, kind: pkcs11.ObjectClass, label: str) -> Any:
        import pkcs11

        what = "private" if kind == pkcs11.ObjectClass.PRIVATE_KEY else "public"
        where = f"token {self.spec.token!r}"
        try:
            return session.get_key(object_class=kind, label=label)
        except pkcs11.NoSuchKey:
            raise TokenError(f"{where} holds no {what} key labelled {label!r}") from None
        except pkcs11.MultipleObjectsReturned:
            raise TokenError(f"{where} holds several {what} keys labelled {label!r}") from None
        except pkcs11.PKCS11Error as err:
            raise TokenError(
                f"cannot look for key {label!r} in {where}: {type(err).__name__}"
            ) from None


_KEY_TYPES: dict[str, tuple[str, bytes, str]] = {
    "ec-p256": ("EC", _P256, "EC_KEY_PAIR_GEN"),
    "ec-p384": ("EC", _P384, "EC_KEY_PAIR_GEN"),
    "ed25519": ("EC_EDWARDS", _ED25519[0], "EC_EDWARDS_KEY_PAIR_GEN"),
}
"""Muster's key types (``signer.KEY_TYPES``) as PKCS#11 key types, curves and mechanisms."""


class TokenKey:
    """A :class:`~muster.server.ca.signer.KeySigner` whose private key stays in the token."""

    def __init__(self, session: pkcs11.Session, keys: tuple[Any, Any], token: str) -> None:
        import pkcs11

        private, public = keys
        self.label: str = private.label
        self._session = session
        self._private = private
        self._lock = threading.Lock()
        where = f"key {self.label!r} in token {token!r}"
        self._where = where
        try:
            kind = public[pkcs11.Attribute.KEY_TYPE]
            params = public[pkcs11.Attribute.EC_PARAMS]
            point = public[pkcs11.Attribute.EC_POINT]
            extractable = private[pkcs11.Attribute.EXTRACTABLE]
            sensitive = private[pkcs11.Attribute.SENSITIVE]
        except pkcs11.PKCS11Error as err:
            raise TokenError(f"cannot read {where}: {type(err).__name__}") from None
        self._public = _public_key(kind, params, point, where)
        self._mechanism = (
            pkcs11.Mechanism.EDDSA
            if isinstance(self._public, ed25519.Ed25519PublicKey)
            else pkcs11.Mechanism.ECDSA
        )
        if extractable or not sensitive:
            logger.warning(
                "%s can be read out of the token (made outside Muster?): a CA key "
                "should be sensitive and not extractable",
                where,
            )

    def public_key(self) -> CAPublicKey:
        return self._public

    def sign(self, data: bytes) -> bytes:
        import pkcs11

        digest = signature_hash(self._public)
        message = data
        if digest is not None:
            hasher = hashes.Hash(digest)
            hasher.update(data)
            message = hasher.finalize()
        try:
            with self._lock:
                signature: bytes = self._private.sign(message, mechanism=self._mechanism)
        except pkcs11.PKCS11Error as err:
            raise TokenError(f"{self._where} did not sign: {type(err).__name__}") from None
        if digest is None:
            return signature
        half = len(signature) // 2
        return encode_dss_signature(
            int.from_bytes(signature[:half], "big"), int.from_bytes(signature[half:], "big")
        )


def _public_key(kind: Any, params: bytes, point: bytes, where: str) -> CAPublicKey:
    """The token's public key object as a ``cryptography`` key."""
    import pkcs11

    try:
        if kind == pkcs11.KeyType.EC and params in _CURVES:
            curve = _CURVES[params]
            raw = _point(point, 1 + 2 * ((curve.key_size + 7) // 8))
            return ec.EllipticCurvePublicKey.from_encoded_point(curve, raw)
        if kind == pkcs11.KeyType.EC_EDWARDS and params in _ED25519:
            return ed25519.Ed25519PublicKey.from_public_bytes(_point(point, 32))
    except (ValueError, DERError):
        raise TokenError(f"{where} has a public point Muster cannot read") from None
    raise TokenError(f"{where} is not an EC P-256, EC P-384 or Ed25519 key")


def _point(value: bytes, size: int) -> bytes:
    """``CKA_EC_POINT`` is a DER OCTET STRING around the point; some tokens give it bare."""
    if len(value) == size:
        return value
    tag, start, end = read_element(value)
    if tag != 0x04 or end != len(value) or end - start != size:
        raise DERError("not an OCTET STRING holding a point")
    return value[start:end]
