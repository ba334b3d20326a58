"""Forward and backward passes of each problem, op for op as the numpy backend's ``models.py``.

Every elementwise operation is rounded to the compute format ``cc`` right after it, in numpy's order (for example
``(out - target) * scale`` is two roundings); matrix products and sums go through :mod:`.linalg` (the policy's
accumulator, one rounding at the end).

Values are float64 carriers; the operands of matrix products are (float32, float64) pairs (:mod:`.linalg`) of which
``accum64`` picks one. ``Xb`` / ``XbT`` are the batch's rows (B x d; for linreg / logreg with a column of ones
appended, so that one product gives the weights' and the bias's gradient, see :func:`linear_width`) and their
transpose (d x B) as such pairs (the classifiers take no ``XbT``: they read ``Xb`` transposed in place,
:func:`transposed`), ``Tb`` its targets (B,) or one-hot rows (B x K); ``scale`` is 1/B times the loss
scale, rounded to ``cc`` on the host. The flat gradient goes to ``g`` in the layout of :mod:`precision.problems`.
``work`` holds preallocated scratch arrays (:func:`make_work`).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import overload
from numba.typed import List

from ...problems import HIDDEN_UNITS, get_problem
from .linalg import acc_pair, matmul_acc, ones_pair, pair, stage
from .ops import exp_inplace, sigmoid_inplace, tanh_inplace
from .rounding import JIT, like, rnd

__all__ = ["grad_linear", "grad_softmax", "grad_mlp", "grad_deep_mlp", "grad_any_mlp", "make_work", "linear_width"]


def linear_width(features: int) -> int:
    """Columns of [X | 1 | 0 ...]: the data, a column of ones (its product with delta is the bias gradient), zeros
    up to a multiple of 8, one float32 vector, so that the product's inner loop has no scalar remainder (0 * delta
    adds nothing to the columns that are kept). 8 rather than 16: less data to stream per step (1,024 x 40 against
    x 48 floats for 32 features), 0.3 us of a 7 us logistic-regression step."""
    return -(-(features + 1) // 8) * 8


def _pair_lists(shapes, accum64: bool):
    """(float32 list, float64 list) of pairs' members: numba typed Lists, one entry per shape."""
    f32, f64 = List(), List()
    for shape in shapes:
        a32, a64 = pair(shape, accum64)
        f32.append(a32)
        f64.append(a64)
    return f32, f64


def make_deep_work(hidden: tuple, relu: bool, batch: int, features: int, classes: int, accum64: bool) -> tuple:
    """Scratch arrays of :func:`grad_deep_mlp`: per hidden layer i its activations H_i (B x n_i), the delta at
    its output (B x n_i) and their operand pairs (H_i, delta_i), per weight matrix its operand pairs (W_i
    and W_i.T), the layer sizes (d, n_1 .. n_L, k) and the softmax's scratch."""
    b, k = batch, classes
    sizes = (features,) + tuple(hidden) + (classes,)
    H, D = List(), List()
    for n in hidden:
        H.append(np.zeros((b, n)))
        D.append(np.zeros((b, n)))
    H_op = _pair_lists([(b, n) for n in hidden], accum64)
    D_op = _pair_lists([(b, n) for n in hidden], accum64)
    W_op = _pair_lists([(sizes[i], sizes[i + 1]) for i in range(len(sizes) - 1)], accum64)
    WT_op = _pair_lists([(sizes[i + 1], sizes[i]) for i in range(len(sizes) - 1)], accum64)
    acc = acc_pair(max(b, max(sizes) + 1), accum64)
    Z = np.zeros((b, k))
    softmax = (np.zeros((b, 1)), pair((b, k), accum64), ones_pair((1, b), accum64))
    return (H, D, H_op, D_op, W_op, WT_op, np.array(sizes, dtype=np.int64), bool(relu), Z, acc) + softmax


def make_work(problem: str, batch: int, features: int, classes: int, accum64: bool) -> tuple:
    """Scratch arrays for one problem's gradient (allocated once per run): float64 carriers, and (float32,
    float64) pairs for matrix-product operands, ones vectors and the accumulator row. A named MLP
    (``mlp-WIDTHS[-relu]``) gets :func:`make_deep_work`'s."""
    if problem not in ("linreg", "logreg", "softmax", "mlp"):
        prob = get_problem(problem)
        return make_deep_work(prob.hidden, prob.activation == "relu", batch, features, classes, accum64)
    b, d, k, h = batch, features, classes, HIDDEN_UNITS
    acc = acc_pair(max(b, d + 1, k, h), accum64)
    if problem in ("linreg", "logreg"):
        padded = linear_width(d)
        acc = acc_pair(max(b, padded), accum64)
        return np.zeros((1, b)), pair((1, b), accum64), pair((1, d), accum64), acc, np.zeros((1, padded))
    softmax = (np.zeros((b, 1)), pair((b, k), accum64), ones_pair((1, b), accum64))
    if problem == "softmax":
        return (np.zeros((b, k)), pair((d, k), accum64), acc) + softmax
    return ((np.zeros((b, h)), np.zeros((b, k)), np.zeros((b, h)), pair((b, h), accum64), pair((d, h), accum64),
             pair((h, k), accum64), pair((k, h), accum64), pair((b, h), accum64), acc) + softmax)


@numba.njit(inline="always", **JIT)
def transposed(op):
    """The transposed views of an operand pair: F-contiguous, which the product reads in place
    (:func:`.linalg.a_operand`), so ``X.T @ delta`` needs no transposed copy of X."""
    return op[0].T, op[1].T


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


@numba.njit(inline="always", **JIT)
def _row_sums(Z, sums, cc, accum64):
    """sums[i, 0] = rnd(Z[i, 0] + Z[i, 1] + ..., cc), added in ascending order from +0 in the accumulator's type:
    what :func:`.linalg.matmul` of Z with a column of ones gives (each product 1 * z is exact), without staging Z
    or a product call (0.4 against 1.3 us for 128 x 10 logits, one run)."""
    for i in range(Z.shape[0]):
        if accum64:
            s64 = 0.0
            for c in range(Z.shape[1]):
                s64 = s64 + Z[i, c]
            sums[i, 0] = rnd(s64, cc)
        else:
            s32 = np.float32(0.0)
            for c in range(Z.shape[1]):
                s32 = s32 + np.float32(Z[i, c])  # exact: Z holds compute-format values (stage's premise)
            sums[i, 0] = rnd(s32, cc)


@numba.njit(**JIT)
def _softmax_delta(Z, Tb, scale, cc, accum64, sums):
    """Logits Z -> (softmax(Z) - T) * scale in place, numpy's order: Z - max, exp, row sums (accumulator, one
    rounding), /, -, *, each rounded to the compute format."""
    for i in range(Z.shape[0]):
        top = Z[i, 0]
        for c in range(1, Z.shape[1]):
            if Z[i, c] > top or Z[i, c] != Z[i, c]:  # NaN wins, as in np.max
                top = Z[i, c]
        for c in range(Z.shape[1]):
            Z[i, c] = rnd(Z[i, c] - top, cc)
    exp_inplace(Z.reshape(Z.size), cc)  # one flat loop: a row of K logits is too short a loop to vectorize
    _row_sums(Z, sums, cc, accum64)
    for i in range(Z.shape[0]):
        for c in range(Z.shape[1]):
            Z[i, c] = rnd(rnd(rnd(Z[i, c] / sums[i, 0], cc) - Tb[i, c], cc) * scale, cc)


@numba.njit(**JIT)
def grad_softmax(pc, Xb, Tb, scale, cc, accum64, work, g):
    """Z = XW + b, P = softmax(Z), delta = (P - T) * scale; gW = X.T delta, gb = column sums of delta (X.T: Xb's
    transposed view, read in place by the product)."""
    Z, W_op, acc, sums, Z_op, ones_b = work
    d, k = W_op[0].shape[0] + W_op[1].shape[0], Z.shape[1]
    stage(pc[:d * k].reshape((d, k)), W_op, accum64)
    matmul_acc(Xb, W_op, acc, Z, cc, accum64)
    _add_bias(Z, pc[d * k:], cc)
    _softmax_delta(Z, Tb, scale, cc, accum64, sums)
    stage(Z, Z_op, accum64)
    matmul_acc(transposed(Xb), Z_op, acc, g[:d * k].reshape((d, k)), cc, accum64)
    matmul_acc(ones_b, Z_op, acc, g[d * k:].reshape((1, k)), cc, accum64)


@numba.njit(**JIT)
def grad_mlp(pc, Xb, Tb, scale, cc, accum64, work, g):
    """H = tanh(X W1 + b1), P = softmax(H W2 + b2), delta = (P - T) * scale; back through W2 and tanh'."""
    H, Z, dA, H_op, W1_op, W2_op, W2T_op, dA_op, acc, sums, Z_op, ones_b = work
    d, h, k = W1_op[0].shape[0] + W1_op[1].shape[0], H.shape[1], Z.shape[1]
    o_b1, o_w2 = d * h, d * h + h
    o_b2 = o_w2 + h * k
    W2 = pc[o_w2:o_b2].reshape((h, k))
    stage(pc[:o_b1].reshape((d, h)), W1_op, accum64)
    matmul_acc(Xb, W1_op, acc, H, cc, accum64)
    _add_bias(H, pc[o_b1:o_w2], cc)
    tanh_inplace(H, cc)
    stage(H, H_op, accum64)
    stage(W2, W2_op, accum64)
    matmul_acc(H_op, W2_op, acc, Z, cc, accum64)
    _add_bias(Z, pc[o_b2:], cc)
    _softmax_delta(Z, Tb, scale, cc, accum64, sums)
    stage(Z, Z_op, accum64)
    matmul_acc(transposed(H_op), Z_op, acc, g[o_w2:o_b2].reshape((h, k)), cc, accum64)
    matmul_acc(ones_b, Z_op, acc, g[o_b2:].reshape((1, k)), cc, accum64)
    stage(W2.T, W2T_op, accum64)
    matmul_acc(Z_op, W2T_op, acc, dA, cc, accum64)  # delta @ W2.T
    _activation_backward(dA, H, False, cc)  # tanh' = 1 - H^2
    stage(dA, dA_op, accum64)
    matmul_acc(transposed(Xb), dA_op, acc, g[:o_b1].reshape((d, h)), cc, accum64)
    matmul_acc(ones_b, dA_op, acc, g[o_b1:o_w2].reshape((1, h)), cc, accum64)


@numba.njit(**JIT)
def _activate(A, relu, cc):
    """In place: relu max(A, 0) (exact; NaN stays NaN, -0 gives +0, as numpy's maximum), or tanh by the format's
    rule. The choice is made once, outside the loops: a branch per element kept them scalar."""
    if relu:
        for i in range(A.shape[0]):
            for j in range(A.shape[1]):
                a = A[i, j]
                A[i, j] = a if (a > 0 or a != a) else 0.0
    else:
        tanh_inplace(A, cc)


@numba.njit(**JIT)
def _activation_backward(dH, H, relu, cc):
    """In place: dH * act'(H), numpy's ops: relu' as dH * sign(H) (H >= 0: 1, 0 at 0, NaN for NaN), tanh' as
    dH * (1 - H*H), each op rounded. relu or tanh is chosen outside the loops, which then vectorize (with the
    choice inside, the tanh' pass over 128 x 512 took 950 us; 220 without)."""
    if relu:
        for i in range(dH.shape[0]):
            for j in range(dH.shape[1]):
                h = H[i, j]
                s = 1.0 if h > 0 else (0.0 if h == 0 else h)
                dH[i, j] = rnd(dH[i, j] * s, cc)
    else:
        for i in range(dH.shape[0]):
            for j in range(dH.shape[1]):
                h = H[i, j]
                dH[i, j] = rnd(dH[i, j] * rnd(1.0 - rnd(h * h, cc), cc), cc)


@numba.njit(**JIT)
def grad_deep_mlp(pc, Xb, Tb, scale, cc, accum64, work, g):
    """An MLP of L hidden layers (``mlp-WIDTHS[-relu]``): H_i = act(rnd(H_{i-1} W_i) + b_i), Z = rnd(H_L W) + b,
    delta = (softmax(Z) - T) * scale; then from the last layer down: gW_i = H_{i-1}.T delta, gb_i = column sums of
    delta, delta_{i-1} = (delta W_i.T) * act'(H_{i-1}). The operations and their order are array_math.gradient's,
    each product summed in ascending k in the accumulator and rounded once (as :func:`grad_mlp`)."""
    H, D, H_op, D_op, W_op, WT_op, sizes, relu, Z, acc, sums, Z_op, ones_b = work
    layers = sizes.size - 1  # weight matrices: L + 1
    offsets = np.zeros(2 * layers + 1, dtype=np.int64)  # W_1, b_1, W_2, ... in the flat vector
    at = 0
    for i in range(layers):
        offsets[2 * i] = at
        at += sizes[i] * sizes[i + 1]
        offsets[2 * i + 1] = at
        at += sizes[i + 1]
    offsets[2 * layers] = at
    # forward
    for i in range(layers):
        n_in, n_out = sizes[i], sizes[i + 1]
        W = pc[offsets[2 * i]:offsets[2 * i + 1]].reshape((n_in, n_out))
        b = pc[offsets[2 * i + 1]:offsets[2 * i + 2]]
        W_pair = (W_op[0][i], W_op[1][i])
        stage(W, W_pair, accum64)
        out = Z if i == layers - 1 else H[i]
        if i == 0:
            matmul_acc(Xb, W_pair, acc, out, cc, accum64)
        else:
            matmul_acc((H_op[0][i - 1], H_op[1][i - 1]), W_pair, acc, out, cc, accum64)
        _add_bias(out, b, cc)
        if i < layers - 1:
            _activate(out, relu, cc)
            stage(out, (H_op[0][i], H_op[1][i]), accum64)
    _softmax_delta(Z, Tb, scale, cc, accum64, sums)
    stage(Z, Z_op, accum64)
    # backward: delta's operand is Z_op for the last layer, D_op[i - 1] below it
    for i in range(layers - 1, -1, -1):
        n_in, n_out = sizes[i], sizes[i + 1]
        delta_pair = Z_op if i == layers - 1 else (D_op[0][i], D_op[1][i])
        gW = g[offsets[2 * i]:offsets[2 * i + 1]].reshape((n_in, n_out))
        gb = g[offsets[2 * i + 1]:offsets[2 * i + 2]].reshape((1, n_out))
        if i == 0:
            matmul_acc(transposed(Xb), delta_pair, acc, gW, cc, accum64)
        else:
            matmul_acc(transposed((H_op[0][i - 1], H_op[1][i - 1])), delta_pair, acc, gW, cc, accum64)
        matmul_acc(ones_b, delta_pair, acc, gb, cc, accum64)
        if i == 0:
            break
        WT_pair = (WT_op[0][i], WT_op[1][i])
        stage(pc[offsets[2 * i]:offsets[2 * i + 1]].reshape((n_in, n_out)).T, WT_pair, accum64)
        dH = D[i - 1]
        matmul_acc(delta_pair, WT_pair, acc, dH, cc, accum64)  # delta @ W_i.T
        _activation_backward(dH, H[i - 1], relu, cc)
        stage(dH, (D_op[0][i - 1], D_op[1][i - 1]), accum64)


def grad_any_mlp(pc, Xb, Tb, scale, cc, accum64, work, g):
    """:func:`grad_mlp` for the one-layer ``mlp``'s work tuple, :func:`grad_deep_mlp` for a named MLP's (its first
    member a typed List): picked at compile time, so the loops serve both."""
    raise NotImplementedError("grad_any_mlp is only callable from numba-compiled code")


@overload(grad_any_mlp, inline="always", jit_options=JIT)
def _grad_any_mlp(pc, Xb, Tb, scale, cc, accum64, work, g):
    if isinstance(work, types.BaseTuple) and isinstance(work[0], types.ListType):
        def deep(pc, Xb, Tb, scale, cc, accum64, work, g):
            grad_deep_mlp(pc, Xb, Tb, scale, cc, accum64, work, g)
        return deep

    def one(pc, Xb, Tb, scale, cc, accum64, work, g):
        grad_mlp(pc, Xb, Tb, scale, cc, accum64, work, g)
    return one
