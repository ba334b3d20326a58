"""Datasets: splits, shapes, standardization, seeding, the minibatch schedule, and every refusal."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from precision.data import DATA_SOURCES, SYNTHETIC_SHAPE, TEST_FRACTION, make_dataset
from precision.errors import SpecError
from precision.problems import HIDDEN_UNITS, PROBLEMS

U64 = 2.0**-53
N, D = SYNTHETIC_SHAPE
N_TEST = round(N * TEST_FRACTION)
CLASSES = {"linreg": 0, "logreg": 2, "softmax": 4, "mlp": 4}
N_PARAMS = {"linreg": D + 1, "logreg": D + 1, "softmax": D * 4 + 4,
            "mlp": D * HIDDEN_UNITS + HIDDEN_UNITS + HIDDEN_UNITS * 4 + 4}
# data set -> (samples, features, classes, problems it feeds)
SKLEARN = {"breast_cancer": (569, 30, 2, ("logreg", "softmax", "mlp")),
           "digits": (1797, 64, 10, ("softmax", "mlp")),
           "diabetes": (442, 10, 0, ("linreg",))}


def assert_standardized(X: np.ndarray):
    """Columns of the train split: mean 0 and std 1, or all zero for a constant column. Tolerance: each
    standardized value carries ~2 u64 relative error and numpy's mean/std sum n terms (pairwise; bound n u64),
    so |mean| <= (n + 2) u64 max|x| and |std - 1| likewise (std ~ 1)."""
    n = X.shape[0]
    bound = (n + 2) * U64 * np.abs(X).max()
    constant = np.all(X == 0, axis=0)
    assert np.all(np.abs(X.mean(axis=0)) <= bound)
    assert np.all(np.abs(X[:, ~constant].std(axis=0) - 1) <= bound)


@pytest.mark.parametrize("problem", PROBLEMS)
def test_synthetic_shapes_and_types(problem):
    ds = make_dataset(problem, seed=3, steps=10, batch_size=128)
    assert ds.X_train.shape == (N - N_TEST, D) and ds.X_test.shape == (N_TEST, D)
    assert ds.y_train.shape == (N - N_TEST,) and ds.y_test.shape == (N_TEST,)
    assert ds.X_train.dtype == ds.X_test.dtype == ds.init_params.dtype == np.float64
    assert ds.classes == CLASSES[problem]
    if ds.classes:
        assert ds.y_train.dtype == np.int64
        labels = np.concatenate([ds.y_train, ds.y_test])
        assert set(labels.tolist()) == set(range(ds.classes))  # every class occurs
    else:
        assert ds.y_train.dtype == np.float64
        assert_standardized(ds.y_train[:, None])
    assert ds.n_params == N_PARAMS[problem] == sum(int(np.prod(shape)) for _, shape in ds.layout)
    assert_standardized(ds.X_train)
    # Train and test rows come from one permutation: no row in both.
    train_rows = {row.tobytes() for row in ds.X_train}
    assert not any(row.tobytes() in train_rows for row in ds.X_test)


@pytest.mark.parametrize("problem", PROBLEMS)
def test_init_params_weights_scaled_biases_zero(problem):
    ds = make_dataset(problem, seed=0)
    offset = 0
    for name, shape in ds.layout:
        block = ds.init_params[offset:offset + int(np.prod(shape))]
        offset += block.size
        if name.startswith("b"):
            assert np.all(block == 0)
        else:
            # N(0, 1/fan_in): the sample std's relative standard error is 1/sqrt(2 size); allow 5 of them.
            std = block.std() * np.sqrt(shape[0])
            assert abs(std - 1) <= 5 / np.sqrt(2 * block.size), (name, std)


def test_seeding():
    a, b = make_dataset("softmax", seed=11, steps=20, batch_size=64), make_dataset("softmax", seed=11, steps=20,
                                                                                  batch_size=64)
    for field in ("X_train", "y_train", "X_test", "y_test", "init_params", "batches"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field
    c = make_dataset("softmax", seed=12, steps=20, batch_size=64)
    for field in ("X_train", "init_params", "batches"):
        assert not np.array_equal(getattr(a, field), getattr(c, field)), field


def test_batch_schedule():
    steps, batch = 50, 100
    ds = make_dataset("logreg", seed=0, steps=steps, batch_size=batch)
    n_train = ds.X_train.shape[0]
    per_epoch = n_train // batch  # the ragged tail of each epoch is dropped: every step sees `batch` rows
    assert ds.batches.shape == (steps, batch) and ds.batches.dtype == np.int64
    assert ds.batch_size == batch
    assert ds.batches.min() >= 0 and ds.batches.max() < n_train
    for start in range(0, steps, per_epoch):  # within an epoch no row repeats
        epoch = ds.batches[start:start + per_epoch].ravel()
        assert np.unique(epoch).size == epoch.size
    assert np.array_equal(ds.batch(3), ds.batches[2])  # 1-based steps
    # Full batch: no schedule, every step sees the whole train split.
    for full in (make_dataset("logreg", steps=steps, batch_size=None),
                 make_dataset("logreg", steps=steps, batch_size=n_train),
                 make_dataset("logreg", steps=steps, batch_size=10 * n_train)):
        assert full.batches is None and full.batch_size == n_train
        assert full.batch(1) == slice(None)


def test_schedule_and_init_do_not_depend_on_steps():
    short = make_dataset("mlp", seed=5, steps=7, batch_size=50)
    long = make_dataset("mlp", seed=5, steps=300, batch_size=50)
    assert np.array_equal(short.init_params, long.init_params)
    assert np.array_equal(short.X_train, long.X_train)
    assert np.array_equal(long.batches[:7], short.batches)


@pytest.mark.parametrize("data", SKLEARN)
def test_sklearn_data_sets(data):
    pytest.importorskip("sklearn", reason="the scikit-learn data sets need the 'data' extra")
    samples, features, classes, problems = SKLEARN[data]
    for problem in problems:
        ds = make_dataset(problem, data, seed=0)
        n_test = round(samples * TEST_FRACTION)
        assert ds.X_train.shape == (samples - n_test, features) and ds.X_test.shape == (n_test, features)
        assert ds.classes == classes
        assert_standardized(ds.X_train)
        if problem == "softmax":
            assert ds.n_params == features * classes + classes
    other = make_dataset(problems[0], data, seed=1)
    assert not np.array_equal(make_dataset(problems[0], data, seed=0).X_train, other.X_train)  # seed -> split


MISMATCHES = [
    ("linreg", "breast_cancer", "problem 'linreg' is a regression; data 'breast_cancer' has class labels"),
    ("linreg", "digits", "problem 'linreg' is a regression; data 'digits' has class labels"),
    ("logreg", "diabetes", "problem 'logreg' needs class labels; data 'diabetes' is a regression set"),
    ("softmax", "diabetes", "problem 'softmax' needs class labels"),
    ("logreg", "digits", "problem 'logreg' is binary; data 'digits' has 10 classes"),
]


@pytest.mark.parametrize("problem, data, message", MISMATCHES)
def test_problem_data_mismatch(problem, data, message):
    pytest.importorskip("sklearn", reason="the scikit-learn data sets need the 'data' extra")
    with pytest.raises(SpecError) as info:
        make_dataset(problem, data)
    assert message in str(info.value)


def test_bad_names_and_sizes():
    with pytest.raises(SpecError, match=r"unknown data set 'mnist'; valid choices: synthetic, breast_cancer"):
        make_dataset("logreg", "mnist")
    with pytest.raises(SpecError, match=r"unknown problem 'svm'; valid choices: linreg, logreg, softmax, mlp"):
        make_dataset("svm")
    for bad in (0, -4):
        with pytest.raises(SpecError, match=f"batch size {bad} must be positive"):
            make_dataset("logreg", steps=5, batch_size=bad)
    assert set(DATA_SOURCES) == {"synthetic", *SKLEARN}


@pytest.mark.parametrize("data", SKLEARN)
def test_missing_sklearn_names_the_extra(data, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn...` now raises ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(SpecError) as info:
        make_dataset(SKLEARN[data][3][0], data)
    assert str(info.value) == f"data set {data!r} needs scikit-learn: pip install 'precision[data]'"
    make_dataset("logreg", "synthetic")  # synthetic data never needs it
