"""The JAX backend's forward pass on its own: the logits of a trained model, with the training pass's rounding.

The same jax.numpy ops as the training forward pass (:class:`.ops.JaxOps`: ``dot_general`` with the accumulator as
``preferred_element_type`` and ``precision=HIGHEST``, one rounding to the compute format; XLA rounding every
elementwise op in the array's dtype; tanh below fp32 looked up in the reference's correctly rounded table), in the
order of :func:`precision.backends.array_math.gradient`'s forward half, compiled with ``jax.jit`` as the training
step is. Params and rows are rounded to the compute format once on the host, as the backend rounds its data.

float64 exists in JAX only under x64: the pass runs inside the scoped ``jax.enable_x64`` (set either way, as the
training backend does), so the global setting is never changed and a user's global x64 cannot change how a narrow
pass traces. It runs on the CPU device, like the other two backends' passes.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from ...formats import Format, get_format
from ...problems import get_problem, unflatten
from ..numpy_backend.ops import convert as host_convert
from . import jax_device
from .. import array_math
from .ops import JaxOps

__all__ = ["forward_logits"]

_FP64 = get_format("fp64")


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _logits(problem: str, layout: tuple, compute: Format, accum: Format, params, X):
    return array_math.forward(problem, JaxOps(compute, accum), unflatten(params, layout), X)[0]


def forward_logits(problem: str, params: np.ndarray, X: np.ndarray, compute: Format, accum: Format,
                   layout) -> np.ndarray:
    """Logits (z of shape (n,) for linreg / logreg, Z of shape (n, classes) for softmax / mlp, before any
    sigmoid or softmax) of the float64 ``params`` on the float64 rows ``X``, computed in ``compute`` with dot
    products accumulated in ``accum``; returned as their float64 values. Overflow (inf, or NaN in fp8 e4m3fn) is
    returned, not raised. One compilation per (problem, layout, formats, row count)."""
    problem = get_problem(problem).name  # raises, naming the valid problems
    compute, accum = get_format(compute), get_format(accum)
    layout = tuple((name, tuple(shape)) for name, shape in layout)
    with np.errstate(all="ignore"):
        p = host_convert(np.asarray(params, dtype=np.float64), _FP64, compute)
        Xc = host_convert(np.ascontiguousarray(X, dtype=np.float64), _FP64, compute)
    with jax.enable_x64(_FP64 in (compute, accum)):
        device = jax_device("cpu")
        out = _logits(problem, layout, compute, accum, jax.device_put(p, device), jax.device_put(Xc, device))
        return np.asarray(out).astype(np.float64)
