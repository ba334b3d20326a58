"""Inference parity (precision.inference) and the backends' forward passes against float64 and each other.

1. fp64 served in fp64 on the same backend is exact: a second, separate pass gives the same bits.
2. Every backend's forward pass in fp32 / bf16 / fp16 / fp8 is within a bound derived from the formats of
   precision.problems' float64 logits (:func:`logit_bound`: one term per rounding of the pass).
3. Where the fp32 accumulator adds exactly (every partial sum representable: always in fp8 e4m3fn here), the three
   backends agree bit for bit; elsewhere their summation orders legitimately differ (numpy: OpenBLAS's blocked
   FMA order, numba: ascending k, JAX: XLA's order; docs/numerics.md) and they agree within twice the bound.
4. A model trained in fp32 (precision.runner.train) and served narrower gives JSON-ready figures that obey the
   relations that are theorems (|accuracy change| <= flip rate, 0 <= KL mean <= KL max), and overflow is counted.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from precision.backends.numpy_backend.ops import FormatOps
from precision.formats import FORMATS, get_format, round_to, ulp
from precision.inference import accumulator_for, forward, inference_parity
from precision.optim import make_optimizer
from precision.policy import get_policy
from precision.problems import get_problem, unflatten
from precision.runner import dataset_for, train
from precision.spec import RunSpec

BACKENDS = ("numpy", "numba", "jax")
CASES = {"linreg": "synthetic", "logreg": "breast_cancer", "softmax": "digits", "mlp": "digits"}
NARROW = ("fp32", "bf16", "fp16", "fp8_e4m3fn")
FP32, FP64 = FORMATS["fp32"], FORMATS["fp64"]
_MODELS: dict = {}


def trained(problem: str, steps: int = 50):
    """(dataset, final params as float64) of an fp32 Adam run on the numpy backend, made once per problem."""
    if problem not in _MODELS:
        spec = RunSpec(problem=problem, data=CASES[problem], optimizer=make_optimizer("adam"),
                       policy=get_policy("fp32"), backend="numpy", steps=steps, batch_size=128, record_every=steps)
        dataset = dataset_for(spec)
        _MODELS[problem] = dataset, train(spec, dataset).params[-1]
    return _MODELS[problem]


def gamma(k: int, u: float) -> float:
    """Higham's gamma_k = k u / (1 - k u): a k-term dot product in a format of unit roundoff u, any order, with or
    without FMA, is within gamma_k * sum |a_i b_i| of the exact one."""
    return k * u / (1 - k * u)


def logit_bound(problem: str, params: np.ndarray, X: np.ndarray, fmt, layout) -> np.ndarray:
    """Bound on |served logit - float64 logit| for the pass in ``fmt`` with the accumulator rule.

    One term per rounding, propagated in the pass's order (u = 2^-p of the compute format C, u_A of the
    accumulator, eta = half C's smallest subnormal plus fp32's smallest normal, which covers XLA flushing float32
    subnormals to zero):
      inputs    |fl(v) - v| <= u |v| + eta for every x_i, w_i, b;
      product   |sum x^_i w^_i - sum x_i w_i|  <=  Ex.(|W| + Ew) + |X|.Ew;
      sum       gamma_d(u_A) sum |x^_i w^_i| (d terms; exact products below fp32, rounded ones in fp32), plus
                d * fp32 tiny for flushed partial sums;
      to C      u (|s| + error so far) + eta;   + b   the same for the addition;
      tanh      1-Lipschitz, then (k u)(|h| + error) + eta: k = 1 below fp32 (float64 tanh rounded once, plus
                8 float64 ulps for the float64 tanh itself), k = 8 for the libraries' own fp32 / fp64 tanh (numba's
                tanh64 is within 4 float64 ulps, test_tanh64_within_four_ulp; numpy's and XLA's SIMD approximations
                are few-ulp designs).
    """
    u, u_acc = fmt.unit_roundoff, accumulator_for(fmt).unit_roundoff
    eta = fmt.smallest_subnormal / 2 + FP32.tiny
    p = unflatten(np.asarray(params, dtype=np.float64), layout)

    def rnd(v):
        return u * np.abs(v) + eta

    def dot(X, Ex, W, Ew):
        d = X.shape[1]
        S = X @ W
        err = Ex @ (np.abs(W) + Ew) + np.abs(X) @ Ew + gamma(d, u_acc) * ((np.abs(X) + Ex) @ (np.abs(W) + Ew))
        err = err + d * FP32.tiny
        return S, err + u * (np.abs(S) + err) + eta

    def bias(S, err, b):
        z, err_b = S + b, rnd(b)
        return z, err + err_b + u * (np.abs(z) + err + err_b) + eta

    if problem == "mlp":
        A, err_a = bias(*dot(X, rnd(X), p["W1"], rnd(p["W1"])), p["b1"])
        H = np.tanh(A)
        k = 8 * u if fmt.precision >= FP32.precision else u + 8 * FP64.unit_roundoff
        return bias(*dot(H, err_a + k * (np.abs(H) + err_a) + eta, p["W2"], rnd(p["W2"])), p["b2"])[1]
    W = p["W"] if problem == "softmax" else p["w"][:, None]
    err = bias(*dot(X, rnd(X), W, rnd(W)), p["b"])[1]
    return err if problem == "softmax" else err[:, 0]


def exact_in_fp32(X: np.ndarray, W: np.ndarray, fmt) -> np.ndarray:
    """Per output (row of X, column of W): whether every fp32 summation order of the products gives the exact sum.

    For formats with 2p <= 24 (bf16, fp16, fp8) each product x^_i w^_i is exact in fp32 and an integer multiple of
    q = min_i ulp(x^_i) ulp(w^_i) (a power of two). Every partial sum, in any order, is then an integer multiple of
    q of magnitude <= sum |x^_i w^_i|; if that is <= 2^24 q, fp32 holds it exactly (and q >= 2^-126 keeps it out
    of the subnormals XLA would flush), so no order, blocking or FMA can change the sum."""
    assert 2 * fmt.precision <= FP32.precision
    P = np.abs(X[:, :, None] * W[None, :, :])
    q = np.where(P > 0, ulp(X, fmt)[:, :, None] * ulp(W, fmt)[None, :, :], np.inf).min(axis=1)
    return (P.sum(axis=1) <= 2.0**FP32.precision * q) & (q >= FP32.tiny)


def exact_rows(problem: str, params: np.ndarray, X: np.ndarray, fmt, layout) -> np.ndarray:
    """Samples all of whose dot products are exact in fp32 (:func:`exact_in_fp32`) on the served operands. For
    the MLP the hidden layer is the numpy backend's ops applied to the served operands: on a sample whose first
    layer is exact, every backend computes these same hidden values (the bias add and the tanh table agree)."""
    p = unflatten(round_to(params, fmt), layout)
    Xc = round_to(X, fmt)
    if problem != "mlp":
        return exact_in_fp32(Xc, p["W"] if problem == "softmax" else p["w"][:, None], fmt).all(axis=1)
    ops = FormatOps(fmt, accumulator_for(fmt))
    with np.errstate(all="ignore"):
        H = ops.tanh(ops.matmul(Xc.astype(fmt.dtype), p["W1"].astype(fmt.dtype)) + p["b1"].astype(fmt.dtype))
    return exact_in_fp32(Xc, p["W1"], fmt).all(axis=1) & exact_in_fp32(H.astype(np.float64), p["W2"], fmt).all(axis=1)


# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("problem", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_served_in_fp64_is_exact(backend, problem):
    """Two separate fp64 passes of the same backend: every figure exactly 0 (None where it does not apply)."""
    dataset, params = trained(problem)
    row, = inference_parity(backend, dataset, params, formats=("fp64",))
    classifier = get_problem(problem).is_classifier
    zero = 0.0 if classifier else None
    assert row == {"format": "fp64", "flip_rate": zero, "kl_mean": zero, "kl_max": zero, "max_abs_diff": 0.0,
                   "max_logit_ulp": 0.0, "accuracy_change": zero, "nonfinite": 0}


@pytest.mark.parametrize("fmt", NARROW)
@pytest.mark.parametrize("problem", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_within_the_derived_bound_of_float64(backend, problem, fmt):
    dataset, params = trained(problem)
    fmt = get_format(fmt)
    z64 = get_problem(problem).logits(params, dataset.X_test, dataset.layout)
    bound = logit_bound(problem, params, dataset.X_test, fmt, dataset.layout)
    z = forward(backend, problem, params, dataset.X_test, fmt, dataset.layout)
    assert z.shape == z64.shape and z.dtype == np.float64
    assert np.array_equal(round_to(z, fmt), z), "logits are values of the compute format"
    excess = np.abs(z - z64) / bound
    assert excess.max() <= 1, f"{backend} {fmt.name}: worst logit {excess.max():.3g}x its bound"


@pytest.mark.parametrize("fmt", NARROW)
@pytest.mark.parametrize("problem", CASES)
def test_backends_agree_bit_for_bit_where_the_fp32_sum_is_exact(problem, fmt):
    """Bitwise on the samples whose dot products fp32 adds exactly in any order (the contract leaves the order to
    each backend: only there must the bits agree); the rest within twice the bound (triangle inequality)."""
    dataset, params = trained(problem)
    fmt = get_format(fmt)
    outs = {b: forward(b, problem, params, dataset.X_test, fmt, dataset.layout) for b in BACKENDS}
    exact = (exact_rows(problem, params, dataset.X_test, fmt, dataset.layout) if 2 * fmt.precision <= FP32.precision
             else np.zeros(len(dataset.X_test), dtype=bool))  # fp32 products are rounded: no exactness
    if fmt.name == "fp8_e4m3fn":
        # e4m3fn values are multiples of 2^-9, so products of 2^-18: sums below 2^6 are exact. Data, not theorem:
        # if a data set or model change breaks it, this says so.
        assert exact.all(), f"fp8 sums not exact in fp32 for {np.mean(~exact):.1%} of the samples"
    bound = logit_bound(problem, params, dataset.X_test, fmt, dataset.layout)
    for other in ("numba", "jax"):
        a, b = outs["numpy"][exact], outs[other][exact]
        assert np.array_equal(a, b), f"numpy vs {other}: {np.sum(a != b)} logits differ on exact-sum samples"
        assert (np.abs(outs["numpy"] - outs[other]) <= 2 * bound).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("problem", ["logreg", "mlp"])
def test_trained_fp32_model_served_narrow(backend, problem):
    """The figures of a model trained in fp32 on ``backend`` (precision.runner.train, 50 steps) served in bf16,
    fp16 and fp8: only relations that are theorems are asserted. No ordering between formats is (fp8 flipping at
    least as many samples as bf16 is usual, not guaranteed)."""
    spec = RunSpec(problem=problem, data=CASES[problem], optimizer=make_optimizer("adam"),
                   policy=get_policy("fp32"), backend=backend, steps=50, batch_size=128, record_every=50)
    dataset = dataset_for(spec)
    params = train(spec, dataset).params[-1]
    rows = inference_parity(backend, dataset, params, formats=("bf16", "fp16", "fp8_e4m3fn"))
    json.dumps(rows, allow_nan=False)  # JSON-ready: finite floats or None
    assert [r["format"] for r in rows] == ["bf16", "fp16", "fp8_e4m3fn"]
    n = len(dataset.X_test)
    for r in rows:
        assert 0.0 <= r["flip_rate"] <= 1.0 and r["nonfinite"] >= 0
        # only a flipped sample can change from right to wrong or back
        assert abs(r["accuracy_change"]) <= r["flip_rate"] + 1e-12
        assert (r["flip_rate"] * n) == pytest.approx(round(r["flip_rate"] * n))  # a share of samples
        assert 0.0 <= r["kl_mean"] <= r["kl_max"]
        assert 0.0 <= r["max_abs_diff"] <= 1.0  # probabilities
        assert r["max_logit_ulp"] >= 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_parity_figures_are_their_definitions(backend):
    """Each figure recomputed from the backend's own passes (fp64 reference on the same backend)."""
    dataset, params = trained("softmax")
    fmt = get_format("bf16")
    row, = inference_parity(backend, dataset, params, formats=(fmt.name,))
    z64 = forward(backend, "softmax", params, dataset.X_test, "fp64", dataset.layout)
    z = forward(backend, "softmax", params, dataset.X_test, fmt, dataset.layout)
    p64 = np.exp(z64 - z64.max(1, keepdims=True)); p64 /= p64.sum(1, keepdims=True)
    pq = np.exp(z - z.max(1, keepdims=True)); pq /= pq.sum(1, keepdims=True)
    kl = np.sum(p64 * (np.log(p64) - np.log(pq)), axis=1)
    assert row["flip_rate"] == np.mean(z.argmax(1) != z64.argmax(1))
    assert row["accuracy_change"] == pytest.approx(np.mean(z.argmax(1) == dataset.y_test)
                                                   - np.mean(z64.argmax(1) == dataset.y_test), abs=1e-15)
    assert row["kl_mean"] == pytest.approx(max(kl.mean(), 0), rel=1e-6, abs=1e-15)
    assert row["max_abs_diff"] == pytest.approx(np.abs(pq - p64).max(), rel=1e-9)
    assert row["max_logit_ulp"] == np.max(np.abs(z - z64) / ulp(z64, fmt))

    lin_data, lin_params = trained("linreg")
    lin, = inference_parity(backend, lin_data, lin_params, formats=("fp16",))
    y = forward(backend, "linreg", lin_params, lin_data.X_test, "fp16", lin_data.layout)
    y64 = forward(backend, "linreg", lin_params, lin_data.X_test, "fp64", lin_data.layout)
    assert lin["max_abs_diff"] == np.max(np.abs(y - y64))
    assert lin["flip_rate"] is lin["kl_mean"] is lin["kl_max"] is lin["accuracy_change"] is None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt, special", [("fp16", np.isinf), ("fp8_e4m3fn", np.isnan)])
def test_overflow_is_counted_not_raised(backend, fmt, special):
    """A model scaled until its largest logit is 4x the format's max overflows fp16 (to inf) and fp8 e4m3fn (no
    inf: to NaN); the rows record it. Expectations from the format: a logit beyond twice the max overflows whatever
    the rounding, one below half of it cannot (every error bound here is far below a factor of two), provided the
    params themselves are finite in the format (checked)."""
    dataset, params = trained("logreg")
    fmt = get_format(fmt)
    params = params * (4 * fmt.max / np.abs(get_problem("logreg").logits(params, dataset.X_test,
                                                                         dataset.layout)).max())
    assert np.abs(params).max() <= fmt.max, "the params fit the format: only sums overflow"
    z64 = get_problem("logreg").logits(params, dataset.X_test, dataset.layout)
    surely, never = np.abs(z64) > 2 * fmt.max, np.abs(z64) < fmt.max / 2
    rows = {r["format"]: r for r in inference_parity(backend, dataset, params, formats=("fp64", fmt.name))}
    json.dumps(list(rows.values()), allow_nan=False)
    z = forward(backend, "logreg", params, dataset.X_test, fmt, dataset.layout)
    assert surely.any() and special(z[surely]).all() and np.isfinite(z[never]).all()
    row = rows[fmt.name]
    assert surely.sum() <= row["nonfinite"] <= len(z) - never.sum()
    assert row["flip_rate"] >= row["nonfinite"] / len(z)  # a sample with no valid answer counts as flipped
    assert rows["fp64"]["nonfinite"] == 0 and rows["fp64"]["flip_rate"] == 0.0


def test_jax_forward_leaves_global_x64_unchanged():
    dataset, params = trained("logreg")
    before = bool(jax.config.jax_enable_x64)
    z = forward("jax", "logreg", params, dataset.X_test, "fp64", dataset.layout)
    assert bool(jax.config.jax_enable_x64) == before
    z64 = get_problem("logreg").logits(params, dataset.X_test, dataset.layout)
    assert (np.abs(z - z64) <= logit_bound("logreg", params, dataset.X_test, FP64, dataset.layout)).all()


def test_unknown_problem_and_backend_are_refused():
    from precision.errors import PrecisionError
    dataset, params = trained("logreg")
    with pytest.raises(PrecisionError):
        forward("torch", "logreg", params, dataset.X_test, "fp32", dataset.layout)
    for backend in BACKENDS:
        with pytest.raises(PrecisionError):
            forward(backend, "svm", params, dataset.X_test, "fp32", dataset.layout)
