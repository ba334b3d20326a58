"""Backend conformance: every backend of ``precision.backends.BACKENDS``, the same crafted cases, the same expected
outcomes. docs/conformance.md describes the rules and the cases; a new backend passes this module before its name
is added to ``BACKENDS``.

The rules are stated once in :mod:`precision.backends.step_rules` (the per-step conversion chain, the divergence
rule, the host scalars); this module is their executable form. Each case trains on a tiny hand-made
:class:`~precision.data.Dataset` whose arithmetic can be followed by hand (mostly powers of two, so every
intermediate value is exact), and states its outcome (``diverged_at``, status, the recorded params bit for bit)
from that derivation, never from a backend's output. Every available backend must agree with it; an unavailable
backend shows as a skip with its reason (and fails the run when the environment variable ``CI`` is set).

Cases: divergence on params (not only weights), inf and NaN in data and targets, Adam's eps underflowing to 0,
loss-scale overflow, zero and huge learning rates, one-row and empty batches, gradient accumulation (micro-batches:
the doubling and loss-scale cases again, and the order of the sum), the policy grammar's every field combination
(and every u= update-math combination against the weights and state it must cover),
the rules' structure (the conversions each loop makes, numba's per-element update against the reference step) and a
mutation check (a backend that checks only the weights fails the suite).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import random
from typing import Callable

import numpy as np
import pytest

from precision.backends import BACKENDS, backend_availability, get_backend, step_rules
from precision.data import Dataset, make_dataset
from precision.errors import SpecError
from precision.formats import FORMATS, get_format, round_to, to_format, wider
from precision.optim import OptimizerSpec, make_optimizer, state_size
from precision.policy import PRESETS, Policy, parse_policy
from precision.problems import get_problem
from precision.spec import RunSpec
from precision.trajectory import Trajectory

FP16, FP32, FP64 = FORMATS["fp16"], FORMATS["fp32"], FORMATS["fp64"]

AVAILABILITY = {name: backend_availability(name, "cpu") for name in BACKENDS}
ALL_BACKENDS = [pytest.param(name, id=name, marks=() if avail.available else pytest.mark.skip(
    reason=f"backend {name!r} unavailable here: {avail.reason}")) for name, avail in AVAILABILITY.items()]
AVAILABLE = [name for name, avail in AVAILABILITY.items() if avail.available]


def test_every_backend_is_installed_in_ci():
    """In CI (``CI`` set) numpy, numba and jax are all installed: a skip there would hide a backend from the suite."""
    if not os.environ.get("CI"):
        pytest.skip("only in CI (environment variable CI set): locally a missing framework is a skip")
    missing = {name: AVAILABILITY[name].reason for name in ("numpy", "numba", "jax")
               if name not in AVAILABILITY or not AVAILABILITY[name].available}
    assert not missing, f"backends unavailable in CI: {missing}"


# -- building and running cases -------------------------------------------------------------------------------------

def crafted(problem: str, X, y, init, batches=None, classes: int = 0) -> Dataset:
    """A Dataset made by hand: the train split is (X, y) (the test split repeats it), params start at ``init``."""
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64 if get_problem(problem).is_classifier else np.float64)
    layout = get_problem(problem).layout(X.shape[1], classes if problem in ("softmax", "mlp") else 0)
    init = np.asarray(init, dtype=np.float64)
    assert init.size == sum(math.prod(shape) for _, shape in layout)
    if batches is not None:
        batches = np.asarray(batches, dtype=np.int64)
    return Dataset(problem=problem, data="crafted", seed=0, X_train=X, y_train=y, X_test=X, y_test=y,
                   classes=classes, layout=layout, init_params=init, batches=batches)


def sgd(lr: float, momentum: float = 0.0) -> OptimizerSpec:
    return make_optimizer("sgd", lr=lr, momentum=momentum)


def with_zero_lr(opt: OptimizerSpec) -> OptimizerSpec:
    """``opt`` with lr exactly 0. OptimizerSpec refuses lr=0 from users (test_zero_lr_is_refused_by_the_spec); a
    backend must still handle it (its update is then w - 0 * d = w), so the case sets it past the validation."""
    object.__setattr__(opt, "lr", 0.0)
    return opt


def run(backend: str, dataset: Dataset, opt: OptimizerSpec, policy: Policy, steps: int,
        record_every: int = 1, accum_steps: int = 1) -> Trajectory:
    batch = None if dataset.batches is None else int(dataset.batches.shape[1])
    spec = RunSpec(problem=dataset.problem, optimizer=opt, policy=policy, backend=backend, steps=steps,
                   batch_size=batch, record_every=record_every, accum_steps=accum_steps)
    return get_backend(backend).train(spec, dataset)


def same_bits(a, b) -> bool:
    """Equal float64 values bit for bit (sign of zero included); any NaN equals any NaN (payload and sign of NaN are
    not part of the contract: docs/jax.md)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return False
    nan = np.isnan(a) & np.isnan(b)
    return bool(np.all((a.view(np.uint64) == b.view(np.uint64)) | nan))


@dataclasses.dataclass(frozen=True)
class Case:
    """A run and its expected outcome, derived by hand (see each case's comment)."""
    name: str
    dataset: Dataset
    optimizer: OptimizerSpec
    policy: Policy
    steps: int
    diverged_at: int | None
    params: tuple | None = None  # expected params (float64 values) at steps 0, 1, ..., bit for bit; None: unstated
    accum_steps: int = 1  # micro-batches per step (step_rules.ACCUMULATION)

    def __str__(self):
        return self.name


def check_case(case: Case, backend: str) -> Trajectory:
    """Run ``case`` on ``backend`` (recording every step) and assert the expected outcome."""
    traj = run(backend, case.dataset, case.optimizer, case.policy, case.steps, accum_steps=case.accum_steps)
    where = f"{case.name} on {backend}"
    assert traj.diverged_at == case.diverged_at, (
        f"{where}: diverged_at {traj.diverged_at}, expected {case.diverged_at}; params at steps "
        f"{traj.record_steps.tolist()}: {traj.params.tolist()}")
    last = case.steps if case.diverged_at is None else case.diverged_at
    assert traj.record_steps.tolist() == list(range(last + 1)), where  # stops at the divergence step
    assert traj.final_params.dtype == case.policy.params.dtype, where
    assert same_bits(traj.final_params, traj.params[-1]), where  # the reported state is the last step's
    if case.diverged_at is None:
        assert np.isfinite(traj.params).all(), where
    else:
        # W not finite => P = round(W) not finite; P not finite itself: either way the reported params show it
        assert not np.isfinite(traj.params[-1]).all(), where
    if case.params is not None:
        expected = np.asarray(case.params, dtype=np.float64)
        assert same_bits(traj.params, expected), f"{where}: params {traj.params.tolist()}, expected {expected.tolist()}"
    return traj


# DOUBLING: linear regression on X = [[1], [-1]], targets 0, full batch (seed scale ls/2), params (w, b) with b = 0.
# z = (w + b, -w + b), delta = z * ls/2, so the gradient is g_w = 1*(w ls/2) + (-1)*(-w ls/2) = w ls and
# g_b = w ls/2 - w ls/2 = 0 (b stays 0). Unscaled, SGD with lr = 3 and no momentum gives w' = w - 3 w = -2 w: with a
# power-of-two start every value of every step is a power of two, exact in every format until it overflows.
def doubling(w0: float) -> Dataset:
    return crafted("linreg", [[1.0], [-1.0]], [0.0, 0.0], [w0, 0.0])


def doubling_params(w0: float, steps: int, last=None) -> list:
    """[(-2)^n w0, 0] for n = 0 .. steps, the last row replaced by ``last`` when given."""
    rows = [[(-2.0) ** n * w0, 0.0] for n in range(steps + 1)]
    if last is not None:
        rows[-1] = last
    return rows


FP16_MIXED = PRESETS["fp16-mixed"]  # p=fp16, c=fp16, a=fp32, s=fp32, m=fp32

# -- 1. divergence on params, not only weights ---------------------------------------------------------------------
# (a) A master weight of 7e4: finite in fp32, above fp16's max 65504, so the fp16 params are inf from the start. With
# x > 0, z = x * inf = +inf and sigmoid(+inf) = 1 exactly: the gradient stays finite (delta = (1 - y)/2 = (0, 0.5),
# g_w = 0.5 * 0.5 = 0.25, g_b = 0.5) and so do the fp32 weights, forever (w_1 = 7e4 - 0.025). Only the params check
# sees the divergence: diverged_at = 1 (step 0 is not checked), params (inf, round16(-round32(0.1) * 0.5)). A
# backend that checks the weights alone never diverges here (the numba backend did: it trained all steps).
_B1 = float(round_to(-float(round_to(0.1, FP32)) * 0.5, FP16))
SATURATED = Case("params-overflow-saturated-sigmoid", crafted("logreg", [[1.0], [0.5]], [1, 0], [7e4, 0.0]),
                 sgd(0.1), FP16_MIXED, steps=4, diverged_at=1, params=((np.inf, 0.0), (np.inf, _B1)))
# (b) DOUBLING from w0 = 2^13 in fp16-mixed: w = -2^14, 2^15, then -2^16 at step 3, finite in the fp32 master copy
# but above 65504 (it rounds to -inf) in the fp16 params: diverged_at = 3. The compute format does not overflow
# first (|z| <= 2^15 and the seed scale is 1/2). A weights-only check would report step 4 (the inf params make the
# step-4 gradient inf).
DOUBLING_PARAMS = Case("params-overflow-master-finite", doubling(2.0**13), sgd(3.0), FP16_MIXED, steps=6,
                       diverged_at=3, params=doubling_params(2.0**13, 3, last=[-np.inf, 0.0]))
PARAMS_CASES = [SATURATED, DOUBLING_PARAMS]


@pytest.mark.parametrize("case", PARAMS_CASES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_divergence_on_params(backend, case):
    check_case(case, backend)


def test_reference_step_states_the_params_rule():
    """The rule itself on the saturated case's first step: the new fp32 weights are finite, the fp16 params are not,
    and the verdict is 'not finite'."""
    pol, opt = FP16_MIXED, sgd(0.1)
    weights, params, state = step_rules.initial_values(np.array([7e4, 0.0]), pol, opt)
    assert np.isfinite(weights).all() and params[0] == np.inf
    scalars = step_rules.host_scalars(pol, opt, steps=1, batch_size=2)
    result = step_rules.reference_step(pol, opt, 1, scalars.table[0], weights, state,
                                       np.array([0.25, 0.5], dtype=pol.compute.dtype))
    assert np.isfinite(result.weights).all() and result.params[0] == np.inf and not result.finite
    assert step_rules.DIVERGENCE_CHECKED == ("weights", "params")


# -- 2. inf and NaN in the data: a result (diverged at step 1), not an exception -----------------------------------
# inf / NaN in X: z (or x * delta) is inf or NaN, and inf * 0 is NaN, so a gradient element is not finite at step 1
# whatever the other values; in a target: delta = z - inf = -inf, g = x * delta = -inf, w = +inf. Weights (and
# params) are not finite after step 1 in every format: diverged_at = 1.
NONFINITE_DATA = {
    "inf-in-X": crafted("logreg", [[np.inf, 1.0], [0.5, -1.0]], [1, 0], [0.5, 0.25, 0.0]),
    "nan-in-X": crafted("logreg", [[np.nan, 1.0], [0.5, -1.0]], [1, 0], [0.5, 0.25, 0.0]),
    "inf-target": crafted("linreg", [[1.0], [-1.0]], [np.inf, 0.0], [0.5, 0.0]),
    "nan-target": crafted("linreg", [[1.0], [-1.0]], [np.nan, 0.0], [0.5, 0.0]),
}


@pytest.mark.parametrize("policy", ["fp64", "fp16-mixed", "bf16"])
@pytest.mark.parametrize("data", NONFINITE_DATA)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_inf_and_nan_in_the_data_diverge_at_step_1(backend, data, policy):
    check_case(Case(f"{data}/{policy}", NONFINITE_DATA[data], make_optimizer("adam", lr=0.01), PRESETS[policy],
                    steps=3, diverged_at=1), backend)


# -- 3. Adam's eps underflowing to 0 -------------------------------------------------------------------------------
# The first feature is 0 in every row, so its gradient is exactly 0: m = v = 0 and the step is (lr/bc1 * 0) / denom
# with denom = sqrt(0)/sqrt(bc2) + eps. Pure fp16 (U = fp16): eps = 1e-8 rounds to 0 (the smallest fp16 subnormal is
# 6e-8), so 0/0 = NaN: diverged_at = 1. fp16-mixed (U = fp32 master and state): eps = 1e-8 is a normal fp32 number,
# the step is 0 and the weight stays 0.5 for every step: no divergence. Pure fp16 with eps = 1e-3 (0.0010004 in fp16):
# no divergence either, so the underflow is the cause.
EPS_DATA = crafted("logreg", [[0.0, 1.0], [0.0, -1.0], [0.0, 0.5]], [1, 0, 1], [0.5, 0.5, 0.0])
EPS_CASES = [
    Case("fp16-eps-1e-8-underflows", EPS_DATA, make_optimizer("adam", lr=0.01, eps=1e-8), PRESETS["fp16"], steps=5,
         diverged_at=1),
    Case("fp16-mixed-eps-1e-8", EPS_DATA, make_optimizer("adam", lr=0.01, eps=1e-8), FP16_MIXED, steps=5,
         diverged_at=None),
    Case("fp16-eps-1e-3", EPS_DATA, make_optimizer("adam", lr=0.01, eps=1e-3), PRESETS["fp16"], steps=5,
         diverged_at=None),
]


@pytest.mark.parametrize("case", EPS_CASES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_eps_underflow(backend, case):
    assert (to_format(case.optimizer.eps, case.policy.update) == 0) == (case.diverged_at is not None)
    traj = check_case(case, backend)
    if case.diverged_at is None:
        assert np.all(traj.params[:, 0] == 0.5)  # zero gradient, zero step: the weight never moves


# -- 4. loss-scale overflow (static loss scaling: no skipped steps) ------------------------------------------------
# DOUBLING from w0 = 1 with loss scale ls = 2^k, fp16 compute, fp32 master and state: at step n the gradient is
# g_w = w_{n-1} * 2^k = +-2^(n-1+k) in fp16 (the products are exact in the fp32 accumulator, the sum is rounded once
# to fp16), which overflows (2^16 rounds to inf) when n - 1 + k >= 16: diverged_at = 17 - k, with
# w = w_{n-1} - 3 * (+-inf) = -+inf. (delta = +-2^(n-2+k) itself fits.) ls = 2^15: step 2; ls = 2^12: step 5.
# Without a loss scale the gradient is w itself and 8 steps run clean: w_8 = 256.
def _ls_policy(ls):
    return parse_policy("p=fp16,c=fp16,s=fp32,m=fp32" + (f",ls={ls}" if ls else ""))


LOSS_SCALE_CASES = [
    Case("ls=2^15", doubling(1.0), sgd(3.0), _ls_policy(2**15), steps=8, diverged_at=2,
         params=doubling_params(1.0, 2, last=[np.inf, 0.0])),
    Case("ls=2^12", doubling(1.0), sgd(3.0), _ls_policy(2**12), steps=8, diverged_at=5,
         params=doubling_params(1.0, 5, last=[-np.inf, 0.0])),
    Case("no-loss-scale", doubling(1.0), sgd(3.0), _ls_policy(None), steps=8, diverged_at=None,
         params=doubling_params(1.0, 8)),
]


@pytest.mark.parametrize("case", LOSS_SCALE_CASES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_loss_scale_overflow(backend, case):
    check_case(case, backend)


# -- 4b. gradient accumulation (step_rules.ACCUMULATION) -------------------------------------------------------------
# DOUBLING in K = 2 micro-batches (row [1], then row [-1]), each with the whole batch's seed scale ls/2: micro-batch 1
# gives (g_w, g_b) = (w ls/2, w ls/2), micro-batch 2 gives (w ls/2, -w ls/2); summed in A (fp32, exact: powers of
# two) that is (w ls, 0), the one-batch gradient, so the params are those of the K = 1 cases above, bit for bit. A
# backend that divided each micro-batch by its own size (1) would get 2 w ls: w' = w - 6 w = -5 w, not a power of two.
# The loss-scale cases also show that the sum is rounded to C once: each micro-gradient +-2^(n-2+k) still fits fp16,
# their sum 2^(n-1+k) in fp32 does too, and only its rounding to fp16 overflows, at the same step 17 - k as without
# accumulation (a backend that handed the fp32 sum on to the update would not diverge there: w stays +-2^n).
#
# The order of the sum: linreg with one feature, x = 1 in all four rows, w = b = 0, targets (-4, -2^-22, -2^-22, 0),
# B = K = 4 (one row per micro-batch, seed scale 1/4): the micro-gradients of w and of b are both -y_i / 4 = 1,
# 2^-24, 2^-24, 0. In fp32 (u = 2^-24), summed in order from micro-batch 1: 1 + 2^-24 is a tie and rounds to even, 1;
# so is the next addition: g = 1 exactly, and SGD with lr 1 gives w = b = -1. Any other order that adds the two small
# terms first gives 1 + 2^-23 (and a one-batch sum may do either: BLAS's order is not specified). In fp64 every sum is
# exact: -(1 + 2^-23).
ORDER = crafted("linreg", [[1.0]] * 4, [-4.0, -2.0**-22, -2.0**-22, 0.0], [0.0, 0.0])
ACCUM_CASES = [
    dataclasses.replace(DOUBLING_PARAMS, name="params-overflow-master-finite/accum=2", accum_steps=2),
    *(dataclasses.replace(case, name=f"{case.name}/accum=2", accum_steps=2) for case in LOSS_SCALE_CASES),
    Case("order/fp32/accum=4", ORDER, sgd(1.0), PRESETS["fp32"], steps=1, diverged_at=None,
         params=((0.0, 0.0), (-1.0, -1.0)), accum_steps=4),
    Case("order/fp64/accum=4", ORDER, sgd(1.0), PRESETS["fp64"], steps=1, diverged_at=None,
         params=((0.0, 0.0), (-(1 + 2.0**-23), -(1 + 2.0**-23))), accum_steps=4),
]


@pytest.mark.parametrize("case", ACCUM_CASES, ids=str)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_gradient_accumulation(backend, case):
    check_case(case, backend)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_more_micro_batches_than_rows_are_refused_naming_the_value(backend):
    """K micro-batches need K rows: RunSpec refuses K above the data set's rows (from the table), and every backend
    refuses K above its dataset's batch (a hand-made one here: 4 rows) with a SpecError naming K and 1..4."""
    with pytest.raises(SpecError, match=r"accum_steps 129 exceeds the 128 rows"):
        RunSpec(problem="logreg", optimizer=sgd(0.1), policy=PRESETS["fp32"], batch_size=128, accum_steps=129)
    with pytest.raises(SpecError, match=r"accum_steps 5 exceeds the batch's 4 rows; valid range: 1\.\.4"):
        run(backend, TINY, sgd(0.1), PRESETS["fp32"], steps=2, accum_steps=5)


# -- 5. zero and huge learning rates -------------------------------------------------------------------------------
# TINY: logistic regression, 4 rows x 2 features, values exact in every format down to fp8 e4m3; at the initial
# point every gradient element is 0.03-0.04 in magnitude (so Adam's v = 0.001 g^2 ~ 1e-6 is not 0 even in fp16,
# where eps = 1e-8 is).
TINY_X = [[0.5, -1.0], [1.5, 0.25], [-0.75, 0.5], [1.0, 1.0]]
TINY_Y = [1, 0, 0, 1]
TINY_INIT = [0.25, -0.5, 0.125]
TINY = crafted("logreg", TINY_X, TINY_Y, TINY_INIT)


def test_zero_lr_is_refused_by_the_spec():
    with pytest.raises(SpecError, match=r"learning rate 0\.0"):
        make_optimizer("sgd", lr=0.0)


@pytest.mark.parametrize("opt", ["sgd-momentum", "adam"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_zero_lr_leaves_params_bitwise_unchanged(backend, opt):
    """lr = 0 (so Adam's lr/bc1 = 0 too): w - 0 * d = w exactly, for every preset: the params of every step are the
    initial params bit for bit (and the run does not diverge)."""
    failures = []
    for name, pol in PRESETS.items():
        optimizer = with_zero_lr(make_optimizer("sgd", lr=0.1, momentum=0.9) if opt == "sgd-momentum"
                                 else make_optimizer("adam", lr=0.1))
        _, params0, _ = step_rules.initial_values(TINY.init_params, pol, optimizer)
        expected = [params0.astype(np.float64)] * 4
        try:
            check_case(Case(f"zero-lr/{opt}/{name}", TINY, optimizer, pol, steps=3, diverged_at=None,
                            params=expected), backend)
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, "\n".join(failures)


# Huge lr on DOUBLING from w0 = 1: w_1 = 1 - 1e30 ~ -1e30 (lr itself rounds to inf when 1e30 exceeds U's max), and
# each later step multiplies w by ~ -1e30. The first step whose value exceeds the smallest max among U, W and P
# leaves non-finite weights or params: k = min{k : 1e30^k > M} = floor(log10(M) / 30) + 1, M = min(max U, max W,
# max P); the params reach C one step later (k_C = floor(log10(max C) / 30) + 2), whichever comes first. No format's
# max is near a power of 1e30 (log10 max: fp16 4.8, e4m3 2.65, fp32/bf16 38.5, fp64 308.3), so the one-rounding
# errors of w do not move k: fp16 and fp8 params: 1; fp32 and bf16: 2; fp64: 11.
HUGE_LR = 1e30


def huge_lr_step(pol: Policy) -> int:
    top = min(pol.update.max, pol.weights.max, pol.params.max)
    return min(math.floor(math.log10(top) / 30) + 1, math.floor(math.log10(pol.compute.max) / 30) + 2)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_huge_lr_diverges_at_the_step_the_formats_give(backend):
    expected = {"fp64": 11, "fp32": 2, "fp16": 1, "bf16": 2, "fp16-mixed": 1, "bf16-mixed": 2, "fp16-mixed-ls": 1,
                "fp8-mixed": 1, "torch-bf16": 2, "bf16-sr": 2, "bf16-kahan": 2, "torch-amp-fp16": 1}
    assert {name: huge_lr_step(pol) for name, pol in PRESETS.items()} == expected
    # Dynamic loss scaling first skips step 1: its gradient (out - target) * 65536 / 1 on this data overflows fp16
    # (max 65504) and the scale backs off to 32768; step 2 is then the formats' step 1.
    expected["torch-amp-fp16"] += 1
    failures = []
    for name, pol in PRESETS.items():
        try:
            check_case(Case(f"huge-lr/{name}", doubling(1.0), sgd(HUGE_LR), pol, steps=12,
                            diverged_at=expected[name]), backend)
        except AssertionError as exc:
            failures.append(str(exc))
    assert not failures, "\n".join(failures)


# -- 6. one-row and empty batches ---------------------------------------------------------------------------------
# batch_size = 1: 16 steps cycling over the 4 rows (seed scale ls/1). Expected: no divergence, and agreement between
# the backends:
# - numba with numpy bit for bit where docs/numba.md promises it: elementwise ops and one-term products (linreg with
#   one feature: every product is x*w or x*delta, no sum has two terms, no transcendental), and the fp16 / bf16 / fp8
#   compute of logreg (products of two narrow values are exact in the fp32 accumulator, so a two-term sum is one
#   rounding in any order; sigmoid is float64 rounded once in both);
# - everyone else within a forward-error bound: each element passes through at most K = 12 rounded operations per
#   step (gradient: product, sum, bias add, sigmoid, subtract, seed multiply; update: Adam's longest chain, 10 ops,
#   then the stores to W and P); a backend that orders, fuses (FMA) or flushes differently can change each by one
#   rounding, a relative 2u of the narrowest format the op touches (u = max(u_P, u_C, u_U)); the problem is small and
#   the lr (0.05) keeps the iteration non-expansive (|1 - lr x^2| < 1, x^2 <= 2.25), so per-step differences add
#   up over T steps: max|p - p_ref| <= 2 T (K + 1) u max|p_ref|. (Measured: at most 2.6 u after 16 steps, JAX on
#   fp64 linreg Adam, against 416 u allowed: the bound is a worst case.)
BATCH1_STEPS = 16
BATCH1_ROWS = (np.arange(BATCH1_STEPS) % 4).reshape(-1, 1)
BATCH1_DATA = {
    "linreg-1-feature": crafted("linreg", [[0.5], [1.5], [-0.75], [1.0]], [0.375, -0.25, 0.75, 0.125],
                                [0.25, -0.5], batches=BATCH1_ROWS),
    "logreg-2-features": crafted("logreg", TINY_X, TINY_Y, TINY_INIT, batches=BATCH1_ROWS),
}
K_OPS = 12


def batch1_tolerance(pol: Policy) -> float:
    u = max(pol.params.unit_roundoff, pol.compute.unit_roundoff, pol.update.unit_roundoff)
    return 2 * BATCH1_STEPS * (K_OPS + 1) * u


def numba_promises_bits(data: str, pol: Policy) -> bool:
    return data == "linreg-1-feature" or pol.compute.precision < FP32.precision


_BATCH1_REFERENCE: dict = {}


def batch1_reference(data: str, opt: str, policy: str) -> Trajectory:
    key = (data, opt, policy)
    if key not in _BATCH1_REFERENCE:
        _BATCH1_REFERENCE[key] = run("numpy", BATCH1_DATA[data], make_optimizer(opt, lr=0.05), PRESETS[policy],
                                     BATCH1_STEPS, record_every=4)
    return _BATCH1_REFERENCE[key]


@pytest.mark.parametrize("opt", ["sgd", "adam"])
@pytest.mark.parametrize("data", BATCH1_DATA)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_one_row_batches_train_and_agree(backend, data, opt):
    failures = []
    for name, pol in PRESETS.items():
        ref = batch1_reference(data, opt, name)
        got = run(backend, BATCH1_DATA[data], make_optimizer(opt, lr=0.05), pol, BATCH1_STEPS, record_every=4)
        assert ref.diverged_at is None and got.diverged_at is None, (name, ref.diverged_at, got.diverged_at)
        assert np.isfinite(got.params).all() and got.record_steps.tolist() == [0, 4, 8, 12, 16]
        if backend == "numba" and numba_promises_bits(data, pol) or backend == "numpy":
            if not same_bits(got.params, ref.params):
                failures.append(f"{name}: not bit-identical to numpy")
            continue
        err = np.max(np.abs(got.params - ref.params)) / np.max(np.abs(ref.params))
        if not err <= batch1_tolerance(pol):
            failures.append(f"{name}: max relative difference {err:.3g} > {batch1_tolerance(pol):.3g}")
    assert not failures, "\n".join(failures)


def test_empty_batches_are_refused_naming_the_value():
    """batch_size = 0: an empty batch has no mean gradient. RunSpec refuses it, and so do make_dataset and the
    rules' host scalars (which a backend calls with the dataset's batch size)."""
    with pytest.raises(SpecError, match="batch size 0"):
        RunSpec(problem="logreg", optimizer=sgd(0.1), policy=PRESETS["fp32"], batch_size=0)
    with pytest.raises(SpecError, match="batch size 0"):
        make_dataset("logreg", steps=3, batch_size=0)
    with pytest.raises(SpecError, match="batch size 0"):
        step_rules.host_scalars(PRESETS["fp32"], sgd(0.1), steps=3, batch_size=0)


# -- 7. every policy field combination the grammar accepts ----------------------------------------------------------
FORMAT_NAMES = tuple(FORMATS)  # fp64, fp32, fp16, bf16, fp8_e4m3fn, fp8_e5m2
GRAMMAR = {  # None: the field left out (parse_policy's default)
    "p": FORMAT_NAMES,
    "c": (None, *FORMAT_NAMES),
    "a": (None, "fp32", "fp64", "fp16", "bf16"),  # only fp32 / fp64 accumulate: fp16, bf16 must be refused
    "s": (None, *FORMAT_NAMES),
    "m": (None, *FORMAT_NAMES),
    "ls": (None, "1024", "32768", "3", "inf"),  # powers of two only: 3 and inf must be refused
}


def policy_text(combo: dict) -> str:
    return ",".join(f"{key}={value}" for key, value in combo.items() if value is not None)


def grammar_accepts(combo: dict) -> bool:
    """The grammar's acceptance rule, stated independently of parse_policy: the accumulator (default: wider of
    compute and fp32) is fp32 or fp64 and not narrower than compute; a loss scale is a finite power of two."""
    compute = get_format(combo["c"] or combo["p"])
    accum = get_format(combo["a"]) if combo["a"] else wider(compute, FP32)
    if accum.name not in ("fp32", "fp64") or wider(accum, compute) is not accum:
        return False
    if combo["ls"] is not None:
        mantissa, _ = math.frexp(float(combo["ls"]))
        return math.isfinite(float(combo["ls"])) and mantissa == 0.5
    return True


def all_combinations():
    keys = tuple(GRAMMAR)
    return [dict(zip(keys, values)) for values in itertools.product(*GRAMMAR.values())]


def test_every_grammar_combination_parses_or_is_refused_with_a_spec_error():
    """The full product (51,450 strings): each is a Policy exactly when the acceptance rule says so, else a
    SpecError (never another exception), and an accepted one prints back to an equal policy."""
    accepted = 0
    for combo in all_combinations():
        text = policy_text(combo)
        if grammar_accepts(combo):
            pol = parse_policy(text)
            assert parse_policy(str(pol)) == pol, text
            accepted += 1
        else:
            with pytest.raises(SpecError):
                parse_policy(text)
    assert accepted > 0  # 17,493 with today's six formats


# The update-math key u (Policy.update_math), crossed with the keys it is checked against (p, s, m; c, a, ls left
# out: u is not checked against them). Acceptance, stated independently of parse_policy: u ranks at least as high as
# wider(weights, state) in formats.wider's order (precision, then exponent bits), weights = m or p, state = s or p.
U_GRAMMAR = {"p": FORMAT_NAMES, "s": (None, *FORMAT_NAMES), "m": (None, *FORMAT_NAMES), "u": (None, *FORMAT_NAMES)}


def u_accepts(combo: dict) -> bool:
    if combo["u"] is None:
        return True
    rank = lambda name: (get_format(name).precision, get_format(name).exponent_bits)  # noqa: E731
    weights, state = combo["m"] or combo["p"], combo["s"] or combo["p"]
    return rank(combo["u"]) >= max(rank(weights), rank(state))


def test_every_u_combination_parses_or_is_refused_with_one_spec_error_line():
    accepted = refused = 0
    for values in itertools.product(*U_GRAMMAR.values()):
        combo = dict(zip(U_GRAMMAR, values))
        text = policy_text(combo)
        if u_accepts(combo):
            pol = parse_policy(text)
            assert parse_policy(str(pol)) == pol and str(pol).endswith(f",u={combo['u']}") == (combo["u"] is not None)
            assert pol.update == (get_format(combo["u"]) if combo["u"] else wider(pol.weights, pol.state))
            accepted += 1
        else:
            with pytest.raises(SpecError, match=rf"^update math format {combo['u']} is narrower than \S+ = wider\("
                                                 rf"weights \S+, state \S+\)$"):
                parse_policy(text)
            refused += 1
    assert accepted and refused


# Which accepted combinations are trained: the full accepted product is 17,493 policies, and JAX compiles once per
# policy (~0.4 s here), so the runs take a seeded random sample of 24 accepted combinations, extended by the first
# accepted combination holding each (field, value) not yet covered (so every value of every field, "left out"
# included, is trained at least once), plus the presets. Fixed seed: the same list every run.
def trained_policies() -> dict[str, Policy]:
    accepted = [combo for combo in all_combinations() if grammar_accepts(combo)]
    chosen = random.Random(9).sample(accepted, 24)
    for key, values in GRAMMAR.items():
        for value in values:
            if not any(combo[key] == value for combo in chosen):
                candidates = [combo for combo in accepted if combo[key] == value]
                if candidates:  # refused values (a=fp16, ls=3, ...) have none
                    chosen.append(candidates[0])
    policies = {policy_text(combo): parse_policy(policy_text(combo)) for combo in chosen}
    policies.update(PRESETS)
    # u= (update math): each with S narrower than U, so the moments take the store-once rule
    for text in ("p=bf16,c=bf16,a=fp32,s=bf16,m=fp32,u=fp32", "p=fp16,c=fp16,a=fp32,s=fp8_e5m2,u=fp64",
                 "p=fp8_e4m3fn,c=fp8_e4m3fn,a=fp32,s=fp8_e4m3fn,u=bf16"):
        policies[text] = parse_policy(text)
    return policies


TRAINED = trained_policies()
PRODUCT_STEPS = 4


def test_trained_sample_covers_every_accepted_value():
    """Every value of every field that some accepted policy has (left-out fields included) is trained."""
    possible = {(key, combo[key]) for combo in all_combinations() if grammar_accepts(combo) for key in GRAMMAR}
    covered = {(key, value) for text in TRAINED if "=" in text for key, value in _fields(text).items()}
    assert possible <= covered, sorted(possible - covered, key=str)
    assert {("a", "fp16"), ("a", "bf16"), ("ls", "3"), ("ls", "inf")}.isdisjoint(possible)


def _fields(text: str) -> dict:
    given = dict(item.split("=") for item in text.split(","))
    return {key: given.get(key) for key in GRAMMAR}


def product_optimizer(index: int) -> OptimizerSpec:
    """Adam and SGD with momentum alternately (every state format is then read and stored by both)."""
    return make_optimizer("adam", lr=0.01) if index % 2 == 0 else make_optimizer("sgd", lr=0.05, momentum=0.9)


_PRODUCT_REFERENCE: dict = {}


def product_reference(index: int, name: str) -> Trajectory:
    if name not in _PRODUCT_REFERENCE:
        _PRODUCT_REFERENCE[name] = run("numpy", TINY, product_optimizer(index), TRAINED[name], PRODUCT_STEPS,
                                       record_every=PRODUCT_STEPS)
    return _PRODUCT_REFERENCE[name]


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_every_policy_field_runs_and_backends_agree_on_the_outcome(backend):
    """Each trained policy, 4 steps of logreg on TINY: the run is a result (status ok or diverged), its status and
    diverged_at are numpy's, and params are finite when it did not diverge."""
    failures = []
    for index, (name, pol) in enumerate(TRAINED.items()):
        ref = product_reference(index, name)
        try:
            got = run(backend, TINY, product_optimizer(index), pol, PRODUCT_STEPS, record_every=PRODUCT_STEPS)
        except Exception as exc:  # noqa: BLE001 - a crash is reported with the policy that caused it
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        if got.diverged_at != ref.diverged_at:
            failures.append(f"{name}: diverged_at {got.diverged_at}, numpy {ref.diverged_at}")
        elif got.diverged_at is None and not np.isfinite(got.params).all():
            failures.append(f"{name}: not diverged but params not finite")
    assert not failures, f"{len(failures)} of {len(TRAINED)} policies:\n" + "\n".join(failures)


# -- 8. the rules' structure: each loop makes the chain's conversions --------------------------------------------------
STRUCTURE_POLICIES = {
    "all-distinct": parse_policy("p=bf16,c=fp16,a=fp32,s=fp8_e5m2,m=fp32,ls=1024"),  # S != U: moments round-trip
    "fp16-mixed": FP16_MIXED,
    # u= given, S narrower than U: no round trip, each moment rounded to S once when stored
    "all-distinct-u": parse_policy("p=bf16,c=fp16,a=fp32,s=fp8_e5m2,m=bf16,ls=1024,u=fp32"),
    "torch-bf16": PRESETS["torch-bf16"],
}


class Recorder:
    """Wraps a backend's ``convert`` and records the (src, dst) of each call."""

    def __init__(self, convert: Callable):
        self.convert, self.calls = convert, []

    def __call__(self, x, src, dst):
        self.calls.append((src, dst))
        return self.convert(x, src, dst)


@pytest.mark.parametrize("accum_steps", [1, 3])
@pytest.mark.parametrize("opt", ["adam", "sgd-momentum", "sgd"])
@pytest.mark.parametrize("policy", STRUCTURE_POLICIES)
def test_numpy_loop_makes_the_chains_conversions(policy, opt, accum_steps, monkeypatch):
    import precision.backends.numpy_backend as numpy_backend
    pol = STRUCTURE_POLICIES[policy]
    optimizer = {"adam": make_optimizer("adam", lr=0.01), "sgd-momentum": sgd(0.05, 0.9), "sgd": sgd(0.05)}[opt]
    recorder = Recorder(numpy_backend.convert)
    monkeypatch.setattr(numpy_backend, "convert", recorder)
    steps = 3
    run("numpy", TINY, optimizer, pol, steps, accum_steps=accum_steps)
    per_step = step_rules.conversion_sequence(pol, state_size(optimizer), accum_steps)
    # the first two conversions are the data's (X and targets, fp64 -> C, once up front)
    assert recorder.calls[:2] == [(FP64, pol.compute)] * 2
    assert recorder.calls[2:] == per_step * steps


@pytest.mark.parametrize("policy", STRUCTURE_POLICIES)
@pytest.mark.skipif(not AVAILABILITY["jax"].available, reason=f"jax unavailable: {AVAILABILITY['jax'].reason}")
def test_jax_step_makes_the_chains_conversions(policy, monkeypatch):
    from precision.backends.jax_backend import loop
    pol, opt = STRUCTURE_POLICIES[policy], make_optimizer("adam", lr=0.01)
    recorder = Recorder(loop.convert)
    monkeypatch.setattr(loop, "convert", recorder)
    loop.clear_compile_cache()  # trace anew, with the recorder
    try:
        run("jax", TINY, opt, pol, 3)
    finally:
        loop.clear_compile_cache()
    assert recorder.calls == step_rules.conversion_sequence(pol, state_size(opt))  # traced once: one step


def hostile(fmt, n: int, rng, extremes: bool = True) -> np.ndarray:
    """Values of ``fmt`` (float64): a spread around 0.5 with zeros and subnormals, and with ``extremes`` the top of
    the range and values past fp16's max (finite in wider formats: the params of a mixed policy overflow there)."""
    special = [0.0, -0.0, fmt.smallest_subnormal, fmt.tiny, 1.0]
    if extremes:
        special += [fmt.max, -fmt.max, 65504.0, 65519.0, 65520.0, 7e4, -7e4]
    with np.errstate(over="ignore"):
        return round_to(np.concatenate([special, rng.standard_normal(n - len(special)) * 0.5]), fmt)


@pytest.mark.parametrize("opt", ["adam", "sgd-momentum"])
@pytest.mark.parametrize("policy", ["fp16-mixed", "fp16", "bf16-mixed", "fp8-mixed", "all-distinct", "all-distinct-u",
                                    "torch-bf16"])
@pytest.mark.skipif(not AVAILABILITY["numba"].available, reason=f"numba unavailable: {AVAILABILITY['numba'].reason}")
def test_numba_update_follows_the_reference_step(policy, opt):
    """numba's per-element update (loops.apply_update) against step_rules.reference_step, same gradients, 4 steps:
    weights, state, params bit for bit, and the same divergence verdict each step, including steps where only the
    params overflow (fp32 master weights pushed past fp16's max)."""
    from precision.backends.numba_backend import update_formats
    from precision.backends.numba_backend.loops import apply_update
    from precision.backends.numba_backend.rounding import format_code
    from precision.backends.numba_backend.update import optimizer_flags

    pol = STRUCTURE_POLICIES.get(policy) or PRESETS[policy]
    optimizer = make_optimizer("adam", lr=0.01) if opt == "adam" else sgd(0.05, 0.9)
    rng = np.random.default_rng(7)
    n, steps = 64, 4
    scalars = step_rules.host_scalars(pol, optimizer, steps, batch_size=1)
    w, p, st = step_rules.initial_values(hostile(pol.weights, n, rng), pol, optimizer)
    w64, p64 = w.astype(np.float64), p.astype(np.float64)
    s0, s1 = np.zeros(n), np.zeros(n)
    codes = tuple(format_code(f) for f in update_formats(pol))
    verdicts = []
    for step in range(1, steps + 1):
        # steps 1 and 3: finite gradients, so the verdict hangs on the params alone where the weights' extremes
        # overflow P; steps 2 and 4: extreme gradients (inf in narrow formats) too
        g = hostile(pol.compute, n, rng, extremes=step % 2 == 0) * 1e-2
        with np.errstate(all="ignore"):
            g = round_to(g, pol.compute)
            ref = step_rules.reference_step(pol, optimizer, step, scalars.table[step - 1], w, st,
                                            g.astype(pol.compute.dtype), scalars.unscale)
        finite = apply_update(step, scalars.table[step - 1], g, w64, s0, s1, p64, codes, optimizer_flags(optimizer),
                              1.0 if scalars.unscale is None else scalars.unscale)
        assert same_bits(w64, ref.weights.astype(np.float64)), f"weights differ at step {step}"
        assert same_bits(p64, ref.params.astype(np.float64)), f"params differ at step {step}"
        for mine, theirs in zip((s0, s1), ref.state):
            assert same_bits(mine, theirs.astype(np.float64)), f"state differs at step {step}"
        assert bool(finite) == bool(ref.finite), f"divergence verdict differs at step {step}"
        verdicts.append(bool(finite))
        w, st = ref.weights, ref.state
    if pol.params.max < pol.weights.max:
        assert not all(verdicts)  # the hostile values include weights past the params' max: the rule fired


# -- 9. mutation check: a backend that checks only the weights fails this suite ------------------------------------

def weights_only(xp, weights, params):
    return xp.all(xp.isfinite(weights))


def jax_cache_clear() -> Callable:
    from precision.backends.jax_backend.loop import clear_compile_cache
    return clear_compile_cache


@pytest.mark.parametrize("case", PARAMS_CASES, ids=str)
@pytest.mark.parametrize("backend", [b for b in ("numpy", "jax") if b in AVAILABLE])
def test_the_suite_catches_a_weights_only_divergence_check(backend, case, monkeypatch):
    """Replace the shared divergence rule by a weights-only check (numba's old bug): the params cases then fail."""
    check_case(case, backend)  # passes with the real rule
    monkeypatch.setattr(step_rules, "all_finite", weights_only)
    clear = jax_cache_clear() if backend == "jax" else (lambda: None)
    clear()  # the JAX program must be traced again with the mutated rule
    try:
        with pytest.raises(AssertionError, match="diverged_at"):
            check_case(case, backend)
    finally:
        clear()


def reversed_sum(convert, pol, micro_gradients):
    return step_rules.accumulate(convert, pol, list(micro_gradients)[::-1])


def test_the_suite_catches_micro_batches_summed_out_of_order(monkeypatch):
    """The numpy loop's accumulation (step_rules.accumulate) replaced by one that sums the last micro-batch first:
    the fp32 order case then fails (1 + 2^-23 instead of 1), while the fp64 one, exact in any order, still passes."""
    fp32_case, fp64_case = ACCUM_CASES[-2:]
    check_case(fp32_case, "numpy")
    import precision.backends.numpy_backend as numpy_backend
    monkeypatch.setattr(numpy_backend, "accumulate", reversed_sum)
    with pytest.raises(AssertionError, match="params"):
        check_case(fp32_case, "numpy")
    check_case(fp64_case, "numpy")
