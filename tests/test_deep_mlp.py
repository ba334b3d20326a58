"""Named MLPs, ``mlp-WIDTHS[-relu]`` (precision.problems; docs/models.md): the grammar, the float64 gradient against
finite differences of the float64 loss (the evaluation ground truth), training in every backend, numba equal to
numpy in numba's summation order, fp64 JAX against numpy; and the one-layer ``mlp`` unchanged."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from precision.backends import backend_availability
from precision.backends import numpy_backend
from precision.backends.array_math import gradient
from precision.backends.numpy_backend.ops import FormatOps
from precision.data import make_dataset
from precision.drift import fingerprint
from precision.errors import SpecError
from precision.formats import get_format
from precision.optim import make_optimizer
from precision.policy import get_policy
from precision.problems import get_problem
from precision.runner import dataset_for, train
from precision.spec import RunSpec

from test_numba_backend import SequentialOps

FP64 = get_format("fp64")


def test_grammar_and_layouts():
    deep = get_problem("mlp-256x256-relu")
    assert deep.hidden == (256, 256) and deep.activation == "relu" and deep.task == "multiclass"
    assert [name for name, _ in deep.layout(64, 10)] == ["W1", "b1", "W2", "b2", "W3", "b3"]
    assert dict(deep.layout(64, 10))["W2"] == (256, 256)
    assert get_problem("mlp-64").hidden == (64,) and get_problem("mlp-64").activation == "tanh"
    # the one-layer mlp: its layout as ever
    assert get_problem("mlp").layout(64, 10) == (("W1", (64, 32)), ("b1", (32,)), ("W2", (32, 10)), ("b2", (10,)))
    spec = RunSpec("mlp-16x8-relu", make_optimizer("adam"), get_policy("fp32"), data="digits")
    assert spec.id.startswith("mlp-16x8-relu:digits/")
    for bad, words in [("mlp-0", "widths"), ("mlp-8-gelu", "activation"), ("mlp-08", "'mlp-8'"),
                       ("mlp-8-tanh", "'mlp-8'"), ("mlp:8", "mlp-WIDTHS"), ("mlp-" + "x".join(["4"] * 9), "layers")]:
        with pytest.raises(SpecError, match=words):
            get_problem(bad)


@pytest.mark.parametrize("problem", ["mlp-7x5x4", "mlp-7x5x4-relu", "mlp"])
def test_float64_gradient_matches_finite_differences_of_the_loss(problem):
    prob = get_problem(problem)
    rng = np.random.default_rng(0)
    n, d, k = 12, 6, 3
    X = rng.standard_normal((n, d))
    y = rng.integers(0, k, n)
    layout = prob.layout(d, k)
    size = sum(int(np.prod(s)) for _, s in layout)
    params = rng.standard_normal(size) * 0.7
    g = gradient(np, problem, FormatOps(FP64, FP64), params, X, np.eye(k)[y], 1.0 / n, layout)
    h = 1e-6
    fd = np.empty(size)
    for i in range(size):
        e = np.zeros(size)
        e[i] = h
        fd[i] = (prob.loss(params + e, X, y, layout) - prob.loss(params - e, X, y, layout)) / (2 * h)
    # central differences: error O(h^2 * f''') + rounding O(u / h) ~ 1e-10; a relu kink within h of a
    # pre-activation would be O(1): the seed keeps them away (checked by this very tolerance)
    np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8)


def _backends():
    return [b for b in ("numpy", "numba", "jax") if backend_availability(b, "cpu").available]


def _spec(problem, policy, backend, steps=30, batch=32, opt="adam"):
    return RunSpec(problem, make_optimizer(opt), get_policy(policy), backend=backend, data="digits", steps=steps,
                   batch_size=batch, record_every=10)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("problem", ["mlp-24x16", "mlp-24x16-relu"])
def test_named_mlps_train_in_every_backend(backend, problem):
    for policy in ("fp32", "bf16"):
        spec = _spec(problem, policy, backend)
        dataset = dataset_for(spec)
        traj = train(spec, dataset)
        assert traj.diverged_at is None and np.all(np.isfinite(traj.final_params))
        prob = get_problem(problem)
        start = prob.loss(dataset.init_params, dataset.X_train, dataset.y_train, dataset.layout)
        end = prob.loss(traj.final_params.astype(np.float64), dataset.X_train, dataset.y_train, dataset.layout)
        assert end < start, (policy, start, end)


@pytest.mark.skipif("numba" not in _backends(), reason="numba not installed")
@pytest.mark.parametrize("policy", ["fp32", "bf16", "bf16-mixed", "fp16"])
@pytest.mark.parametrize("problem", ["mlp-24x16", "mlp-24x16-relu"])
def test_numpy_with_numba_order_reproduces_numba(problem, policy, monkeypatch):
    monkeypatch.setattr(numpy_backend, "FormatOps", SequentialOps)
    spec = _spec(problem, policy, "numpy", steps=20)
    dataset = dataset_for(spec)
    with np.errstate(all="ignore"):
        ref, got = train(spec, dataset), train(dataclasses.replace(spec, backend="numba"), dataset)
    assert ref.diverged_at == got.diverged_at
    for r, p in zip(ref.params, got.params):
        np.testing.assert_array_equal(p, r)
    assert fingerprint(got.final_params) == fingerprint(ref.final_params)


@pytest.mark.skipif("numba" not in _backends(), reason="numba not installed")
def test_numba_accumulation_and_serving_of_a_named_mlp():
    spec = dataclasses.replace(_spec("mlp-24x16-relu", "fp32", "numba", steps=10), accum_steps=2)
    assert train(spec, dataset_for(spec)).diverged_at is None
    from precision.backends.numba_backend.forward import forward_logits as numba_logits
    from precision.backends.numpy_backend.forward import forward_logits as numpy_logits
    ds = make_dataset("mlp-24x16-relu", "digits", seed=0)
    fp32 = get_format("fp32")
    z_numba = numba_logits("mlp-24x16-relu", ds.init_params, ds.X_test, fp32, fp32, ds.layout)
    z_numpy = numpy_logits("mlp-24x16-relu", ds.init_params, ds.X_test, FP64, FP64, ds.layout)
    assert z_numba.shape == z_numpy.shape == (len(ds.X_test), 10)
    assert np.max(np.abs(z_numba - z_numpy)) < 1e-4 * np.max(np.abs(z_numpy))


@pytest.mark.skipif("jax" not in _backends(), reason="jax not installed")
@pytest.mark.parametrize("problem", ["mlp-24x16", "mlp-24x16-relu"])
def test_fp64_jax_matches_numpy(problem):
    # tests/test_jax_backend.py::test_fp64_training_matches_numpy's tolerance (summation order and FMA contraction)
    spec = _spec(problem, "fp64", "numpy", steps=60, batch=128)
    dataset = dataset_for(spec)
    ref, got = train(spec, dataset), train(dataclasses.replace(spec, backend="jax"), dataset)
    for p, r in zip(got.params, ref.params):
        assert np.linalg.norm(p - r) / np.linalg.norm(r) <= 1e-12
