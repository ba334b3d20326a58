"""The optimizer update in jax.numpy, op for op as documented in :mod:`precision.optim`.

The same pure function as the numpy reference's ``update`` (same operations in the same order, on arrays of the
update format with the step's typed scalars), written so that it traces under ``jit`` and ``lax.scan``: the
momentum buffer's "step 1" case is a ``where`` on the traced step number instead of a Python branch.

What XLA then does with it is the finding: in float32 it contracts ``a*b + c`` into one FMA (one rounding instead
of two); on the CPU it flushes float32 subnormals to zero, which touches bf16 (whose tiny values are float32
subnormals) but not fp16. See docs/jax.md and tests/test_jax_backend.py.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from ...optim import SCALAR_COLUMNS, OptimizerSpec

__all__ = ["update", "structure"]

_COL = {name: i for i, name in enumerate(SCALAR_COLUMNS)}


def structure(opt: OptimizerSpec) -> tuple:
    """What the traced update depends on besides its inputs (everything else comes from the scalar table): two
    optimizers with the same structure share one compiled program."""
    return (opt.name, opt.momentum != 0, opt.nesterov, opt.weight_decay != 0)


def update(opt: OptimizerSpec, step: jax.Array, scalars: jax.Array, w: jax.Array, g: jax.Array,
           state: Sequence[jax.Array], store_state: Callable[[jax.Array], jax.Array] = lambda x: x):
    """One step (``step`` 1-based, traced int32); ``scalars`` is the step's row of the scalar table, already in the
    update dtype. Returns (new weights, new state list), all in the update dtype."""
    s = {name: scalars[i] for name, i in _COL.items()}
    if opt.name == "adamw":
        w = w * s["decay"]
    elif opt.weight_decay:
        g = g + s["weight_decay"] * w
    if opt.is_adam:
        m, v = state
        m = store_state(s["beta1"] * m + s["one_minus_beta1"] * g)
        v = store_state(s["beta2"] * v + s["one_minus_beta2"] * (g * g))
        denom = jnp.sqrt(v) / s["sqrt_bc2"] + s["eps"]
        w = w - s["step_size"] * m / denom
        return w, [m, v]
    if opt.momentum:
        buf = jnp.where(step == 1, g, s["momentum"] * state[0] + g)  # torch: the buffer starts as g itself
        buf = store_state(buf)
        direction = g + s["momentum"] * buf if opt.nesterov else buf
        return w - s["lr"] * direction, [buf]
    return w - s["lr"] * g, []
