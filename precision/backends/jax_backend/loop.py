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
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ...optim import OptimizerSpec
from ...policy import Policy
from ..step_rules import apply_step, initial_values, micro_batches, state_store
from .models import gradient
from .ops import JaxOps, convert
from .update import update

__all__ = ["Carry", "StepInputs", "LoopSpec", "ChunkProgram", "make_step", "lower_chunk", "compile_chunk",
           "clear_compile_cache", "compiled_programs", "chunk_inputs", "initial_carry"]


class Carry(NamedTuple):
    """What flows from step to step (donated to each chunk call)."""
    weights: jax.Array  # weights format (master if the policy has one, else params)
    params: jax.Array  # params format: round(weights)
    state: tuple  # optimizer state vectors, state format
    diverged_at: jax.Array  # int32; 0 while every step so far was finite


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


def make_step(spec: LoopSpec, opt: OptimizerSpec, X, T, scale, unscale) -> Callable:
    """The scan body: (carry, StepInputs row) -> (carry, None). Pure; X, T, scale, unscale are traced args.

    The step itself is :func:`precision.backends.step_rules.apply_step`, the reference's own chain of conversions
    and divergence rule; what is JAX's here is the batch gather and the masking of padding and post-divergence
    steps."""
    pol = spec.policy
    compute = JaxOps(pol.compute, pol.accum)
    store_state = state_store(convert, pol)

    def step_fn(carry: Carry, xs: StepInputs):
        if spec.batch:
            Xb, Tb = jnp.take(X, xs.rows, axis=0), jnp.take(T, xs.rows, axis=0)
        else:
            Xb, Tb = X, T
        if spec.accum_steps == 1:
            def grad(pc):
                return gradient(spec.problem, compute, pc, Xb, Tb, scale, spec.layout)
        else:
            def grad(pc):
                return accumulated_gradient(spec, compute, pc, Xb, Tb, scale)
        w, st, p, finite = apply_step(
            jnp, convert, pol, grad,
            lambda w_u, g, st_u: update(opt, xs.step, xs.scalars, w_u, g, st_u, store_state),
            carry.weights, carry.params, carry.state, unscale if spec.has_unscale else None)
        active = xs.valid & (carry.diverged_at == 0)
        new = Carry(w, p, tuple(st), jnp.where(active & ~finite, xs.step, carry.diverged_at))
        return jax.tree.map(lambda n, o: jnp.where(active, n, o), new, carry), None

    return step_fn


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
    """A compiled chunk: ``run(carry, inputs, X, T, scale, unscale) -> carry`` (carry donated)."""
    run: Callable
    compile_s: float


_CACHE: collections.OrderedDict[tuple, ChunkProgram] = collections.OrderedDict()
_CACHE_SIZE = 64


def lower_chunk(spec: LoopSpec, opt: OptimizerSpec, example_args: tuple):
    """The chunk program traced and lowered (``jax.stages.Lowered``): scan of ``spec.chunk_steps`` steps, carry
    donated. ``example_args``: (carry, StepInputs, X, T, scale, unscale) as they will be passed."""

    def chunk(carry, inputs, X, T, scale, unscale):
        step_fn = make_step(spec, opt, X, T, scale, unscale)
        carry, _ = jax.lax.scan(step_fn, carry, inputs)
        return carry

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
    from float64 on the host, params = convert(weights), zero state), so both backends start from the same bits."""
    weights, params, state = initial_values(init_params, pol, opt)
    return jax.device_put(Carry(weights, params, tuple(state), np.int32(0)), device)


def chunk_inputs(table: np.ndarray, batches: np.ndarray | None, start: int, stop: int, chunk_steps: int,
                 device) -> StepInputs:
    """Inputs of steps start+1..stop, padded to ``chunk_steps`` with masked steps (table row and rows of step
    ``start+1`` repeated: any valid values do, the mask discards their results)."""
    count = stop - start
    index = np.arange(start, start + chunk_steps)
    index[count:] = start  # padding repeats the first row of the chunk
    rows = (batches[index] if batches is not None else np.zeros((chunk_steps, 0), np.int64)).astype(np.int32)
    return jax.device_put(StepInputs(scalars=table[index], rows=rows,
                                     step=(np.arange(chunk_steps) + start + 1).astype(np.int32),
                                     valid=np.arange(chunk_steps) < count), device)

