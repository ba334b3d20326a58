"""Stochastic rounding (SR) to any format of :mod:`precision.formats`, with counter-based random bits: the numpy
reference. The numba (``backends/numba_backend/stochastic.py``) and JAX (``backends/jax_backend/stochastic.py``)
versions compute the same bits from the same integer recipe; tests/test_stochastic_rounding.py checks them bit for
bit against this module. Design, proofs and references: docs/stochastic_rounding.md.

Random bits: Threefry-2x32 with 20 rounds (Salmon et al. 2011, the generator behind JAX's PRNG), a keyed bijection
of a 64-bit counter, computed with wrapping uint32 additions, rotations and xors only. Key and counter packing,
four 32-bit fields, so distinct (seed, step, tensor, index) give distinct generator inputs::

    key     = (k0, k1) = (seed, tensor)
    counter = (c0, c1) = (index, step)
    R       = threefry2x32_20(key, counter)[0]          # the first output word: 32 random bits

``index`` is ``start_index + i`` for element ``i`` of the tensor in C (row-major) order, so a tensor rounded in
chunks gets the same bits as in one piece.

Rounding: ``|x| = (L + f) * 2^qe`` with ``qe`` the exponent of the format's spacing at ``|x|`` (as in
:func:`precision.formats.round_to`: subnormals share emin's spacing), ``L`` an integer and ``0 <= f < 1``. ``D`` is
the top 32 discarded significand bits, ``D = floor(f * 2^32)``. The result is ``L + 1`` (away from zero) when
``D + R >= 2^32`` (the carry out of adding the random bits to the discarded bits, as hardware SR and torchao do),
else ``L`` (toward zero), times ``2^qe`` with the sign of ``x``. So ``P(away) = D / 2^32``: exactly ``f`` when the
discarded part has at most 32 bits (fp32 from float64: 29 bits; every narrower format from a float32 carrier in its
normal range: at most 20 bits), otherwise ``f`` floor-quantised to ``2^-32`` (short by less than ``2^-32``). Exact
values have ``D = 0`` and never move.

Overflow: the grid is extended above the format's max with the top binade's spacing and the result, when above
max, becomes the format's overflow value (±inf, or NaN for finite-only fp8 e4m3fn) as in ``round_to``: a value
between max and max + ulp overflows with probability ``D / 2^32``, one at or beyond max + ulp always. Infinities
stay infinite (NaN for e4m3fn, as ``round_to``); NaN stays NaN (a quiet NaN).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from .formats import Format, get_format

__all__ = ["THREEFRY_ROTATIONS", "THREEFRY_PARITY", "RANDOM_BITS", "threefry2x32", "threefry_rounds", "random_bits",
           "element_indices", "SRParams", "sr_params", "carrier_dtype", "round_stochastic", "decompose", "check_key",
           "realised_probability", "exact_probability"]

# Threefry-2x32 (Salmon et al. 2011, Table 4 / Random123's threefry.h): rotation constants R_32x2 and the key
# schedule parity constant C240 (SKEIN_KS_PARITY32).
THREEFRY_ROTATIONS = (13, 15, 26, 6, 17, 29, 16, 24)
THREEFRY_PARITY = 0x1BD11BDA
THREEFRY_ROUNDS = 20
RANDOM_BITS = 32  # random bits per element: the first output word
_M32 = 0xFFFFFFFF
_BLOCK = 1 << 16


def threefry2x32(k0, k1, c0, c1, rounds: int = THREEFRY_ROUNDS):
    """Threefry-2x32-``rounds`` of counter ``(c0, c1)`` under key ``(k0, k1)``, elementwise over broadcast uint32
    arrays; returns the two output words (uint32 arrays). Random123's ``threefry2x32_R`` exactly: key injection
    before round 0 and after every 4th round, with the injection number added to the second word."""
    k0, k1, c0, c1 = (np.asarray(v, dtype=np.uint32) for v in (k0, k1, c0, c1))
    with np.errstate(over="ignore"):  # uint32 additions wrap by design (numpy only warns for scalars)
        return threefry_rounds(np, k0, k1, c0, c1, rounds)


def threefry_rounds(xp, k0, k1, c0, c1, rounds: int = THREEFRY_ROUNDS):
    """The rounds of :func:`threefry2x32` on uint32 arrays of the array namespace ``xp`` (numpy or jax.numpy):
    written once, so the numpy reference and the JAX version are the same code."""
    ks = (k0, k1, k0 ^ k1 ^ xp.uint32(THREEFRY_PARITY))
    x0 = c0 + ks[0]
    x1 = c1 + ks[1]
    for i in range(rounds):
        r = THREEFRY_ROTATIONS[i % 8]
        x0 = x0 + x1
        x1 = (x1 << xp.uint32(r)) | (x1 >> xp.uint32(32 - r))
        x1 = x1 ^ x0
        if i % 4 == 3:
            j = i // 4 + 1
            x0 = x0 + ks[j % 3]
            x1 = x1 + ks[(j + 1) % 3] + xp.uint32(j)
    return x0, x1


def check_key(seed: int, step: int, tensor: int) -> None:
    """Seed, step and tensor id are each one 32-bit field of the generator input (no hashing, no collisions)."""
    for name, value in (("seed", seed), ("step", step), ("tensor", tensor)):
        if not 0 <= int(value) <= _M32:
            raise ValueError(f"{name} must be in [0, 2^32), got {value}")


def element_indices(size: int, start_index: int = 0) -> np.ndarray:
    """The counters' index words of a tensor of ``size`` elements starting at ``start_index`` (uint32)."""
    start_index = int(start_index)
    if start_index < 0 or start_index + size - 1 > _M32:
        raise ValueError(f"element indices {start_index}..{start_index + size - 1} do not fit in 32 bits")
    return np.arange(start_index, start_index + size, dtype=np.uint64).astype(np.uint32)


def random_bits(seed: int, step: int, tensor: int, index) -> np.ndarray:
    """The 32 random bits of element ``index`` (an array of uint32): ``threefry2x32_20(key=(seed, tensor),
    counter=(index, step))[0]``."""
    check_key(seed, step, tensor)
    index = np.asarray(index)
    if index.size and (index.min() < 0 or index.max() > _M32):
        raise ValueError("element indices must be in [0, 2^32)")
    return threefry2x32(np.uint32(seed), np.uint32(tensor), index.astype(np.uint32), np.uint32(step))[0]


class SRParams(NamedTuple):
    """The integers of the rounding recipe for one (format, carrier): all derived from the two formats' widths.

    ``identity``: every carrier value is a value of the format (fp32 in float32, fp64 anywhere)."""

    identity: bool
    width: int  # carrier bits W (32 or 64)
    carrier_mantissa: int  # M_c (23 or 52)
    carrier_bias: int  # 127 or 1023
    mantissa: int  # m: the format's stored fraction bits
    emin: int  # exponent of the format's smallest normal number
    subnormals: bool  # False: below tiny the neighbours are 0 and tiny (spacing 2^emin)
    max_bits: int  # carrier pattern of the format's largest finite number
    overflow_bits: int  # pattern of the overflow value: inf, or a quiet NaN for finite-only formats
    inf_bits: int  # carrier's +inf pattern (a larger magnitude pattern is a NaN)
    qnan_bits: int  # carrier's quiet NaN pattern


def carrier_dtype(dtype) -> np.dtype:
    """float64 stays float64; float32 and every narrower float (float16, bfloat16, fp8: widened exactly) use
    float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def sr_params(fmt: Format | str, carrier=np.float64) -> SRParams:
    """Raises ValueError when neither holds the other: the carrier must hold every value of the format (e.g. a
    custom format with more than float32's range or precision needs float64 values), or the format every value of
    the carrier (then rounding is the identity)."""
    fmt = get_format(fmt)
    carrier = np.dtype(carrier)
    info = np.finfo(carrier)
    width = carrier.itemsize * 8
    mant_c = info.nmant
    bias_c = info.maxexp - 1
    uint = np.dtype(f"u{carrier.itemsize}")
    inf_bits = int(np.array(np.inf, carrier).view(uint))
    qnan_bits = inf_bits | (1 << (mant_c - 1))
    carrier_emin = 1 - bias_c
    carrier_smallest = math.ldexp(1.0, carrier_emin - mant_c)
    fits = (fmt.precision <= mant_c + 1 and fmt.max <= float(info.max) and fmt.min_exponent >= carrier_emin
            and fmt.smallest_subnormal >= carrier_smallest)
    contains = (fmt.precision >= mant_c + 1 and fmt.max >= float(info.max) and fmt.min_exponent <= carrier_emin
                and fmt.has_subnormals and fmt.smallest_subnormal <= carrier_smallest)
    if not (fits or contains):
        raise ValueError(f"{fmt.name} does not fit a {carrier.name} carrier: round float64 values to it")
    identity = contains
    max_bits = int(np.array(info.max if identity else fmt.max, carrier).view(uint))
    overflow = inf_bits if (fmt.has_inf or identity) else qnan_bits
    return SRParams(identity, width, mant_c, bias_c, fmt.mantissa_bits, fmt.min_exponent, fmt.has_subnormals,
                    max_bits, overflow, inf_bits, qnan_bits)


def decompose(x, fmt: Format | str):
    """The pieces of the rounding of carrier values ``x`` (float64 or float32 array): ``(sign, toward, away, D)``
    as carrier bit patterns (uint) and uint32: ``toward``/``away`` are the magnitudes' patterns of the neighbours
    toward and away from zero (before the overflow rule; equal to ``|x|`` and one spacing above for exact
    values), ``D`` the top 32 discarded bits, so P(away) = D / 2^32. Needs a non-identity ``fmt``."""
    x = np.asarray(x)
    p = sr_params(fmt, x.dtype)
    uint, sint = np.dtype(f"u{p.width // 8}"), np.int64
    u = x.view(uint)
    sign_bit = uint.type(1 << (p.width - 1))
    sign = u & sign_bit
    a = u ^ sign
    biased = (a >> uint.type(p.carrier_mantissa)).astype(sint)
    mant_mask = uint.type((1 << p.carrier_mantissa) - 1)
    sig = (a & mant_mask) | ((biased != 0).astype(uint) << uint.type(p.carrier_mantissa))
    biased1 = np.maximum(biased, 1)  # carrier subnormals: exponent of the smallest normal, no implicit bit
    exponent = biased1 - p.carrier_bias
    qe = np.maximum(exponent, p.emin) - p.mantissa  # exponent of the format's spacing at |x|
    if not p.subnormals:
        qe = np.where(exponent < p.emin, p.emin, qe)  # below tiny: neighbours 0 and tiny
    shift = qe - (exponent - p.carrier_mantissa)  # s: discarded significand bits, >= M_c - m >= 1
    sc = np.minimum(shift, p.width - 1).astype(uint)
    kept = sig >> sc  # 0 when s >= W: sig < 2^(M_c + 1) <= 2^(W - 1)
    discarded = sig - (kept << sc)
    right = np.clip(shift - RANDOM_BITS, 0, p.width - 1).astype(uint)
    left = np.clip(RANDOM_BITS - shift, 0, RANDOM_BITS).astype(uint)
    top = np.where(shift >= RANDOM_BITS, discarded >> right, discarded << left)
    d = (top & uint.type(_M32)).astype(np.uint32)
    small = shift <= p.carrier_mantissa  # the truncation is a pattern truncation (carries into the exponent work)
    toward = np.where(small, a - discarded, uint.type(0))
    spacing = np.where(small, uint.type(1) << np.minimum(sc, p.carrier_mantissa).astype(uint),
                       (np.clip(qe + p.carrier_bias, 0, None).astype(uint) << uint.type(p.carrier_mantissa)))
    away = toward + spacing  # for s > M_c the neighbour toward zero is 0 and 2^qe is a carrier normal number
    return sign, toward, away, d


def _finish(sign, toward, away, d, r, a_is_nan, p: SRParams, uint):
    up = (r + d) < d  # the carry out of D + R in 32 bits: D + R >= 2^32
    out = np.where(up, away, toward)
    out = np.where(out > uint.type(p.max_bits), uint.type(p.overflow_bits), out)
    out = np.where(a_is_nan, uint.type(p.qnan_bits), out)
    return out | sign


def round_stochastic(x, fmt: Format | str, seed: int, step: int, tensor: int, start_index: int = 0) -> np.ndarray:
    """``x`` rounded stochastically to ``fmt`` (values of ``fmt`` in ``x``'s carrier: float64 for float64 input,
    float32 for float32 and narrower input), element ``i`` (C order) using the random bits of index
    ``start_index + i`` under key ``(seed, tensor)`` and step ``step``. See the module docstring."""
    fmt = get_format(fmt)
    with np.errstate(invalid="ignore"):
        x = np.asarray(x)
        x = np.ascontiguousarray(x, dtype=carrier_dtype(x.dtype))
    check_key(seed, step, tensor)
    index = element_indices(x.size, start_index)
    p = sr_params(fmt, x.dtype)
    if p.identity:
        return x.copy()
    uint = np.dtype(f"u{p.width // 8}")
    flat = x.reshape(-1)
    out = np.empty_like(flat.view(uint))
    for start in range(0, flat.size, _BLOCK):  # blocks that stay in cache: about 3x faster than whole arrays
        block = flat[start:start + _BLOCK]
        sign, toward, away, d = decompose(block, fmt)
        r = random_bits(seed, step, tensor, index[start:start + _BLOCK])
        a_is_nan = (block.view(uint) & uint.type((1 << (p.width - 1)) - 1)) > uint.type(p.inf_bits)
        out[start:start + _BLOCK] = _finish(sign, toward, away, d, r, a_is_nan, p, uint)
    return out.view(x.dtype).reshape(x.shape)


def realised_probability(x, fmt: Format | str) -> np.ndarray:
    """P(away from zero) that :func:`round_stochastic` realises for each value: ``D / 2^32`` (float64, exact)."""
    _, _, _, d = decompose(np.asarray(x), fmt)
    return np.ldexp(d.astype(np.float64), -RANDOM_BITS)


def exact_probability(x: float, fmt: Format | str) -> float:
    """The ideal SR probability (|x| - lo) / (hi - lo) of rounding away from zero, computed exactly (float64
    operations that are exact here: a power-of-two scaling and the fractional part)."""
    fmt = get_format(fmt)
    ax = abs(float(x))
    e = math.frexp(ax)[1] - 1 if ax else fmt.min_exponent
    qe = max(e, fmt.min_exponent) - fmt.mantissa_bits
    if e < fmt.min_exponent and not fmt.has_subnormals:
        qe = fmt.min_exponent
    t = math.ldexp(ax, -qe)
    return t - math.floor(t)
