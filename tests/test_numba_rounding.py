"""The numba backend's rounding kernels, bit for bit against numpy / ml_dtypes casts and formats.round_to.

Every float32 -> format rounding exists twice: the generic kernel (format as runtime integers, used by the training
loops) and the static one (format folded in at compile time: bf16 bit trick, F16C for fp16, used by the update
kernels). Both are checked on edge tables derived from each format's data, on every midpoint between neighbouring
values of the 8/16-bit formats and the float32 numbers next to it (double-rounding traps), on >= 10^7 random bit
patterns, and (marker ``exhaustive``) on all 2^32 float32 patterns.

Conventions: bit patterns are compared, so -0 != +0, and any NaN equals any NaN (payloads are not part of the
contract: the kernels return a quiet NaN).
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
import time

import numba
import numpy as np
import pytest

from precision.backends.numba_backend.rounding import (HAS_F16C, format_code, round_array32, round_array64,
                                                       static_code)
from precision.backends.numba_backend.storage import decode_array16, encode_array16
from precision.formats import FORMATS, Format, round_to

NARROW = [f for f in FORMATS.values() if f.precision < FORMATS["fp32"].precision]  # fp16, bf16, fp8 x2
FROM_FP32 = NARROW + [FORMATS["fp32"]]
KINDS = ("generic", "static")
RANDOM_PATTERNS = 10**7


def code_for(fmt: Format, kind: str):
    return format_code(fmt) if kind == "generic" else static_code(fmt)


def reference32(x: np.ndarray, fmt: Format) -> np.ndarray:
    """The library cast float32 -> format -> float32 (numpy for fp16/fp32, ml_dtypes for bf16 and fp8)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return x.astype(fmt.dtype).astype(np.float32)


def rounded32(x: np.ndarray, fmt: Format, kind: str) -> np.ndarray:
    out = np.empty_like(x)
    round_array32(x, code_for(fmt, kind), out)
    return out


def assert_same_bits(got: np.ndarray, want: np.ndarray, inputs: np.ndarray, what: str):
    """Bit patterns equal, NaN == NaN."""
    u = np.dtype(f"u{got.dtype.itemsize}")
    differ = got.view(u) != want.view(u)
    differ &= ~(np.isnan(got) & np.isnan(want))
    if differ.any():
        i = np.flatnonzero(differ)[:5]
        detail = ", ".join(f"{inputs[j]!r} -> {got[j]!r} (want {want[j]!r})" for j in i)
        pytest.fail(f"{what}: {int(differ.sum())} of {differ.size} differ, e.g. {detail}")


def float32_neighbours(values: np.ndarray) -> np.ndarray:
    """Each float32 value, the float32 numbers just below and above it, and their negatives."""
    v = np.asarray(values, dtype=np.float32)
    with np.errstate(over="ignore"):  # the float32 max steps up to inf: a wanted input
        around = np.concatenate([v, np.nextafter(v, np.float32(np.inf)), np.nextafter(v, np.float32(-np.inf))])
    return np.concatenate([around, -around])


def edge_table(fmt: Format) -> np.ndarray:
    """Boundaries of ``fmt`` from its data: zero, subnormal and normal limits, the overflow threshold (max plus
    half an ulp of the top binade: the tie that decides inf vs max), specials, with float32 neighbours."""
    top_ulp = math.ldexp(1.0, fmt.max_exponent - fmt.mantissa_bits)
    values = [0.0, fmt.smallest_subnormal, fmt.smallest_subnormal / 2, fmt.smallest_subnormal * 1.5,
              fmt.tiny, fmt.tiny - fmt.smallest_subnormal / 2, fmt.max, fmt.max + top_ulp / 2, fmt.max + top_ulp,
              1.0, 1.0 + fmt.eps / 2, 1.0 + fmt.eps * 1.5]
    f32 = np.finfo(np.float32)
    specials = [np.inf, np.nan, float(f32.max), float(f32.smallest_subnormal), float(f32.tiny)]
    with np.errstate(over="ignore"):
        table = np.asarray(values + specials, dtype=np.float64).astype(np.float32)
    return float32_neighbours(table)


def midpoints(fmt: Format) -> np.ndarray:
    """Every midpoint between neighbouring finite values of an 8/16-bit format (a float32 number: it needs
    p + 1 <= 12 bits), with its float32 neighbours: the inputs where ties-to-even and double rounding matter."""
    patterns = np.arange(2 ** fmt.bits, dtype=np.uint32).astype(np.dtype(f"u{fmt.dtype.itemsize}"))
    with np.errstate(invalid="ignore"):  # signalling-NaN patterns widen with an "invalid" flag
        values = patterns.view(fmt.dtype).astype(np.float64)
    finite = np.unique(values[np.isfinite(values) & (values >= 0)])
    mids = (finite[:-1] + finite[1:]) / 2  # exact in float64
    assert np.array_equal(mids.astype(np.float32).astype(np.float64), mids)
    return float32_neighbours(mids)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", FROM_FP32, ids=str)
def test_edge_table_matches_library_cast(fmt, kind):
    x = edge_table(fmt)
    assert_same_bits(rounded32(x, fmt, kind), reference32(x, fmt), x, f"{fmt} {kind} edges")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", NARROW, ids=str)
def test_every_midpoint_and_its_neighbours(fmt, kind):
    x = midpoints(fmt)
    assert_same_bits(rounded32(x, fmt, kind), reference32(x, fmt), x, f"{fmt} {kind} midpoints")


def test_known_values():
    """A few hand-checked roundings (docs/numerics.md): bf16(0.999) == 1; fp16 overflow at 65520; e4m3fn has no inf."""
    cases = [("bf16", 0.999, 1.0), ("fp16", 65519.0, 65504.0), ("fp16", 65520.0, np.inf),
             ("fp16", 2.0**-25, 0.0), ("fp16", 2.0**-25 * 1.5, 2.0**-24), ("fp8_e4m3fn", 464.0, 448.0),
             ("fp8_e4m3fn", 465.0, np.nan), ("fp8_e5m2", 1e6, np.inf), ("bf16", 1.0 + 2.0**-8, 1.0),
             ("bf16", 1.0 + 3 * 2.0**-8, 1.0 + 2.0**-6)]
    for name, value, want in cases:
        for kind in KINDS:
            got = rounded32(np.array([value], np.float32), FORMATS[name], kind)[0]
            assert (np.isnan(got) and np.isnan(want)) or got == want, (name, kind, value, got)


def random_patterns(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32).view(np.float32)


def ties(fmt: Format, n: int, seed: int) -> np.ndarray:
    """Random float32 patterns whose dropped bits are exactly half an ulp of ``fmt``, and one pattern off:
    uniform patterns hit a tie once in 2^(23 - k) draws only."""
    shift = 23 - fmt.mantissa_bits
    u = np.random.default_rng(seed).integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    tie = (u & np.uint32(~((1 << shift) - 1) & 0xFFFFFFFF)) | np.uint32(1 << (shift - 1))
    return np.concatenate([tie, tie + np.uint32(1), tie - np.uint32(1)]).view(np.float32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", NARROW, ids=str)
def test_random_patterns(fmt, kind):
    x = np.concatenate([random_patterns(RANDOM_PATTERNS, seed=fmt.bits), ties(fmt, 10**6, seed=1)])
    assert_same_bits(rounded32(x, fmt, kind), reference32(x, fmt), x, f"{fmt} {kind} random")


def test_fp32_is_the_identity():
    """In a float32 carrier fp32 needs no rounding: both kernels return every non-NaN pattern unchanged."""
    x = random_patterns(10**6, seed=3)
    for kind in KINDS:
        got = rounded32(x, FORMATS["fp32"], kind)
        keep = ~np.isnan(x)
        assert np.array_equal(got.view(np.uint32)[keep], x.view(np.uint32)[keep])
        assert np.isnan(got[~keep]).all()


def float64_samples(fmt: Format, n: int, seed: int) -> np.ndarray:
    """float64 inputs over the format's whole range and beyond, plus float64 double-rounding traps: the format's
    midpoints nudged by one float64 ulp, which a route through float32 would round to the midpoint itself."""
    rng = np.random.default_rng(seed)
    spread = rng.standard_normal(n) * np.exp2(rng.integers(fmt.min_exponent - fmt.mantissa_bits - 3,
                                                           fmt.max_exponent + 3, n))
    grid = np.exp2(rng.integers(fmt.min_exponent, fmt.max_exponent, n // 4).astype(np.float64))
    mids = grid * (1 + (2 * rng.integers(0, 2**fmt.mantissa_bits, n // 4) + 1) * 2.0 ** -(fmt.mantissa_bits + 1))
    traps = np.concatenate([mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf)])
    return np.concatenate([spread, traps, -traps, [0.0, -0.0, np.inf, -np.inf, np.nan]])


@pytest.mark.parametrize("kind", ["generic", "static"])
@pytest.mark.parametrize("fmt", FROM_FP32, ids=str)
def test_round64_matches_round_to(fmt, kind):
    """float64 -> format in one rounding (for transcendentals computed in float64, and every operation of the
    training loops' float64 carrier) equals formats.round_to; the static fp32 code is the CPU's conversion."""
    x = float64_samples(fmt, 10**6, seed=fmt.bits)
    got = np.empty_like(x)
    round_array64(x, code_for(fmt, kind), got)
    with np.errstate(over="ignore", invalid="ignore"):
        want = round_to(x, fmt)
    assert_same_bits(got, want, x, f"{fmt} round64")


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_storage_round_trip_all_patterns(name):
    """decode16 of every uint16 pattern is the library's value; encode16 gives the pattern back (NaN: a NaN)."""
    fmt = FORMATS[name]
    patterns = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    values = np.empty(patterns.size, np.float32)
    decode_array16(patterns, static_code(fmt), values)
    with np.errstate(invalid="ignore"):
        want = patterns.view(fmt.dtype).astype(np.float32)
    assert_same_bits(values, want, patterns, f"{name} decode")
    back = np.empty_like(patterns)
    encode_array16(values, static_code(fmt), back)
    nan = np.isnan(want)
    assert np.array_equal(back[~nan], patterns[~nan])
    assert np.isnan(back[nan].view(fmt.dtype).astype(np.float32)).all()


def test_static_fp16_uses_f16c_where_the_cpu_has_it():
    """The static fp16 rounding compiles to the F16C conversion instructions when the CPU has them (that is what
    makes the fp16 update kernel fast); the bit-exactness tests above cover both paths."""
    kernel = numba.njit(error_model="numpy")(round_array32.py_func)  # uncached: cached code cannot be inspected
    x = np.ones(64, np.float32)
    kernel(x, static_code(FORMATS["fp16"]), np.empty_like(x))
    assembly = kernel.inspect_asm(kernel.signatures[0])
    assert ("vcvtps2ph" in assembly) == HAS_F16C


NO_F16C_SCRIPT = """
import numpy as np
import numba
from precision.backends.numba_backend.rounding import HAS_F16C, round_array32, static_code
from precision.formats import FORMATS
assert not HAS_F16C, "NUMBA_CPU_FEATURES without f16c must switch the by-hand path on"
kernel = numba.njit(error_model="numpy")(round_array32.py_func)
rng = np.random.default_rng(5)
x = np.concatenate([np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32),
                    rng.integers(0, 2**32, 2 * 10**6, dtype=np.uint64).astype(np.uint32).view(np.float32)])
out = np.empty_like(x)
kernel(x, static_code(FORMATS["fp16"]), out)
with np.errstate(over="ignore", invalid="ignore"):
    want = x.astype(np.float16).astype(np.float32)
differ = (out.view(np.uint32) != want.view(np.uint32)) & ~(np.isnan(out) & np.isnan(want))
print(int(differ.sum()), "vcvtps2ph" in kernel.inspect_asm(kernel.signatures[0]))
"""


def test_static_fp16_without_f16c_is_exact_and_takes_the_other_path(tmp_path):
    """A CPU without F16C, emulated: numba compiles for the feature string in NUMBA_CPU_FEATURES (this CPU's minus
    f16c). HAS_F16C must follow it, the fp16 rounding must then take the by-hand path (no vcvtps2ph) and stay bit
    exact on every fp16 value and 2e6 random float32 patterns. On a CPU without F16C this is the native case."""
    from llvmlite import binding as llvm
    features = llvm.get_host_cpu_features()
    features["f16c"] = False
    # AVX-512 and AVX2 conversion paths that imply F16C would re-enable it in LLVM: turn off what depends on it.
    for name in list(features):
        if name.startswith("avx512"):
            features[name] = False
    env = dict(os.environ, NUMBA_CPU_FEATURES=features.flatten(), NUMBA_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", NO_F16C_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mismatches, uses_f16c = proc.stdout.split()
    assert mismatches == "0"
    assert uses_f16c == "False"


@pytest.mark.exhaustive
@pytest.mark.parametrize("fmt", NARROW, ids=str)
def test_all_float32_patterns(fmt):
    """All 2^32 float32 bit patterns, generic and static kernels, against the library cast (minutes)."""
    chunk = 2**25
    start = time.perf_counter()
    out = np.empty(chunk, np.float32)
    for first in range(0, 2**32, chunk):
        x = np.arange(first, first + chunk, dtype=np.uint64).astype(np.uint32).view(np.float32)
        want = reference32(x, fmt)
        for kind in KINDS:
            round_array32(x, code_for(fmt, kind), out)
            assert_same_bits(out, want, x, f"{fmt} {kind} patterns {first:#x}..")
    print(f"\n{fmt}: 2^32 patterns x {len(KINDS)} kernels in {time.perf_counter() - start:.0f} s")


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_static_codes_pickle_by_name(name):
    """numba's on-disk cache pickles the argument types of every compiled signature: a static code's class must
    pickle by reference (a module attribute), or every process silently recompiles the specializations that take
    one (the pure-fp32 linear-model loop: ~8 s)."""
    code = static_code(FORMATS[name])
    back = pickle.loads(pickle.dumps(code))
    assert type(back) is type(code) and back == code
    numba_type = numba.typeof(code)
    assert pickle.loads(pickle.dumps(numba_type)) == numba_type
