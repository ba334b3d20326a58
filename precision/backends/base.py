"""The backend contract and the chunked training driver that every backend shares."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Protocol

import numpy as np

from ..data import Dataset
from ..spec import RunSpec
from ..trajectory import Trajectory

__all__ = ["Backend", "Availability", "record_schedule", "drive_chunks", "ScalerLog"]


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


class ScalerLog:
    """Dynamic loss scaling's host-side record: the scaler state (``step_rules.ScalerState``) as the loop leaves it
    and the skipped steps. A backend whose loop runs on the host calls :meth:`step` each step; one that keeps the
    state on its device sets ``state`` and extends ``skipped`` after each chunk. :func:`drive_chunks` reads the
    scale at every record step."""

    def __init__(self, state):
        self.state = state
        self.skipped: list[int] = []

    def step(self, step: int, state, skipped: bool) -> None:
        self.state = state
        if skipped:
            self.skipped.append(int(step))

    @property
    def scale(self) -> float:
        return float(self.state.scale)


def record_schedule(steps: int, record_every: int) -> list[int]:
    """Record steps 0, r, 2r, ..., and always the last step."""
    marks = list(range(0, steps, record_every)) + [steps]
    return sorted(set(marks))


def drive_chunks(spec: RunSpec, run_chunk: Callable[[int, int], int | None],
                 snapshot: Callable[[], np.ndarray], final_params: Callable[[], np.ndarray],
                 compile_s: float = 0.0, *, scaler: ScalerLog | None = None,
                 stored: Callable[[], tuple] | None = None, dataset=None) -> Trajectory:
    """Run steps in chunks between record steps, timing each chunk; the first chunk is the warm-up.

    ``run_chunk(start, stop)`` runs steps start+1 .. stop (1-based) to completion (a JAX backend blocks inside) and
    returns the first step whose new weights or params were not all finite (the divergence rule of
    :mod:`.step_rules`; that step completed), or None. ``snapshot()`` returns the current params as
    float64. Snapshots and the finiteness bookkeeping stay outside the timed region.

    ``scaler``: the run's dynamic loss scaling record (its scale is read at every record step). ``stored()``: the
    stored (weights, params, state) as arrays holding their formats' values, and ``dataset``: the run's data; with
    both, each record step is audited (precision.audit: stagnation and underflow), outside the timed region.
    """
    from ..audit import make_auditor  # here: precision.audit imports the numpy backend, which imports this module

    marks = record_schedule(spec.steps, spec.record_every)
    auditor = make_auditor(spec, dataset) if stored is not None and dataset is not None else None
    steps_recorded, params, times = [0], [snapshot()], []
    scales = [scaler.scale] if scaler else None
    audits = [auditor(0, *stored(), scales[0] if scales else None)] if auditor else None

    def record(step: int) -> None:
        steps_recorded.append(step)
        params.append(snapshot())
        if scales is not None:
            scales.append(scaler.scale)
        if audits is not None:
            audits.append(auditor(step, *stored(), scales[-1] if scales else None))

    diverged_at = None
    for start, stop in zip(marks[:-1], marks[1:]):
        t0 = time.perf_counter()
        bad_step = run_chunk(start, stop)
        elapsed = time.perf_counter() - t0
        times.append(elapsed / (stop - start))
        if bad_step is not None:
            diverged_at = int(bad_step)
            record(diverged_at)
            break
        record(stop)
    # Chunk 1 pays cache warm-up (and any lazy compilation left); drop it when others remain.
    step_times = tuple(times[1:]) if len(times) > 1 else tuple(times)
    return Trajectory(record_steps=np.asarray(steps_recorded, dtype=np.int64), params=np.stack(params),
                      final_params=final_params(), step_times_s=step_times, compile_s=float(compile_s),
                      diverged_at=diverged_at, loss_scale=None if scales is None else np.asarray(scales),
                      skipped_steps=None if scaler is None else np.asarray(scaler.skipped, dtype=np.int64),
                      audit=None if audits is None else tuple(audits))
