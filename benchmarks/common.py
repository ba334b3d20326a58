"""Helpers shared by the asv benchmark files: the parameter grid (from precision.benchcases, the one case list
the pytest-benchmark suite uses too), the asv way of skipping a case, and warm-up outside the timed region."""

from __future__ import annotations

import timeit

from precision.benchcases import (CASE_BACKENDS, CASE_OPTIMIZERS, CASE_POLICIES, CASE_PROBLEMS, CASE_STEPS,
                                  BenchCase, get_case, skip_reason)
from precision.runner import train

PARAMS = [list(CASE_PROBLEMS), list(CASE_OPTIMIZERS), list(CASE_POLICIES), list(CASE_BACKENDS)]
PARAM_NAMES = ["problem", "optimizer", "policy", "backend"]

_warmed: set = set()


def case_or_skip(problem: str, optimizer: str, policy: str, backend: str) -> BenchCase:
    """The case, or NotImplementedError (asv's "skipped", shown as n/a) when it cannot run here."""
    case = get_case(problem, optimizer, policy, backend)
    reason = skip_reason(case)
    if reason is not None:
        raise NotImplementedError(reason)
    return case


def warm_up(spec, dataset) -> None:
    """Train once per process before timing, so JIT compilation and first-touch costs stay out of the samples.
    asv re-runs setup before every sample; the memo keeps that cheap. A diverged warm-up fails the benchmark:
    the grid holds only policies that train, and the time of a run cut short at step 1 would mean nothing."""
    if spec in _warmed:
        return
    trajectory = train(spec, dataset)
    if trajectory.diverged_at is not None:
        raise RuntimeError(f"{spec.id} diverged at step {trajectory.diverged_at}")
    _warmed.add(spec)


def seconds_per_step() -> float:
    """asv timer for a call that runs CASE_STEPS training steps: reading it in units of CASE_STEPS seconds makes
    asv's figure (seconds per call) read as seconds per step. Only the samples are scaled: asv sizes its warm-up
    and its time budget with its own wall clock."""
    return timeit.default_timer() / CASE_STEPS
