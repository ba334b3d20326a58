"""The training math shared by the array backends (numpy and jax.numpy), written once against an array namespace.

``xp`` is the namespace (``numpy`` or ``jax.numpy``); ``ops`` is the backend's format-aware op set (``FormatOps`` /
``JaxOps``: matmul with its accumulator, sums, transcendentals). Each line is one operation rounded to the array's
format by the framework itself, so the two backends run the same operations in the same order: what differs
between them is what each framework does with an operation (XLA's FMA contraction, flush-to-zero, dot order), which
is what the suite measures. The numba backend, a scalar loop, has its own kernels.
"""

from __future__ import annotations

from typing import Callable, Sequence

from ..optim import SCALAR_COLUMNS, OptimizerSpec
from ..problems import get_problem, unflatten

__all__ = ["update", "gradient", "forward"]

_COL = {name: i for i, name in enumerate(SCALAR_COLUMNS)}


def update(xp, opt: OptimizerSpec, step, scalars: Sequence, w, g, state: Sequence,
           store_state: Callable = lambda x: x, split: bool = False):
    """One optimizer step, op for op as documented in :mod:`precision.optim`.

    ``step`` is 1-based (a Python int, or a traced integer under ``jit``); ``scalars`` is the step's row of the
    scalar table as typed scalars of the update format; ``w``, ``g`` and ``state`` are arrays of the update format.
    ``store_state`` rounds a moment to its storage format and back, so the update goes on with the stored value.
    Returns (new weights, new state list); with ``split`` (Kahan-compensated updates, ``step_rules.KAHAN_CHAIN``)
    (base, delta, new state list) instead, where new weights = base + delta is the same last op: base is the
    weights (after AdamW's decay) and delta minus the step (a negation: exact).
    """

    def finish(base, step_term, new_state):
        return (base, -step_term, new_state) if split else (base - step_term, new_state)

    s = {name: scalars[i] for name, i in _COL.items()}
    if opt.name == "adamw":
        w = w * s["decay"]
    elif opt.weight_decay:
        g = g + s["weight_decay"] * w
    if opt.is_adam:
        m, v = state
        m = store_state(s["beta1"] * m + s["one_minus_beta1"] * g)
        v = store_state(s["beta2"] * v + s["one_minus_beta2"] * (g * g))
        denom = xp.sqrt(v) / s["sqrt_bc2"] + s["eps"]
        return finish(w, s["step_size"] * m / denom, [m, v])
    if opt.momentum:
        # torch: the buffer starts as g itself. A `where`, not a Python branch, so it also traces under jit.
        buf = store_state(xp.where(step == 1, g, s["momentum"] * state[0] + g))
        direction = g + s["momentum"] * buf if opt.nesterov else buf
        return finish(w, s["lr"] * direction, [buf])
    return finish(w, s["lr"] * g, [])


def _softmax(ops, Z):
    shifted = Z - Z.max(axis=1, keepdims=True)
    e = ops.exp(shifted)
    return e / ops.sum(e, axis=1, keepdims=True)


def _linear_grads(ops, X, delta):
    """(X.T @ delta, column sums of delta)."""
    return [ops.matmul_tn(X, delta), ops.sum(delta, axis=0, keepdims=delta.ndim == 1).reshape(-1)]


def _activation(ops, name: str, A):
    """tanh by the format's rule, or relu = max(A, 0) (exact; NaN stays NaN, -0 gives +0)."""
    if name == "tanh":
        return ops.tanh(A)
    return ops.relu(A)


def forward(problem: str, ops, p: dict, X):
    """The forward pass: (logits, hidden activations: a list, first layer first, or None). ``p`` is the params as
    named blocks (unflatten), all arrays in ``ops``'s compute dtype. Logits are z (n,) for linreg / logreg,
    Z (n, classes) for softmax / an MLP, before any sigmoid or softmax. The training gradient and the served model
    (precision.inference) both run it. An MLP (``mlp``, ``mlp-WIDTHS[-relu]``): H_i = act(rnd(H_{i-1} W_i) + b_i)
    per hidden layer, then Z = rnd(H_L W) + b."""
    if problem in ("linreg", "logreg"):
        return ops.matmul(X, p["w"]) + p["b"], None
    if problem == "softmax":
        return ops.matmul(X, p["W"]) + p["b"], None
    prob = get_problem(problem)
    H, hidden = X, []
    for i in range(1, len(prob.hidden) + 1):
        H = _activation(ops, prob.activation, ops.matmul(H, p[f"W{i}"]) + p[f"b{i}"])
        hidden.append(H)
    last = len(prob.hidden) + 1
    return ops.matmul(H, p[f"W{last}"]) + p[f"b{last}"], hidden


def gradient(xp, problem: str, ops, params, X, targets, scale, layout):
    """Flat gradient of the mean loss at ``params`` (all arrays in ``ops``'s compute dtype).

    ``targets``: regression values, 0/1 labels (logreg) or one-hot rows (softmax, mlp), in the compute dtype;
    ``scale``: the host-computed (loss scale)/batch, rounded once to the compute format.
    """
    p = unflatten(params, layout)
    logits, H = forward(problem, ops, p, X)
    if problem in ("linreg", "logreg"):
        out = logits if problem == "linreg" else ops.sigmoid(logits)
        delta = (out - targets) * scale
        return xp.concatenate(_linear_grads(ops, X, delta))
    if problem == "softmax":
        delta = (_softmax(ops, logits) - targets) * scale
        return xp.concatenate([g.ravel() for g in _linear_grads(ops, X, delta)])
    # an MLP: back from the last layer; each layer's (gW, gb) from the delta at its output, then the delta through
    # its weights and the activation below (for the one-layer mlp: gW2, gb2, dH, dA, gW1, gb1, as ever)
    activation = get_problem(problem).activation
    delta = (_softmax(ops, logits) - targets) * scale
    grads = []
    for i in range(len(H) + 1, 0, -1):
        below = X if i == 1 else H[i - 2]
        gW, gb = _linear_grads(ops, below, delta)
        grads = [gW.ravel(), gb] + grads
        if i == 1:
            break
        dH = ops.matmul_nt(delta, p[f"W{i}"])  # delta @ W_i.T
        if activation == "tanh":
            one = xp.asarray(1, dtype=below.dtype)
            delta = dH * (one - below * below)  # tanh' = 1 - H^2: H*H, 1-, * each rounded
        else:
            delta = dH * xp.sign(below)  # relu' = 1 where H > 0, else 0 (H >= 0; 0 at 0, torch's): exact
    return xp.concatenate(grads)
