"""The optimizer update in numpy, op for op as documented in :mod:`precision.optim`.

Pure: takes weights, gradient and state (arrays in the update format's dtype, state already read from its storage
format) plus the step's scalars, returns new weights and state. ``store_state`` rounds a moment to its storage
format and back, so the value the update goes on with is the stored one.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from ...optim import SCALAR_COLUMNS, OptimizerSpec

__all__ = ["update"]

_COL = {name: i for i, name in enumerate(SCALAR_COLUMNS)}


def update(opt: OptimizerSpec, step: int, scalars: Sequence, w: np.ndarray, g: np.ndarray,
           state: list[np.ndarray], store_state: Callable[[np.ndarray], np.ndarray] = lambda x: x):
    """One step (``step`` is 1-based); ``scalars`` is the step's row of the scalar table as typed scalars."""
    s = {name: scalars[i] for name, i in _COL.items()}
    if opt.name == "adamw":
        w = w * s["decay"]
    elif opt.weight_decay:
        g = g + s["weight_decay"] * w
    if opt.is_adam:
        m, v = state
        m = store_state(s["beta1"] * m + s["one_minus_beta1"] * g)
        v = store_state(s["beta2"] * v + s["one_minus_beta2"] * (g * g))
        denom = np.sqrt(v) / s["sqrt_bc2"] + s["eps"]
        w = w - s["step_size"] * m / denom
        return w, [m, v]
    if opt.momentum:
        buf = g.copy() if step == 1 else s["momentum"] * state[0] + g
        buf = store_state(buf)
        direction = g + s["momentum"] * buf if opt.nesterov else buf
        return w - s["lr"] * direction, [buf]
    return w - s["lr"] * g, []
