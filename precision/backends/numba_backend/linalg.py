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

Outputs are computed a register tile at a time (:mod:`.tile`: ROWS rows x two vectors of columns, the sums held in
vector registers across the whole k loop); each lane is one output's own ascending sum, so the tiling changes which
loads are shared and nothing in any output's sum. Operands are held in the accumulator's dtype (compute-format
values fit it exactly), so the inner loop runs at that width; outputs are float64 carriers. The policy picks the
accumulator at run time, so operands and scratch come as (float32, float64) *pairs* of which only the member of the
active dtype is used (:func:`stage` fills it), and :func:`matmul_acc` calls the float32 or the float64
specialization: both are compiled once and shared by every loop and policy.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import overload

from .rounding import JIT, rnd, static_format_name
from .tile import ROWS, TILE_ELEMENTS, tile, tile_columns

__all__ = ["ROWS", "TILE_ELEMENTS", "pair", "acc_pair", "ones_pair", "stage", "matmul", "matmul_acc"]


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


def acc_pair(columns: int, active64: bool) -> tuple[np.ndarray, np.ndarray]:
    """The accumulator scratch pair of :func:`matmul_acc` for products of up to ``columns`` output columns: a
    tile's sums (:data:`.tile.TILE_ELEMENTS`) or one row of ``columns``, whichever is longer."""
    return pair((max(columns, TILE_ELEMENTS),), active64)


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


def exact_store(A, out, cc):
    """Whether rnd(., cc) leaves every sum of A's accumulator type unchanged and ``out`` is C-contiguous, so that
    tiles store their sums straight into ``out`` (converted exactly to float64): the static fp32 code with a
    float32 accumulator, or the static fp64 code. Decided at compile time."""
    raise NotImplementedError("exact_store is only callable from numba-compiled code")


@overload(exact_store, inline="always", jit_options=JIT)
def _exact_store(A, out, cc):
    name = static_format_name(cc)
    exact = (isinstance(out, types.Array) and out.layout == "C"
             and (name == "fp64" or (name == "fp32" and A.dtype == types.float32)))
    return lambda A, out, cc: exact


def a_operand(A):
    """(C-contiguous array, element stride between rows of A, between its columns) for the tile kernel: A itself
    when C-contiguous, the array it transposes when F-contiguous (``X.T`` products read X in place: no transposed
    copy to make). Decided at compile time."""
    raise NotImplementedError("a_operand is only callable from numba-compiled code")


@overload(a_operand, inline="always", jit_options=JIT)
def _a_operand(A):
    if A.layout == "F":
        return lambda A: (A.T, 1, A.shape[0])
    if A.layout == "C":
        return lambda A: (A, A.shape[1], 1)
    return None  # a strided view: no tile kernel for it (a typing error, not wrong strides)


@numba.njit(inline="always", **JIT)
def _tiles(A, B, col, width, rows, acc, out, out_col, cc):
    """out[:rows, out_col:out_col + width] from the tile columns col .. col + tile_columns of B (B itself, or a
    zero-padded copy of its last columns), ROWS rows of A per register tile; ``rows`` is a multiple of ROWS. A
    whole tile whose rounding is the identity (:func:`exact_store`) is stored straight into ``out``; others go
    through ``acc`` and are rounded element by element."""
    cols, n_k = tile_columns(A), A.shape[1]
    base, lda, ak = a_operand(A)
    if exact_store(A, out, cc) and width == cols:
        for i in range(0, rows, ROWS):
            tile(base, i * lda, lda, ak, B, col, B.shape[1], n_k, out, i * out.shape[1] + out_col, out.shape[1])
        return
    for i in range(0, rows, ROWS):
        tile(base, i * lda, lda, ak, B, col, B.shape[1], n_k, acc, 0, cols)
        for r in range(ROWS):
            for c in range(width):
                out[i + r, out_col + c] = rnd(acc[r * cols + c], cc)


@numba.njit(**JIT)
def matmul(A, B, acc, out, cc):
    """out = rnd(A @ B), every output summed in ascending k; ``acc`` is scratch of the accumulator type.

    A is C- or F-contiguous (a transposed view, :func:`a_operand`), B C-contiguous. With ``acc`` of at least
    TILE_ELEMENTS, rows go ROWS at a time through register tiles (:mod:`.tile`) of
    ``tile_columns`` outputs: whole tiles straight from B, the last part-tile from a zero-padded copy of B's last
    columns (the padding's sums are discarded), and the rows after the last multiple of ROWS one at a time
    (:func:`_row`, ``acc`` at least B.shape[1]). Every path gives the same bits: each output is its own ascending
    sum (``test_tiles_give_the_one_row_bits``). On the default MLP's products (fp32, AMD EPYC Zen 3, one run) the
    tiles took 0.35 of the time of the four-row kernel they replace (36 against 103 us a step)."""
    m, n, n_k = A.shape[0], B.shape[1], A.shape[1]
    rows = m - m % ROWS if acc.size >= TILE_ELEMENTS else 0
    if rows > 0:
        cols = tile_columns(A)
        whole = n - n % cols
        for j in range(0, whole, cols):
            _tiles(A, B, j, cols, rows, acc, out, j, cc)
        if whole < n:
            panel = np.zeros((n_k, cols), A.dtype)
            for k in range(n_k):
                for c in range(n - whole):
                    panel[k, c] = B[k, whole + c]
            _tiles(A, panel, 0, n - whole, rows, acc, out, whole, cc)
    for i in range(rows, m):
        _row(A, B, i, acc, out, cc)


@numba.njit(**JIT)
def matmul_acc(A, B, acc, out, cc, accum64):
    """:func:`matmul` on the pairs A, B, acc in the accumulator picked by ``accum64``; out is float64."""
    if accum64:
        matmul(A[1], B[1], acc[1], out, cc)
    else:
        matmul(A[0], B[0], acc[0], out, cc)
