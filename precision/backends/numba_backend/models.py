"""Forward and backward passes of each problem, op for op as the numpy backend's ``models.py``.

Every elementwise operation is rounded to the compute format ``cc`` right after it, in numpy's order (for example
``(out - target) * scale`` is two roundings); matrix products and sums go through :mod:`.linalg` (the policy's
accumulator, one rounding at the end).

Values are float64 carriers; the operands of matrix products are (float32, float64) pairs (:mod:`.linalg`) of which
``accum64`` picks one. ``Xb`` / ``XbT`` are the batch's rows (B x d; for linreg / logreg with a column of ones
appended, so that one product gives the weights' and the bias's gradient, see :func:`linear_width`) and their
transpose (d x B) as such pairs, ``Tb`` its targets (B,) or one-hot rows (B x K); ``scale`` is 1/B times the loss
scale, rounded to ``cc`` on the host. The flat gradient goes to ``g`` in the layout of :mod:`precision.problems`.
``work`` holds preallocated scratch arrays (:func:`make_work`).
"""

from __future__ import annotations

import numba
import numpy as np

from ...problems import HIDDEN_UNITS
from .linalg import matmul_acc, ones_pair, pair, stage
from .ops import exp_c, sigmoid_inplace, tanh_c
from .rounding import JIT, like, rnd

__all__ = ["grad_linear", "grad_softmax", "grad_mlp", "make_work", "linear_width"]


def linear_width(features: int) -> int:
    """Columns of [X | 1 | 0 ...]: the data, a column of ones (its product with delta is the bias gradient), zeros
    up to a multiple of 8, one float32 vector, so that the product's inner loop has no scalar remainder (0 * delta
    adds nothing to the columns that are kept). 8 rather than 16: less data to stream per step (1,024 x 40 against
    x 48 floats for 32 features), 0.3 us of a 7 us logistic-regression step."""
    return -(-(features + 1) // 8) * 8


def make_work(problem: str, batch: int, features: int, classes: int, accum64: bool) -> tuple:
    """Scratch arrays for one problem's gradient (allocated once per run): float64 carriers, and (float32,
    float64) pairs for matrix-product operands, ones vectors and the accumulator row."""
    b, d, k, h = batch, features, classes, HIDDEN_UNITS
    acc = pair((max(b, d + 1, k, h),), accum64)
    if problem in ("linreg", "logreg"):
        padded = linear_width(d)
        acc = pair((max(b, padded),), accum64)
        return np.zeros((1, b)), pair((1, b), accum64), pair((1, d), accum64), acc, np.zeros((1, padded))
    softmax = (np.zeros((b, 1)), pair((b, k), accum64), ones_pair((k, 1), accum64), ones_pair((1, b), accum64))
    if problem == "softmax":
        return (np.zeros((b, k)), pair((d, k), accum64), acc) + softmax
    return ((np.zeros((b, h)), np.zeros((b, k)), np.zeros((b, h)), pair((b, h), accum64), pair((h, b), accum64),
             pair((d, h), accum64), pair((h, k), accum64), pair((k, h), accum64), pair((b, h), accum64), acc)
            + softmax)


@numba.njit(**JIT)
def _linear_delta(z, out, b, T, scale, logistic, cc):
    """out = (z + b, then sigmoid if logistic, - T) * scale, each op rounded to ``cc``, in the carrier of ``out``:
    float64, or float32 (exact for compute formats up to fp32, so with an fp32 accumulator). Separate passes, so
    that each is a branch-free loop that vectorizes; in a float32 carrier the sigmoid runs twice as many lanes."""
    for i in range(out.size):
        out[i] = rnd(like(z[i], out) + like(b, out), cc)
    if logistic:
        sigmoid_inplace(out, cc)
    for i in range(out.size):
        out[i] = rnd(rnd(out[i] - like(T[i], out), cc) * like(scale, out), cc)


@numba.njit(**JIT)
def grad_linear(logistic, pc, Xb, XbT, Tb, scale, cc, accum64, work, g):
    """linreg (delta = z - y) and logreg (delta = sigmoid(z) - y), z = Xw + b, both times ``scale``. With an fp32
    accumulator delta is computed in float32 straight into the float32 operand of the gradient's product."""
    z, delta_op, w_op, acc, grad_row = work
    d = w_op[0].shape[1] + w_op[1].shape[1]  # features: one member of the pair is empty
    stage(pc[:d].reshape((1, d)), w_op, accum64)
    matmul_acc(w_op, XbT, acc, z, cc, accum64)  # (X w) as a row, rounded once
    if accum64:
        _linear_delta(z[0], delta_op[1][0], pc[d], Tb, scale, logistic, cc)
    else:
        _linear_delta(z[0], delta_op[0][0], pc[d], Tb, scale, logistic, cc)
    matmul_acc(delta_op, Xb, acc, grad_row, cc, accum64)  # [X | 1 | 0].T delta: (gw, gb, 0)
    for j in range(d + 1):
        g[j] = grad_row[0, j]


@numba.njit(**JIT)
def _add_bias(Z, b, cc):
    for i in range(Z.shape[0]):
        for j in range(Z.shape[1]):
            Z[i, j] = rnd(Z[i, j] + b[j], cc)


@numba.njit(**JIT)
def _softmax_delta(Z, Tb, scale, cc, accum64, sums, Z_op, ones_k, acc):
    """Logits Z -> (softmax(Z) - T) * scale in place, numpy's order: Z - max, exp, row sums (accumulator, one
    rounding), /, -, *, each rounded to the compute format."""
    for i in range(Z.shape[0]):
        top = Z[i, 0]
        for c in range(1, Z.shape[1]):
            if Z[i, c] > top or Z[i, c] != Z[i, c]:  # NaN wins, as in np.max
                top = Z[i, c]
        for c in range(Z.shape[1]):
            Z[i, c] = exp_c(rnd(Z[i, c] - top, cc), cc)
    stage(Z, Z_op, accum64)
    matmul_acc(Z_op, ones_k, acc, sums, cc, accum64)
    for i in range(Z.shape[0]):
        for c in range(Z.shape[1]):
            Z[i, c] = rnd(rnd(rnd(Z[i, c] / sums[i, 0], cc) - Tb[i, c], cc) * scale, cc)


@numba.njit(**JIT)
def grad_softmax(pc, Xb, XbT, Tb, scale, cc, accum64, work, g):
    """Z = XW + b, P = softmax(Z), delta = (P - T) * scale; gW = X.T delta, gb = column sums of delta."""
    Z, W_op, acc, sums, Z_op, ones_k, ones_b = work
    d, k = W_op[0].shape[0] + W_op[1].shape[0], Z.shape[1]
    stage(pc[:d * k].reshape((d, k)), W_op, accum64)
    matmul_acc(Xb, W_op, acc, Z, cc, accum64)
    _add_bias(Z, pc[d * k:], cc)
    _softmax_delta(Z, Tb, scale, cc, accum64, sums, Z_op, ones_k, acc)
    stage(Z, Z_op, accum64)
    matmul_acc(XbT, Z_op, acc, g[:d * k].reshape((d, k)), cc, accum64)
    matmul_acc(ones_b, Z_op, acc, g[d * k:].reshape((1, k)), cc, accum64)


@numba.njit(**JIT)
def grad_mlp(pc, Xb, XbT, Tb, scale, cc, accum64, work, g):
    """H = tanh(X W1 + b1), P = softmax(H W2 + b2), delta = (P - T) * scale; back through W2 and tanh'."""
    H, Z, dA, H_op, HT_op, W1_op, W2_op, W2T_op, dA_op, acc, sums, Z_op, ones_k, ones_b = work
    d, h, k = W1_op[0].shape[0] + W1_op[1].shape[0], H.shape[1], Z.shape[1]
    o_b1, o_w2 = d * h, d * h + h
    o_b2 = o_w2 + h * k
    W2 = pc[o_w2:o_b2].reshape((h, k))
    stage(pc[:o_b1].reshape((d, h)), W1_op, accum64)
    matmul_acc(Xb, W1_op, acc, H, cc, accum64)
    _add_bias(H, pc[o_b1:o_w2], cc)
    for i in range(H.shape[0]):
        for j in range(h):
            H[i, j] = tanh_c(H[i, j], cc)
    stage(H, H_op, accum64)
    stage(W2, W2_op, accum64)
    matmul_acc(H_op, W2_op, acc, Z, cc, accum64)
    _add_bias(Z, pc[o_b2:], cc)
    _softmax_delta(Z, Tb, scale, cc, accum64, sums, Z_op, ones_k, acc)
    stage(Z, Z_op, accum64)
    stage(H.T, HT_op, accum64)
    matmul_acc(HT_op, Z_op, acc, g[o_w2:o_b2].reshape((h, k)), cc, accum64)
    matmul_acc(ones_b, Z_op, acc, g[o_b2:].reshape((1, k)), cc, accum64)
    stage(W2.T, W2T_op, accum64)
    matmul_acc(Z_op, W2T_op, acc, dA, cc, accum64)  # delta @ W2.T
    for i in range(dA.shape[0]):
        for j in range(h):
            dA[i, j] = rnd(dA[i, j] * rnd(1.0 - rnd(H[i, j] * H[i, j], cc), cc), cc)  # tanh' = 1 - H^2
    stage(dA, dA_op, accum64)
    matmul_acc(XbT, dA_op, acc, g[:o_b1].reshape((d, h)), cc, accum64)
    matmul_acc(ones_b, dA_op, acc, g[o_b1:o_w2].reshape((1, h)), cc, accum64)
