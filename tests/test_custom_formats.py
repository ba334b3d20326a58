"""Formats without a native dtype: tf32 and the custom ``fp(p=P,emax=E[,subnormals=no])`` (docs/formats.md).

1. names, parameters and errors of :func:`precision.formats.get_format`;
2. ``round_to`` against an independent integer reference on bit patterns: edge values, 10^6 random patterns and a
   hypothesis search over the formats' parameters (default run); all 2^32 float32 patterns for tf32 and
   fp(p=4,emax=15) (with and without subnormals) behind ``-m exhaustive``;
3. each backend's rounding primitive bit for bit against ``round_to`` (numpy ``convert`` and per-op rounding of
   :class:`EmulatedArray`, numba's rounding codes, JAX's ``round_in_float32`` / ``convert``);
4. training: numpy and numba emulate exactly (tf32 equals fp16 bit for bit where fp16's range is never left, numba
   equals numpy bit for bit where the conformance suite promises bits); JAX refuses an emulated compute or update
   format with one SpecError and trains an emulated storage format.
"""

from __future__ import annotations

import math
import time

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from precision.backends import get_backend
from precision.data import Dataset, make_dataset
from precision.errors import SpecError
from precision.formats import FORMATS, custom_format, get_format, round_to, ulp, wider
from precision.optim import make_optimizer
from precision.policy import parse_policy
from precision.problems import get_problem
from precision.spec import RunSpec

TF32 = get_format("tf32")
FP4 = get_format("fp(p=4,emax=15)")
FP4_FTZ = get_format("fp(p=4,emax=15,subnormals=no)")
SMALL = [TF32, FP4, FP4_FTZ, get_format("fp(p=24,emax=100)"), get_format("fp(p=12,emax=127,subnormals=no)"),
         get_format("fp(p=2,emax=1)")]
WIDE = [get_format("fp(p=11,emax=300)"), get_format("fp(p=25,emax=1023,subnormals=no)"),
        get_format("fp(p=52,emax=1023)"), get_format("fp(p=40,emax=500,subnormals=no)")]


def ids(fmt):
    return fmt.name


def same(a, b) -> np.ndarray:
    """Equal bit for bit as float64 (sign of zero included), any NaN equal to any NaN."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a.view(np.uint64) == b.view(np.uint64)) | (np.isnan(a) & np.isnan(b))


# ----------------------------------------------------------------------------------------------------------------
# 1. names and parameters
# ----------------------------------------------------------------------------------------------------------------

def test_tf32_parameters():
    fp32, fp16 = FORMATS["fp32"], FORMATS["fp16"]
    assert TF32.precision == 11 and TF32.emulated and TF32.dtype == np.float32
    assert (TF32.min_exponent, TF32.max_exponent, TF32.tiny) == (fp32.min_exponent, fp32.max_exponent, fp32.tiny)
    assert TF32.eps == fp16.eps and TF32.unit_roundoff == 2.0**-11
    assert TF32.max == (2 - 2.0**-10) * 2.0**127 and TF32.smallest_subnormal == 2.0**-136
    assert get_format("TF32") is TF32 and get_format("tensorfloat32") is TF32
    assert not any(f.emulated for f in FORMATS.values())


def test_custom_parameters_and_carriers():
    assert (FP4.precision, FP4.min_exponent, FP4.max_exponent) == (4, -14, 15)
    assert FP4.max == 15 * 2.0**12 == 61440 and FP4.tiny == 2.0**-14 and FP4.smallest_subnormal == 2.0**-17
    assert FP4_FTZ.smallest_subnormal == FP4_FTZ.tiny and not FP4_FTZ.has_subnormals
    assert FP4.has_inf and FP4.emulated and FP4.dtype == np.float32
    assert get_format("fp(p=24,emax=127)").dtype == np.float32  # float32's own range: still a float32 carrier
    assert get_format("fp(p=25,emax=127)").dtype == np.float64  # more precision than float32
    assert get_format("fp(p=8,emax=128)").dtype == np.float64  # more range than float32
    assert get_format("fp(p=52,emax=1023)").max == (2 - 2.0**-51) * 2.0**1023


def test_custom_names_are_canonical_and_shared():
    assert FP4.name == "fp(p=4,emax=15)" and FP4_FTZ.name == "fp(p=4,emax=15,subnormals=no)"
    for text in ("fp(p=4,emax=15)", "FP( p=4 , emax=15 )", "fp(emax=15,p=4)", "fp(p=4,emax=15,subnormals=yes)"):
        assert get_format(text) is FP4
    assert custom_format(4, 15, False) is FP4_FTZ
    assert get_format(FP4) is FP4


@pytest.mark.parametrize("text, why", [
    ("fp(p=1,emax=15)", "p=1 is outside 2..52"), ("fp(p=53,emax=15)", "p=53 is outside 2..52"),
    ("fp(p=4,emax=0)", "emax=0 is outside 1..1023"), ("fp(p=4,emax=1024)", "emax=1024 is outside 1..1023"),
    ("fp(p=4)", "emax= is missing"), ("fp(emax=4)", "p= is missing"), ("fp(p=4,emax=15", "no closing parenthesis"),
    ("fp(p=4,emax=15,q=2)", "unknown key 'q'"), ("fp(p=4,p=5,emax=3)", "key 'p' given twice"),
    ("fp(p=x,emax=15)", "p=x is not a positive integer"), ("fp(p=4,emax=15,subnormals=maybe)", "not yes or no"),
    ("fp(p=4 emax=15)", "p=4 emax=15 is not a positive integer"), ("fp(p=4,emax)", "field 'emax' is not key=value")])
def test_bad_custom_formats_name_the_text_and_the_valid_forms(text, why):
    with pytest.raises(SpecError) as err:
        get_format(text)
    message = str(err.value)
    assert repr(text) in message and why in message
    assert "valid forms: fp(p=P,emax=E), fp(p=P,emax=E,subnormals=no)" in message and "\n" not in message


def test_unknown_names_list_the_emulated_forms():
    with pytest.raises(SpecError, match=r"unknown format 'tf31'; valid choices: fp64, .*, tf32, fp\(p=P,emax=E\), "
                                        r"fp\(p=P,emax=E,subnormals=no\)$"):
        get_format("tf31")


def test_policies_take_the_new_formats():
    pol = parse_policy("p=fp(p=4,emax=15),c=fp(p=4,emax=15),s=fp32,m=fp32")
    assert pol.params is FP4 and pol.compute is FP4
    assert str(pol) == "p=fp(p=4,emax=15),c=fp(p=4,emax=15),a=fp32,s=fp32,m=fp32"
    assert parse_policy(str(pol)) == pol
    assert parse_policy("p=tf32,c=tf32,a=fp32,s=fp32").update is FORMATS["fp32"]
    assert wider(TF32, FORMATS["fp16"]) is TF32 and wider(TF32, FORMATS["fp32"]) is FORMATS["fp32"]
    assert wider(TF32, FORMATS["bf16"]) is TF32


def test_ulp_of_the_new_formats():
    assert ulp(1.0, TF32) == 2.0**-10 and ulp(0.0, TF32) == 2.0**-136
    assert ulp(1.0, FP4) == 0.125 and ulp(0.0, FP4) == 2.0**-17 and ulp(0.0, FP4_FTZ) == 2.0**-14
    assert ulp(1e-6, FP4_FTZ) == 2.0**-14 and ulp(1e9, FP4) == 2.0**12


# ----------------------------------------------------------------------------------------------------------------
# 2. round_to against an integer reference
# ----------------------------------------------------------------------------------------------------------------

def reference_round(patterns: np.ndarray, fmt) -> np.ndarray:
    """Round-to-nearest-even of float32 (uint32) or float64 (uint64) patterns to ``fmt``, decided on integers:
    |x| = sig * 2^(e - t), the quantum 2^q of fmt at |x| (q = max(exponent of x, emin) - m), n = sig >> (q - e + t)
    rounded up when the remainder is above half, or half with n odd. Returns float64."""
    if patterns.dtype == np.uint32:
        t, bias, width = 23, 127, 32
    else:
        t, bias, width = 52, 1023, 64
    u = patterns.astype(np.uint64)
    negative = (u >> np.uint64(width - 1)) & np.uint64(1) == 1
    a = u & np.uint64((1 << (width - 1)) - 1)
    biased = (a >> np.uint64(t)).astype(np.int64)
    fraction = (a & np.uint64((1 << t) - 1)).astype(np.int64)
    top = (1 << (width - 1 - t)) - 1
    sig = np.where(biased > 0, fraction | (1 << t), fraction)
    e = np.maximum(biased, 1) - bias
    length = np.frexp(sig.astype(np.float64))[1]  # bit length of sig (exact: sig < 2^53); 0 for sig = 0
    exponent = e - t + length - 1
    m, emin, emax = fmt.mantissa_bits, fmt.min_exponent, fmt.max_exponent
    q = np.maximum(exponent, emin) - m
    drop = np.clip(q - (e - t), 0, 62)
    n = sig >> drop
    remainder = sig - (n << drop)
    half = np.where(drop > 0, np.int64(1) << np.maximum(drop - 1, 0), 1 << 62)
    n = n + ((remainder > half) | ((remainder == half) & (n % 2 == 1)))
    value = np.ldexp(n.astype(np.float64), np.where(drop > 0, q, e - t))
    value = np.where(drop > 0, value, np.ldexp(sig.astype(np.float64), e - t))
    largest = math.ldexp(2 ** (m + 1) - 1, emax - m)
    value = np.where(value > largest, np.inf, value)
    if not fmt.has_subnormals:
        value = np.where(value < math.ldexp(1.0, emin), 0.0, value)
    value = np.where(biased == top, np.where(fraction == 0, np.inf, np.nan), value)
    return np.where(negative, -value, value)


def check_round_to(patterns: np.ndarray, fmt) -> None:
    x = patterns.view(np.float32 if patterns.dtype == np.uint32 else np.float64)
    with np.errstate(all="ignore"):
        got, expected = round_to(x, fmt), reference_round(patterns, fmt)
    bad = ~same(got, expected)
    assert not bad.any(), (f"{fmt.name}: {bad.sum()} differ, e.g. {x[bad][:4]} -> {got[bad][:4]}, "
                           f"not {expected[bad][:4]}")


def interesting32(fmt, n: int, rng) -> np.ndarray:
    """float32 patterns around fmt's range: its binades (and two beyond), midpoints and their neighbours, the
    specials, and uniform random patterns."""
    lo, hi = max(fmt.min_exponent - fmt.mantissa_bits - 3, -149), min(fmt.max_exponent + 2, 127)
    mantissa = rng.integers(0, 2**23, n, dtype=np.uint64)
    exponent = rng.integers(max(lo + 127, 0), hi + 128, n, dtype=np.uint64)
    near = ((exponent << np.uint64(23)) | mantissa).astype(np.uint32)
    shift = 23 - fmt.mantissa_bits
    half = np.uint32(1 << (shift - 1)) if shift > 0 else np.uint32(0)
    midpoints = (near & np.uint32(~((1 << shift) - 1) & 0xFFFFFFFF)) | half
    specials = np.array([0, 0x7F800000, 0x7FC00000, 0x7F800001, 1, 0x007FFFFF, 0x00800000, 0x7F7FFFFF],
                        dtype=np.uint32)
    uniform = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    out = np.concatenate([near, midpoints, midpoints + np.uint32(1), midpoints - np.uint32(1), specials, uniform])
    return np.concatenate([out, out | np.uint32(0x80000000)])


def interesting64(fmt, n: int, rng) -> np.ndarray:
    lo, hi = max(fmt.min_exponent - fmt.mantissa_bits - 3, -1074), min(fmt.max_exponent + 2, 1023)
    mantissa = rng.integers(0, 2**52, n, dtype=np.uint64)
    exponent = rng.integers(max(lo + 1023, 0), hi + 1024, n, dtype=np.uint64)
    near = (exponent << np.uint64(52)) | mantissa
    shift = 52 - fmt.mantissa_bits
    midpoints = (near & np.uint64(~((1 << shift) - 1) & (2**64 - 1))) | np.uint64(1 << (shift - 1))
    specials = np.array([0, 0x7FF0000000000000, 0x7FF8000000000000, 1, 0x7FEFFFFFFFFFFFFF], dtype=np.uint64)
    out = np.concatenate([near, midpoints, midpoints + np.uint64(1), midpoints - np.uint64(1), specials])
    return np.concatenate([out, out | np.uint64(1 << 63)])


def test_reference_on_hand_checked_values():
    """The reference itself, on values checked by hand (fp(p=4,emax=15): 1.xxx * 2^e, e in -14..15, max 61440)."""
    x = np.array([1.0625, 1.1875, 61440, 63487, 63488, 2.0**-17, 2.0**-18, 3 * 2.0**-18, 0.9 * 2.0**-14, -0.0],
                 dtype=np.float32)
    assert reference_round(x.view(np.uint32), FP4).tolist() == [1.0, 1.25, 61440, 61440, np.inf, 2.0**-17, 0.0,
                                                                2.0**-16, 7 * 2.0**-17, -0.0]
    flushed = reference_round(x.view(np.uint32), FP4_FTZ)
    assert flushed[5:].tolist() == [0.0, 0.0, 0.0, 0.0, -0.0]  # 7 * 2^-17 is below tiny 2^-14: flushed
    assert math.copysign(1, reference_round(np.array([-2.0**-18], np.float32).view(np.uint32), FP4_FTZ)[0]) == -1


@pytest.mark.parametrize("fmt", SMALL, ids=ids)
def test_round_to_matches_the_integer_reference_float32(fmt):
    check_round_to(interesting32(fmt, 200_000, np.random.default_rng(7)), fmt)


@pytest.mark.parametrize("fmt", SMALL + WIDE, ids=ids)
def test_round_to_matches_the_integer_reference_float64(fmt):
    check_round_to(interesting64(fmt, 100_000, np.random.default_rng(8)), fmt)


def test_round_to_edges():
    """Ties to even, overflow at the format's max (not the carrier's), subnormals and flush, NaN, signed zero."""
    # TF32.max = 2^128 (1 - 2^-11); the midpoint to 2^128 ties to even (2^128: inf)
    x = np.array([1 + 2.0**-11, 1 + 3 * 2.0**-11, 2.0**128 * (1 - 2.0**-12), 2.0**128 * (1 - 2.0**-12 - 2.0**-30),
                  TF32.max, 2.0**-137, 3 * 2.0**-137, np.nan, -0.0, -1e-50])
    assert same(round_to(x, TF32), [1.0, 1 + 2.0**-9, np.inf, TF32.max, TF32.max, 0.0, 2.0**-135, np.nan, -0.0,
                                    -0.0]).all()
    x = np.array([61439.0, 63487.0, 63488.0, -1e6, 2.0**-14 - 2.0**-18, 2.0**-14 - 2.0**-17 * 1.25, 2.0**-18])
    assert same(round_to(x, FP4), [61440, 61440, np.inf, -np.inf, 2.0**-14, 7 * 2.0**-17, 0.0]).all()
    # no subnormals: 2^-14 - 2^-18 rounds (with subnormals) up to tiny and stays; 7 * 2^-17 is flushed
    assert same(round_to(x, FP4_FTZ), [61440, 61440, np.inf, -np.inf, 2.0**-14, 0.0, 0.0]).all()
    assert same(round_to(-x[-2:], FP4_FTZ), [-0.0, -0.0]).all()


@settings(max_examples=60, deadline=None)
@given(p=st.integers(2, 52), emax=st.integers(1, 1023), subnormals=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_round_to_matches_the_reference_for_any_parameters(p, emax, subnormals, seed):
    fmt = custom_format(p, emax, subnormals)
    rng = np.random.default_rng(seed)
    check_round_to(interesting64(fmt, 2_000, rng), fmt)
    if fmt.dtype == np.float32:
        check_round_to(interesting32(fmt, 2_000, rng), fmt)


@numba.njit(cache=False)
def _reference_chunk(first, count, m, emin, emax, subnormals, out):
    """:func:`reference_round` for the float32 patterns first .. first + count - 1, one pattern at a time in
    integers (compiled: the exhaustive check's reference; tied to the numpy one by the test below)."""
    largest = (2 ** (m + 1) - 1) * 2.0 ** (emax - m)
    for i in range(count):
        u = first + i
        a = u & 0x7FFFFFFF
        biased, fraction = a >> 23, a & 0x7FFFFF
        if biased == 255:
            value = np.inf if fraction == 0 else np.nan
        else:
            sig = fraction | (1 << 23) if biased > 0 else fraction
            e = max(biased, 1) - 127
            length = 0
            while (sig >> length) > 0:
                length += 1
            q = max(e - 23 + length - 1, emin) - m
            drop = q - (e - 23)
            if drop <= 0:
                value = sig * 2.0 ** (e - 23)
            else:
                drop = min(drop, 40)
                n = sig >> drop
                remainder = sig - (n << drop)
                half = 1 << (drop - 1)
                if remainder > half or (remainder == half and n % 2 == 1):
                    n += 1
                value = n * 2.0 ** q
            if value > largest:
                value = np.inf
            if not subnormals and value < 2.0 ** emin:
                value = 0.0
        out[i] = -value if u >> 31 else value


def compiled_reference(first: int, count: int, fmt) -> np.ndarray:
    out = np.empty(count)
    _reference_chunk(first, count, fmt.mantissa_bits, fmt.min_exponent, fmt.max_exponent, fmt.has_subnormals, out)
    return out


@pytest.mark.parametrize("fmt", [TF32, FP4, FP4_FTZ], ids=ids)
def test_compiled_reference_equals_the_numpy_reference(fmt):
    for first in (0, 0x33000000, 0x3F800000, 0x7F000000, 0x80000000, 0xB8000000, 0xFF700000):
        patterns = np.arange(first, first + 2**20, dtype=np.uint64).astype(np.uint32)
        assert same(compiled_reference(first, 2**20, fmt), reference_round(patterns, fmt)).all()


@pytest.mark.exhaustive
@pytest.mark.parametrize("fmt", [TF32, FP4, FP4_FTZ], ids=ids)
def test_round_to_every_float32_pattern(fmt):
    """All 2^32 float32 patterns, in 2^20-pattern chunks (cache-sized), against the compiled integer reference
    (measured: docs/formats.md)."""
    t0 = time.perf_counter()
    step = 1 << 20
    bad = 0
    for start in range(0, 1 << 32, step):
        x = np.arange(start, start + step, dtype=np.uint64).astype(np.uint32).view(np.float32)
        with np.errstate(all="ignore"):
            bad += int((~same(round_to(x, fmt), compiled_reference(start, step, fmt))).sum())
    assert bad == 0
    print(f"\n{fmt.name}: all 2^32 float32 patterns in {time.perf_counter() - t0:.0f} s")


# ----------------------------------------------------------------------------------------------------------------
# 3. the backends' rounding primitives, bit for bit against round_to
# ----------------------------------------------------------------------------------------------------------------

def test_numba_rounding_codes_equal_round_to():
    from precision.backends.numba_backend.rounding import (FormatCode, _fields, format_code, round_array32,
                                                           round_array64, static_code)
    rng = np.random.default_rng(3)
    for fmt in SMALL + WIDE:
        code = FormatCode(*_fields(fmt))  # the rounding itself, also for p > 25 (format_code refuses those)
        x64 = interesting64(fmt, 50_000, rng).view(np.float64)
        out64 = np.empty_like(x64)
        round_array64(x64, code, out64)
        with np.errstate(all="ignore"):
            assert same(out64, round_to(x64, fmt)).all(), fmt.name
        if fmt.dtype == np.float32:
            x32 = interesting32(fmt, 50_000, rng).view(np.float32)
            for c in (code, *([static_code(fmt)] if fmt is TF32 else [])):
                out32 = np.empty_like(x32)
                round_array32(x32, c, out32)
                with np.errstate(all="ignore"):
                    assert same(out32, round_to(x32, fmt)).all(), fmt.name
    assert format_code(TF32) == FormatCode(*_fields(TF32))
    with pytest.raises(SpecError, match=r"format fp\(p=26,emax=100\) is refused by the numba backend: .* p = 26"):
        format_code("fp(p=26,emax=100)")
    with pytest.raises(SpecError, match=r"fp\(p=4,emax=15\) has no static"):
        static_code(FP4)


def test_numpy_convert_and_per_op_rounding():
    from precision.backends.numpy_backend.ops import EmulatedArray, FormatOps, convert
    rng = np.random.default_rng(4)
    fp32, fp64 = FORMATS["fp32"], FORMATS["fp64"]
    for fmt in SMALL + [get_format("fp(p=11,emax=300)")]:
        x = rng.standard_normal(20_000) * np.exp2(rng.integers(-20, 20, 20_000))
        a = convert(x, fp64, fmt)
        assert isinstance(a, EmulatedArray) and a.dtype == fmt.dtype and same(a, round_to(x, fmt)).all()
        b = convert(rng.standard_normal(20_000).astype(np.float32), fp32, fmt)
        wa, wb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)  # plain arrays
        assert type(wa) is np.ndarray and (type(a.astype(np.float64)) is np.ndarray) == (fmt.dtype == np.float32)
        with np.errstate(all="ignore"):
            for got, exact in ((a + b, wa + wb), (a - b, wa - wb), (a * b, wa * wb), (a / b, wa / wb),
                               (np.sqrt(np.abs(a)), np.sqrt(np.abs(wa))), (-a * np.float32(0.1), -wa * np.float32(0.1)),
                               (np.where(a > 0, a, b) * b, np.where(wa > 0, wa, wb) * wb)):
                assert isinstance(got, EmulatedArray) and got.dtype == fmt.dtype
                assert same(got, round_to(exact, fmt)).all(), fmt.name
        ops = FormatOps(fmt, fp32 if fmt.dtype == np.float32 else fp64)
        with np.errstate(all="ignore"):
            assert same(ops.exp(a[:100]), round_to(np.exp(wa[:100]), fmt)).all()
        with pytest.raises(TypeError):
            a.sum()  # a reduction would not round per op: refused, use FormatOps.sum
        with pytest.raises(TypeError):
            a[:4] @ b[:4]


def test_numpy_refuses_arithmetic_beyond_p25():
    from precision.backends.numpy_backend.ops import FormatOps, convert
    fmt = get_format("fp(p=30,emax=100)")
    with pytest.raises(SpecError, match=r"format fp\(p=30,emax=100\) cannot be a compute or update format in the "
                                        r"numpy backend"):
        FormatOps(fmt, FORMATS["fp64"])
    a = convert(np.array([1.0, 3.0]), FORMATS["fp64"], fmt)  # storage: exact at any p
    with pytest.raises(SpecError):
        a + a


def test_jax_rounding_equals_round_to():
    import jax
    import jax.numpy as jnp
    from precision.backends.jax_backend.ops import convert, round_in_float32
    rng = np.random.default_rng(5)
    rounder = jax.jit(round_in_float32, static_argnums=1)
    for fmt in [f for f in SMALL if f.dtype == np.float32]:
        x = interesting32(fmt, 100_000, rng).view(np.float32)
        with np.errstate(all="ignore"):
            expected = round_to(x, fmt)
        assert same(np.asarray(rounder(jnp.asarray(x), fmt)), expected).all(), fmt.name
        y = jax.jit(lambda v: convert(v, FORMATS["fp32"], fmt))(jnp.asarray(x))
        assert same(np.asarray(y), expected).all()
    with jax.enable_x64(True):
        for fmt in [TF32, get_format("fp(p=11,emax=300)"), get_format("fp(p=40,emax=500,subnormals=no)")]:
            x = interesting64(fmt, 50_000, rng).view(np.float64)
            with np.errstate(all="ignore"):
                expected = round_to(x, fmt)
            y = np.asarray(convert(jnp.asarray(x), FORMATS["fp64"], fmt))
            assert y.dtype == fmt.dtype and same(y, expected).all(), fmt.name


def test_jax_refuses_emulated_arithmetic_in_one_line():
    from precision.backends.jax_backend.ops import JaxOps, check_policy, convert, refusal
    with pytest.raises(SpecError, match=r"^format tf32 is refused as the compute format by the jax backend: XLA has "
                                        r"no tf32 dtype[^\n]*$"):
        JaxOps(TF32, FORMATS["fp32"])
    assert "as the update format" in refusal(parse_policy("p=tf32,c=bf16"))  # U = wider(tf32, tf32 state)
    assert refusal(parse_policy("p=tf32,c=fp32,s=fp32")) is None  # storage only: exact conversions
    with pytest.raises(SpecError, match="compute format"):
        check_policy(parse_policy("p=fp32,c=fp(p=8,emax=40)"))
    import jax.numpy as jnp
    with pytest.raises(SpecError, match=r"fp\(p=11,emax=300\) .* float64, which JAX holds only with x64"):
        convert(jnp.ones(3, jnp.float32), FORMATS["fp32"], get_format("fp(p=11,emax=300)"))


# ----------------------------------------------------------------------------------------------------------------
# 4. training
# ----------------------------------------------------------------------------------------------------------------

def train(backend: str, problem: str, opt: str, policy: str, steps: int = 30, batch: int = 32, dataset=None,
          accum_steps: int = 1):
    dataset = dataset or make_dataset(problem, steps=steps, batch_size=batch)
    optimizer = make_optimizer("sgd", momentum=0.9) if opt == "sgd-momentum" else make_optimizer(opt)
    spec = RunSpec(problem=problem, optimizer=optimizer, policy=parse_policy(policy), backend=backend, steps=steps,
                   batch_size=None if dataset.batches is None else int(dataset.batches.shape[1]), record_every=10,
                   accum_steps=accum_steps)
    return get_backend(backend).train(spec, dataset)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("problem, opt", [("logreg", "adam"), ("softmax", "sgd-momentum")])
def test_tf32_trains_exactly_like_fp16_inside_fp16s_range(backend, problem, opt):
    """tf32 and fp16 share p = 11; these runs never leave fp16's normal range, so a tf32 run that rounds after
    every op equals the fp16 run (native numpy float16, numba's F16C path) bit for bit. A tf32 left in float32
    precision anywhere would differ."""
    a = train(backend, problem, opt, "p=tf32,c=tf32,a=fp32,s=fp32")
    b = train(backend, problem, opt, "p=fp16,c=fp16,a=fp32,s=fp32")
    assert a.diverged_at is None and same(a.params, b.params).all()
    assert a.final_params.dtype == np.float32 and same(a.final_params, round_to(a.final_params, TF32)).all()
    c = train(backend, problem, opt, "p=fp32,c=tf32")
    assert not same(c.params, train(backend, problem, opt, "fp32").params).all()  # c=tf32 is not fp32


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_tf32_mixed_with_loss_scale_and_micro_batches_equals_fp16(backend):
    a = train(backend, "logreg", "adam", "p=tf32,c=tf32,a=fp32,s=fp32,m=fp32,ls=1024", steps=20, accum_steps=3)
    b = train(backend, "logreg", "adam", "p=fp16,c=fp16,a=fp32,s=fp32,m=fp32,ls=1024", steps=20, accum_steps=3)
    assert a.diverged_at is None and same(a.params, b.params).all()


def crafted_logreg() -> Dataset:
    """The conformance suite's one-row-batch logreg (tests/test_conformance.py BATCH1_DATA)."""
    X = np.array([[0.5, -1.0], [1.5, 0.25], [-0.75, 0.5], [1.0, 1.0]])
    y = np.array([1, 0, 0, 1])
    layout = get_problem("logreg").layout(2, 0)
    return Dataset(problem="logreg", data="crafted", seed=0, X_train=X, y_train=y, X_test=X, y_test=y, classes=0,
                   layout=layout, init_params=np.array([0.25, -0.5, 0.125]),
                   batches=(np.arange(16) % 4).reshape(-1, 1).astype(np.int64))


POLICIES = ["p=tf32,c=tf32,a=fp32,s=fp32", "p=fp32,c=tf32", "p=tf32",
            "p=fp(p=4,emax=15),c=fp(p=4,emax=15),s=fp32,m=fp32",
            "p=fp(p=8,emax=40,subnormals=no)", "p=fp(p=20,emax=200),a=fp64", "p=tf32,c=fp32,s=fp32"]


@pytest.mark.parametrize("opt", ["sgd-momentum", "adam"])
@pytest.mark.parametrize("policy", POLICIES)
def test_numba_equals_numpy_bit_for_bit(policy, opt):
    """Bit for bit where the conformance suite promises bits for compute formats below fp32 (one-row batches: no
    summation order); on the synthetic logreg (batches of 32: BLAS's order against numba's) within the
    low-precision bound of tests/test_numba_backend.py, 5 sqrt(T) u (measured: most of these bit for bit too)."""
    ref = train("numpy", "logreg", opt, policy, steps=16, dataset=crafted_logreg())
    got = train("numba", "logreg", opt, policy, steps=16, dataset=crafted_logreg())
    assert ref.diverged_at == got.diverged_at is None and same(ref.params, got.params).all()
    assert same(ref.final_params, got.final_params).all() and got.final_params.dtype == ref.final_params.dtype
    ref, got = (train(b, "logreg", opt, policy, steps=30) for b in ("numpy", "numba"))
    assert ref.diverged_at == got.diverged_at is None
    u = parse_policy(policy).params.unit_roundoff
    rel = np.linalg.norm(got.params - ref.params, axis=1) / np.linalg.norm(ref.params, axis=1)
    assert rel.max() <= 5 * math.sqrt(30) * u


def test_numpy_and_numba_refuse_p_beyond_25_in_one_line():
    for backend, match in (("numpy", "cannot be a compute or update format in the numpy backend"),
                           ("numba", "is refused by the numba backend")):
        with pytest.raises(SpecError, match=match):
            train(backend, "logreg", "adam", "p=fp(p=30,emax=100),a=fp64", steps=2)


def test_jax_trains_an_emulated_storage_format_and_refuses_emulated_arithmetic():
    ref = train("numpy", "logreg", "adam", "p=tf32,c=fp32,s=fp32")
    got = train("jax", "logreg", "adam", "p=tf32,c=fp32,s=fp32")
    assert same(got.final_params, round_to(got.final_params, TF32)).all()  # every param a tf32 value
    rel = np.max(np.abs(got.params - ref.params)) / np.max(np.abs(ref.params))
    assert rel <= 30 * 5 * TF32.unit_roundoff
    for policy in ("p=tf32,c=tf32,a=fp32,s=fp32", "p=fp32,c=tf32", "p=fp(p=4,emax=15)"):
        with pytest.raises(SpecError, match="refused as the compute format by the jax backend"):
            train("jax", "logreg", "adam", policy, steps=2)
