"""The CUDA kernels of one training step, op for op as the numba CPU backend's loops (``numba_backend/models.py``,
``linalg.py``, ``loops.apply_update`` / ``apply_remedies``, ``update.py``).

Every array is a flat float64 carrier on the device holding values of its format; every elementwise operation is
rounded to its format right after it (:func:`.device.rnd`). Each kernel is a grid-stride loop over its output
elements, so the launch shape never changes a result; an element's work is one thread's, in a fixed order:

* :func:`matmul`: one thread per output element, k ascending from +0, products and sums in the accumulator
  (:func:`acc_step`: fp32 or fp64), rounded once to the compute format. Operands are addressed through (offset,
  row stride, column stride), so transposes, slices of the flat parameter vector and the ones vectors of column
  and row sums (stride 0) are all this one kernel, as they are the CPU backend's one ``linalg.matmul``;
* row-wise kernels (the softmax) take one thread per row;
* no atomics and no shared-memory reductions anywhere: a result never depends on thread scheduling.
"""

from __future__ import annotations

from numba import cuda

from ..numba_backend.update import COL as _COL, OPT_ADAM, OPT_SGD  # the CPU loops' optimizer kinds and columns
from ..step_rules import SR_WEIGHTS_TENSOR, sr_state_tensor
from .device import (add, add32, device, div, exp_c, is_finite, mul, mul32, random_bits, rnd, sigmoid_c, sqrt,
                     sr_round, sub, tanh_c, to32)

__all__ = ["launch", "round_into", "gather", "matmul", "linear_delta", "add_bias", "activate", "softmax_delta",
           "activation_backward", "update", "unscale_checked", "acc_step", "OPT_SGD", "OPT_ADAM"]

_LR, _WD, _MU, _B1, _OMB1 = _COL["lr"], _COL["weight_decay"], _COL["momentum"], _COL["beta1"], _COL["one_minus_beta1"]
_B2, _OMB2, _SQRT_BC2, _EPS = _COL["beta2"], _COL["one_minus_beta2"], _COL["sqrt_bc2"], _COL["eps"]
_STEP_SIZE, _DECAY = _COL["step_size"], _COL["decay"]
_T_W, _T_S0, _T_S1 = SR_WEIGHTS_TENSOR, sr_state_tensor(0), sr_state_tensor(1)  # stochastic rounding's tensor ids

_THREADS = 256  # per block on a GPU
_SIM_THREADS = 4  # the simulator runs a Python thread per CUDA thread: few, so that its runs stay fast


def launch(kernel, n: int):
    """``kernel`` configured for ``n`` grid-stride elements: (blocks, threads)."""
    from .device import SIMULATOR
    if SIMULATOR:
        return kernel[1, max(1, min(n, _SIM_THREADS))]
    return kernel[max(1, min(-(-n // _THREADS), 65535)), _THREADS]


@cuda.jit
def round_into(src, dst, n, f):
    """dst[j] = rnd(src[j], f): the params converted to the compute format, once per step."""
    for j in range(cuda.grid(1), n, cuda.gridsize(1)):
        dst[j] = rnd(src[j], f)


@cuda.jit
def gather(X, rows, r, cols, Xb, n):
    """The step's batch: Xb[i, :] = X[rows[r, i], :] (flat, ``cols`` columns; n = B * cols). A copy: exact."""
    for idx in range(cuda.grid(1), n, cuda.gridsize(1)):
        i = idx // cols
        Xb[idx] = X[rows[r, i] * cols + idx - i * cols]


@device
def acc_step(acc, a, b, acc64):
    """acc + a * b in the accumulator: fp64 with libdevice's never-contracted multiply and add; fp32 as the CPU
    backend's float32 loop (operands staged to float32, the float32 product, then the float32 sum), each float32
    operation correctly rounded and never contracted (:func:`.device.mul32`)."""
    if acc64:
        return add(acc, mul(a, b))
    return add32(acc, mul32(a, b))


@cuda.jit
def matmul(A, oa, sai, sak, B, ob, sbk, sbj, out, oo, soi, soj, M, N, K, f, acc64):
    """out[i, j] = rnd(sum_k A[i, k] B[k, j], f) for i < M, j < N: one thread per output element, k ascending
    from +0, one rounding (``linalg.matmul``). X[i, k] of operand X is X[o + i * s_i + k * s_k]."""
    for idx in range(cuda.grid(1), M * N, cuda.gridsize(1)):
        i = idx // N
        j = idx - i * N
        acc = 0.0
        for k in range(K):
            acc = acc_step(acc, A[oa + i * sai + k * sak], B[ob + k * sbk + j * sbj], acc64)
        out[oo + i * soi + j * soj] = rnd(acc, f)


@device
def _carry(x, c32):
    """A result stored in the CPU loop's carrier: float32 (the linear models' delta with an fp32 accumulator, see
    ``models._linear_delta``) or float64."""
    return to32(x) if c32 else x


@cuda.jit
def linear_delta(z, pc, ib, T, scale, logistic, f, c32, delta, n):
    """delta[i] = ((z[i] + b, then sigmoid if logistic) - T[i]) * scale, each op rounded to f (``models
    ._linear_delta``), in its carrier: with an fp32 accumulator the CPU computes this in float32 (c32)."""
    for i in range(cuda.grid(1), n, cuda.gridsize(1)):
        v = rnd(_carry(add(z[i], pc[ib]), c32), f)
        if logistic:
            v = _carry(sigmoid_c(v, f), c32)
        v = rnd(_carry(sub(v, T[i]), c32), f)
        delta[i] = rnd(_carry(mul(v, scale), c32), f)


@cuda.jit
def add_bias(Z, pc, ob, N, f, n):
    """Z[i, j] = rnd(Z[i, j] + b[j]) (``models._add_bias``); b = pc[ob:ob + N]."""
    for idx in range(cuda.grid(1), n, cuda.gridsize(1)):
        Z[idx] = rnd(add(Z[idx], pc[ob + idx % N]), f)


@cuda.jit
def activate(A, relu, f, n):
    """relu (max(a, 0): NaN stays, -0 gives +0) or tanh by the format's rule (``models._activate``)."""
    for idx in range(cuda.grid(1), n, cuda.gridsize(1)):
        a = A[idx]
        if relu:
            A[idx] = a if (a > 0 or a != a) else 0.0
        else:
            A[idx] = tanh_c(a, f)


@cuda.jit
def activation_backward(dH, H, relu, f, n):
    """dH * act'(H) (``models._activation_backward``): relu' as sign(H) (1, 0 at 0, NaN for NaN), tanh' as
    1 - H*H, each op rounded."""
    for idx in range(cuda.grid(1), n, cuda.gridsize(1)):
        h = H[idx]
        if relu:
            s = 1.0 if h > 0 else (0.0 if h == 0 else h)
            dH[idx] = rnd(mul(dH[idx], s), f)
        else:
            dH[idx] = rnd(mul(dH[idx], rnd(sub(1.0, rnd(mul(h, h), f)), f)), f)


@cuda.jit
def softmax_delta(Z, T, scale, f, acc64, M, N):
    """Logits Z (M x N) -> (softmax(Z) - T) * scale in place, one thread per row (``models._softmax_delta``):
    Z - max (NaN wins), exp by the format's rule, the row sum in the accumulator (ascending, one rounding: the CPU's
    product with a ones column), then /, -, *, each rounded."""
    for i in range(cuda.grid(1), M, cuda.gridsize(1)):
        row = i * N
        top = Z[row]
        for c in range(1, N):
            if Z[row + c] > top or Z[row + c] != Z[row + c]:
                top = Z[row + c]
        acc = 0.0
        for c in range(N):
            e = exp_c(rnd(sub(Z[row + c], top), f), f)
            Z[row + c] = e
            acc = acc_step(acc, e, 1.0, acc64)
        total = rnd(acc, f)
        for c in range(N):
            Z[row + c] = rnd(mul(rnd(sub(rnd(div(Z[row + c], total), f), T[row + c]), f), scale), f)


@device
def _store(x, fs, fu):
    """A moment stored in S and read back into U (``rounding.store``; ``fs`` is the moment format)."""
    return rnd(rnd(x, fs), fu)


@cuda.jit
def update(g, w, s0, s1, s2, p, bad, table, r, n, fu, fw, fs, fp, fm, opt, first, unscale, kahan, sr):
    """One optimizer step over all elements, in place (``loops.apply_update``; with ``kahan``, ``apply_remedies``'
    compensated store): g rounded to U and unscaled, the optimizer of ``update.adam_split`` / ``sgd_split`` in U,
    moments through the moment format ``fm`` and stored in S, w rounded to W, p = rnd(w, P). ``bad[j]`` = 1 when the
    new weight or param is not finite (the host applies the divergence rule: no reduction on the device).
    ``opt`` = ``update.optimizer_flags``; ``table[r]`` the step's scalar row; ``first``: SGD momentum's first
    step. ``sr`` = (weights, state, seed word, tensor-id offset, counter): stochastic rounding of the new weights
    (``r=sr``) and state (``r=sr-state``) with the random bits of (seed, counter = loop step mod 2^32, tensor, j),
    as ``loops.apply_remedies``."""
    kind, decoupled, l2, momentum, nesterov = opt
    sr_w, sr_s, seed, offset, counter = sr
    for j in range(cuda.grid(1), n, cuda.gridsize(1)):
        gj = rnd(mul(rnd(g[j], fu), unscale), fu)
        wj = rnd(w[j], fu)
        if kind == OPT_ADAM:
            if decoupled:
                wj = rnd(mul(wj, table[r, _DECAY]), fu)
            elif l2:
                gj = rnd(add(gj, rnd(mul(table[r, _WD], wj), fu)), fu)
            m = rnd(s0[j], fu)
            v = rnd(s1[j], fu)
            m = _store(rnd(add(rnd(mul(table[r, _B1], m), fu), rnd(mul(table[r, _OMB1], gj), fu)), fu), fm, fu)
            v = _store(rnd(add(rnd(mul(table[r, _B2], v), fu), rnd(mul(table[r, _OMB2], rnd(mul(gj, gj), fu)), fu)),
                           fu), fm, fu)
            denom = rnd(add(rnd(div(rnd(sqrt(v), fu), table[r, _SQRT_BC2]), fu), table[r, _EPS]), fu)
            term = rnd(div(rnd(mul(table[r, _STEP_SIZE], m), fu), denom), fu)
            if sr_s:
                s0[j] = sr_round(m, fs, random_bits(seed, counter, offset + _T_S0, j))
                s1[j] = sr_round(v, fs, random_bits(seed, counter, offset + _T_S1, j))
            else:
                s0[j] = rnd(m, fs)
                s1[j] = rnd(v, fs)
        else:
            if l2:
                gj = rnd(add(gj, rnd(mul(table[r, _WD], wj), fu)), fu)
            direction = gj
            buf = rnd(s0[j], fu)
            if momentum:
                buf = gj if first else rnd(add(rnd(mul(table[r, _MU], buf), fu), gj), fu)
                buf = _store(buf, fm, fu)
                direction = rnd(add(gj, rnd(mul(table[r, _MU], buf), fu)), fu) if nesterov else buf
            term = rnd(mul(table[r, _LR], direction), fu)
            if sr_s and momentum:
                s0[j] = sr_round(buf, fs, random_bits(seed, counter, offset + _T_S0, j))
            else:
                s0[j] = rnd(buf, fs)
        if kahan:  # step_rules.kahan_store, every op in U: t = -term + c, w = rnd(base + t), c = t - (w - base)
            tj = rnd(add(-term, rnd(s2[j], fu)), fu)
            wn = rnd(rnd(add(wj, tj), fu), fw)
            s2[j] = rnd(rnd(sub(tj, rnd(sub(rnd(wn, fu), wj), fu)), fu), fs)
        elif sr_w:
            wn = sr_round(rnd(sub(wj, term), fu), fw, random_bits(seed, counter, offset + _T_W, j))
        else:
            wn = rnd(rnd(sub(wj, term), fu), fw)
        pn = rnd(wn, fp)
        w[j] = wn
        p[j] = pn
        bad[j] = 0 if (is_finite(wn) and is_finite(pn)) else 1


@cuda.jit
def unscale_checked(g, fu, unscale, bad, n):
    """Dynamic loss scaling's unscale in place, g = rnd(rnd(g, U) * unscale, U) (``loops.unscale_checked``);
    bad[j] = 1 for a non-finite result (the host decides the skip)."""
    for j in range(cuda.grid(1), n, cuda.gridsize(1)):
        gj = rnd(mul(rnd(g[j], fu), unscale), fu)
        g[j] = gj
        bad[j] = 0 if is_finite(gj) else 1
