"""Forward and backward passes of each problem in one compute format (jax.numpy), written by hand.

Hand-written rather than ``jax.grad``: the backward pass then has the reference's operations in the reference's
order (``delta = (out - y) * scale``, ``X.T @ delta``, ``tanh' = 1 - H*H``), so that a difference between the
backends is XLA's arithmetic (FMA, flush-to-zero, dot order, its float32 exp/tanh) and not a different
derivative graph with different rounding points; the loss scale also enters exactly where the reference puts it
(folded into ``scale``). ``jax.grad`` of the float64 loss checks these gradients in tests/test_jax_backend.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ...problems import unflatten
from .ops import JaxOps

__all__ = ["gradient"]


def _softmax(ops: JaxOps, Z):
    shifted = Z - Z.max(axis=1, keepdims=True)
    e = ops.exp(shifted)
    return e / ops.sum(e, axis=1, keepdims=True)


def _linear_grads(ops: JaxOps, X, delta):
    return [ops.matmul_tn(X, delta), ops.sum(delta, axis=0, keepdims=delta.ndim == 1).reshape(-1)]  # X.T @ delta


def gradient(problem: str, ops: JaxOps, params: jax.Array, X, targets, scale, layout) -> jax.Array:
    """Flat gradient of the mean loss at ``params`` (arrays in ``ops.dtype``), times ``scale``'s loss scale.

    ``targets``: regression values, 0/1 labels (logreg) or one-hot rows (softmax, mlp), in the compute dtype;
    ``scale``: (loss scale)/batch, a typed 0-d array of the compute format.
    """
    p = unflatten(params, layout)
    if problem in ("linreg", "logreg"):
        z = ops.matmul(X, p["w"]) + p["b"]
        out = z if problem == "linreg" else ops.sigmoid(z)
        delta = (out - targets) * scale
        return jnp.concatenate(_linear_grads(ops, X, delta))
    if problem == "softmax":
        P = _softmax(ops, ops.matmul(X, p["W"]) + p["b"])
        delta = (P - targets) * scale
        return jnp.concatenate([g.ravel() for g in _linear_grads(ops, X, delta)])
    # mlp
    H = ops.tanh(ops.matmul(X, p["W1"]) + p["b1"])
    P = _softmax(ops, ops.matmul(H, p["W2"]) + p["b2"])
    delta = (P - targets) * scale
    gW2, gb2 = _linear_grads(ops, H, delta)
    dH = ops.matmul_nt(delta, p["W2"])  # delta @ W2.T
    one = jnp.asarray(1, H.dtype)
    dA = dH * (one - H * H)  # tanh' = 1 - H^2: H*H, 1-, * each rounded
    gW1, gb1 = _linear_grads(ops, X, dA)
    return jnp.concatenate([gW1.ravel(), gb1, gW2.ravel(), gb2])
