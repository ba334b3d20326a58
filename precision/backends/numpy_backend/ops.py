"""Arithmetic in one format with numpy: typed scalars, matmul and sums through the accumulator, transcendentals.

Elementwise ops on float16 / ml_dtypes arrays are rounded per op by numpy itself (docs/numerics.md); this module only
keeps numpy from widening them (Python floats promote bfloat16 to float32) and routes what numpy would round
differently per dtype or CPU (reductions, exp/tanh) through one explicit path.
"""

from __future__ import annotations

import numpy as np

from ...formats import Format, get_format, to_format

__all__ = ["FormatOps", "convert"]

_FP32 = get_format("fp32")


def convert(x: np.ndarray, src: Format, dst: Format) -> np.ndarray:
    """Values of ``x`` (held in ``src``'s dtype) in ``dst``'s dtype, rounded once when narrowing."""
    if src == dst:
        return x
    if src.name == "fp64":
        return to_format(x, dst)  # astype from float64 to bf16/fp8 would round twice (through float32)
    return x.astype(dst.dtype)  # widening is exact; float32 -> narrow is one correct rounding


class FormatOps:
    """Ops whose result lives in ``fmt``, with accumulation in ``accum``."""

    def __init__(self, fmt: Format, accum: Format):
        self.fmt, self.accum = fmt, accum
        self.dtype = fmt.dtype
        # Below fp32 numpy's exp/tanh differ by CPU (an AVX-512 float16 kernel): compute them in float64 and
        # round once, which every backend can reproduce exactly.
        self._wide_transcendentals = fmt.precision < _FP32.precision

    def scalar(self, value: float):
        """A typed scalar of this format (one correct rounding from float64)."""
        return to_format(np.float64(value), self.fmt)[()]

    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Exact products, sums in the accumulator format (BLAS order), one rounding to this format."""
        if self.accum == self.fmt:
            return a @ b
        return convert(a.astype(self.accum.dtype) @ b.astype(self.accum.dtype), self.accum, self.fmt)

    def matmul_tn(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """a.T @ b."""
        return self.matmul(a.T, b)

    def matmul_nt(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """a @ b.T."""
        return self.matmul(a, b.T)

    def sum(self, x: np.ndarray, axis: int, keepdims: bool = False) -> np.ndarray:
        return convert(np.sum(x, axis=axis, dtype=self.accum.dtype, keepdims=keepdims), self.accum, self.fmt)

    def _transcendental(self, fn, x: np.ndarray) -> np.ndarray:
        if self._wide_transcendentals:
            return to_format(fn(x.astype(np.float64)), self.fmt)
        return fn(x)

    def exp(self, x):
        return self._transcendental(np.exp, x)

    def tanh(self, x):
        return self._transcendental(np.tanh, x)

    def sigmoid(self, x):
        one = x.dtype.type(1)
        return self._transcendental(lambda z: one / (one + np.exp(-z)), x)
