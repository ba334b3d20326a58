"""The benchmark cases: one grid shared by the asv suite (benchmarks/) and the pytest-benchmark suite (tests/bench/).

The grid is problem x optimizer x policy x backend. Every case is an ordinary :class:`RunSpec`, so a benchmark
figure and the matching row of ``precision run`` are the same measurement of the same run. The policies are the
ones that train without diverging on these problems (fp16 Adam overflows at step 1: its eps underflows to 0, see
docs/numerics.md), so a divergence in a benchmark is a regression, not an expected result.

``PRECISION_BENCH_CASES`` (a regular expression searched in each case's label, e.g. ``/numpy$``) restricts which
cases run; the others are skipped with a reason naming the variable. The grid itself (the asv parameters) does not
change, so results of restricted and full runs stay comparable.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from .backends import BACKENDS, backend_availability
from .data import Dataset
from .drift import MAX_BITS, rel_l2
from .errors import SpecError, choice_error
from .matrix import build_specs
from .runner import dataset_for, run
from .spec import RunSpec

__all__ = ["CASE_PROBLEMS", "CASE_OPTIMIZERS", "CASE_POLICIES", "CASE_BACKENDS", "CASE_STEPS", "ONLY_ENV",
           "LARGE_PROBLEM", "LARGE_POLICIES", "LARGE_STEPS", "large_spec",
           "BenchCase", "CaseFigures", "cases", "get_case", "skip_reason", "frozen_dataset", "measure"]

CASE_PROBLEMS = ("logreg:breast_cancer", "mlp:digits")  # a convex model and a hidden-layer one, real data
CASE_OPTIMIZERS = ("sgd", "adam")
CASE_POLICIES = ("fp32", "bf16-mixed", "fp16-mixed", "bf16")  # pure bf16: where stagnation shows
CASE_BACKENDS = tuple(BACKENDS)
CASE_STEPS = 200
CASE_RECORD_EVERY = 20
ONLY_ENV = "PRECISION_BENCH_CASES"
# A model of more than 1e5 parameters (64*512 + 512 + 512*256 + 256 + 256*10 + 10 = 167178 on digits): the whole-
# loop cost where the matrix products dominate. Fewer steps than the grid's, so that a sample stays near a second.
LARGE_PROBLEM = "mlp-512x256:digits"
LARGE_POLICIES = ("fp32", "bf16-mixed")
LARGE_STEPS = 20
# The drift gate's threshold: the one asv.conf.json's regressions_thresholds gives the drift figures, so the two
# tools flag the same changes. Drift is deterministic on one machine and set of dependencies; 1% is far above what
# the same code gives there (nothing) and far below what a changed rounding gives (Adam's moments rounded to bf16
# instead of fp32 moves mixed-policy rel_l2 by 70-80%: 0.8 bits).
DRIFT_GATE_RELATIVE = 0.01


@dataclasses.dataclass(frozen=True)
class BenchCase:
    problem: str  # "problem:data"
    optimizer: str
    policy: str
    backend: str

    @property
    def label(self) -> str:
        return f"{self.problem}/{self.optimizer}/{self.policy}/{self.backend}"

    def spec(self) -> RunSpec:
        problem, data = self.problem.split(":")
        (spec,) = build_specs([problem], [self.optimizer], [self.policy], backends=(self.backend,), data=(data,),
                              steps=CASE_STEPS, record_every=CASE_RECORD_EVERY)
        return spec

    def numpy_counterpart(self) -> "BenchCase":
        """The same case on the numpy backend: what the cross-backend distance is measured against."""
        return dataclasses.replace(self, backend="numpy")


def large_spec(policy: str, backend: str) -> RunSpec:
    """The large-model case: Adam on LARGE_PROBLEM for LARGE_STEPS steps, batch 128, recorded at the end only."""
    problem, data = LARGE_PROBLEM.split(":")
    (spec,) = build_specs([problem], ["adam"], [policy], backends=(backend,), data=(data,), steps=LARGE_STEPS,
                          record_every=LARGE_STEPS)
    return spec


def cases() -> tuple[BenchCase, ...]:
    """The whole grid, in the order of the asv parameters."""
    return tuple(BenchCase(*combo) for combo in
                 itertools.product(CASE_PROBLEMS, CASE_OPTIMIZERS, CASE_POLICIES, CASE_BACKENDS))


def get_case(problem: str, optimizer: str, policy: str, backend: str) -> BenchCase:
    for name, value, choices in (("problem", problem, CASE_PROBLEMS), ("optimizer", optimizer, CASE_OPTIMIZERS),
                                 ("policy", policy, CASE_POLICIES), ("backend", backend, CASE_BACKENDS)):
        if value not in choices:
            raise choice_error(f"benchmark {name}", value, choices)
    return BenchCase(problem, optimizer, policy, backend)


def _only_pattern() -> re.Pattern | None:
    text = os.environ.get(ONLY_ENV, "")
    if not text:
        return None
    try:
        return re.compile(text)
    except re.error as exc:
        raise SpecError(f"{ONLY_ENV}={text!r} is not a regular expression: {exc}") from None


def skip_reason(case: BenchCase) -> str | None:
    """Why ``case`` cannot or should not run here (its backend is unavailable, or ``PRECISION_BENCH_CASES``
    excludes it), else None."""
    pattern = _only_pattern()
    if pattern is not None and not pattern.search(case.label):
        return f"{case.label} is excluded by {ONLY_ENV}={pattern.pattern!r}"
    avail = backend_availability(case.backend, "cpu")
    return None if avail.available else avail.reason


@functools.lru_cache(maxsize=None)
def frozen_dataset(spec: RunSpec) -> Dataset:
    """The spec's dataset with every array read-only, made once per process: a backend that wrote into its inputs
    would fail loudly instead of changing what the next timed repeat reads."""
    dataset = dataset_for(spec)
    for field in dataclasses.fields(dataset):
        value = getattr(dataset, field.name)
        if isinstance(value, np.ndarray):
            value.flags.writeable = False
    return dataset


@dataclasses.dataclass(frozen=True)
class CaseFigures:
    """The drift figures of one case, as ``precision run`` computes them (float64, against the fp64 numpy
    reference), oriented lower-is-better for asv. None where a figure does not apply; ``status`` and ``message``
    say why a case has none."""

    label: str
    spec_id: str
    status: str  # "ok", "diverged", "unavailable", "error"
    message: str = ""
    bits_lost: float | None = None  # MAX_BITS - bits_of_agreement
    rel_l2: float | None = None
    flip_rate: float | None = None
    cross_backend_rel_l2: float | None = None  # ||p - p_numpy|| / ||p_numpy||, same policy; None on numpy
    diverged_at: int | None = None
    fingerprint: str | None = None


def _final_params_by_id(folder: Path) -> dict[str, np.ndarray]:
    """Final params (float64 values) of every trajectory ``run(save_params=folder)`` wrote, keyed by spec id."""
    out = {}
    for path in folder.glob("*.npz"):
        with np.load(path) as saved:
            out[str(saved["id"])] = np.asarray(saved["params"][-1], dtype=np.float64)
    return out


def measure(selected: tuple[BenchCase, ...]) -> dict[str, CaseFigures]:
    """Run ``selected`` (plus the numpy counterparts the cross-backend distance needs) through :func:`run`,
    once, and return the figures keyed by case label. Cases that cannot run come back with their status."""
    figures, runnable = {}, []
    for case in selected:
        try:
            reason = skip_reason(case)
        except Exception as exc:  # a backend that fails to load fails its own cases, not the whole grid
            figures[case.label] = CaseFigures(case.label, case.spec().id, "error", f"{type(exc).__name__}: {exc}")
            continue
        if reason is not None:
            figures[case.label] = CaseFigures(case.label, case.spec().id, "unavailable", reason)
        else:
            runnable.append(case)
    # numpy counterparts run even when PRECISION_BENCH_CASES excludes them as cases of their own
    to_run = list(dict.fromkeys([*runnable, *(c.numpy_counterpart() for c in runnable)]))
    with tempfile.TemporaryDirectory(prefix="precision-bench-") as tmp:
        report = run([c.spec() for c in to_run], save_params=tmp)
        finals = _final_params_by_id(Path(tmp))
    results = {r.id: r for r in report.results}
    for case in runnable:
        spec_id = case.spec().id
        result = results[spec_id]
        if result.status != "ok":
            figures[case.label] = CaseFigures(case.label, spec_id, result.status, result.message,
                                              diverged_at=result.diverged_at)
            continue
        cross, message = None, ""
        if case.backend != "numpy":
            counterpart = results[case.numpy_counterpart().spec().id]
            if counterpart.status == "ok":
                cross = rel_l2(finals[spec_id], finals[counterpart.id])
            else:
                message = f"numpy counterpart {counterpart.status}: {counterpart.message}"
        figures[case.label] = CaseFigures(
            case.label, spec_id, "ok", message, bits_lost=MAX_BITS - result.bits_of_agreement, rel_l2=result.rel_l2,
            flip_rate=result.flip_rate, cross_backend_rel_l2=cross, fingerprint=result.fingerprint)
    return {case.label: figures[case.label] for case in selected}


def drift_regressions(now: dict, saved: list[tuple[str, dict]]) -> list[str]:
    """What got worse: the drift figures (rel_l2, flip rate) of ``now`` above those of a saved run by more than
    DRIFT_GATE_RELATIVE, one line each. ``saved`` is ``[(source name, extra_info), ...]``; a figure a saved run lacks
    is not judged. A flip rate that was 0 counts as worse as soon as one prediction flips."""
    worse = []
    for source, before in saved:
        for key in ("rel_l2", "flip_rate"):
            if key in before and now[key] > before[key] * (1 + DRIFT_GATE_RELATIVE):
                worse.append(f"{key} {before[key]:.4g} in {source} -> {now[key]:.4g} (bits of agreement "
                             f"{before.get('bits_of_agreement', float('nan')):.3f} -> {now['bits_of_agreement']:.3f})")
    return worse
