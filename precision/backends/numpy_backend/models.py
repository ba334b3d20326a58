"""Forward and backward passes of each problem in one compute format (numpy).

Each line is one numpy operation rounded to the compute format; matmuls and sums go through the accumulator.
``scale`` is the host-computed 1/batch (times the loss scale), rounded once to the compute format.
"""

from __future__ import annotations

import numpy as np

from ...problems import unflatten
from .ops import FormatOps

__all__ = ["gradient"]


def _softmax(ops: FormatOps, Z):
    shifted = Z - Z.max(axis=1, keepdims=True)
    e = ops.exp(shifted)
    return e / ops.sum(e, axis=1, keepdims=True)


def _linear_grads(ops: FormatOps, X, delta):
    return [ops.matmul(X.T, delta), ops.sum(delta, axis=0, keepdims=delta.ndim == 1).reshape(-1)]


def gradient(problem: str, ops: FormatOps, params, X, targets, scale, layout) -> np.ndarray:
    """Flat gradient of the mean loss at ``params`` (all arrays in ``ops.fmt``'s dtype).

    ``targets``: regression values, 0/1 labels (logreg) or one-hot rows (softmax, mlp), in the compute dtype.
    """
    p = unflatten(params, layout)
    if problem in ("linreg", "logreg"):
        z = ops.matmul(X, p["w"]) + p["b"]
        out = z if problem == "linreg" else ops.sigmoid(z)
        delta = (out - targets) * scale
        return np.concatenate(_linear_grads(ops, X, delta))
    if problem == "softmax":
        P = _softmax(ops, ops.matmul(X, p["W"]) + p["b"])
        delta = (P - targets) * scale
        return np.concatenate([g.ravel() for g in _linear_grads(ops, X, delta)])
    # mlp
    H = ops.tanh(ops.matmul(X, p["W1"]) + p["b1"])
    P = _softmax(ops, ops.matmul(H, p["W2"]) + p["b2"])
    delta = (P - targets) * scale
    gW2, gb2 = _linear_grads(ops, H, delta)
    dH = ops.matmul(delta, p["W2"].T)
    one = H.dtype.type(1)
    dA = dH * (one - H * H)  # tanh' = 1 - H^2: H*H, 1-, * each rounded
    gW1, gb1 = _linear_grads(ops, X, dA)
    return np.concatenate([gW1.ravel(), gb1, gW2.ravel(), gb2])
