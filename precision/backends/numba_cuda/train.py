"""The host side of ``--backend numba --device gpu``: the CPU backend's preparation, then one step at a time as
kernel launches (:mod:`.kernels`), the host driving the step loop.

Everything that is not per-step compute comes from the numba CPU backend and the shared rules, unchanged: the data
and targets rounded to the compute format (``numba_backend._rounded``, ``numpy_backend.targets_for``), the host
scalars (``step_rules.host_scalars``: the seed scale, the loss-scale inverse and the scalar table, whose rows are
made per chunk), the initial weights and params, the optimizer flags (``update.optimizer_flags``), the moment format
(``step_rules.moment_format``), the batch schedule (``Dataset.batch_rows``, a block at a time), the dynamic loss
scaler's rule (``step_rules.scaler_update``'s float32 arithmetic, as ``loops._remedy_step``) and the chunk driver
with its audit (``base.drive_chunks``). The divergence rule is applied on the host from per-element flags: the first
step whose new weights or params are not all finite.

Not supported here (a SpecError naming it): gradient accumulation (``accum_steps`` > 1).
"""

from __future__ import annotations

import time

import numpy as np
from numba import cuda

from ...data import Dataset, blocks
from ...errors import SpecError
from ...formats import get_format, wider
from ...optim import state_size
from ...problems import get_problem
from ...spec import RunSpec
from ...trajectory import Trajectory
from ..base import ScalerLog, drive_chunks
from ..numba_backend import _rounded
from ..numba_backend.update import optimizer_flags
from ..numpy_backend import targets_for
from ..step_rules import host_scalars, initial_scaler, moment_format, scaler_update, sr_key
from . import kernels as K
from .device import SIMULATOR, gpu_format, round_value

__all__ = ["train", "check_supported"]


def check_supported(spec: RunSpec) -> None:
    """SpecError for what the GPU loops do not implement (one line naming it and what runs instead)."""
    if spec.accum_steps != 1:
        raise SpecError(f"accum_steps={spec.accum_steps}: gradient accumulation is not implemented in the numba "
                        f"backend's GPU kernels; run it with --device cpu (or accum_steps=1)")


def _layers(problem: str, features: int, classes: int) -> tuple[tuple, bool]:
    """(layer sizes d, n_1 .. n_L, k; relu) of softmax (no hidden layer), mlp and the named MLPs."""
    if problem == "softmax":
        return (features, classes), False
    prob = get_problem(problem)
    return (features,) + tuple(prob.hidden) + (classes,), prob.activation == "relu"


def _offsets(sizes: tuple) -> list[int]:
    """W_1, b_1, W_2, b_2, ... offsets in the flat parameter vector (precision.problems' layout), and its end."""
    out, at = [], 0
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        out.append(at)
        at += n_in * n_out
        out.append(at)
        at += n_out
    return out + [at]


class _Gradient:
    """One problem's gradient as kernel launches into ``g`` (device arrays of the run's batch size)."""

    def __init__(self, spec: RunSpec, dataset: Dataset, batch: int, features: int, fc: tuple, accum64: bool):
        self.problem, self.B, self.d, self.fc, self.acc64 = spec.problem, batch, features, fc, accum64
        self.ones = cuda.to_device(np.ones(1))  # the ones row / column of sums: stride 0
        if spec.problem in ("linreg", "logreg"):
            self.z, self.delta = cuda.device_array(batch), cuda.device_array(batch)
            self.cols = features + 1  # [X | 1]: one product gives the weights' and the bias's gradient
        else:
            self.sizes, self.relu = _layers(spec.problem, features, dataset.classes)
            self.offsets = _offsets(self.sizes)
            self.H = [cuda.device_array(batch * n) for n in self.sizes[1:-1]]
            self.D = [cuda.device_array(batch * n) for n in self.sizes[1:-1]]
            self.Z = cuda.device_array(batch * self.sizes[-1])
            self.cols = features

    def _mm(self, A, a, B, b, out, o, M, N, Kd):
        """out = rnd(A @ B): A, B, out given as (offset, row stride, column stride) of flat arrays."""
        K.launch(K.matmul, M * N)(A, *a, B, *b, out, *o, M, N, Kd, self.fc, self.acc64)

    def __call__(self, pc, Xb, Tb, seed, g):
        B, d, fc = self.B, self.d, self.fc
        if self.problem in ("linreg", "logreg"):
            c = self.cols
            self._mm(pc, (0, 0, 1), Xb, (0, 1, c), self.z, (0, 0, 1), 1, B, d)  # z = w X^T, rounded once
            K.launch(K.linear_delta, B)(self.z, pc, d, Tb, seed, self.problem == "logreg", fc, not self.acc64,
                                        self.delta, B)
            self._mm(self.delta, (0, 0, 1), Xb, (0, c, 1), g, (0, 0, 1), 1, c, B)  # [X | 1]^T delta: (gw, gb)
            return
        sizes, off, layers = self.sizes, self.offsets, len(self.sizes) - 1
        for i in range(layers):  # forward
            n_in, n_out = sizes[i], sizes[i + 1]
            A = Xb if i == 0 else self.H[i - 1]
            out = self.Z if i == layers - 1 else self.H[i]
            self._mm(A, (0, n_in, 1), pc, (off[2 * i], n_out, 1), out, (0, n_out, 1), B, n_out, n_in)
            K.launch(K.add_bias, B * n_out)(out, pc, off[2 * i + 1], n_out, fc, B * n_out)
            if i < layers - 1:
                K.launch(K.activate, B * n_out)(out, self.relu, fc, B * n_out)
        k = sizes[-1]
        K.launch(K.softmax_delta, B)(self.Z, Tb, seed, fc, self.acc64, B, k)
        for i in range(layers - 1, -1, -1):  # backward
            n_in, n_out = sizes[i], sizes[i + 1]
            delta = self.Z if i == layers - 1 else self.D[i]
            A = Xb if i == 0 else self.H[i - 1]
            self._mm(A, (0, 1, n_in), delta, (0, n_out, 1), g, (off[2 * i], n_out, 1), n_in, n_out, B)  # A^T delta
            self._mm(self.ones, (0, 0, 0), delta, (0, n_out, 1), g, (off[2 * i + 1], 0, 1), 1, n_out, B)  # sums
            if i == 0:
                break
            dH = self.D[i - 1]
            self._mm(delta, (0, n_out, 1), pc, (off[2 * i], 1, n_out), dH, (0, n_in, 1), B, n_in, n_out)  # delta W^T
            K.launch(K.activation_backward, B * n_in)(dH, self.H[i - 1], self.relu, fc, B * n_in)


def train(spec: RunSpec, dataset: Dataset) -> Trajectory:
    check_supported(spec)
    pol = spec.policy
    accum64 = pol.accum.name == "fp64"  # else fp32 (Policy allows only these two)
    X = _rounded(dataset.X_train, pol.compute)
    T = _rounded(targets_for(dataset, dataset.y_train), pol.compute)
    n, features = X.shape
    scalars = host_scalars(pol, spec.optimizer, spec.steps, dataset.batch_size)
    seed_scale = scalars.seed_scale
    unscale = 1.0 if scalars.unscale is None else float(scalars.unscale)
    table = scalars.table
    w_host = _rounded(dataset.init_params, pol.weights)
    p_host = _rounded(w_host, pol.params)
    fc, fu, fw, fs, fp = (gpu_format(f) for f in (pol.compute, pol.update, pol.weights, pol.state, pol.params))
    fm = gpu_format(moment_format(pol))
    opt = optimizer_flags(spec.optimizer)
    ds = pol.dynamic_scale
    # the applied-update count indexes the scalar rows under any remedy (loops.update_step)
    remedies = pol.stochastic or pol.kahan or ds is not None
    sr_seed, sr_offset = sr_key(spec.seed, pol.sr_stream) if pol.stochastic else (0, 0)
    sr_flags = (int(pol.stochastic), int(pol.rounding == "sr-state"))

    linear = spec.problem in ("linreg", "logreg")
    data = np.concatenate([X, np.ones((n, 1))], axis=1) if linear else X
    cols = data.shape[1]
    full = dataset.batches is None
    batch = n if full else dataset.batch_size
    X_dev, T_dev = cuda.to_device(np.ascontiguousarray(data).ravel()), cuda.to_device(np.ascontiguousarray(T).ravel())
    t_cols = 1 if T.ndim == 1 else T.shape[1]
    Xb, Tb = (X_dev, T_dev) if full else (cuda.device_array(batch * cols), cuda.device_array(batch * t_cols))
    size = w_host.size
    w, p = cuda.to_device(w_host), cuda.to_device(p_host)
    s0, s1 = cuda.to_device(np.zeros(size)), cuda.to_device(np.zeros(size))
    s2 = cuda.to_device(np.zeros(size if pol.kahan else 1))
    pc, g = cuda.device_array(size), cuda.device_array(size)
    bad = cuda.device_array(size, dtype=np.int32)
    gradient = _Gradient(spec, dataset, batch, features, fc, accum64)
    # The host state across steps (loops' ist / fst): applied updates here, dynamic loss scaling's (scale, growth
    # tracker) in the log, advanced by the shared rule (step_rules.scaler_update)
    state = {"applied": 0}
    log = ScalerLog(initial_scaler(pol)) if ds else None
    wide_c = gpu_format(wider(pol.compute, get_format("fp32")))

    def step(stepno: int, rows, r: int, rows_table, base: int) -> bool:
        """Step ``stepno``: gradient, then links 3-10; False when its new weights or params are not all finite."""
        if not full:
            K.launch(K.gather, batch * cols)(X_dev, rows, r, cols, Xb, batch * cols)
            K.launch(K.gather, batch * t_cols)(T_dev, rows, r, t_cols, Tb, batch * t_cols)
        K.launch(K.round_into, size)(p, pc, size, fc)
        seed = seed_scale
        if ds is not None:  # loops._dynamic_seed: rnd(rnd(scale * ls, wider(C, fp32)), C)
            seed = round_value(round_value(seed_scale * float(log.state.scale), wide_c), fc)
        gradient(pc, Xb, Tb, seed, g)
        u = unscale
        if ds is not None:  # loops._remedy_step: unscale, check, update the scaler, maybe skip
            inv = round_value(float(np.float32(1) / np.float32(log.state.scale)), fu)  # step_rules.dynamic_unscale
            K.launch(K.unscale_checked, size)(g, fu, inv, bad, size)
            finite = not bad.copy_to_host().any()
            skip = not finite and ds.skip
            log.step(stepno, scaler_update(np, log.state, not finite, ds), skip)
            if skip:
                return True
            u = 1.0  # g holds the unscaled gradient in U
        if remedies:
            state["applied"] += 1
            t, row = state["applied"], state["applied"] - 1 - base
        else:
            t, row = stepno, r
        sr = sr_flags + (sr_seed, sr_offset, stepno & 0xFFFFFFFF)  # the counter is the loop step, not t
        K.launch(K.update, size)(g, w, s0, s1, s2, p, bad, rows_table, row, size, fu, fw, fs, fp, fm, opt, t == 1,
                                 u, pol.kahan, sr)
        return not bad.copy_to_host().any()

    def run_chunk(start: int, stop: int):
        for lo, hi in blocks(start, stop):  # bounded memory: a block's rows at a time (data.SCHEDULE_BLOCK)
            rows = None if full else cuda.to_device(dataset.batch_rows(lo, hi))
            base = state["applied"] if remedies else lo
            rows_table = cuda.to_device(np.ascontiguousarray(table.rows(base, base + hi - lo)))
            for stepno in range(lo + 1, hi + 1):
                if not step(stepno, rows, stepno - 1 - lo, rows_table, base):
                    return stepno
        return None

    compile_s = 0.0
    if not SIMULATOR and spec.steps > 0:  # pragma: no cover - needs a GPU
        compile_s = _warm_up(step, dataset, table, full, (w, s0, s1, s2, p, state), log)

    def stored():
        state_vectors = [s0.copy_to_host(), s1.copy_to_host()][:state_size(spec.optimizer)]
        return w.copy_to_host(), p.copy_to_host(), state_vectors + ([s2.copy_to_host()] if pol.kahan else [])

    return drive_chunks(spec, run_chunk, snapshot=lambda: p.copy_to_host().astype(np.float64),
                        final_params=lambda: p.copy_to_host().astype(pol.params.dtype), compile_s=compile_s,
                        scaler=log, stored=stored, dataset=dataset)


def _warm_up(step, dataset, table, full, arrays, log) -> float:  # pragma: no cover - needs a GPU
    """Compile every kernel of the run by running step 1 once, then restore the state it changed: the compile
    time is reported as ``compile_s`` and stays out of the timed chunks."""
    w, s0, s1, s2, p, state = arrays
    saved = [a.copy_to_host() for a in (w, s0, s1, s2, p)]
    saved_state = dict(state)
    saved_log = (log.state, list(log.skipped)) if log is not None else None
    t0 = time.perf_counter()
    rows = None if full else cuda.to_device(dataset.batch_rows(0, 1))
    step(1, rows, 0, cuda.to_device(np.ascontiguousarray(table.rows(0, 1))), 0)
    cuda.synchronize()
    compile_s = time.perf_counter() - t0
    for dev, host in zip((w, s0, s1, s2, p), saved):
        dev.copy_to_device(host)
    state.clear()
    state.update(saved_state)
    if log is not None:
        log.state, log.skipped = saved_log
    return compile_s
