"""The optimizer update in jax.numpy: the shared op sequence of :mod:`precision.backends.array_math`, the same
function the numpy reference runs (it traces under ``jit`` and ``lax.scan``).

What XLA then does with it is the finding: in float32 it contracts ``a*b + c`` into one FMA (one rounding instead
of two); on the CPU it flushes float32 subnormals to zero, which touches bf16 (whose tiny values are float32
subnormals) but not fp16. See docs/jax.md and tests/test_jax_backend.py.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from ...optim import OptimizerSpec
from .. import array_math

__all__ = ["update", "structure"]

update = functools.partial(array_math.update, jnp)
update.__doc__ = array_math.update.__doc__


def structure(opt: OptimizerSpec) -> tuple:
    """What the traced update depends on besides its inputs (everything else comes from the scalar table): two
    optimizers with the same structure share one compiled program."""
    return (opt.name, opt.momentum != 0, opt.nesterov, opt.weight_decay != 0)
