"""The numba backend: compiled training loops that emulate every format bit-exactly on the CPU.

The training loops hold every value in a float64 carrier and round it to its format after every operation
(:mod:`.rounding`; exact for every format up to fp32, see :mod:`.ops`); matrix products accumulate in the policy's
accumulator dtype (:mod:`.linalg`). The compiled loops of :mod:`.loops` run whole chunks of steps between records.
Formats are runtime arguments, so one compilation per problem family serves every policy (plus one per accumulator
dtype for the matrix products); kernels are cached on disk (``cache=True``, with a guard against stale caches in
:mod:`._cache`). ``compile_s`` is the time of a zero-step call that compiles (or loads from the cache) the loop
before the timed chunks start. Everything is single-threaded with fixed summation orders: results do not depend on
the thread count. How it works, and what differs from numpy and why: docs/numba.md. Gradient accumulation
(``accum_steps`` > 1) runs the ``run_*_accum`` loops, the micro-batch loop compiled inside them
(:mod:`.accum_loops`).
The remedies (``step_rules.REMEDY_RULES``: stochastic rounding, Kahan updates, dynamic loss scaling) run in the same
loops, compiled out for a policy without them (:func:`remedy_args`; docs/numba.md, "The remedies").
"""

from __future__ import annotations

import time

import numpy as np

from ...data import SCHEDULE_BLOCK, Dataset, blocks
from ...formats import Format, get_format, round_to, wider
from ...optim import state_size
from ...policy import Policy
from ...spec import RunSpec
from ...trajectory import Trajectory
from ..base import Availability, ScalerLog, drive_chunks
from ..step_rules import ScalerState, host_scalars, initial_scaler, micro_batches, moment_format, sr_key
from ..numpy_backend import targets_for
from ._cache import drop_stale_caches
from .accum_loops import run_linear_accum, run_mlp_accum, run_softmax_accum
from .loops import run_linear, run_mlp, run_softmax
from .linalg import pair
from .models import linear_width, make_work
from .rounding import format_code, static_code
from .stochastic import sr_code
from .update import optimizer_flags

__all__ = ["BACKEND", "NumbaBackend"]


def _rounded(values: np.ndarray, fmt: Format) -> np.ndarray:
    """float64 values rounded once to ``fmt``, held in float64 (the training carrier)."""
    return np.ascontiguousarray(round_to(values, fmt))


def _operand(values: np.ndarray, accum64: bool) -> tuple[np.ndarray, np.ndarray]:
    """Compute-format values (float64) as the (float32, float64) operand pair of the accumulator (exact)."""
    empty = np.zeros((0,) * values.ndim)
    if accum64:
        return empty.astype(np.float32), np.ascontiguousarray(values)
    return np.ascontiguousarray(values, dtype=np.float32), empty


def update_formats(pol: Policy) -> tuple:
    """The formats behind ``loops.apply_update``'s ``codes``: compute, update, weights, state, params, and, only for a
    policy whose ``u=`` leaves its moments in U (``Policy.stores_state_once``), the format a new moment is rounded to
    inside the update (``step_rules.moment_format``). Other policies keep five codes and the loops compiled for
    them."""
    formats = (pol.compute, pol.update, pol.weights, pol.state, pol.params)
    return formats + (moment_format(pol),) if pol.stores_state_once else formats


def policy_codes(pol: Policy, problem: str) -> tuple:
    """(compute, update, weights, state, params[, moment]) format codes for the loops (:func:`update_formats`).

    Generic codes (one compiled loop per problem family serves every policy), except for the pure fp32 policy: its
    static codes make every rounding in the float64 carrier the CPU's float64 -> float32 -> float64 conversion
    instead of the generic 18-instruction recipe (:func:`.rounding.rnd`), for one more compiled loop per problem
    family (cold, then cached). A step is mostly per-op roundings where the products are small: logistic
    regression 1024 x 32, full batch, Adam, went 14.7 -> 11.1 us/step (JAX 9.6) in one run; the Adam update of the
    84,490 parameters of mlp-256x256 3.0 -> 0.46 ms (thread CPU time, one run). The pure fp64 policy would gain
    similarly, at one more compile per loop: not done."""
    formats = update_formats(pol)
    native = len({f.name for f in formats}) == 1 and pol.compute.name == "fp32"
    return tuple((static_code if native else format_code)(f) for f in formats)


def remedy_args(pol: Policy, seed: int) -> tuple | None:
    """``rem`` for the loops (:mod:`.loops`, ``step_rules.REMEDY_RULES``): None for a policy without remedies (the
    loops then compile as before the remedies existed), else (flags, (growth, backoff), stochastic rounding codes
    of W and S in the float64 carrier, generic format codes of C, U, W, S, P, the moment format and
    wider(C, fp32)): the same numba type for every remedy policy, so they share one compilation per loop."""
    ds = pol.dynamic_scale
    if not (pol.stochastic or pol.kahan or ds is not None):
        return None
    sr_seed, sr_offset = sr_key(seed, pol.sr_stream)
    flags = (int(pol.stochastic), int(pol.rounding == "sr-state"), int(pol.kahan), int(ds is not None),
             int(bool(ds.skip)) if ds else 0, sr_seed, sr_offset, int(ds.interval) if ds else 1)
    factors = (float(np.float32(ds.growth)), float(np.float32(ds.backoff))) if ds else (2.0, 0.5)
    formats = (pol.compute, pol.update, pol.weights, pol.state, pol.params, moment_format(pol),
               wider(pol.compute, _FP32))
    return (flags, factors, sr_code(pol.weights, np.float64), sr_code(pol.state, np.float64),
            tuple(format_code(f) for f in formats))


class NumbaBackend:
    name = "numba"

    def availability(self, device: str) -> Availability:
        if device == "cpu":
            return Availability(True)
        if device == "gpu":  # numba-cuda kernels (precision.backends.numba_cuda, imported only for the GPU)
            from ..numba_cuda import gpu_availability
            return Availability(*gpu_availability())
        return Availability(False, f"unknown device {device!r}; valid choices: cpu, gpu")

    def devices(self) -> tuple[str, ...]:
        return ("cpu",) + (("gpu",) if self.availability("gpu").available else ())

    def train(self, spec: RunSpec, dataset: Dataset) -> Trajectory:
        if spec.device == "gpu":
            from ..numba_cuda.train import train as train_gpu
            return train_gpu(spec, dataset)
        pol: Policy = spec.policy
        accum64 = pol.accum.name == "fp64"  # else fp32 (Policy allows only these two)
        X = _rounded(dataset.X_train, pol.compute)
        T = _rounded(targets_for(dataset, dataset.y_train), pol.compute)  # the numpy backend's targets
        n, features = X.shape
        batch = dataset.batch_size
        # Host scalars by the shared rules (step_rules.host_scalars), exactly as the numpy backend makes them; the
        # loops multiply by ``unscale`` unconditionally, so no loss scale means exactly 1.0.
        scalars = host_scalars(pol, spec.optimizer, spec.steps, batch)
        parts = micro_batches(batch, spec.accum_steps)
        scale = scalars.seed_scale
        unscale = 1.0 if scalars.unscale is None else scalars.unscale
        table = scalars.table  # rows made per chunk (optim.ScalarTable), as the chunk's batch rows are

        # Weights are the init rounded once to W; params are those weights converted to P (two roundings when W is
        # narrower than fp64, as in numpy's convert(convert(init, fp64, W), W, P)).
        w = _rounded(dataset.init_params, pol.weights)
        p = _rounded(w, pol.params)
        s0, s1, pc, g = (np.zeros_like(w) for _ in range(4))
        codes = policy_codes(pol, spec.problem)
        flags = optimizer_flags(spec.optimizer)
        work = make_work(spec.problem, batch, features, dataset.classes, accum64)
        # The remedies (step_rules.REMEDY_RULES): Kahan's compensation s2 (S, zeros), and the loop's state across
        # chunks: ist = (applied updates, growth tracker), fst = (dynamic loss scale,), skipped[step] = 1 for a step
        # that dynamic loss scaling skipped.
        s2 = np.zeros_like(w) if pol.kahan else np.zeros(0)
        rem = remedy_args(pol, spec.seed)
        if rem is not None:
            codes = rem[4][:6]  # generic, six codes: one loop specialisation serves every remedy policy
        ist = np.zeros(2, dtype=np.int64)
        fst = np.array([float(pol.dynamic_scale.init) if pol.dynamic_scale else 1.0])
        # skipped[step - start]: a block's steps (data.SCHEDULE_BLOCK + 1, zeroed before each block)
        skipped = np.zeros(SCHEDULE_BLOCK + 1, dtype=np.int64)
        log = ScalerLog(initial_scaler(pol)) if pol.dynamic_scale else None
        remedies = (s2, rem, ist, fst, skipped)
        no_rows = np.zeros((0, 0), dtype=np.int64)  # the full batch's marker

        def chunk(start: int, stop: int):
            """The chunk's batch rows and scalar rows (steps start+1 .. stop; under remedies the applied-update
            counts from ist[0] on, as the loops index them), made now: nothing held grows with steps."""
            rows = dataset.batch_rows(start, stop)
            base = int(ist[0]) if rem is not None else start
            return (no_rows if rows is None else rows), table.rows(base, base + stop - start)

        def tail(table_rows):
            return (pc, g, work, accum64, scale, table_rows, w, s0, s1, p, codes, flags, unscale) + remedies
        # Matrix-product operands live in the accumulator's dtype: the data once here, as (float32, float64) pairs.
        # linreg / logreg get a column of ones (and zero padding) appended: [X | 1 | 0].T delta is the weights' and
        # the bias's gradient in one product.
        linear = spec.problem in ("linreg", "logreg")
        if linear:
            data = np.zeros((n, linear_width(features)))
            data[:, :features], data[:, features] = X, 1.0
        else:
            data = X
        # Transposed copies only for the linear models, whose forward product takes X.T as its right operand; the
        # classifiers read X transposed in place (models.transposed) and get empty ones (no copy of the data).
        X_op = _operand(data, accum64)
        XT_op = _operand(X.T, accum64) if linear else pair((0, 0), accum64)
        Xb_op = pair((batch, data.shape[1]), accum64)
        XbT_op = pair((features, batch) if linear else (0, 0), accum64)
        Tb = np.zeros((batch,) + T.shape[1:])
        if len(parts) > 1:
            call = _accumulated_call(spec, dataset, parts, X_op, T, data.shape[1], features, accum64, pc, g,
                                     (scale, w, s0, s1, p), (flags, unscale) + remedies, chunk)
        elif linear:
            logistic = spec.problem == "logreg"

            def call(start, stop):
                batches, table_rows = chunk(start, stop)
                return run_linear(start, stop, logistic, X_op, XT_op, T, batches, Xb_op, XbT_op, Tb,
                                  *tail(table_rows))
        else:
            loop = run_softmax if spec.problem == "softmax" else run_mlp

            def call(start, stop):
                batches, table_rows = chunk(start, stop)
                return loop(start, stop, X_op, XT_op, T, batches, Xb_op, XbT_op, Tb, *tail(table_rows))

        t0 = time.perf_counter()
        call(0, 0)  # zero steps: compiles, or loads from the cache, the loop for these argument types
        compile_s = time.perf_counter() - t0

        def run_chunk(start: int, stop: int):
            for lo, hi in blocks(start, stop):  # bounded memory: a block's rows at a time (data.SCHEDULE_BLOCK)
                skipped[:] = 0
                bad = call(lo, hi)
                if log is not None:  # the scaler's state and the skipped steps back to the host (base.ScalerLog)
                    log.state = ScalerState(np.float32(fst[0]), np.int32(ist[1]))
                    log.skipped.extend(int(k) for k in np.flatnonzero(skipped[1:hi - lo + 1]) + lo + 1)
                if bad:
                    return int(bad)
            return None

        # the stored values for the step audit (precision.audit): the optimizer's state vectors, then Kahan's
        # compensation, as step_rules.initial_values orders them
        stored_state = [s0, s1][:state_size(spec.optimizer)] + ([s2] if pol.kahan else [])
        return drive_chunks(spec, run_chunk, snapshot=lambda: p.astype(np.float64),
                            final_params=lambda: p.astype(pol.params.dtype), compile_s=compile_s, scaler=log,
                            stored=lambda: (w, p, stored_state), dataset=dataset)


def _accumulated_call(spec: RunSpec, dataset: Dataset, parts: tuple, X_op: tuple, T: np.ndarray, width: int,
                      features: int, accum64: bool, pc: np.ndarray, g: np.ndarray, before_codes: tuple,
                      after_codes: tuple, chunk):
    """``call(start, stop)`` running the micro-batch loop of ``spec.problem`` (``accum_loops.run_*_accum``): the
    step's rows split at ``parts`` (step_rules.micro_batches), scratch arrays for each of the (at most two) micro-batch
    sizes, the accumulator's format code. Generic format codes only (one compiled loop per problem family)."""
    pol = spec.policy
    sizes = sorted({stop - start for start, stop in parts}, reverse=True)  # array_split: the longer ones first
    sizes += sizes[-1:] * (2 - len(sizes))  # always two slots (the same numba type for any K); one may repeat
    slots = np.array([[start, stop, sizes.index(stop - start)] for start, stop in parts], dtype=np.int64)
    Xbs = tuple(pair((m, width), accum64) for m in sizes)
    linear = spec.problem in ("linreg", "logreg")
    XbTs = tuple(pair((features, m) if linear else (0, 0), accum64) for m in sizes)  # empty: see train
    Tbs = tuple(np.zeros((m,) + T.shape[1:]) for m in sizes)
    works = tuple(make_work(spec.problem, m, features, dataset.classes, accum64) for m in sizes)
    full = dataset.batches is None
    whole = np.arange(T.shape[0], dtype=np.int64).reshape(1, -1)  # the full batch's rows
    gm, ga = np.zeros_like(g), np.zeros_like(g)
    ca = format_code(pol.accum)
    rem = after_codes[3]  # (flags, unscale, s2, rem, ...): a remedy policy's loop takes rem's six generic codes
    codes = tuple(format_code(f) for f in update_formats(pol)) if rem is None else rem[4][:6]
    # generic codes, also for the pure fp32 linear models (policy_codes' static ones: bit-identical results, but
    # another ~8 s compiled loop)
    scale, w, s0, s1, p = before_codes

    def common(start, stop):
        rows, table_rows = chunk(start, stop)  # the chunk's schedule rows and scalar rows
        schedule = whole if full else rows
        return ((schedule, full, slots, Xbs, XbTs, Tbs, works, pc, gm, ga, g, accum64, ca, scale, table_rows, w, s0,
                 s1, p, codes) + after_codes)

    if linear:
        logistic = spec.problem == "logreg"
        return lambda start, stop: run_linear_accum(start, stop, logistic, X_op, T, *common(start, stop))
    loop = run_softmax_accum if spec.problem == "softmax" else run_mlp_accum
    return lambda start, stop: loop(start, stop, X_op, T, *common(start, stop))


_FP32 = get_format("fp32")
drop_stale_caches(run_linear)
BACKEND = NumbaBackend()
