"""Datasets: train/test splits, initial params and the minibatch schedule, all float64 and made once from a seed.

Every backend trains on exactly these arrays in exactly this order, so any difference between runs is arithmetic.
"""

from __future__ import annotations

import dataclasses
import threading

import numpy as np

from ._lazy_rows import LazyRows
from .errors import SpecError, choice_error
from .problems import PROBLEMS, Problem, get_problem

__all__ = ["Dataset", "DATA_SOURCES", "DATA_SETS", "DataSet", "make_dataset", "SYNTHETIC_SHAPE", "MAX_SEED",
           "check_seed", "fit_error", "split_sizes", "classes_for", "batch_schedule", "draw_init_params", "data_set",
           "check_data_source", "BatchSchedule", "lazy_schedule", "SCHEDULE_BLOCK", "blocks"]

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

# numpy.random.default_rng takes any non-negative integer; a report stores the seed as a JSON integer that its schema
# caps at a signed 64-bit value (precision/schemas/report-v2.schema.json). Seeds in 0..MAX_SEED satisfy both.
MAX_SEED = 2**63 - 1

# Steps whose batch rows (and scalar rows) a backend makes at once: a chunk between record steps is trained in blocks
# of at most this many steps, so a run's memory is bounded whatever --record-every is (4096 x batch 128 int64:
# 4 MiB). Blocking changes nothing but memory: the rows and the order of the steps are the same.
SCHEDULE_BLOCK = 4096


@dataclasses.dataclass(frozen=True)
class DataSet:
    """What is known about a data source without loading it: enough to check a grid before any run starts."""
    name: str
    samples: int
    features: int
    classes: int | None  # 0: regression targets; None: made to fit the problem (synthetic)
    needs: str | None = None  # the optional package that loads it (its pip extra is 'data')
    train: int | None = None  # rows of its own train split (a data file with X_test); None: split 80/20 by seed

    def split(self) -> tuple[int, int]:
        """(train rows, test rows)."""
        return (self.train, self.samples - self.train) if self.train is not None else split_sizes(self.samples)


# Checked against the loaded data by tests/test_grid_validation.py, so the table cannot drift from the real sets.
DATA_SETS = {
    "synthetic": DataSet("synthetic", *SYNTHETIC_SHAPE, None),
    "breast_cancer": DataSet("breast_cancer", 569, 30, 2, "sklearn"),
    "digits": DataSet("digits", 1797, 64, 10, "sklearn"),
    "diabetes": DataSet("diabetes", 442, 10, 0, "sklearn"),
}


def split_sizes(samples: int) -> tuple[int, int]:
    """(train rows, test rows) of a data set of ``samples`` rows."""
    n_test = int(round(samples * TEST_FRACTION))
    return samples - n_test, n_test


def check_data_source(data: str) -> str:
    """``data`` if it names a built-in data set or a data file (precision.owndata), else a SpecError naming the
    choices. A file is not opened here."""
    from .owndata import is_file_source, parse_source
    if data in DATA_SOURCES:
        return data
    if isinstance(data, str) and is_file_source(data):
        parse_source(data)
        return data
    raise choice_error("data set", data, [*DATA_SOURCES, "or a data file PATH.npz / PATH.csv:COLUMN"])


def data_set(data: str) -> DataSet:
    """What the grid checks need to know about ``data``: the table's entry, or a data file's shape and classes (the
    file is read and checked once per process; precision.owndata)."""
    if data in DATA_SETS:
        return DATA_SETS[data]
    from .owndata import load_file
    f = load_file(check_data_source(data))
    return DataSet(data, f.samples, f.X.shape[1], f.classes, None, f.train_rows)


def classes_for(problem: Problem, data: str) -> int:
    """Classes of ``data`` when made for ``problem`` (0: regression), from the table: nothing is loaded (a data file
    is read once). A regression problem treats any numeric target of a data file as a regression target."""
    if data not in DATA_SETS and problem.task == "regression":
        return 0
    known = data_set(data).classes
    if known is not None:
        return known
    return 0 if problem.task == "regression" else (2 if problem.task == "binary" else SYNTHETIC_CLASSES)


def check_seed(seed) -> int:
    """``seed`` if numpy.random.default_rng and a report both take it, else a SpecError naming it and the range."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise SpecError(f"seed {seed!r} must be an integer in 0..{MAX_SEED}")
    if not 0 <= seed <= MAX_SEED:
        raise SpecError(f"seed {seed} is out of range; valid seeds: 0..{MAX_SEED} (numpy.random.default_rng takes "
                        f"non-negative integers; a report stores a signed 64-bit integer)")
    return int(seed)


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
    # (steps, batch_size) int64 row indices into the train split: a BatchSchedule (made lazily, a chunk of steps at a
    # time: memory does not grow with steps) or an explicit array (datasets made by hand); None = full batch
    batches: "BatchSchedule | np.ndarray | None"
    # What make_dataset was asked for, with problem, data and seed: a spec trains only on a dataset made for its own
    # (problem, data, seed, steps, batch_size); see made_for() and precision.runner.check_dataset.
    steps: int = 0  # length of the schedule asked for (0: none)
    requested_batch_size: int | None = None  # make_dataset's batch_size (None: full batch); batch_size is the used one

    @property
    def n_params(self) -> int:
        return int(self.init_params.size)

    @property
    def batch_size(self) -> int:
        return self.X_train.shape[0] if self.batches is None else self.batches.shape[1]

    def made_for(self) -> dict:
        """The make_dataset arguments this dataset was built from, named as RunSpec's fields."""
        return {"problem": self.problem, "data": self.data, "seed": self.seed, "steps": self.steps,
                "batch_size": self.requested_batch_size}

    def batch(self, step: int) -> np.ndarray | slice:
        """Row indices of the train split used at 1-based ``step``."""
        return slice(None) if self.batches is None else self.batches[step - 1]

    def batch_rows(self, start: int, stop: int) -> np.ndarray | None:
        """The rows of steps start+1 .. stop as a (stop - start, batch_size) int64 array (None: full batch). Made
        from the seed per call (BatchSchedule): a backend asks for one chunk of steps at a time."""
        if self.batches is None:
            return None
        if isinstance(self.batches, BatchSchedule):
            return self.batches.rows(start, stop)
        return np.ascontiguousarray(self.batches[start:stop], dtype=np.int64)


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


def _file(problem: Problem, data: str):
    """(X, y, classes, test rows at the end of X) of a data file; a regression problem reads any target as values."""
    from .owndata import load_file
    f = load_file(data)
    X = f.X if f.X_test is None else np.concatenate([f.X, f.X_test])
    y = f.y if f.y_test is None else np.concatenate([f.y, f.y_test])
    given_test = 0 if f.X_test is None else len(f.X_test)
    if problem.task == "regression" or not f.classes:
        return X, y.astype(np.float64), 0, given_test
    return X, f.labels(y), f.classes, given_test


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


def fit_error(problem: Problem, data: str, classes: int) -> str | None:
    """Why ``problem`` cannot train on ``data`` (with ``classes`` classes, 0 for regression targets), naming the
    problems that can; None when it can. make_dataset applies it to the loaded labels, the grid check to DATA_SETS."""
    def fitting():
        ok = [p for p in PROBLEMS.values() if (p.task == "regression") == (not classes)
              and (p.task != "binary" or classes == 2)]
        names = [p.name for p in ok]
        return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]

    if problem.task == "regression" and classes:
        return (f"problem {problem.name!r} is a regression; data {data!r} has class labels "
                f"(use {fitting()})")
    if problem.task != "regression" and not classes:
        return (f"problem {problem.name!r} needs class labels; data {data!r} is a regression set "
                f"(use {fitting()})")
    if problem.task == "binary" and classes != 2:
        return (f"problem {problem.name!r} is binary; data {data!r} has {classes} classes "
                f"(use {fitting()})")
    return None


def draw_init_params(layout, rng: np.random.Generator) -> np.ndarray:
    """Weights N(0, 1/fan_in), biases zero."""
    blocks = []
    for name, shape in layout:
        if name.startswith("b"):
            blocks.append(np.zeros(shape).ravel())
        else:
            blocks.append((rng.standard_normal(shape) / np.sqrt(shape[0])).ravel())
    return np.concatenate(blocks)


def batch_schedule(rng: np.random.Generator, n_train: int, steps: int, batch_size: int | None) -> np.ndarray | None:
    """The rows of every step, (steps, batch_size) int64, drawn from ``rng``: one permutation of the train split per
    epoch, its ragged tail dropped so that every step sees batch_size rows. The eager form, kept as the definition
    that :class:`BatchSchedule` (what make_dataset uses) is tested against. None (full batch) when batch_size is None
    or at least the train split, or when there are no steps."""
    if batch_size is None or batch_size >= n_train or steps <= 0:
        return None
    per_epoch = n_train // batch_size
    # One permutation per epoch, written in place: the schedule is the largest array of a long run, so it is
    # allocated once (steps x batch_size int64) instead of as a list of epochs plus their concatenation.
    batches = np.empty((steps, batch_size), dtype=np.int64)
    for start in range(0, steps, per_epoch):
        rows = min(per_epoch, steps - start)
        perm = rng.permutation(n_train)[:per_epoch * batch_size].reshape(per_epoch, batch_size)
        batches[start:start + rows] = perm[:rows]
    return batches


class BatchSchedule(LazyRows):
    """The (steps, batch_size) int64 schedule of :func:`batch_schedule`, made lazily: the same rows from the same
    random draws (one permutation of the train split per epoch, from the generator's state after the init draw, its
    ragged tail dropped), but only the epochs a caller asks for, so memory does not grow with steps.

    The current epoch's permutation is cached; the generator keeps a cursor at the next epoch, so chunks visited in
    order draw each permutation once. The generator's state is kept at every CHECKPOINT-th epoch start, so going
    back (an audit, a test) redraws at most CHECKPOINT permutations. Array-like for tests and small runs:
    ``shape``, ``dtype``, ``len``, integer and slice indexing, and ``numpy.asarray`` (which materialises it all).
    ``reverse``: every step's rows in reverse order (precision.floors.reordered)."""

    CHECKPOINT = 64  # epochs between stored generator states
    dtype = np.dtype(np.int64)
    ndim = 2

    def __init__(self, rng: np.random.Generator, n_train: int, steps: int, batch_size: int, reverse: bool = False):
        if not 0 < batch_size < n_train or steps <= 0:
            raise ValueError(f"a schedule needs 0 < batch_size < n_train and steps > 0 (got {batch_size}, "
                             f"{n_train}, {steps})")
        self.n_train, self.steps, self.batch_size = int(n_train), int(steps), int(batch_size)
        self.per_epoch = self.n_train // self.batch_size
        self.reverse = bool(reverse)
        self._bit_generator = type(rng.bit_generator)
        self._checkpoints = {0: rng.bit_generator.state}  # epoch -> the generator's state at its start
        self._reset()

    def _reset(self):
        self._lock = threading.Lock()
        self._gen, self._next = None, 0  # the generator, positioned at the start of epoch self._next
        self._epoch, self._perm = -1, None  # the cached epoch and its (per_epoch, batch_size) rows

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in ("_lock", "_gen", "_perm"):
            state.pop(key)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._reset()

    def reversed(self) -> "BatchSchedule":
        """The same schedule with every step's rows in reverse order."""
        out = object.__new__(BatchSchedule)
        out.__dict__.update(self.__getstate__())
        out._checkpoints = dict(self._checkpoints)
        out.reverse = not self.reverse
        out._reset()
        return out

    @property
    def shape(self) -> tuple[int, int]:
        return (self.steps, self.batch_size)

    @property
    def epochs(self) -> int:
        return -(-self.steps // self.per_epoch)

    def _epoch_rows(self, epoch: int) -> np.ndarray:
        if epoch == self._epoch:
            return self._perm
        if self._gen is None or epoch < self._next:
            start = max(k for k in self._checkpoints if k <= epoch)
            bit_generator = self._bit_generator()
            bit_generator.state = self._checkpoints[start]
            self._gen, self._next = np.random.Generator(bit_generator), start
        while True:
            if self._next % self.CHECKPOINT == 0 and self._next not in self._checkpoints:
                self._checkpoints[self._next] = self._gen.bit_generator.state
            perm = self._gen.permutation(self.n_train)
            self._next += 1
            if self._next > epoch:
                break
        rows = perm[:self.per_epoch * self.batch_size].reshape(self.per_epoch, self.batch_size)
        self._epoch, self._perm = epoch, np.ascontiguousarray(rows[:, ::-1]) if self.reverse else rows
        return self._perm

    def rows(self, start: int, stop: int) -> np.ndarray:
        """The rows of steps start+1 .. stop (0 <= start <= stop <= steps): (stop - start, batch_size) int64."""
        if not 0 <= start <= stop <= self.steps:
            raise IndexError(f"steps {start + 1}..{stop} are outside the schedule's 1..{self.steps}")
        out = np.empty((stop - start, self.batch_size), dtype=np.int64)
        with self._lock:
            at = start
            while at < stop:
                epoch, offset = divmod(at, self.per_epoch)
                take = min(self.per_epoch - offset, stop - at)
                out[at - start:at - start + take] = self._epoch_rows(epoch)[offset:offset + take]
                at += take
        return out


    def min(self):
        return np.asarray(self).min()

    def max(self):
        return np.asarray(self).max()


def blocks(start: int, stop: int, size: int = SCHEDULE_BLOCK):
    """(lo, hi) ranges of at most ``size`` steps covering steps start+1 .. stop in order."""
    return [(lo, min(lo + size, stop)) for lo in range(start, stop, size)]


def lazy_schedule(rng: np.random.Generator, n_train: int, steps: int,
                  batch_size: int | None) -> BatchSchedule | None:
    """:func:`batch_schedule` made lazily (:class:`BatchSchedule`): the same rows, drawn from ``rng``'s state now
    (``rng`` itself is not advanced). None (full batch) in the same cases."""
    if batch_size is None or batch_size >= n_train or steps <= 0:
        return None
    return BatchSchedule(rng, n_train, steps, batch_size)


def make_dataset(problem: str, data: str = "synthetic", seed: int = 0, steps: int = 0,
                 batch_size: int | None = None) -> Dataset:
    """Build the dataset of a run. ``batch_size`` None (or >= the train split) means full batch.

    The arguments are checked before anything is loaded or allocated (SpecError naming the bad value); the dataset
    records them (``made_for()``), so a spec is never trained on a dataset made for another one."""
    prob = get_problem(problem)
    check_data_source(data)
    seed = check_seed(seed)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise SpecError(f"steps {steps!r} must be a non-negative integer")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))):
        raise SpecError(f"batch size {batch_size!r} must be a positive integer (or None for full batch)")
    if batch_size is not None and batch_size <= 0:
        raise SpecError(f"batch size {batch_size} must be positive (or omitted for full batch)")
    rng = np.random.default_rng(seed)
    if data in DATA_SOURCES:
        X, y, classes = _synthetic(prob, rng) if data == "synthetic" else _sklearn(data)
        given_test = 0
    else:
        X, y, classes, given_test = _file(prob, data)
    mismatch = fit_error(prob, data, classes)
    if mismatch:
        raise SpecError(mismatch)
    if given_test:  # the file's own split: train rows first, then its test rows (in the file's order)
        order = np.arange(len(X))
        train, test = order[:len(X) - given_test], order[len(X) - given_test:]
    else:
        order = rng.permutation(len(X))
        n_test = int(round(len(X) * TEST_FRACTION))
        test, train = order[:n_test], order[n_test:]
    # Standardize with train-split statistics (float64), so the problems are well conditioned at any format.
    mean, std = X[train].mean(axis=0), X[train].std(axis=0)
    std[std == 0] = 1.0
    X = (X - mean) / std
    if prob.task == "regression":
        if y[train].std() == 0:
            raise SpecError(f"data {data!r}: the regression target is constant on the training split (seed {seed}): "
                            f"nothing to learn")
        y = (y - y[train].mean()) / y[train].std()
    layout = prob.layout(X.shape[1], classes if prob.task == "multiclass" else 0)
    init_params = draw_init_params(layout, rng)  # drawn before the schedule: independent of steps and batch size
    batches = lazy_schedule(rng, len(train), steps, batch_size)  # drawn a chunk at a time, as the backends ask
    return Dataset(problem=prob.name, data=data, seed=seed, X_train=X[train], y_train=y[train], X_test=X[test],
                   y_test=y[test], classes=classes, layout=layout, init_params=init_params,
                   batches=batches, steps=int(steps),
                   requested_batch_size=None if batch_size is None else int(batch_size))
