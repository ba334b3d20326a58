"""Stand-alone optimizer update kernels on storage arrays, for the kernel benchmarks (:mod:`precision.kernels`).

One call is one full step of a "pure" policy (params, state and update all in one format): read p, g, m, v in
storage, write p', m', v' to *other* arrays (optax style, out of place), so a timed repeat never reads what the
previous one wrote. Storage is float64 / float32, or uint16 bit patterns for bf16 and fp16 (:mod:`.storage`),
decoded to float32, updated with the per-op rounding of :mod:`.update`, re-encoded: one kernel serves every
width (:func:`.storage.load` / :func:`.storage.save`), each array dtype compiling its own loop. ``cu`` is the update format's
:func:`.rounding.static_code`, so each format compiles its own loop with its rounding folded in.

The memory reference has the same traffic as Adam (read 4 arrays, write 3) and trivial arithmetic: the fastest an
Adam step of that storage width can be on this machine, measured in the same run.
"""

from __future__ import annotations

import numba
import numpy as np

from .rounding import JIT
from .storage import load, save
from .update import adam_element, row_scalars, sgd_element

__all__ = ["adam_step", "sgd_step", "memory_reference", "memory_reference16"]


@numba.njit(**JIT)
def adam_step(p, g, m, v, p_out, m_out, v_out, row, decoupled, l2, cu):
    row = row_scalars(row)
    for i in range(p.size):
        w, mi, vi = adam_element(load(p[i], cu), load(g[i], cu), load(m[i], cu), load(v[i], cu), row, decoupled,
                                 l2, cu, cu)
        p_out[i] = save(w, p_out, cu)
        m_out[i] = save(mi, m_out, cu)
        v_out[i] = save(vi, v_out, cu)


@numba.njit(**JIT)
def sgd_step(p, g, buf, p_out, buf_out, row, first_step, l2, momentum, nesterov, cu):
    row = row_scalars(row)
    for i in range(p.size):
        w, b = sgd_element(load(p[i], cu), load(g[i], cu), load(buf[i], cu), row, first_step, l2, momentum,
                           nesterov, cu, cu)
        p_out[i] = save(w, p_out, cu)
        buf_out[i] = save(b, buf_out, cu)


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
