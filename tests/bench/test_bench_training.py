"""pytest-benchmark: the asv grid (precision.benchcases) timed locally, with its drift stored and checked.

Timing: one ``precision.train`` call of the whole case (CASE_STEPS steps) per round, after one warm-up round that
pays any JIT compile. The figures are seconds per step: the test's timer reads ``perf_counter() / CASE_STEPS`` (as
asv's ``benchmarks.common.seconds_per_step``), so pytest-benchmark's statistics of a call come out divided by its
steps, the call's fixed costs spread over them. The cases form their own table (group "train, per step (200-step
call)"), apart from the kernel tables (one update step per round). pytest-benchmark cannot fail on extra_info nor
show it in its table, so the drift figures go into ``benchmark.extra_info`` (saved with --benchmark-autosave, shown
by ``pytest-benchmark compare``) and are asserted here against a band derived from the formats:

* upper bound, exact: no params vector stored in the policy's params format F can be closer to the float64
  reference than the reference rounded to F (rel_l2 is a sum of per-element squares, each minimised by the
  nearest element of F). So bits <= -log2(rel_l2(round_F(ref_T), ref_T)). A run above it did not round to F.
* lower bound, first order: each of the T steps rounds what it computes to formats whose coarsest unit roundoff is
  u = 2^-p; with a non-expansive update (gradient descent on a convex L-smooth loss with lr <= 2/L) the local
  errors add up at most linearly, so rel_l2 <= T * u and bits >= p - log2(T). For T = 200: fp32 >= 16.4,
  fp16 compute >= 3.4, bf16 >= 0.36. Adam and the MLP are not non-expansive; measured on numpy for seeds 0-3 the
  bound holds with >= 1.5 bits to spare (bf16 Adam, logreg: 1.9-2.1 bits against 0.36) and up to 8 bits on the
  mixed policies, whose fp32 master weights absorb most of the per-step rounding.

With ``--benchmark-compare`` each case is also checked against the saved run it is compared with (the drift gate,
``precision.benchcases.drift_regressions``): rel_l2 and flip rate must not exceed the saved figures by more than
DRIFT_GATE_RELATIVE, the threshold asv.conf.json gives the same figures. On one machine and one set of dependencies a run is bitwise reproducible (every round gives
one fingerprint, asserted below), so any excess is a code change. Compare with a run saved on the same machine and
dependencies: another summation order (another BLAS kernel, another backend) moves an fp32 run's rel_l2 by tens of
percent (logreg SGD fp32: numpy 8.9e-8, jax 1.1e-7), which this gate would report.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from precision.backends import backend_availability
from precision.benchcases import (CASE_BACKENDS, LARGE_POLICIES, LARGE_PROBLEM, LARGE_STEPS, large_spec)
from precision.benchcases import (CASE_PROBLEMS, CASE_STEPS, BenchCase, cases, drift_regressions, frozen_dataset,
                                  get_case, skip_reason)
from precision.drift import MAX_BITS, bits_of_agreement, compare, fingerprint, rel_l2
from precision.formats import round_to
from precision.peers import LOOP_PEERS, loop_peer, loop_peer_skip_reason
from precision.runner import train

pytestmark = pytest.mark.bench

ROUNDS = 5
GROUP = f"train, per step ({CASE_STEPS}-step call)"
# bits are -log2 of a ratio of two float64 norms of n <= 2,410 terms (mlp:digits); each norm is accurate to
# ~n * 2^-53 relative, so the computed bits of a run that attains the upper bound may exceed it by ~2n * 2^-53 /
# ln 2 < 1e-12 bits.
NORM_SLACK_BITS = 1e-12


@pytest.fixture(scope="module")
def trained():
    """Trajectories shared by the cases of this module (references, numpy counterparts), each trained once."""
    memo = {}

    def get(spec):
        if spec not in memo:
            memo[spec] = train(spec, frozen_dataset(spec))
        return memo[spec]

    return get


def bits_band(case: BenchCase, reference_final: np.ndarray) -> tuple[float, float]:
    """(lower, upper) bound on the bits of agreement of the case's final params; derivation in the module doc."""
    policy = case.spec().policy
    formats = [policy.params, policy.compute, policy.state, policy.weights]
    coarsest_precision = min(fmt.precision for fmt in formats)
    lower = max(0.0, coarsest_precision - math.log2(CASE_STEPS))
    best = round_to(reference_final, policy.params).astype(np.float64)
    upper = bits_of_agreement(rel_l2(best, reference_final))
    return lower, upper


def seconds_per_step() -> float:
    """pytest-benchmark timer for a round that runs one CASE_STEPS-step call: the round's duration comes out in
    units of CASE_STEPS seconds, i.e. seconds per step. Only the samples are scaled (pedantic mode: no calibration
    reads this clock)."""
    return time.perf_counter() / CASE_STEPS


@pytest.mark.benchmark(group=GROUP, timer=seconds_per_step)
@pytest.mark.parametrize("case", cases(), ids=lambda c: c.label)
def test_train(benchmark, case, trained, saved_extra_info):
    reason = skip_reason(case)
    if reason is not None:
        pytest.skip(reason)
    spec = case.spec()
    dataset = frozen_dataset(spec)
    fingerprints = []

    def timed():
        trajectory = train(spec, dataset)
        fingerprints.append(fingerprint(trajectory.final_params))
        return trajectory

    trajectory = benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    reference = trained(spec.reference())
    drift = compare(trajectory, reference, dataset, spec.policy.params)
    extra = {
        "spec_id": spec.id, "steps": spec.steps, "bits_of_agreement": drift.bits_of_agreement,
        "bits_lost": MAX_BITS - drift.bits_of_agreement, "rel_l2": drift.rel_l2, "flip_rate": drift.flip_rate,
        "fingerprint": fingerprints[-1], "compile_s": trajectory.compile_s,
        "precision_time_per_step_s": trajectory.time_per_step_s,
    }
    if benchmark.stats is not None:  # None under --benchmark-disable (one untimed call; the assertions still run)
        extra["median_s_per_step"] = benchmark.stats.stats.median  # the timer already divides by the steps
        extra["median_s_per_call"] = benchmark.stats.stats.median * spec.steps
    if case.backend != "numpy":
        numpy_final = trained(case.numpy_counterpart().spec()).params[-1]
        extra["cross_backend_rel_l2"] = rel_l2(trajectory.params[-1], numpy_final)
    benchmark.extra_info.update(extra)

    assert trajectory.diverged_at is None, f"{case.label} diverged at step {trajectory.diverged_at}"
    # Every round trained from the same read-only inputs; a backend that kept state between calls would differ.
    assert len(set(fingerprints)) == 1, f"{case.label}: rounds disagree: {sorted(set(fingerprints))}"
    lower, upper = bits_band(case, reference.params[-1])
    assert lower <= drift.bits_of_agreement <= upper + NORM_SLACK_BITS, (
        f"{case.label}: {drift.bits_of_agreement:.3f} bits of agreement outside [{lower:.3f}, {upper:.3f}]")
    worse = drift_regressions(extra, saved_extra_info)
    assert not worse, f"{case.label}: drift regressed against the saved run: " + "; ".join(worse)



@pytest.mark.benchmark(group=GROUP, timer=seconds_per_step)
@pytest.mark.parametrize("problem,peer", [(p, q) for p in CASE_PROBLEMS for q in LOOP_PEERS],
                         ids=[f"peer-{q}-{p}" for p in CASE_PROBLEMS for q in LOOP_PEERS])
def test_peer_train(benchmark, problem, peer, trained):
    """A peer's whole training step (torch autograd + fused Adam, 1 thread; optax under jit) on the fp32 Adam
    case's data, initial params and batches, in the train table. Asserted: it trained the same model as
    precision's numpy fp32 run (final params within 1e-4 relative: both fp32, other summation orders)."""
    reason = loop_peer_skip_reason(peer)
    if reason is not None:
        pytest.skip(reason)
    run, steps = loop_peer(peer, problem)
    assert steps == CASE_STEPS
    final = benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    ours = trained(get_case(problem, "adam", "fp32", "numpy").spec()).params[-1]
    distance = rel_l2(final, np.asarray(ours, dtype=np.float64))
    benchmark.extra_info.update(rel_l2_to_numpy_fp32=distance)
    assert distance <= 1e-4, f"{peer} on {problem}: rel_l2 {distance:.3g} from precision's fp32 run"


def seconds_per_large_step() -> float:
    return time.perf_counter() / LARGE_STEPS


@pytest.mark.benchmark(group=f"train, per step, {LARGE_PROBLEM} ({LARGE_STEPS}-step call)",
                       timer=seconds_per_large_step)
@pytest.mark.parametrize("policy", LARGE_POLICIES)
@pytest.mark.parametrize("backend", CASE_BACKENDS)
def test_large_model_step(benchmark, policy, backend):
    """A model of more than 1e5 parameters (LARGE_PROBLEM, Adam): where the matrix products dominate the step.
    Asserted: it trains (no divergence), every round to the same params (the run is deterministic)."""
    availability = backend_availability(backend, "cpu")
    if not availability.available:
        pytest.skip(availability.reason)
    spec = large_spec(policy, backend)
    assert sum(int(np.prod(shape)) for _, shape in frozen_dataset(spec).layout) > 100_000
    dataset = frozen_dataset(spec)
    seen = set()

    def call():
        trajectory = train(spec, dataset)
        seen.add(fingerprint(trajectory.final_params))
        return trajectory

    trajectory = benchmark.pedantic(call, rounds=2, warmup_rounds=1, iterations=1)
    assert trajectory.diverged_at is None and len(seen) == 1
