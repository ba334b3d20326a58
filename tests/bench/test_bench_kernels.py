"""pytest-benchmark: the kernel grid of benchmarks/bench_kernels.py (precision.kernels), timed locally.

Each round is one update step of the case (out of place: inputs are never written, so rounds are identical work), so
every figure is seconds per step. One table (pytest-benchmark group) per N, "kernel update step, n=1e+07 ...", apart
from the train table of test_bench_training.py. ``extra_info`` carries the bytes a step moves and the achieved
bandwidth. What is asserted is what the timed code computed, not its speed: no step wrote into its inputs (so every
round timed the same work), a numba step equals the numpy step bit for bit on the same buffers (NaN == NaN), and the
memory reference wrote what it should (m + g, v + g, p - g); a wrong-but-fast kernel fails here.

``test_inplace_step``: the in-place Adam grid (backends, the in-place memory reference, the torch / optax peers
when installed; fp32, fp16, bf16, torch-bf16), one table per N, inputs restored before each round outside the
timed region (pytest-benchmark's ``setup=``).

Run: ``python -m pytest tests/bench/test_bench_kernels.py --bench`` (add ``-k n1e+07`` for the N = 1e7 rows).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from precision.kernels import (INPLACE_FORMATS, INPLACE_STORAGE, KERNEL_BACKENDS, KERNEL_FORMATS, KERNEL_OPTIMIZERS,
                               KERNEL_SIZES, bytes_per_step, inplace_backends, inplace_case, inplace_reference_outputs,
                               inplace_skip_reason, kernel_skip_reason, update_case)

pytestmark = pytest.mark.bench

ROUNDS = 5
GRID = list(itertools.product(KERNEL_BACKENDS, KERNEL_OPTIMIZERS, KERNEL_FORMATS, KERNEL_SIZES))


def group(n: int) -> str:
    """The table a case is shown in: one per N, so that each has a unit that fits (us at 1e4, ms at 1e7)."""
    return f"kernel update step, n={n:.0e} (time per step)"


def record_bandwidth(benchmark, moved: int) -> None:
    """extra_info: the bytes a step moves and the bandwidth of the fastest round (none with --benchmark-disable,
    which runs each step once untimed: the assertions still run)."""
    benchmark.extra_info["bytes_per_step"] = moved
    if benchmark.stats is not None:
        benchmark.extra_info["gb_per_s"] = moved / benchmark.stats.stats.min / 1e9


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    u = np.dtype(f"u{a.dtype.itemsize}")
    with np.errstate(invalid="ignore"):
        both_nan = np.isnan(a.astype(np.float64)) & np.isnan(b.astype(np.float64))
    return bool(((a.view(u) == b.view(u)) | both_nan).all())


@pytest.mark.parametrize("backend,optimizer,storage,n", GRID,
                         ids=[f"{b}-{o}-{s}-n{n:.0e}" for b, o, s, n in GRID])
def test_update_step(benchmark, backend, optimizer, storage, n):
    reason = kernel_skip_reason(backend, optimizer, storage)
    if reason is not None:
        pytest.skip(reason)
    benchmark.group = group(n)
    case = update_case(backend, optimizer, storage, n)
    inputs_before = [a.copy() for a in case.inputs]
    # Every case's update is finite (tests/test_benchcases.py): a divide by zero, an invalid operation or an
    # overflow in numpy fails the case rather than timing NaN. Underflow to fp16 subnormals is part of the work.
    with np.errstate(divide="raise", invalid="raise", over="raise", under="ignore"):
        benchmark.pedantic(case.step, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    record_bandwidth(benchmark, bytes_per_step(optimizer, storage, n))

    # every round did the same work: the step never wrote what the next round reads
    for before, after in zip(inputs_before, case.inputs):
        assert same_bits(after, before), f"{case.label}: the timed step wrote into its inputs"
    outputs = case.outputs()
    if backend == "numba":
        reference = update_case("numpy", optimizer, storage, n)
        with np.errstate(under="ignore"):
            reference.step()
        for got, want in zip(outputs, reference.outputs()):
            assert same_bits(got, want), f"{case.label}: differs from numpy's update"
    elif backend == "jax" and storage == "bf16":
        # In bf16 XLA contracts nothing into FMA and keeps 1/sqrt_bc2 in float32, and these inputs are far from
        # float32's subnormals (no flush to zero): JAX's update must then be numpy's bit for bit (docs/jax.md; the
        # other formats' FMA and reciprocal rewrites are pinned in tests/test_jax_backend.py).
        reference = update_case("numpy", optimizer, storage, n)
        reference.step()
        for got, want in zip(outputs, reference.outputs()):
            assert same_bits(got, want), f"{case.label}: differs from numpy's update"
    elif backend == "memory-reference":
        as_stored = [a.view(np.uint16) if a.dtype.itemsize == 2 else a for a in case.inputs + outputs]
        p, g, m, v, p_out, m_out, v_out = as_stored  # 16-bit: integer adds on the patterns (they wrap)
        for got, want in ((p_out, p - g), (m_out, m + g), (v_out, v + g)):
            assert np.array_equal(got, want), f"{case.label}: the traffic kernel wrote something else"


# --- in place: what training loops and torch.optim do (precision.kernels.inplace_case) ----------------------------

INPLACE_GRID = list(itertools.product(inplace_backends(), INPLACE_FORMATS, KERNEL_SIZES))


def inplace_group(n: int) -> str:
    return f"in-place Adam step, n={n:.0e} (time per step)"


@pytest.mark.parametrize("backend,storage,n", INPLACE_GRID,
                         ids=[f"inplace-{b}-{s}-n{n:.0e}" for b, s, n in INPLACE_GRID])
def test_inplace_step(benchmark, backend, storage, n):
    """One in-place Adam step per round, the inputs restored before each round outside the timed region
    (``setup=case.reset``). Asserted: the exact cases (numpy and numba, every format; JAX in fp16 / bf16, where XLA
    contracts nothing) wrote numpy's out-of-place update bit for bit; the memory reference wrote m + g, v + g,
    p - g; every peer's result is finite and close to it; the pristine inputs are untouched."""
    reason = inplace_skip_reason(backend, storage)
    if reason is not None:
        pytest.skip(reason)
    benchmark.group = inplace_group(n)
    case = inplace_case(backend, storage, n)
    pristine = [a.copy() for a in case.inputs]
    with np.errstate(divide="raise", invalid="raise", over="raise", under="ignore"):
        benchmark.pedantic(case.step, setup=case.reset, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    record_bandwidth(benchmark, bytes_per_step("adam", INPLACE_STORAGE[storage], n))

    for before, after in zip(pristine, case.inputs):
        assert same_bits(after, before), f"{case.label}: the pristine inputs were written"
    outputs = case.outputs()
    if backend == "memory-reference":
        p, g, m, v = [a.view(np.uint16) if a.dtype.itemsize == 2 else a for a in pristine]
        wants = (p - g, m + g, v + g)
        for got, want in zip(outputs, wants):
            got = got.view(np.uint16) if got.dtype.itemsize == 2 else got
            assert np.array_equal(got, want), f"{case.label}: the traffic kernel wrote something else"
        return
    wants = inplace_reference_outputs(storage, n)
    exact = backend in ("numpy", "numba") or (backend == "jax" and storage in ("fp16", "bf16"))
    for got, want in zip(outputs, wants):
        if exact:
            assert same_bits(got, want), f"{case.label}: differs from numpy's update"
        else:  # peers and XLA's FMA contraction: the same update up to a few roundings of the storage format
            got64, want64 = got.astype(np.float64), want.astype(np.float64)
            assert np.isfinite(got64).all(), f"{case.label}: non-finite result"
            assert np.max(np.abs(got64 - want64)) <= 1e-3 * max(1.0, np.max(np.abs(want64))), case.label
