"""Kernel benchmarks: one optimizer update step over N parameters (seconds per step), per backend x optimizer x
storage format x N, next to the Adam-shaped memory-traffic reference measured in the same run.

``UpdateStep`` is the out-of-place grid (its figures unchanged); ``InplaceUpdateStep`` (below) the in-place Adam
grid with the in-place memory reference and the torch / optax peers. The cases come from :mod:`precision.kernels`
(shared with tests/bench/test_bench_kernels.py). A step reads the input
buffers and writes separate output buffers, so every repeat does the same work; buffers are built and the kernels
compiled in ``setup``, outside the timed region. Every update is finite (Adam with eps = 1e-4, which fp16
represents; the default 1e-8 rounds to 0 there and gave NaN): tests/test_benchcases.py checks each case. Cases that
cannot run (SGD has no memory reference; numba not installed) raise NotImplementedError in setup, which asv reports
as skipped (n/a).

Figures to read together (same run, single thread, N = 1e7): numba fp32 Adam / memory reference fp32 (the
fraction of the memory-bound floor), and numba bf16 / fp16 Adam against numba fp32 Adam. docs/numba.md has the
measured values.
"""

from __future__ import annotations

from precision.kernels import (INPLACE_FORMATS, KERNEL_BACKENDS, KERNEL_FORMATS, KERNEL_OPTIMIZERS, KERNEL_SIZES,
                               bytes_per_step, inplace_backends, inplace_case, inplace_skip_reason, kernel_skip_reason,
                               update_case)


class UpdateStep:
    params = [list(KERNEL_BACKENDS), list(KERNEL_OPTIMIZERS), list(KERNEL_FORMATS), list(KERNEL_SIZES)]
    param_names = ["backend", "optimizer", "storage", "n"]
    timeout = 600  # numpy float16 Adam at N = 1e7 takes 1-10 s per call (software float16; 2-core shared machine)

    def setup(self, backend, optimizer, storage, n):
        reason = kernel_skip_reason(backend, optimizer, storage)
        if reason is not None:
            raise NotImplementedError(reason)
        self.case = update_case(backend, optimizer, storage, n)
        self.case.step()  # compile (numba) and first-touch the output pages before timing

    def time_update(self, backend, optimizer, storage, n):
        self.case.step()

    def track_bytes_per_step(self, backend, optimizer, storage, n):
        """The traffic one step must move (divide by time_update for the achieved bandwidth)."""
        return bytes_per_step(optimizer, storage, n)

    track_bytes_per_step.unit = "bytes"


class InplaceUpdateStep:
    """One in-place Adam step (p, m, v written into the arrays read, as training loops and torch.optim do), per
    backend x format x N, next to the in-place memory reference (read p, g, m, v; write p, m, v) and the peers of
    precision.peers (torch.optim Adam / AdamW fused and foreach, 1 thread; optax adam under jit with donation):
    skipped (n/a) when not installed. ``number = 1``: asv runs ``setup`` before every sample, and ``setup``
    restores the inputs (``case.reset()``), so every timed step starts from the same seeded state; the case itself
    is built once per process. Formats: fp32, fp16, bf16 (pure) and torch-bf16 (bf16 storage, fp32 math: 3
    roundings per element). ``precision bench`` prints the ratios of one run (docs/performance.md)."""

    params = [list(inplace_backends()), list(INPLACE_FORMATS), list(KERNEL_SIZES)]
    param_names = ["backend", "storage", "n"]
    number = 1
    repeat = (3, 10, 20.0)
    timeout = 600

    def setup(self, backend, storage, n):
        reason = inplace_skip_reason(backend, storage)
        if reason is not None:
            raise NotImplementedError(reason)
        key = (backend, storage, n)
        if key not in _INPLACE:
            _INPLACE.clear()  # one case's buffers at a time (N = 1e7: 4 x 40 MB, twice)
            _INPLACE[key] = inplace_case(backend, storage, n)
            _INPLACE[key].step()  # compile and first-touch outside the timed region
        self.case = _INPLACE[key]
        self.case.reset()

    def time_update(self, backend, storage, n):
        self.case.step()


_INPLACE: dict = {}
