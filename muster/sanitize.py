"""Making untrusted text safe to show on a terminal.

Task output, errors and waiting reasons come from agents, and AI output is model output:
untrusted input (OWASP LLM05). Printed raw, an ESC starts an ANSI CSI sequence (clear the
screen, move the cursor, repaint what was printed before) or an OSC sequence (set the
window title, write the clipboard, make a link point elsewhere); a CR rewrites the line
it ends; bidi overrides make text read in an order other than its bytes ("Trojan
Source", CVE-2021-42574). :func:`neutralize` replaces each such character with a
visible escape, so a person sees what is there and the terminal acts on none of it.

What is escaped, and as what:

- C0 controls (U+0000-U+001F) except LF and TAB, DEL (U+007F) and C1 controls
  (U+0080-U+009F, which include the 8-bit CSI U+009B and OSC U+009D): ``\\xNN``.
  Escaping ESC, BEL and the 8-bit introducers is what disarms every CSI and OSC
  sequence: the rest of the sequence is ordinary printable text and stays visible, so
  ``\\x1b]0;pwned\\x07`` reads as exactly that.
- Bidi embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069), the marks
  U+200E, U+200F and U+061C, and the line and paragraph separators U+2028, U+2029:
  ``\\uNNNN``.
- Lone surrogates (which a terminal cannot even be sent): ``\\uNNNN``.
- LF and TAB are kept, because multi-line output (``muster submit --wait``, a task's
  ``output:``) is meant to be read as lines; ``single_line=True`` escapes them too
  (``\\n``, ``\\t``) for table cells and one-line messages, where a newline would forge a
  row. CR is always escaped (``\\r``): it is how a line overwrites itself.

A backslash is left as it is, so ordinary text (paths, JSON) reads unchanged; the
escapes are for a person's eyes, not a reversible encoding (use ``--json`` for the exact
text).
"""

from __future__ import annotations

__all__ = ["neutralize"]

_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}

_BIDI = (0x061C, 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A))


def _table(single_line: bool) -> dict[int, str]:
    table: dict[int, str] = {}
    for code in [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)]:
        char = chr(code)
        if char in "\n\t" and not single_line:
            continue
        table[code] = _NAMED.get(char, f"\\x{code:02x}")
    for code in [*_BIDI, *range(0xD800, 0xE000)]:
        table[code] = f"\\u{code:04x}"
    return table


_MULTI_LINE = _table(single_line=False)
_SINGLE_LINE = _table(single_line=True)


def neutralize(text: str, *, single_line: bool = False) -> str:
    """``text`` with every terminal control character, escape introducer and bidi
    control replaced by a visible escape (see the module docstring for the list).

    LF and TAB are kept unless ``single_line``; printable text, including every other
    non-ASCII character, passes through unchanged.
    """
    return text.translate(_SINGLE_LINE if single_line else _MULTI_LINE)
