"""Scalar device functions of the GPU loops: IEEE arithmetic that NVVM cannot contract, the rounding to a format,
and the transcendentals, all on float64 carriers (as the numba CPU backend's loops).

Every function is written once, in plain Python, and compiled for the CUDA target by :func:`device`; under the
CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) the same Python runs as it is. The arithmetic is what is chosen per
target, once here at import:

* **No FMA contraction.** ``cuda.jit(fastmath=False)`` leaves NVVM's ``-fma`` option at its default, which is 1:
  NVVM contracts ``a * b + c`` into an FMA (numba-cuda's ``cudadrv/nvvm.py`` sets ``fma`` only *with* fastmath;
  NVIDIA's libNVVM documents ``-fma=1`` as the default; a plain ``a * b + c`` device function compiles to
  ``fma.rn.f64``). The float64 products and sums that feed results therefore go through libdevice's
  ``__nv_dmul_rn`` / ``__nv_dadd_rn``, and float32 ones through ``__nv_fmul_rn`` / ``__nv_fadd_rn`` /
  ``__nv_fsub_rn`` / ``__nv_fdiv_rn``, which are never contracted (float32 written as float64 arithmetic with
  conversions is not safe: LLVM narrows it back to float32 operations, which NVVM then contracted into
  ``fma.rn.f32``). In the simulator they are plain Python arithmetic (IEEE, never fused), the float32 operations
  emulated in float64 and converted: a product of fp32 values is exact in float64, and a float64 sum or quotient of
  two fp32 values converted to fp32 is the correctly rounded fp32 result (53 >= 2 * 24 + 2).
* exp and tanh are *not* libdevice's: :func:`exp64` / :func:`exp32` / :func:`tanh64` are the CPU backend's
  ``ops.exp64`` / ``ops.exp32`` / ``ops.tanh64`` (+ - * / only) op for op, so exp, the sigmoid and tanh give the
  same bits on both targets (libdevice's ``__nv_tanh`` would differ from the CPU's in the last ulp).

Fastmath stays off everywhere: it would also flush subnormals to zero (``-ftz=1``) and use approximate division and
square root. float64 ``/`` and ``math.sqrt`` are IEEE round-to-nearest on the GPU (div.rn.f64, sqrt.rn.f64).
"""

from __future__ import annotations

import math

import numpy as np
from numba import config, cuda

from ...formats import Format, get_format
from ..numba_backend.rounding import (TRANSCENDENTAL_FLOAT32, TRANSCENDENTAL_FLOAT64, TRANSCENDENTAL_ROUNDED,
                                      check_emulated)

__all__ = ["SIMULATOR", "device", "gpu_format", "round_value", "rnd", "mul", "add", "sub", "div", "sqrt", "to32",
           "mul32", "add32", "sub32", "div32", "exp64", "exp32", "tanh64", "exp_c", "tanh_c", "sigmoid_c", "is_finite",
           "random_bits", "sr_value", "sr_round"]

# Whether numba.cuda is the simulator (read by numba from NUMBA_ENABLE_CUDASIM when it is first imported).
SIMULATOR = bool(config.ENABLE_CUDASIM)


def device(fn):
    """``fn`` as a CUDA device function. Under the simulator ``fn`` itself: the simulator would run it as Python
    anyway, and its device-function wrapper swaps the module's globals on every call (most of a simulated run's
    time)."""
    if SIMULATOR:
        return fn
    return cuda.jit(device=True)(fn)


# -- formats as data ------------------------------------------------------------------------------------------------
# A format reaches the kernels as a tuple: (mantissa bits, emin, max, tiny, has inf, has subnormals, transcendental
# rule). One numba type for every format, so one compilation serves every policy.
_MANT, _EMIN, _MAX, _TINY, _HAS_INF, _SUBNORMALS, _KIND = range(7)


def gpu_format(fmt: Format | str) -> tuple:
    """The kernels' description of ``fmt`` (derived from its widths; the transcendental rule is the CPU backend's
    ``rounding._fields``: fp64 in float64, fp32 in float32, everything narrower or emulated in float64 rounded
    once)."""
    fmt = get_format(fmt)
    check_emulated(fmt)  # the float64 carrier is exact only up to p = 25: the CPU backend's SpecError, same words
    kind = (TRANSCENDENTAL_ROUNDED if fmt.emulated else TRANSCENDENTAL_FLOAT64 if fmt.precision > 24 else
            TRANSCENDENTAL_FLOAT32 if fmt.precision == 24 else TRANSCENDENTAL_ROUNDED)
    return (int(fmt.mantissa_bits), int(fmt.min_exponent), float(fmt.max), float(fmt.tiny), int(fmt.has_inf),
            int(fmt.has_subnormals), int(kind))


_TWO52 = 4503599627370496.0  # 2^52: for 0 <= r < 2^52, (r + 2^52) - 2^52 is r rounded to an integer, ties to even


def round_value(x, f):
    """float64 ``x`` rounded to nearest, ties to even, to the format ``f`` (:func:`gpu_format`), as float64: the
    scalar form of ``precision.formats.round_to`` (tests/test_numba_cuda.py proves them equal bit for bit).

    frexp gives x's exponent; the quantum is 2^q with q = max(exponent, emin) - mantissa bits (subnormals share
    emin's quantum); |x| / 2^q (a power-of-two scaling: exact) is below 2^(mantissa bits + 1) <= 2^52, so adding
    and subtracting 2^52 rounds it to an integer by float64's own round-to-nearest-even; times 2^q (exact) is the
    result. Then overflow to inf (NaN for finite-only formats), flush below tiny for a format without subnormals,
    and the sign of x (also for zero results). NaN stays NaN, +-0 and +-inf stay (inf: NaN for finite-only)."""
    if f[_MANT] >= 52 or x != x or x == 0.0:
        return x
    ax = abs(x)
    if ax > 2.0 * f[_MAX]:  # inf, or rounds above max anyway (and 2^1024 would overflow ldexp below)
        return math.copysign(math.inf, x) if f[_HAS_INF] else math.nan
    m, e = math.frexp(ax)
    q = max(e - 1, f[_EMIN]) - f[_MANT]
    r = math.ldexp(ax, -q)
    r = (r + _TWO52) - _TWO52
    out = math.ldexp(r, q)
    if out > f[_MAX]:
        out = math.inf if f[_HAS_INF] else math.nan
    elif f[_SUBNORMALS] == 0 and out < f[_TINY]:
        out = 0.0
    return math.copysign(out, x)


rnd = device(round_value)


# -- arithmetic that is never contracted ----------------------------------------------------------------------------
if SIMULATOR:
    def _mul(a, b):
        return a * b

    def _add(a, b):
        return a + b

    def _sub(a, b):
        return a - b
else:  # pragma: no cover - needs a GPU
    from numba.cuda import libdevice

    def _mul(a, b):
        return libdevice.dmul_rn(a, b)

    def _add(a, b):
        return libdevice.dadd_rn(a, b)

    def _sub(a, b):
        return libdevice.dadd_rn(a, -b)  # negation is exact; libdevice has no dsub_rn

if SIMULATOR:
    def _div(a, b):
        return np.float64(a) / np.float64(b)  # numpy semantics (x / 0 is inf or NaN), as IEEE and the GPU

    def _sqrt(a):
        return np.sqrt(np.float64(a))
else:  # pragma: no cover - needs a GPU
    def _div(a, b):
        return a / b  # div.rn.f64: IEEE, never contracted

    def _sqrt(a):
        return math.sqrt(a)  # sqrt.rn.f64

mul, add, sub, div, sqrt = device(_mul), device(_add), device(_sub), device(_div), device(_sqrt)


def _to32(x):
    return np.float64(np.float32(x))


to32 = device(_to32)


if SIMULATOR:
    def _mul32(a, b):
        return to32(to32(a) * to32(b))  # a product of fp32 values is exact in float64: one rounding, to fp32

    def _add32(a, b):
        return to32(to32(a) + to32(b))

    def _sub32(a, b):
        return to32(to32(a) - to32(b))

    def _div32(a, b):
        return to32(np.float64(to32(a)) / np.float64(to32(b)))
else:  # pragma: no cover - needs a GPU
    # Not the float64 emulation above: LLVM narrows fptrunc(fpext(a) * fpext(b)) to a float32 multiply (a valid
    # rewrite) and NVVM then contracts that multiply and the next float32 add into fma.rn.f32 (seen in the PTX of
    # the fp32-accumulator product). libdevice's fmul_rn / fadd_rn are never contracted.
    def _mul32(a, b):
        return np.float64(libdevice.fmul_rn(np.float32(a), np.float32(b)))

    def _add32(a, b):
        return np.float64(libdevice.fadd_rn(np.float32(a), np.float32(b)))

    def _sub32(a, b):
        return np.float64(libdevice.fsub_rn(np.float32(a), np.float32(b)))

    def _div32(a, b):
        return np.float64(libdevice.fdiv_rn(np.float32(a), np.float32(b)))


mul32, add32, sub32, div32 = device(_mul32), device(_add32), device(_sub32), device(_div32)


def _is_finite(x):
    return x == x and abs(x) != math.inf


is_finite = device(_is_finite)

# -- exp: the CPU backend's ops.exp64 / ops.exp32, op for op ---------------------------------------------------------
_INV_LN2 = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_SHIFTER = 6755399441055744.0  # 1.5 * 2^52
_Q2, _Q3, _Q4, _Q5, _Q6, _Q7, _Q8, _Q9, _Q10, _Q11, _Q12, _Q13 = (1.0 / math.factorial(k) for k in range(2, 14))


def _reduce(x):
    """ops._reduce: (k, expm1(r)) for x = k ln 2 + r, op for op (k read from kd = t - shifter, an integer
    exactly, where the CPU reads it from t's low bits)."""
    t = add(mul(x, _INV_LN2), _SHIFTER)
    kd = sub(t, _SHIFTER)
    r = sub(sub(x, mul(kd, _LN2_HI)), mul(kd, _LN2_LO))
    r2 = mul(r, r)
    r4 = mul(r2, r2)
    b0 = add(add(_Q2, mul(_Q3, r)), mul(add(_Q4, mul(_Q5, r)), r2))
    b1 = add(add(_Q6, mul(_Q7, r)), mul(add(_Q8, mul(_Q9, r)), r2))
    b2 = add(add(_Q10, mul(_Q11, r)), mul(add(_Q12, mul(_Q13, r)), r2))
    return int(kd), add(r, mul(r2, add(b0, mul(r4, add(b1, mul(r4, b2))))))


reduce_ln2 = device(_reduce)


def _exp64(x):
    """ops.exp64: k = round(x / ln 2) by the shifter (kd = t - shifter is that integer exactly; the CPU reads the
    same k from t's low bits), r = x - k ln 2, the Taylor polynomial in Estrin's scheme, times 2^(k//2) and
    2^(k - k//2) (exact powers of two: subnormal results round once, in the last product)."""
    if x != x:  # NaN passes through (the CPU selects it at the end; int(NaN) below would not be defined)
        return x
    xc = min(max(x, -746.0), 710.0)
    k, pm1 = reduce_ln2(xc)
    p = add(1.0, pm1)
    half = k >> 1
    y = mul(mul(p, math.ldexp(1.0, half)), math.ldexp(1.0, k - half))
    return y


exp64 = device(_exp64)

# exp32's constants (float32 values, held exactly in float64)
_INV_LN2_32 = float(np.float32(1.44269502))
_LN2_HI_32 = float(np.float32(0.693359375))
_LN2_LO_32 = float(np.float32(-2.12194440e-4))
_SHIFTER_32 = float(np.float32(12582912.0))  # 1.5 * 2^23
_P2, _P3, _P4, _P5, _P6, _P7 = (float(np.float32(1.0 / math.factorial(k))) for k in range(2, 8))


def _exp32(x):
    """ops.exp32 of the fp32 value ``x`` (float64 carrier), every float32 operation emulated exactly
    (:func:`mul32`, :func:`add32`), in the CPU's order: q = (P2 + P3 r) + (P4 + P5 r) r2 + (P6 + P7 r)(r2 r2)."""
    if x != x:
        return x
    xc = min(max(x, -104.0), 89.0)
    t = add32(mul32(xc, _INV_LN2_32), _SHIFTER_32)
    kd = sub32(t, _SHIFTER_32)
    k = int(kd)
    r = sub32(sub32(xc, mul32(kd, _LN2_HI_32)), mul32(kd, _LN2_LO_32))
    r2 = mul32(r, r)
    q = add32(add32(add32(_P2, mul32(_P3, r)), mul32(add32(_P4, mul32(_P5, r)), r2)),
              mul32(add32(_P6, mul32(_P7, r)), mul32(r2, r2)))
    p = add32(1.0, add32(r, mul32(r2, q)))
    half = k >> 1
    y = mul32(mul32(p, math.ldexp(1.0, half)), math.ldexp(1.0, k - half))
    return y


exp32 = device(_exp32)

# -- tanh: the CPU backend's ops.tanh64, op for op -----------------------------------------------------------------
_HALF_LOG3 = 0.5493061443340549  # log(3) / 2


def _tanh64(x):
    """ops.tanh64: e = expm1(2|x|) by exp64's reduction without its ``1 +`` (e = (2^k - 1) + 2^k p), then
    1 - 2 / (e + 2) above log(3)/2 and e / (e + 2) below, |x| clamped to 20, the sign copied back."""
    if x != x:
        return x
    a = min(abs(x), 20.0)
    k, p = reduce_ln2(add(a, a))
    scale = math.ldexp(1.0, k)  # 2^k, 0 <= k <= 58: exact
    e = add(sub(scale, 1.0), mul(scale, p))
    d = add(e, 2.0)
    th = sub(1.0, div(2.0, d)) if a > _HALF_LOG3 else div(e, d)
    return math.copysign(th, x)


tanh64 = device(_tanh64)


def _exp_c(x, f):
    """exp of a compute value by the format's rule (the CPU backend's ``ops.exp_c``)."""
    kind = f[_KIND]
    if kind == TRANSCENDENTAL_FLOAT32:
        return exp32(to32(x))
    y = exp64(x)
    return rnd(y, f) if kind == TRANSCENDENTAL_ROUNDED else y


def _tanh_c(x, f):
    kind = f[_KIND]
    y = tanh64(x)
    if kind == TRANSCENDENTAL_FLOAT32:
        return to32(y)  # the CPU's float32(tanh64(x))
    return rnd(y, f) if kind == TRANSCENDENTAL_ROUNDED else y


def _sigmoid_c(x, f):
    """1 / (1 + exp(-x)) by the format's rule (``ops.sigmoid_inplace``): every op in float32 for fp32 (not rounded
    again: float32 results are fp32 values), one float64 expression rounded once below fp32, float64 for fp64.
    Division by 1 + e: a float64 quotient of fp32 values converted to fp32 is the fp32 quotient."""
    kind = f[_KIND]
    if kind == TRANSCENDENTAL_FLOAT32:
        return div32(1.0, add32(1.0, exp32(-to32(x))))
    y = div(1.0, add(1.0, exp64(-x)))
    return rnd(y, f) if kind == TRANSCENDENTAL_ROUNDED else y


exp_c, tanh_c, sigmoid_c = device(_exp_c), device(_tanh_c), device(_sigmoid_c)


# -- stochastic rounding: precision.stochastic's recipe (numba_backend/stochastic.py), in float arithmetic ----------
_M32 = 0xFFFFFFFF
_ROT = (13, 15, 26, 6, 17, 29, 16, 24)  # precision.stochastic.THREEFRY_ROTATIONS (checked at import below)
_PARITY = 0x1BD11BDA
_TWO32 = 4294967296.0


def _random_bits(seed, step, tensor, index):
    """Word 0 of Threefry-2x32-20 under key (seed, tensor), counter (index, step): ``stochastic.random_bits``,
    integer for integer (words in the low 32 bits of int64, masked after every addition and rotation)."""
    k0 = seed & _M32
    k1 = tensor & _M32
    k2 = k0 ^ k1 ^ _PARITY
    x0 = (index + k0) & _M32
    x1 = (step + k1) & _M32
    for i in range(20):
        r = _ROT[i % 8]
        x0 = (x0 + x1) & _M32
        x1 = ((x1 << r) | (x1 >> (32 - r))) & _M32
        x1 = x1 ^ x0
        if i % 4 == 3:
            j = i // 4 + 1
            a = j % 3
            b = (j + 1) % 3
            ka = k0 if a == 0 else (k1 if a == 1 else k2)
            kb = k0 if b == 0 else (k1 if b == 1 else k2)
            x0 = (x0 + ka) & _M32
            x1 = (x1 + kb + j) & _M32
    return x0


random_bits = device(_random_bits)


def sr_value(x, f, bits):
    """float64 ``x`` rounded stochastically to the format ``f`` (:func:`gpu_format`) with the 32 random ``bits``:
    ``stochastic.round_bits`` in float arithmetic. With the quantum 2^qe of x (qe = max(exponent, emin) - mantissa
    bits; emin itself below tiny for a format without subnormals, whose neighbours there are 0 and tiny),
    s = |x| / 2^qe (exact), D = the top 32 bits of s's fraction; x rounds away from zero when D + bits >= 2^32.
    Overflow gives inf (NaN for finite-only formats), NaN stays NaN, the sign is kept."""
    if f[_MANT] >= 52 or x != x:
        return x
    ax = abs(x)
    if ax > 2.0 * f[_MAX]:  # inf included: beyond max whichever way it rounds
        return math.copysign(math.inf, x) if f[_HAS_INF] else math.nan
    if ax == 0.0:
        return x
    m, e = math.frexp(ax)
    exponent = e - 1
    qe = max(exponent, f[_EMIN]) - f[_MANT]
    if exponent < f[_EMIN] and f[_SUBNORMALS] == 0:
        qe = f[_EMIN]
    s = math.ldexp(ax, -qe)
    kept = math.floor(s)
    d = math.floor((s - kept) * _TWO32)  # s - kept and the scaling are exact: the top 32 discarded bits
    if d + bits > _M32:
        kept += 1
    out = math.ldexp(float(kept), qe)
    if out > f[_MAX]:
        out = math.inf if f[_HAS_INF] else math.nan
    return math.copysign(out, x)


sr_round = device(sr_value)


def _check_constants():
    from ...stochastic import THREEFRY_PARITY, THREEFRY_ROTATIONS
    if tuple(THREEFRY_ROTATIONS) != _ROT or THREEFRY_PARITY != _PARITY:
        raise ImportError("precision.stochastic's Threefry constants changed: update numba_cuda/device.py")


_check_constants()
