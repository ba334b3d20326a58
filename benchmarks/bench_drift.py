"""Drift of the trained params from the float64 numpy reference, per case, oriented lower-is-better for asv.

``setup_cache`` runs the whole grid once through ``precision.run`` (the code behind ``precision run``, so these
figures equal the report's); every ``track_`` reads its number from that. Drift is deterministic on the CPU, so
one run per commit is the measurement: a moved figure is a numeric change, not noise. A diverged run fails its
benchmark (asv would show a NaN as a silent "n/a"); a backend that is not installed skips (NotImplementedError in
setup).
"""

from __future__ import annotations

from precision.benchcases import CaseFigures, cases, get_case, measure

from .common import PARAM_NAMES, PARAMS, jax_compilation_cache


def _case_figures(figures: dict, problem, optimizer, policy, backend) -> CaseFigures:
    """The case's figures from setup_cache; NotImplementedError (asv: skipped) when the case did not run here.
    Read from the cache rather than asking the backend again, so no process imports a framework it won't use."""
    fig = figures[get_case(problem, optimizer, policy, backend).label]
    if fig.status == "unavailable":
        raise NotImplementedError(fig.message)
    return fig


def _figure(fig: CaseFigures, name: str) -> float:
    """One figure of a case that ran; raising (asv: failed) for a diverged or failed run instead of a NaN."""
    if fig.status == "diverged":
        raise RuntimeError(f"{fig.label} diverged at step {fig.diverged_at}")
    if fig.status != "ok":
        raise RuntimeError(f"{fig.label}: {fig.status}: {fig.message}")
    value = getattr(fig, name)
    if value is None:
        raise RuntimeError(f"{fig.label} has no {name}{': ' + fig.message if fig.message else ''}")
    return value


class Drift:
    params = PARAMS
    param_names = PARAM_NAMES
    timeout = 120

    def setup_cache(self):
        jax_compilation_cache()  # its executables serve TrainStep's jax warm-ups (common.jax_compilation_cache)
        return measure(cases())

    setup_cache.timeout = 1200  # the grid: 48 runs of 200 steps, with a JIT compile per jax case

    def setup(self, figures, problem, optimizer, policy, backend):
        self.figures = _case_figures(figures, problem, optimizer, policy, backend)

    def track_bits_lost(self, figures, problem, optimizer, policy, backend):
        """53 - bits of agreement with the fp64 reference: 53 - (-log2 rel_l2), final params."""
        return _figure(self.figures, "bits_lost")

    track_bits_lost.unit = "bits lost"

    def track_rel_l2(self, figures, problem, optimizer, policy, backend):
        """||p_T - ref_T|| / ||ref_T||."""
        return _figure(self.figures, "rel_l2")

    track_rel_l2.unit = "rel_l2"

    def track_flip_rate(self, figures, problem, optimizer, policy, backend):
        """Share of test samples whose predicted label differs from the reference model's."""
        return _figure(self.figures, "flip_rate")

    track_flip_rate.unit = "flip rate"


class CrossBackend:
    """Distance between a backend's and numpy's final params for the same policy: ||p - p_numpy|| / ||p_numpy||.
    Kept in its own class so that numpy (distance to itself) is skipped in setup rather than tracked as 0."""

    params = PARAMS
    param_names = PARAM_NAMES
    timeout = 120
    setup_cache = Drift.setup_cache  # the same function: asv keys the cache on it, so the grid runs once

    def setup(self, figures, problem, optimizer, policy, backend):
        if backend == "numpy":
            raise NotImplementedError("the cross-backend distance compares other backends with numpy")
        self.figures = _case_figures(figures, problem, optimizer, policy, backend)

    def track_cross_backend_rel_l2(self, figures, problem, optimizer, policy, backend):
        return _figure(self.figures, "cross_backend_rel_l2")

    track_cross_backend_rel_l2.unit = "rel_l2 to numpy"
