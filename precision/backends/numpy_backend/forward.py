"""The numpy backend's forward pass on its own: the logits of a trained model, with the training pass's rounding.

The ops are the training pass's (:class:`.ops.FormatOps`: matmul through the accumulator and BLAS, one rounding to
the compute format; numpy rounds every elementwise op on float16 / ml_dtypes arrays itself; tanh below fp32 in
float64 rounded once), in the order of :func:`precision.backends.array_math.gradient`'s forward half, so a served
model computes exactly what the training forward pass computed for the same rows.
"""

from __future__ import annotations

import numpy as np

from ...formats import Format, get_format
from ...problems import get_problem, unflatten
from .. import array_math
from .ops import FormatOps, convert

__all__ = ["forward_logits"]

_FP64 = get_format("fp64")


def forward_logits(problem: str, params: np.ndarray, X: np.ndarray, compute: Format, accum: Format,
                   layout) -> np.ndarray:
    """Logits (z of shape (n,) for linreg / logreg, Z of shape (n, classes) for softmax / mlp, before any
    sigmoid or softmax) of the float64 ``params`` on the float64 rows ``X``, computed in ``compute`` with dot
    products accumulated in ``accum``; returned as their float64 values (exact: every format fits float64).

    ``params`` and ``X`` are rounded once to ``compute`` (one correct rounding from float64, as the training loop
    rounds its data); overflow becomes inf, or NaN in fp8 e4m3fn, and is returned, not raised."""
    problem = get_problem(problem).name  # raises, naming the valid problems
    compute, accum = get_format(compute), get_format(accum)
    ops = FormatOps(compute, accum)
    with np.errstate(all="ignore"):  # overflow and NaN are results (counted by precision.inference)
        p = unflatten(convert(np.asarray(params, dtype=np.float64), _FP64, compute), layout)
        Xc = convert(np.ascontiguousarray(X, dtype=np.float64), _FP64, compute)
        return array_math.forward(problem, ops, p, Xc)[0].astype(np.float64)
