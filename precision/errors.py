"""Typed errors. The library raises these; only the CLI prints them and sets the exit status."""

from __future__ import annotations

__all__ = ["PrecisionError", "SpecError", "ReportError", "UnavailableError"]


class PrecisionError(ValueError):
    """Base class of every error this package raises on purpose."""


class SpecError(PrecisionError):
    """A bad name or value in a run specification (problem, policy, optimizer, backend, steps...)."""


class ReportError(PrecisionError):
    """A report file that cannot be read: missing, not JSON, or of an unknown schema version."""


class UnavailableError(PrecisionError):
    """A backend or device that is not usable on this machine; the message says why."""


def choice_error(kind: str, value: object, choices) -> SpecError:
    """One-line error naming the bad value and the valid choices."""
    return SpecError(f"unknown {kind} {value!r}; valid choices: {', '.join(map(str, choices))}")
