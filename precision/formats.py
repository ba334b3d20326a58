"""Floating-point formats described by data, and exact round-to-nearest-even into them.

A format is (exponent bits, mantissa bits, flags). Everything else (eps, unit roundoff, tiny, max, smallest
subnormal) is derived, never typed, so the same code serves fp64 down to fp8.
"""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np

from .errors import choice_error

__all__ = ["Format", "FORMATS", "get_format", "round_to", "to_format", "to_float64", "ulp", "wider"]


@dataclasses.dataclass(frozen=True)
class Format:
    """A binary floating-point format.

    ``finite_only`` marks the "fn" fp8 variant (e4m3fn): no infinities, the all-ones exponent holds normal
    numbers, and only the all-ones mantissa there is NaN. Overflow then rounds to NaN, not inf.
    """

    name: str
    exponent_bits: int
    mantissa_bits: int  # explicit (stored) fraction bits
    dtype_name: str  # numpy storage dtype; ml_dtypes for bf16 and fp8
    finite_only: bool = False

    @property
    def dtype(self) -> np.dtype:
        if hasattr(np, self.dtype_name) and self.dtype_name.startswith("float"):
            return np.dtype(getattr(np, self.dtype_name))
        return np.dtype(getattr(ml_dtypes, self.dtype_name))

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def precision(self) -> int:
        """Significand precision p, counting the implicit bit."""
        return self.mantissa_bits + 1

    @property
    def has_inf(self) -> bool:
        return not self.finite_only

    @property
    def has_subnormals(self) -> bool:
        return True  # every format here has them (XLA CPU flushes them; that is a backend fact, not a format one)

    @property
    def bias(self) -> int:
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def min_exponent(self) -> int:
        """Exponent of the smallest normal number (emin)."""
        return 1 - self.bias

    @property
    def max_exponent(self) -> int:
        """Exponent of the largest finite number (emax)."""
        top = 2**self.exponent_bits - 1  # all-ones exponent field
        return (top if self.finite_only else top - 1) - self.bias

    @property
    def eps(self) -> float:
        """Distance from 1 to the next larger number: 2^-mantissa_bits."""
        return math.ldexp(1.0, -self.mantissa_bits)

    @property
    def unit_roundoff(self) -> float:
        """u = eps / 2: the relative error bound of one round-to-nearest."""
        return math.ldexp(1.0, -self.precision)

    @property
    def tiny(self) -> float:
        """Smallest positive normal number."""
        return math.ldexp(1.0, self.min_exponent)

    @property
    def smallest_subnormal(self) -> float:
        return math.ldexp(1.0, self.min_exponent - self.mantissa_bits)

    @property
    def max(self) -> float:
        # IEEE: all mantissa bits set. "fn": the all-ones mantissa at the top exponent is NaN, so one less.
        top_fraction = 2 - math.ldexp(1.0, -self.mantissa_bits) * (2 if self.finite_only else 1)
        return math.ldexp(top_fraction, self.max_exponent)

    def __str__(self) -> str:
        return self.name


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("fp64", 11, 52, "float64"),
        Format("fp32", 8, 23, "float32"),
        Format("fp16", 5, 10, "float16"),
        Format("bf16", 8, 7, "bfloat16"),
        Format("fp8_e4m3fn", 4, 3, "float8_e4m3fn", finite_only=True),
        Format("fp8_e5m2", 5, 2, "float8_e5m2"),
    )
}
_ALIASES = {"f64": "fp64", "float64": "fp64", "f32": "fp32", "float32": "fp32", "f16": "fp16",
            "float16": "fp16", "bfloat16": "bf16", "e4m3": "fp8_e4m3fn", "e4m3fn": "fp8_e4m3fn",
            "fp8": "fp8_e4m3fn", "e5m2": "fp8_e5m2"}


def get_format(name: str | Format) -> Format:
    if isinstance(name, Format):
        return name
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in FORMATS:
        raise choice_error("format", name, FORMATS)
    return FORMATS[key]


def wider(a: Format, b: Format) -> Format:
    """The format with more precision (ties: more exponent range)."""
    return max(a, b, key=lambda f: (f.precision, f.exponent_bits))


def round_to(x, fmt: Format | str) -> np.ndarray:
    """Round float32/float64 values to the nearest value of ``fmt``, ties to even; returns float64.

    Exact: frexp, ldexp and rint are exact in float64, and float64 holds every value of the narrower formats, so
    this is a single correct rounding of the input (no double rounding through float32). Overflow gives inf, or
    NaN for finite-only formats; NaN stays NaN; the sign of zero is kept.
    """
    fmt = get_format(fmt)
    with np.errstate(invalid="ignore"):  # a float32 signalling NaN widens to a quiet NaN with an FP "invalid" flag
        x = np.asarray(x, dtype=np.float64)
    if fmt.name == "fp64":
        return x.copy()
    with np.errstate(invalid="ignore", over="ignore"):
        _, e = np.frexp(x)  # x = f * 2^e, 0.5 <= |f| < 1, so the exponent of x is e - 1
        exponent = np.maximum(e - 1, fmt.min_exponent)  # subnormals share emin's quantum
        quantum_exp = exponent - fmt.mantissa_bits
        out = np.ldexp(np.rint(np.ldexp(x, -quantum_exp)), quantum_exp)
        out = np.copysign(out, x)  # rint(-0.3) is -0.0 already, but keep -0 for exact zeros too
        overflow = np.abs(out) > fmt.max
        if overflow.any():
            out = np.where(overflow, np.copysign(np.inf, x) if fmt.has_inf else np.nan, out)
    return out


def to_format(x, fmt: Format | str) -> np.ndarray:
    """Round ``x`` once to ``fmt`` and return it in the format's storage dtype.

    Use this instead of ``astype`` from float64: ml_dtypes' float64 -> bfloat16 cast goes through float32 and so
    can round twice (see tests/test_formats.py).
    """
    fmt = get_format(fmt)
    return round_to(x, fmt).astype(fmt.dtype)


def to_float64(x) -> np.ndarray:
    """Exact widening of any storage dtype to float64."""
    return np.asarray(x).astype(np.float64)


def ulp(x, fmt: Format | str) -> np.ndarray:
    """Unit in the last place of ``fmt`` at |x| (spacing of ``fmt`` numbers there); ulp(0) is the smallest
    subnormal. Values beyond the format's range (inf included) use the top binade's spacing; ulp(NaN) is NaN."""
    fmt = get_format(fmt)
    with np.errstate(invalid="ignore"):
        x = np.abs(np.asarray(x, dtype=np.float64))
        _, e = np.frexp(x)
    # frexp gives exponent 0 for 0, inf and NaN: place 0 in the subnormal binade and inf in the top one.
    exponent = np.where(x == 0, fmt.min_exponent, np.where(np.isinf(x), fmt.max_exponent, e - 1))
    exponent = np.clip(exponent, fmt.min_exponent, fmt.max_exponent)
    return np.where(np.isnan(x), np.nan, np.ldexp(1.0, exponent - fmt.mantissa_bits))[()]  # scalar in, scalar out
