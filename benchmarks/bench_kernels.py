"""Kernel benchmarks: one optimizer update step over N parameters (seconds per step), per backend x optimizer x
storage format x N, next to the Adam-shaped memory-traffic reference measured in the same run.

``UpdateStep`` is the out-of-place grid; ``InplaceUpdateStep`` (below) the in-place Adam grid with the in-place
memory reference and the torch / optax peers; ``Traffic`` the bytes a step must move. The cases come from
:mod:`precision.kernels` (shared with tests/bench/test_bench_kernels.py). A step reads the input buffers and writes
separate output buffers, so every repeat does the same work; buffers are built and the kernels compiled once per
process in ``setup`` (memoized: asv re-runs ``setup`` before every timed call), outside the timed region. Every
update is finite (Adam with eps = 1e-4, which fp16 represents; the default 1e-8 rounds to 0 there and gave NaN):
tests/test_benchcases.py checks each case. Cases that cannot run (SGD has no memory reference; numba not
installed) raise NotImplementedError in setup, which asv reports as skipped (n/a).

Per commit the sizes are trimmed (``common.UPDATE_SIZES``, ``common.INPLACE_SIZES``; the whole KERNEL_SIZES grid
stays in ``precision bench`` and pytest-benchmark): the out-of-place grid at 1e4 (per-call overhead) and 1e6
(streaming), the in-place grid at 1e6 and 1e7 (the columns of docs/performance.md). Why, and what it costs:
docs/tracking.md, "Per-commit cost".

Figures to read together (same run, single thread, N = 1e7): numba fp32 Adam / memory reference fp32 (the
fraction of the memory-bound floor), and numba bf16 / fp16 Adam against numba fp32 Adam. docs/numba.md has the
measured values.
"""

from __future__ import annotations

from precision.kernels import (INPLACE_FORMATS, INPLACE_STORAGE, KERNEL_BACKENDS, KERNEL_FORMATS, KERNEL_OPTIMIZERS,
                               INPLACE_BACKENDS, bytes_per_step, inplace_case, inplace_skip_reason,
                               kernel_skip_reason, update_case)

from .common import (INPLACE_PEERS, INPLACE_SIZES, TRAFFIC_SIZES, UPDATE_SIZES, PerCommitTiming,
                     jax_compilation_cache)


class UpdateStep(PerCommitTiming):
    params = [list(KERNEL_BACKENDS), list(KERNEL_OPTIMIZERS), list(KERNEL_FORMATS), list(UPDATE_SIZES)]
    param_names = ["backend", "optimizer", "storage", "n"]
    repeat = (3, 20, 1.0)  # 20 single-step samples, or 3 when a step is slow (numpy fp16 Adam at 1e6: 1-2 s)
    timeout = 300

    def setup(self, backend, optimizer, storage, n):
        reason = kernel_skip_reason(backend, optimizer, storage)
        if reason is not None:
            raise NotImplementedError(reason)
        key = ("out-of-place", backend, optimizer, storage, n)
        if backend == "jax":
            jax_compilation_cache()
        if key not in _CASES:
            _CASES.clear()
            _CASES[key] = update_case(backend, optimizer, storage, n)
            _CASES[key].step()  # compile (numba) and first-touch the output pages before timing
        self.case = _CASES[key]

    def time_update(self, backend, optimizer, storage, n):
        self.case.step()


class Traffic:
    """The bytes one update step must move (divide ``UpdateStep`` / ``InplaceUpdateStep`` times by it for the
    achieved bandwidth): a formula of optimizer, storage format and N, the same for every backend, so it is tracked
    once per (optimizer, storage, N) over the timed sizes, with no buffers built."""

    params = [list(KERNEL_OPTIMIZERS), list(KERNEL_FORMATS), list(TRAFFIC_SIZES)]
    param_names = ["optimizer", "storage", "n"]
    timeout = 60

    def track_bytes_per_step(self, optimizer, storage, n):
        return bytes_per_step(optimizer, storage, n)

    track_bytes_per_step.unit = "bytes"


class InplaceUpdateStep(PerCommitTiming):
    """One in-place Adam step (p, m, v written into the arrays read, as training loops and torch.optim do), per
    backend x format x N, next to the in-place memory reference (read p, g, m, v; write p, m, v) and the peers of
    precision.peers (torch.optim Adam fused, 1 thread; optax adam under jit with donation): skipped (n/a) when not
    installed. Per commit the peers are ``common.INPLACE_PEERS`` (torch's foreach and AdamW variants are in
    ``precision bench`` and pytest-benchmark). ``number = 1``: asv runs ``setup`` before every sample, and
    ``setup`` restores the inputs (``case.reset()``), so every timed step starts from the same seeded state; the
    case itself is built once per process. Formats: fp32, fp16, bf16 (pure) and torch-bf16 (bf16 storage, fp32
    math: 3 roundings per element). numpy's 16-bit steps are timed at 1e6 only (its software float16 / bfloat16
    ufuncs take seconds a step at 1e7). ``precision bench`` prints the ratios of one run (docs/performance.md)."""

    params = [list(INPLACE_BACKENDS + INPLACE_PEERS), list(INPLACE_FORMATS), list(INPLACE_SIZES)]
    param_names = ["backend", "storage", "n"]
    number = 1
    repeat = (3, 20, 1.0)
    timeout = 300

    def setup(self, backend, storage, n):
        reason = inplace_skip_reason(backend, storage)
        if reason is None and backend == "numpy" and INPLACE_STORAGE[storage] != "fp32" and n > min(INPLACE_SIZES):
            reason = f"numpy's software {INPLACE_STORAGE[storage]} takes seconds a step here: timed at n = " \
                     f"{min(INPLACE_SIZES):.0e} per commit (all sizes: precision bench)"
        if reason is not None:
            raise NotImplementedError(reason)
        key = ("in-place", backend, storage, n)
        if backend in ("jax", "optax-adam"):
            jax_compilation_cache()
        if key not in _CASES:
            _CASES.clear()  # one case's buffers at a time (N = 1e7: 4 x 40 MB, twice)
            _CASES[key] = inplace_case(backend, storage, n)
            _CASES[key].step()  # compile and first-touch outside the timed region
        self.case = _CASES[key]
        self.case.reset()

    def time_update(self, backend, storage, n):
        self.case.step()


_CASES: dict = {}
