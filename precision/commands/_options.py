"""Parsing the numeric options the commands share, with one-line errors that name the option and the valid values."""

from __future__ import annotations

from ..errors import SpecError

__all__ = ["positive_int", "batch_size"]


def positive_int(option: str, text: str) -> int:
    """``--option TEXT`` as a positive integer, else a SpecError naming the option, the value and what is valid."""
    try:
        value = int(text)
    except ValueError:
        raise SpecError(f"--{option} {text!r} is not an integer; valid: a positive integer") from None
    if value <= 0:
        raise SpecError(f"--{option} {value} must be a positive integer")
    return value


def batch_size(text: str) -> int | None:
    """``--batch-size``: a positive integer, or 'full' (None) for full batch. 0 is no batch at all, not a way to
    say full batch."""
    if text.strip().lower() in ("full", "none"):
        return None
    try:
        return positive_int("batch-size", text)
    except SpecError as exc:
        raise SpecError(f"{exc}, or 'full' for full batch") from None
