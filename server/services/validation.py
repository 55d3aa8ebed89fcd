"""Input checks shared by the services; each failure names the field and the rule."""

from __future__ import annotations

import re
from collections.abc import Mapping

from server.services.errors import invalid

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
"""Pools and similar names."""
KIND = re.compile(r"^[a-z0-9][a-z0-9._:-]{0,63}$")
LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
LABEL_VALUE = re.compile(r"^[A-Za-z0-9._:/-]{0,63}$")
MAX_LABELS = 32


def check_name(value: str, field: str, pattern: re.Pattern[str] = NAME) -> str:
    if not pattern.match(value):
        raise invalid(
            f"{field}: {value[:70]!r} is not valid (1-63 lower-case letters, digits, "
            "'.', '_', '-', starting with a letter or digit)"
        )
    return value


def check_labels(labels: Mapping[str, str], field: str) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise invalid(f"{field}: at most {MAX_LABELS} labels")
    for key, value in labels.items():
        if not LABEL_KEY.match(key):
            raise invalid(f"{field}: label key {key[:70]!r} is not valid")
        if not LABEL_VALUE.match(value):
            raise invalid(f"{field}: value of label {key!r} is not valid")
    return dict(labels)
