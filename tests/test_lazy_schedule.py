"""The batch schedule and the optimizer's scalar table are made a chunk at a time (precision.data.BatchSchedule,
precision.optim.ScalarTable), so a run's memory does not grow with its steps. Pinned here: the lazy schedule has
exactly the rows of the eager one (precision.data.batch_schedule: the same draws in the same order), whatever order
its chunks are asked in; the lazy scalar rows equal the eager table; and training on the lazy schedule gives the
fingerprints of training on the eager one, for a default-matrix-like set of specs on every backend installed."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import numpy as np
import pytest

import precision.data as data_module
from precision.backends import backend_availability
from precision.data import BatchSchedule, batch_schedule, lazy_schedule, make_dataset
from precision.drift import fingerprint
from precision.floors import reordered, reseeded
from precision.formats import get_format
from precision.matrix import build_specs
from precision.optim import ScalarTable, make_optimizer, scalar_rows, scalar_table
from precision.runner import dataset_for, train

# (steps, batch, n_train): whole epochs, ragged epochs (n_train % batch != 0), a chunk boundary inside an epoch,
# one step per epoch (batch > n_train / 2), more than BatchSchedule.CHECKPOINT epochs, a single step
CASES = [(10, 4, 16), (37, 5, 23), (200, 32, 455), (300, 7, 100), (50, 60, 100), (1, 3, 10), (700, 3, 7),
         (130, 1, 2)]


def _post_init_rng(seed: int) -> np.random.Generator:
    rng = np.random.default_rng(seed)
    rng.standard_normal(17)  # some draws before the schedule, as make_dataset's split and init make
    return rng


@pytest.mark.parametrize("steps,batch,n_train", CASES)
def test_lazy_schedule_has_the_eager_rows(steps, batch, n_train):
    eager = batch_schedule(_post_init_rng(5), n_train, steps, batch)
    lazy = lazy_schedule(_post_init_rng(5), n_train, steps, batch)
    assert lazy.shape == eager.shape and lazy.dtype == eager.dtype
    np.testing.assert_array_equal(np.asarray(lazy), eager)
    # in chunks, in order (what a training loop asks), then out of order and overlapping (audits, tests)
    fresh = lazy_schedule(_post_init_rng(5), n_train, steps, batch)
    bounds = sorted({0, steps, *range(0, steps, max(1, steps // 7))})
    for start, stop in zip(bounds[:-1], bounds[1:]):
        np.testing.assert_array_equal(fresh.rows(start, stop), eager[start:stop])
    rng = np.random.default_rng(1)
    for _ in range(20):
        start = int(rng.integers(0, steps))
        stop = int(rng.integers(start, steps + 1))
        np.testing.assert_array_equal(fresh.rows(start, stop), eager[start:stop])
        np.testing.assert_array_equal(fresh[start], eager[start])
    np.testing.assert_array_equal(fresh[-1], eager[-1])
    np.testing.assert_array_equal(fresh[:steps // 2], eager[:steps // 2])


def test_lazy_schedule_does_not_advance_the_callers_generator_and_pickles():
    rng = _post_init_rng(9)
    before = copy.deepcopy(rng.bit_generator.state)
    lazy = lazy_schedule(rng, 50, 100, 8)
    assert rng.bit_generator.state == before
    lazy.rows(40, 60)
    again = pickle.loads(pickle.dumps(lazy))
    np.testing.assert_array_equal(np.asarray(again), np.asarray(lazy))
    assert lazy_schedule(rng, 50, 0, 8) is None and lazy_schedule(rng, 50, 10, 50) is None
    assert lazy_schedule(rng, 50, 10, None) is None
    with pytest.raises(IndexError):
        lazy.rows(90, 101)


@pytest.mark.parametrize("problem,data,steps,batch", [("logreg", "breast_cancer", 200, 128),
                                                       ("mlp", "digits", 200, 128), ("softmax", "synthetic", 77, 100),
                                                       ("linreg", "synthetic", 10, 1000)])
def test_make_dataset_schedule_equals_the_eager_one(monkeypatch, problem, data, steps, batch):
    lazy = make_dataset(problem, data, seed=3, steps=steps, batch_size=batch)
    monkeypatch.setattr(data_module, "lazy_schedule", batch_schedule)  # make_dataset as it was: eager
    eager = make_dataset(problem, data, seed=3, steps=steps, batch_size=batch)
    assert isinstance(lazy.batches, BatchSchedule) and isinstance(eager.batches, np.ndarray)
    np.testing.assert_array_equal(np.asarray(lazy.batches), eager.batches)
    np.testing.assert_array_equal(lazy.batch_rows(5, 9), eager.batches[5:9])
    np.testing.assert_array_equal(lazy.batch(steps), eager.batches[steps - 1])
    np.testing.assert_array_equal(lazy.init_params, eager.init_params)
    # the floors' reseeded and reordered datasets too
    np.testing.assert_array_equal(np.asarray(reordered(lazy).batches), eager.batches[:, ::-1])
    np.testing.assert_array_equal(np.asarray(reseeded(lazy, 2).batches), reseeded(eager, 2).batches)


def test_scalar_rows_equal_the_eager_table():
    for name in ("adam", "sgd"):
        opt = make_optimizer(name)
        for fmt in ("fp64", "fp32", "bf16", "fp16"):
            fmt = get_format(fmt)
            table = scalar_table(opt, 300, fmt)
            lazy = ScalarTable(opt, 300, fmt)
            np.testing.assert_array_equal(np.asarray(lazy), table)
            for start, stop in [(0, 1), (0, 20), (20, 40), (123, 300), (299, 300), (7, 7)]:
                np.testing.assert_array_equal(scalar_rows(opt, start, stop, fmt), table[start:stop])
                np.testing.assert_array_equal(lazy.rows(start, stop), table[start:stop])
            np.testing.assert_array_equal(lazy[41], table[41])


def _backends():
    return [b for b in ("numpy", "numba", "jax") if backend_availability(b, "cpu").available]


# A default-matrix-like set: both default cases, both optimizers, a policy of every kind, a remedy policy with
# dynamic loss scaling (the applied-update-count path), gradient accumulation, a ragged last chunk.
SPECS = (build_specs(["logreg"], ["sgd", "adam"], ["fp32", "bf16", "bf16-mixed"], data=["breast_cancer"], steps=60,
                     record_every=20)
         + build_specs(["mlp"], ["adam"], ["fp32", "bf16"], data=["digits"], steps=45, record_every=20)
         + build_specs(["logreg"], ["adam"], ["torch-amp-fp16"], data=["breast_cancer"], steps=45, record_every=20)
         + build_specs(["logreg"], ["sgd"], ["fp32"], data=["breast_cancer"], steps=40, record_every=20,
                       accum_steps=(2,)))


@pytest.mark.parametrize("backend", _backends())
def test_training_on_the_lazy_schedule_keeps_the_fingerprints(monkeypatch, backend):
    specs = [dataclasses.replace(s, backend=backend) for s in SPECS]
    lazy = {s.id: fingerprint(train(s, dataset_for(s)).final_params) for s in specs}
    monkeypatch.setattr(data_module, "lazy_schedule", batch_schedule)
    eager = {}
    for s in specs:
        dataset = dataset_for(s)
        assert isinstance(dataset.batches, np.ndarray)
        eager[s.id] = fingerprint(train(s, dataset).final_params)
    assert lazy == eager
