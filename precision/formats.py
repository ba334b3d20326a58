"""Floating-point formats described by data, and exact round-to-nearest-even into them.

A format is (exponent bits, mantissa bits, flags). Everything else (eps, unit roundoff, tiny, max, smallest
subnormal) is derived, never typed, so the same code serves fp64 down to fp8.

Formats without a native dtype are *emulated* (docs/formats.md): ``tf32`` (p = 11, fp32's exponent range) and the
custom ``fp(p=P,emax=E)`` / ``fp(p=P,emax=E,subnormals=no)``. Their values are held exactly in a native *carrier*
(``Format.dtype``: float32 when it holds every value, else float64), and every backend rounds to the format after
every operation, or refuses the format with a SpecError naming it, the backend and why.
"""

from __future__ import annotations

import dataclasses
import math
import re

import ml_dtypes
import numpy as np

from .errors import SpecError, choice_error

__all__ = ["Format", "FORMATS", "EMULATED_FORMATS", "MAX_EXACT_EMULATED_PRECISION", "get_format", "custom_format",
           "round_to", "to_format", "to_float64", "ulp", "wider"]


@dataclasses.dataclass(frozen=True)
class Format:
    """A binary floating-point format.

    ``finite_only`` marks the "fn" fp8 variant (e4m3fn): no infinities, the all-ones exponent holds normal
    numbers, and only the all-ones mantissa there is NaN. Overflow then rounds to NaN, not inf.

    ``emulated`` marks a format without a native dtype: ``dtype_name`` is then its carrier (float32 or float64,
    holding every value of the format exactly), and arithmetic on the carrier must be rounded to the format after
    every op. ``emax`` overrides the IEEE exponent range (custom formats: emin = 1 - emax); ``subnormals=False``
    flushes every result below ``tiny`` to a zero of its sign (after the rounding with subnormals: a value that
    rounds up to ``tiny`` stays ``tiny``).
    """

    name: str
    exponent_bits: int
    mantissa_bits: int  # explicit (stored) fraction bits
    dtype_name: str  # numpy storage dtype; ml_dtypes for bf16 and fp8; the carrier of an emulated format
    finite_only: bool = False
    emulated: bool = False
    emax: int | None = None  # None: IEEE, from exponent_bits
    subnormals: bool = True

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
        # Every native format has them (XLA CPU flushes them; that is a backend fact, not a format one); a custom
        # format may have none.
        return self.subnormals

    @property
    def bias(self) -> int:
        return self.emax if self.emax is not None else 2 ** (self.exponent_bits - 1) - 1

    @property
    def min_exponent(self) -> int:
        """Exponent of the smallest normal number (emin)."""
        return 1 - self.bias

    @property
    def max_exponent(self) -> int:
        """Exponent of the largest finite number (emax)."""
        if self.emax is not None:
            return self.emax
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
        """Smallest positive number: the smallest subnormal, or ``tiny`` for a format without subnormals."""
        if not self.subnormals:
            return self.tiny
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
# Formats without a native dtype: carried exactly in ``dtype_name`` and rounded after every op (docs/formats.md).
# tf32: NVIDIA's TensorFloat-32, fp32's exponent range (and subnormals) with fp16's precision.
EMULATED_FORMATS: dict[str, Format] = {"tf32": Format("tf32", 8, 10, "float32", emulated=True)}
# Figueroa: a float64 op (53 bits) rounded to p bits is the exactly rounded op for + - * / sqrt when 53 >= 2p + 2.
# Formats with more precision cannot compute exactly through a float64 carrier: the backends refuse them as compute
# or update formats (storage, a conversion only, is exact at any p).
MAX_EXACT_EMULATED_PRECISION = 25
_CUSTOM_FORMS = ("fp(p=P,emax=E)", "fp(p=P,emax=E,subnormals=no)")
_CUSTOM_RANGES = "P: precision bits incl. the implicit one, 2..52; E: max exponent, 1..1023; subnormals: yes or no"
_CUSTOM: dict[tuple[int, int, bool], Format] = {}
_ALIASES = {"tensorfloat32": "tf32", "f64": "fp64", "float64": "fp64", "f32": "fp32", "float32": "fp32", "f16": "fp16",
            "float16": "fp16", "bfloat16": "bf16", "e4m3": "fp8_e4m3fn", "e4m3fn": "fp8_e4m3fn",
            "fp8": "fp8_e4m3fn", "e5m2": "fp8_e5m2"}


def get_format(name: str | Format) -> Format:
    """The format named ``name``: a native one (FORMATS, aliases), ``tf32``, or a custom ``fp(p=P,emax=E)`` /
    ``fp(p=P,emax=E,subnormals=no)``. The same name always gives the same object."""
    if isinstance(name, Format):
        return name
    key = _ALIASES.get(str(name).lower().strip(), str(name).lower().strip())
    if key in FORMATS:
        return FORMATS[key]
    if key in EMULATED_FORMATS:
        return EMULATED_FORMATS[key]
    if re.sub(r"\s", "", key).startswith("fp("):
        return _parse_custom(str(name))
    raise choice_error("format", name, [*FORMATS, *EMULATED_FORMATS, *_CUSTOM_FORMS])


def _parse_custom(text: str) -> Format:
    compact = re.sub(r"\s*([(),=])\s*", r"\1", text.strip()).lower()
    bad = f"bad format {text!r}: {{}}; valid forms: {', '.join(_CUSTOM_FORMS)} ({_CUSTOM_RANGES})"
    inner = re.fullmatch(r"fp\((.*)\)", compact)
    if not inner:
        raise SpecError(bad.format("no closing parenthesis"))
    fields: dict[str, str] = {}
    for item in inner.group(1).split(","):
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise SpecError(bad.format(f"field {item!r} is not key=value"))
        if key not in ("p", "emax", "subnormals"):
            raise SpecError(bad.format(f"unknown key {key!r}"))
        if key in fields:
            raise SpecError(bad.format(f"key {key!r} given twice"))
        fields[key] = value
    for key in ("p", "emax"):
        if key not in fields:
            raise SpecError(bad.format(f"{key}= is missing"))
        if not re.fullmatch(r"\d+", fields[key]):
            raise SpecError(bad.format(f"{key}={fields[key]} is not a positive integer"))
    p, emax = int(fields["p"]), int(fields["emax"])
    if not 2 <= p <= 52:
        raise SpecError(bad.format(f"p={p} is outside 2..52"))
    if not 1 <= emax <= 1023:
        raise SpecError(bad.format(f"emax={emax} is outside 1..1023"))
    sub = fields.get("subnormals", "yes")
    if sub not in ("yes", "no"):
        raise SpecError(bad.format(f"subnormals={sub} is not yes or no"))
    return custom_format(p, emax, sub == "yes")


def custom_format(p: int, emax: int, subnormals: bool = True) -> Format:
    """The IEEE-like format of precision ``p`` (2..52, implicit bit included), exponents 1 - emax .. emax (emax
    1..1023), inf on overflow, with or without subnormals; its carrier is float32 when that holds every value
    (p <= 24, emax <= 127), else float64. Named ``fp(p=P,emax=E)`` (``,subnormals=no`` without subnormals)."""
    key = (int(p), int(emax), bool(subnormals))
    if key not in _CUSTOM:
        if not (2 <= key[0] <= 52 and 1 <= key[1] <= 1023):
            raise SpecError(f"custom format p={p}, emax={emax} out of range; {_CUSTOM_RANGES}")
        name = f"fp(p={key[0]},emax={key[1]}{'' if subnormals else ',subnormals=no'})"
        carrier = "float32" if key[0] <= 24 and key[1] <= 127 else "float64"
        # exponent_bits: the IEEE field width that reaches emax (informational: bits, and wider()'s tie-break)
        _CUSTOM[key] = Format(name, key[1].bit_length() + 1, key[0] - 1, carrier, emulated=True, emax=key[1],
                              subnormals=key[2])
    return _CUSTOM[key]


def wider(a: Format, b: Format) -> Format:
    """The format with more precision (ties: more exponent range)."""
    return max(a, b, key=lambda f: (f.precision, f.exponent_bits))


def round_to(x, fmt: Format | str) -> np.ndarray:
    """Round float32/float64 values to the nearest value of ``fmt``, ties to even; returns float64.

    Exact: frexp, ldexp and rint are exact in float64, and float64 holds every value of the narrower formats, so
    this is a single correct rounding of the input (no double rounding through float32). Overflow gives inf, or
    NaN for finite-only formats; NaN stays NaN; the sign of zero is kept. A format without subnormals flushes a
    result below its ``tiny`` to a zero of the input's sign.
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
        if not fmt.subnormals:
            out = np.where(np.abs(out) < fmt.tiny, np.copysign(0.0, x), out)
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
    out = np.ldexp(1.0, exponent - fmt.mantissa_bits)
    if not fmt.subnormals:  # below tiny the neighbours are 0 and tiny
        out = np.where(x < fmt.tiny, fmt.tiny, out)
    return np.where(np.isnan(x), np.nan, out)[()]  # scalar in, scalar out
