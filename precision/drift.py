"""Drift metrics of a trajectory against its reference (definitions in docs/design.md; all float64)."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np

from .data import Dataset
from .formats import Format, ulp
from .problems import get_problem
from .trajectory import Trajectory

__all__ = ["rel_l2", "bits_of_agreement", "max_ulp", "fingerprint", "DriftPoint", "Drift", "compare",
           "MAX_BITS"]

MAX_BITS = 53.0  # float64 significand: the most bits two float64 vectors can agree to


def rel_l2(p: np.ndarray, ref: np.ndarray) -> float:
    """||p - ref||_2 / ||ref||_2; 0 when equal; inf when p is not finite; inf when ref is 0 and p is not."""
    p, ref = np.asarray(p, np.float64), np.asarray(ref, np.float64)
    if not np.isfinite(p).all():
        return float("inf")
    diff = float(np.linalg.norm(p - ref))
    if diff == 0.0:
        return 0.0
    norm = float(np.linalg.norm(ref))
    return diff / norm if norm > 0 else float("inf")


def bits_of_agreement(rel: float) -> float:
    """clip(-log2(rel_l2), 0, 53); 53 when equal, 0 when not finite."""
    if rel == 0.0:
        return MAX_BITS
    if not np.isfinite(rel):
        return 0.0
    return float(np.clip(-np.log2(rel), 0.0, MAX_BITS))


def max_ulp(p: np.ndarray, ref: np.ndarray, fmt: Format) -> float:
    """max_i |p_i - ref_i| / ulp_fmt(ref_i): the worst element's error in units of the params format."""
    p, ref = np.asarray(p, np.float64), np.asarray(ref, np.float64)
    if not np.isfinite(p).all():
        return float("inf")
    return float(np.max(np.abs(p - ref) / ulp(ref, fmt))) if p.size else 0.0


def fingerprint(final_params: np.ndarray) -> str:
    """sha256 of the final params' bytes in their storage format (little-endian)."""
    arr = np.ascontiguousarray(final_params)
    if arr.dtype.byteorder == ">":
        arr = arr.byteswap().view(arr.dtype.newbyteorder("<"))
    return hashlib.sha256(arr.tobytes()).hexdigest()


@dataclasses.dataclass(frozen=True)
class DriftPoint:
    step: int
    rel_l2: float
    bits: float


@dataclasses.dataclass(frozen=True)
class Drift:
    trajectory: tuple[DriftPoint, ...]
    rel_l2: float
    bits_of_agreement: float
    max_ulp: float
    final_loss: float
    loss_gap: float
    flip_rate: float | None


def compare(traj: Trajectory, ref: Trajectory, dataset: Dataset, params_format: Format) -> Drift:
    """Drift of ``traj`` against ``ref`` at every record step and at the end (test split for loss and flips)."""
    ref_at = dict(zip(ref.record_steps.tolist(), ref.params))
    points = []
    for step, params in zip(traj.record_steps.tolist(), traj.params):
        r = rel_l2(params, ref_at[step]) if step in ref_at else float("inf")
        points.append(DriftPoint(step, r, bits_of_agreement(r)))
    final, ref_final = traj.params[-1], ref.params[-1]
    if traj.diverged_at is not None:
        final_rel, final_ulp = float("inf"), float("inf")
    else:
        final_rel, final_ulp = rel_l2(final, ref_final), max_ulp(final, ref_final, params_format)
    problem = get_problem(dataset.problem)
    loss = problem.loss(final, dataset.X_train, dataset.y_train, dataset.layout)
    test_loss = problem.loss(final, dataset.X_test, dataset.y_test, dataset.layout)
    ref_test_loss = problem.loss(ref_final, dataset.X_test, dataset.y_test, dataset.layout)
    tiny = np.finfo(np.float64).tiny
    loss_gap = abs(test_loss - ref_test_loss) / max(abs(ref_test_loss), tiny)
    flip_rate = None
    if problem.is_classifier:
        if np.isfinite(final).all():
            flips = problem.predict(final, dataset.X_test, dataset.layout) != problem.predict(
                ref_final, dataset.X_test, dataset.layout)
            flip_rate = float(np.mean(flips))
        else:
            flip_rate = None  # a diverged model has no answers to compare; diverged_at says so
    return Drift(trajectory=tuple(points), rel_l2=final_rel, bits_of_agreement=bits_of_agreement(final_rel),
                 max_ulp=final_ulp, final_loss=loss, loss_gap=float(loss_gap), flip_rate=flip_rate)
