"""Property-based tests (hypothesis): the policy grammar and round_to.

Policies: every Policy that constructs prints to a string that parses back to it, and any text at all either
parses or raises PrecisionError. round_to: for every float64 input and every format, the result is a value of the
format, one of the two format values bracketing the input and the nearer one, ties to even, overflowing to inf
(NaN for e4m3fn) past the rounding boundary above max. The oracle is exact rational arithmetic (fractions), which
shares nothing with round_to's frexp / rint / ldexp; casts are used only where they are exact oracles: numpy's
float64 -> float16 cast, and any cast from float32 inputs. ml_dtypes' float64 -> bf16 / fp8 casts round twice
(through float32), so they are no oracle from float64 (tests/test_formats.py pins that finding).

tests/test_formats.py covers tables and large seeded samples; these tests add hypothesis's search, which favours
the boundaries (zeros, subnormals, max, NaN payloads, exact halves) and shrinks any failure to a minimal input.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from precision.errors import PrecisionError
from precision.formats import FORMATS, Format, round_to
from precision.policy import PRESETS, Policy, parse_policy
from test_formats import cast, mismatches, stored

ALL_FORMATS = list(FORMATS.values())
_formats = st.sampled_from(ALL_FORMATS)

# ---------------------------------------------------------------------------------------------------------------
# Policy grammar
# ---------------------------------------------------------------------------------------------------------------

_accum_formats = st.sampled_from([FORMATS["fp32"], FORMATS["fp64"]])  # the only ones a Policy accepts
_loss_scales = st.none() | st.integers(-1074, 1023).map(lambda k: math.ldexp(1.0, k))  # powers of two, all


@st.composite
def policies(draw) -> Policy:
    """Any Policy the constructor accepts (the few draws it refuses, fp32 accumulating fp64, are discarded;
    refused text is the next test's business)."""
    fields = dict(params=draw(_formats), compute=draw(_formats), accum=draw(_accum_formats), state=draw(_formats),
                  master=draw(st.none() | _formats), loss_scale=draw(_loss_scales))
    try:
        return Policy(**fields)
    except PrecisionError:
        assume(False)


@settings(max_examples=600, deadline=None, database=None)
@given(policies())
def test_every_policy_parses_back_from_its_string(policy):
    text = str(policy)
    assert parse_policy(text) == policy
    assert parse_policy(policy.name) == policy  # a preset's name or, for others, the same full string
    assert parse_policy(f"  {text.replace(',', ' , ')}  ") == policy  # spaces around fields are ignored


def test_presets_are_found_by_the_property_strategy_too():
    """The presets are Policies like any other: each prints and parses back (the strategy reaches them rarely)."""
    for name, preset in PRESETS.items():
        assert parse_policy(str(preset)) == preset and preset.name == name


_KEYS = ["p", "c", "a", "s", "m", "ls", "x", "", " p", "P", "p=c"]
_VALUES = [*FORMATS, "f32", "bfloat16", "E4M3", "fp12", "", "1024", "0.5", "3", "-2", "1e999", "nan", "inf", "0",
           "0x10", "1_024", "２", "\x00", "p=fp32"]
_fields = st.tuples(st.sampled_from(_KEYS) | st.text(max_size=3), st.sampled_from(["=", "", "=="]),
                    st.sampled_from(_VALUES) | st.text(max_size=5)).map("".join)
_near_grammar = st.lists(_fields, max_size=7).map(",".join)


@settings(max_examples=1200, deadline=None, database=None)
@given(st.text() | _near_grammar | st.sampled_from(list(PRESETS)))
def test_any_text_parses_or_raises_a_precision_error(text):
    try:
        policy = parse_policy(text)
    except PrecisionError as exc:  # SpecError is one; any other exception fails the test with its traceback
        assert str(exc) and "\n" not in str(exc).strip()
        return
    assert isinstance(policy, Policy)
    assert parse_policy(str(policy)) == policy


# ---------------------------------------------------------------------------------------------------------------
# round_to against exact rational arithmetic
# ---------------------------------------------------------------------------------------------------------------

def _neighbours(x: float, fmt: Format) -> tuple[Fraction, Fraction, Fraction]:
    """(lo, hi, quantum): the values of fmt's grid (exponent range unbounded above) with lo <= x <= hi."""
    exponent = max(math.frexp(x)[1] - 1, fmt.min_exponent)  # subnormals share emin's quantum
    quantum = Fraction(2) ** (exponent - fmt.mantissa_bits)
    steps = Fraction(x) / quantum
    return math.floor(steps) * quantum, math.ceil(steps) * quantum, quantum


def _correctly_rounded(x: float, fmt: Format) -> float:
    """Round to nearest, ties to even, in exact arithmetic; overflow per the format (inf, or NaN without inf)."""
    if math.isnan(x):
        return math.nan
    if math.isinf(x):
        return x if fmt.has_inf else math.nan
    if x == 0:
        return x
    lo, hi, quantum = _neighbours(abs(x), fmt)
    ax = Fraction(abs(x))
    if ax - lo != hi - ax:
        nearest = lo if ax - lo < hi - ax else hi
    else:  # a tie: the even multiple of the quantum has the even last significand bit
        nearest = lo if (lo / quantum) % 2 == 0 else hi
    if nearest > Fraction(fmt.max):
        return math.copysign(math.inf if fmt.has_inf else math.nan, x)
    return math.copysign(float(nearest), x)  # exact: nearest has at most p significant bits


def _same(a: float, b: float) -> bool:
    """Equal as values and in the sign of zero; NaN equals NaN."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


@settings(max_examples=3000, deadline=None, database=None)
@given(st.floats(width=64), _formats)
def test_round_to_float64_is_the_correctly_rounded_neighbour(x, fmt):
    got = float(round_to(x, fmt))
    assert _same(got, _correctly_rounded(x, fmt)), (x, fmt.name, got)
    # The properties the oracle encodes, stated on their own:
    assert _same(float(round_to(got, fmt)), got)  # a value of the format: rounding again changes nothing
    if math.isfinite(got):
        assert np.asarray(got).astype(fmt.dtype).astype(np.float64) == got  # representable: the cast is exact
        lo, hi, _ = _neighbours(abs(x), fmt) if x else (0, 0, 0)
        assert Fraction(abs(got)) in (lo, hi)  # one of the two values bracketing x ...
        other = hi if Fraction(abs(got)) == lo else lo
        assert abs(Fraction(abs(got)) - Fraction(abs(x))) <= abs(other - Fraction(abs(x)))  # ... the nearer
        assert math.copysign(1.0, got) == math.copysign(1.0, x)  # sign kept, zeros included


@st.composite
def _near_ties(draw) -> tuple[float, int, Format]:
    """(x, side, fmt): x is a midpoint between two neighbouring values of fmt (side 0), or a little above (+1) or
    below (-1) one, by 2^-k of the quantum: where ties-to-even decides, and where rounding first to float32 and
    then to fmt (double rounding) lands on the midpoint and goes the wrong way. Random float64 values almost never
    fall there (2^-17 of them for bf16)."""
    fmt = draw(st.sampled_from([f for f in ALL_FORMATS if f.name != "fp64"]))
    exponent = draw(st.integers(fmt.min_exponent, fmt.max_exponent))
    significand = draw(st.integers(0 if exponent == fmt.min_exponent else 2**fmt.mantissa_bits,
                                   2 ** (fmt.mantissa_bits + 1) - 1))
    quantum = Fraction(2) ** (exponent - fmt.mantissa_bits)
    side = draw(st.sampled_from([0, 1, -1]))
    k = draw(st.integers(2, 51 - fmt.mantissa_bits))  # x keeps <= 53 significant bits: exact in float64
    if significand == 0 and side == -1:
        side = 1  # below the midpoint between 0 and the smallest subnormal is still positive: keep it simple
    x = (significand + Fraction(1, 2)) * quantum + side * quantum / 2**k
    assert Fraction(float(x)) == x
    return draw(st.sampled_from([1, -1])) * float(x), side, fmt


@settings(max_examples=1500, deadline=None, database=None)
@given(_near_ties())
def test_round_to_near_midpoints_goes_to_the_nearer_and_ties_to_even(case):
    x, side, fmt = case
    got = float(round_to(x, fmt))
    lo, hi, quantum = _neighbours(abs(x), fmt)
    assert hi - lo == quantum  # the premise: x lies strictly between two neighbours
    even = lo if (lo / quantum) % 2 == 0 else hi
    want = {0: even, 1: hi, -1: lo}[side]
    if want > Fraction(fmt.max):
        assert math.isinf(got) if fmt.has_inf else math.isnan(got), (x, fmt.name, got)
    else:
        assert got == math.copysign(float(want), x), (x, side, fmt.name, got)
    assert _same(got, _correctly_rounded(x, fmt))  # the oracle agrees


@settings(max_examples=1000, deadline=None, database=None)
@given(st.lists(st.floats(width=64), min_size=1, max_size=64))
def test_round_to_float64_to_fp16_matches_numpy(values):
    """numpy casts float64 -> float16 in one correct rounding: an exact oracle for fp16 from float64."""
    x = np.array(values, dtype=np.float64)
    fp16 = FORMATS["fp16"]
    assert not mismatches(stored(round_to(x, fp16), fp16), cast(x, fp16)).any()


@settings(max_examples=1000, deadline=None, database=None)
@given(st.lists(st.floats(width=32), min_size=1, max_size=64), _formats)
def test_round_to_float32_matches_the_library_casts(values, fmt):
    """From float32, numpy's and ml_dtypes' casts round once (float32 is the source, no intermediate), so they are
    exact oracles for every format."""
    x = np.array(values, dtype=np.float32)
    assert not mismatches(stored(round_to(x, fmt), fmt), cast(x, fmt)).any()
