"""16-bit storage: bf16 and fp16 values as uint16 bit patterns (numba has no float16 / bfloat16 arrays on the CPU).

A ``float16`` or ``ml_dtypes.bfloat16`` numpy array ``.view(np.uint16)`` is exactly such an array, so the kernels
read and write the same bytes as the numpy backend's arrays. ``encode16`` is a re-encoding, not a rounding: its
input must already be a value of the format (the output of :func:`.rounding.rnd`). NaN is stored as a quiet NaN
(bf16 0x7FC0 with the sign, as ml_dtypes does; fp16 keeps the payload's top bits), so NaNs compare as NaN, not bit
for bit.

The format is a :func:`.rounding.static_code` (bf16 or fp16): its type selects the conversion at compile time, so
the loops carry no per-element branch.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from .rounding import HAS_F16C, JIT, static_format_name

__all__ = ["encode16", "decode16", "load", "save", "encode_array16", "decode_array16"]


@intrinsic
def _bf16_encode(typingctx, x):
    """Top half of the float32 pattern."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        u = builder.bitcast(args[0], i32)
        return builder.trunc(builder.lshr(u, ir.Constant(i32, 16)), ir.IntType(16))
    return types.uint16(types.float32), codegen


@intrinsic
def _bf16_decode(typingctx, h):
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        return builder.bitcast(builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16)), ir.FloatType())
    return types.float32(types.uint16), codegen


@intrinsic
def _fp16_encode_f16c(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return types.uint16(types.float32), codegen


@intrinsic
def _fp16_decode_f16c(typingctx, h):
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return types.float32(types.uint16), codegen


@numba.njit(**JIT)
def _fp16_encode_bits(x):
    """fp16 pattern of a float32 that is an fp16 value, by hand (CPUs without F16C)."""
    u = np.float32(x).view(np.uint32)
    sign = (u >> np.uint32(16)) & np.uint32(0x8000)
    a = u & np.uint32(0x7FFFFFFF)
    normal = (a - np.uint32((127 - 15) << 23)) >> np.uint32(13)  # rebias the exponent, keep 10 mantissa bits
    subnormal = np.uint32(np.abs(np.float32(x)) * np.float32(2.0 ** 24))  # an integer multiple of 2^-24
    special = np.uint32(0x7C00) | ((a >> np.uint32(13)) & np.uint32(0x3FF))  # inf, or NaN with its payload
    special = special | np.uint32(0x200) if a > np.uint32(0x7F800000) else special  # NaN: quiet
    r = subnormal if a < np.uint32(0x38800000) else normal
    r = special if a >= np.uint32(0x7F800000) else r
    return np.uint16(r | sign)


@numba.njit(**JIT)
def _fp16_decode_bits(h):
    h = np.uint32(h)
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    exponent = h & np.uint32(0x7C00)
    mantissa = h & np.uint32(0x3FF)
    normal = ((h & np.uint32(0x7FFF)) << np.uint32(13)) + np.uint32((127 - 15) << 23)
    special = np.uint32(0x7F800000) | (mantissa << np.uint32(13))
    subnormal = np.float32(np.float32(mantissa) * np.float32(2.0 ** -24)).view(np.uint32)
    r = subnormal if exponent == np.uint32(0) else normal
    r = special if exponent == np.uint32(0x7C00) else r
    return np.uint32(r | sign).view(np.float32)


def encode16(x, code):
    """uint16 pattern of float32 ``x`` (already a value of ``code``'s format: bf16 or fp16)."""
    raise NotImplementedError("encode16 is only callable from numba-compiled code")


def decode16(h, code):
    """float32 value of the uint16 pattern ``h`` of a bf16 or fp16 number (exact)."""
    raise NotImplementedError("decode16 is only callable from numba-compiled code")


def _storage_format(code) -> str:
    name = static_format_name(code)
    if name not in ("bf16", "fp16"):
        raise numba.core.errors.TypingError(f"16-bit storage needs static_code('bf16') or static_code('fp16'), "
                                            f"got {code}")
    return name


@overload(encode16, inline="always", jit_options=JIT)
def _encode16(x, code):
    name = _storage_format(code)
    if name == "bf16":
        def bf16(x, code):
            return _bf16_encode(np.float32(x))
        return bf16
    if HAS_F16C:
        def fp16_hw(x, code):
            return _fp16_encode_f16c(np.float32(x))
        return fp16_hw

    def fp16(x, code):
        return _fp16_encode_bits(x)
    return fp16


@overload(decode16, inline="always", jit_options=JIT)
def _decode16(h, code):
    name = _storage_format(code)
    if name == "bf16":
        def bf16(h, code):
            return _bf16_decode(np.uint16(h))
        return bf16
    if HAS_F16C:
        def fp16_hw(h, code):
            return _fp16_decode_f16c(np.uint16(h))
        return fp16_hw

    def fp16(h, code):
        return _fp16_decode_bits(h)
    return fp16


def load(stored, code):
    """A storage element as its value: float32 / float64 elements as they are, uint16 patterns decoded
    (:func:`decode16`). Lets one kernel serve every storage width: each array dtype compiles its own loop."""
    raise NotImplementedError("load is only callable from numba-compiled code")


def save(x, array, code):
    """``x`` as an element of ``array``: itself for float arrays, its pattern (:func:`encode16`) for uint16."""
    raise NotImplementedError("save is only callable from numba-compiled code")


@overload(load, inline="always", jit_options=JIT)
def _load(stored, code):
    if isinstance(stored, types.Integer):
        def pattern(stored, code):
            return decode16(stored, code)
        return pattern
    return lambda stored, code: stored


@overload(save, inline="always", jit_options=JIT)
def _save(x, array, code):
    if isinstance(array.dtype, types.Integer):
        def pattern(x, array, code):
            return encode16(x, code)
        return pattern
    return lambda x, array, code: x


@numba.njit(**JIT)
def encode_array16(x, code, out):
    """out[i] = encode16(x[i]) (tests)."""
    for i in range(x.size):
        out[i] = encode16(x[i], code)


@numba.njit(**JIT)
def decode_array16(h, code, out):
    """out[i] = decode16(h[i]) (tests)."""
    for i in range(h.size):
        out[i] = decode16(h[i], code)
