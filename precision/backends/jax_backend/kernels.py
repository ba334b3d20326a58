"""A stand-alone jitted optimizer update step on N elements, for the kernel micro-benchmarks.

One call is one full step of a "pure" policy (weights, state and update all in ``fmt``): read w, g and the state,
return new arrays (out of place, no donation), so a timed repeat never reads what the previous one wrote. The step
is the backend's own :func:`.update.update`, compiled ahead of time; ``compile_s`` is kept apart.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import numpy as np

from ...formats import Format, get_format, to_format
from ...optim import OptimizerSpec, scalar_table, state_size
from . import jax_device
from .update import update

__all__ = ["UpdateKernel", "update_kernel", "compiled_update"]


@dataclasses.dataclass(frozen=True)
class UpdateKernel:
    """``run()`` performs one update step on device and blocks until it is done; returns the new weights."""
    run: Callable[[], jax.Array]
    n: int
    fmt: Format
    compile_s: float


def compiled_update(opt: OptimizerSpec, fmt: Format | str, step: int, row: np.ndarray, w: np.ndarray,
                    g: np.ndarray, state, device: str = "cpu") -> tuple[Callable[[], tuple], float]:
    """The jitted update of ``opt`` on the given host arrays (storage dtype of ``fmt``), compiled ahead of time.

    Returns (run, compile_s): ``run()`` performs one step on the device, blocks until it is done and returns
    (new weights, new state) as device arrays. float64 runs inside a scoped x64 setting, entered for each call."""
    fmt = get_format(fmt)
    x64 = fmt.name == "fp64"  # JAX holds float64 only with x64 on

    def step_fn(step_no, row, w, g, st):
        return update(opt, step_no, row, w, g, st)

    with jax.enable_x64(x64):
        args = jax.device_put((np.int32(step), np.asarray(row).astype(fmt.dtype), w, g, list(state)),
                              jax_device(device))
        t0 = time.perf_counter()
        compiled = jax.jit(step_fn).lower(*args).compile()
        compile_s = time.perf_counter() - t0

    def run() -> tuple:
        with jax.enable_x64(x64):
            return jax.block_until_ready(compiled(*args))
    return run, compile_s


def update_kernel(opt: OptimizerSpec, fmt: Format | str, n: int, device: str = "cpu", seed: int = 0,
                  step: int = 2) -> UpdateKernel:
    """Build the jitted update of ``opt`` on ``n`` elements of ``fmt`` with seeded inputs (weights ~ N(0, 1),
    gradients ~ N(0, 1e-2), state as after one step). ``step`` picks the scalar-table row (2: past SGD's
    first-step special case)."""
    fmt = get_format(fmt)
    rng = np.random.default_rng(seed)
    w, g = to_format(rng.standard_normal(n), fmt), to_format(rng.standard_normal(n) * 1e-2, fmt)
    state = [to_format(np.abs(rng.standard_normal(n)) * 1e-4, fmt) for _ in range(state_size(opt))]
    run_step, compile_s = compiled_update(opt, fmt, step, scalar_table(opt, step, fmt)[step - 1], w, g, state,
                                          device)
    return UpdateKernel(run=lambda: run_step()[0], n=n, fmt=fmt, compile_s=compile_s)
