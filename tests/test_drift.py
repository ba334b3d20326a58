"""Drift metrics on hand-made cases (definitions: docs/design.md "Metrics")."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from precision.data import Dataset
from precision.drift import MAX_BITS, bits_of_agreement, compare, fingerprint, max_ulp, rel_l2
from precision.formats import FORMATS
from precision.problems import get_problem
from precision.trajectory import Trajectory

F = FORMATS


def test_rel_l2_hand_cases():
    assert rel_l2([3.0, 4.0], [3.0, 4.0]) == 0.0
    assert rel_l2([3.0, 4.0 + 5.0], [3.0, 4.0]) == 1.0  # ||(0, 5)|| / ||(3, 4)|| = 5 / 5
    assert rel_l2([0.0, 0.0], [3.0, 4.0]) == 1.0
    assert rel_l2([6.0, 8.0], [3.0, 4.0]) == 1.0
    assert rel_l2([1.0, 1.0], [0.0, 0.0]) == math.inf  # relative to a zero reference
    assert rel_l2([0.0, -0.0], [0.0, 0.0]) == 0.0
    assert rel_l2([np.nan, 1.0], [1.0, 1.0]) == math.inf
    assert rel_l2([np.inf, 1.0], [1.0, 1.0]) == math.inf
    # Computed in float64 whatever the inputs' dtype: a bf16 vector is compared by its exact values.
    p = np.array([1.0078125, 2.0], dtype=ml_dtypes.bfloat16)  # 1 + 2^-7 is a bf16 value
    assert rel_l2(p, np.array([1.0, 2.0])) == 2.0**-7 / math.sqrt(5.0)


def test_bits_of_agreement_clips():
    assert bits_of_agreement(0.0) == MAX_BITS == 53.0
    assert bits_of_agreement(2.0**-10) == 10.0
    assert bits_of_agreement(0.5) == 1.0
    assert bits_of_agreement(1.0) == 0.0
    assert bits_of_agreement(8.0) == 0.0  # clipped below: worse than 100% error is still 0 bits
    assert bits_of_agreement(2.0**-60) == 53.0  # clipped above: float64 cannot agree to more
    assert bits_of_agreement(math.inf) == 0.0
    assert bits_of_agreement(math.nan) == 0.0


def test_max_ulp_counts_in_the_params_format():
    bf16 = F["bf16"]
    ref = np.array([1.0, 2.0, -4.0])
    one_ulp_up = np.array([1.0 + 2.0**-7, 2.0, -4.0])  # the bf16 successor of 1
    assert max_ulp(one_ulp_up, ref, bf16) == 1.0
    assert max_ulp(ref, ref, bf16) == 0.0
    assert max_ulp(np.array([1.0, 2.0, -4.0 - 3 * 2.0**-5]), ref, bf16) == 3.0  # ulp_bf16(4) = 2^-5
    # The ulp is taken at the reference, i.e. the spacing above |ref|: the bf16 predecessor of 1 (spacing 2^-8
    # below a power of two) counts as half an ulp.
    assert max_ulp(np.array([1.0 - 2.0**-8, 2.0, -4.0]), ref, bf16) == 0.5
    # The same difference counts 2^16 times more in fp32 units (ulp 2^-23 vs 2^-7).
    assert max_ulp(one_ulp_up, ref, F["fp32"]) == 2.0**16
    assert max_ulp(np.array([2.0**-24]), np.array([0.0]), F["fp16"]) == 1.0  # ulp(0) = smallest subnormal
    assert max_ulp(np.array([np.nan]), np.array([1.0]), bf16) == math.inf
    assert max_ulp(np.array([]), np.array([]), bf16) == 0.0


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=str)
def test_fingerprint_sees_one_bit(fmt):
    rng = np.random.default_rng(0)
    params = rng.standard_normal(100).astype(fmt.dtype)
    base = fingerprint(params)
    assert len(base) == 64 and base == fingerprint(params.copy())
    u = np.dtype(f"u{fmt.dtype.itemsize}")
    for index in (0, 57, 99):
        flipped = params.copy()
        flipped.view(u)[index] ^= u.type(1)  # lowest mantissa bit of one element
        assert fingerprint(flipped) != base
    # Same values, different storage format: different bytes, different fingerprint.
    if fmt.name != "fp64":
        assert fingerprint(params.astype(np.float64)) != base
    # Byte order does not matter: a big-endian copy of the same values hashes the same.
    if fmt.dtype.itemsize > 1 and fmt.dtype.kind == "f":
        assert fingerprint(params.astype(params.dtype.newbyteorder(">"))) == base
    # -0 and +0 are different bits.
    zeros = np.zeros(3, dtype=fmt.dtype)
    assert fingerprint(zeros) != fingerprint(-zeros)


def tiny_logreg_dataset() -> Dataset:
    """Two features, four test samples; w = (1, 0), b = 0 by hand."""
    X_test = np.array([[2.0, 0.0], [0.5, 1.0], [-0.5, 0.0], [-3.0, 1.0]])
    y_test = np.array([1, 0, 0, 0])
    layout = get_problem("logreg").layout(2, 0)
    return Dataset(problem="logreg", data="synthetic", seed=0, X_train=X_test, y_train=y_test, X_test=X_test,
                   y_test=y_test, classes=2, layout=layout, init_params=np.zeros(3), batches=None)


def trajectory(*params, diverged_at=None) -> Trajectory:
    stack = np.array(params, dtype=np.float64)
    return Trajectory(record_steps=np.arange(len(params)) * 10, params=stack, final_params=stack[-1],
                      step_times_s=(), compile_s=0.0, diverged_at=diverged_at)


def logreg_loss(w, b, X, y):
    """Mean of softplus(z) - y z, in plain Python."""
    total = 0.0
    for xi, yi in zip(X.tolist(), y.tolist()):
        z = w[0] * xi[0] + w[1] * xi[1] + b
        total += math.log1p(math.exp(z)) - yi * z if z < 30 else z - yi * z
    return total / len(y)


def test_compare_loss_gap_and_flip_rate_by_hand():
    ds = tiny_logreg_dataset()
    ref_final = [1.0, 0.0, 0.0]  # logits 2, 0.5, -0.5, -3: predictions 1, 1, 0, 0
    p_final = [1.0, 0.0, -1.0]  # logits 1, -0.5, -1.5, -4: predictions 1, 0, 0, 0 -> one flip of four
    ref = trajectory([0.0, 0.0, 0.0], ref_final)
    traj = trajectory([0.0, 0.0, 0.0], p_final)
    drift = compare(traj, ref, ds, F["fp32"])
    assert drift.flip_rate == 0.25
    ref_loss = logreg_loss(ref_final[:2], ref_final[2], ds.X_test, ds.y_test)
    p_loss = logreg_loss(p_final[:2], p_final[2], ds.X_test, ds.y_test)
    # Different summation order and log1p vs logaddexp: a few float64 roundings on O(1) values.
    assert drift.loss_gap == pytest.approx(abs(p_loss - ref_loss) / abs(ref_loss), rel=1e-14)
    assert drift.final_loss == pytest.approx(p_loss, rel=1e-14)  # train split == test split here
    assert drift.rel_l2 == 1.0  # ||(0, 0, -1)|| / ||(1, 0, 0)||
    assert drift.bits_of_agreement == 0.0
    assert drift.max_ulp == 1.0 / 2.0**-149  # the bias: |(-1) - 0| in units of ulp_fp32(0), the smallest subnormal
    assert [(p.step, p.rel_l2, p.bits) for p in drift.trajectory] == [(0, 0.0, 53.0), (10, 1.0, 0.0)]


def test_compare_identical_runs():
    ds = tiny_logreg_dataset()
    ref = trajectory([0.0, 0.0, 0.0], [1.0, 0.5, -0.25])
    drift = compare(ref, ref, ds, F["bf16"])
    assert (drift.rel_l2, drift.bits_of_agreement, drift.max_ulp, drift.loss_gap, drift.flip_rate) == (
        0.0, 53.0, 0.0, 0.0, 0.0)


def test_compare_diverged_run():
    ds = tiny_logreg_dataset()
    ref = trajectory([0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.5, 0.0, 0.0])
    traj = trajectory([0.0, 0.0, 0.0], [np.nan, 0.0, np.inf], diverged_at=7)
    traj = Trajectory(record_steps=np.array([0, 7]), params=traj.params, final_params=traj.final_params,
                      step_times_s=(), compile_s=0.0, diverged_at=7)
    drift = compare(traj, ref, ds, F["fp16"])
    assert drift.rel_l2 == math.inf and drift.bits_of_agreement == 0.0 and drift.max_ulp == math.inf
    assert drift.flip_rate is None  # a diverged model has no answers to compare
    assert math.isnan(drift.final_loss) or math.isinf(drift.final_loss)
    # Step 7 is not a reference record step: its drift is inf, not a comparison with some other step.
    assert [(p.step, p.rel_l2) for p in drift.trajectory] == [(0, 0.0), (7, math.inf)]


def test_regression_has_no_flip_rate_and_loss_gap_uses_the_test_split():
    X_train = np.array([[1.0], [2.0]])
    X_test = np.array([[1.0], [-1.0]])
    y_train, y_test = np.array([1.0, 2.0]), np.array([0.5, -0.5])
    ds = Dataset(problem="linreg", data="synthetic", seed=0, X_train=X_train, y_train=y_train, X_test=X_test,
                 y_test=y_test, classes=0, layout=get_problem("linreg").layout(1, 0), init_params=np.zeros(2),
                 batches=None)
    ref = trajectory([0.0, 0.0], [0.5, 0.0])  # fits the test split exactly: test loss 0
    traj = trajectory([0.0, 0.0], [0.5, 0.25])  # test residuals 0.25, 0.25: loss mean(0.0625) / 2 = 0.03125
    drift = compare(traj, ref, ds, F["fp32"])
    assert drift.flip_rate is None
    tiny = np.finfo(np.float64).tiny
    assert drift.loss_gap == 0.03125 / tiny  # |L - 0| / max(|0|, tiny): the definition's guard against 0
    # final_loss is on the train split: residuals (0.5 + 0.25 - 1, 1 + 0.25 - 2) = (-0.25, -0.75)
    assert drift.final_loss == (0.0625 + 0.5625) / 2 / 2
