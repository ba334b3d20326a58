"""Transcendentals of the compute format, inside compiled code.

The training loops hold every value in a float64 carrier (an fp16 / bf16 / fp8 / fp32 value is exactly a float64)
and round after each operation with :func:`.rounding.rnd`. For + - * / sqrt that float64 result, rounded to the
format, is the exactly rounded result, since 53 >= 2p + 2 for p <= 24 (so fp32 is emulated exactly too).

Transcendentals follow the numpy backend's rule (``numpy_backend/ops.py``) with numba's own exp:

- fp64 uses :func:`exp64`, a float64 exp; fp32 uses :func:`exp32`, the same recipe in float32 arithmetic; both are
  written here in plain IEEE arithmetic (no C-library call, no FMA), so that the loops around them vectorize and
  their results depend on nothing but IEEE arithmetic: exp64 is within 1 ulp of float64, exp32 within 1 ulp of
  float32 (tests/test_numba_backend.py). numpy's float32 exp is its own SIMD loop: the two differ by a few ulp,
  which the tests measure and pin;
- tanh is :func:`tanh64`, numba's own float64 tanh (within 2 ulp), for every format: rounded once to fp32 for fp32
  (numpy's float32 tanh is its own SIMD loop, a few ulp apart). The C library's tanh / tanhf, which ``np.tanh``
  lowers to, is called per element and kept the MLP's loops scalar: 31 ns per float32 element against 3.4;
- narrower formats compute in float64 (exp64) and round once, so both backends agree up to the 1-ulp float64
  differences between the two float64 functions, which a rounding to 8 or 11 bits almost never sees.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba.extending import overload

from .rounding import JIT, TRANSCENDENTAL_FLOAT32, TRANSCENDENTAL_ROUNDED, TRANSCENDENTALS, round64

__all__ = ["exp64", "exp32", "exp64_array", "exp32_array", "tanh64", "tanh64_array", "exp_c", "tanh_c",
           "tanh_inplace", "exp_inplace", "sigmoid_inplace"]

# exp64's constants. ln 2 split Cody-Waite style (fdlibm's): _LN2_HI has 32 trailing zero bits, so k * _LN2_HI is
# exact for every |k| <= 1076 and x - k * _LN2_HI is exact (Sterbenz); _LN2_LO carries the next 53 bits.
_INV_LN2 = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_SHIFTER = 6755399441055744.0  # 1.5 * 2^52: t + _SHIFTER rounds t to an integer held in the low mantissa bits
_SHIFTER_BITS = 0x4338000000000000
# Taylor coefficients 1/2! .. 1/13! of exp(r) = 1 + r + r^2 q(r): on |r| <= ln(2)/2 the first omitted term,
# r^14 / 14!, is below 5e-18 relative, far under float64's 2^-53 = 1.1e-16.
_Q = tuple(1.0 / math.factorial(k) for k in range(2, 14))
_Q2, _Q3, _Q4, _Q5, _Q6, _Q7, _Q8, _Q9, _Q10, _Q11, _Q12, _Q13 = _Q


@numba.njit(inline="always", **JIT)
def _reduce(x):
    """(k, expm1(r)) for x = k ln 2 + r, |r| <= ln(2)/2: k = round(x / ln 2) by the shifter, r by Cody-Waite's
    two-part ln 2 (exact first part), expm1(r) = r + r^2 q(r) by the Taylor polynomial in Estrin's scheme (short
    dependency chains). The shared core of :func:`exp64` and :func:`tanh64`."""
    t = x * _INV_LN2 + _SHIFTER
    k = np.float64(t).view(np.int64) - np.int64(_SHIFTER_BITS)
    kd = t - _SHIFTER
    r = (x - kd * _LN2_HI) - kd * _LN2_LO
    r2 = r * r
    r4 = r2 * r2
    b0 = (_Q2 + _Q3 * r) + (_Q4 + _Q5 * r) * r2
    b1 = (_Q6 + _Q7 * r) + (_Q8 + _Q9 * r) * r2
    b2 = (_Q10 + _Q11 * r) + (_Q12 + _Q13 * r) * r2
    return k, r + r2 * (b0 + r4 * (b1 + r4 * b2))


@numba.njit(inline="always", **JIT)
def exp64(x):
    """exp(x) in float64, within 1 ulp (tests/test_numba_backend.py), from + - * only, branch-free.

    k = round(x / ln 2), r = x - k ln 2 (|r| <= ln(2)/2), exp(r) by its Taylor polynomial in Estrin's scheme
    (short dependency chains), then times 2^k as two exact powers of two, so that subnormal results round once,
    in the last multiplication, and large ones overflow to inf. NaN passes through."""
    xc = min(max(x, -746.0), 710.0)  # exp(-746) rounds to 0 and exp(710) to inf: keeps 2^k representable
    k, pm1 = _reduce(xc)
    p = 1.0 + pm1
    half = k >> 1
    y = p * np.int64((half + 1023) << 52).view(np.float64) * np.int64((k - half + 1023) << 52).view(np.float64)
    return x if x != x else y


# exp32's constants: the same recipe in float32. _LN2_HI_32 = 0x3F318000 has 9 significant bits, so k * _LN2_HI_32
# is exact for |k| < 2^15; Taylor to degree 7: r^8 / 8! < 5.3e-9 relative on |r| <= ln(2)/2, under float32's
# 2^-24 = 6e-8.
_INV_LN2_32 = np.float32(1.44269502)
_LN2_HI_32 = np.float32(0.693359375)
_LN2_LO_32 = np.float32(-2.12194440e-4)
_SHIFTER_32 = np.float32(12582912.0)  # 1.5 * 2^23
_SHIFTER_32_BITS = 0x4B400000
_P2, _P3, _P4, _P5, _P6, _P7 = (np.float32(1.0 / math.factorial(k)) for k in range(2, 8))


@numba.njit(inline="always", **JIT)
def exp32(x):
    """exp(x) of a float32 in float32 arithmetic, within 1 ulp: :func:`exp64`'s recipe with float32 constants and
    a degree-7 polynomial. Twice the SIMD lanes of float64 and half the terms: the fp32 sigmoid's cost."""
    xc = min(max(np.float32(x), np.float32(-104.0)), np.float32(89.0))  # exp(-104) -> +0, exp(89) -> inf
    t = xc * _INV_LN2_32 + _SHIFTER_32
    k = np.float32(t).view(np.int32) - np.int32(_SHIFTER_32_BITS)
    kd = t - _SHIFTER_32
    r = (xc - kd * _LN2_HI_32) - kd * _LN2_LO_32
    r2 = r * r
    q = (_P2 + _P3 * r) + (_P4 + _P5 * r) * r2 + (_P6 + _P7 * r) * (r2 * r2)
    p = np.float32(1.0) + (r + r2 * q)
    half = k >> 1
    y = p * np.int32((half + 127) << 23).view(np.float32) * np.int32((k - half + 127) << 23).view(np.float32)
    return x if x != x else y


_HALF_LOG3 = 0.5493061443340549  # log(3) / 2: tanh = 1/2 there


@numba.njit(inline="always", **JIT)
def tanh64(x):
    """tanh(x) in float64 from + - * / only (no C-library call, so loops around it vectorize), within 4 ulp by
    analysis, 2 measured (tests/test_numba_backend.py).

    tanh|x| = e / (e + 2) with e = expm1(2|x|), and expm1 by :func:`exp64`'s reduction without its ``1 +``:
    y = 2|x| = k ln 2 + r, e = (2^k - 1) + 2^k p with p = expm1(r) = r + r^2 q(r). Keeping the ``- 1`` out of the
    rounded ``1 + p`` is what makes small arguments accurate: for k = 0, e = p has no cancellation at all, and
    for k >= 1 the error of p is scaled by 2^k / e <= 2. |x| is clamped to 20, where tanh rounds to 1 in float64
    (1 - tanh 20 = 8.5e-18 < 2^-54), so e stays finite; tiny and subnormal x give 2x / 2 = x exactly. The sign is
    copied back (tanh(-0) = -0); NaN passes through."""
    a = min(abs(x), 20.0)
    k, p = _reduce(a + a)
    scale = np.int64((k + 1023) << 52).view(np.float64)  # 2^k, k <= 58
    e = (scale - 1.0) + scale * p
    d = e + 2.0
    # Above log(3)/2 (tanh > 1/2) 1 - 2/(e + 2): the rounding of e + 2 no longer limits the result once e is large
    # (e / (e + 2) would step in ulps of e); below it e / (e + 2), which has no cancellation (musl's split).
    th = math.copysign(1.0 - 2.0 / d if a > _HALF_LOG3 else e / d, x)
    return x if x != x else th


@numba.njit(**JIT)
def tanh64_array(x, out):
    """out[i] = tanh64(x[i]) for float64 arrays (tests; the numpy model of the numba backend)."""
    for i in range(x.size):
        out[i] = tanh64(x[i])


@numba.njit(**JIT)
def exp64_array(x, out):
    """out[i] = exp64(x[i]) for float64 arrays (tests; the numpy model of the numba backend)."""
    for i in range(x.size):
        out[i] = exp64(x[i])


@numba.njit(**JIT)
def exp32_array(x, out):
    """out[i] = exp32(x[i]) for float32 arrays."""
    for i in range(x.size):
        out[i] = exp32(x[i])

# IR-level inlining: tiny bodies called from loops (a separate function each would cost a compile of its own).
_INLINE = dict(inline="always", jit_options=JIT)


def exp_c(x, code):
    """exp of a float64-carried compute value, by the format's rule (see the module docstring)."""
    raise NotImplementedError("exp_c is only callable from numba-compiled code")


def tanh_c(x, code):
    raise NotImplementedError("tanh_c is only callable from numba-compiled code")


@overload(exp_c, **_INLINE)
def _exp_c(x, code):
    def impl(x, code):
        kind = code[TRANSCENDENTALS]
        if kind == TRANSCENDENTAL_FLOAT32:
            return np.float64(exp32(np.float32(x)))
        y = exp64(np.float64(x))
        return round64(y, code) if kind == TRANSCENDENTAL_ROUNDED else y
    return impl


@overload(tanh_c, **_INLINE)
def _tanh_c(x, code):
    def impl(x, code):
        kind = code[TRANSCENDENTALS]
        y = tanh64(np.float64(x))
        if kind == TRANSCENDENTAL_FLOAT32:
            return np.float64(np.float32(y))
        return round64(y, code) if kind == TRANSCENDENTAL_ROUNDED else y
    return impl


@numba.njit(**JIT)
def tanh_inplace(A, code):
    """A[i, j] = tanh_c(A[i, j]) over a 2-D float64 carrier array, the rule picked once outside the loops (as in
    :func:`sigmoid_inplace`), so that each loop is branch-free and vectorizes."""
    kind = code[TRANSCENDENTALS]
    if kind == TRANSCENDENTAL_FLOAT32:
        for i in range(A.shape[0]):
            for j in range(A.shape[1]):
                A[i, j] = np.float64(np.float32(tanh64(A[i, j])))
    elif kind == TRANSCENDENTAL_ROUNDED:
        for i in range(A.shape[0]):
            for j in range(A.shape[1]):
                A[i, j] = round64(tanh64(A[i, j]), code)
    else:
        for i in range(A.shape[0]):
            for j in range(A.shape[1]):
                A[i, j] = tanh64(A[i, j])


@numba.njit(**JIT)
def exp_inplace(x, code):
    """x[i] = exp_c(x[i]) over a 1-D float64 carrier array, the rule picked once outside the loops (as in
    :func:`tanh_inplace`), so that the loop is branch-free and vectorizes over the whole array (the softmax's
    logits: a row of K is too short a loop to vectorize)."""
    kind = code[TRANSCENDENTALS]
    if kind == TRANSCENDENTAL_FLOAT32:
        for i in range(x.size):
            x[i] = np.float64(exp32(np.float32(x[i])))
    elif kind == TRANSCENDENTAL_ROUNDED:
        for i in range(x.size):
            x[i] = round64(exp64(x[i]), code)
    else:
        for i in range(x.size):
            x[i] = exp64(x[i])


@numba.njit(**JIT)
def sigmoid_inplace(x, code):
    """x[i] = 1 / (1 + exp(-x[i])) over a float64 or float32 array (the carrier; float32 only for formats up to
    fp32), numpy's op order by the format's rule: every op in float32 for fp32, one float64 expression rounded
    once below fp32, float64 for fp64. The rule is picked once, outside the loops: each loop is then branch-free
    and vectorizes (a per-element branch on the rule would keep it scalar)."""
    kind = code[TRANSCENDENTALS]
    one = np.float32(1.0)
    if kind == TRANSCENDENTAL_FLOAT32:
        for i in range(x.size):
            x[i] = np.float64(one / (one + exp32(-np.float32(x[i]))))
    elif kind == TRANSCENDENTAL_ROUNDED:
        for i in range(x.size):
            x[i] = round64(1.0 / (1.0 + exp64(-x[i])), code)
    else:
        for i in range(x.size):
            x[i] = 1.0 / (1.0 + exp64(-x[i]))
