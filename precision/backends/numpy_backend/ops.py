"""Arithmetic in one format with numpy: typed scalars, matmul and sums through the accumulator, transcendentals.

Elementwise ops on float16 / ml_dtypes arrays are rounded per op by numpy itself (docs/numerics.md); this module only
keeps numpy from widening them (Python floats promote bfloat16 to float32) and routes what numpy would round
differently per dtype or CPU (reductions, exp/tanh) through one explicit path.

Emulated formats (tf32, ``fp(p=P,emax=E)``: no numpy dtype, docs/formats.md) are held as :class:`EmulatedArray`, a
view of the float32 / float64 carrier that knows its format: every ufunc on it is computed in float64 and rounded
once to the format (:func:`precision.formats.round_to`), which for + - * / sqrt is the exactly rounded result as
long as 53 >= 2p + 2 (p <= 25, ``MAX_EXACT_EMULATED_PRECISION``). So the shared training code
(``backends/array_math.py``, ``step_rules.apply_step``) runs unchanged and exact: :func:`convert` tags the arrays it
produces, and everything computed from a tagged array is rounded and tagged again. Whatever could not be emulated
exactly (a reduction other than max/min, a matmul outside :class:`FormatOps`, arithmetic in a format with p > 25)
raises instead of returning carrier-precision values.
"""

from __future__ import annotations

import numpy as np

from ...errors import SpecError
from ...formats import MAX_EXACT_EMULATED_PRECISION, Format, get_format, round_to, to_format

__all__ = ["FormatOps", "convert", "EmulatedArray", "emulated", "check_arithmetic"]

_FP32 = get_format("fp32")
_FP64 = get_format("fp64")
# Reductions whose result is one of the inputs (exact in any format).
_EXACT_REDUCTIONS = {np.maximum, np.minimum, np.fmax, np.fmin}
# Functions that only select, move or reshape values: their float result is a value of the format again.
_SELECTIONS = {np.where, np.concatenate, np.stack, np.hstack, np.vstack, np.reshape, np.ravel, np.transpose,
               np.take, np.copy, np.broadcast_to, np.squeeze, np.expand_dims, np.atleast_1d, np.atleast_2d,
               np.flip, np.sort, np.max, np.min, np.amax, np.amin, np.zeros_like, np.ones_like, np.empty_like,
               np.full_like, np.split, np.array_split, np.tile, np.repeat, np.clip, np.abs, np.negative}


def check_arithmetic(fmt: Format, backend: str = "numpy") -> None:
    """SpecError when ``fmt`` cannot compute exactly in ``backend`` (an emulated format with p > 25)."""
    if fmt.emulated and fmt.precision > MAX_EXACT_EMULATED_PRECISION:
        raise SpecError(f"format {fmt.name} cannot be a compute or update format in the {backend} backend: it is "
                        f"emulated in a float64 carrier, exact only up to p = {MAX_EXACT_EMULATED_PRECISION} "
                        f"(53 >= 2p + 2); p = {fmt.precision} would round twice (storage formats may have any p)")


class EmulatedArray(np.ndarray):
    """Values of an emulated format held in its carrier dtype (``fmt.dtype``); every ufunc result is rounded to
    ``fmt`` (see the module docstring). ``astype`` to another dtype and ``np.asarray`` give plain arrays."""

    fmt: Format | None

    def __array_finalize__(self, obj):
        self.fmt = getattr(obj, "fmt", None)

    def __reduce__(self):  # pickles (and copies) as a plain array: the format tag is a runtime property
        return np.asarray(self).__reduce__()

    def astype(self, dtype, *args, **kwargs):
        out = np.asarray(self).astype(dtype, *args, **kwargs)
        return emulated(out, self.fmt) if self.fmt is not None and out.dtype == self.dtype else out

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        fmts = {x.fmt for x in (*inputs, *kwargs.get("out", ())) if isinstance(x, EmulatedArray) and x.fmt}
        plain = [np.asarray(x) if isinstance(x, EmulatedArray) else x for x in inputs]
        if "out" in kwargs:
            raise TypeError(f"{ufunc.__name__} with out= on an emulated-format array is not supported: the result "
                            f"must be rounded to its format first")
        if not fmts:
            return getattr(ufunc, method)(*plain, **kwargs)
        if len(fmts) > 1:
            raise TypeError(f"{ufunc.__name__} mixes emulated formats {sorted(f.name for f in fmts)}: convert one "
                            f"of them first")
        fmt = fmts.pop()
        if method != "__call__":
            if method == "reduce" and ufunc in _EXACT_REDUCTIONS:
                return _tag(getattr(ufunc, method)(*plain, **kwargs), fmt)
            raise TypeError(f"{ufunc.__name__}.{method} on {fmt.name} values would not round per op; use "
                            f"FormatOps (sums and products through the accumulator)")
        if ufunc is np.matmul:
            raise TypeError(f"matmul of {fmt.name} values: use FormatOps.matmul (products through the accumulator)")
        result = ufunc(*plain, **kwargs)
        if not (isinstance(result, np.ndarray | np.generic) and result.dtype == fmt.dtype):
            return result  # comparisons, isfinite, ...: not values of the format; or promoted past the carrier
        check_arithmetic(fmt)
        with np.errstate(invalid="ignore"):
            wide = [np.asarray(x, dtype=np.float64) if isinstance(x, np.ndarray | np.generic) and
                    np.asarray(x).dtype.kind == "f" else x for x in plain]
        return emulated(round_to(ufunc(*wide, **kwargs), fmt).astype(fmt.dtype), fmt)

    def __array_function__(self, func, types, args, kwargs):
        result = super().__array_function__(func, types, args, kwargs)
        if func in _SELECTIONS and self.fmt is not None:
            return _tag(result, self.fmt)
        return result


def _tag(result, fmt: Format):
    if isinstance(result, np.ndarray) and result.dtype == fmt.dtype:
        return emulated(result, fmt)
    if isinstance(result, list | tuple):
        return type(result)(_tag(r, fmt) for r in result)
    return result


def emulated(x, fmt: Format):
    """``x`` (values of ``fmt`` in its carrier dtype) as an :class:`EmulatedArray`; native formats: ``x``."""
    if not fmt.emulated:
        return x
    out = np.asarray(x).view(EmulatedArray)
    out.fmt = fmt
    return out


def convert(x: np.ndarray, src: Format, dst: Format) -> np.ndarray:
    """Values of ``x`` (held in ``src``'s dtype) in ``dst``'s dtype, rounded once when narrowing."""
    if src == dst:
        return emulated(x, dst) if dst.emulated else x
    if dst.emulated or src.name == "fp64" or (src.emulated and src.dtype == np.float64):
        # astype from float64 to bf16/fp8 would round twice (through float32); emulated formats have no cast
        with np.errstate(invalid="ignore"):
            return emulated(to_format(np.asarray(x, dtype=np.float64), dst), dst)
    x = np.asarray(x) if isinstance(x, EmulatedArray) else x
    return x.astype(dst.dtype)  # widening is exact; float32 -> narrow is one correct rounding


class FormatOps:
    """Ops whose result lives in ``fmt``, with accumulation in ``accum``."""

    def __init__(self, fmt: Format, accum: Format):
        check_arithmetic(fmt)
        self.fmt, self.accum = fmt, accum
        self.dtype = fmt.dtype
        # Below fp32 numpy's exp/tanh differ by CPU (an AVX-512 float16 kernel): compute them in float64 and
        # round once, which every backend can reproduce exactly. Emulated formats: always so.
        self._wide_transcendentals = fmt.precision < _FP32.precision or fmt.emulated

    def relu(self, A):
        """max(A, 0): exact in every format (NaN stays NaN, -0 gives +0), one ufunc (emulated arrays keep their
        format)."""
        return np.maximum(A, np.zeros((), dtype=A.dtype))

    def scalar(self, value: float):
        """A typed scalar of this format (one correct rounding from float64)."""
        if self.fmt.emulated:
            return emulated(to_format(np.float64(value), self.fmt), self.fmt)  # 0-d: keeps rounding what it meets
        return to_format(np.float64(value), self.fmt)[()]

    def matmul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Exact products, sums in the accumulator format (BLAS order), one rounding to this format."""
        if self.accum == self.fmt:
            return a @ b
        a, b = np.asarray(a).astype(self.accum.dtype), np.asarray(b).astype(self.accum.dtype)
        return convert(a @ b, self.accum, self.fmt)

    def matmul_tn(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """a.T @ b."""
        return self.matmul(a.T, b)

    def matmul_nt(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """a @ b.T."""
        return self.matmul(a, b.T)

    def sum(self, x: np.ndarray, axis: int, keepdims: bool = False) -> np.ndarray:
        x = np.asarray(x)
        return convert(np.sum(x, axis=axis, dtype=self.accum.dtype, keepdims=keepdims), self.accum, self.fmt)

    def _transcendental(self, fn, x: np.ndarray) -> np.ndarray:
        if self._wide_transcendentals:
            return convert(fn(np.asarray(x).astype(np.float64)), _FP64, self.fmt)
        return fn(x)

    def exp(self, x):
        return self._transcendental(np.exp, x)

    def tanh(self, x):
        return self._transcendental(np.tanh, x)

    def sigmoid(self, x):
        one = x.dtype.type(1)
        return self._transcendental(lambda z: one / (one + np.exp(-z)), x)
