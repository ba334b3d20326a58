"""Runtime of training: seconds per optimizer step (compile excluded), and compile time on its own.

What is timed: one ``precision.train`` call of a whole case (CASE_STEPS steps, params recorded every
CASE_RECORD_EVERY steps) from the dataset's initial params. ``train`` starts from those every call and the
dataset's arrays are read-only, so every repeat measures the same work. The figure asv stores is that call's wall
time divided by CASE_STEPS (see ``common.seconds_per_step``): it includes the call's fixed costs (casting the
training split to the compute format, the scalar table, the float64 snapshots at record steps) spread over the
steps, about 5-10% above the median chunk time ``precision run`` reports for numpy on these cases. Compilation is
paid by ``warm_up`` in setup, before the clock, and tracked separately by ``Compile``.
"""

from __future__ import annotations

import timeit

from precision.backends import backend_availability
from precision.benchcases import CASE_BACKENDS, CASE_PROBLEMS, LARGE_POLICIES, LARGE_STEPS, frozen_dataset, large_spec
from precision.peers import LOOP_PEERS, loop_peer, loop_peer_skip_reason
from precision.runner import train

from .common import (PARAM_NAMES, PARAMS, PerCommitTiming, case_or_skip, jax_compilation_cache,
                     seconds_per_step, warm_up)


class TrainStep(PerCommitTiming):
    params = PARAMS
    param_names = PARAM_NAMES
    timer = staticmethod(seconds_per_step)
    # PerCommitTiming's repeat: a slow case (numpy float16 MLP, ~2 ms/step) takes ~0.4 s per sample, so 3 samples
    timeout = 300

    def setup(self, problem, optimizer, policy, backend):
        self.spec = case_or_skip(problem, optimizer, policy, backend).spec()
        self.dataset = frozen_dataset(self.spec)
        if backend == "jax":
            jax_compilation_cache()  # Drift's setup_cache compiled this case: load it (common.jax_compilation_cache)
        warm_up(self.spec, self.dataset)

    def time_train_step(self, problem, optimizer, policy, backend):
        train(self.spec, self.dataset)


class Compile:
    """Compile time the backend reports for its first ``train`` call in a fresh process (asv runs every parameter
    combination in its own process: a fork of its server, which has imported jax and numba but compiled nothing,
    see ``common.PREIMPORTED``). numpy has no compile stage (it reports 0), so it is not in this grid. One call per
    process: the figure is the first call's, so there is nothing to repeat."""

    params = PARAMS[:-1] + [[backend for backend in PARAMS[-1] if backend != "numpy"]]
    param_names = PARAM_NAMES
    unit = "seconds"
    timeout = 300

    def setup(self, problem, optimizer, policy, backend):
        self.spec = case_or_skip(problem, optimizer, policy, backend).spec()
        self.dataset = frozen_dataset(self.spec)
        if backend == "jax":
            jax_compilation_cache(enabled=False)  # a real compile, never an executable loaded from the disk cache

    def track_compile_s(self, problem, optimizer, policy, backend):
        return train(self.spec, self.dataset).compile_s


class PeerTrainStep(PerCommitTiming):
    """What a user would run instead, on the same fp32 Adam cases (the data, initial params and CASE_STEPS-step
    batch schedule of ``TrainStep``'s ``(problem, 'adam', 'fp32', *)`` cases): ``torch`` (autograd + fused Adam,
    one thread) and ``optax`` (value_and_grad + optax.adam, the whole call one jitted ``lax.scan``), from
    :mod:`precision.peers`. Seconds per step, as ``TrainStep``; skipped (n/a) when the peer is not importable.
    A peer call does the training only: no record-step snapshots, no casts to a policy's formats."""

    params = [list(CASE_PROBLEMS), list(LOOP_PEERS)]
    param_names = ["problem", "peer"]
    timer = staticmethod(seconds_per_step)
    timeout = 300

    def setup(self, problem, peer):
        reason = loop_peer_skip_reason(peer)
        if reason is not None:
            raise NotImplementedError(reason)
        key = (problem, peer)
        if peer == "optax":
            jax_compilation_cache()
        if key not in _PEERS:
            _PEERS[key] = loop_peer(peer, problem)[0]  # built and warmed once per process
        self.run = _PEERS[key]

    def time_train_step(self, problem, peer):
        self.run()


_PEERS: dict = {}


class LargeModelStep(PerCommitTiming):
    """Seconds per step of a model of more than 1e5 parameters (``precision.benchcases.LARGE_PROBLEM``, Adam,
    LARGE_STEPS steps per call, compile paid in setup): where the matrix products, and numba's fixed summation order,
    dominate the step."""

    params = [list(LARGE_POLICIES), list(CASE_BACKENDS)]
    param_names = ["policy", "backend"]
    timer = staticmethod(lambda: timeit.default_timer() / LARGE_STEPS)
    timeout = 300

    def setup(self, policy, backend):
        availability = backend_availability(backend, "cpu")
        if not availability.available:
            raise NotImplementedError(availability.reason)
        self.spec = large_spec(policy, backend)
        self.dataset = frozen_dataset(self.spec)
        if backend == "jax":
            jax_compilation_cache()  # compiled by an earlier run of the same jax code, if any
        warm_up(self.spec, self.dataset)

    def time_train_step(self, policy, backend):
        train(self.spec, self.dataset)
