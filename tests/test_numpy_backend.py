"""The numpy backend: determinism, dtypes, per-op rounding, and the low-precision failure modes as measured results.

The per-op tests recompute the backend's arithmetic in float64 with ``round_to`` after every operation. For + - * /
and sqrt that is exactly one correct rounding: float64 carries 53 >= 2p + 2 bits for p <= 24 (fp32, bf16, fp16,
fp8), so rounding the float64 result again cannot double-round (the fact numpy float16 and ml_dtypes rely on when
they compute in float32 and round back). Products of two values of <= 24-bit formats are exact in float64.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np
import pytest

import precision.backends.numpy_backend as numpy_backend
from precision.backends.numpy_backend import targets_for
from precision.backends.numpy_backend.models import gradient
from precision.backends.numpy_backend.ops import FormatOps, convert
from precision.backends.numpy_backend.update import update
from precision.drift import MAX_BITS
from precision.formats import FORMATS, Format, round_to, to_format
from precision.optim import SCALAR_COLUMNS, make_optimizer, scalar_table, state_size
from precision.policy import PRESETS, parse_policy
from precision.problems import PROBLEMS
from precision.runner import _Cache, dataset_for, run_one, train
from precision.spec import RunSpec

from optimizer_cases import OPTIMIZER_CASES, optimizer

FP64, FP32 = FORMATS["fp64"], FORMATS["fp32"]
COL = {name: i for i, name in enumerate(SCALAR_COLUMNS)}

# Every preset, plus policies whose optimizer state is stored narrower than the update format (the store_state path),
# including a state format that is not a subset of the update format (bf16 values need not fit in fp16's range).
POLICIES = {**PRESETS,
            "state-bf16": parse_policy("p=fp32,s=bf16"),
            "state-e4m3": parse_policy("p=bf16,s=fp8_e4m3fn"),
            "fp16-state-bf16": parse_policy("p=fp16,s=bf16")}


def spec(problem="logreg", opt="adam", policy="fp32", **kw) -> RunSpec:
    opt = optimizer(opt) if isinstance(opt, str) else opt
    pol = POLICIES[policy] if isinstance(policy, str) else policy
    return RunSpec(problem=problem, optimizer=opt, policy=pol, **kw)


def bits_equal(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Element mask: same bit pattern, or both NaN."""
    u = np.dtype(f"u{got.dtype.itemsize}")
    with np.errstate(invalid="ignore"):
        both_nan = np.isnan(got.astype(np.float64)) & np.isnan(want.astype(np.float64))
    return (got.view(u) == want.view(u)) | both_nan


# ------------------------------------------------------------------------------------------------------------------
# Determinism and the reference
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("policy, opt", [("fp64", "adam"), ("fp32", "adamw"), ("fp16", "sgd-momentum"),
                                         ("bf16", "adam"), ("bf16-mixed", "sgd-nesterov-wd")])
def test_same_spec_twice_same_fingerprint(policy, opt):
    s = spec("mlp", opt, policy, steps=30, record_every=10, batch_size=64)
    first, second = run_one(s), run_one(s)  # separate caches: the dataset and reference are rebuilt too
    assert first.status == second.status == "ok"
    assert first.fingerprint == second.fingerprint
    assert first.drift == second.drift


@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("opt", ["sgd-momentum", "adamw"])
def test_fp64_against_its_own_reference_is_exact(problem, opt):
    result = run_one(spec(problem, opt, "fp64", steps=20, record_every=5))
    assert result.status == "ok"
    assert result.rel_l2 == 0.0 and result.bits_of_agreement == MAX_BITS == 53
    assert result.max_ulp == 0.0 and result.loss_gap == 0.0
    assert result.flip_rate == (None if problem == "linreg" else 0.0)
    assert [p["bits"] for p in result.drift] == [53.0] * 5  # steps 0, 5, 10, 15, 20


# ------------------------------------------------------------------------------------------------------------------
# Every problem x optimizer x policy runs, with arrays in the policy's formats
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("problem", PROBLEMS)
def test_every_optimizer_and_policy_runs_in_its_dtypes(problem, monkeypatch):
    """Wrap the backend's gradient and update to check the dtype of every array that crosses them."""
    seen = []

    def checked_gradient(prob, ops, params, X, targets, scale, layout):
        for arr in (params, X, targets):
            assert arr.dtype == ops.fmt.dtype
        assert np.asarray(scale).dtype == ops.fmt.dtype
        g = gradient(prob, ops, params, X, targets, scale, layout)
        assert g.dtype == ops.fmt.dtype and g.shape == params.shape
        seen.append(("gradient", ops.fmt.name))
        return g

    def checked_update(opt, step, scalars, w, g, state, store_state, split=False):
        dtype = current["policy"].update.dtype
        assert scalars.dtype == w.dtype == g.dtype == dtype
        assert all(s.dtype == dtype for s in state)
        assert split == current["policy"].kahan  # the split form (base, delta) only for Kahan updates
        *w_new, state_new = update(opt, step, scalars, w, g, state, store_state, split)
        assert all(x.dtype == dtype for x in w_new) and all(s.dtype == dtype for s in state_new)
        assert len(state_new) == state_size(opt)
        seen.append(("update", opt.name))
        return (*w_new, state_new)

    monkeypatch.setattr(numpy_backend, "gradient", checked_gradient)
    monkeypatch.setattr(numpy_backend, "update", checked_update)
    current = {}
    steps_run = 0
    for case in OPTIMIZER_CASES:
        for policy in POLICIES.values():
            s = spec(problem, case, policy, steps=3, record_every=2, batch_size=32)
            current["policy"] = policy
            traj = train(s)
            assert traj.final_params.dtype == policy.params.dtype
            assert traj.params.dtype == np.float64 and traj.params.shape[1] == traj.final_params.size
            k = traj.diverged_at  # pure fp16 Adam diverges at step 1 (see below); a result, not an exception
            assert traj.record_steps.tolist() == ([0, 2, 3] if k is None else [m for m in (0, 2) if m < k] + [k])
            # The recorded float64 params are the exact values of the stored ones.
            assert np.array_equal(traj.params[-1], traj.final_params.astype(np.float64), equal_nan=True)
            steps_run += 3 if k is None else k
    assert len(seen) == 2 * steps_run  # every step went through both wrappers


# ------------------------------------------------------------------------------------------------------------------
# Per-op rounding: gradient and update against float64 emulations
# ------------------------------------------------------------------------------------------------------------------

def fp32_matmul(a64: np.ndarray, b64: np.ndarray, transpose_a=False) -> np.ndarray:
    """The policy's accumulator (a=fp32): float32 operands, float32 BLAS, as float64. Operand layouts match the
    backend's (an F-ordered transpose), so BLAS takes the same path."""
    a32 = a64.astype(np.float32)
    a32 = a32.T if transpose_a else a32
    return (a32 @ b64.astype(np.float32)).astype(np.float64)


def emulate_logreg_gradient(X, w, b, t, scale, c: Format):
    """logreg's gradient op by op: every elementwise result rounded to the compute format c; dot products and the
    bias sum in the fp32 accumulator, rounded once to c; the sigmoid in float64, rounded once."""
    R = lambda x: round_to(x, c)  # noqa: E731
    z = R(R(fp32_matmul(X, w)) + b)
    out = R(1.0 / (1.0 + np.exp(-z)))
    delta = R(R(out - t) * scale)
    gw = R(fp32_matmul(X, delta, transpose_a=True))
    gb = R(np.sum(delta.astype(np.float32), dtype=np.float32, keepdims=True).astype(np.float64))
    return np.concatenate([gw, gb])


@pytest.mark.parametrize("compute", ["fp16", "bf16", "fp8_e4m3fn"])
def test_logreg_gradient_is_rounded_after_every_op(compute):
    c = FORMATS[compute]
    s = spec("logreg", "sgd", parse_policy(f"p={compute}"), steps=4, batch_size=128)
    ds = dataset_for(s)
    rows = ds.batch(1)
    X = round_to(ds.X_train[rows], c)
    t = round_to(targets_for(ds, ds.y_train)[rows], c)
    rng = np.random.default_rng(3)
    params = round_to(ds.init_params + 0.1 * rng.standard_normal(ds.n_params), c)  # nonzero bias too
    ops = FormatOps(c, FP32)
    scale = ops.scalar(1.0 / ds.batch_size)
    got = gradient("logreg", ops, params.astype(c.dtype), X.astype(c.dtype), t.astype(c.dtype), scale, ds.layout)
    assert got.dtype == c.dtype
    want = emulate_logreg_gradient(X, params[:-1], params[-1:], t, float(scale), c)
    same = bits_equal(got, want.astype(c.dtype))
    assert same.all(), (np.flatnonzero(~same), got[~same], want[~same])
    assert np.any(got.astype(np.float64) != 0)


def test_fp32_accumulation_is_within_its_error_bound():
    """The accumulator is fp32 in BLAS order, not exact: |computed - exact| <= gamma_n sum|a_k b_k| with
    gamma_n = n u32 / (1 - n u32) (Higham, Accuracy and Stability, 3.1), n = the summed length. The per-op test
    above takes the fp32 products as given; this checks they are what an fp32 accumulation can be."""
    s = spec("logreg", "sgd", "fp16", steps=1, batch_size=128)
    ds = dataset_for(s)
    X = round_to(ds.X_train[ds.batch(1)], FORMATS["fp16"])
    w = round_to(ds.init_params[:-1], FORMATS["fp16"])
    n = X.shape[1]
    u32 = FP32.unit_roundoff
    gamma = n * u32 / (1 - n * u32)
    computed = fp32_matmul(X, w)
    exact = X @ w  # products exact in float64; float64 summation error (gamma_n u64) is negligible next to u32
    assert np.all(np.abs(computed - exact) <= gamma * (np.abs(X) @ np.abs(w)))
    assert np.any(computed != exact)  # and it really is a float32 accumulation


def emulate_update(opt, step, row, w, g, state, U: Format, S: Format):
    """precision.optim's documented update, op by op in float64, round_to(U) after every op, moments stored in S."""
    R = lambda x: round_to(x, U)  # noqa: E731
    store = (lambda x: x) if S == U else (lambda x: round_to(round_to(x, S), U))  # noqa: E731
    s = {name: row[i] for name, i in COL.items()}
    with np.errstate(all="ignore"):
        if opt.name == "adamw":
            w = R(w * s["decay"])
        elif opt.weight_decay:
            g = R(g + R(s["weight_decay"] * w))
        if opt.is_adam:
            m, v = state
            m = store(R(R(s["beta1"] * m) + R(s["one_minus_beta1"] * g)))
            v = store(R(R(s["beta2"] * v) + R(s["one_minus_beta2"] * R(g * g))))
            denom = R(R(R(np.sqrt(v)) / s["sqrt_bc2"]) + s["eps"])
            return R(w - R(R(s["step_size"] * m) / denom)), [m, v]
        if opt.momentum:
            buf = store(g if step == 1 else R(R(s["momentum"] * state[0]) + g))
            d = R(g + R(s["momentum"] * buf)) if opt.nesterov else buf
            return R(w - R(s["lr"] * d)), [buf]
        return R(w - R(s["lr"] * g)), []


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("case", OPTIMIZER_CASES)
def test_update_is_rounded_after_every_op(case, policy):
    """Three steps on hostile inputs (gradients from 1e-7 to 10, exact zeros), each step compared bit for bit."""
    opt = optimizer(case)
    pol = POLICIES[policy]
    U, S = pol.update, pol.state
    rng = np.random.default_rng([5, list(POLICIES).index(policy)])
    n = 4096
    table = scalar_table(opt, 3, U)
    w = to_format(rng.standard_normal(n), U)
    state = [np.zeros(n, dtype=U.dtype) for _ in range(state_size(opt))]
    store_state = (lambda x: x) if S == U else (lambda x: convert(convert(x, U, S), S, U))  # as the backend does
    for step in (1, 2, 3):
        g64 = rng.standard_normal(n) * 10.0 ** rng.uniform(-7, 1, n)
        g64[::97] = 0.0
        g = to_format(g64, U)
        with np.errstate(all="ignore"):  # as in the backend's loop: inf / NaN (fp16 eps = 0) are results here
            w_new, state_new = update(opt, step, table[step - 1].astype(U.dtype), w, g, state, store_state)
        want_w, want_state = emulate_update(opt, step, table[step - 1], w.astype(np.float64), g.astype(np.float64),
                                            [x.astype(np.float64) for x in state], U, S)
        assert w_new.dtype == U.dtype and all(x.dtype == U.dtype for x in state_new)
        assert bits_equal(w_new, want_w.astype(U.dtype)).all(), step
        for got_x, want_x in zip(state_new, want_state):
            assert bits_equal(got_x, want_x.astype(U.dtype)).all(), step
        w, state = w_new, state_new
    assert np.any(w.astype(np.float64) != 0)


# ------------------------------------------------------------------------------------------------------------------
# Failure modes as measured results
# ------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("problem", PROBLEMS)
def test_pure_fp16_adam_diverges_as_a_result(problem):
    result = run_one(spec(problem, "adam", "fp16", steps=50))
    assert result.status == "diverged" and result.diverged_at == 1
    assert result.bits_of_agreement == 0.0 and result.rel_l2 == float("inf")
    assert result.fingerprint is not None and result.message == ""


def test_pure_fp16_adam_divergence_cause():
    """Why step 1 diverges: eps = 1e-8 rounds to 0 in fp16 (half the smallest subnormal is 2^-25 ~ 3e-8), and
    v = (1 - b2) g^2 underflows to 0 for small gradients, so denom = sqrt(0) / sqrt(bc2) + 0 = 0 and m / 0 is inf
    (or NaN where g = 0). The non-finite weights are exactly the elements where v underflowed."""
    fp16 = FORMATS["fp16"]
    assert np.float16(1e-8) == 0 and 1e-8 < fp16.smallest_subnormal / 2
    s = spec("logreg", "adam", "fp16", steps=1)
    ds = dataset_for(s)
    ops = FormatOps(fp16, FP32)
    X = to_format(ds.X_train[ds.batch(1)], fp16)
    T = to_format(targets_for(ds, ds.y_train)[ds.batch(1)], fp16)
    w = to_format(ds.init_params, fp16)
    g = gradient("logreg", ops, w, X, T, ops.scalar(1.0 / ds.batch_size), ds.layout)
    table = scalar_table(s.optimizer, 1, fp16).astype(np.float16)
    assert table[0, COL["eps"]] == 0
    with np.errstate(divide="ignore", invalid="ignore"):  # the division by zero is the point
        w1, (m1, v1) = update(s.optimizer, 1, table[0], w, g, [np.zeros_like(w), np.zeros_like(w)])
    underflowed = v1 == 0
    assert np.array_equal(~np.isfinite(w1), underflowed)
    assert np.any(underflowed & (g != 0))  # a real underflow, not just a zero gradient
    # The same run with an eps that fp16 can hold (1e-4 > fp16 tiny 6.1e-5) trains.
    fixed = run_one(dataclasses.replace(s, optimizer=make_optimizer("adam", eps=1e-4), steps=50))
    assert fixed.status == "ok" and fixed.diverged_at is None


@pytest.mark.parametrize("problem", ["logreg", "softmax", "mlp"])
@pytest.mark.parametrize("opt", ["sgd-momentum", "adam"])
def test_pure_bf16_stagnates_below_bf16_mixed(problem, opt):
    cache = _Cache()
    pure = run_one(spec(problem, opt, "bf16", steps=200), cache)
    mixed = run_one(spec(problem, opt, "bf16-mixed", steps=200), cache)
    assert pure.status == mixed.status == "ok"
    assert pure.bits_of_agreement < mixed.bits_of_agreement


def test_pure_bf16_stagnation_cause():
    """Why: bf16 weights lose every update smaller than half the spacing to the neighbouring bf16 value in the
    direction of the move (bf16(1 - 0.000999) == 1: the spacing below 1 is 2^-8, so the half is 2^-9). With plain
    SGD (no state) the trajectory, recorded every step, determines each step; replaying it shows that exactly the
    predicted updates were lost, and a sizeable share of them. fp32 master weights (bf16-mixed) accumulate them."""
    bf16 = FORMATS["bf16"]
    assert ml_dtypes.bfloat16(1 - 0.000999) == 1 and ml_dtypes.bfloat16(1) - ml_dtypes.bfloat16(0.000999) == 1
    assert np.float16(1) - np.float16(2e-4) == 1  # fp16's version of it
    s = spec("logreg", make_optimizer("sgd", momentum=0.0), "bf16", steps=200, record_every=1)
    ds = dataset_for(s)
    traj = train(s, ds)
    ops = FormatOps(bf16, FP32)
    X = to_format(ds.X_train, bf16)
    T = to_format(targets_for(ds, ds.y_train), bf16)
    lr = ml_dtypes.bfloat16(scalar_table(s.optimizer, 1, bf16)[0, COL["lr"]])
    scale = ops.scalar(1.0 / ds.batch_size)
    lost = moved = 0
    for t in range(s.steps):
        p = traj.params[t].astype(ml_dtypes.bfloat16)
        rows = ds.batch(t + 1)
        d = lr * gradient("logreg", ops, p, X[rows], T[rows], scale, ds.layout)  # the bf16 step, as the backend
        assert np.array_equal((p - d).astype(np.float64), traj.params[t + 1])  # replay is exact
        p64, d64 = p.astype(np.float64), d.astype(np.float64)
        bits = p.view(np.uint16)
        away = np.sign(-d64) == np.sign(p64)  # the move increases |p|: next pattern up, else down
        neighbour = np.where(away | (p64 == 0), bits + 1, bits - 1).astype(np.uint16).view(ml_dtypes.bfloat16)
        gap = np.abs(neighbour.astype(np.float64) - p64)
        tie_stays = (np.abs(d64) == gap / 2) & (bits % 2 == 0)  # ties go to the even pattern
        predicted_lost = (d64 != 0) & ((np.abs(d64) < gap / 2) | tie_stays)
        actually_lost = (d64 != 0) & (traj.params[t + 1] == p64)
        assert np.array_equal(actually_lost, predicted_lost), t
        lost += int(actually_lost.sum())
        moved += int((d64 != 0).sum())
    assert lost / moved > 0.1  # measured here: 1,108 of 6,600 nonzero updates (17%)
    cache = _Cache()
    pure = run_one(s, cache)
    mixed = run_one(dataclasses.replace(s, policy=PRESETS["bf16-mixed"]), cache)
    assert pure.bits_of_agreement < mixed.bits_of_agreement


def test_narrow_params_overflow_is_divergence_at_that_step(monkeypatch):
    """diverged_at is the first step whose params are not finite: fp16 params overflow (> 65504) while the fp32
    master copy is still finite. (In real runs the fp16 gradient usually overflows first; an update that pushes one
    master weight to 7e4 at step 3 isolates the rule.)"""
    def pushing_update(opt, step, scalars, w, g, state, store_state):
        w, state = update(opt, step, scalars, w, g, state, store_state)
        if step == 3:
            w = w.copy()
            w[0] = np.float32(7e4)  # finite in fp32, inf in fp16
        return w, state

    monkeypatch.setattr(numpy_backend, "update", pushing_update)
    s = spec("linreg", "sgd", "fp16-mixed", steps=10, record_every=1)
    traj = train(s)
    assert traj.diverged_at == 3 and traj.record_steps.tolist() == [0, 1, 2, 3]
    assert np.isfinite(traj.params[2]).all()
    assert traj.params[3][0] == np.inf and np.isfinite(traj.params[3][1:]).all()


# ------------------------------------------------------------------------------------------------------------------
# Runner-level contracts
# ------------------------------------------------------------------------------------------------------------------

def test_one_failing_configuration_does_not_lose_the_others():
    cache = _Cache()
    bad = run_one(spec("logreg", "adam", "fp32", data="digits", steps=5), cache)  # digits has 10 classes
    good = run_one(spec("logreg", "adam", "fp32", steps=5), cache)
    unavailable = run_one(spec("logreg", "adam", "fp32", steps=5, device="gpu"), cache)
    assert bad.status == "error" and "'digits' has 10 classes" in bad.message
    assert good.status == "ok" and good.fingerprint
    assert unavailable.status == "unavailable" and "CPU only" in unavailable.message


def test_batch_schedule_and_data_independent_of_backend_policy_optimizer():
    base = spec("mlp", "adam", "fp32", steps=40, batch_size=100)
    variants = [dataclasses.replace(base, backend=b) for b in ("numba", "jax")] + [
        dataclasses.replace(base, policy=PRESETS["bf16"], optimizer=optimizer("sgd")),
        dataclasses.replace(base, device="gpu", record_every=7)]
    ref = dataset_for(base)
    for v in variants:
        ds = dataset_for(v)
        for field in ("X_train", "y_train", "X_test", "y_test", "init_params", "batches"):
            assert np.array_equal(getattr(ds, field), getattr(ref, field)), field


def test_init_params_and_splits_independent_of_steps_and_batch_size():
    short = dataset_for(spec("softmax", "adam", "fp32", steps=10, batch_size=64))
    long = dataset_for(spec("softmax", "adam", "fp32", steps=500, batch_size=64))
    full = dataset_for(spec("softmax", "adam", "fp32", steps=500, batch_size=None))
    for ds in (long, full):
        assert np.array_equal(ds.init_params, short.init_params)
        assert np.array_equal(ds.X_train, short.X_train) and np.array_equal(ds.X_test, short.X_test)
    assert np.array_equal(long.batches[:10], short.batches)  # a longer run extends the schedule, same prefix
    assert full.batches is None and full.batch_size == full.X_train.shape[0]
