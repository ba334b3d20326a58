"""The backend contract and the chunked training driver that every backend shares."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Protocol

import numpy as np

from ..data import Dataset
from ..spec import RunSpec
from ..trajectory import Trajectory

__all__ = ["Backend", "Availability", "record_schedule", "drive_chunks"]


@dataclasses.dataclass(frozen=True)
class Availability:
    available: bool
    reason: str = ""


class Backend(Protocol):
    """A training backend. Its loop follows :mod:`precision.backends.step_rules` (the per-step conversion chain,
    the divergence rule, the host scalars and initial values), and it passes tests/test_conformance.py before its
    name is added to ``BACKENDS`` (docs/conformance.md)."""

    name: str

    def availability(self, device: str) -> Availability:
        """Whether ``device`` ("cpu", "gpu") can run here, and if not, why."""

    def devices(self) -> tuple[str, ...]:
        """Devices present on this machine."""

    def train(self, spec: RunSpec, dataset: Dataset) -> Trajectory:
        """Train ``spec`` on ``dataset``; never raises for a diverging run (record ``diverged_at``), whether the
        cause is the data (inf or NaN), the formats (overflow, an underflowed eps) or the learning rate."""


def record_schedule(steps: int, record_every: int) -> list[int]:
    """Record steps 0, r, 2r, ..., and always the last step."""
    marks = list(range(0, steps, record_every)) + [steps]
    return sorted(set(marks))


def drive_chunks(spec: RunSpec, run_chunk: Callable[[int, int], int | None],
                 snapshot: Callable[[], np.ndarray], final_params: Callable[[], np.ndarray],
                 compile_s: float = 0.0) -> Trajectory:
    """Run steps in chunks between record steps, timing each chunk; the first chunk is the warm-up.

    ``run_chunk(start, stop)`` runs steps start+1 .. stop (1-based) to completion (a JAX backend blocks inside) and
    returns the first step whose new weights or params were not all finite (the divergence rule of
    :mod:`.step_rules`; that step completed), or None. ``snapshot()`` returns the current params as
    float64. Snapshots and the finiteness bookkeeping stay outside the timed region.
    """
    marks = record_schedule(spec.steps, spec.record_every)
    steps_recorded, params, times = [0], [snapshot()], []
    diverged_at = None
    for start, stop in zip(marks[:-1], marks[1:]):
        t0 = time.perf_counter()
        bad_step = run_chunk(start, stop)
        elapsed = time.perf_counter() - t0
        times.append(elapsed / (stop - start))
        if bad_step is not None:
            diverged_at = int(bad_step)
            steps_recorded.append(diverged_at)
            params.append(snapshot())
            break
        steps_recorded.append(stop)
        params.append(snapshot())
    # Chunk 1 pays cache warm-up (and any lazy compilation left); drop it when others remain.
    step_times = tuple(times[1:]) if len(times) > 1 else tuple(times)
    return Trajectory(record_steps=np.asarray(steps_recorded, dtype=np.int64), params=np.stack(params),
                      final_params=final_params(), step_times_s=step_times, compile_s=float(compile_s),
                      diverged_at=diverged_at)
