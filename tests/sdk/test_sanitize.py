"""neutralize(): terminal controls, escape introducers and bidi controls become visible."""

from __future__ import annotations

import unicodedata

import pytest

from muster.sanitize import neutralize

HOSTILE = "a\x1b]0;pwned\x07b\x1b[2Jc\u202ed\x00e\rf\x9b31mg\u2066h\x7fi"


def dangerous(text: str, *, single_line: bool = False) -> list[str]:
    """Every character a terminal could act on, or that reorders what is shown."""
    allowed = "" if single_line else "\n\t"
    return [
        c
        for c in text
        if c not in allowed
        and (
            unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp")
            or unicodedata.bidirectional(c) in BIDI_CONTROLS
        )
    ]


BIDI_CONTROLS = {"LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI"}


def test_escapes_osc_csi_bidi_nul_cr_c1_and_del_visibly() -> None:
    assert neutralize(HOSTILE) == (
        "a\\x1b]0;pwned\\x07b\\x1b[2Jc\\u202ed\\x00e\\rf\\x9b31mg\\u2066h\\x7fi"
    )


def test_keeps_lines_and_tabs_unless_single_line() -> None:
    assert neutralize("one\n\ttwo\r\n") == "one\n\ttwo\\r\n"
    assert neutralize("one\n\ttwo", single_line=True) == "one\\n\\ttwo"


@pytest.mark.parametrize(
    "text",
    ["plain ascii", "héllo wörld ✓ 日本語 👩‍👩‍👧", "C:\\path\\to", '{"a": "b\\n"}', "مرحبا", ""],
)
def test_ordinary_text_is_unchanged(text: str) -> None:
    assert neutralize(text) == text


def test_every_control_and_bidi_code_point_is_escaped() -> None:
    everything = "".join(chr(c) for c in range(0x110000) if c != 0x5C)  # all but backslash
    for single_line in (False, True):
        out = neutralize(everything, single_line=single_line)
        assert dangerous(out, single_line=single_line) == []


def test_the_marks_and_separators_too() -> None:
    for char in "\u200e\u200f\u061c\u2028\u2029\u202a\u2069":
        assert neutralize(char) == f"\\u{ord(char):04x}"


def test_lone_surrogates_can_be_printed_afterwards() -> None:
    out = neutralize("x\udcff")
    assert out == "x\\udcff"
    out.encode("utf-8")  # would raise on a surrogate
