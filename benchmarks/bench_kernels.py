"""Kernel benchmarks: one optimizer update step over N parameters (seconds per step), per backend x optimizer x
storage format x N, next to the Adam-shaped memory-traffic reference measured in the same run.

The cases come from :mod:`precision.kernels` (shared with tests/bench/test_bench_kernels.py). A step reads the input
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

from precision.kernels import (KERNEL_BACKENDS, KERNEL_FORMATS, KERNEL_OPTIMIZERS, KERNEL_SIZES, bytes_per_step,
                               kernel_skip_reason, update_case)


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
