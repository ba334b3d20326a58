"""Forward and backward passes of each problem in one compute format (jax.numpy), written by hand: the shared op
sequence of :mod:`precision.backends.array_math`, with ``JaxOps`` for matmuls, sums and transcendentals.

Hand-written rather than ``jax.grad``: the backward pass then has the reference's operations in the reference's
order (``delta = (out - y) * scale``, ``X.T @ delta``, ``tanh' = 1 - H*H``), so that a difference between the
backends is XLA's arithmetic (FMA, flush-to-zero, dot order, its float32 exp/tanh) and not a different
derivative graph with different rounding points; the loss scale also enters exactly where the reference puts it
(folded into ``scale``). ``jax.grad`` of the float64 loss checks these gradients in tests/test_jax_backend.py.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from .. import array_math

__all__ = ["gradient"]

gradient = functools.partial(array_math.gradient, jnp)
gradient.__doc__ = array_math.gradient.__doc__
