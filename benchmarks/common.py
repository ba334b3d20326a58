"""Helpers shared by the asv benchmark files: the parameter grid (from precision.benchcases, the one case list
the pytest-benchmark suite uses too), the per-commit trims of the kernel grids, the timing attributes every
``time_`` benchmark shares, the asv way of skipping a case, and warm-up outside the timed region.

What a per-commit run costs and why the attributes below are what they are: docs/tracking.md, "Per-commit cost".
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import tempfile
import timeit

from precision.benchcases import (CASE_BACKENDS, CASE_OPTIMIZERS, CASE_POLICIES, CASE_PROBLEMS, CASE_STEPS,
                                  BenchCase, get_case, skip_reason)
from precision.runner import train

PARAMS = [list(CASE_PROBLEMS), list(CASE_OPTIMIZERS), list(CASE_POLICIES), list(CASE_BACKENDS)]
PARAM_NAMES = ["problem", "optimizer", "policy", "backend"]

# Kernel sizes timed per commit (precision.kernels.KERNEL_SIZES is 1e4..1e7; all of it stays in `precision bench`
# and pytest-benchmark). Out of place: 1e4, where a step is per-call overhead (dispatch, jit call), and 1e6, where it
# streams from memory; in place: 1e6 and 1e7, the columns of docs/performance.md (1e7: the memory-bound floor).
UPDATE_SIZES = (10**4, 10**6)
INPLACE_SIZES = (10**6, 10**7)
TRAFFIC_SIZES = tuple(sorted(set(UPDATE_SIZES) | set(INPLACE_SIZES)))
# In-place peers per commit: the fastest torch.optim Adam (fused) and optax. The foreach and AdamW variants
# (precision.peers.KERNEL_PEERS) are in `precision bench` and tests/bench.
INPLACE_PEERS = ("torch-adam-fused", "optax-adam")


class PerCommitTiming:
    """asv attributes of the ``time_`` benchmarks, sized so that a commit's run stays within minutes on 2 cores.

    * ``rounds = 1`` (asv's ``processes``): one process per case instead of asv's default 2. Each process pays its
      imports, data, buffers and compilation (jax, numba) again; a second one measures the same figure once more.
      The time thresholds in asv.conf.json (3.0) are far above what a second process would tighten.
    * ``warmup_time = 0``: ``setup`` already ran the case once (compile, first touch); asv's own warm-up loop
      (0.1 s of extra calls, each after a re-run of ``setup``) adds nothing.
    * ``repeat = (min, max, seconds)``: at least ``min`` samples, stopping at ``max`` or after ``seconds`` (asv's
      default is 1-10 samples, 20 s, per round).
    """

    rounds = 1
    warmup_time = 0.0
    repeat = (3, 10, 1.0)


# jax's persistent compilation cache, shared by the benchmark processes of a run (and of later runs: an entry is
# keyed by the computation, the jax / jaxlib version and the flags, so a commit that changes what jax compiles
# misses it and compiles). Override the folder with this variable.
JAX_CACHE_ENV = "PRECISION_ASV_JAX_CACHE"
_jax_cache_set: list = []


def jax_compilation_cache(enabled: bool = True) -> None:
    """Let this process load the XLA executables that an earlier process compiled (``enabled``), or compile
    everything itself (``enabled=False``: ``Compile``, whose figure is the compile time). Drift's setup_cache runs
    first in a commit's run and compiles the whole grid; the jax warm-ups of ``TrainStep`` then load those
    executables instead of compiling them again (tracing and lowering remain). The same executable runs either
    way, so no time or drift figure changes. Call before the process's first jax computation; nothing without jax."""
    if _jax_cache_set or ("jax" not in sys.modules and importlib.util.find_spec("jax") is None):
        return
    import jax
    _jax_cache_set.append(enabled)  # once per process (asv re-runs setup before every sample)
    if not enabled:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    folder = os.environ.get(JAX_CACHE_ENV) or os.path.join(tempfile.gettempdir(), "precision-asv-jax-cache")
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # default 1 s: keep every executable
    jax.config.update("jax_compilation_cache_max_size", 256 * 2**20)  # least recently used go (a commit: ~2 MB)


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


# Imported once in asv's fork server, before it forks a process per benchmark and case (launch_method
# "forkserver" in asv.conf.json), so that no child pays them again. On the development machine (2 cores, load 4-5)
# sklearn.datasets took 6-7 s to import (scipy with it), jax 1.6 s, numba 0.7 s, against ~0.1 s for the rest of a
# child's start; every training case builds its data through sklearn. Importing starts no Python thread and no
# backend (jax creates its CPU client, and installs its fork warning, at the first computation), so forking
# afterwards is safe; each child still compiles in its own process, so Compile's figure is unchanged. torch (4.5 s,
# the peers only) is left to the few children that use it. In spawn mode (`--launch-method spawn`) every child
# imports this module, and nothing is preimported: a numpy kernel case should not pay for jax.
PREIMPORTED = ("sklearn.datasets", "numba", "jax", "jax.numpy", "optax")
if sys.argv[1:2] == ["run_server"]:
    for _name in PREIMPORTED:
        try:
            importlib.import_module(_name)
        except Exception:  # not installed, or broken: the cases that need it skip or fail on their own
            pass
