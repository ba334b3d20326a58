"""The one matrix-product kernel of the gradients, with one fixed accumulation order.

``matmul(A, B)`` gives every output element ``rnd(sum_k A[i, k] * B[k, j])``: the products formed in the
accumulator's type (exact for fp16 / bf16 operands in fp32, and for fp32 operands in fp64; rounded in fp32 for fp32
operands with an fp32 accumulator), added one after another in *ascending k* starting from +0, and rounded once to
the compute format. No FMA (numba does not contract a*b + c without fastmath) and no threads, so the result
depends only on the inputs.

Every product and sum of the models is this kernel: ``X.T @ d`` is ``matmul(XT, d)`` on the transposed operand,
column sums are ``matmul(ones row, D)``, row sums ``matmul(D, ones column)`` (a product with 1 is exact, so these
are plain ascending sums). One kernel keeps compile time down: numba spends about half a second per compiled
function.

This is where the numba backend differs from numpy: numpy's ``@`` calls BLAS (blocked order, FMA) and
``np.sum`` sums contiguous axes pairwise. tests/test_numba_backend.py shows that the numpy model code with these two
replaced by the ascending order reproduces the numba runs bit for bit, and bounds the difference to numpy's own
order by gamma_k = k u_accum.

The innermost loop runs over output columns (contiguous, vectorized) while each output still accumulates in
ascending k; four rows of A share each pass over B (:func:`_four_rows`), which changes which loads are shared and
nothing in any output's sum. Operands are held in the accumulator's dtype (compute-format values fit it exactly),
so the inner loop runs at that width; outputs are float64 carriers. The policy picks the accumulator at run time,
so operands and scratch come as (float32, float64) *pairs* of which only the member of the active dtype is used
(:func:`stage` fills it), and :func:`matmul_acc` calls the float32 or the float64 specialization: both are
compiled once and shared by every loop and policy.
"""

from __future__ import annotations

import numba
import numpy as np

from .rounding import JIT, rnd

__all__ = ["ROWS", "pair", "acc_pair", "ones_pair", "stage", "matmul", "matmul_acc"]


def pair(shape: tuple, active64: bool) -> tuple[np.ndarray, np.ndarray]:
    """A (float32, float64) pair with the active member of ``shape`` and the other empty."""
    empty = (0,) * len(shape)
    return (np.zeros(empty if active64 else shape, np.float32), np.zeros(shape if active64 else empty, np.float64))


def ones_pair(shape: tuple, active64: bool) -> tuple[np.ndarray, np.ndarray]:
    ones = pair(shape, active64)
    for member in ones:
        member[...] = 1
    return ones


@numba.njit(**JIT)
def stage(src, dst, accum64):
    """Copy the float64 carrier matrix ``src`` (any layout, e.g. a transposed view) into the active member of the
    pair ``dst`` (exact: the values are compute-format values)."""
    if accum64:
        for i in range(src.shape[0]):
            for j in range(src.shape[1]):
                dst[1][i, j] = src[i, j]
    else:
        for i in range(src.shape[0]):
            for j in range(src.shape[1]):
                dst[0][i, j] = np.float32(src[i, j])


# Rows of A per pass over B (see :func:`matmul`); the accumulator scratch of a product with n columns is ROWS * n.
ROWS = 4


def acc_pair(columns: int, active64: bool) -> tuple[np.ndarray, np.ndarray]:
    """The accumulator scratch pair of :func:`matmul_acc` for products of up to ``columns`` output columns."""
    return pair((ROWS * columns,), active64)


@numba.njit(inline="always", **JIT)
def _row(A, B, i, acc, out, cc):
    """Row i of out = rnd(A @ B), ascending k, eight k per pass over ``acc`` (a scratch row >= B.shape[1])."""
    n, n_k = B.shape[1], A.shape[1]
    for j in range(n):
        acc[j] = 0
    k = 0
    while k + 8 <= n_k:
        a0, a1, a2, a3 = A[i, k], A[i, k + 1], A[i, k + 2], A[i, k + 3]
        a4, a5, a6, a7 = A[i, k + 4], A[i, k + 5], A[i, k + 6], A[i, k + 7]
        for j in range(n):
            t = acc[j] + a0 * B[k, j]
            t = t + a1 * B[k + 1, j]
            t = t + a2 * B[k + 2, j]
            t = t + a3 * B[k + 3, j]
            t = t + a4 * B[k + 4, j]
            t = t + a5 * B[k + 5, j]
            t = t + a6 * B[k + 6, j]
            acc[j] = t + a7 * B[k + 7, j]
        k += 8
    for k in range(k, n_k):
        a = A[i, k]
        for j in range(n):
            acc[j] += a * B[k, j]
    for j in range(n):
        out[i, j] = rnd(acc[j], cc)


@numba.njit(inline="always", **JIT)
def _four_rows(A, B, i, acc, out, cc):
    """Rows i .. i+3 of out = rnd(A @ B) in one pass over B, four k at a time: each B[k, j] loaded once for four
    outputs, each output still summed in ascending k. 4 x 4 values of A stay in registers (16 of AVX2's 16 ymm
    registers go to A, B and the sums at this size; 4 x 8 spills), so a pass does 32 multiply-adds per 8 loads of
    B and 4 loads and stores of the sums, against 8 per 9 loads and 1 store one row at a time."""
    n, n_k = B.shape[1], A.shape[1]
    s0, s1, s2, s3 = acc[:n], acc[n:2 * n], acc[2 * n:3 * n], acc[3 * n:4 * n]
    for j in range(n):
        s0[j] = 0
        s1[j] = 0
        s2[j] = 0
        s3[j] = 0
    k = 0
    while k + 4 <= n_k:
        x0, x1, x2, x3 = A[i, k], A[i, k + 1], A[i, k + 2], A[i, k + 3]
        y0, y1, y2, y3 = A[i + 1, k], A[i + 1, k + 1], A[i + 1, k + 2], A[i + 1, k + 3]
        z0, z1, z2, z3 = A[i + 2, k], A[i + 2, k + 1], A[i + 2, k + 2], A[i + 2, k + 3]
        w0, w1, w2, w3 = A[i + 3, k], A[i + 3, k + 1], A[i + 3, k + 2], A[i + 3, k + 3]
        for j in range(n):
            b0, b1, b2, b3 = B[k, j], B[k + 1, j], B[k + 2, j], B[k + 3, j]
            s0[j] = (((s0[j] + x0 * b0) + x1 * b1) + x2 * b2) + x3 * b3
            s1[j] = (((s1[j] + y0 * b0) + y1 * b1) + y2 * b2) + y3 * b3
            s2[j] = (((s2[j] + z0 * b0) + z1 * b1) + z2 * b2) + z3 * b3
            s3[j] = (((s3[j] + w0 * b0) + w1 * b1) + w2 * b2) + w3 * b3
        k += 4
    for k in range(k, n_k):
        x, y, z, w = A[i, k], A[i + 1, k], A[i + 2, k], A[i + 3, k]
        for j in range(n):
            b = B[k, j]
            s0[j] += x * b
            s1[j] += y * b
            s2[j] += z * b
            s3[j] += w * b
    for j in range(n):
        out[i, j] = rnd(s0[j], cc)
        out[i + 1, j] = rnd(s1[j], cc)
        out[i + 2, j] = rnd(s2[j], cc)
        out[i + 3, j] = rnd(s3[j], cc)


@numba.njit(**JIT)
def matmul(A, B, acc, out, cc):
    """out = rnd(A @ B), every output summed in ascending k; ``acc`` is scratch of the accumulator type, at least
    ROWS * B.shape[1] long for the four-row passes (:func:`_four_rows`), else at least B.shape[1] (one row at a
    time, :func:`_row`). Both give the same bits: only the loads are shared, not the sums. On the 256 x 256 MLP's
    products (fp32, AMD EPYC Zen 3, one run) four rows took 0.62-0.77 of the time of one row at a time."""
    i = 0
    if acc.size >= ROWS * B.shape[1]:
        while i + ROWS <= A.shape[0]:
            _four_rows(A, B, i, acc, out, cc)
            i += ROWS
    for i in range(i, A.shape[0]):
        _row(A, B, i, acc, out, cc)


@numba.njit(**JIT)
def matmul_acc(A, B, acc, out, cc, accum64):
    """:func:`matmul` on the pairs A, B, acc in the accumulator picked by ``accum64``; out is float64."""
    if accum64:
        matmul(A[1], B[1], acc[1], out, cc)
    else:
        matmul(A[0], B[0], acc[0], out, cc)
