"""The training loops under gradient accumulation (``RunSpec.accum_steps`` K > 1, ``step_rules.ACCUMULATION``).

Per step, the K micro-batches of ``parts`` (start, stop, buffer slot) are gathered and their gradients computed one
after another into ``gm`` by the same gradient functions as :mod:`.loops`, summed in order into ``ga`` in the
accumulator format (``ca``; the sum starts as micro-batch 1's gradient), and ``ga`` is rounded once to C into
``g``; the update is the same (``loops.update_step``). Micro-batches have at most two sizes (array_split's), so
their scratch arrays come as two slots (``Xbs``, ``XbTs``, ``Tbs``, ``works``: 2-tuples picked by the slot; the
classifiers' ``XbTs`` are empty, as in :mod:`.loops`). Arguments are those of :mod:`.loops`'s loops.
"""

from __future__ import annotations

import numba

from .loops import _classifier_micro_batch, _gather, _to_compute, step_seed, update_step
from .models import grad_any_mlp, grad_linear, grad_softmax
from .rounding import JIT, rnd

__all__ = ["run_linear_accum", "run_softmax_accum", "run_mlp_accum"]


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
                     accum64, ca, scale, table, w, s0, s1, p, codes, flags, unscale, s2, rem, ist, fst, skipped):
    """Steps start+1 .. stop of linreg / logreg with K = parts.shape[0] micro-batches per step. ``schedule``: the
    chunk's rows (stop - start, B), or (1, n) with ``full`` (the full batch, row i at position i); ``parts`` (K, 3):
    start, stop within the step's rows and the scratch slot (0 or 1) of each micro-batch."""
    base = ist[0]  # applied updates before this chunk: row 0 of a remedy policy's table window
    for step in range(start + 1, stop + 1):
        batch_rows = schedule[0] if full else schedule[step - 1 - start]
        _to_compute(p, pc, codes[0])
        seed = step_seed(scale, rem, fst)
        for k in range(parts.shape[0]):
            slot = parts[k, 2]
            rows = batch_rows[parts[k, 0]:parts[k, 1]]
            Xb, XbT, Tb = Xbs[slot], XbTs[slot], Tbs[slot]
            _gather(X, rows, Xb, XbT, accum64)
            for i in range(rows.size):
                Tb[i] = T[rows[i]]
            grad_linear(logistic, pc, Xb, XbT, Tb, seed, codes[0], accum64, works[slot], gm)
            _accumulate(k, gm, ga, ca)
        _round_sum(ga, g, codes[0])
        if not update_step(step, start, table, base, g, w, s0, s1, s2, p, codes, flags, unscale, rem, ist,
                           fst, skipped):
            return step
    return 0


@numba.njit(**JIT)
def run_softmax_accum(start, stop, X, T, schedule, full, parts, Xbs, XbTs, Tbs, works, pc, gm, ga, g, accum64, ca,
                      scale, table, w, s0, s1, p, codes, flags, unscale, s2, rem, ist, fst, skipped):
    """Steps start+1 .. stop of softmax regression with micro-batches (see :func:`run_linear_accum`); XbTs empty
    (:func:`run_softmax`)."""
    base = ist[0]  # applied updates before this chunk: row 0 of a remedy policy's table window
    for step in range(start + 1, stop + 1):
        batch_rows = schedule[0] if full else schedule[step - 1 - start]
        _to_compute(p, pc, codes[0])
        seed = step_seed(scale, rem, fst)
        for k in range(parts.shape[0]):
            slot = parts[k, 2]
            Xb, XbT, Tb = Xbs[slot], XbTs[slot], Tbs[slot]
            _classifier_micro_batch(X, T, batch_rows[parts[k, 0]:parts[k, 1]], Xb, XbT, Tb, accum64)
            grad_softmax(pc, Xb, Tb, seed, codes[0], accum64, works[slot], gm)
            _accumulate(k, gm, ga, ca)
        _round_sum(ga, g, codes[0])
        if not update_step(step, start, table, base, g, w, s0, s1, s2, p, codes, flags, unscale, rem, ist,
                           fst, skipped):
            return step
    return 0


@numba.njit(**JIT)
def run_mlp_accum(start, stop, X, T, schedule, full, parts, Xbs, XbTs, Tbs, works, pc, gm, ga, g, accum64, ca,
                  scale, table, w, s0, s1, p, codes, flags, unscale, s2, rem, ist, fst, skipped):
    """Steps start+1 .. stop of the MLP with micro-batches (see :func:`run_linear_accum`); XbTs empty
    (:func:`run_softmax`)."""
    base = ist[0]  # applied updates before this chunk: row 0 of a remedy policy's table window
    for step in range(start + 1, stop + 1):
        batch_rows = schedule[0] if full else schedule[step - 1 - start]
        _to_compute(p, pc, codes[0])
        seed = step_seed(scale, rem, fst)
        for k in range(parts.shape[0]):
            slot = parts[k, 2]
            Xb, XbT, Tb = Xbs[slot], XbTs[slot], Tbs[slot]
            _classifier_micro_batch(X, T, batch_rows[parts[k, 0]:parts[k, 1]], Xb, XbT, Tb, accum64)
            grad_any_mlp(pc, Xb, Tb, seed, codes[0], accum64, works[slot], gm)
            _accumulate(k, gm, ga, ca)
        _round_sum(ga, g, codes[0])
        if not update_step(step, start, table, base, g, w, s0, s1, s2, p, codes, flags, unscale, rem, ist,
                           fst, skipped):
            return step
    return 0
