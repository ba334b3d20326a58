"""The numpy backend: arrays held in the policy's formats (numpy float16/32/64, ml_dtypes bfloat16 and fp8),
numpy ufuncs and BLAS doing the math, Python stepping the loop."""

from __future__ import annotations

import numpy as np

from ...data import Dataset, blocks
from ...formats import Format, get_format, to_format
from ...policy import Policy
from ...problems import get_problem
from ...spec import RunSpec
from ...trajectory import Trajectory
from ...stochastic import round_stochastic
from ..base import Availability, ScalerLog, drive_chunks
from ..step_rules import (accumulate, apply_step, dynamic_seed, dynamic_unscale, host_scalars, initial_scaler,
                          initial_values, micro_batches, scaler_update, sr_key, state_store)
from .models import gradient
from .ops import FormatOps, convert, emulated
from .update import update

__all__ = ["BACKEND", "NumpyBackend", "targets_for"]


def targets_for(dataset: Dataset, y: np.ndarray) -> np.ndarray:
    """Regression targets, 0/1 labels, or one-hot rows (float64), as the problem's loss wants them."""
    if get_problem(dataset.problem).task == "multiclass":  # softmax and every MLP
        return np.eye(dataset.classes)[y.astype(np.int64)]
    return np.asarray(y, dtype=np.float64)


class NumpyBackend:
    name = "numpy"

    def availability(self, device: str) -> Availability:
        if device != "cpu":
            return Availability(False, f"the numpy backend runs on the CPU only (asked for {device!r})")
        return Availability(True)

    def devices(self) -> tuple[str, ...]:
        return ("cpu",)

    def train(self, spec: RunSpec, dataset: Dataset) -> Trajectory:
        """The reference loop: every step is :func:`precision.backends.step_rules.apply_step` (the shared chain of
        conversions and the divergence rule) around this module's ``gradient`` and ``update``; with
        ``spec.accum_steps`` > 1 the gradient is :func:`~precision.backends.step_rules.accumulate` over the step's
        micro-batches (``micro_batches``), each with the whole batch's seed scale. The remedies of the policy
        (``step_rules.REMEDY_RULES``: stochastic rounding, Kahan, dynamic loss scaling) are the same chain's
        options; the dynamic loss scale's state and the skipped steps are kept here, on the host."""
        pol: Policy = spec.policy
        compute = FormatOps(pol.compute, pol.accum)
        scalars = host_scalars(pol, spec.optimizer, spec.steps, dataset.batch_size)
        bounds = micro_batches(dataset.batch_size, spec.accum_steps)
        X = convert(dataset.X_train, _FP64, pol.compute)
        T = convert(targets_for(dataset, dataset.y_train), _FP64, pol.compute)
        scale = compute.scalar(scalars.seed_scale)  # exact: the value is already rounded to C
        unscale = None if scalars.unscale is None else to_format(scalars.unscale, pol.update)[()]
        table = scalars.table  # rows made per chunk (optim.ScalarTable): memory does not grow with steps
        store_state = state_store(convert, pol)
        weights, params, state = initial_values(dataset.init_params, pol, spec.optimizer)
        dynamic = pol.dynamic_scale
        log = ScalerLog(initial_scaler(pol)) if dynamic else None
        sr_seed, sr_offset = sr_key(spec.seed, pol.sr_stream)
        # applied: the optimizer's step count (updates applied so far); it trails the step only when dynamic loss
        # scaling skips steps (REMEDY_RULES "dynamic")
        box = {"weights": weights, "params": params, "state": state, "applied": 0}

        def run_chunk(start: int, stop: int):
            for lo, hi in blocks(start, stop):  # bounded memory: a block's rows at a time (data.SCHEDULE_BLOCK)
                bad = run_block(lo, hi)
                if bad is not None:
                    return bad
            return None

        def run_block(start: int, stop: int):
            w, p, st, applied = box["weights"], box["params"], box["state"], box["applied"]
            # the block's batch rows (steps start+1 .. stop) and scalar rows (applied-update counts applied+1 ..
            # applied + stop - start: the count never runs ahead of the step), made from the seed now
            chunk_rows = dataset.batch_rows(start, stop)
            base = applied
            chunk_table = table.rows(base, base + stop - start).astype(pol.update.dtype)  # exact: rounded to U
            with np.errstate(all="ignore"):  # overflow and NaN are results here, reported as diverged_at
                for step in range(start + 1, stop + 1):
                    rows = slice(None) if chunk_rows is None else chunk_rows[step - 1 - start]
                    row, t = chunk_table[applied - base], applied + 1
                    seed = dynamic_seed(convert, pol, scale, log.state.scale) if dynamic else scale
                    step_unscale = dynamic_unscale(np, convert, pol, log.state.scale) if dynamic else unscale
                    if len(bounds) == 1:
                        # gradient and update looked up in this module at call time (tests substitute them)
                        def grad(pc, rows=rows, seed=seed):
                            return gradient(spec.problem, compute, pc, X[rows], T[rows], seed, dataset.layout)
                    else:
                        def grad(pc, rows=rows, seed=seed):
                            return accumulate(convert, pol, (
                                gradient(spec.problem, compute, pc, X[part], T[part], seed, dataset.layout)
                                for part in _parts(rows, bounds)))
                    result = apply_step(
                        np, convert, pol, grad,
                        lambda w_u, g, st_u, split=False: update(spec.optimizer, t, row, w_u, g, st_u, store_state,
                                                                 *((True,) if split else ())),
                        w, p, st, step_unscale, stochastic=_stochastic(sr_seed, sr_offset, step),
                        check_gradient=dynamic is not None)
                    skipped = dynamic is not None and dynamic.skip and not result.gradient_finite
                    if dynamic:
                        log.step(step, scaler_update(np, log.state, not result.gradient_finite, dynamic), skipped)
                    if skipped:
                        continue
                    w, st, p, applied = result.weights, result.state, result.params, applied + 1
                    if not result.finite:
                        box.update(weights=w, params=p, state=st, applied=applied)
                        return step
            box.update(weights=w, params=p, state=st, applied=applied)
            return None

        return drive_chunks(spec, run_chunk, snapshot=lambda: box["params"].astype(np.float64),
                            final_params=lambda: box["params"].copy(), scaler=log,
                            stored=lambda: (box["weights"], box["params"], box["state"]), dataset=dataset)


def _stochastic(seed: int, offset: int, step: int):
    """``stochastic(x, fmt, tensor)`` for ``apply_step``: ``x`` (U values) rounded stochastically to ``fmt`` with the
    run's key (``step_rules.sr_key``) at ``step``, as an array of ``fmt``'s storage dtype (exact: the values are
    values of ``fmt``)."""
    def rounded(x, fmt: Format, tensor: int):
        y = round_stochastic(np.asarray(x), fmt, seed, step & 0xFFFFFFFF, offset + tensor)
        return emulated(y.astype(fmt.dtype), fmt)
    return rounded


def _parts(rows, bounds):
    """The micro-batches' rows: index arrays cut from the step's rows, or slices of the full batch."""
    if isinstance(rows, slice):
        return [slice(start, stop) for start, stop in bounds]
    return [rows[start:stop] for start, stop in bounds]


_FP64 = get_format("fp64")
BACKEND = NumpyBackend()
