"""Stand-alone optimizer update kernels on storage arrays, for the kernel benchmarks (:mod:`precision.kernels`).

One call is one full step of a "pure" policy (params, state and update all in one format): read p, g, m, v in
storage, write p', m', v' to *other* arrays (optax style, out of place), so a timed repeat never reads what the
previous one wrote. Storage is float64 / float32, or uint16 bit patterns for bf16 and fp16 (:mod:`.storage`),
decoded to float32, updated with the per-op rounding of :mod:`.update`, re-encoded. ``cu`` is the update format's
:func:`.rounding.static_code`, so each format compiles its own loop with its rounding folded in.

The memory reference has the same traffic as Adam (read 4 arrays, write 3) and trivial arithmetic: the fastest an
Adam step of that storage width can be on this machine, measured in the same run.
"""

from __future__ import annotations

import numba
import numpy as np

from .rounding import JIT
from .storage import decode16, encode16
from .update import adam_element, row_scalars, sgd_element

__all__ = ["adam_step", "adam_step16", "sgd_step", "sgd_step16", "memory_reference", "memory_reference16"]


@numba.njit(**JIT)
def adam_step(p, g, m, v, p_out, m_out, v_out, row, decoupled, l2, cu):
    row = row_scalars(row)
    for i in range(p.size):
        w, mi, vi = adam_element(p[i], g[i], m[i], v[i], row, decoupled, l2, cu, cu)
        p_out[i] = w
        m_out[i] = mi
        v_out[i] = vi


@numba.njit(**JIT)
def adam_step16(p, g, m, v, p_out, m_out, v_out, row, decoupled, l2, cu):
    row = row_scalars(row)
    for i in range(p.size):
        w, mi, vi = adam_element(decode16(p[i], cu), decode16(g[i], cu), decode16(m[i], cu),
                                 decode16(v[i], cu), row, decoupled, l2, cu, cu)
        p_out[i] = encode16(w, cu)
        m_out[i] = encode16(mi, cu)
        v_out[i] = encode16(vi, cu)


@numba.njit(**JIT)
def sgd_step(p, g, buf, p_out, buf_out, row, first_step, l2, momentum, nesterov, cu):
    row = row_scalars(row)
    for i in range(p.size):
        w, b = sgd_element(p[i], g[i], buf[i], row, first_step, l2, momentum, nesterov, cu, cu)
        p_out[i] = w
        buf_out[i] = b


@numba.njit(**JIT)
def sgd_step16(p, g, buf, p_out, buf_out, row, first_step, l2, momentum, nesterov, cu):
    row = row_scalars(row)
    for i in range(p.size):
        w, b = sgd_element(decode16(p[i], cu), decode16(g[i], cu), decode16(buf[i], cu), row, first_step,
                           l2, momentum, nesterov, cu, cu)
        p_out[i] = encode16(w, cu)
        buf_out[i] = encode16(b, cu)


@numba.njit(**JIT)
def memory_reference(p, g, m, v, p_out, m_out, v_out):
    """Adam's memory traffic with one add per written array (float arrays)."""
    for i in range(p.size):
        gi = g[i]
        m_out[i] = m[i] + gi
        v_out[i] = v[i] + gi
        p_out[i] = p[i] - gi


@numba.njit(**JIT)
def memory_reference16(p, g, m, v, p_out, m_out, v_out):
    """The same for 16-bit patterns (integer adds: the traffic is what is measured)."""
    for i in range(p.size):
        gi = g[i]
        m_out[i] = np.uint16(m[i] + gi)
        v_out[i] = np.uint16(v[i] + gi)
        p_out[i] = np.uint16(p[i] - gi)
