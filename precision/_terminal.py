"""Text from reports made safe to print: no control characters reach the terminal.

A report is a file anyone can edit or hand over, and its strings (messages, spec fields, ids, environment values)
end up on a terminal. An escape sequence in one of them would be run by the terminal (recolor, retitle, move the
cursor, hide the rest of the line), a newline would fake a table row or a second error line, and a lone surrogate
(valid in JSON as "\\ud800") would crash ``print`` with UnicodeEncodeError. So every character Python does not call
printable is written as its escape, like ``repr`` does but without the quotes: C0/C1 controls and DEL, newlines
and tabs too (a table cell is one line), line separators, bidirectional and other format characters, surrogates.
"""

from __future__ import annotations

__all__ = ["safe_text", "clip", "ELLIPSIS"]

ELLIPSIS = "\u2026"  # one character, so a cut cell stays within its width
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def safe_text(value: object) -> str:
    """``str(value)`` with every non-printable character escaped (``\\x1b``, ``\\n``, ``\\u202e``...)."""
    text = str(value)
    if text.isprintable():  # the common case, checked in C
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def clip(text: str, width: int, *, middle: bool = False) -> str:
    """``text`` cut to at most ``width`` characters, the cut marked with an ellipsis.

    By default the start is kept, and the cut goes back to the last space when one is near, so the kept part
    ends on a whole word rather than a fragment like "(us". ``middle=True`` keeps both ends instead (for
    messages whose end says what is wrong, like "'xxxx...' is not of type 'number'"). Cut after
    :func:`safe_text`, not before: escaping lengthens text, so a cell cut first could still overflow its width;
    a cut through an escape leaves only plain, harmless characters.
    """
    if width < 1:
        raise ValueError(f"width {width!r} must be at least 1")
    if len(text) <= width:
        return text
    if middle:
        head = (width - 1) // 2
        tail = width - 1 - head
        return text[:head] + ELLIPSIS + (text[-tail:] if tail else "")
    kept = text[:width - 1]
    space = kept.rfind(" ")
    if space >= max(1, (width - 1) * 3 // 4):  # a word boundary in the last quarter: cut there
        kept = kept[:space]
    return kept.rstrip() + ELLIPSIS
