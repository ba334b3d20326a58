"""Batch invariance (precision.inference.batch_invariance): does a sample's served logit depend on its batch?

What is pinned, and why:

* numba: invariant in every format and problem, by construction: each logit is one ascending sum over its own row
  (linalg.matmul: no blocking, threads or FMA). Shown here on every problem and format.
* numpy: in fp32 / fp64 not invariant, and the cause is the BLAS product alone: numpy's own forward with the
  product replaced by the ascending-order product is invariant and equals numba's bits. On OpenBLAS's Haswell
  kernels (the measured machine) the shape picks the routine: a 1-row batch is a vector product (sdot for
  the linear models' weight vector, sgemv for a weight matrix), larger batches sgemv / sgemm, and within them a
  row's sum depends on its position (sgemv: 4-row blocks and a tail; sgemm: the microkernel's M tile), so even
  identical rows in one batch get different bits.
* JAX (XLA CPU): for the linear models' weight vector, a 1-row batch is lowered to multiply + reduce, larger ones
  to XLA's dot, whose rows come in tiles of 8 with a tail: not invariant, identical rows differ. The MLP's matrix
  products (YNNPACK for batches > 1, XLA's dot for 1 row) were measured invariant on an AVX2 CPU: pinned there.
* fp8 e4m3fn: every dot product here is exact in fp32 (test_inference.exact_in_fp32), so no order can change it:
  every backend is invariant, whatever its BLAS or compiler does.

Machine-dependent expectations are taken from precision.machine (CPU features, the BLAS kernel); on a machine
that was not measured those tests skip and say so, while the machine-independent pins run everywhere.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

import precision.backends.numpy_backend.forward as numpy_forward
from precision.backends.jax_backend import forward as jax_forward
from precision.formats import get_format, round_to
from precision.inference import BATCH_SIZES, INFER_FORMATS, POSITION_BATCH, batch_invariance, forward
from precision.machine import blas_info, cpu_features

from test_inference import CASES, exact_rows, trained
from test_numba_backend import AscendingProductOps

PROBLEMS = tuple(CASES)

# The machine these expectations were measured on: x86-64 with FMA3 and AVX2, no AVX-512 (an AMD EPYC), numpy's
# OpenBLAS on its Haswell kernels. Elsewhere the BLAS / XLA kernels may sum in other orders.
_FEATURES = cpu_features()
MEASURED_CPU = _FEATURES["AVX2"] and _FEATURES["FMA3"] and not _FEATURES["AVX512F"]
_OPENBLAS = {lib["architecture"] for lib in blas_info() if lib.get("internal_api") == "openblas"}
MEASURED_BLAS = MEASURED_CPU and _OPENBLAS == {"Haswell"}
needs_measured_blas = pytest.mark.skipif(not MEASURED_BLAS, reason=f"not measured on this BLAS ({_OPENBLAS or 'none'}"
                                         f" OpenBLAS kernel, CPU {_FEATURES}): expectations are OpenBLAS Haswell's")
needs_measured_cpu = pytest.mark.skipif(not MEASURED_CPU, reason=f"not measured on this CPU ({_FEATURES}): "
                                        "expectations are an AVX2 CPU's without AVX-512")


def first_rows(dataset, n: int):
    """The dataset with its first ``n`` test samples (JAX compiles one program per batch shape and dispatches each
    batch from Python: fewer samples keep its tests short)."""
    return dataclasses.replace(dataset, X_test=dataset.X_test[:n], y_test=dataset.y_test[:n])


def identical_rows(backend, problem, params, x, copies, fmt, layout) -> np.ndarray:
    """The logits of ``copies`` identical copies of row ``x`` in one batch: any difference between them is the
    row's position alone (same operands, same batch)."""
    return forward(backend, problem, params, np.tile(x, (copies, 1)), fmt, layout)


def distinct(out: np.ndarray) -> int:
    return len({row.tobytes() for row in np.asarray(out).reshape(len(out), -1)})


# ---------------------------------------------------------------------------------------------------- numba --


@pytest.mark.parametrize("fmt", INFER_FORMATS)
@pytest.mark.parametrize("problem", PROBLEMS)
def test_numba_is_batch_invariant(problem, fmt):
    dataset, params = trained(problem)
    result = batch_invariance("numba", dataset, params, fmt)
    assert result["invariant"], f"numba's fixed ascending order should not depend on the batch: {result}"
    x = dataset.X_test[0]
    assert distinct(identical_rows("numba", problem, params, x, 33, fmt, dataset.layout)) == 1


# ---------------------------------------------------------------------------------------------------- numpy --


@pytest.mark.parametrize("fmt", INFER_FORMATS)
@pytest.mark.parametrize("problem", PROBLEMS)
def test_numpy_is_invariant_with_a_fixed_order_product(problem, fmt, monkeypatch):
    """The machine-independent pin: with only the product replaced by the ascending-order one, numpy's forward pass
    is batch-invariant and gives numba's bits. So the BLAS product is the one cause of numpy's non-invariance (the
    elementwise ops, conversions and tanh act row by row). The MLP in fp32 / fp64 is left out of the bitwise
    comparison only: there numba's tanh is the C library's and numpy's its own SIMD loop (a few ulp apart,
    tests/test_numba_backend.py); below fp32 both are float64 tanh rounded once and agree."""
    dataset, params = trained(problem)
    monkeypatch.setattr(numpy_forward, "FormatOps", AscendingProductOps)
    result = batch_invariance("numpy", first_rows(dataset, 96), params, fmt)
    assert result["invariant"], result
    if problem == "mlp" and fmt in ("fp32", "fp64"):
        return
    ours = forward("numpy", problem, params, dataset.X_test, fmt, dataset.layout)
    assert np.array_equal(ours, forward("numba", problem, params, dataset.X_test, fmt, dataset.layout))


@needs_measured_blas
def test_numpy_fp32_matrix_product_depends_on_batch_shape_and_position():
    """MLP in fp32: OpenBLAS computes a 1-row batch with sgemv and larger ones with sgemm, whose result for a row
    depends on its position in the microkernel's M tile."""
    dataset, params = trained("mlp")
    result = batch_invariance("numpy", dataset, params, "fp32")
    assert all(share > 0 for share in result["differ_share"].values()), (
        f"expected every batch size to differ from 1-row batches (OpenBLAS sgemv for 1 row, sgemm above): {result}")
    assert result["position_differ_share"] > 0, f"expected sgemm's M-tile position to change bits: {result}"
    x = dataset.X_test[0]
    alone = forward("numpy", "mlp", params, x[None], "fp32", dataset.layout)[0]
    pair = forward("numpy", "mlp", params, np.stack([x, x]), "fp32", dataset.layout)
    assert distinct(pair) == 1 and not np.array_equal(alone, pair[0]), \
        "the same row alone (OpenBLAS sgemv) and in a 2-row batch (sgemm) should differ"
    copies = identical_rows("numpy", "mlp", params, x, POSITION_BATCH, "fp32", dataset.layout)
    assert distinct(copies) > 1, "identical rows in one sgemm call should differ by their position in the M tile"


@needs_measured_blas
def test_numpy_fp32_vector_product_depends_on_batch_shape_but_not_on_block_position():
    """Logistic regression in fp32 (X @ w, w a vector): a 1-row batch is a dot product (sdot), larger ones sgemv,
    which sums rows in blocks of 4 and the n mod 4 tail rows another way. Full batches of 32 are whole blocks: a
    row's position among them does not matter, and batches of 32 and 128 agree."""
    dataset, params = trained("logreg")
    result = batch_invariance("numpy", dataset, params, "fp32")
    assert all(share > 0 for share in result["differ_share"].values()), \
        f"expected 1-row batches (OpenBLAS sdot) to differ from larger ones (sgemv): {result}"
    assert result["position_differ_share"] == 0.0, f"expected whole 4-row sgemv blocks to be position-free: {result}"
    X = dataset.X_test
    assert np.array_equal(*(np.concatenate([forward("numpy", "logreg", params, X[i:i + size], "fp32", dataset.layout)
                                            for i in range(0, 96, size)]) for size in (32, 4)))
    tails = [distinct(identical_rows("numpy", "logreg", params, x, 5, "fp32", dataset.layout)) for x in X]
    assert max(tails) == 2, "in 5 identical rows, sgemv's tail row (the 5th) should sometimes differ from the block"


# ------------------------------------------------------------------------------------------------------ jax --


def _program(problem, params, n, fmt, layout) -> str:
    """The optimized HLO of the JAX forward pass for an n-row batch."""
    fmt = get_format(fmt)
    x = np.zeros((n, layout[0][1][0]), dtype=fmt.dtype)  # the first block is (features, ...)
    p = round_to(params, fmt).astype(fmt.dtype)
    with jax.enable_x64(False):
        return jax_forward._logits.lower(problem, tuple(layout), fmt, get_format("fp32"), p, x).compile().as_text()


def test_jax_lowers_a_one_row_vector_product_to_a_reduce():
    """XLA's algebraic simplifier turns the 1-row (1 x d) . (d) product into multiply + reduce; from 2 rows on it
    stays a dot (its matrix-vector emitter). Two programs, two summation orders."""
    dataset, params = trained("logreg")
    one, many = (_program("logreg", params, n, "fp32", dataset.layout) for n in (1, 32))
    assert " reduce(" in one and " dot(" not in one, one
    assert " dot(" in many, many


@needs_measured_cpu
def test_jax_fp32_vector_product_depends_on_batch_shape_and_tail_rows():
    dataset, params = trained("logreg")
    result = batch_invariance("jax", dataset, params, "fp32")
    assert all(share > 0 for share in result["differ_share"].values()), \
        f"expected 1-row batches (XLA multiply + reduce) to differ from larger ones (XLA dot): {result}"
    assert result["position_differ_share"] == 0.0, f"expected XLA's whole 8-row dot tiles to be position-free: {result}"
    tails = [distinct(identical_rows("jax", "logreg", params, x, 9, "fp32", dataset.layout))
             for x in dataset.X_test[:40]]
    assert max(tails) == 2, "in 9 identical rows, the row after XLA's 8-row tile should sometimes differ"


@needs_measured_cpu
@pytest.mark.parametrize("fmt", ["fp64", "fp32"])
def test_jax_matrix_products_are_batch_invariant_here(fmt):
    """Measured: the MLP's matrix products (XLA's dot for 1 row, a YNNPACK fusion from 2 rows on) give the same bits
    for a row at every batch size and position on this CPU class. Not a theorem: the kernels' orders happen to
    agree; on another CPU this test skips."""
    dataset, params = trained("mlp")
    result = batch_invariance("jax", first_rows(dataset, 96), params, fmt)
    assert result["invariant"], result
    if fmt == "fp32":
        assert "ynn" in _program("mlp", params, POSITION_BATCH, fmt, dataset.layout).lower(), \
            "the explanation assumes XLA hands batches > 1 to YNNPACK"


# ------------------------------------------------------------------------------------------ fp8: a theorem --


@pytest.mark.parametrize("backend", ["numpy", "numba", "jax"])
@pytest.mark.parametrize("problem", ["logreg", "mlp"])
def test_fp8_is_batch_invariant_on_every_backend(backend, problem):
    """When every fp32 sum is exact, no order, blocking or FMA can change it: every backend is invariant, including
    the two that are not in fp32 (exactness itself is checked here, not assumed)."""
    dataset, params = trained(problem)
    dataset = first_rows(dataset, 96)
    fmt = get_format("fp8_e4m3fn")
    assert exact_rows(problem, params, dataset.X_test, fmt, dataset.layout).all()
    assert batch_invariance(backend, dataset, params, fmt)["invariant"]


# ------------------------------------------------------------------------------------------------- the result --


def test_result_is_json_ready_and_complete():
    dataset, params = trained("logreg")
    result = batch_invariance("numpy", dataset, params, "bf16")
    json.dumps(result, allow_nan=False)
    assert result["format"] == "bf16" and result["reference_batch"] == 1
    assert result["batch_sizes"] == list(BATCH_SIZES)
    labels = ["full" if b is None else str(b) for b in BATCH_SIZES if b != 1]
    assert list(result["differ_share"]) == labels and list(result["max_ulp"]) == labels
    assert all(0.0 <= share <= 1.0 for share in result["differ_share"].values())
    assert result["invariant"] == (not any(result["differ_share"].values())
                                   and not result["position_differ_share"])
    small = batch_invariance("numba", first_rows(dataset, 5), params, "fp32", batch_sizes=(1, 2, None))
    assert small["position_differ_share"] is None and small["position_max_ulp"] is None  # no full batch of 32
    assert list(small["differ_share"]) == ["2", "full"]
