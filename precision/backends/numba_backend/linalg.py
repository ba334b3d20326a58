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
ascending k. Operands are held in the accumulator's dtype (compute-format values fit it exactly), so the inner loop
runs at that width; outputs are float64 carriers. The policy picks the accumulator at run time, so operands and
scratch come as (float32, float64) *pairs* of which only the member of the active dtype is used (:func:`stage`
fills it), and :func:`matmul_acc` calls the float32 or the float64 specialization: both are compiled once and
shared by every loop and policy.
"""

from __future__ import annotations

import numba
import numpy as np

from .rounding import JIT, rnd

__all__ = ["pair", "ones_pair", "stage", "matmul", "matmul_acc"]


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


@numba.njit(**JIT)
def matmul(A, B, acc, out, cc):
    """out = rnd(A @ B) row by row, ascending k; ``acc`` is a scratch row (>= B.shape[1]) of the accumulator type.
    Eight k per pass over ``acc``, still added to each output in ascending k: half the loads and stores of ``acc``
    that four per pass make; the linear models' gradient (1,024 x 40, fp32) took 2.8 us where four per pass took
    3.1."""
    n, n_k = B.shape[1], A.shape[1]
    for i in range(A.shape[0]):
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


@numba.njit(**JIT)
def matmul_acc(A, B, acc, out, cc, accum64):
    """:func:`matmul` on the pairs A, B, acc in the accumulator picked by ``accum64``; out is float64."""
    if accum64:
        matmul(A[1], B[1], acc[1], out, cc)
    else:
        matmul(A[0], B[0], acc[0], out, cc)
