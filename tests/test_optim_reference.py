"""Optimizer formulas in fp64: the numpy backend's ``update`` against hand derivations and against torch.optim.

The hand derivations below are plain Python floats over lists, written from torch.optim's documented algorithms in
the op order documented in precision/optim.py; they share no code with the package. In float64 the same IEEE
operations in the same order give the same doubles, so the first three steps are compared with ``==``: a change
of op order in the backend (which the numba and JAX backends must mirror) fails here.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from precision.backends.numpy_backend.update import update
from precision.formats import FORMATS, round_to
from precision.optim import SCALAR_COLUMNS, OptimizerSpec, make_optimizer, scalar_table, state_size

FP64 = FORMATS["fp64"]
U64 = 2.0**-53  # unit roundoff of float64

# Tiny quadratic: loss = sum a_i (w_i - c_i)^2 / 2, gradient a_i (w_i - c_i).
W0 = [0.5, -1.25, 2.0, 0.0]
A = [1.0, 0.5, 3.0, 2.0]
C = [0.1, 0.3, -0.7, 0.0]  # the last coordinate starts at its optimum: gradient exactly 0

OPTIMIZERS = {
    "sgd": dict(lr=0.1, momentum=0.0),
    "sgd-wd": dict(lr=0.1, momentum=0.0, weight_decay=0.05),
    "sgd-momentum": dict(lr=0.1, momentum=0.9),
    "sgd-momentum-wd": dict(lr=0.1, momentum=0.9, weight_decay=0.05),
    "sgd-nesterov": dict(lr=0.1, momentum=0.9, nesterov=True),
    "sgd-nesterov-wd": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.05),
    "adam": dict(lr=0.01),
    "adam-wd": dict(lr=0.01, weight_decay=0.05),
    "adamw": dict(lr=0.01, weight_decay=0.05),
}


def make(case: str) -> OptimizerSpec:
    return make_optimizer(case.split("-")[0], **OPTIMIZERS[case])


def grad(w):
    return [a * (x - c) for a, x, c in zip(A, w, C)]


def hand_steps(opt: OptimizerSpec, steps: int) -> list[list[float]]:
    """torch.optim's algorithms in Python floats, one coordinate at a time; the params after each step."""
    w = list(W0)
    m = [0.0] * len(w)
    v = [0.0] * len(w)
    buf = [0.0] * len(w)
    b1, b2 = opt.betas
    out = []
    for t in range(1, steps + 1):
        g = grad(w)
        for i in range(len(w)):
            gi = g[i]
            if opt.name == "adamw":
                w[i] = w[i] * (1 - opt.lr * opt.weight_decay)
            elif opt.weight_decay:
                gi = gi + opt.weight_decay * w[i]
            if opt.name == "sgd":
                if opt.momentum:
                    buf[i] = gi if t == 1 else opt.momentum * buf[i] + gi
                    d = gi + opt.momentum * buf[i] if opt.nesterov else buf[i]
                else:
                    d = gi
                w[i] = w[i] - opt.lr * d
            else:
                m[i] = b1 * m[i] + (1 - b1) * gi
                v[i] = b2 * v[i] + (1 - b2) * (gi * gi)
                bias1 = 1 - b1**t
                bias2 = 1 - b2**t
                denom = math.sqrt(v[i]) / math.sqrt(bias2) + opt.eps
                w[i] = w[i] - (opt.lr / bias1) * m[i] / denom
        out.append(list(w))
    return out


def backend_steps(opt: OptimizerSpec, steps: int, grad_fn) -> np.ndarray:
    """The numpy backend's update in fp64, driven by ``grad_fn(w)``; params after each step, (steps, n)."""
    table = scalar_table(opt, steps, FP64)
    w = np.array(W0)
    state = [np.zeros_like(w) for _ in range(state_size(opt))]
    out = []
    for t in range(1, steps + 1):
        w, state = update(opt, t, table[t - 1], w, grad_fn(w), state)
        out.append(w)
    return np.array(out)


@pytest.mark.parametrize("case", OPTIMIZERS)
def test_first_three_steps_equal_hand_derivation(case):
    opt = make(case)
    got = backend_steps(opt, 3, lambda w: np.array(grad(w.tolist())))
    want = np.array(hand_steps(opt, 3))
    assert got.tolist() == want.tolist()
    assert not np.array_equal(got[0], W0) and not np.array_equal(got[1], got[2])  # the steps did move


@pytest.mark.parametrize("case", [c for c in OPTIMIZERS if c.startswith("adam")])
def test_adam_first_step_closed_form(case):
    """Step 1: m1 = (1-b1) g, v1 = (1-b2) g^2, so m1/bc1 = g, sqrt(v1)/sqrt(bc2) = |g| and the step is
    lr g / (|g| + eps) (g after L2 decay; AdamW multiplies w by 1 - lr wd first). About 12 roundings, each
    <= u64 relative of a term bounded by |w0| + lr, separate the computed and the exact value."""
    opt = make(case)
    got = backend_steps(opt, 1, lambda w: np.array(grad(w.tolist())))[0]
    w0 = np.array(W0)
    g = np.array(grad(W0)) + (opt.weight_decay * w0 if opt.name == "adam" else 0.0)
    decayed = w0 * (1 - opt.lr * opt.weight_decay) if opt.name == "adamw" else w0
    want = decayed - opt.lr * g / (np.abs(g) + opt.eps)
    assert np.all(np.abs(got - want) <= 12 * U64 * (np.abs(w0) + opt.lr))
    assert got[3] == W0[3]  # zero gradient: m = v = 0, step 0 / eps = 0


def test_scalar_table_columns_are_float64_formulas_rounded_once():
    opt = make_optimizer("adamw", lr=3e-4, betas=(0.9, 0.95), eps=1e-6, weight_decay=0.1)
    steps = 50
    for fmt in FORMATS.values():
        table = scalar_table(opt, steps, fmt)
        assert table.shape == (steps, len(SCALAR_COLUMNS)) and table.dtype == np.float64
        col = {name: table[:, i] for i, name in enumerate(SCALAR_COLUMNS)}
        for t in range(1, steps + 1):
            exact = {  # Python floats: the values torch.optim computes on the host
                "lr": 3e-4, "weight_decay": 0.1, "momentum": 0.0, "beta1": 0.9, "one_minus_beta1": 1 - 0.9,
                "beta2": 0.95, "one_minus_beta2": 1 - 0.95, "sqrt_bc2": math.sqrt(1 - 0.95**t), "eps": 1e-6,
                "step_size": 3e-4 / (1 - 0.9**t), "decay": 1 - 3e-4 * 0.1,
            }
            for name, value in exact.items():
                assert col[name][t - 1] == round_to(value, fmt), (fmt.name, name, t)


def test_bias_corrections_do_not_use_numpy_array_power():
    """numpy's float64 ``power`` on arrays is a SIMD kernel that is not correctly rounded (here 102 of
    0.9^1..0.9^2000 and 99 of 0.999^t are 1 ulp off; Python's pow is correct on all of them), and 1 - 0.999^t
    magnifies one ulp of 0.999^t ~1000x at small t. scalar_table uses Python's pow, like torch.optim."""
    from fractions import Fraction

    steps = 2000
    opt = make_optimizer("adam", betas=(0.9, 0.999))
    table = scalar_table(opt, steps, FP64)
    step_size = table[:, SCALAR_COLUMNS.index("step_size")]
    sqrt_bc2 = table[:, SCALAR_COLUMNS.index("sqrt_bc2")]
    exact1, exact2 = Fraction(1), Fraction(1)
    for t in range(1, steps + 1):
        exact1 *= Fraction(0.9)
        exact2 *= Fraction(0.999)
        assert step_size[t - 1] == opt.lr / (1 - float(exact1))  # beta^t correctly rounded, then torch's ops
        assert sqrt_bc2[t - 1] == math.sqrt(1 - float(exact2))


def test_bf16_scalar_trap_is_avoided():
    """bfloat16(0.999) == 1, so 1 - beta2 computed in bf16 is 0 and Adam's v would never move. The table computes
    1 - beta2 in float64 and rounds once: bf16(0.001) != 0."""
    bf16 = ml_dtypes.bfloat16
    assert bf16(1) - bf16(0.999) == 0
    opt = make_optimizer("adam")
    table = scalar_table(opt, 3, FORMATS["bf16"])
    one_minus_beta2 = table[:, SCALAR_COLUMNS.index("one_minus_beta2")]
    assert np.all(one_minus_beta2 != 0)
    assert np.all(np.abs(one_minus_beta2 - 0.001) <= FORMATS["bf16"].unit_roundoff * 0.001)  # one rounding
    assert np.all(table[:, SCALAR_COLUMNS.index("beta2")] == 1.0)  # the trap itself is real


# ------------------------------------------------------------------------------------------------------------------
# torch.optim, 100 steps
# ------------------------------------------------------------------------------------------------------------------

N_TORCH = 64
STEPS_TORCH = 100
TORCH_CASES = {  # case -> (our optimizer, torch class name, torch kwargs)
    "sgd-momentum-wd": ("sgd", "SGD", dict(lr=0.01, momentum=0.9, weight_decay=0.01)),
    "sgd-nesterov-wd": ("sgd", "SGD", dict(lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.01)),
    "adam": ("adam", "Adam", dict(lr=0.01)),
    "adam-wd": ("adam", "Adam", dict(lr=0.01, weight_decay=0.01)),
    "adamw": ("adamw", "AdamW", dict(lr=0.01, weight_decay=0.1)),
}


@pytest.mark.parametrize("case", TORCH_CASES)
def test_hundred_steps_match_torch(case):
    """100 steps on a 64-dim quadratic with curvatures 0.01..100, within 1e-13 relative (L2 and per element).

    Derivation: torch rounds differently inside a step (m via lerp, v via addcmul, m/denom before * step size), a
    few u64 of each update; the quadratic's map is a contraction for these lr (lr * a <= 1), so per-step
    differences add up at most linearly: 100 steps x ~4 u64 = 4.4e-14 < 1e-13 relative to the params. Measured
    here: <= ~1e-15."""
    torch = pytest.importorskip("torch", reason="torch is an optional test extra (pip install 'precision[test]'); "
                                                "the torch.optim comparison needs it")
    name, torch_class, kwargs = TORCH_CASES[case]
    opt = make_optimizer(name, **{k: v for k, v in kwargs.items()})
    rng = np.random.default_rng(100)
    a = np.exp(rng.uniform(np.log(0.01), np.log(100), N_TORCH))
    c = rng.standard_normal(N_TORCH)
    w0 = rng.standard_normal(N_TORCH)

    table = scalar_table(opt, STEPS_TORCH, FP64)
    w = w0.copy()
    state = [np.zeros_like(w) for _ in range(state_size(opt))]
    for t in range(1, STEPS_TORCH + 1):
        w, state = update(opt, t, table[t - 1], w, a * (w - c), state)

    p = torch.tensor(w0, dtype=torch.float64)
    at, ct = torch.tensor(a, dtype=torch.float64), torch.tensor(c, dtype=torch.float64)
    optimizer = getattr(torch.optim, torch_class)([p], foreach=False, **kwargs)
    for _ in range(STEPS_TORCH):
        p.grad = at * (p - ct)
        optimizer.step()
    ref = p.numpy()

    assert not np.allclose(ref, w0)  # it trained
    rel = np.linalg.norm(w - ref) / np.linalg.norm(ref)
    assert rel <= 1e-13, rel
    assert np.all(np.abs(w - ref) <= 1e-13 * np.maximum(np.abs(ref), np.abs(w0))), np.max(np.abs(w - ref))
