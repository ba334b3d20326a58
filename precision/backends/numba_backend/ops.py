"""Transcendentals of the compute format, inside compiled code.

The training loops hold every value in a float64 carrier (an fp16 / bf16 / fp8 / fp32 value is exactly a float64)
and round after each operation with :func:`.rounding.rnd`. For + - * / sqrt that float64 result, rounded to the
format, is the exactly rounded result, since 53 >= 2p + 2 for p <= 24 (so fp32 is emulated exactly too).

Transcendentals follow the numpy backend (``numpy_backend/ops.py``): fp64 uses float64 ``np.exp`` / ``np.tanh``;
fp32 uses the float32 functions (numba lowers them to the C library's expf / tanhf, not numpy's SIMD loops: they
differ from numpy's by a few ulp, which tests/test_numba_backend.py measures and pins); narrower formats compute in
float64 and round once (exact and the same everywhere, up to the 1-ulp float64 differences between libm and numpy,
which a rounding to 8 or 11 bits almost never sees).
"""

from __future__ import annotations

import numpy as np
from numba.extending import overload

from .rounding import JIT, TRANSCENDENTAL_FLOAT32, TRANSCENDENTAL_ROUNDED, TRANSCENDENTALS, round64

__all__ = ["exp_c", "tanh_c", "sigmoid_c"]

# IR-level inlining: tiny bodies called from loops (a separate function each would cost a compile of its own).
_INLINE = dict(inline="always", jit_options=JIT)


def exp_c(x, code):
    """exp of a float64-carried compute value, by the format's rule (see the module docstring)."""
    raise NotImplementedError("exp_c is only callable from numba-compiled code")


def tanh_c(x, code):
    raise NotImplementedError("tanh_c is only callable from numba-compiled code")


def sigmoid_c(x, code):
    """1 / (1 + exp(-x)), numpy's op order: every op in float32 for fp32, one float64 expression rounded once
    below fp32, float64 for fp64."""
    raise NotImplementedError("sigmoid_c is only callable from numba-compiled code")


@overload(exp_c, **_INLINE)
def _exp_c(x, code):
    def impl(x, code):
        kind = code[TRANSCENDENTALS]
        if kind == TRANSCENDENTAL_FLOAT32:
            return np.float64(np.exp(np.float32(x)))
        y = np.exp(np.float64(x))
        return round64(y, code) if kind == TRANSCENDENTAL_ROUNDED else y
    return impl


@overload(tanh_c, **_INLINE)
def _tanh_c(x, code):
    def impl(x, code):
        kind = code[TRANSCENDENTALS]
        if kind == TRANSCENDENTAL_FLOAT32:
            return np.float64(np.tanh(np.float32(x)))
        y = np.tanh(np.float64(x))
        return round64(y, code) if kind == TRANSCENDENTAL_ROUNDED else y
    return impl


@overload(sigmoid_c, **_INLINE)
def _sigmoid_c(x, code):
    def impl(x, code):
        kind = code[TRANSCENDENTALS]
        if kind == TRANSCENDENTAL_FLOAT32:
            one = np.float32(1.0)
            return np.float64(one / (one + np.exp(-np.float32(x))))
        y = 1.0 / (1.0 + np.exp(-np.float64(x)))
        return round64(y, code) if kind == TRANSCENDENTAL_ROUNDED else y
    return impl
