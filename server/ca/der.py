"""Just enough DER to put a signature made elsewhere into a certificate or a CRL.

Both are ``SEQUENCE { tbs, signatureAlgorithm, signature BIT STRING }`` (RFC 5280
4.1 and 5.1). ``cryptography`` builds the to-be-signed part and the algorithm
identifier for us; an external key (an HSM) signs the TBS bytes, and this module
splices the three parts back together.
"""

from __future__ import annotations

_SEQUENCE = 0x30
_BIT_STRING = 0x03


class DERError(ValueError):
    """The bytes are not the DER structure expected here."""


def read_element(data: bytes, offset: int = 0) -> tuple[int, int, int]:
    """The element at ``offset``: (tag, start of its content, end of the element).

    Only the definite, minimal lengths DER allows; single-byte tags.
    """
    if offset + 2 > len(data):
        raise DERError("truncated element")
    tag = data[offset]
    first = data[offset + 1]
    start = offset + 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or start + count > len(data):
            raise DERError("unsupported or truncated length")
        length = int.from_bytes(data[start : start + count], "big")
        start += count
    end = start + length
    if end > len(data):
        raise DERError("element runs past the end of the data")
    return tag, start, end


def encode_element(tag: int, content: bytes) -> bytes:
    """``tag`` with a minimal DER length, then ``content``."""
    length = len(content)
    if length < 0x80:
        return bytes((tag, length)) + content
    size = (length.bit_length() + 7) // 8
    return bytes((tag, 0x80 | size)) + length.to_bytes(size, "big") + content


def signed_parts(signed: bytes) -> tuple[bytes, bytes]:
    """(tbs, signatureAlgorithm) of a signed certificate or CRL, each a whole element."""
    tag, start, end = read_element(signed)
    if tag != _SEQUENCE or end != len(signed):
        raise DERError("not a single DER SEQUENCE")
    tbs_tag, _, tbs_end = read_element(signed, start)
    alg_tag, _, alg_end = read_element(signed, tbs_end)
    if tbs_tag != _SEQUENCE or alg_tag != _SEQUENCE:
        raise DERError("not a signed structure (TBS, algorithm, signature)")
    return signed[start:tbs_end], signed[tbs_end:alg_end]


def assemble_signed(tbs: bytes, algorithm: bytes, signature: bytes) -> bytes:
    """``SEQUENCE { tbs, algorithm, BIT STRING signature }`` (no unused bits)."""
    bit_string = encode_element(_BIT_STRING, b"\x00" + signature)
    return encode_element(_SEQUENCE, tbs + algorithm + bit_string)
