"""The optimizer update, one element at a time, op for op as documented in :mod:`precision.optim`.

Each arithmetic operation is rounded to the update format ``cu`` right after it, exactly where the numpy backend's
typed ufuncs round (``numpy_backend/update.py``); moments go through the format ``cs`` the way numpy's
``store_state`` does (rounded to it, read back into U): the training loop passes ``step_rules.moment_format`` there,
the state format S, or U itself under the policy's ``u=`` (the moment is then used as computed and rounded to S
only when stored, by the loop). The element functions are pure and inlined into the loops of
:mod:`.loops` (training, carrier arrays updated in place) and :mod:`.kernels` (benchmarks, storage arrays).

Scalars come from :func:`precision.optim.scalar_table` (float64 on the host, rounded once to U) and arrive as the
step's row; the column order is ``SCALAR_COLUMNS``.
"""

from __future__ import annotations

import numba
import numpy as np

from ...optim import SCALAR_COLUMNS, OptimizerSpec
from .rounding import JIT, rnd, store

__all__ = ["OPT_SGD", "OPT_ADAM", "optimizer_flags", "adam_element", "sgd_element", "adam_split", "sgd_split", "COL",
           "row_scalars"]

COL = {name: i for i, name in enumerate(SCALAR_COLUMNS)}
OPT_SGD, OPT_ADAM = 0, 1
# Column positions as module constants: numba freezes them into the compiled code.
_LR, _WD, _MU, _B1, _OMB1 = COL["lr"], COL["weight_decay"], COL["momentum"], COL["beta1"], COL["one_minus_beta1"]
_B2, _OMB2, _SQRT_BC2, _EPS = COL["beta2"], COL["one_minus_beta2"], COL["sqrt_bc2"], COL["eps"]
_STEP_SIZE, _DECAY = COL["step_size"], COL["decay"]


if len(SCALAR_COLUMNS) != 11:
    raise ImportError("precision.optim.SCALAR_COLUMNS changed: update row_scalars below to match")


@numba.njit(inline="always", **JIT)
def row_scalars(row):
    """The step's scalars as a tuple: element functions take scalars, not an array (an array argument costs a
    reference count per call and blocks inlining and vectorization)."""
    return (row[0], row[1], row[2], row[3], row[4], row[5], row[6], row[7], row[8], row[9], row[10])


def optimizer_flags(opt: OptimizerSpec) -> tuple[int, int, int, int, int]:
    """(kind, decoupled decay, L2 decay, momentum, nesterov) as integers for the kernels."""
    return (OPT_ADAM if opt.is_adam else OPT_SGD, int(opt.name == "adamw"),
            int(opt.name != "adamw" and opt.weight_decay != 0), int(opt.momentum != 0), int(opt.nesterov))


@numba.njit(inline="always", **JIT)
def adam_element(w, g, m, v, row, decoupled, l2, cu, cs):
    """One Adam / AdamW step of one element; w, g, m, v already in the update format. Returns (w, m, v) with
    m and v as rounded to ``cs`` (and read back), w in the update format."""
    base, term, m, v = adam_split(w, g, m, v, row, decoupled, l2, cu, cs)
    return rnd(base - term, cu), m, v


@numba.njit(inline="always", **JIT)
def adam_split(w, g, m, v, row, decoupled, l2, cu, cs):
    """:func:`adam_element` with its last operation left out: (base, term, m, v), new w = rnd(base - term, cu).
    ``base`` is w after AdamW's decay and ``term`` the step (``array_math.update``'s split form: delta = -term,
    exact), for Kahan-compensated updates (``step_rules.KAHAN_CHAIN``)."""
    if decoupled:
        w = rnd(w * row[_DECAY], cu)  # decay = 1 - lr * wd, one host scalar (torch: p.mul_(1 - lr * wd))
    elif l2:
        g = rnd(g + rnd(row[_WD] * w, cu), cu)
    m = store(rnd(rnd(row[_B1] * m, cu) + rnd(row[_OMB1] * g, cu), cu), cs, cu)
    v = store(rnd(rnd(row[_B2] * v, cu) + rnd(row[_OMB2] * rnd(g * g, cu), cu), cu), cs, cu)
    denom = rnd(rnd(rnd(np.sqrt(v), cu) / row[_SQRT_BC2], cu) + row[_EPS], cu)
    return w, rnd(rnd(row[_STEP_SIZE] * m, cu) / denom, cu), m, v


@numba.njit(inline="always", **JIT)
def sgd_element(w, g, buf, row, first_step, l2, momentum, nesterov, cu, cs):
    """One SGD step of one element (torch semantics: buf = g at step 1). Returns (w, buf)."""
    base, term, buf = sgd_split(w, g, buf, row, first_step, l2, momentum, nesterov, cu, cs)
    return rnd(base - term, cu), buf


@numba.njit(inline="always", **JIT)
def sgd_split(w, g, buf, row, first_step, l2, momentum, nesterov, cu, cs):
    """:func:`sgd_element` with its last operation left out: (base, term, buf), new w = rnd(base - term, cu)
    (base: w itself; see :func:`adam_split`)."""
    if l2:
        g = rnd(g + rnd(row[_WD] * w, cu), cu)
    direction = g
    if momentum:
        buf = g if first_step else rnd(rnd(row[_MU] * buf, cu) + g, cu)
        buf = store(buf, cs, cu)
        direction = rnd(g + rnd(row[_MU] * buf, cu), cu) if nesterov else buf
    return w, rnd(row[_LR] * direction, cu), buf
