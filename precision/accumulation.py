"""What gradient accumulation does to a run: the accumulated run against the same run in one batch.

``RunSpec.accum_steps`` K > 1 splits each step's batch into K micro-batches whose gradients are summed in the
accumulator format (``precision.backends.step_rules.ACCUMULATION``; docs/accumulation.md). In exact arithmetic that
is the same gradient, so the two runs differ only by rounding: the order of the gradient's sums in fp64, and in
narrow formats each micro-gradient's own rounding to the compute format.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .data import Dataset
from .drift import bits_of_agreement, max_ulp, rel_l2
from .errors import SpecError
from .problems import get_problem
from .spec import RunSpec
from .trajectory import Trajectory

__all__ = ["accumulation_effect", "accumulation_figures"]


def accumulation_effect(spec: RunSpec, dataset: Dataset | None = None) -> dict:
    """Train ``spec`` (its ``accum_steps`` K must be > 1) and the same spec with ``accum_steps=1`` (same backend,
    policy, data, schedule), and compare their final params: the accumulated run measured against the one-batch run.

    Returns a JSON-ready dict: ``accum_steps``; ``rel_l2`` (||p_K - p_1|| / ||p_1||), ``bits_of_agreement``
    (-log2 of it, 0..53), ``max_ulp`` (the worst element in ulps of the params format) and ``flip_rate`` (share of
    test samples whose predicted label differs; None for regression), as :mod:`precision.drift` defines them.
    Figures that are not finite (a run diverged) are None, as a report stores them; ``bits_of_agreement`` is then 0.
    ``dataset``: made for ``spec`` (precision.runner.dataset_for), or None to have it made; both runs use it."""
    from .runner import dataset_for, train  # here: runner imports the backends, which import spec

    if not isinstance(spec, RunSpec):
        raise SpecError(f"spec {spec!r} is not a RunSpec")
    if spec.accum_steps <= 1:
        raise SpecError(f"accumulation_effect needs accum_steps > 1 (the spec has {spec.accum_steps}): it compares "
                        f"the accumulated run with the same run in one batch")
    if dataset is None:
        dataset = dataset_for(spec)
    accumulated = train(spec, dataset)
    one_batch = train(dataclasses.replace(spec, accum_steps=1), dataset)
    return accumulation_figures(spec, accumulated, one_batch, dataset)


def accumulation_figures(spec: RunSpec, accumulated: Trajectory, one_batch: Trajectory, dataset: Dataset) -> dict:
    """The figures of :func:`accumulation_effect` from the two trajectories, already trained: ``accumulated``
    (``spec``) against ``one_batch`` (``spec`` with accum_steps=1), on ``dataset``'s test split."""
    p_k, p_1 = accumulated.params[-1], one_batch.params[-1]  # float64 values of the final params
    finite = accumulated.diverged_at is None and one_batch.diverged_at is None
    rel = rel_l2(p_k, p_1) if finite else math.inf
    ulps = max_ulp(p_k, p_1, spec.policy.params) if finite else math.inf
    flip_rate = None
    problem = get_problem(spec.problem)
    if problem.is_classifier and finite and np.isfinite(p_k).all() and np.isfinite(p_1).all():
        flips = (problem.predict(p_k, dataset.X_test, dataset.layout)
                 != problem.predict(p_1, dataset.X_test, dataset.layout))
        flip_rate = float(np.mean(flips))
    return {"accum_steps": spec.accum_steps, "rel_l2": _finite_or_none(rel),
            "bits_of_agreement": bits_of_agreement(rel), "max_ulp": _finite_or_none(ulps), "flip_rate": flip_rate}


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None
