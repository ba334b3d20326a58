"""Gradient accumulation (``RunSpec.accum_steps``): the spec field, K = 1 as the unchanged code path, the backends'
agreement with K > 1, the fp64 order-noise bound, and what accumulation does to narrow formats.

The semantics are stated once in :data:`precision.backends.step_rules.ACCUMULATION` (docs/accumulation.md): the
step's batch split into K consecutive micro-batches (numpy.array_split's sizes), each micro-gradient computed in C
with the whole batch's seed scale (loss scale)/B, summed in order in A, the sum rounded once to C. The hand-made
cases every backend must pass with accumulation (exact doubling runs, the summation order) are in
tests/test_conformance.py.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

import precision.backends.numpy_backend as numpy_backend
from precision.accumulation import accumulation_effect
from precision.backends import BACKENDS, backend_availability, step_rules
from precision.drift import fingerprint, rel_l2
from precision.errors import SpecError
from precision.formats import FORMATS
from precision.matrix import default_specs
from precision.optim import SCALAR_COLUMNS, make_optimizer, scalar_table
from precision.policy import PRESETS
from precision.report import Report, Result, environment, load_report, now_utc
from precision.runner import dataset_for, run_one, train
from precision.spec import RunSpec

AVAILABILITY = {name: backend_availability(name, "cpu") for name in BACKENDS}
ALL_BACKENDS = [pytest.param(name, id=name, marks=() if avail.available else pytest.mark.skip(
    reason=f"backend {name!r} unavailable here: {avail.reason}")) for name, avail in AVAILABILITY.items()]
AVAILABLE = [name for name, avail in AVAILABILITY.items() if avail.available]
needs = {name: pytest.mark.skipif(not AVAILABILITY[name].available,
                                  reason=f"{name} unavailable: {AVAILABILITY[name].reason}") for name in BACKENDS}

FP64 = FORMATS["fp64"]
U64 = FP64.unit_roundoff
CASES = (("logreg", "breast_cancer"), ("mlp", "digits"))  # the default matrix's cases


def spec_for(problem: str, data: str, opt, policy: str, backend: str = "numpy", **kw) -> RunSpec:
    opt = make_optimizer(opt) if isinstance(opt, str) else opt
    return RunSpec(problem, opt, PRESETS[policy], backend=backend, data=data, **kw)


def same_bits(a, b) -> bool:
    """Equal bit patterns (float64 views of the recorded params), any NaN equal to any NaN."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and bool(np.all((a.view(np.uint64) == b.view(np.uint64)) | (np.isnan(a) & np.isnan(b))))


# -- 1. the spec field ----------------------------------------------------------------------------------------------

def id_without_accumulation(spec: RunSpec) -> str:
    """The id as RunSpec wrote it before accum_steps existed (the format every stored report uses)."""
    batch = "full" if spec.batch_size is None else str(spec.batch_size)
    return (f"{spec.problem}:{spec.data}/{spec.optimizer}/{spec.policy.name}/{spec.backend}-{spec.device}"
            f"/steps={spec.steps},bs={batch},seed={spec.seed},rec={spec.record_every}")


def test_ids_of_the_default_matrix_are_unchanged():
    specs = default_specs(backends=tuple(BACKENDS))
    assert len(specs) == 60 and all(spec.accum_steps == 1 for spec in specs)
    assert [spec.id for spec in specs] == [id_without_accumulation(spec) for spec in specs]
    assert [dataclasses.replace(spec, accum_steps=1).id for spec in specs] == [spec.id for spec in specs]
    assert specs[0].id == "logreg:breast_cancer/sgd(lr=0.05,momentum=0.9)/fp64/numpy-cpu/steps=200,bs=128,seed=0,rec=20"


def test_accumulated_id_dict_and_reference():
    spec = spec_for("logreg", "breast_cancer", "adam", "bf16-mixed", backend="jax", accum_steps=4)
    assert spec.id == id_without_accumulation(spec) + ",accum=4"
    assert spec.id.rsplit("/", 1)[1] == "steps=200,bs=128,seed=0,rec=20,accum=4"  # the last segment
    assert spec.to_dict()["accum_steps"] == 4 and dataclasses.replace(spec, accum_steps=1).to_dict()["accum_steps"] == 1
    ref = spec.reference()
    assert ref.accum_steps == 4 and ref.policy == PRESETS["fp64"] and ref.backend == "numpy"


@pytest.mark.parametrize("value", [0, -1, True, 1.5, "2", None])
def test_accum_steps_must_be_a_positive_integer(value):
    with pytest.raises(SpecError, match=rf"accum_steps {value!r} must be a positive integer"):
        spec_for("logreg", "breast_cancer", "sgd", "fp32", accum_steps=value)


# breast_cancer: 569 samples, 455 train rows (precision.data.split_sizes); digits: 1797 -> 1438.
@pytest.mark.parametrize("data, batch_size, rows", [("breast_cancer", 128, 128), ("breast_cancer", None, 455),
                                                    ("breast_cancer", 1000, 455), ("digits", 7, 7)])
def test_accum_steps_at_most_the_rows_of_a_step(data, batch_size, rows):
    """K micro-batches need K rows: K = rows is accepted (one row each), K = rows + 1 refused, naming K and 1..rows;
    a batch at least the train split is the full batch (make_dataset), so the train split's rows count."""
    problem = "logreg" if data == "breast_cancer" else "mlp"
    ok = spec_for(problem, data, "sgd", "fp32", batch_size=batch_size, accum_steps=rows)
    assert ok.accum_steps == rows
    with pytest.raises(SpecError, match=rf"accum_steps {rows + 1} exceeds the {rows} rows .*valid range: 1\.\.{rows}"):
        spec_for(problem, data, "sgd", "fp32", batch_size=batch_size, accum_steps=rows + 1)


def test_micro_batches_have_array_split_sizes():
    for b in range(1, 40):
        for k in range(1, b + 1):
            bounds = step_rules.micro_batches(b, k)
            sizes = [stop - start for start, stop in bounds]
            assert sizes == [len(part) for part in np.array_split(np.arange(b), k)]
            assert bounds[0][0] == 0 and bounds[-1][1] == b
            assert all(bounds[i][1] == bounds[i + 1][0] for i in range(k - 1))  # consecutive, in order
    with pytest.raises(SpecError, match=r"accum_steps 5 exceeds the batch's 4 rows; valid range: 1\.\.4"):
        step_rules.micro_batches(4, 5)


def test_accumulated_result_is_a_valid_report(tmp_path):
    """The spec dict gains accum_steps (the report schema's spec object allows it); a report with one accumulated
    result is written and read back."""
    spec = spec_for("logreg", "breast_cancer", "sgd", "bf16-mixed", steps=8, record_every=4, accum_steps=3)
    result = run_one(spec)
    assert result.status == "ok", result.message
    report = Report(results=(result,), environment=environment(), created=now_utc())
    back = load_report(report.save(tmp_path / "report.json"))
    assert back.results[0].spec["accum_steps"] == 3 and back.results[0].spec["id"].endswith(",accum=3")
    assert isinstance(back.results[0], Result)


# -- 2. K = 1 is the code path without accumulation, on every backend ------------------------------------------------

def _refuse(*args, **kwargs):
    raise AssertionError("accumulation code reached with accum_steps = 1")


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_accum_1_runs_the_unchanged_code_path(backend, monkeypatch):
    """With accum_steps = 1 no backend enters its accumulation code (each entry point replaced by one that fails),
    and the spec, its id and its fingerprint are those of the spec that does not mention accum_steps. The K = 1
    loops are the code that ran before accumulation existed, unchanged (numpy: the same gradient call inside
    apply_step; JAX: the same step function; numba: the same compiled loops): so the fingerprints are the previous
    ones (checked against the commit before accumulation on the development machine: 72 of 72 identical)."""
    monkeypatch.setattr(step_rules, "accumulate", _refuse)
    monkeypatch.setattr(numpy_backend, "accumulate", _refuse)
    if backend == "jax":
        from precision.backends.jax_backend import loop
        monkeypatch.setattr(loop, "accumulated_gradient", _refuse)
        loop.clear_compile_cache()  # a cached program would not trace the step again
    if backend == "numba":
        import precision.backends.numba_backend as numba_backend
        monkeypatch.setattr(numba_backend, "_accumulated_call", _refuse)
    failures = []
    for problem, data in CASES:
        for opt in ("sgd", "adam"):
            for policy in ("fp32", "bf16", "fp16-mixed"):
                plain = spec_for(problem, data, opt, policy, backend=backend, steps=60)
                explicit = dataclasses.replace(plain, accum_steps=1)
                assert explicit == plain and explicit.id == plain.id
                dataset = dataset_for(plain)
                with np.errstate(all="ignore"):
                    a, b = train(explicit, dataset), train(plain, dataset)
                if fingerprint(a.final_params) != fingerprint(b.final_params):
                    failures.append(plain.id)
    assert not failures, failures


# -- 3. the backends agree with K > 1 where they agree with K = 1 ---------------------------------------------------
# tests/test_numba_backend.py pins the one cause of every whole-run difference between numba and numpy: with the numpy
# backend summing in numba's order (SequentialOps: ascending sums, numba's exp, the C library's tanh) the two are bit
# for bit equal, for every preset, problem and optimizer. Accumulation adds only elementwise work in a fixed order (K
# micro-gradients converted to A, added in order, rounded to C), so the same pin must hold with K > 1: here K = 3 on
# batches of 128 (micro-batches 43, 43, 42: both scratch slots of the numba loops) and on the full batch.

@needs["numba"]
@pytest.mark.parametrize("problem", ["linreg", "logreg", "softmax", "mlp"])
@pytest.mark.parametrize("policy", list(PRESETS))
def test_numba_equals_numpy_in_numbas_order_with_accumulation(policy, problem, monkeypatch):
    from test_numba_backend import SequentialOps
    monkeypatch.setattr(numpy_backend, "FormatOps", SequentialOps)
    opt = make_optimizer("adam", lr=0.01) if problem in ("logreg", "mlp") else make_optimizer("sgd", momentum=0.9)
    spec = RunSpec(problem, opt, PRESETS[policy], steps=40, record_every=10, accum_steps=3)
    dataset = dataset_for(spec)
    with np.errstate(all="ignore"):
        ref, got = train(spec, dataset), train(dataclasses.replace(spec, backend="numba"), dataset)
    assert ref.diverged_at == got.diverged_at
    assert np.array_equal(ref.record_steps, got.record_steps)
    assert same_bits(got.params, ref.params)
    assert fingerprint(got.final_params) == fingerprint(ref.final_params)


@needs["numba"]
def test_numba_equals_numpy_in_numbas_order_full_batch_accumulation(monkeypatch):
    """The full-batch path (1024 rows in micro-batches of 342, 341, 341), logistic regression and the MLP."""
    from test_numba_backend import SequentialOps
    monkeypatch.setattr(numpy_backend, "FormatOps", SequentialOps)
    for problem, policy in (("logreg", "fp32"), ("mlp", "bf16-mixed")):
        spec = RunSpec(problem, make_optimizer("adam", lr=0.01), PRESETS[policy], steps=20, batch_size=None,
                       record_every=10, accum_steps=3)
        dataset = dataset_for(spec)
        ref, got = train(spec, dataset), train(dataclasses.replace(spec, backend="numba"), dataset)
        assert fingerprint(got.final_params) == fingerprint(ref.final_params), problem


# fp64: tests/test_jax_backend.py::test_fp64_training_matches_numpy and
# tests/test_numba_backend.py::test_fp64_runs_agree_to_1e12 hold every backend to 1e-12 of numpy after 200 steps (two
# orders of a <= 1024-term sum differ by at most ~2 * 1024 u64 = 2.3e-13 of the sum of |terms| per step; training is
# contracting, so 200 steps add up to ~1e-12). Accumulation only shortens the sums (micro-batches of 32 plus 4 partial
# sums), so the same bound holds with K = 4.
@pytest.mark.parametrize("backend", [pytest.param(b, marks=needs[b]) for b in ("numba", "jax")])
@pytest.mark.parametrize("problem, data", CASES)
@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_fp64_backends_agree_to_1e12_with_accumulation(backend, problem, data, opt):
    spec = spec_for(problem, data, opt, "fp64", accum_steps=4)
    dataset = dataset_for(spec)
    ref, got = train(spec, dataset), train(dataclasses.replace(spec, backend=backend), dataset)
    assert got.diverged_at is None and ref.diverged_at is None
    rel = np.linalg.norm(got.params - ref.params, axis=1) / np.linalg.norm(ref.params, axis=1)
    assert rel.max() <= 1e-12


# -- 4. fp64: accumulated and one-batch runs differ by summation-order noise only ------------------------------------
# In exact arithmetic the accumulated gradient IS the batch gradient (each micro-batch's share (1/B) sum_i of its rows,
# summed), so in fp64 the two runs differ only by rounding. The bound below is a first-order forward-error bound of
# each run against the exact-arithmetic run, evaluated along the trajectory; the two runs differ by at most the sum.
#
# Problem: logistic regression on breast_cancer (455 x 30, standardized), batch B = 128, K = 4 (micro-batches of 32),
# T = 200 steps. Chosen because its gradient and Hessian are explicit, so the error of every step can be propagated
# exactly; the MLP's would need a bound on its Hessian along the run, which a worst-case norm estimate turns vacuous.
#
# One step's gradient, per run (d = 30 features, N = d + 1 params, gamma_n = n u / (1 - n u), u = 2^-53):
# * forward z_i = x_i . w + b is a (d + 1)-term sum in any order: |z^_i - z_i| <= gamma_{d+1} Z_i, Z_i = sum |x_ik w_k|
#   + |b|; sigmoid' <= 1/4, so sigma moves by <= gamma_{d+1} Z_i / 4;
# * sigma = 1 / (1 + exp(-z)): exp within 1 ulp (<= 2u relative: numpy's and numba's exp64), + and / one rounding
#   each, and d sigma / sigma = -(1 - sigma) d e / e with |1 - sigma| <= 1: 4u relative, sigma <= 1; then sigma - y
#   one rounding (|sigma - y| <= 1: u); times s = 1/128 exact. So |delta^_i - delta_i| <= s (gamma_{d+1} Z_i / 4 +
#   6u) (5u plus a u for the second-order terms);
# * g_j = sum_i x~_ij delta^_i (x~ = [x, 1]) with L terms in any order: gamma_L sum_i |x~_ij delta_i|, plus
#   sum_i |x~_ij| |delta^_i - delta_i|. One batch: L = B = 128 (BLAS or numba's order, FMA or not: gamma_L covers
#   any). Accumulated: each micro-batch a sum of m = 32 terms, then K - 1 additions: every term passes through at most
#   m - 1 + K - 1 roundings, L = m + K - 1 = 35.
# The update (precision.optim's op order), per run: SGD w' = w - lr g: u |lr g| + u |w'|. Adam: m' = b1 m + (1-b1) g
# (gamma_2 (b1 |m| + (1-b1) |g|)), v' = b2 v + (1-b2) g g (gamma_3), denominator sqrt(v')/sqrt(bc2) + eps (gamma_3
# relative), step_size m' / denominator (two more roundings: gamma_5 relative), w - step (u |w'|); the gradient's
# error enters m' as (1-b1) dg and v' as 2 (1-b2) |g| dg, and this step's m', v' errors enter w' through
# |d w'/d m'| = step_size / den and |d w'/d v'| = step_size |m'| / (den^2 2 sqrt(bc2) sqrt(v')).
# Propagation: the state s_t (w for SGD; w, m, v for Adam) follows s_t = F_t(s_{t-1}) + n_t; to first order the
# final error is sum_t Phi(T, t) n_t with Phi(T, t) = J_T ... J_{t+1} the product of the exact step's Jacobians
# (SGD: I - lr H_t, H_t = (1/B) X~^T diag(sigma (1 - sigma)) X~ over the step's rows; Adam: the chain rule through
# m', v' and the denominator). So ||w^_T - w_T|| <= sum_t ||Phi_w(T, t)||_2 ||n_t||_2 for each run, and the two runs
# differ by at most the sum of their bounds. Adam divides by sqrt(v): an entry whose gradient is ~0 on paper (the
# bias of standardized full-batch linear regression, docs/numerics.md) would make the step a function of rounding
# noise itself, outside any first-order bound; the test checks that here every computed gradient entry is far above
# its error (max_j dg_j / sqrt(v'_j) tiny) before trusting the bound. Measured on the development machine (all three
# backends): rel_l2 1.8e-16 .. 2.4e-16 against a bound of 2.9e-12 (SGD, lr 0.5); 0.9e-16 .. 1.3e-16 against 1.4e-10
# (Adam): gamma_n is a worst case (errors of n roundings in one direction), the norms of Phi are taken per step.

COL = {name: i for i, name in enumerate(SCALAR_COLUMNS)}


def gamma(n: int) -> float:
    return n * U64 / (1 - n * U64)


def fp64_order_noise_bound(spec: RunSpec, dataset) -> tuple[float, float]:
    """(bound on rel_l2(accumulated, one batch) of the final params, max_j dg_j / sqrt(v'_j) over the run for Adam
    (0 for SGD)): the derivation above, for logreg in fp64, along the exact-arithmetic trajectory (computed here in
    float64: it differs from either run by ~1e-16 relative, which moves the bound by as little)."""
    assert spec.problem == "logreg" and spec.policy == PRESETS["fp64"] and not spec.optimizer.weight_decay
    opt, steps, K = spec.optimizer, spec.steps, spec.accum_steps
    assert opt.is_adam or not opt.momentum
    X, y = dataset.X_train, dataset.y_train.astype(np.float64)
    N = X.shape[1] + 1
    B = dataset.batch_size
    sizes = [stop - start for start, stop in step_rules.micro_batches(B, K)]
    lengths = (B, max(sizes) + K - 1)  # one batch, accumulated
    table = scalar_table(opt, steps, FP64)
    n_state = 3 * N if opt.is_adam else N
    w, m, v = dataset.init_params.copy(), np.zeros(N), np.zeros(N)
    jacobians, noises, ratio = [], [], 0.0
    for step in range(1, steps + 1):
        Xt = np.hstack([X[dataset.batch(step)], np.ones((B, 1))])
        yb = y[dataset.batch(step)]
        sigma = 1.0 / (1.0 + np.exp(-(Xt @ w)))
        s = 1.0 / B
        delta = (sigma - yb) * s
        g = Xt.T @ delta
        H = Xt.T @ ((sigma * (1 - sigma) * s)[:, None] * Xt)
        delta_err = s * (gamma(N) * (np.abs(Xt) @ np.abs(w)) / 4 + 6 * U64)
        g_err = [gamma(L) * (np.abs(Xt).T @ np.abs(delta)) + np.abs(Xt).T @ delta_err for L in lengths]
        row = table[step - 1]
        if not opt.is_adam:
            lr = row[COL["lr"]]
            w_new = w - lr * g
            J = np.eye(N) - lr * H
            noise = sum(lr * err + U64 * (np.abs(lr * g) + np.abs(w_new)) for err in g_err)
            w = w_new
        else:
            b1, omb1, b2, omb2 = (row[COL[c]] for c in ("beta1", "one_minus_beta1", "beta2", "one_minus_beta2"))
            sbc2, eps, step_size = row[COL["sqrt_bc2"]], row[COL["eps"]], row[COL["step_size"]]
            m_new, v_new = b1 * m + omb1 * g, b2 * v + omb2 * g * g
            root = np.sqrt(v_new)
            den = root / sbc2 + eps
            upd = step_size * m_new / den
            w_new = w - upd
            d_m = -step_size / den  # d w' / d m'
            d_v = step_size * m_new / den**2 / (2 * sbc2 * root)  # d w' / d v'
            dm_dw, dv_dw = omb1 * H, 2 * omb2 * g[:, None] * H
            J = np.zeros((n_state, n_state))
            J[:N, :N] = np.eye(N) + d_m[:, None] * dm_dw + d_v[:, None] * dv_dw
            J[:N, N:2 * N], J[:N, 2 * N:] = np.diag(d_m * b1), np.diag(d_v * b2)
            J[N:2 * N, :N], J[N:2 * N, N:2 * N] = dm_dw, b1 * np.eye(N)
            J[2 * N:, :N], J[2 * N:, 2 * N:] = dv_dw, b2 * np.eye(N)
            noise = np.zeros(n_state)
            for err in g_err:
                n_m = gamma(2) * (b1 * np.abs(m) + omb1 * np.abs(g)) + omb1 * err
                n_v = gamma(3) * (b2 * v + omb2 * g * g) + 2 * omb2 * np.abs(g) * err
                n_w = gamma(5) * np.abs(upd) + U64 * np.abs(w_new) + np.abs(d_m) * n_m + np.abs(d_v) * n_v
                noise += np.concatenate([n_w, n_m, n_v])
                ratio = max(ratio, float(np.max(err / root)))
            w, m, v = w_new, m_new, v_new
        jacobians.append(J)
        noises.append(noise)
    phi = np.eye(n_state)[:N]  # the weights' rows of Phi(T, t), from t = T down
    total = 0.0
    for J, noise in zip(reversed(jacobians), reversed(noises)):
        total += np.linalg.norm(phi, 2) * np.linalg.norm(noise)
        phi = phi @ J
    return total / np.linalg.norm(w), ratio


FP64_BOUND_OPTIMIZERS = {"sgd": make_optimizer("sgd", lr=0.5, momentum=0.0), "adam": make_optimizer("adam")}


@pytest.mark.parametrize("opt", FP64_BOUND_OPTIMIZERS)
def test_fp64_accumulation_is_order_noise_within_the_derived_bound(opt, monkeypatch):
    spec = spec_for("logreg", "breast_cancer", FP64_BOUND_OPTIMIZERS[opt], "fp64", accum_steps=4)
    dataset = dataset_for(spec)
    bound, ratio = fp64_order_noise_bound(spec, dataset)
    assert bound <= 1e-9  # meaningful: ~35 bits of agreement guaranteed; the wrong variant below is far outside
    assert ratio <= 1e-9  # Adam: every gradient entry far above its rounding error (first order holds)
    measured, one_batch = {}, {}
    for backend in AVAILABLE:
        accumulated = train(dataclasses.replace(spec, backend=backend), dataset)
        one_batch[backend] = train(dataclasses.replace(spec, backend=backend, accum_steps=1), dataset)
        measured[backend] = rel_l2(accumulated.params[-1], one_batch[backend].params[-1])
    assert all(rel <= bound for rel in measured.values()), (measured, bound)
    # The same test fails for accumulation done wrong: each micro-batch divided by its own size m = B/K instead of
    # by B (each micro-gradient K times too large). For SGD that is the one-batch run with lr K times larger: rel_l2
    # ~0.5. Adam is invariant to scaling the gradient except through eps (K g gives K m / (K sqrt(v') + eps):
    # the one-batch run with eps / K), so only eps sees it, ~1e-8 relative here: still 100x the bound (measured
    # 2.7e-8 against 1.4e-10).
    real = step_rules.host_scalars
    monkeypatch.setattr(numpy_backend, "host_scalars",
                        lambda pol, o, steps, batch: real(pol, o, steps, batch // spec.accum_steps))
    wrong = train(spec, dataset)  # numpy (the spec's backend); the one-batch run above had the real scalars
    assert rel_l2(wrong.params[-1], one_batch["numpy"].params[-1]) >= 10 * bound


# -- 5. narrow formats: what accumulation changes, and that it runs on every backend --------------------------------

@pytest.mark.parametrize("policy", ["bf16", "bf16-mixed"])
def test_accumulation_effect_reports_finite_sensible_figures(policy):
    """bf16 rounds each micro-gradient to C before the sum (the one-batch gradient is rounded once), so the runs
    differ by a few roundings of the formats per step. Modelled as independent rounding errors (the random walk of
    tests/test_numba_backend.py::test_low_precision_runs_agree_within_sqrt_steps_u): rel_l2 above 0 and at most
    lambda sqrt(T) u_P = 5 sqrt(200) 2^-8 = 0.28 (lambda = 5), so bits_of_agreement >= 1.8; labels mostly unchanged
    (flip rate <= 5%). Measured: rel_l2 8e-3 (bf16) and 1.6e-3 (bf16-mixed), 7 and 9.3 bits, no flips."""
    spec = spec_for("logreg", "breast_cancer", "adam", policy, accum_steps=4)
    effect = accumulation_effect(spec)
    assert set(effect) == {"accum_steps", "rel_l2", "bits_of_agreement", "max_ulp", "flip_rate"}
    json.dumps(effect, allow_nan=False)
    u = PRESETS[policy].params.unit_roundoff
    assert effect["accum_steps"] == 4
    assert 0 < effect["rel_l2"] <= 5 * math.sqrt(spec.steps) * u
    assert effect["bits_of_agreement"] == pytest.approx(-math.log2(effect["rel_l2"]))
    assert 0 < effect["max_ulp"] < math.inf
    assert 0 <= effect["flip_rate"] <= 0.05


def test_accumulation_effect_in_fp64_and_its_refusals():
    spec = spec_for("logreg", "breast_cancer", FP64_BOUND_OPTIMIZERS["sgd"], "fp64", accum_steps=4)
    effect = accumulation_effect(spec, dataset_for(spec))
    bound, _ = fp64_order_noise_bound(spec, dataset_for(spec))
    assert effect["rel_l2"] <= bound and effect["bits_of_agreement"] >= -math.log2(bound)
    assert effect["flip_rate"] == 0.0
    with pytest.raises(SpecError, match="accum_steps > 1"):
        accumulation_effect(dataclasses.replace(spec, accum_steps=1))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("problem, data", CASES)
def test_accumulated_runs_train_on_every_backend(backend, problem, data):
    """K = 4, Adam, 200 steps, batch 128 (micro-batches of 32): no crash, no divergence, finite params in the policy's
    dtype; and within lambda sqrt(T) u_P of the same backend's one-batch run (lambda = 5, the model above; measured:
    at most 0.27 sqrt(T) u_P, pure bf16 on the MLP)."""
    failures = []
    for policy in ("fp32", "bf16", "bf16-mixed", "fp16-mixed"):
        spec = spec_for(problem, data, "adam", policy, backend=backend, accum_steps=4)
        dataset = dataset_for(spec)
        got = train(spec, dataset)
        if got.diverged_at is not None or not np.isfinite(got.params).all():
            failures.append(f"{policy}: diverged at {got.diverged_at}")
            continue
        assert got.final_params.dtype == spec.policy.params.dtype
        one = train(dataclasses.replace(spec, accum_steps=1), dataset)
        tol = 5 * math.sqrt(spec.steps) * spec.policy.params.unit_roundoff
        rel = rel_l2(got.params[-1], one.params[-1])
        if not rel <= tol:
            failures.append(f"{policy}: rel_l2 to the one-batch run {rel:.3g} > {tol:.3g}")
    assert not failures, "\n".join(failures)

