"""Stochastic rounding (docs/stochastic_rounding.md): the Threefry generator against its published known answers,
the rounding against an independent float model, numba and JAX bit for bit against numpy, chunking, process
independence, and unbiasedness with stated binomial bounds."""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from precision import stochastic as S
from precision.backends.jax_backend import stochastic as J
from precision.backends.numba_backend import stochastic as N
from precision.formats import FORMATS, get_format, round_to, ulp

REPO = Path(__file__).resolve().parents[1]
NARROW = ("fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2")
CARRIERS = (np.float64, np.float32)


def _available(names):
    out = []
    for name in names:
        try:
            get_format(name)
        except Exception:  # emulated / custom formats where this checkout's formats.py has them
            continue
        out.append(name)
    return tuple(out)


# Emulated formats (no native dtype): tf32, custom precision / range, with and without subnormals.
EMULATED = _available(("tf32", "fp(p=5,emax=7)", "fp(p=5,emax=7,subnormals=no)", "fp(p=12,emax=20,subnormals=no)",
                       "fp(p=30,emax=200)"))


_jax_round = jax.jit(J.round_stochastic, static_argnums=1)  # fmt static; seed, step, tensor, start_index traced


def _fits(fmt, carrier) -> bool:
    try:
        S.sr_params(fmt, carrier)
    except ValueError:
        return False
    return True

# Source: the known-answer test vectors published with Random123 (D. E. Shaw Research's reference implementation
# of Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3", SC11), its KAT list entries
# "threefry2x32 20 <ctr0> <ctr1> <key0> <key1> -> <out0> <out1>". JAX checks its own threefry_2x32 against the
# same three vectors (its random tests, testThreefry2x32).
THREEFRY2X32_20_KAT = (
    ((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    ((0x243F6A88, 0x85A308D3), (0x13198A2E, 0x03707344), (0xC4923A9C, 0x483DF7A0)),
)


def _bits(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def assert_bitwise_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    diff = np.flatnonzero(_bits(a).reshape(-1) != _bits(b).reshape(-1))
    first = diff[:5]
    assert diff.size == 0, f"{diff.size} differ, first at {first}: {a.reshape(-1)[first]} vs {b.reshape(-1)[first]}"


# -- the generator ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("counter, key, expected", THREEFRY2X32_20_KAT)
def test_threefry_known_answers_in_every_backend(counter, key, expected):
    assert tuple(int(v) for v in S.threefry2x32(key[0], key[1], counter[0], counter[1])) == expected
    assert tuple(int(v) for v in N.threefry2x32(key[0], key[1], counter[0], counter[1])) == expected
    assert tuple(int(v) for v in J.threefry2x32(key[0], key[1], counter[0], counter[1])) == expected


def test_threefry_equals_jax_own_threefry_on_random_inputs():
    """Cross-check against an independent implementation: JAX's threefry2x32 primitive (its PRNG's hash)."""
    from jax.extend.random import threefry2x32_p
    words = np.random.default_rng(0).integers(0, 2**32, (4, 4096), dtype=np.uint64).astype(np.uint32)
    ours = S.threefry2x32(*words)
    theirs = threefry2x32_p.bind(*(jnp.asarray(w) for w in words))
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(a, np.asarray(b))
    jax_ours = jax.jit(J.threefry2x32)(*words)
    for a, b in zip(ours, jax_ours):
        np.testing.assert_array_equal(a, np.asarray(b))
    for i in range(0, 4096, 97):
        assert N.threefry2x32(*(int(w[i]) for w in words)) == (int(ours[0][i]), int(ours[1][i]))


def test_key_packing():
    """key = (seed, tensor), counter = (index, step), first output word."""
    index = np.arange(5, 9, dtype=np.uint32)
    expected = S.threefry2x32(np.uint32(123), np.uint32(7), index, np.uint32(42))[0]
    np.testing.assert_array_equal(S.random_bits(123, 42, 7, index), expected)
    assert [N.random_bits(123, 42, 7, int(i)) for i in index] == [int(v) for v in expected]
    np.testing.assert_array_equal(np.asarray(J.random_bits(123, 42, 7, index)), expected)
    # every field matters
    base = S.random_bits(1, 2, 3, index)
    for other in (S.random_bits(9, 2, 3, index), S.random_bits(1, 9, 3, index), S.random_bits(1, 2, 9, index)):
        assert not np.array_equal(base, other)
    with pytest.raises(ValueError):
        S.round_stochastic(np.ones(2), "bf16", 2**32, 0, 0)
    with pytest.raises(ValueError):
        S.round_stochastic(np.ones(2), "bf16", 0, 0, 0, start_index=2**32 - 1)


# -- the rounding ----------------------------------------------------------------------------------------------

def _special_values(dtype) -> np.ndarray:
    values = [0.0, -0.0, 1.0, -1.0, 1.5, 3.3, -3.3, np.inf, -np.inf, np.nan, 1e300, -1e300, 1e-300, 5e-324, 1e-40,
              1e-45, 3e38, 65504.0, 65519.0, 65520.0, 65535.0, 448.0, 460.0, 464.0, 480.0, 57344.0, 61439.0,
              61440.0, 1e-7, 6e-8, 5.96e-8, 2.98e-8, 1.5e-5, 6.1e-5, 2 ** -9, 2 ** -10, 1e-38, 1.1754942e-38,
              9.2e-41, 2 ** -133, 2 ** -134, 3 * 2 ** -135]
    for fmt in [*FORMATS.values(), *map(get_format, EMULATED)]:
        for v in (fmt.max, fmt.tiny, fmt.smallest_subnormal):
            values += [v, -v, v * (1 + 2 ** -20), v * (1 - 2 ** -20), v * 1.5, v / 2, v * 0.75]
            # ties of round-to-nearest: the midpoint between v and its successor
            values.append(v + float(ulp(v, fmt)) / 2)
    with np.errstate(over="ignore"):
        return np.array(values, dtype=np.float64).astype(dtype)


def _random_inputs(dtype, n=20_000, seed=0) -> np.ndarray:
    """Random bit patterns (every exponent, NaNs, subnormals of the carrier), scaled normals covering every format's
    range and below, values on the formats' grids (exact) and their midpoints (ties), plus the special values."""
    rng = np.random.default_rng(seed)
    width = np.dtype(dtype).itemsize * 8
    patterns = rng.integers(0, 2**width, n, dtype=np.uint64).astype(f"u{width // 8}").view(dtype)
    scaled = (rng.standard_normal(n) * np.exp2(rng.integers(-170, 20, n))).astype(dtype)
    grid = [round_to(rng.standard_normal(n // 10) * np.exp2(rng.integers(-30, 16, n // 10)), f) for f in NARROW]
    ties = [g + ulp(g, f) / 2 for g, f in zip(grid, NARROW)]
    with np.errstate(over="ignore"):
        return np.concatenate([patterns, scaled, *(g.astype(dtype) for g in grid + ties), _special_values(dtype)])


def _float_model(x: np.ndarray, fmt, seed, step, tensor, start_index=0) -> np.ndarray:
    """An independent model in float64 arithmetic: |x| = t * q with q the format's spacing at |x| (formats.ulp),
    D = floor(frac(t) * 2^32), away from zero iff D + R >= 2^32; above max -> overflow value; NaN -> NaN."""
    fmt = get_format(fmt)
    with np.errstate(invalid="ignore"):  # signalling NaN patterns
        x64 = x.astype(np.float64).reshape(-1)
    r = S.random_bits(seed, step, tensor, np.arange(start_index, start_index + x64.size)).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        ax = np.abs(x64)
        q = ulp(ax, fmt)
        t = ax / q  # exact: q is a power of two and t has at most 53 bits
        low = np.floor(t)
        d = np.floor(np.ldexp(t - low, 32))
        up = d + r >= 2.0**32
        out = np.copysign((low + up) * q, x64)
        out = np.where(np.abs(out) > fmt.max, np.copysign(np.inf, x64) if fmt.has_inf else np.nan, out)
        out = np.where(np.isinf(x64), np.copysign(np.inf, x64) if fmt.has_inf else np.nan, out)
        out = np.where(np.isnan(x64), np.nan, out)
    return out


@pytest.mark.parametrize("fmt", NARROW + EMULATED)
@pytest.mark.parametrize("carrier", CARRIERS, ids=["f64", "f32"])
def test_numpy_rounding_equals_the_float_model(fmt, carrier):
    if not _fits(fmt, carrier):
        with pytest.raises(ValueError, match="carrier"):
            S.round_stochastic(np.ones(3, carrier), fmt, 0, 0, 0)
        return
    x = _random_inputs(carrier)
    if carrier == np.float32 and fmt == "fp32":
        assert_bitwise_equal(S.round_stochastic(x, fmt, 5, 6, 7), x)
        return
    out = S.round_stochastic(x, fmt, 5, 6, 7)
    assert out.dtype == carrier
    model = _float_model(x, fmt, 5, 6, 7)
    nan = np.isnan(model)
    np.testing.assert_array_equal(np.isnan(out), nan)
    np.testing.assert_array_equal(out[~nan].astype(np.float64), model[~nan])
    np.testing.assert_array_equal(np.signbit(out[~nan]), np.signbit(model[~nan]))
    # results are values of the format, and neighbours of x: between the round-down and round-up of RNE
    finite = np.isfinite(out)
    np.testing.assert_array_equal(round_to(out[finite], fmt), out[finite].astype(np.float64))


@pytest.mark.parametrize("fmt", NARROW)
@pytest.mark.parametrize("carrier", CARRIERS, ids=["f64", "f32"])
def test_exact_values_unchanged_specials_kept(fmt, carrier):
    f = get_format(fmt)
    rng = np.random.default_rng(3)
    exact = round_to(rng.standard_normal(5000) * np.exp2(rng.integers(-40, 16, 5000)), f)
    exact = np.concatenate([exact, [0.0, -0.0, f.max, -f.max, f.tiny, f.smallest_subnormal, -f.smallest_subnormal]])
    exact = exact[np.isfinite(exact)].astype(carrier)
    for seed in range(3):
        assert_bitwise_equal(S.round_stochastic(exact, fmt, seed, 0, 0), exact)
    special = np.array([np.inf, -np.inf, np.nan], carrier)
    out = S.round_stochastic(special, fmt, 1, 1, 1)
    if f.has_inf:
        assert out[0] == np.inf and out[1] == -np.inf
    else:
        assert np.isnan(out[:2]).all()  # e4m3fn has no infinity: NaN, as round_to
    assert np.isnan(out[2])


def test_overflow_rule():
    """Between max and max + ulp: overflow with probability D / 2^32; at or beyond max + ulp: always."""
    for name in ("fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2"):
        f = get_format(name)
        top = float(ulp(f.max, f))
        x = np.full(20_000, f.max + top / 4)
        out = S.round_stochastic(x, f, 0, 0, 0)
        overflow = np.isinf(out) if f.has_inf else np.isnan(out)
        assert set(np.unique(out[~overflow])) == {f.max}
        assert 0.2 < overflow.mean() < 0.3
        beyond = S.round_stochastic(np.array([f.max + top, -(f.max + top), 1e300]), f, 0, 0, 0)
        assert (np.isinf(beyond) if f.has_inf else np.isnan(beyond)).all()


def _compare_backends(x, fmt, key=(11, 22, 33), start=5):
    reference = S.round_stochastic(x, fmt, *key, start_index=start)
    assert_bitwise_equal(N.round_stochastic(x, fmt, *key, start_index=start), reference)
    jitted = _jax_round
    if x.dtype == np.float64:
        with jax.enable_x64(True):
            got = np.asarray(jitted(jnp.asarray(x), fmt, *key, start))
    else:
        got = np.asarray(jitted(jnp.asarray(x), fmt, *key, start))  # float32 carrier: no x64 needed
    assert_bitwise_equal(got, reference)


@pytest.mark.parametrize("fmt", ("fp64",) + NARROW + EMULATED)
@pytest.mark.parametrize("carrier", CARRIERS, ids=["f64", "f32"])
def test_numba_and_jax_equal_numpy_bit_for_bit(fmt, carrier):
    """Random patterns (NaN payloads, carrier subnormals), subnormals of the format, ties, exact values, huge
    values; NaN results compared as bit patterns too (every backend writes the same quiet NaN with x's sign)."""
    if not _fits(fmt, carrier):
        pytest.skip(f"{fmt} needs a float64 carrier")
    _compare_backends(_random_inputs(carrier, seed=hash(fmt) % 1000), fmt)


def test_narrow_inputs_use_a_float32_carrier():
    import ml_dtypes
    x = np.random.default_rng(4).standard_normal(1000).astype(ml_dtypes.bfloat16)
    out = S.round_stochastic(x, "fp8_e4m3fn", 1, 2, 3)
    assert out.dtype == np.float32
    assert_bitwise_equal(out, S.round_stochastic(x.astype(np.float32), "fp8_e4m3fn", 1, 2, 3))
    assert_bitwise_equal(N.round_stochastic(x, "fp8_e4m3fn", 1, 2, 3), out)
    assert_bitwise_equal(np.asarray(_jax_round(jnp.asarray(x), "fp8_e4m3fn", 1, 2, 3)), out)


def test_chunks_equal_one_piece_in_every_backend():
    x = _random_inputs(np.float64, n=3000, seed=9).reshape(-1)[:9000].reshape(30, 300)
    whole = S.round_stochastic(x, "bf16", 1, 2, 3)
    flat = x.reshape(-1)
    for edges in ((0, 1, 4000, 9000), (0, 2999, 3000, 8999, 9000)):
        for backend in (S, N):
            parts = [backend.round_stochastic(flat[a:b], "bf16", 1, 2, 3, start_index=a)
                     for a, b in zip(edges, edges[1:])]
            assert_bitwise_equal(np.concatenate(parts).reshape(x.shape), whole)
        with jax.enable_x64(True):
            parts = [np.asarray(_jax_round(jnp.asarray(flat[a:b]), "bf16", 1, 2, 3, a))
                     for a, b in zip(edges, edges[1:])]
        assert_bitwise_equal(np.concatenate(parts).reshape(x.shape), whole)


def test_jax_takes_traced_step_and_key():
    """Inside a scan, the step is a traced counter: the result equals the eager numpy one at each step."""
    x = np.random.default_rng(5).standard_normal(257).astype(np.float32)

    def body(carry, step):
        return carry, J.round_stochastic(carry, "bf16", jnp.uint32(9), step, jnp.uint32(4), jnp.uint32(100))
    _, outs = jax.lax.scan(body, jnp.asarray(x), jnp.arange(3, dtype=jnp.uint32))
    for step in range(3):
        assert_bitwise_equal(np.asarray(outs[step]), S.round_stochastic(x, "bf16", 9, step, 4, 100))


def test_numba_scalar_entry_points_match():
    x = _random_inputs(np.float64, n=500, seed=2)
    code = N.sr_code("fp16", np.float64)
    got = np.array([N.stochastic_round64(v, code, 3, 4, 5, i) for i, v in enumerate(x)])
    assert_bitwise_equal(got, S.round_stochastic(x, "fp16", 3, 4, 5))
    x32 = _random_inputs(np.float32, n=500, seed=2)
    code = N.sr_code("bf16", np.float32)
    got = np.array([N.stochastic_round32(v, code, 3, 4, 5, i) for i, v in enumerate(x32)], dtype=np.float32)
    assert_bitwise_equal(got, S.round_stochastic(x32, "bf16", 3, 4, 5))


_DIGEST_SCRIPT = """
import hashlib, numpy as np
from precision.stochastic import round_stochastic
x = np.random.default_rng(123).standard_normal(50_000) * np.exp2(np.arange(50_000) % 300 - 200)
h = hashlib.sha256()
for fmt in ("fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2"):
    h.update(round_stochastic(x, fmt, 2024, 17, 3).tobytes())
    h.update(round_stochastic(x.astype(np.float32), fmt, 2024, 17, 3).tobytes())
print(h.hexdigest())
"""


def test_same_bits_in_another_process():
    here = {}
    exec(compile(_DIGEST_SCRIPT.replace("print(h.hexdigest())", "digest = h.hexdigest()"), "digest", "exec"), here)
    other = subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT], cwd=REPO, capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": "12345", "PATH": ""}).stdout.strip()
    assert other == here["digest"]


def test_random_bits_are_pinned():
    """The first words of a fixed key, pinned so a change of the generator or of the packing cannot pass silently
    (the generator itself is pinned by the known answers above)."""
    got = [int(v) for v in S.random_bits(0, 0, 0, np.arange(4))]
    expected = [int(S.threefry2x32(0, 0, i, 0)[0]) for i in range(4)]
    assert got == expected
    assert got[0] == 0x6B200159  # the first KAT vector: all-zero key and counter


# -- unbiasedness ----------------------------------------------------------------------------------------------

# Bernstein's inequality for a Binomial(N, p) count K: P(|K - Np| >= t) <= 2 exp(-t^2 / (2 (Np(1-p) + t/3))).
# With L = ln(2 / delta) the bound t = L/3 + sqrt((L/3)^2 + 2 N p (1-p) L) has probability <= delta of being
# exceeded; delta = 1e-9 per check, so the fewer than 200 checks of this file fail falsely with probability
# < 2e-7 < 1e-6 (if the random bits were ideal; they are fixed, so the test is deterministic). For large
# N p (1-p) this is about 6.5 standard deviations (the normal z for 1e-9 two-sided is 6.1).
DELTA = 1e-9


def binomial_bound(n: int, p: float, delta: float = DELTA) -> float:
    big_l = math.log(2 / delta)
    return big_l / 3 + math.sqrt((big_l / 3) ** 2 + 2 * n * p * (1 - p) * big_l)


UNBIASED_CASES = [  # (format, x): p covers 0, tiny, 1/4, 1/2 (an RNE tie), 1/3-ish, close to 1, subnormals, fp8
    ("bf16", 1.0), ("bf16", 1 + 2**-9), ("bf16", -(1 + 2**-9)), ("bf16", 1 + 2**-8), ("bf16", math.pi),
    ("bf16", 1 + 2**-7 - 2**-30), ("bf16", 2**-130 * 1.3), ("bf16", 1 + 2**-35), ("fp16", 0.1), ("fp16", 3e-6),
    ("fp16", 65519.0), ("fp8_e4m3fn", 0.3), ("fp8_e4m3fn", -1e-3), ("fp8_e5m2", 1000.0), ("fp8_e5m2", 1e-5),
    ("fp32", 0.1), ("fp32", 1 + 2**-24 + 2**-40),
] + [(name, x) for name in EMULATED for x in (0.3, 1.7e-3)] + [  # below tiny without subnormals: 0 or tiny
    (name, 0.37 * get_format(name).tiny) for name in EMULATED if not get_format(name).has_subnormals]


# Only the (case, carrier) pairs where rounding happens: fp32 in a float32 carrier is the identity, and a format
# whose values a float32 carrier cannot hold needs float64 (those pairs are not generated, rather than skipped).
UNBIASED_GRID = [(fmt, x, carrier) for fmt, x in UNBIASED_CASES for carrier in CARRIERS
                 if _fits(fmt, carrier) and not S.sr_params(fmt, carrier).identity]


@pytest.mark.parametrize("fmt, x, carrier", UNBIASED_GRID)
def test_up_count_is_binomial_with_the_realised_probability(fmt, x, carrier):
    f = get_format(fmt)
    xc = np.asarray(x, dtype=carrier)
    p_real = float(S.realised_probability(xc.reshape(1), f)[0])
    p_ideal = S.exact_probability(float(xc), f)
    # the realised probability: exactly p when the discarded bits are at most 32, else p floor-quantised to 2^-32
    assert p_real == math.floor(p_ideal * 2**32) / 2**32
    assert 0 <= p_ideal - p_real < 2**-32
    n = 200_000
    for seed, step, tensor in ((1, 0, 0), (2, 1000, 5)):
        out = S.round_stochastic(np.full(n, xc), f, seed, step, tensor)
        away = np.abs(out.astype(np.float64)) > abs(float(xc))
        count = int(away.sum())
        if p_real == 0:
            assert count == 0
            continue
        assert abs(count - n * p_real) <= binomial_bound(n, p_real), (count, n * p_real)
        # only the two neighbours occur
        assert len(np.unique(out)) <= 2


@pytest.mark.parametrize("fmt", NARROW + EMULATED)
def test_mean_of_stochastic_rounding_is_closer_than_nearest(fmt):
    f = get_format(fmt)
    rng = np.random.default_rng(17)
    n = 100_000
    for _ in range(4):
        # a value with fraction between 0.05 and 0.95 of the spacing, in the normal range
        lo = float(round_to(rng.uniform(0.5, 2.0) * 2.0 ** rng.integers(-3, 4), f))
        q = float(ulp(lo, f))
        x = lo + q * rng.uniform(0.05, 0.95)
        nearest = float(round_to(x, f))
        mean = S.round_stochastic(np.full(n, x), f, int(rng.integers(0, 2**32)), 0, 0).mean()
        # |mean - x| <= bound on the count deviation, times q / n
        p = float(S.realised_probability(np.array([x]), f)[0])
        assert abs(mean - x) <= q * (binomial_bound(n, p) / n + 2**-32)
        assert abs(mean - x) < abs(nearest - x), (fmt, x, mean, nearest)
