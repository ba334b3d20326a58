"""Stand-alone optimizer update kernels on storage arrays, for the kernel benchmarks (:mod:`precision.kernels`).

One call is one full step of a "pure" policy (params, state and update all in one format): read p, g, m, v in
storage, write p', m', v' to *other* arrays (optax style, out of place), so a timed repeat never reads what the
previous one wrote. Storage is float64 / float32, or uint16 bit patterns for bf16 and fp16 (:mod:`.storage`),
decoded to float32, updated with the per-op rounding of :mod:`.update`, re-encoded: one kernel serves every
width (:func:`.storage.load` / :func:`.storage.save`), each array dtype compiling its own loop. ``cu`` is the update
format's :func:`.rounding.static_code`, so each format compiles its own loop with its rounding folded in.

``adam_step_inplace`` (below) is the in-place variant: p, m, v written back into the arrays read, as the training
loops and torch.optim do, with its own storage format (bf16 storage with fp32 math: the ``torch-bf16`` update).

The memory reference has the same traffic as Adam (read 4 arrays, write 3) and trivial arithmetic: the fastest an
Adam step of that storage width can be on this machine, measured in the same run.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from .rounding import JIT, static_format_name, store
from .storage import load, save
from .update import adam_element, row_scalars, sgd_element

__all__ = ["adam_step", "sgd_step", "memory_reference", "memory_reference16", "adam_step_inplace",
           "memory_reference_inplace", "memory_reference16_inplace"]


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


# --- In place: what a training loop (and torch.optim) does -------------------------------------------------------
#
# ``adam_step_inplace`` reads p, g, m, v and writes p, m, v back into the same arrays. ``cu`` is the update format
# (the arithmetic: every operation rounded to it), ``cst`` the storage format of p, m and v: equal for a pure policy
# (``store`` folds to nothing at compile time), or fp32 math on bf16 storage (precision's ``torch-bf16`` update,
# torch's fused bf16 AdamW): the moments are used as computed in fp32 and each of p, m, v is rounded to bf16 once,
# when stored (3 roundings per element). The element loop has no branch: the optimizer flags are compile-time
# literals of the caller's specialization (``decoupled`` / ``l2`` fold through ``adam_split``'s ``if``s as loop
# invariants, which LLVM unswitches), loads and saves are the static storage conversions.

@intrinsic
def _round_bf16_no_nan_select(typingctx, x):
    """float32 -> bf16 round to nearest even, ``(u + 0x7FFF + lsb) & 0xFFFF0000``, *without* the NaN select of
    :func:`.rounding.rnd`: exact for every finite value and infinity, and a NaN stays a NaN whenever its low 16
    payload bits are zero (truncating the low half then leaves the quiet bit set and adds no carry). In
    ``adam_step_inplace`` with fp32 math on bf16 storage every NaN is such a NaN: the inputs are decoded bf16
    patterns (low half zero) and the float32 arithmetic either propagates an input NaN's payload (quieted) or
    produces the default NaN (0xFFC00000 on x86, 0x7FC00000 on Arm and RISC-V); the row's scalars are finite. So the
    stored bits equal the exact rounding's for every non-NaN result, and a NaN result is stored as a NaN (with the
    sign the CPU gave it, as ml_dtypes' cast keeps it; the exact kernel stores +qNaN). Measured: the select cost
    ~0.4 x the fp32 step at N = 1e7 on AVX2 (docs/performance.md)."""
    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        u = builder.bitcast(args[0], i32)
        lsb = builder.and_(builder.lshr(u, ir.Constant(i32, 16)), ir.Constant(i32, 1))
        r = builder.and_(builder.add(builder.add(u, ir.Constant(i32, 0x7FFF)), lsb), ir.Constant(i32, 0xFFFF0000))
        return builder.bitcast(r, ir.FloatType())
    return types.float32(types.float32), codegen


def to_storage(x, cst, cu):
    """``x`` (a value of the update format ``cu``, float32 carrier) rounded to the storage format ``cst``."""
    raise NotImplementedError("to_storage is only callable from numba-compiled code")


@overload(to_storage, inline="always", jit_options=JIT)
def _to_storage(x, cst, cu):
    if static_format_name(cst) == "bf16" and static_format_name(cu) == "fp32":
        return lambda x, cst, cu: _round_bf16_no_nan_select(np.float32(x))
    return lambda x, cst, cu: store(x, cst, cu)  # the same format: nothing; otherwise the exact rounding


@numba.njit(inline="always", **JIT)
def _adam_inplace_loop(p, g, m, v, row, decoupled, l2, cu, cst):
    for i in range(p.size):
        w, mi, vi = adam_element(load(p[i], cst), load(g[i], cst), load(m[i], cst), load(v[i], cst), row,
                                 decoupled, l2, cu, cu)
        p[i] = save(to_storage(w, cst, cu), p, cst)
        m[i] = save(to_storage(mi, cst, cu), m, cst)
        v[i] = save(to_storage(vi, cst, cu), v, cst)


@numba.njit(**JIT)
def adam_step_inplace(p, g, m, v, row, decoupled, l2, cu, cst):
    row = row_scalars(row)
    # the optimizer flags as constants of three inlined copies of the loop: no flag is tested per element, and
    # each loop compiles for exactly its variant (measured: 1.72 -> 1.42 x the fp32 step for torch-bf16)
    if decoupled:
        _adam_inplace_loop(p, g, m, v, row, 1, 0, cu, cst)
    elif l2:
        _adam_inplace_loop(p, g, m, v, row, 0, 1, cu, cst)
    else:
        _adam_inplace_loop(p, g, m, v, row, 0, 0, cu, cst)


@numba.njit(**JIT)
def memory_reference_inplace(p, g, m, v):
    """The in-place Adam traffic (read p, g, m, v; write p, m, v) with one add per written array (float arrays)."""
    for i in range(p.size):
        gi = g[i]
        m[i] = m[i] + gi
        v[i] = v[i] + gi
        p[i] = p[i] - gi


@numba.njit(**JIT)
def memory_reference16_inplace(p, g, m, v):
    """The same for 16-bit patterns (integer adds: the traffic is what is measured)."""
    for i in range(p.size):
        gi = g[i]
        m[i] = np.uint16(m[i] + gi)
        v[i] = np.uint16(v[i] + gi)
        p[i] = np.uint16(p[i] - gi)
