"""Stochastic rounding in compiled code: the recipe of :mod:`precision.stochastic` (the numpy reference; design in
docs/stochastic_rounding.md) written per element for ``@njit``, bit for bit the same.

Everything is int64 arithmetic: 32-bit words live in the low half of an int64 and are masked after each addition
and rotation (numba would otherwise widen uint32 arithmetic and mix signed and unsigned into float64), and carrier
patterns are non-negative except the float64 sign bit, which is only ever or-ed back.

Compiled entry points for loops (a later step wires them in where a stored tensor is rounded):

- :func:`threefry2x32` ``(k0, k1, c0, c1) -> (y0, y1)``;
- :func:`random_bits` ``(seed, step, tensor, index)``: the first word under key (seed, tensor), counter (index, step);
- :func:`stochastic_round64` / :func:`stochastic_round32` ``(x, code, seed, step, tensor, index)``: one carrier value
  rounded with the random bits of ``index``; ``code`` is :func:`sr_code` of the format and carrier.

:func:`round_stochastic` is the host entry point with the numpy reference's signature.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ...formats import Format, get_format
from ...stochastic import (RANDOM_BITS, THREEFRY_PARITY, THREEFRY_ROTATIONS, carrier_dtype, check_key,
                           element_indices, sr_params)
from .rounding import JIT

__all__ = ["threefry2x32", "random_bits", "sr_code", "round_bits", "stochastic_round64", "stochastic_round32",
           "round_stochastic"]

_M32 = 0xFFFFFFFF
_ROT = THREEFRY_ROTATIONS
_PARITY = THREEFRY_PARITY


@numba.njit(**JIT)
def threefry2x32(k0, k1, c0, c1):
    """Threefry-2x32-20 (Random123's threefry2x32_R with R = 20); words as int64 in [0, 2^32)."""
    k0 = np.int64(k0) & _M32
    k1 = np.int64(k1) & _M32
    ks = (k0, k1, k0 ^ k1 ^ _PARITY)
    x0 = (np.int64(c0) + k0) & _M32
    x1 = (np.int64(c1) + k1) & _M32
    for i in range(20):
        r = _ROT[i % 8]
        x0 = (x0 + x1) & _M32
        x1 = ((x1 << r) | (x1 >> (32 - r))) & _M32
        x1 = x1 ^ x0
        if i % 4 == 3:
            j = i // 4 + 1
            x0 = (x0 + ks[j % 3]) & _M32
            x1 = (x1 + ks[(j + 1) % 3] + j) & _M32
    return x0, x1


@numba.njit(**JIT)
def random_bits(seed, step, tensor, index):
    """32 random bits of element ``index``: word 0 of threefry2x32_20(key=(seed, tensor), counter=(index, step))."""
    return threefry2x32(seed, tensor, index, step)[0]


def sr_code(fmt: Format | str, carrier=np.float64) -> tuple:
    """The recipe's integers for ``fmt`` in ``carrier`` (a tuple of int64 for compiled code): identity flag,
    width, carrier mantissa bits and bias, format mantissa bits, emin and subnormal flag, max, overflow, inf and
    quiet-NaN patterns, and the carrier's magnitude mask."""
    p = sr_params(fmt, carrier)
    abs_mask = (1 << (p.width - 1)) - 1
    return (int(p.identity), p.width, p.carrier_mantissa, p.carrier_bias, p.mantissa, p.emin, int(p.subnormals),
            p.max_bits, p.overflow_bits, p.inf_bits, p.qnan_bits, abs_mask)


@numba.njit(**JIT)
def round_bits(u, r, code):
    """Carrier pattern ``u`` (int64: the float64 pattern, or the float32 pattern zero-extended) rounded with the 32
    random bits ``r``; returns the result's pattern in the same form."""
    (identity, width, mant_c, bias_c, mant, emin, subnormals, max_bits, overflow_bits, inf_bits, qnan_bits,
     abs_mask) = code
    if identity:
        return u
    a = u & abs_mask
    sign = u ^ a
    if a > inf_bits:
        return qnan_bits | sign
    biased = a >> mant_c
    sig = a & ((np.int64(1) << mant_c) - 1)
    if biased != 0:
        sig |= np.int64(1) << mant_c
    exponent = max(biased, 1) - bias_c
    qe = max(exponent, emin) - mant
    if exponent < emin and not subnormals:
        qe = emin  # below tiny: neighbours 0 and tiny
    shift = qe - (exponent - mant_c)
    sc = min(shift, width - 1)
    kept = sig >> sc
    discarded = sig - (kept << sc)
    if shift >= RANDOM_BITS:
        d = discarded >> min(shift - RANDOM_BITS, width - 1)
    else:
        d = discarded << (RANDOM_BITS - shift)
    d &= _M32
    up = (d + (r & _M32)) > _M32  # the carry out of D + R
    if shift <= mant_c:
        out = a - discarded
        if up:
            out += np.int64(1) << sc
    elif up:
        out = (qe + bias_c) << mant_c
    else:
        out = np.int64(0)
    if out > max_bits:
        out = overflow_bits
    return out | sign


@intrinsic
def _f64_bits(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(64))
    return types.int64(types.float64), codegen


@intrinsic
def _bits_f64(typingctx, u):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


@intrinsic
def _f32_bits(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))
    return types.int64(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, u):
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.trunc(args[0], ir.IntType(32)), ir.FloatType())
    return types.float32(types.int64), codegen


@numba.njit(**JIT)
def stochastic_round64(x, code, seed, step, tensor, index):
    """float64 ``x`` rounded stochastically to ``code``'s format (``sr_code(fmt, np.float64)``), as float64."""
    return _bits_f64(round_bits(_f64_bits(np.float64(x)), random_bits(seed, step, tensor, index), code))


@numba.njit(**JIT)
def stochastic_round32(x, code, seed, step, tensor, index):
    """float32 ``x`` rounded stochastically to ``code``'s format (``sr_code(fmt, np.float32)``), as float32."""
    return _bits_f32(round_bits(_f32_bits(np.float32(x)), random_bits(seed, step, tensor, index), code))


@numba.njit(**JIT)
def _round_array64(x, out, code, seed, step, tensor, start):
    for i in range(x.size):
        out[i] = stochastic_round64(x[i], code, seed, step, tensor, start + i)


@numba.njit(**JIT)
def _round_array32(x, out, code, seed, step, tensor, start):
    for i in range(x.size):
        out[i] = stochastic_round32(x[i], code, seed, step, tensor, start + i)


def round_stochastic(x, fmt: Format | str, seed: int, step: int, tensor: int, start_index: int = 0) -> np.ndarray:
    """The numpy reference's :func:`precision.stochastic.round_stochastic`, compiled: same arguments, same bits."""
    fmt = get_format(fmt)
    with np.errstate(invalid="ignore"):
        x = np.asarray(x)
        x = np.ascontiguousarray(x, dtype=carrier_dtype(x.dtype))
    check_key(seed, step, tensor)
    element_indices(0, start_index)  # range check only
    if start_index + x.size - 1 > _M32:
        raise ValueError("element indices do not fit in 32 bits")
    flat = x.reshape(-1)
    out = np.empty_like(flat)
    code = sr_code(fmt, x.dtype)
    kernel = _round_array64 if x.dtype == np.float64 else _round_array32
    kernel(flat, out, code, np.int64(seed), np.int64(step), np.int64(tensor), np.int64(start_index))
    return out.reshape(x.shape)
