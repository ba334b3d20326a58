"""What the formats do to one step, audited at each record step: stagnation and underflow.

At each record step ``r`` the run's stored state (weights, params, optimizer state: any backend's, as it stored
them) is handed to the numpy reference, which computes the next step's gradient and update from it with
round-to-nearest and reports (docs/remedies.md):

- ``stagnation``: the share of parameters whose update ``d`` (the step the optimizer computed in U, before AdamW's
  decay) is non-zero but is lost when stored: ``round(w + d, W) == w``. Round-to-nearest loses an update below half
  an ulp of ``w``; this is what stochastic rounding and Kahan updates recover. (In a run with ``r=sr`` it is the
  share that round-to-nearest would lose at that state, not what the random rounding did.)
- ``zero_update``: the share whose update is exactly zero (its gradient or moment underflowed or is zero).
- ``gradient_underflow``: the share of the gradient in C (as computed, loss-scaled) that is zero or subnormal in
  C: what loss scaling exists to prevent in fp16.
- ``v_underflow`` (Adam): the share of the second moment ``v``, as stored in S, that is zero or subnormal in S.
- ``loss_scale``: the dynamic loss scale at that step (None for a static or no scale).

Once per run: ``eps`` and ``effective_eps``, Adam's eps rounded to U (0 when it underflows, e.g. 1e-8 in fp16),
which is what the denominator adds.

The audit is measured, not timed: it runs outside the timed chunks, and it uses the batch of step ``r + 1`` (the
last batch at the last step) and the scalar row of step ``r + 1``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .backends import array_math
from .backends.numpy_backend import targets_for
from .backends.numpy_backend.models import gradient
from .backends.numpy_backend.ops import FormatOps, convert
from .backends.step_rules import dynamic_seed, dynamic_unscale, host_scalars, optimizer_state_size, state_store
from .data import Dataset
from .formats import Format, get_format, to_format
from .spec import RunSpec

__all__ = ["make_auditor", "underflow_share", "effective_eps", "audit_summary", "mean_stagnation", "MAX_LISTED_SKIPS"]

_FP64 = get_format("fp64")


def underflow_share(x, fmt: Format) -> float:
    """Share of the values of ``x`` (values of ``fmt``) that are zero or subnormal in ``fmt``."""
    x = np.abs(np.asarray(x, dtype=np.float64))
    return float(np.mean(x < fmt.tiny)) if x.size else 0.0


def effective_eps(spec: RunSpec) -> tuple[float, float]:
    """(eps, eps rounded to U): the value Adam's denominator adds (0 when it underflows in U)."""
    eps = float(spec.optimizer.eps)
    return eps, float(to_format(np.float64(eps), spec.policy.update))


def make_auditor(spec: RunSpec, dataset: Dataset) -> Callable[..., dict]:
    """``audit(step, weights, params, state, loss_scale)`` -> the figures of the module docstring for the stored
    values after ``step``; the arrays may be in their formats' dtypes or float64 holding their values."""
    pol, opt = spec.policy, spec.optimizer
    compute = FormatOps(pol.compute, pol.accum)
    scalars = host_scalars(pol, opt, spec.steps, dataset.batch_size)
    table = scalars.table  # one row per audit (optim.ScalarTable), cast to U where used (exact: rounded to U)
    unscale = None if scalars.unscale is None else to_format(scalars.unscale, pol.update)[()]
    X = convert(dataset.X_train, _FP64, pol.compute)
    T = convert(targets_for(dataset, dataset.y_train), _FP64, pol.compute)
    store = state_store(convert, pol)

    def stored(x, fmt: Format):
        return convert(np.asarray(x, dtype=np.float64), _FP64, fmt)

    def audit(step: int, weights, params, state, loss_scale=None) -> dict:
        with np.errstate(all="ignore"):  # overflow, NaN and underflow are what is being measured
            return _audit(step, weights, params, state, loss_scale)

    def _audit(step, weights, params, state, loss_scale) -> dict:
        nxt = min(step + 1, spec.steps)
        rows = dataset.batch(nxt)
        seed = compute.scalar(scalars.seed_scale)
        step_unscale = unscale
        if pol.dynamic_scale is not None and loss_scale is not None:
            scale = np.float32(loss_scale)
            seed = dynamic_seed(convert, pol, seed, scale)
            step_unscale = dynamic_unscale(np, convert, pol, scale)
        w = stored(weights, pol.weights)
        opt_state = [stored(x, pol.state) for x in list(state)[:optimizer_state_size(pol, len(state))]]
        pc = convert(stored(params, pol.params), pol.params, pol.compute)
        g_c = gradient(spec.problem, compute, pc, X[rows], T[rows], seed, dataset.layout)
        g = convert(g_c, pol.compute, pol.update)
        if step_unscale is not None:
            g = g * step_unscale
        w_u = convert(w, pol.weights, pol.update)
        _, delta, _ = array_math.update(np, opt, nxt, table[nxt - 1].astype(pol.update.dtype), w_u, g,
                                        [convert(x, pol.state, pol.update) for x in opt_state], store, split=True)
        moved = convert(w_u + delta, pol.update, pol.weights)
        delta = np.asarray(delta, dtype=np.float64)
        stagnated = (delta != 0) & (np.asarray(moved, dtype=np.float64) == np.asarray(w, dtype=np.float64))
        return {
            "step": int(step),
            "stagnation": float(np.mean(stagnated)),
            "zero_update": float(np.mean(delta == 0)),
            "gradient_underflow": underflow_share(g_c, pol.compute),
            "v_underflow": underflow_share(opt_state[1], pol.state) if opt.is_adam else None,
            "loss_scale": None if loss_scale is None else float(loss_scale),
        }

    return audit


MAX_LISTED_SKIPS = 1000  # skipped step numbers kept in a report (the count is always whole)


def audit_summary(spec: RunSpec, traj) -> dict | None:
    """A result's ``audit`` (docs/reports.md): eps and its value in U, the record steps' audits and, under dynamic
    loss scaling, the scale at each record step and the skipped steps (the first MAX_LISTED_SKIPS of them, and
    their count). None when the backend reported neither."""
    if traj.audit is None and traj.loss_scale is None:
        return None
    eps, eff = effective_eps(spec)
    out = {"eps": eps, "effective_eps": eff, "records": list(traj.audit or ())}
    if traj.loss_scale is not None:
        out["loss_scale"] = [[int(s), float(v)] for s, v in zip(traj.record_steps, traj.loss_scale)]
        skipped = np.asarray(traj.skipped_steps if traj.skipped_steps is not None else (), dtype=np.int64)
        out["skipped"] = int(skipped.size)
        out["skipped_steps"] = skipped[:MAX_LISTED_SKIPS].tolist()
    return out


def mean_stagnation(audit: dict | None) -> float | None:
    """The mean stagnation over a result's record steps after step 0 (None without an audit)."""
    records = [r for r in (audit or {}).get("records", ()) if r["step"] > 0]
    return float(np.mean([r["stagnation"] for r in records])) if records else None
