"""The training step and the compiled chunk loop: ``lax.scan`` over a fixed number of steps, buffers donated.

Each step is the shared chain of :mod:`precision.backends.step_rules` (``apply_step``, the function the numpy
reference's loop calls too): params -> compute for the forward/backward pass, gradient compute -> update format,
optional loss-scale removal, the update in the update format with state read from and stored to its own format,
new weights stored in the weights format (master or params), params = weights rounded to the params format.

One compiled program serves a whole run: every chunk has the same length ``chunk_steps``; a shorter last chunk
(``steps`` not a multiple of ``record_every``) is padded with masked steps (``valid`` false) that leave the
carry unchanged. Divergence is carried too (the rule of step_rules: the first step whose new weights or params
are not all finite) and every later step is masked, so the state after that step is what the host reads, as in
the reference.

With gradient accumulation (``accum_steps`` K > 1, static in the program) the step's gradient is
:func:`accumulated_gradient`: the micro-batch loop runs inside the step, still under the one ``lax.scan`` over steps.

The remedies of the policy (``step_rules.REMEDY_RULES``) are options of the same chain: ``r=sr`` / ``r=sr-state``
pass a ``stochastic`` rounding (:func:`.stochastic.round_stochastic`, keyed by the run's seed word, a traced uint32,
and the loop's step); ``r=kahan`` only adds the compensation to the carried state; dynamic loss scaling carries the
scaler state and the applied-update count, reads the scalar table's row of that count from the whole table (a traced
argument) and records each step's skip flag as the scan's output. A policy without remedies traces exactly the
program it traced before (no extra arguments, carry leaves or outputs).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ...formats import get_format
from ...optim import OptimizerSpec
from ...policy import Policy
from ..step_rules import (ScalerState, apply_step, dynamic_seed, dynamic_unscale, initial_scaler, initial_values,
                          micro_batches, scaler_update, sr_key, state_store)
from . import ops as _ops
from .models import gradient
from .ops import JaxOps, convert
from .stochastic import round_stochastic
from .update import update

_FP64 = get_format("fp64")

__all__ = ["Carry", "StepInputs", "LoopSpec", "ChunkProgram", "make_step", "lower_chunk", "compile_chunk",
           "clear_compile_cache", "compiled_programs", "chunk_inputs", "initial_carry", "remedy_inputs"]


class Carry(NamedTuple):
    """What flows from step to step (donated to each chunk call)."""
    weights: jax.Array  # weights format (master if the policy has one, else params)
    params: jax.Array  # params format: round(weights)
    state: tuple  # optimizer state vectors, state format (r=kahan: the compensation last)
    diverged_at: jax.Array  # int32; 0 while every step so far was finite
    scaler: ScalerState | None = None  # dynamic loss scaling: (scale float32, growth tracker int32); else None
    applied: jax.Array | None = None  # dynamic loss scaling: int32 count of applied updates; else None


class StepInputs(NamedTuple):
    """Per-step inputs, stacked along the scanned axis."""
    scalars: jax.Array  # (L, n_scalars) update dtype: the scalar table's rows
    rows: jax.Array  # (L, batch) int32 row indices, or (L, 0) for full batch
    step: jax.Array  # (L,) int32, 1-based
    valid: jax.Array  # (L,) bool: false for padding steps


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """Everything the traced program depends on besides its array inputs: the compile-cache key."""
    problem: str
    layout: tuple
    optimizer: tuple  # update.structure(opt)
    policy: Policy
    chunk_steps: int
    x_shape: tuple
    t_shape: tuple
    batch: int  # 0 for full batch
    n_params: int
    has_unscale: bool
    device: Any
    accum_steps: int = 1  # K micro-batches per step, static (accumulated_gradient: inner scans, not K copies)
    table_rows: int = 0  # dynamic loss scaling: rows of the whole scalar table passed in (the run's steps); else 0


def make_step(spec: LoopSpec, opt: OptimizerSpec, X, T, scale, unscale, remedy: dict | None = None) -> Callable:
    """The scan body: (carry, StepInputs row) -> (carry, ys). Pure; X, T, scale, unscale are traced args.

    The step itself is :func:`precision.backends.step_rules.apply_step`, the reference's own chain of conversions
    and divergence rule; what is JAX's here is the batch gather and the masking of padding and post-divergence
    steps. ``remedy``: the traced inputs of the policy's remedies (:func:`remedy_inputs`): ``sr_seed`` (uint32, the
    run's seed word) under ``r=sr`` / ``r=sr-state``, ``table`` (the whole scalar table) under dynamic loss
    scaling. ``ys`` is None, or under dynamic loss scaling the step's skip flag (bool: a valid step skipped)."""
    pol = spec.policy
    remedy = remedy or {}
    compute = JaxOps(pol.compute, pol.accum)
    store_state = state_store(convert, pol)
    dynamic = pol.dynamic_scale
    _, sr_offset = sr_key(0, pol.sr_stream)  # the stream's block of tensor ids (static); the seed word is traced

    def step_fn(carry: Carry, xs: StepInputs):
        if spec.batch:
            Xb, Tb = jnp.take(X, xs.rows, axis=0), jnp.take(T, xs.rows, axis=0)
        else:
            Xb, Tb = X, T
        if dynamic:
            # the optimizer's step count is the applied updates' (REMEDY_RULES "dynamic"): row and step from it
            row, t = jnp.take(remedy["table"], carry.applied, axis=0), carry.applied + 1
            seed = dynamic_seed(convert, pol, scale, carry.scaler.scale)
            step_unscale = dynamic_unscale(jnp, convert, pol, carry.scaler.scale)
        else:
            row, t, seed = xs.scalars, xs.step, scale
            step_unscale = unscale if spec.has_unscale else None
        if spec.accum_steps == 1:
            def grad(pc):
                return gradient(spec.problem, compute, pc, Xb, Tb, seed, spec.layout)
        else:
            def grad(pc):
                return accumulated_gradient(spec, compute, pc, Xb, Tb, seed)
        stochastic = _stochastic(remedy["sr_seed"], sr_offset, xs.step) if pol.stochastic else None
        w, st, p, finite, gradient_finite = apply_step(
            jnp, convert, pol, grad,
            lambda w_u, g, st_u, split=False: update(opt, t, row, w_u, g, st_u, store_state,
                                                     *((True,) if split else ())),
            carry.weights, carry.params, carry.state, step_unscale, stochastic=stochastic,
            check_gradient=dynamic is not None)
        active = xs.valid & (carry.diverged_at == 0)
        if not dynamic:
            new = Carry(w, p, tuple(st), jnp.where(active & ~finite, xs.step, carry.diverged_at))
            return jax.tree.map(lambda n, o: jnp.where(active, n, o), new, carry), None
        # Dynamic loss scaling: a skipped step keeps weights, state and params and is not checked for divergence;
        # the scaler moves on every active step (the diverging one included, as in the reference), never on padding
        # steps or after divergence.
        found_inf = ~gradient_finite
        skipped = found_inf if dynamic.skip else jnp.zeros((), dtype=bool)
        adopt = active & ~skipped
        scaler = scaler_update(jnp, carry.scaler, found_inf, dynamic)
        new = Carry(w, p, tuple(st), jnp.where(adopt & ~finite, xs.step, carry.diverged_at))
        kept = jax.tree.map(lambda n, o: jnp.where(adopt, n, o), new, carry._replace(scaler=None, applied=None))
        return kept._replace(
            scaler=ScalerState(*(jnp.where(active, n, o) for n, o in zip(scaler, carry.scaler))),
            applied=jnp.where(adopt, carry.applied + 1, carry.applied)), active & skipped

    return step_fn


def _stochastic(seed, offset: int, step):
    """``stochastic(x, fmt, tensor)`` for ``apply_step`` (the numpy loop's ``_stochastic`` under jit): the U values
    ``x`` rounded stochastically to ``fmt`` with the seed word ``seed`` (traced uint32), tensor id ``offset +
    tensor`` and the loop's 1-based ``step`` (traced int32), element indices from 0, stored in ``fmt``'s dtype."""
    def rounded(x, fmt, tensor: int):
        return _stored_as(round_stochastic(x, fmt, seed, step.astype(jnp.uint32), offset + tensor), fmt)
    return rounded


def _stored_as(y, fmt):
    """Stochastically rounded values (values of ``fmt`` in the float32 / float64 carrier) in ``fmt``'s storage
    dtype: exact, the way :func:`.ops.convert` stores a native or emulated format (an emulated one rebuilt from its
    float64 pattern where XLA's float64 -> float32 cast would flush a float32 subnormal)."""
    if y.dtype == jnp.dtype(fmt.dtype):
        return y
    if fmt.emulated:
        return _ops.round_to_format(y, fmt)
    if y.dtype == jnp.float64 and fmt.precision < 24:
        return convert(y, _FP64, fmt)  # one rounding from float64 (identity on fmt's grid), then an exact cast
    return y.astype(fmt.dtype)


def remedy_inputs(pol: Policy, seed: int, table: np.ndarray) -> dict:
    """The traced inputs of the policy's remedies, on the host: an empty dict for a policy without any (its
    program has no extra arguments); ``sr_seed`` (uint32 seed word, step_rules.sr_key) under ``r=sr`` /
    ``r=sr-state``; ``table`` (the whole scalar table in U) under dynamic loss scaling."""
    out = {}
    if pol.stochastic:
        out["sr_seed"] = np.uint32(sr_key(seed, pol.sr_stream)[0])
    if pol.dynamic_scale is not None:
        out["table"] = table
    return out


def accumulated_gradient(spec: LoopSpec, compute: JaxOps, pc, Xb, Tb, scale):
    """The step's gradient from ``spec.accum_steps`` micro-batches (``step_rules.ACCUMULATION``; the numpy loop
    calls ``step_rules.accumulate``, this is the same chain under ``jit``): each micro-batch's gradient in C with
    the whole batch's seed scale, converted to A and added in order, micro-batch 1 first; the sum rounded once to C.

    Micro-batch 1 is computed on its own (the sum starts as its gradient); the others run as a ``lax.scan`` per run
    of equal sizes (array_split's sizes: at most two runs, the longer micro-batches first), in order, so the
    program's size does not grow with K. ``Xb``, ``Tb``: the step's rows (gathered, or the full batch)."""
    pol = spec.policy

    def micro(X_part, T_part):
        return convert(gradient(spec.problem, compute, pc, X_part, T_part, scale, spec.layout), pol.compute,
                       pol.accum)

    bounds = micro_batches(Xb.shape[0], spec.accum_steps)
    total = micro(Xb[bounds[0][0]:bounds[0][1]], Tb[bounds[0][0]:bounds[0][1]])
    # the remaining micro-batches as runs of equal size: (first row, rows per micro-batch, count)
    runs: list[list[int]] = []
    for start, stop in bounds[1:]:
        if runs and runs[-1][1] == stop - start:
            runs[-1][2] += 1
        else:
            runs.append([start, stop - start, 1])
    for first, size, count in runs:
        rows = slice(first, first + size * count)
        X_run = Xb[rows].reshape((count, size) + Xb.shape[1:])
        T_run = Tb[rows].reshape((count, size) + Tb.shape[1:])
        total, _ = jax.lax.scan(lambda acc, part: (acc + micro(*part), None), total, (X_run, T_run))
    return convert(total, pol.accum, pol.compute)


@dataclasses.dataclass(frozen=True)
class ChunkProgram:
    """A compiled chunk: ``run(carry, inputs, X, T, scale, unscale, remedy) -> carry`` (carry donated), or
    ``(carry, skipped flags)`` under dynamic loss scaling."""
    run: Callable
    compile_s: float


_CACHE: collections.OrderedDict[tuple, ChunkProgram] = collections.OrderedDict()
_CACHE_SIZE = 64


def lower_chunk(spec: LoopSpec, opt: OptimizerSpec, example_args: tuple):
    """The chunk program traced and lowered (``jax.stages.Lowered``): scan of ``spec.chunk_steps`` steps, carry
    donated. ``example_args``: (carry, StepInputs, X, T, scale, unscale[, remedy]) as they will be passed
    (``remedy``: :func:`remedy_inputs`; an empty dict adds no argument to the program)."""

    def chunk(carry, inputs, X, T, scale, unscale, remedy=None):
        step_fn = make_step(spec, opt, X, T, scale, unscale, remedy)
        carry, skipped = jax.lax.scan(step_fn, carry, inputs)
        return carry if spec.policy.dynamic_scale is None else (carry, skipped)

    return jax.jit(chunk, donate_argnums=0).lower(*example_args)


def compile_chunk(spec: LoopSpec, opt: OptimizerSpec, example_args: tuple) -> tuple[ChunkProgram, float]:
    """The AOT-compiled chunk program for ``spec`` and the seconds this call spent tracing and compiling it (0.0
    when it came from the cache).

    ``jax.jit(f).lower(...).compile()`` keeps tracing and XLA compilation out of the timed steps. The cache key
    includes the x64 setting, which changes how the same Python traces."""
    key = (spec, bool(jax.config.jax_enable_x64))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key], 0.0
    t0 = time.perf_counter()
    compiled = lower_chunk(spec, opt, example_args).compile()
    program = ChunkProgram(run=compiled, compile_s=time.perf_counter() - t0)
    _CACHE[key] = program
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return program, program.compile_s


def clear_compile_cache() -> None:
    """Forget every compiled chunk program (tests use it to count compilations)."""
    _CACHE.clear()


def compiled_programs() -> int:
    return len(_CACHE)


def initial_carry(init_params: np.ndarray, pol: Policy, opt: OptimizerSpec, device) -> Carry:
    """The reference's initial values (:func:`precision.backends.step_rules.initial_values`: weights rounded once
    from float64 on the host, params = convert(weights), zero state; under r=kahan the zero compensation last), so
    both backends start from the same bits. Dynamic loss scaling adds the initial scaler state and applied = 0."""
    weights, params, state = initial_values(init_params, pol, opt)
    carry = Carry(weights, params, tuple(state), np.int32(0))
    if pol.dynamic_scale is not None:
        carry = carry._replace(scaler=initial_scaler(pol), applied=np.int32(0))
    return jax.device_put(carry, device)


def chunk_inputs(table: np.ndarray, batches: np.ndarray | None, start: int, stop: int, chunk_steps: int,
                 device) -> StepInputs:
    """Inputs of steps start+1..stop from that chunk's rows alone: ``table`` its (stop - start) scalar rows,
    ``batches`` its (stop - start, B) batch rows (None: full batch); padded to ``chunk_steps`` with masked steps
    (table row and rows of step ``start+1`` repeated: any valid values do, the mask discards their results)."""
    count = stop - start
    index = np.arange(chunk_steps)
    index[count:] = 0  # padding repeats the first row of the chunk
    rows = (batches[index] if batches is not None else np.zeros((chunk_steps, 0), np.int64)).astype(np.int32)
    return jax.device_put(StepInputs(scalars=table[index], rows=rows,
                                     step=(np.arange(chunk_steps) + start + 1).astype(np.int32),
                                     valid=np.arange(chunk_steps) < count), device)
