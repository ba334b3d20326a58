"""The benchmark grids time meaningful work: every kernel case's update is finite, every training case trains.

A benchmark of an update that produces NaN, or of a run cut short by divergence, times something nobody runs
(numpy fp16 Adam with eps = 1e-8, which rounds to 0 in fp16, once timed ~1,000 NaN per step at N = 1e7). These
run in the default suite; the timing suites (asv, ``tests/bench --bench``) are not needed to catch that.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from precision.benchcases import DRIFT_GATE_RELATIVE, cases, drift_regressions, frozen_dataset
from precision.kernels import (KERNEL_BACKENDS, KERNEL_BLOCK, KERNEL_FORMATS, KERNEL_OPTIMIZERS, KERNEL_SIZES,
                               kernel_skip_reason, update_case)
from precision.runner import train

# The memory reference is no update: it adds the 16-bit patterns as integers (they wrap), so some of its outputs
# read as NaN in fp16 / bf16 with no floating-point operation behind them; tests/bench checks what it writes.
UPDATE_BACKENDS = [b for b in KERNEL_BACKENDS if b != "memory-reference"]
KERNEL_GRID = list(itertools.product(UPDATE_BACKENDS, KERNEL_OPTIMIZERS, KERNEL_FORMATS))


def test_every_kernel_size_repeats_the_block():
    """The inputs of every N are the block of the smallest N repeated, so the update (elementwise in every backend)
    is finite at every N exactly when it is finite at KERNEL_BLOCK, which the next test checks."""
    assert all(n % KERNEL_BLOCK == 0 for n in KERNEL_SIZES) and min(KERNEL_SIZES) == KERNEL_BLOCK
    small = update_case("numpy", "adam", "fp16", KERNEL_BLOCK)
    larger = update_case("numpy", "adam", "fp16", 3 * KERNEL_BLOCK)
    for a, b in zip(small.inputs, larger.inputs):
        assert np.array_equal(np.tile(a, 3).view(np.uint16), b.view(np.uint16))


@pytest.mark.parametrize("backend,optimizer,storage", KERNEL_GRID, ids=["-".join(c) for c in KERNEL_GRID])
def test_kernel_update_is_finite(backend, optimizer, storage):
    reason = kernel_skip_reason(backend, optimizer, storage)
    if reason is not None:
        pytest.skip(reason)
    case = update_case(backend, optimizer, storage, KERNEL_BLOCK)
    for a in case.inputs:
        assert np.isfinite(a.astype(np.float64)).all(), f"{case.label}: non-finite input"
    # divide-by-zero, invalid or overflow in the update (numpy raises here; underflow to subnormals is expected)
    with np.errstate(divide="raise", invalid="raise", over="raise"):
        case.step()
    for name, out in zip(("p", "state 1", "state 2"), case.outputs()):
        bad = int((~np.isfinite(out.astype(np.float64))).sum())
        assert bad == 0, f"{case.label}: the update writes {bad} non-finite values into {name}"


@pytest.mark.parametrize("case", [c for c in cases() if c.backend == "numpy"], ids=lambda c: c.label)
def test_training_case_does_not_diverge(case):
    """Every policy of the grid trains the 200 steps on numpy (the reference semantics). The other backends run the
    same numerics (their cross-backend distance is tracked); their divergence fails the timing suites instead
    (asv's warm-up, tests/bench), which compile per case and are too slow for the default run."""
    spec = case.spec()
    trajectory = train(spec, frozen_dataset(spec))
    assert trajectory.diverged_at is None, f"{case.label} diverged at step {trajectory.diverged_at}"
    assert np.isfinite(trajectory.params[-1]).all()


def test_drift_gate_flags_only_worse_figures():
    """The pytest-benchmark drift gate (tests/bench): equal or better figures pass, a rel_l2 or flip rate above the
    saved one by more than DRIFT_GATE_RELATIVE fails, naming the figure and the saved run."""
    saved = [("0001_x.json", {"rel_l2": 1e-3, "flip_rate": 0.0, "bits_of_agreement": 9.97})]
    same = {"rel_l2": 1e-3, "flip_rate": 0.0, "bits_of_agreement": 9.97}
    assert drift_regressions(same, saved) == []
    assert drift_regressions({**same, "rel_l2": 1e-3 * (1 + DRIFT_GATE_RELATIVE / 2)}, saved) == []
    assert drift_regressions({**same, "rel_l2": 0.5e-3}, saved) == []  # better is not a regression
    worse = drift_regressions({**same, "rel_l2": 1.8e-3, "bits_of_agreement": 9.1}, saved)
    assert len(worse) == 1 and worse[0].startswith("rel_l2 0.001 in 0001_x.json -> 0.0018")
    assert drift_regressions({**same, "flip_rate": 1 / 360}, saved)[0].startswith("flip_rate 0 in 0001_x.json")
    assert drift_regressions(same, [("old.json", {})]) == []  # a run saved without drift figures is not judged
