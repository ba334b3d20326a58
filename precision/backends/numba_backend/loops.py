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

Gradient accumulation (``RunSpec.accum_steps`` K > 1) has its own loops, :mod:`.accum_loops`, built from the
pieces here; K = 1 runs the loops of this module.

``codes`` = (compute, update, weights, state, params), and a sixth, ``moment``, for a policy whose ``u=`` leaves its
moments in U (``Policy.stores_state_once``): the format a new moment is rounded to inside the update before the rest
of it uses it (``step_rules.moment_format``; without the sixth code it is the state format). Policies without it run
the loops compiled for five codes, as before ``u=`` existed; ``flags`` = :func:`.update.optimizer_flags`.

The remedies (``step_rules.REMEDY_RULES``) come as ``s2`` (Kahan's compensation), ``rem`` (None without remedies:
the ``rem is None`` branches are pruned at compile time), ``ist``, ``fst`` and ``skipped`` (the section "the
remedies" below): :func:`apply_remedies` replaces :func:`apply_update`, and dynamic loss scaling scales the seed,
checks the unscaled gradient and may skip the step (``_remedy_step``).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import overload

from ..step_rules import SR_WEIGHTS_TENSOR, sr_state_tensor
from .models import grad_any_mlp, grad_linear, grad_softmax
from .rounding import JIT, rnd, rnd_narrow, static_format_name
from .stochastic import stochastic_round64
from .update import OPT_ADAM, adam_element, adam_split, row_scalars, sgd_element, sgd_split

__all__ = ["run_linear", "run_softmax", "run_mlp", "apply_update", "apply_remedies", "REMEDY_FLAGS"]

# ``rem[0]``, the remedies' integer flags (``__init__.remedy_args`` builds them): positions, frozen into the code.
REMEDY_FLAGS = ("sr_weights", "sr_state", "kahan", "dynamic", "skip", "sr_seed", "sr_offset", "interval")
_R_SR_W, _R_SR_S, _R_KAHAN, _R_DYNAMIC, _R_SKIP, _R_SEED, _R_OFFSET, _R_INTERVAL = range(len(REMEDY_FLAGS))
_T_W, _T_S0, _T_S1 = SR_WEIGHTS_TENSOR, sr_state_tensor(0), sr_state_tensor(1)
_M32 = 0xFFFFFFFF


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


def _scalars_narrow(scalars, cu):
    raise NotImplementedError("_scalars_narrow is only callable from numba-compiled code")


@overload(_scalars_narrow, inline="always", jit_options=JIT)
def _scalars_narrow_impl(scalars, cu):
    """The step's scalar tuple in the update's narrow carrier (:func:`.rounding.rnd_narrow`): float32 for the static
    fp32 code, unchanged otherwise."""
    if static_format_name(cu) == "fp32":
        def narrow(scalars, cu):  # row_scalars' 11 columns
            f = np.float32
            return (f(scalars[0]), f(scalars[1]), f(scalars[2]), f(scalars[3]), f(scalars[4]), f(scalars[5]),
                    f(scalars[6]), f(scalars[7]), f(scalars[8]), f(scalars[9]), f(scalars[10]))
        return narrow
    return lambda scalars, cu: scalars


@numba.njit(inline="always", **JIT)
def apply_update(step, row, g, w, s0, s1, p, codes, flags, unscale):
    """One optimizer step over all elements, in place (links 3-10 of ``step_rules.STEP_CHAIN``); returns the
    divergence rule's verdict: whether every new weight and every new param is finite.

    ``unscale`` is the loss scale's inverse in U, or 1.0 without loss scaling (x * 1 is exact, so multiplying
    unconditionally changes nothing and keeps the loop branch-free). Branches on the optimizer are outside the
    element loops, so that they vectorize."""
    cu, cw, cs, cp = codes[1], codes[2], codes[3], codes[4]
    cm = moment_code(codes)
    kind, decoupled, l2, momentum, nesterov = flags
    scalars = _scalars_narrow(row_scalars(row), cu)  # U values: exact in U's narrow carrier (rnd_narrow)
    unscale = rnd_narrow(unscale, cu)
    nonfinite = 0
    if kind == OPT_ADAM:
        for j in range(w.size):
            gj = rnd(rnd_narrow(g[j], cu) * unscale, cu)
            wj, mj, vj = adam_element(rnd_narrow(w[j], cu), gj, rnd_narrow(s0[j], cu), rnd_narrow(s1[j], cu),
                                      scalars, decoupled, l2, cu, cm)
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
            gj = rnd(rnd_narrow(g[j], cu) * unscale, cu)
            wj, buf = sgd_element(rnd_narrow(w[j], cu), gj, rnd_narrow(s0[j], cu), scalars, first, l2, momentum,
                                  nesterov, cu, cm)
            s0[j] = rnd(buf, cs)  # without momentum buf is the stored value itself (zero): unchanged
            wj = rnd(wj, cw)
            pj = rnd(wj, cp)
            w[j] = wj
            p[j] = pj
            nonfinite += (0 if np.isfinite(wj) else 1) + (0 if np.isfinite(pj) else 1)
    return nonfinite == 0


# -- the remedies (step_rules.REMEDY_RULES) ---------------------------------------------------------------------------
# ``rem`` = (flags, (growth, backoff), sr code of W, sr code of S, generic codes (C, U, W, S, P, moment, seed's
# wide format)), the same numba type for every policy with a remedy, or None for a policy without (then numba
# prunes the loops' ``rem is None`` branches at compile time: they compile as before the remedies). So the remedies
# add one specialisation per loop, compiled only when a remedy policy runs; the host passes such a policy's
# ``codes`` as the six generic codes of ``rem`` (one type for every remedy policy). ``ist`` (int64: applied
# updates, growth tracker) and ``fst`` (float64: the dynamic loss scale, a float32 value) are the loop's state
# across chunks; ``skipped[step - start]`` is set to 1 for a step skipped by dynamic loss scaling.
#
# Per-chunk inputs: every loop runs steps start+1 .. stop and gets only that chunk's rows of the batch schedule
# (``batches[step - 1 - start]``) and of the scalar table: ``table[step - 1 - start]``, or under remedies the rows
# of the applied-update counts ``ist[0]`` (at the chunk's start, ``base``) onwards, ``table[applied - base]``.
# So nothing the loops read grows with steps (precision.data.BatchSchedule, precision.optim.ScalarTable).

@numba.njit(**JIT)
def apply_remedies(step, t, row, g, w, s0, s1, s2, p, flags, unscale, rem):
    """:func:`apply_update` with the remedies of ``rem`` (``r=sr``, ``r=sr-state``, ``r=kahan``;
    ``step_rules.apply_step``): ``t`` is the optimizer's step (applied updates, 1-based), ``step`` the loop's (the
    stochastic rounding counter). ``s2``: Kahan's compensation (S values). Without ``r=`` flags it makes
    :func:`apply_update`'s operations (dynamic loss scaling alone). Not inlined: one compilation serves every
    loop."""
    iflags, codes = rem[0], rem[4]
    cu, cw, cs, cp, cm = codes[1], codes[2], codes[3], codes[4], codes[5]
    code_w, code_s = rem[2], rem[3]
    kind, decoupled, l2, momentum, nesterov = flags
    sr_w, sr_s, kahan = iflags[_R_SR_W], iflags[_R_SR_S], iflags[_R_KAHAN]
    seed, offset, counter = iflags[_R_SEED], iflags[_R_OFFSET], step & _M32
    scalars = row_scalars(row)
    first = t == 1
    nonfinite = 0
    for j in range(w.size):
        gj = rnd(rnd(g[j], cu) * unscale, cu)
        if kind == OPT_ADAM:
            base, term, mj, vj = adam_split(rnd(w[j], cu), gj, rnd(s0[j], cu), rnd(s1[j], cu), scalars, decoupled,
                                            l2, cu, cm)
            if sr_s:
                s0[j] = stochastic_round64(mj, code_s, seed, counter, offset + _T_S0, j)
                s1[j] = stochastic_round64(vj, code_s, seed, counter, offset + _T_S1, j)
            else:
                s0[j] = rnd(mj, cs)
                s1[j] = rnd(vj, cs)
        else:
            base, term, buf = sgd_split(rnd(w[j], cu), gj, rnd(s0[j], cu), scalars, first, l2, momentum, nesterov,
                                        cu, cm)
            if sr_s and momentum:
                s0[j] = stochastic_round64(buf, code_s, seed, counter, offset + _T_S0, j)
            else:
                s0[j] = rnd(buf, cs)
        if kahan:  # step_rules.kahan_store, every op in U: t = delta + c, y = base + t, c = t - (w - base)
            tj = rnd(-term + rnd(s2[j], cu), cu)
            wj = rnd(rnd(base + tj, cu), cw)
            s2[j] = rnd(rnd(tj - rnd(rnd(wj, cu) - base, cu), cu), cs)
        elif sr_w:
            wj = stochastic_round64(rnd(base - term, cu), code_w, seed, counter, offset + _T_W, j)
        else:
            wj = rnd(rnd(base - term, cu), cw)
        pj = rnd(wj, cp)
        w[j] = wj
        p[j] = pj
        nonfinite += (0 if np.isfinite(wj) else 1) + (0 if np.isfinite(pj) else 1)
    return nonfinite == 0


@numba.njit(**JIT)
def unscale_checked(g, cu, scale):
    """Dynamic loss scaling's unscale, in place: g = rnd(rnd(g, U) * rnd(1/scale, U), U), the reciprocal computed
    in float32 (``step_rules.dynamic_unscale``); returns whether the whole unscaled gradient is finite."""
    unscale = rnd(np.float64(np.float32(1.0 / scale)), cu)
    nonfinite = 0
    for j in range(g.size):
        gj = rnd(rnd(g[j], cu) * unscale, cu)
        g[j] = gj
        nonfinite += 0 if np.isfinite(gj) else 1
    return nonfinite == 0


@numba.njit(inline="always", **JIT)
def _dynamic_seed(scale, rem, fst):
    """The step's seed scale with remedies: ``scale`` (round(1 / B, C)), or under dynamic loss scaling
    ``step_rules.dynamic_seed``: round(scale * ls, C), the product (exact in float64) rounded to wider(C, fp32)."""
    if rem[0][_R_DYNAMIC]:
        return rnd(rnd(scale * fst[0], rem[4][6]), rem[4][0])
    return scale


@numba.njit(inline="always", **JIT)
def _remedy_step(step, start, table, base, g, w, s0, s1, s2, p, flags, unscale, rem, ist, fst, skipped):
    """Links 3-10 of the step after the gradient ``g`` (C values) for a policy with remedies; returns the
    divergence rule's verdict (True for a skipped step). Dynamic loss scaling checks the whole unscaled gradient
    before any element is updated, updates the scale (``step_rules.scaler_update``, float32) and skips the step on
    a non-finite gradient (with skip=yes); the update (:func:`apply_remedies`) takes the scalar row and the step of
    the applied-update count ``ist[0]``."""
    iflags = rem[0]
    if iflags[_R_DYNAMIC]:
        finite = unscale_checked(g, rem[4][1], fst[0])
        scale, successful = fst[0], ist[1] + 1
        grown = np.float64(np.float32(scale * rem[1][0]))
        at_interval = successful >= iflags[_R_INTERVAL]
        if not finite:
            fst[0] = np.float64(np.float32(scale * rem[1][1]))
        elif at_interval and np.isfinite(grown):
            fst[0] = grown
        ist[1] = 0 if (not finite or at_interval) else successful
        if not finite and iflags[_R_SKIP]:
            skipped[step - start] = 1
            return True
        unscale = 1.0  # g holds the unscaled gradient in U: rnd(g, U) * 1 is exact
    applied = ist[0]
    ist[0] = applied + 1
    return apply_remedies(step, applied + 1, table[applied - base], g, w, s0, s1, s2, p, flags, unscale, rem)


def step_seed(scale, rem, fst):
    """The step's seed scale: ``scale`` for a policy without remedies (``rem`` None), else :func:`_dynamic_seed`
    (decided at compile time from ``rem``'s type, so the loops of other policies compile as before the remedies)."""
    raise NotImplementedError("step_seed is only callable from numba-compiled code")


@overload(step_seed, jit_options=JIT, inline="always")
def _step_seed(scale, rem, fst):
    if isinstance(rem, types.NoneType):
        return lambda scale, rem, fst: scale
    return lambda scale, rem, fst: _dynamic_seed(scale, rem, fst)


def update_step(step, start, table, base, g, w, s0, s1, s2, p, codes, flags, unscale, rem, ist, fst, skipped):
    """Links 3-10 after the gradient ``g``, the same in every loop: :func:`apply_update` with the chunk's scalar row
    for a policy without remedies (``rem`` None), else :func:`_remedy_step`; returns the divergence rule's verdict.
    Decided at compile time from ``rem``'s type."""
    raise NotImplementedError("update_step is only callable from numba-compiled code")


@overload(update_step, jit_options=JIT, inline="always")
def _update_step(step, start, table, base, g, w, s0, s1, s2, p, codes, flags, unscale, rem, ist, fst, skipped):
    if isinstance(rem, types.NoneType):
        def plain(step, start, table, base, g, w, s0, s1, s2, p, codes, flags, unscale, rem, ist, fst, skipped):
            return apply_update(step, table[step - 1 - start], g, w, s0, s1, p, codes, flags, unscale)
        return plain

    def remedies(step, start, table, base, g, w, s0, s1, s2, p, codes, flags, unscale, rem, ist, fst, skipped):
        return _remedy_step(step, start, table, base, g, w, s0, s1, s2, p, flags, unscale, rem, ist, fst, skipped)
    return remedies


@numba.njit(**JIT)
def _gather(X, rows, Xb, XbT, accum64):
    """The batch's rows of the data pair X into the active members of Xb (all columns) and XbT (its first d
    columns, transposed: the linear models' forward product takes it as its right operand; the classifiers' XbT is
    empty, they read Xb transposed in place). Explicit loops: a slice assignment compiles numba's shape-error
    formatting (seconds)."""
    if accum64:
        _gather_rows(X[1], rows, Xb[1], XbT[1])
    else:
        _gather_rows(X[0], rows, Xb[0], XbT[0])


@numba.njit(inline="always", **JIT)
def _gather_rows(X, rows, Xb, XbT):
    """Row copies into Xb, then XbT transposed from Xb (now in cache), k outer so that its rows are written in
    order: 5.8 us for digits' 128 x 64 batch, against 21 for writing XbT's columns straight from X's rows (one
    run, AMD EPYC Zen 3)."""
    for i in range(rows.size):
        r = rows[i]
        for k in range(X.shape[1]):
            Xb[i, k] = X[r, k]
    for k in range(XbT.shape[0]):
        for i in range(rows.size):
            XbT[k, i] = Xb[i, k]


@numba.njit(**JIT)
def run_linear(start, stop, logistic, X, XT, T, batches, Xb, XbT, Tb, pc, g, work, accum64, scale, table, w, s0,
               s1, p, codes, flags, unscale, s2, rem, ist, fst, skipped):
    """Steps start+1 .. stop of linreg / logreg. X (the data with a column of ones), XT (the data transposed), Xb,
    XbT are (float32, float64) pairs; ``batches`` the chunk's (stop - start, B) row indices, or shape (0, 0) for full
    batch (then X, XT, T are used directly)."""
    full = batches.shape[0] == 0
    base = ist[0]  # applied updates before this chunk: row 0 of a remedy policy's table window
    for step in range(start + 1, stop + 1):
        if full:
            xb, xbt, tb = X, XT, T
        else:
            rows = batches[step - 1 - start]
            _gather(X, rows, Xb, XbT, accum64)
            for i in range(rows.size):
                Tb[i] = T[rows[i]]
            xb, xbt, tb = Xb, XbT, Tb
        _to_compute(p, pc, codes[0])
        seed = step_seed(scale, rem, fst)
        grad_linear(logistic, pc, xb, xbt, tb, seed, codes[0], accum64, work, g)
        if not update_step(step, start, table, base, g, w, s0, s1, s2, p, codes, flags, unscale, rem, ist,
                           fst, skipped):
            return step
    return 0


@numba.njit(inline="always", **JIT)
def _classifier_micro_batch(X, T, rows, Xb, XbT, Tb, accum64):
    _gather(X, rows, Xb, XbT, accum64)
    for i in range(rows.size):
        for c in range(T.shape[1]):
            Tb[i, c] = T[rows[i], c]


@numba.njit(inline="always", **JIT)
def _classifier_batch(step, X, T, batches, Xb, XbT, Tb, accum64):
    """The step's (rows, one-hot targets): the whole data for full batch, else gathered into Xb, Tb."""
    if batches.shape[0] == 0:
        return X, T
    rows = batches[step - 1]  # step: counted from the chunk's start
    _classifier_micro_batch(X, T, rows, Xb, XbT, Tb, accum64)
    return Xb, Tb


@numba.njit(**JIT)
def run_softmax(start, stop, X, XT, T, batches, Xb, XbT, Tb, pc, g, work, accum64, scale, table, w, s0, s1, p,
                codes, flags, unscale, s2, rem, ist, fst, skipped):
    """Steps start+1 .. stop of softmax regression (T: one-hot rows). XT and XbT are empty: the classifiers read X
    transposed in place (``models.transposed``); they stay in the signature the loops share."""
    base = ist[0]  # applied updates before this chunk: row 0 of a remedy policy's table window
    for step in range(start + 1, stop + 1):
        xb, tb = _classifier_batch(step - start, X, T, batches, Xb, XbT, Tb, accum64)
        _to_compute(p, pc, codes[0])
        seed = step_seed(scale, rem, fst)
        grad_softmax(pc, xb, tb, seed, codes[0], accum64, work, g)
        if not update_step(step, start, table, base, g, w, s0, s1, s2, p, codes, flags, unscale, rem, ist,
                           fst, skipped):
            return step
    return 0


@numba.njit(**JIT)
def run_mlp(start, stop, X, XT, T, batches, Xb, XbT, Tb, pc, g, work, accum64, scale, table, w, s0, s1, p, codes,
            flags, unscale, s2, rem, ist, fst, skipped):
    """Steps start+1 .. stop of the one-hidden-layer MLP (T: one-hot rows); XT and XbT empty (:func:`run_softmax`)."""
    base = ist[0]  # applied updates before this chunk: row 0 of a remedy policy's table window
    for step in range(start + 1, stop + 1):
        xb, tb = _classifier_batch(step - start, X, T, batches, Xb, XbT, Tb, accum64)
        _to_compute(p, pc, codes[0])
        seed = step_seed(scale, rem, fst)
        grad_any_mlp(pc, xb, tb, seed, codes[0], accum64, work, g)
        if not update_step(step, start, table, base, g, w, s0, s1, s2, p, codes, flags, unscale, rem, ist,
                           fst, skipped):
            return step
    return 0
