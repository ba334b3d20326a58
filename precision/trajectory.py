"""Trajectory: what a backend returns from ``train``, before any comparison."""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["Trajectory"]


@dataclasses.dataclass(frozen=True, eq=False)
class Trajectory:
    record_steps: np.ndarray  # (k,) int: 0, record_every, 2*record_every, ..., last step run
    params: np.ndarray  # (k, n_params) float64: exact values of the params (storage format) at those steps
    final_params: np.ndarray  # params after the last step, in their storage dtype (the fingerprint hashes them)
    step_times_s: tuple[float, ...]  # seconds per step of each timed chunk (warm-up excluded)
    compile_s: float  # compile / first-call time, kept out of step times
    diverged_at: int | None  # first step after which params were not finite; training stops there
    # Dynamic loss scaling (None without it): the scale after each record step (step 0: the initial scale) and every
    # step that was skipped for an inf/NaN gradient.
    loss_scale: np.ndarray | None = None
    skipped_steps: np.ndarray | None = None
    # precision.audit's figures at each record step (None when the backend does not report its stored state)
    audit: tuple | None = None

    @property
    def time_per_step_s(self) -> float | None:
        return float(np.median(self.step_times_s)) if self.step_times_s else None
