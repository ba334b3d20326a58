"""Compiled training loops: whole chunks of steps (gradient, then update) with no Python in the step loop.

Every quantity is held in float64 (exact for every format, see :mod:`.ops`) and the formats and the accumulator
are runtime arguments (:class:`.rounding.FormatCode`, ``accum64``), so each loop compiles once and serves every
policy. The quantities and the conversions between them are the shared per-step rules of
:mod:`precision.backends.step_rules` (``STEP_CHAIN``, ``apply_step``: the function the numpy and JAX loops call),
here one element at a time:

- ``w`` the weights (master, or params when there is none), ``s0`` / ``s1`` the optimizer state and ``p`` the params,
  each holding values of its own format;
- per step: ``pc = rnd(p, C)``, the gradient ``g`` in C, then per element ``rnd(g, U)`` times the loss-scale
  inverse (rounded), the optimizer in U, ``w = rnd(w, W)``, state ``rnd(., S)``, ``p = rnd(w, P)``;
- the divergence rule (``step_rules.all_finite``): the first step whose new weights *or* new params are not all
  finite is returned (0: none), after finishing that step. The params check matters: fp16 params overflow (above
  65504) while fp32 master weights are still finite.

tests/test_conformance.py checks this loop against ``step_rules.reference_step`` and the shared cases.

Gradient accumulation (``RunSpec.accum_steps`` K > 1, ``step_rules.ACCUMULATION``) has its own loops,
``run_*_accum``: per step, the K micro-batches of ``parts`` (start, stop, buffer slot) are gathered and their
gradients computed one after another into ``gm`` by the same gradient functions, summed in order into ``ga`` in the
accumulator format (``ca``; the sum starts as micro-batch 1's gradient), and ``ga`` is rounded once to C into ``g``;
the update is the same ``apply_update``. Micro-batches have at most two sizes (array_split's), so their scratch
arrays come as two slots (``Xbs``, ``XbTs``, ``Tbs``, ``works``: 2-tuples picked by the slot). K = 1 runs the loops
above, unchanged.

``codes`` = (compute, update, weights, state, params), and a sixth, ``moment``, for a policy whose ``u=`` leaves its
moments in U (``Policy.stores_state_once``): the format a new moment is rounded to inside the update before the rest
of it uses it (``step_rules.moment_format``; without the sixth code it is the state format). Policies without it run
the loops compiled for five codes, as before ``u=`` existed; ``flags`` = :func:`.update.optimizer_flags`.
"""

from __future__ import annotations

import numba
import numpy as np
from numba.extending import overload

from .models import grad_linear, grad_mlp, grad_softmax
from .rounding import JIT, rnd
from .update import OPT_ADAM, adam_element, row_scalars, sgd_element

__all__ = ["run_linear", "run_softmax", "run_mlp", "apply_update", "run_linear_accum", "run_softmax_accum",
           "run_mlp_accum"]


def moment_code(codes):
    """The format code a new moment is rounded to inside the update: ``codes[5]`` when ``codes`` has six entries,
    else the state's ``codes[3]`` (decided at compile time from the tuple's length)."""
    raise NotImplementedError("moment_code is only callable from numba-compiled code")


@overload(moment_code, jit_options=JIT)
def _moment_code(codes):
    if len(codes) == 6:
        return lambda codes: codes[5]
    return lambda codes: codes[3]


@numba.njit(inline="always", **JIT)
def _to_compute(p, pc, cc):
    for j in range(p.size):
        pc[j] = rnd(p[j], cc)


@numba.njit(inline="always", **JIT)
def apply_update(step, row, g, w, s0, s1, p, codes, flags, unscale):
    """One optimizer step over all elements, in place (links 3-10 of ``step_rules.STEP_CHAIN``); returns the
    divergence rule's verdict: whether every new weight and every new param is finite.

    ``unscale`` is the loss scale's inverse in U, or 1.0 without loss scaling (x * 1 is exact, so multiplying
    unconditionally changes nothing and keeps the loop branch-free). Branches on the optimizer are outside the
    element loops, so that they vectorize."""
    cc, cu, cw, cs, cp = codes[0], codes[1], codes[2], codes[3], codes[4]
    cm = moment_code(codes)
    kind, decoupled, l2, momentum, nesterov = flags
    scalars = row_scalars(row)
    nonfinite = 0
    if kind == OPT_ADAM:
        for j in range(w.size):
            gj = rnd(rnd(g[j], cu) * unscale, cu)
            wj, mj, vj = adam_element(rnd(w[j], cu), gj, rnd(s0[j], cu), rnd(s1[j], cu), scalars, decoupled, l2,
                                      cu, cm)
            s0[j] = rnd(mj, cs)
            s1[j] = rnd(vj, cs)
            wj = rnd(wj, cw)
            pj = rnd(wj, cp)
            w[j] = wj
            p[j] = pj
            nonfinite += (0 if np.isfinite(wj) else 1) + (0 if np.isfinite(pj) else 1)
    else:
        first = step == 1
        for j in range(w.size):
            gj = rnd(rnd(g[j], cu) * unscale, cu)
            wj, buf = sgd_element(rnd(w[j], cu), gj, rnd(s0[j], cu), scalars, first, l2, momentum, nesterov, cu,
                                  cm)
            s0[j] = rnd(buf, cs)  # without momentum buf is the stored value itself (zero): unchanged
            wj = rnd(wj, cw)
            pj = rnd(wj, cp)
            w[j] = wj
            p[j] = pj
            nonfinite += (0 if np.isfinite(wj) else 1) + (0 if np.isfinite(pj) else 1)
    return nonfinite == 0


@numba.njit(**JIT)
def _gather(X, rows, Xb, XbT, accum64):
    """The batch's rows of the data pair X into the active members of Xb (all columns) and XbT (its first d
    columns, transposed). Explicit loops: a slice assignment compiles numba's shape-error formatting (seconds)."""
    if accum64:
        for i in range(rows.size):
            for k in range(X[1].shape[1]):
                Xb[1][i, k] = X[1][rows[i], k]
            for k in range(XbT[1].shape[0]):
                XbT[1][k, i] = X[1][rows[i], k]
    else:
        for i in range(rows.size):
            for k in range(X[0].shape[1]):
                Xb[0][i, k] = X[0][rows[i], k]
            for k in range(XbT[0].shape[0]):
                XbT[0][k, i] = X[0][rows[i], k]


@numba.njit(**JIT)
def run_linear(start, stop, logistic, X, XT, T, batches, Xb, XbT, Tb, pc, g, work, accum64, scale, table, w, s0,
               s1, p, codes, flags, unscale):
    """Steps start+1 .. stop of linreg / logreg. X (the data with a column of ones), XT (the data transposed), Xb,
    XbT are (float32, float64) pairs; ``batches`` (steps, B) row indices, or shape (0, 0) for full batch (then X,
    XT, T are used directly)."""
    full = batches.shape[0] == 0
    for step in range(start + 1, stop + 1):
        if full:
            xb, xbt, tb = X, XT, T
        else:
            rows = batches[step - 1]
            _gather(X, rows, Xb, XbT, accum64)
            for i in range(rows.size):
                Tb[i] = T[rows[i]]
            xb, xbt, tb = Xb, XbT, Tb
        _to_compute(p, pc, codes[0])
        grad_linear(logistic, pc, xb, xbt, tb, scale, codes[0], accum64, work, g)
        if not apply_update(step, table[step - 1], g, w, s0, s1, p, codes, flags, unscale):
            return step
    return 0


@numba.njit(inline="always", **JIT)
def _classifier_batch(step, X, XT, T, batches, Xb, XbT, Tb, accum64):
    if batches.shape[0] == 0:
        return X, XT, T
    rows = batches[step - 1]
    _gather(X, rows, Xb, XbT, accum64)
    for i in range(rows.size):
        for c in range(T.shape[1]):
            Tb[i, c] = T[rows[i], c]
    return Xb, XbT, Tb


@numba.njit(**JIT)
def run_softmax(start, stop, X, XT, T, batches, Xb, XbT, Tb, pc, g, work, accum64, scale, table, w, s0, s1, p,
                codes, flags, unscale):
    """Steps start+1 .. stop of softmax regression (T: one-hot rows)."""
    for step in range(start + 1, stop + 1):
        xb, xbt, tb = _classifier_batch(step, X, XT, T, batches, Xb, XbT, Tb, accum64)
        _to_compute(p, pc, codes[0])
        grad_softmax(pc, xb, xbt, tb, scale, codes[0], accum64, work, g)
        if not apply_update(step, table[step - 1], g, w, s0, s1, p, codes, flags, unscale):
            return step
    return 0


@numba.njit(**JIT)
def run_mlp(start, stop, X, XT, T, batches, Xb, XbT, Tb, pc, g, work, accum64, scale, table, w, s0, s1, p, codes,
            flags, unscale):
    """Steps start+1 .. stop of the one-hidden-layer MLP (T: one-hot rows)."""
    for step in range(start + 1, stop + 1):
        xb, xbt, tb = _classifier_batch(step, X, XT, T, batches, Xb, XbT, Tb, accum64)
        _to_compute(p, pc, codes[0])
        grad_mlp(pc, xb, xbt, tb, scale, codes[0], accum64, work, g)
        if not apply_update(step, table[step - 1], g, w, s0, s1, p, codes, flags, unscale):
            return step
    return 0


# -- gradient accumulation (accum_steps > 1) ------------------------------------------------------------------------

@numba.njit(inline="always", **JIT)
def _accumulate(k, gm, ga, ca):
    """Micro-batch k's gradient ``gm`` (C values) into the sum ``ga`` held in the accumulator format ``ca``: the sum
    starts as micro-batch 0's gradient (exact: A is at least as wide as C); each later addition is rounded to A (a
    float64 sum of two fp32 values rounded to fp32 is the fp32 sum: 53 >= 2 * 24 + 2)."""
    if k == 0:
        for j in range(gm.size):
            ga[j] = gm[j]
    else:
        for j in range(gm.size):
            ga[j] = rnd(ga[j] + gm[j], ca)


@numba.njit(inline="always", **JIT)
def _round_sum(ga, g, cc):
    for j in range(g.size):
        g[j] = rnd(ga[j], cc)


@numba.njit(**JIT)
def run_linear_accum(start, stop, logistic, X, T, schedule, full, parts, Xbs, XbTs, Tbs, works, pc, gm, ga, g,
                     accum64, ca, scale, table, w, s0, s1, p, codes, flags, unscale):
    """Steps start+1 .. stop of linreg / logreg with K = parts.shape[0] micro-batches per step. ``schedule``: the
    steps' rows (steps, B), or (1, n) with ``full`` (the full batch, row i at position i); ``parts`` (K, 3):
    start, stop within the step's rows and the scratch slot (0 or 1) of each micro-batch."""
    for step in range(start + 1, stop + 1):
        batch_rows = schedule[0] if full else schedule[step - 1]
        _to_compute(p, pc, codes[0])
        for k in range(parts.shape[0]):
            slot = parts[k, 2]
            rows = batch_rows[parts[k, 0]:parts[k, 1]]
            Xb, XbT, Tb = Xbs[slot], XbTs[slot], Tbs[slot]
            _gather(X, rows, Xb, XbT, accum64)
            for i in range(rows.size):
                Tb[i] = T[rows[i]]
            grad_linear(logistic, pc, Xb, XbT, Tb, scale, codes[0], accum64, works[slot], gm)
            _accumulate(k, gm, ga, ca)
        _round_sum(ga, g, codes[0])
        if not apply_update(step, table[step - 1], g, w, s0, s1, p, codes, flags, unscale):
            return step
    return 0


@numba.njit(inline="always", **JIT)
def _classifier_micro_batch(X, T, rows, Xb, XbT, Tb, accum64):
    _gather(X, rows, Xb, XbT, accum64)
    for i in range(rows.size):
        for c in range(T.shape[1]):
            Tb[i, c] = T[rows[i], c]


@numba.njit(**JIT)
def run_softmax_accum(start, stop, X, T, schedule, full, parts, Xbs, XbTs, Tbs, works, pc, gm, ga, g, accum64, ca,
                      scale, table, w, s0, s1, p, codes, flags, unscale):
    """Steps start+1 .. stop of softmax regression with micro-batches (see :func:`run_linear_accum`)."""
    for step in range(start + 1, stop + 1):
        batch_rows = schedule[0] if full else schedule[step - 1]
        _to_compute(p, pc, codes[0])
        for k in range(parts.shape[0]):
            slot = parts[k, 2]
            Xb, XbT, Tb = Xbs[slot], XbTs[slot], Tbs[slot]
            _classifier_micro_batch(X, T, batch_rows[parts[k, 0]:parts[k, 1]], Xb, XbT, Tb, accum64)
            grad_softmax(pc, Xb, XbT, Tb, scale, codes[0], accum64, works[slot], gm)
            _accumulate(k, gm, ga, ca)
        _round_sum(ga, g, codes[0])
        if not apply_update(step, table[step - 1], g, w, s0, s1, p, codes, flags, unscale):
            return step
    return 0


@numba.njit(**JIT)
def run_mlp_accum(start, stop, X, T, schedule, full, parts, Xbs, XbTs, Tbs, works, pc, gm, ga, g, accum64, ca,
                  scale, table, w, s0, s1, p, codes, flags, unscale):
    """Steps start+1 .. stop of the MLP with micro-batches (see :func:`run_linear_accum`)."""
    for step in range(start + 1, stop + 1):
        batch_rows = schedule[0] if full else schedule[step - 1]
        _to_compute(p, pc, codes[0])
        for k in range(parts.shape[0]):
            slot = parts[k, 2]
            Xb, XbT, Tb = Xbs[slot], XbTs[slot], Tbs[slot]
            _classifier_micro_batch(X, T, batch_rows[parts[k, 0]:parts[k, 1]], Xb, XbT, Tb, accum64)
            grad_mlp(pc, Xb, XbT, Tb, scale, codes[0], accum64, works[slot], gm)
            _accumulate(k, gm, ga, ca)
        _round_sum(ga, g, codes[0])
        if not apply_update(step, table[step - 1], g, w, s0, s1, p, codes, flags, unscale):
            return step
    return 0
