"""Datasets: train/test splits, initial params and the minibatch schedule, all float64 and made once from a seed.

Every backend trains on exactly these arrays in exactly this order, so any difference between runs is arithmetic.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .errors import SpecError, choice_error
from .problems import Problem, get_problem

__all__ = ["Dataset", "DATA_SOURCES", "make_dataset", "SYNTHETIC_SHAPE"]

SYNTHETIC_SHAPE = (1280, 32)  # samples, features: a 1024-sample train split after the 80/20 split
SYNTHETIC_CLASSES = 4
TEST_FRACTION = 0.2

# data source -> (labels kind, problems it can feed)
DATA_SOURCES = {
    "synthetic": "any problem; targets made to fit it",
    "breast_cancer": "scikit-learn, 569 x 30, 2 classes (logreg, softmax, mlp)",
    "digits": "scikit-learn, 1797 x 64, 10 classes (softmax, mlp)",
    "diabetes": "scikit-learn, 442 x 10, regression (linreg)",
}
_SKLEARN_TASK = {"breast_cancer": "classification", "digits": "classification", "diabetes": "regression"}


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
    problem: str
    data: str
    seed: int
    X_train: np.ndarray  # (n, d) float64
    y_train: np.ndarray  # (n,) float64 targets, or int64 labels for classifiers
    X_test: np.ndarray
    y_test: np.ndarray
    classes: int  # 0 for regression
    layout: tuple
    init_params: np.ndarray  # flat float64
    batches: np.ndarray | None  # (steps, batch_size) int64 row indices into the train split; None = full batch

    @property
    def n_params(self) -> int:
        return int(self.init_params.size)

    @property
    def batch_size(self) -> int:
        return self.X_train.shape[0] if self.batches is None else self.batches.shape[1]

    def batch(self, step: int) -> np.ndarray | slice:
        """Row indices of the train split used at 1-based ``step``."""
        return slice(None) if self.batches is None else self.batches[step - 1]


def _synthetic(problem: Problem, rng: np.random.Generator):
    n, d = SYNTHETIC_SHAPE
    X = rng.standard_normal((n, d))
    if problem.task == "regression":
        w = rng.standard_normal(d) / np.sqrt(d)
        return X, X @ w + 0.1 * rng.standard_normal(n), 0
    classes = 2 if problem.task == "binary" else SYNTHETIC_CLASSES
    W = rng.standard_normal((d, classes)) / np.sqrt(d) * 3.0
    logits = X @ W + rng.gumbel(size=(n, classes))  # Gumbel-max: labels sampled from softmax(X W)
    labels = np.argmax(logits, axis=1).astype(np.int64)
    return X, labels, classes


def _sklearn(name: str):
    try:
        import sklearn.datasets as skd
    except ImportError:
        raise SpecError(f"data set {name!r} needs scikit-learn: pip install 'precision[data]'") from None
    bunch = getattr(skd, f"load_{name}")()
    X = np.asarray(bunch.data, dtype=np.float64)
    if _SKLEARN_TASK[name] == "regression":
        return X, np.asarray(bunch.target, dtype=np.float64), 0
    labels = np.asarray(bunch.target, dtype=np.int64)
    return X, labels, int(labels.max()) + 1


def _check_fit(problem: Problem, data: str, classes: int):
    if problem.task == "regression" and classes:
        raise SpecError(f"problem {problem.name!r} is a regression; data {data!r} has class labels "
                        "(use logreg, softmax or mlp)")
    if problem.task != "regression" and not classes:
        raise SpecError(f"problem {problem.name!r} needs class labels; data {data!r} is a regression set "
                        "(use linreg)")
    if problem.task == "binary" and classes != 2:
        raise SpecError(f"problem {problem.name!r} is binary; data {data!r} has {classes} classes "
                        "(use softmax or mlp)")


def _init_params(layout, rng: np.random.Generator) -> np.ndarray:
    """Weights N(0, 1/fan_in), biases zero."""
    blocks = []
    for name, shape in layout:
        if name.startswith("b"):
            blocks.append(np.zeros(shape).ravel())
        else:
            blocks.append((rng.standard_normal(shape) / np.sqrt(shape[0])).ravel())
    return np.concatenate(blocks)


def make_dataset(problem: str, data: str = "synthetic", seed: int = 0, steps: int = 0,
                 batch_size: int | None = None) -> Dataset:
    """Build the dataset of a run. ``batch_size`` None (or >= the train split) means full batch."""
    prob = get_problem(problem)
    if data not in DATA_SOURCES:
        raise choice_error("data set", data, DATA_SOURCES)
    rng = np.random.default_rng(seed)
    X, y, classes = _synthetic(prob, rng) if data == "synthetic" else _sklearn(data)
    _check_fit(prob, data, classes)
    order = rng.permutation(len(X))
    n_test = int(round(len(X) * TEST_FRACTION))
    test, train = order[:n_test], order[n_test:]
    # Standardize with train-split statistics (float64), so the problems are well conditioned at any format.
    mean, std = X[train].mean(axis=0), X[train].std(axis=0)
    std[std == 0] = 1.0
    X = (X - mean) / std
    if prob.task == "regression":
        y = (y - y[train].mean()) / y[train].std()
    layout = prob.layout(X.shape[1], classes if prob.task == "multiclass" else 0)
    init_params = _init_params(layout, rng)  # drawn before the schedule: independent of steps and batch size
    n_train = len(train)
    batches = None
    if batch_size is not None and batch_size <= 0:
        raise SpecError(f"batch size {batch_size} must be positive (or omitted for full batch)")
    if batch_size is not None and batch_size < n_train and steps > 0:
        per_epoch = n_train // batch_size  # drop the ragged tail: every step sees batch_size rows
        epochs = -(-steps // per_epoch)
        perms = [rng.permutation(n_train)[:per_epoch * batch_size].reshape(per_epoch, batch_size)
                 for _ in range(epochs)]
        batches = np.concatenate(perms)[:steps].astype(np.int64)
    return Dataset(problem=prob.name, data=data, seed=seed, X_train=X[train], y_train=y[train], X_test=X[test],
                   y_test=y[test], classes=classes, layout=layout, init_params=init_params,
                   batches=batches)
