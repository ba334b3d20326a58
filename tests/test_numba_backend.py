"""The numba backend against the numpy reference backend: what is bit-identical, what differs, and why.

1. The optimizer update is bit-identical to numpy's for the same gradients: every preset (and policies whose state
   format is narrower than, or not even a subset of, the update format) x every optimizer, on hostile values; both
   for the training loop's update and for the stand-alone storage kernels the benchmarks time.
2. Whole runs differ for exactly two reasons, and a test pins each:
   - accumulation order: numba sums in ascending index order; numpy's ``@`` is BLAS (blocked, FMA) and ``np.sum``
     is pairwise. Running the numpy backend itself with those two replaced by the ascending order (and with numba's
     exp and tanh, next point) reproduces every numba run bit for bit, for every preset, problem and optimizer.
     Each order's error is within the classic bound gamma_k = k u / (1 - k u) of the exact sum.
   - fp32 / fp64 transcendentals: numba's exp and tanh are its own (``ops.exp64``, ``ops.exp32``, ``ops.tanh64``;
     fp32's tanh is tanh64 rounded once), numpy's are its own SIMD loops; they differ by a few ulp. Below
     fp32 both compute in float64 and round once, and agree on every input.
3. With those causes pinned, whole runs agree with numpy within tolerances from the formats: fp64 within 1e-12
   relative after 200 steps; narrower policies within lambda sqrt(T) u_params, and diverge at the same step.
4. The same spec in two processes (1 and 2 numba threads) gives the same fingerprint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import numba
import numpy as np
import pytest

import precision.backends.numpy_backend as numpy_backend
from precision.backends import backend_availability, get_backend
from precision.backends.numba_backend import kernels, linalg, policy_codes
from precision.backends.numba_backend.loops import apply_update
from precision.backends.numba_backend.ops import (exp32_array, exp64_array, exp_c, sigmoid_inplace, tanh64_array,
                                                  tanh_c)
from precision.backends.numba_backend.rounding import format_code, static_code, static_format_name
from precision.backends.numba_backend.update import optimizer_flags
from precision.backends.numpy_backend.ops import FormatOps, convert
from precision.backends.numpy_backend.update import update as numpy_update
from precision.drift import fingerprint
from precision.formats import FORMATS, Format, round_to, to_format
from precision.optim import make_optimizer, scalar_table, state_size
from precision.policy import PRESETS, parse_policy
from precision.runner import dataset_for, train
from precision.spec import RunSpec

from optimizer_cases import OPTIMIZER_CASES, optimizer

FP64, FP32, BF16 = FORMATS["fp64"], FORMATS["fp32"], FORMATS["bf16"]
POLICIES = {**PRESETS,
            "state-bf16": parse_policy("p=fp32,s=bf16"),
            "fp16-state-bf16": parse_policy("p=fp16,s=bf16"),  # U = fp16; bf16 state need not fit fp16's range
            "accum-fp64": parse_policy("p=bf16,c=bf16,a=fp64,s=fp32,m=fp32")}
PROBLEMS = ("linreg", "logreg", "softmax", "mlp")


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal bit patterns, any NaN equal to any NaN (payloads are not part of the contract)."""
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    u = np.dtype(f"u{a.dtype.itemsize}")
    differ = (a.view(u) != b.view(u)) & ~(np.isnan(a.astype(np.float64)) & np.isnan(b.astype(np.float64)))
    return not differ.any()


# -- 1. the optimizer update -----------------------------------------------------------------------------------

def hostile(fmt: Format, n: int, rng, scale: float) -> np.ndarray:
    """n values of ``fmt`` (float64): normal spread around ``scale``, zeros of both signs, subnormals, the
    smallest normal, values near the format's max (where an update overflows), each with both signs."""
    special = np.array([0.0, -0.0, fmt.smallest_subnormal, -fmt.smallest_subnormal, fmt.tiny, -fmt.tiny,
                        3 * fmt.smallest_subnormal, fmt.max / 2, -fmt.max / 2, fmt.max, 1.0, -1.0])
    x = np.concatenate([special, rng.standard_normal(n - special.size) * scale])
    with np.errstate(over="ignore"):
        return round_to(x, fmt)


def numpy_step(opt, pol, step, table, w, st, g_compute):
    """One optimizer step exactly as NumpyBackend.train does it (numpy_backend/__init__.py): gradient from the
    compute format to the update format, loss-scale inverse, update, weights / state / params back to storage."""
    upd = FormatOps(pol.update, pol.accum)
    store_state = (lambda x: x) if pol.state == pol.update else (
        lambda x: convert(convert(x, pol.update, pol.state), pol.state, pol.update))
    g = convert(g_compute, pol.compute, pol.update)
    if pol.loss_scale:
        g = g * upd.scalar(1.0 / pol.loss_scale)
    w_u, st_u = numpy_update(opt, step, table[step - 1], convert(w, pol.weights, pol.update), g,
                             [convert(x, pol.state, pol.update) for x in st], store_state)
    w = convert(w_u, pol.update, pol.weights)
    return w, [convert(x, pol.update, pol.state) for x in st_u], convert(w, pol.weights, pol.params)


@pytest.mark.parametrize("case", OPTIMIZER_CASES)
@pytest.mark.parametrize("policy", POLICIES)
def test_training_update_is_bit_identical(policy, case):
    """The training loop's update (float64 carriers, formats at run time) against numpy, 4 steps, same
    gradients: weights, optimizer state and params equal bit for bit."""
    pol = POLICIES[policy]
    codes = tuple(format_code(f) for f in (pol.compute, pol.update, pol.weights, pol.state, pol.params))
    check_update_against_numpy(pol, optimizer(case), codes, np.random.default_rng(len(policy) * 31 + len(case)))


@pytest.mark.parametrize("case", OPTIMIZER_CASES)
def test_pure_fp32_update_in_float32_carrier_is_bit_identical(case):
    """The pure fp32 policy's loop codes (``policy_codes``: static fp32) run the update in float32 arithmetic
    (``rounding.rnd_narrow``): every + - * / sqrt of two float32 values is the correctly rounded fp32 result, as the
    float64 operation rounded once to fp32 is (53 >= 2 * 24 + 2), so the bits must equal numpy's fp32 update,
    subnormals, overflow to inf and NaN included."""
    pol = POLICIES["fp32"]
    codes = policy_codes(pol, "mlp")
    assert all(static_format_name(numba.typeof(c)) == "fp32" for c in codes)  # the float32-carrier path runs
    check_update_against_numpy(pol, optimizer(case), codes, np.random.default_rng(len(case)))


def check_update_against_numpy(pol, opt, codes, rng):
    n, steps = 3000, 4
    w = to_format(hostile(pol.weights, n, rng, 0.5), pol.weights)
    st = [np.zeros(n, pol.state.dtype) for _ in range(state_size(opt))]
    table = scalar_table(opt, steps, pol.update)
    # numba side: float64 carriers
    w64, p64 = w.astype(np.float64), round_to(w.astype(np.float64), pol.params)
    s0, s1 = np.zeros(n), np.zeros(n)
    unscale = float(round_to(1.0 / pol.loss_scale, pol.update)) if pol.loss_scale else 1.0
    for step in range(1, steps + 1):
        g64 = hostile(pol.compute, n, rng, 1e-2)
        if step == 3:
            # diverging elements: inf / NaN must propagate the same way (as values of the format: e4m3fn has no inf)
            g64[-3:] = round_to(np.array([np.inf, -np.inf, np.nan]), pol.compute)
        with np.errstate(all="ignore"):
            w, st, p = numpy_step(opt, pol, step, table.astype(pol.update.dtype), w, st, g64.astype(pol.compute.dtype))
            apply_update(step, table[step - 1], g64, w64, s0, s1, p64, codes, optimizer_flags(opt), unscale)
        assert same_bits(w64.astype(pol.weights.dtype), w), f"weights differ at step {step}"
        assert same_bits(p64.astype(pol.params.dtype), p), f"params differ at step {step}"
        for mine, theirs in zip((s0, s1), st):
            assert same_bits(mine.astype(pol.state.dtype), theirs), f"state differs at step {step}"


STORAGE = ("fp64", "fp32", "fp16", "bf16")


@pytest.mark.parametrize("case", ["adam", "adamw", "adam-wd", "sgd", "sgd-momentum", "sgd-nesterov-wd"])
@pytest.mark.parametrize("name", STORAGE)
def test_storage_kernels_are_bit_identical(name, case):
    """The benchmarks' kernels (storage arrays, uint16 for fp16 / bf16, format folded in at compile time) against
    numpy's update on float16 / bfloat16 / float32 / float64 arrays, a pure policy, one step at step 7 (and step 1
    for SGD, whose momentum buffer starts as the gradient)."""
    fmt, opt = FORMATS[name], optimizer(case)
    rng = np.random.default_rng(7)
    n = 5000
    p, g, m, v = (hostile(fmt, n, rng, s) for s in (0.5, 1e-2, 1e-3, 1e-4))
    v = np.abs(v)  # a second moment is never negative
    arrays = [to_format(a, fmt) for a in (p, g, m, v)]
    for step in (1, 7):
        row = scalar_table(opt, step, fmt)[step - 1]
        state = arrays[2:4] if opt.is_adam else arrays[2:3]
        with np.errstate(all="ignore"):
            want_p, want_state = numpy_update(opt, step, row.astype(fmt.dtype), arrays[0], arrays[1], state)
        code, carrier_row = static_code(fmt), row.astype(np.float64 if name == "fp64" else np.float32)
        decoupled, l2, momentum, nesterov = optimizer_flags(opt)[1:]
        store = (lambda a: a.view(np.uint16)) if fmt.bits == 16 else (lambda a: a)
        ins = [store(a) for a in arrays]
        outs = [np.empty_like(ins[0]) for _ in range(3)]
        if opt.is_adam:
            kernels.adam_step(*ins, *outs, carrier_row, decoupled, l2, code)
            got_state = outs[1:]
        else:
            kernels.sgd_step(ins[0], ins[1], ins[2], outs[0], outs[1], carrier_row, step == 1, l2, momentum,
                             nesterov, code)
            got_state = outs[1:2]
        view = (lambda a: a.view(fmt.dtype)) if fmt.bits == 16 else (lambda a: a)
        assert same_bits(view(outs[0]), want_p)
        if opt.momentum or opt.is_adam:
            for got, want in zip(got_state, want_state):
                assert same_bits(view(got), want)


# -- 2. the causes of whole-run differences --------------------------------------------------------------------

def numba_exp(x: np.ndarray) -> np.ndarray:
    """numba's exp on a float64 (exp64) or float32 (exp32) array: what the loops compute."""
    flat = np.ascontiguousarray(x).ravel()
    out = np.empty_like(flat)
    (exp32_array if x.dtype == np.float32 else exp64_array)(flat, out)
    return out.reshape(x.shape)


def numba_tanh(x: np.ndarray) -> np.ndarray:
    """numba's tanh: tanh64 on a float64 array; on a float32 array tanh64 of its values rounded once to float32."""
    flat = np.ascontiguousarray(x, dtype=np.float64).ravel()
    out = np.empty_like(flat)
    tanh64_array(flat, out)
    return out.reshape(x.shape).astype(x.dtype)


_NUMBA_FN = {"exp": numba_exp, "tanh": numba_tanh}


class AscendingProductOps(FormatOps):
    """numpy_backend.ops.FormatOps with numba's matrix product: products (exact, or rounded in fp32 / fp64) added in
    ascending k in the accumulator's dtype, starting from +0, one rounding to the format (numba_backend/linalg.py)."""

    def matmul(self, a, b):
        acc = self.accum.dtype
        a, b = a.astype(acc), b.astype(acc)
        out = np.zeros((a.shape[0],) + b.shape[1:], dtype=acc)
        for k in range(a.shape[1]):
            out = out + (a[:, k:k + 1] * b[k] if b.ndim == 2 else a[:, k] * b[k])
        return convert(out, self.accum, self.fmt)


class SequentialOps(AscendingProductOps):
    """numpy_backend.ops.FormatOps with numba's definitions of the two things that differ: every matrix product and
    sum accumulates in ascending index order (products and sums each rounded in the accumulator's dtype, starting
    from +0, one rounding to the format at the end), exp and tanh are numba's own."""

    def sum(self, x, axis, keepdims=False):
        acc = np.zeros(np.delete(x.shape, axis), dtype=self.accum.dtype)
        for i in range(x.shape[axis]):
            acc = acc + np.take(x, i, axis=axis).astype(self.accum.dtype)
        out = convert(acc, self.accum, self.fmt)
        return np.expand_dims(out, axis) if keepdims else out

    def _transcendental(self, name, x):
        if self._wide_transcendentals:
            return to_format(_NUMBA_FN[name](x.astype(np.float64)), self.fmt)
        return _NUMBA_FN[name](x)

    def exp(self, x):
        return self._transcendental("exp", x)

    def tanh(self, x):
        return self._transcendental("tanh", x)

    def sigmoid(self, x):
        if self._wide_transcendentals:
            z = x.astype(np.float64)
            return to_format(1.0 / (1.0 + numba_exp(-z)), self.fmt)
        one = x.dtype.type(1)
        return one / (one + numba_exp(-x))


def spec_for(problem, opt, policy, backend, steps=200, batch_size=128, data="synthetic") -> RunSpec:
    opt = optimizer(opt) if isinstance(opt, str) else opt
    return RunSpec(problem=problem, optimizer=opt, policy=POLICIES[policy], backend=backend, steps=steps,
                   batch_size=batch_size, data=data, record_every=max(steps // 4, 1))


def run_pair(problem, opt, policy, **kw):
    """(numpy trajectory, numba trajectory) of the same spec on the same dataset."""
    s_numpy = spec_for(problem, opt, policy, "numpy", **kw)
    dataset = dataset_for(s_numpy)
    with np.errstate(all="ignore"):
        return train(s_numpy, dataset), train(dataclasses.replace(s_numpy, backend="numba"), dataset)


@pytest.mark.parametrize("opt", ["sgd-momentum", "adam"])
@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("policy", POLICIES)
def test_numpy_with_numba_order_reproduces_numba(policy, problem, opt, monkeypatch):
    """The pin: the numpy backend's own training loop, with SequentialOps in place of FormatOps, gives numba's
    results bit for bit (every record step, final params, divergence step). So in every whole-run difference
    between the two backends, accumulation order and the fp32/fp64 transcendentals are the only causes."""
    monkeypatch.setattr(numpy_backend, "FormatOps", SequentialOps)
    ref, got = run_pair(problem, opt, policy, steps=40)
    assert ref.diverged_at == got.diverged_at
    assert np.array_equal(ref.record_steps, got.record_steps)
    assert same_bits(got.params, ref.params)
    assert fingerprint(got.final_params) == fingerprint(ref.final_params)


def test_full_batch_reproduced_too(monkeypatch):
    """The same pin on the full-batch path (no minibatch gather), logistic regression 1024 x 32."""
    monkeypatch.setattr(numpy_backend, "FormatOps", SequentialOps)
    ref, got = run_pair("logreg", "adam", "fp32", steps=40, batch_size=None)
    assert fingerprint(got.final_params) == fingerprint(ref.final_params)


def gamma(k: int, u: float) -> float:
    """Higham's gamma_k = k u / (1 - k u): the relative error bound of a k-term recursive sum or dot product."""
    return k * u / (1 - k * u)


@pytest.mark.parametrize("accum", ["fp32", "fp64"])
@pytest.mark.parametrize("compute", ["fp32", "bf16"])
def test_accumulation_order_within_gamma_k(compute, accum):
    """numba's ascending sum and numpy's BLAS product, each against the exact dot product (math.fsum of exact
    float64 products of <= 24-bit values): both within gamma_k u_accum sum|a_i b_i| plus the final rounding to the
    compute format, so they differ by at most twice that. k = 1024 terms, a logistic-regression forward pass."""
    cfmt, afmt = FORMATS[compute], FORMATS[accum]
    rng = np.random.default_rng(11)
    k, m = 1024, 64
    A = round_to(rng.standard_normal((m, k)), cfmt)
    x = round_to(rng.standard_normal(k), cfmt)
    exact = np.array([math.fsum(A[i] * x) for i in range(m)])  # products exact: 24 + 24 bits < 53
    accumulated = gamma(k, afmt.unit_roundoff) * (np.abs(A) @ np.abs(x))
    bound = accumulated + cfmt.unit_roundoff * (np.abs(exact) + accumulated)  # |fl_c(s^) - s^| <= u_c |s^|
    acc_dtype = np.float64 if accum == "fp64" else np.float32
    numba_out = np.empty((1, m))
    # the forward pass's form: (w as a row) @ X.T, operands in the accumulator's dtype (exact: format values)
    linalg.matmul(x.reshape(1, k).astype(acc_dtype), np.ascontiguousarray(A.T, dtype=acc_dtype),
                  np.zeros(m, acc_dtype), numba_out, format_code(cfmt))
    numba_out = numba_out[0]
    numpy_out = FormatOps(cfmt, afmt).matmul(A.astype(cfmt.dtype), x.astype(cfmt.dtype)).astype(np.float64)
    assert (np.abs(numba_out - exact) <= bound).all()
    assert (np.abs(numpy_out - exact) <= bound).all()
    assert (np.abs(numba_out - numpy_out) <= 2 * bound).all()


@pytest.mark.parametrize("acc_dtype", [np.float32, np.float64])
def test_tiles_give_the_one_row_bits(acc_dtype):
    """linalg.matmul's register tiles (acc >= TILE_ELEMENTS: ROWS rows x 16 float32 or 8 float64 columns, the last
    part-tile from a zero-padded copy of B) share only the loads of B: every output is still its own sum in
    ascending k, so the bits equal the one-row kernel's (acc of n, too short for a tile) and the ascending
    reference's, NaN and inf included, for row counts around multiples of ROWS, column counts around multiples of
    8 and 16 (whole tiles, part-tiles, both) and k of 1 up to past 32."""
    rng = np.random.default_rng(4)
    code = format_code(BF16)
    shapes = [(1, 3, 5), (4, 4, 8), (5, 9, 10), (7, 33, 17), (8, 1, 3), (13, 12, 9), (8, 5, 16), (12, 7, 32),
              (9, 40, 33), (4, 2, 1), (16, 3, 24)]
    for m, k, n in shapes:
        A = round_to(rng.standard_normal((m, k)) * 8, BF16).astype(acc_dtype)
        B = round_to(rng.standard_normal((k, n)), BF16).astype(acc_dtype)
        A[m - 1, 0], B[k - 1, n - 1] = np.inf, np.nan  # a special value in the last row block and column
        one, tiled = np.empty((m, n)), np.empty((m, n))
        assert n < linalg.TILE_ELEMENTS  # so that an acc of n takes the one-row path
        with np.errstate(invalid="ignore"):
            linalg.matmul(A, B, np.zeros(n, acc_dtype), one, code)
            linalg.matmul(A, B, linalg.acc_pair(n, acc_dtype == np.float64)[acc_dtype == np.float64], tiled, code)
            want = np.zeros((m, n), acc_dtype)
            for kk in range(k):
                want = want + A[:, kk:kk + 1] * B[kk]
        assert same_bits(tiled, one)
        assert same_bits(tiled, round_to(want.astype(np.float64), BF16))
        # A as the transposed (F-contiguous) view of a C array, read in place by the tiles (linalg.a_operand)
        from_view = np.empty((m, n))
        with np.errstate(invalid="ignore"):
            linalg.matmul(np.ascontiguousarray(A.T).T, B, np.zeros(max(n, linalg.TILE_ELEMENTS), acc_dtype),
                          from_view, code)
        assert same_bits(from_view, tiled)


@pytest.mark.parametrize("accum", ["fp32", "fp64"])
def test_softmax_row_sums_are_the_product_with_ones(accum):
    """The softmax's row sums (``models._row_sums``: a loop in the accumulator's type) give the bits of the product
    with a column of ones they replace (each 1 * z exact, added in ascending order from +0): -0, subnormals,
    cancellation and inf included."""
    from precision.backends.numba_backend.models import _row_sums

    rng = np.random.default_rng(5)
    Z = round_to(rng.standard_normal((37, 10)) * 4, BF16)
    Z[0], Z[1, :3], Z[2, 4] = -0.0, [1e30, -1e30, 2.0 ** -130], np.inf
    code, acc64 = format_code(BF16), accum == "fp64"
    dtype = np.float64 if acc64 else np.float32
    sums, product = np.empty((37, 1)), np.empty((37, 1))
    with np.errstate(invalid="ignore", over="ignore"):
        numba.njit(lambda Z, sums, code, acc64: _row_sums(Z, sums, code, acc64))(Z, sums, code, acc64)
        linalg.matmul(Z.astype(dtype), np.ones((10, 1), dtype), np.zeros(linalg.TILE_ELEMENTS, dtype), product, code)
    assert same_bits(sums, product)


def test_tile_kernel_is_vector_multiplies_and_adds_without_fma():
    """The tile's k loop compiles to packed multiplies and adds (the sums in vector registers) and never to an FMA
    (one rounding fewer would change the bits), for both accumulator types."""
    from precision.backends.numba_backend.tile import tile

    @numba.njit
    def one_tile(A, B, out):
        tile(A, 0, A.shape[1], 1, B, 0, B.shape[1], A.shape[1], out, 0, out.size // 4)

    for dtype, suffix in ((np.float32, "ps"), (np.float64, "pd")):
        one_tile(np.ones((4, 3), dtype), np.ones((3, 16), dtype), np.zeros(64, dtype))
    for signature in one_tile.signatures:
        asm = one_tile.inspect_asm(signature)
        assert "fmadd" not in asm and "fnmadd" not in asm
        suffix = "ps" if signature[0].dtype == numba.float32 else "pd"
        assert re.search(rf"vmul{suffix}\s+%[yz]mm", asm) and re.search(rf"vadd{suffix}\s+%[yz]mm", asm)


@numba.njit
def _transcendentals(x, code, out):
    for i in range(x.size):
        out[0, i] = exp_c(x[i], code)
        out[1, i] = tanh_c(x[i], code)
        out[2, i] = x[i]
    sigmoid_inplace(out[2], code)  # the loops' own sigmoid (models.py)


def numba_transcendentals(x64: np.ndarray, fmt: Format) -> np.ndarray:
    out = np.empty((3, x64.size))
    _transcendentals(x64, format_code(fmt), out)
    return out


@pytest.mark.parametrize("name", ["fp16", "bf16", "fp8_e4m3fn"])
def test_narrow_transcendentals_agree_with_numpy_everywhere(name):
    """Below fp32 both backends compute exp / tanh / sigmoid in float64 and round once: equal on every finite
    value of the format (numpy's float64 SIMD exp and libm's differ by an ulp of float64 now and then, which a
    rounding to <= 11 bits does not see on these inputs)."""
    fmt = FORMATS[name]
    patterns = np.arange(2 ** fmt.bits, dtype=np.uint32).astype(np.dtype(f"u{fmt.dtype.itemsize}"))
    with np.errstate(invalid="ignore"):
        values = patterns.view(fmt.dtype)
        values = values[np.isfinite(values.astype(np.float64))]
    ops = FormatOps(fmt, FP32)
    with np.errstate(all="ignore"):
        want = [f(values).astype(np.float64) for f in (ops.exp, ops.tanh, ops.sigmoid)]
        got = numba_transcendentals(values.astype(np.float64), fmt)
    for row, w in zip(got, want):
        assert same_bits(row, w)


def ulp_distance32(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in float32 ulps between same-sign finite float32 arrays (difference of the bit patterns)."""
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


def test_fp32_transcendentals_differ_from_numpy_by_a_few_ulp():
    """The fp32 cause, pinned: numba's fp32 exp is exp32 (float32 arithmetic, within 1 ulp of the correctly
    rounded value), its tanh tanh64 rounded once to float32 (within 4 float64 ulps, test_tanh64_within_four_ulp:
    the float32 rounding can then differ from the correctly rounded one only for a value within 2^-50 relative of
    a float32 midpoint, so at most 1 ulp); numpy's are its own SIMD loops (NumPy documents 2.52 ulp for float32 exp
    on AVX-512; tanh measured 1). So they differ, by at most the sum of the two bounds, on the inputs fp32 training
    evaluates them on."""
    x = np.random.default_rng(5).uniform(-20, 20, 200_000).astype(np.float32)
    got = numba_transcendentals(x.astype(np.float64), FP32).astype(np.float32)
    for name, mine, own_ulp, numpy_ulp in (("exp", got[0], 1, 3), ("tanh", got[1], 1, 3)):
        exact = getattr(np, name)(x.astype(np.float64)).astype(np.float32)  # correctly rounded but for rare ties
        theirs = getattr(np, name)(x)
        assert np.array_equal(mine, _NUMBA_FN[name](x)), f"numba's fp32 {name} is not the documented function"
        assert ulp_distance32(mine, exact).max() <= own_ulp
        assert ulp_distance32(theirs, exact).max() <= numpy_ulp
        assert ulp_distance32(mine, theirs).max() <= own_ulp + numpy_ulp
        assert (mine != theirs).any(), f"numpy's float32 {name} now equals numba's: update docs/numba.md"


def ulp_distance64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.view(np.int64) - b.view(np.int64))


@pytest.mark.parametrize("low, high", [(-1.0, 1.0), (-700.0, 700.0), (-745.2, -708.0), (700.0, 709.78)])
def test_exp64_within_one_ulp(low, high):
    """numba's float64 exp against the C library's (math.exp: glibc's exp is correctly rounded in practice) on
    random inputs, including the subnormal results below exp(-708) and the largest finite ones: at most 1 ulp
    (Taylor remainder < 5e-18 relative; about eight float64 roundings, most of them scaled down by |r| < 0.35)."""
    x = np.random.default_rng(abs(int(low))).uniform(low, high, 100_000)
    want = np.array([math.exp(v) for v in x])
    got = numba_exp(x)
    assert ulp_distance64(got, want).max() <= 1


@pytest.mark.parametrize("low, high", [(-1e-6, 1e-6), (-0.3, 0.3), (-1.0, 1.0), (-3.0, 3.0), (-25.0, 25.0)])
def test_tanh64_within_four_ulp(low, high):
    """numba's float64 tanh against the true value (mpmath at 200 bits, rounded once) on random inputs across the
    branch at log(3)/2 and the clamp at 20. The bound, op by op in float64 ulps: expm1(r) within 1.5 (its last
    addition 0.5, the roundings of r^2 q(r) scaled by |r| / 2 < 0.55 at most 1); e = (2^k - 1) + 2^k p adds 0.5 and
    scales p's error by 2^k |p| / e <= 1.4 (k = 1 at the branch's low end), so 2.6; below the branch e / (e + 2)
    passes e's error scaled by 2 / (e + 2) <= 1 and adds 0.5 (the sum) + 0.5 (the division): 3.6; above it
    1 - 2/(e + 2) scales 2/(e + 2)'s error (3.6 at most) by (2/(e + 2)) / tanh < 1 and adds 0.5: 4. Measured: 2.
    glibc's tanh (math.tanh) measured 2 on the same inputs, so the C library is no more exact."""
    mpmath = pytest.importorskip("mpmath")
    x = np.random.default_rng(int(high * 100)).uniform(low, high, 20_000)
    with mpmath.workprec(200):
        want = np.array([float(mpmath.tanh(mpmath.mpf(float(v)))) for v in x])
    assert ulp_distance64(numba_tanh(x), want).max() <= 4


def test_tanh64_special_values():
    """tanh(+-0) = +-0 (sign kept), +-inf and large arguments -> +-1, NaN through, subnormals unchanged (2x / 2);
    19 is below the clamp at 20 and must not round to 1 (1 - tanh 19 = 6.3e-17 > 2^-54)."""
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 5e-324, -5e-324, 1e-310, 20.0, 1e300, -1e300, 19.0])
    want = np.array([0.0, -0.0, 1.0, -1.0, np.nan, 5e-324, -5e-324, 1e-310, 1.0, 1.0, -1.0, math.tanh(19.0)])
    assert same_bits(numba_tanh(x), want)


def test_exp32_within_one_ulp():
    """exp32 against the correctly rounded float32 exp (float64 exp rounded once: a float64 error of 2^-29 ulp of
    float32 flips a rounding only within that distance of a midpoint, which these inputs do not hit) on 10^6
    random float32 inputs over the whole range, subnormal and overflowing results included: at most 1 ulp (the
    degree-7 Taylor remainder is 0.09 ulp, about six float32 roundings of |r| < 0.35 terms add the rest)."""
    rng = np.random.default_rng(32)
    x = np.concatenate([rng.uniform(-104.0, 89.0, 10**6), rng.uniform(-1.0, 1.0, 10**5)]).astype(np.float32)
    with np.errstate(over="ignore"):
        want = np.exp(x.astype(np.float64)).astype(np.float32)
    got = numba_exp(x)
    assert np.array_equal(np.isinf(got), np.isinf(want))
    finite = np.isfinite(want)
    assert ulp_distance32(got[finite], want[finite]).max() <= 1
    specials = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 88.72283, 88.72284, -103.97, -200.0], np.float32)
    with np.errstate(over="ignore"):
        assert same_bits(numba_exp(specials), np.exp(specials.astype(np.float64)).astype(np.float32))


def test_exp64_special_values():
    """Overflow to inf exactly past log(DBL_MAX), underflow through the subnormals to +0, NaN through, +-0 -> 1."""
    big, tiny = math.log(np.finfo(np.float64).max), -745.1332191019411  # exp(tiny) = the smallest subnormal
    x = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, big, np.nextafter(big, np.inf), 1000.0,
                  tiny, np.nextafter(tiny, -np.inf), -746.0, -1e300, 1e-300])
    got = numba_exp(x)
    want = [np.nan, np.inf, 0.0, 1.0, 1.0, math.exp(big), np.inf, np.inf, 5e-324, 0.0, 0.0, 0.0, 1.0]
    assert same_bits(got, np.array(want))


def test_exp_loops_vectorize_without_a_library_call():
    """Why exp32 / exp64 exist: the logistic regression's fp32 sigmoid loop compiles to packed float32 arithmetic
    with no call into the C library (libm's exp is called per element and keeps the loop scalar)."""
    from precision.backends.numba_backend.ops import sigmoid_inplace
    kernel = numba.njit(error_model="numpy")(sigmoid_inplace.py_func)  # uncached: cached code cannot be inspected
    kernel(np.zeros(64), static_code(FP32))
    assembly = kernel.inspect_asm(kernel.signatures[0])
    assert "vmulps" in assembly and "vdivps" in assembly
    assert "exp" not in "".join(line for line in assembly.splitlines() if "call" in line)


def test_tanh_loop_vectorizes_without_a_library_call():
    """Why tanh64 exists: the MLP's activation pass (fp32 rule: tanh64 rounded to float32) compiles to packed
    float64 arithmetic with no call into the C library (np.tanh lowers to tanh / tanhf, called per element: 31 ns
    per element against 3.4 for tanh64 on the development machine)."""
    from precision.backends.numba_backend.ops import tanh_inplace
    kernel = numba.njit(error_model="numpy")(tanh_inplace.py_func)
    kernel(np.zeros((4, 64)), format_code(FP32))
    assembly = kernel.inspect_asm(kernel.signatures[0])
    # packed float64 division on 256- or 512-bit registers (LLVM prefers 256 bits on most AVX-512 CPUs)
    assert re.search(r"vdivpd\s.*[yz]mm", assembly), "the tanh pass does not divide several float64 lanes at a time"
    assert "tanh" not in "".join(line for line in assembly.splitlines() if "call" in line)


# -- 3. whole runs against numpy as it is --------------------------------------------------------------------

@pytest.mark.parametrize("opt", ["sgd-momentum", "adam", "adamw"])
@pytest.mark.parametrize("problem", PROBLEMS)
def test_fp64_runs_agree_to_1e12(problem, opt):
    """fp64, 200 steps: the two orders and the two exps (numba's exp64, numpy's SIMD exp; both within 1 ulp) differ
    by ~1e-16 per step; the issue's bound is 1e-12 relative after 200 steps (measured: ~3.5e-16)."""
    ref, got = run_pair(problem, opt, "fp64")
    rel = np.linalg.norm(got.params - ref.params, axis=1) / np.linalg.norm(ref.params, axis=1)
    assert rel.max() <= 1e-12


# Per step the two backends differ by a few rounding errors of the params format (order and transcendentals
# perturb a gradient entry across a rounding boundary now and then). Modelled as independent rounding errors, the
# gap after T steps grows like sqrt(T) u (Higham & Mary, SIAM J. Sci. Comput. 2019: lambda sqrt(n) u holds with
# probability >= 1 - 2 exp(-lambda^2 / 2) per term); lambda = 5.
LAMBDA = 5.0


@pytest.mark.parametrize("opt", ["sgd-momentum", "adam"])
@pytest.mark.parametrize("problem", PROBLEMS)
@pytest.mark.parametrize("policy", [p for p in PRESETS if p != "fp64"])
def test_low_precision_runs_agree_within_sqrt_steps_u(policy, problem, opt):
    """200 steps: same divergence step, and rel_l2(numba, numpy) <= lambda sqrt(T) u_params at every record."""
    ref, got = run_pair(problem, opt, policy)
    assert ref.diverged_at == got.diverged_at
    if ref.diverged_at is not None:
        return  # both stopped at the same step; non-finite params have no distance
    u = POLICIES[policy].params.unit_roundoff
    tol = LAMBDA * math.sqrt(ref.record_steps[-1]) * u
    rel = np.linalg.norm(got.params - ref.params, axis=1) / np.linalg.norm(ref.params, axis=1)
    assert rel.max() <= tol, f"rel {rel.max():.3g} > {tol:.3g}"


# -- 4. determinism and the backend contract -------------------------------------------------------------------

@pytest.mark.parametrize("policy, problem, static", [("fp32", "logreg", True), ("fp32", "linreg", True),
                                                     ("fp32", "mlp", True), ("fp32", "mlp-16x8-relu", True),
                                                     ("fp32", "softmax", True), ("fp64", "logreg", False),
                                                     ("bf16-mixed", "mlp", False), ("state-bf16", "logreg", False)])
def test_static_codes_only_for_the_pure_fp32_loops(policy, problem, static):
    """Which runs take the static-code loops (the pinning tests above cover both kinds bit for bit): the pure fp32
    policy of every problem, and nothing else, so the default matrix compiles one extra loop per problem family,
    not one per policy."""
    from precision.backends.numba_backend.rounding import FormatCode
    codes = policy_codes(POLICIES[policy], problem)
    assert all(isinstance(c, FormatCode) for c in codes)
    assert [static_format_name(numba.typeof(c)) is not None for c in codes] == [static] * 5


_CHILD = """
import json, sys
import precision
from precision.runner import dataset_for, train
from precision.drift import fingerprint
spec = precision.build_specs(["mlp"], ["adam"], ["bf16-mixed"], backends=["numba"], data=["digits"], steps=60)[0]
print(json.dumps(fingerprint(train(spec, dataset_for(spec)).final_params)))
"""


def test_same_fingerprint_in_separate_processes_and_thread_counts():
    spec = RunSpec(problem="mlp", optimizer=make_optimizer("adam"), policy=PRESETS["bf16-mixed"],
                   backend="numba", data="digits", steps=60)
    here = fingerprint(train(spec, dataset_for(spec)).final_params)
    prints = []
    for threads in ("1", "2"):
        env = dict(os.environ, NUMBA_NUM_THREADS=threads)
        out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True)
        prints.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert prints == [here, here]


def test_contract_dtypes_compile_time_and_devices():
    spec = spec_for("softmax", "adam", "bf16", "numba", steps=30)
    traj = train(spec, dataset_for(spec))
    assert traj.final_params.dtype == PRESETS["bf16"].params.dtype
    assert traj.compile_s >= 0 and len(traj.step_times_s) > 0
    assert np.array_equal(traj.record_steps, [0, 7, 14, 21, 28, 30])
    # The GPU is the numba-cuda kernels (tests/test_numba_cuda.py): listed where they can run, else the one-line
    # reason names what is missing (the package, or a GPU).
    gpu = backend_availability("numba", "gpu")
    if gpu.available:
        assert get_backend("numba").devices() == ("cpu", "gpu")
    else:
        assert "numba-cuda" in gpu.reason and "\n" not in gpu.reason
        assert get_backend("numba").devices() == ("cpu",)


def test_division_by_underflowed_eps_is_a_result_not_an_exception():
    """Pure fp16 Adam: eps = 1e-8 rounds to 0 in fp16, so 0 / 0 at step 1 (error_model='numpy' gives NaN where
    numba's default would raise ZeroDivisionError); the run reports diverged_at = 1, like numpy."""
    assert to_format(1e-8, FORMATS["fp16"]) == 0
    ref, got = run_pair("logreg", "adam", "fp16", steps=20)
    assert got.diverged_at == ref.diverged_at == 1
