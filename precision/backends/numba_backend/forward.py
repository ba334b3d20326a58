"""The numba backend's forward pass on its own: the logits of a trained model, with the training pass's rounding.

The kernels are the training pass's: :func:`.linalg.matmul_acc` (exact products for formats below fp32, summed in
the accumulator in ascending k, one rounding to the compute format), then the bias added and rounded, and tanh by
the format's rule (:func:`.ops.tanh_inplace`), every value a float64 carrier rounded after each op
(:func:`.rounding.rnd`).
The operands are laid out as :mod:`.models` lays them out (the linear models' z as ``w (1 x d) @ X.T (d x n)``), so
each logit is the same sequence of operations as in training.

Each output element is its own ascending sum over its own row and column, with no blocking, threads or FMA: a row's
logits do not depend on the other rows of the batch, its position in it or the batch size
(tests/test_batch_invariance.py pins that).
"""

from __future__ import annotations

import numba
import numpy as np

from ...formats import Format, get_format, round_to
from ...problems import get_problem, unflatten
from .linalg import acc_pair, matmul_acc, pair
from .ops import tanh_inplace
from .rounding import JIT, format_code, rnd

__all__ = ["forward_logits"]


@numba.njit(**JIT)
def _bias(Z, b, cc, apply_tanh):
    """Z[i, j] = rnd(Z[i, j] + b[j]), then tanh by the format's rule when ``apply_tanh``: the training pass's
    bias add (models._add_bias) and hidden activation, each op rounded to the compute format."""
    for i in range(Z.shape[0]):
        for j in range(Z.shape[1]):
            Z[i, j] = rnd(Z[i, j] + b[j], cc)
    if apply_tanh:
        tanh_inplace(Z, cc)


@numba.njit(**JIT)
def _relu(Z):
    """max(Z, 0) in place, as the training pass's (models._activate): exact, NaN stays NaN, -0 gives +0."""
    for i in range(Z.shape[0]):
        for j in range(Z.shape[1]):
            a = Z[i, j]
            Z[i, j] = a if (a > 0 or a != a) else 0.0


def _operand(values: np.ndarray, accum64: bool) -> tuple[np.ndarray, np.ndarray]:
    """Compute-format values (float64) as the accumulator's (float32, float64) operand pair (exact)."""
    ops = pair(values.shape, accum64)
    ops[1 if accum64 else 0][...] = values
    return ops


def _product(A: np.ndarray, B: np.ndarray, cc, accum64: bool) -> np.ndarray:
    """rnd(A @ B) by the training kernel; A, B float64 carriers of compute-format values."""
    out = np.zeros((A.shape[0], B.shape[1]))
    acc = acc_pair(B.shape[1], accum64)
    matmul_acc(_operand(A, accum64), _operand(B, accum64), acc, out, cc, accum64)
    return out


def forward_logits(problem: str, params: np.ndarray, X: np.ndarray, compute: Format, accum: Format,
                   layout) -> np.ndarray:
    """Logits (z of shape (n,) for linreg / logreg, Z of shape (n, classes) for softmax / mlp, before any
    sigmoid or softmax) of the float64 ``params`` on the float64 rows ``X``, computed in ``compute`` with dot
    products accumulated in ``accum`` (fp32 or fp64); float64 values. Overflow (inf, or NaN in fp8 e4m3fn) is
    returned, not raised."""
    problem = get_problem(problem).name  # raises, naming the valid problems
    compute, accum = get_format(compute), get_format(accum)
    if accum.name not in ("fp32", "fp64"):
        raise ValueError(f"the numba backend accumulates in fp32 or fp64, not {accum.name}")
    accum64, cc = accum.name == "fp64", format_code(compute)
    with np.errstate(all="ignore"):
        p = unflatten(round_to(np.asarray(params, dtype=np.float64), compute), layout)
        Xc = round_to(np.asarray(X, dtype=np.float64), compute)
    if problem in ("linreg", "logreg"):
        z = _product(p["w"].reshape(1, -1), Xc.T, cc, accum64)  # models.grad_linear's form: w row @ X.T
        _bias(z.reshape(-1, 1), p["b"], cc, False)
        return z[0]
    if problem == "softmax":
        Z = _product(Xc, p["W"], cc, accum64)
        _bias(Z, p["b"], cc, False)
        return Z
    prob = get_problem(problem)  # mlp, or a named mlp-WIDTHS[-relu]: hidden layers, then the output layer
    H = Xc
    for i in range(1, len(prob.hidden) + 1):
        H = _product(H, p[f"W{i}"], cc, accum64)
        _bias(H, p[f"b{i}"], cc, prob.activation == "tanh")
        if prob.activation == "relu":
            _relu(H)
    last = len(prob.hidden) + 1
    Z = _product(H, p[f"W{last}"], cc, accum64)
    _bias(Z, p[f"b{last}"], cc, False)
    return Z
