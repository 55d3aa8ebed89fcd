"""Input checks shared by the services; each failure names the field and the rule.

Names a person reads (task kinds, pools, label keys and values, API token and tenant
names, agent ids, budget scopes) follow one grammar: a short run of ASCII letters,
digits and a few punctuation marks, checked with a *full* match (``re.fullmatch``;
the patterns are also anchored with ``\\A``/``\\Z``, never ``$``, which accepts a
trailing newline). So a name can hold no control character, no newline, no NUL, no
bidi override and nothing that renders like another name. The variants differ only in
their character set and length (a kind may hold ``:``; a label key ``/`` and capitals).

Opaque strings (task ids, idempotency keys, reasons, audit filters, token ids) are
not names, but they are stored, compared and printed too: :func:`check_text` refuses
control characters (NUL included), bidi controls and line separators in them.

Durations, timestamps and enums from a request are read through :func:`duration`,
:func:`timestamp` and :func:`enum_value`, which refuse what the protobuf well-known
types do not allow (and what Python's datetime cannot hold) instead of raising.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from muster.server.services.errors import invalid
from muster.spiffe import AGENT_ID

NAME = AGENT_ID
"""Pools, tenants, API token names, agent ids: 1-63 lower-case letters, digits, '.',
'_', '-', starting with a letter or digit (the agent id grammar, which is also safe in
a SPIFFE ID and a DNS label)."""
KIND = re.compile(r"\A[a-z0-9][a-z0-9._:-]{0,63}\Z")
LABEL_KEY = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._/-]{0,62}\Z")
LABEL_VALUE = re.compile(r"\A[A-Za-z0-9._:/-]{0,63}\Z")
NAME_PATTERN = re.compile(r"\A[a-z0-9._*?!\[\]-]{1,100}\Z")
"""A bootstrap token's agent name pattern: the agent id characters and fnmatch's."""
MAX_LABELS = 32

_RULES = {
    NAME.pattern: "1-63 lower-case letters, digits, '.', '_', '-', starting with a letter or digit",
    KIND.pattern: "1-64 lower-case letters, digits, '.', '_', ':', '-', starting with a "
    "letter or digit",
    LABEL_KEY.pattern: "1-63 letters, digits, '.', '_', '/', '-', starting with a letter or digit",
    LABEL_VALUE.pattern: "at most 63 letters, digits, '.', '_', ':', '/', '-'",
    NAME_PATTERN.pattern: "1-100 lower-case letters, digits, '.', '_', '-' and the "
    "wildcards '*', '?', '[', ']', '!'",
}

_BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_UNSAFE = re.compile(f"[\x00-\x1f\x7f-\x9f\u2028\u2029{_BIDI}]")
"""Control characters (C0, DEL, C1), line and paragraph separators, bidi controls."""
_UNSAFE_MULTILINE = re.compile(f"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029{_BIDI}]")
"""The same, except tab, line feed and carriage return (text that may span lines)."""

MAX_DURATION_SECONDS = 315_576_000_000
"""The largest ``google.protobuf.Duration`` (about 10,000 years)."""
MIN_TIMESTAMP_SECONDS = -62_135_596_800
"""0001-01-01T00:00:00Z, the first ``google.protobuf.Timestamp``."""
MAX_TIMESTAMP_SECONDS = 253_402_300_799
"""9999-12-31T23:59:59Z, the last ``google.protobuf.Timestamp``."""


def check_name(value: str, field: str, pattern: re.Pattern[str] = NAME) -> str:
    """``value`` if all of it matches ``pattern``; INVALID_ARGUMENT naming ``field``."""
    if pattern.fullmatch(value) is None:
        rule = _RULES.get(pattern.pattern, "see the documentation")
        raise invalid(f"{field}: {_shown(value)} is not valid ({rule})")
    return value


def check_labels(labels: Mapping[str, str], field: str) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise invalid(f"{field}: at most {MAX_LABELS} labels")
    for key, value in labels.items():
        if LABEL_KEY.fullmatch(key) is None:
            raise invalid(
                f"{field}: label key {_shown(key)} is not valid ({_RULES[LABEL_KEY.pattern]})"
            )
        if LABEL_VALUE.fullmatch(value) is None:
            raise invalid(
                f"{field}: value of label {key!r} is not valid ({_RULES[LABEL_VALUE.pattern]})"
            )
    return dict(labels)


def check_text(value: str, field: str, max_length: int, *, multiline: bool = False) -> str:
    """An opaque string: at most ``max_length`` characters, no control characters (NUL
    included), no bidi controls, no line separators; with ``multiline``, tab and line
    breaks are allowed (JSON text, for one)."""
    if len(value) > max_length:
        raise invalid(f"{field}: at most {max_length} characters")
    if (_UNSAFE_MULTILINE if multiline else _UNSAFE).search(value):
        raise invalid(f"{field}: control characters are not allowed")
    return value


def duration(
    value: Duration,
    field: str,
    *,
    maximum: timedelta,
    maximum_text: str,
) -> timedelta:
    """A non-negative Duration no longer than ``maximum``; INVALID_ARGUMENT naming
    ``field`` for an invalid Duration, a negative one or one too long."""
    seconds, nanos = value.seconds, value.nanos
    if (
        not -MAX_DURATION_SECONDS <= seconds <= MAX_DURATION_SECONDS
        or not -999_999_999 <= nanos <= 999_999_999
        or (seconds > 0 and nanos < 0)
        or (seconds < 0 and nanos > 0)
    ):
        raise invalid(f"{field}: not a valid Duration")
    if seconds < 0 or nanos < 0:
        raise invalid(f"{field}: must not be negative")
    if seconds > maximum.total_seconds() + 1:
        raise invalid(f"{field}: at most {maximum_text}")
    result = timedelta(seconds=seconds, microseconds=nanos // 1000)
    if result > maximum:
        raise invalid(f"{field}: at most {maximum_text}")
    return result


def timestamp(value: Timestamp, field: str) -> datetime:
    """An aware UTC datetime; INVALID_ARGUMENT naming ``field`` for a Timestamp outside
    0001-01-01 to 9999-12-31 or with nanos out of range."""
    if (
        not MIN_TIMESTAMP_SECONDS <= value.seconds <= MAX_TIMESTAMP_SECONDS
        or not 0 <= value.nanos <= 999_999_999
    ):
        raise invalid(f"{field}: not a valid Timestamp (0001-01-01 to 9999-12-31 UTC)")
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(
        seconds=value.seconds, microseconds=value.nanos // 1000
    )


def enum_value(enum: Any, value: int, field: str) -> str:
    """The name of ``value`` in the generated enum wrapper ``enum``; INVALID_ARGUMENT
    naming ``field`` for a number the enum does not define (proto3 keeps those)."""
    descriptor: EnumDescriptor = enum.DESCRIPTOR
    found = descriptor.values_by_number.get(value)
    if found is None:
        raise invalid(f"{field}: {value} is not a {descriptor.name} value")
    return found.name


def _shown(value: str) -> str:
    """``value`` as an error message may quote it: shortened, escapes visible."""
    return ascii(value[:70])
