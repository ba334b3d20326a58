"""Noise floors: how far float64 runs already move when only the seed, or only the summation order, changes.

A drift figure says how far a low-precision run lands from its float64 reference. Whether that distance matters
depends on what the reference itself is stable to:

* the **seed floor**: the reference's configuration (problem, data split, optimizer, steps, batch size) trained in
  float64 from K seeds (:data:`FLOOR_SEEDS`): the reference's own seed and K - 1 others that redraw the initial
  params and the batch order (the train/test split stays, so the test predictions of every run are comparable).
  The K(K-1)/2 seed pairs give the spread that reseeding alone causes: final-param distance, test-loss gap and
  test-prediction flip rate (MLPerf's rule: compare a change with run-to-run variance).
* the **order floor**: the reference re-run with the rows of every batch in reverse order (full batch: the train
  split reversed). The same rows, the same math, another summation order: what float64 rounding alone moves.

:func:`judge` turns a result and its floors into a verdict:

* ``order-dominated`` when the order floor is large enough to move the result's bits of agreement, as the table
  prints them (one decimal), by a shown digit: the drift figure is then not a property of the formats;
* else ``above seed noise`` when a one-sided rank test rejects, at :data:`SEED_LEVEL`, that the result's
  function-space difference from the reference (flip rate for classifiers, test-loss gap for regression) is one
  more draw of the seed pairs' differences;
* else ``within seed noise``.

Everything is float64 numpy (the reference backend), computed once per reference configuration and shared by the
results measured against it.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable

import numpy as np

from .data import BatchSchedule, Dataset, draw_init_params, lazy_schedule
from .errors import SpecError
from .problems import get_problem
from .trajectory import Trajectory

__all__ = ["FLOOR_SEEDS", "MAX_FLOOR_SEEDS", "SEED_LEVEL", "ORDER_SHARE", "VERDICTS", "reseeded", "reordered",
           "Floors", "Verdict", "check_floor_seeds", "measure_floors", "judge", "rank_p_value"]

FLOOR_SEEDS = 5  # K: the minimum; 10 seed pairs
# The rank test's smallest p-value is 1 / (pairs + 1): 1/11 with K = 5. A level below that could never reject,
# so the level is 0.1 (one-sided); K = 7 (21 pairs, smallest p 1/22) allows 0.05.
SEED_LEVEL = 0.1
# The table prints bits of agreement to one decimal. If reordering moves the reference by o (relative), the
# triangle inequality lets a result's rel_l2 x move by up to o, its bits by up to -log2(1 - o/x); that stays below
# half a shown digit (0.05 bits) while o/x <= 1 - 2^-0.05 = 0.0341. Above it the printed bits are not stable.
ORDER_SHARE = 1.0 - 2.0 ** -0.05
VERDICTS = ("within seed noise", "above seed noise", "order-dominated")


def reseeded(dataset: Dataset, k: int) -> Dataset:
    """``dataset`` with its initial params and batch schedule redrawn from seed (dataset.seed, k); the split, the
    data and the schedule's shape stay. k = 0 is not a reseed: it returns ``dataset`` itself."""
    if k == 0:
        return dataset
    rng = np.random.default_rng(np.random.SeedSequence([dataset.seed, k]))
    init = draw_init_params(dataset.layout, rng)
    steps = dataset.steps
    batches = lazy_schedule(rng, len(dataset.X_train), steps, dataset.requested_batch_size)
    return dataclasses.replace(dataset, init_params=init, batches=batches)


def reordered(dataset: Dataset) -> Dataset:
    """``dataset`` with every batch's rows in reverse order (full batch: the train split reversed): each step sees
    the same rows, so only the order of the sums changes."""
    if dataset.batches is None:
        return dataclasses.replace(dataset, X_train=dataset.X_train[::-1].copy(),
                                   y_train=dataset.y_train[::-1].copy())
    if isinstance(dataset.batches, BatchSchedule):
        return dataclasses.replace(dataset, batches=dataset.batches.reversed())
    return dataclasses.replace(dataset, batches=np.ascontiguousarray(dataset.batches[:, ::-1]))


@dataclasses.dataclass(frozen=True)
class Floors:
    """The floors of one reference configuration. Pair lists are over the K(K-1)/2 seed pairs (i < j); ``*_by_step``
    are per record step (``steps``): the seed pairs' rel_l2 (min, median, max) and the order floor's rel_l2.
    Distances are relative to the reference's norm, as a result's rel_l2 is; loss gaps relative to its test loss."""

    seeds: int
    steps: tuple[int, ...]
    seed_rel_l2: tuple[float, ...]
    seed_loss_gap: tuple[float, ...]
    seed_flip_rate: tuple[float, ...] | None  # None for regression
    order_rel_l2: float
    order_loss_gap: float
    order_flip_rate: float | None
    seed_rel_l2_by_step: tuple[tuple[float, float, float], ...]
    order_rel_l2_by_step: tuple[float, ...]

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = [list(v) if isinstance(v, tuple) else v for v in value]
        return out


def _test_loss(problem, params, dataset: Dataset) -> float:
    return problem.loss(params, dataset.X_test, dataset.y_test, dataset.layout)


def _flip_rate(problem, a, b, dataset: Dataset) -> float:
    return float(np.mean(problem.predict(a, dataset.X_test, dataset.layout)
                         != problem.predict(b, dataset.X_test, dataset.layout)))


def _finite(x: float) -> float:
    return x if math.isfinite(x) else math.inf


MAX_FLOOR_SEEDS = 64  # 2016 pairs; each seed is one more float64 training run per reference


def check_floor_seeds(seeds) -> int:
    """``seeds`` if it is 0 (no floors) or a number of floor seeds in 2..MAX_FLOOR_SEEDS, else a SpecError naming
    it and the range."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or not (seeds == 0 or 2 <= seeds <= MAX_FLOOR_SEEDS):
        raise SpecError(f"noise-floor seeds {seeds!r} must be an integer in 2..{MAX_FLOOR_SEEDS} (0: no floors); "
                        f"pairs of seeds make the floor")
    return seeds


def measure_floors(dataset: Dataset, train: Callable[[Dataset], Trajectory], seeds: int = FLOOR_SEEDS) -> Floors:
    """The floors of the reference that ``train`` runs (a float64 reference spec's training on a given dataset):
    ``seeds`` runs of :func:`reseeded` datasets (k = 0 is the reference itself) and one of :func:`reordered`."""
    check_floor_seeds(seeds)
    if not seeds:
        raise SpecError("measure_floors needs at least 2 seeds")
    problem = get_problem(dataset.problem)
    runs = [train(reseeded(dataset, k)) for k in range(seeds)]
    order = train(reordered(dataset))
    ref = runs[0]
    ref_norm_loss = abs(_test_loss(problem, ref.params[-1], dataset)) or np.finfo(np.float64).tiny
    losses = [_test_loss(problem, r.params[-1], dataset) for r in runs]
    pairs = list(itertools.combinations(range(seeds), 2))
    steps = tuple(int(s) for s in ref.record_steps)

    def by_step(i: int, j: int) -> list[float]:
        # a diverged seed run stops early: its missing steps count as infinitely far
        rows_i, rows_j = dict(zip(runs[i].record_steps.tolist(), runs[i].params)), dict(
            zip(runs[j].record_steps.tolist(), runs[j].params))
        return [_distance(rows_i.get(s), rows_j.get(s), ref_row) for s, ref_row in zip(steps, ref.params)]

    seed_steps = np.array([by_step(i, j) for i, j in pairs])  # (pairs, steps)
    order_rows = dict(zip(order.record_steps.tolist(), order.params))
    order_by_step = tuple(_distance(order_rows.get(s), ref_row, ref_row) for s, ref_row in zip(steps, ref.params))
    classifier = problem.is_classifier
    return Floors(
        seeds=seeds, steps=steps,
        seed_rel_l2=tuple(float(v) for v in seed_steps[:, -1]),
        seed_loss_gap=tuple(_finite(abs(losses[i] - losses[j]) / ref_norm_loss) for i, j in pairs),
        seed_flip_rate=tuple(_flip_rate(problem, runs[i].params[-1], runs[j].params[-1], dataset)
                             for i, j in pairs) if classifier else None,
        order_rel_l2=order_by_step[-1],
        order_loss_gap=_finite(abs(_test_loss(problem, order.params[-1], dataset) - losses[0]) / ref_norm_loss),
        order_flip_rate=_flip_rate(problem, order.params[-1], ref.params[-1], dataset) if classifier else None,
        seed_rel_l2_by_step=tuple((float(np.min(col)), float(np.median(col)), float(np.max(col)))
                                  for col in seed_steps.T),
        order_rel_l2_by_step=order_by_step)


def _distance(a, b, ref_row) -> float:
    """‖a − b‖ / ‖ref_row‖: 0 when equal; inf when a row is missing (a diverged run stopped early) or not finite."""
    if a is None or b is None or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return math.inf
    diff = float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64)))
    if diff == 0.0:
        return 0.0
    norm = float(np.linalg.norm(ref_row))
    return diff / norm if norm > 0 else math.inf


def rank_p_value(x: float, sample) -> float:
    """One-sided rank p-value of ``x`` against ``sample``: (1 + #{s >= x}) / (n + 1). Exact under the null that
    ``x`` and the sample are exchangeable (distribution-free); its smallest value is 1 / (n + 1)."""
    sample = np.asarray(sample, dtype=np.float64)
    return float((1 + np.count_nonzero(sample >= x)) / (sample.size + 1))


@dataclasses.dataclass(frozen=True)
class Verdict:
    label: str  # one of VERDICTS
    metric: str  # "flip_rate" or "loss_gap": what the seed test compared
    p_value: float  # of the seed test
    level: float
    ratio_seed: float | None  # the result's metric / the seed pairs' median (None when that median is 0)
    ratio_order: float | None  # the result's rel_l2 / the order floor's (None when the order floor is 0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def judge(rel: float, flip_rate: float | None, loss_gap: float, floors: Floors,
          level: float = SEED_LEVEL) -> Verdict:
    """The verdict of a finished (not diverged) result with final ``rel`` (rel_l2), ``flip_rate`` and ``loss_gap``
    against the floors of its reference (rules in the module docstring)."""
    if floors.seed_flip_rate is not None and flip_rate is not None:
        metric, x, sample = "flip_rate", flip_rate, floors.seed_flip_rate
    else:
        metric, x, sample = "loss_gap", loss_gap, floors.seed_loss_gap
    p = rank_p_value(x, sample)
    median = float(np.median(sample))
    ratio_seed = x / median if median > 0 else None
    order = floors.order_rel_l2
    ratio_order = rel / order if order > 0 and math.isfinite(order) else None
    if rel > 0 and order >= ORDER_SHARE * rel:
        label = "order-dominated"
    elif p <= level:
        label = "above seed noise"
    else:
        label = "within seed noise"
    return Verdict(label=label, metric=metric, p_value=p, level=level,
                   ratio_seed=None if ratio_seed is None or not math.isfinite(ratio_seed) else ratio_seed,
                   ratio_order=ratio_order if ratio_order is None or math.isfinite(ratio_order) else None)
