"""The JAX backend's optimizer updates against optax's (optax.adam, optax.adamw, optax.sgd), and which optax
setting or formula form gives each difference.

The two forms (docs/numerics.md; precision/optim.py has ours, torch.optim's):

=================  ========================================  ====================================================
form               ours (torch)                              optax
=================  ========================================  ====================================================
moments            b1*m + (1-b1)*g                           (1-b1)*g + b1*m  (same sum; FMA fuses the other product)
bias correction    sqrt(v)/sqrt(bc2) + eps;                  u = (m/bc1) / (sqrt(v/bc2 + eps_root) + eps);
                   p - (lr/bc1) * m / denom                  p + (-lr) * u
bias precision     bc_k = 1 - beta_k^t in float64 on the     1 - beta_k**count in the default float (float32
                   host, cast once                           unless x64 is on), then cast; shown without x64
eps_root           none                                      inside the sqrt (default 0)
AdamW decay        p * (1 - lr*wd) first                     u + wd*p, then times -lr
SGD momentum       buf = g at step 1, then mu*buf + g        trace t = g + mu*t from t = 0 (equal: mu*0 + g = g)
Nesterov           g + mu*buf                                g + mu*t  (the same form)
=================  ========================================  ====================================================

A switchable rewrite of the Adam update (``adam_in_forms``) reproduces ours bit for bit with every form set to
"ours" and optax bit for bit with every form set to "optax"; flipping one form at a time shows what each changes.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

from precision.backends.jax_backend.update import update as our_update  # noqa: E402
from precision.formats import get_format  # noqa: E402
from precision.optim import SCALAR_COLUMNS, make_optimizer, scalar_table  # noqa: E402

STEPS = 100
N = 256
FORMAT_OF = {jnp.float64: "fp64", jnp.float32: "fp32"}
U32 = get_format("fp32").unit_roundoff


def quadratic(dtype, n=N, seed=0):
    """0.5 (p - p*)^T A (p - p*) with A symmetric positive definite (eigenvalues in about [0.5, 4.5]); returns the
    gradient function and p0. The same float64 data for every optimizer, cast once to ``dtype``."""
    rng = np.random.default_rng(seed)
    Q = rng.standard_normal((n, n)) / np.sqrt(n)
    A, p_star, p0 = Q @ Q.T + 0.5 * np.eye(n), rng.standard_normal(n), rng.standard_normal(n)
    A, p_star, p0 = (jnp.asarray(x, dtype) for x in (A, p_star, p0))
    return (lambda p: jnp.matmul(A, p - p_star, precision=jax.lax.Precision.HIGHEST)), p0


def run_ours(opt, dtype, steps=STEPS):
    grad, p0 = quadratic(dtype)
    table = jnp.asarray(scalar_table(opt, steps, get_format(FORMAT_OF[dtype])).astype(dtype))
    n_state = 2 if opt.is_adam else 1

    def body(carry, xs):
        p, state = carry
        row, t = xs
        return our_update(opt, t, row, p, grad(p), state), None

    steps_i = jnp.arange(1, steps + 1, dtype=jnp.int32)
    (p, _), _ = jax.jit(lambda c: jax.lax.scan(body, c, (table, steps_i)))((p0, [jnp.zeros_like(p0)] * n_state))
    return np.asarray(p)


def run_optax(tx, dtype, steps=STEPS):
    grad, p0 = quadratic(dtype)

    def body(carry, _):
        p, state = carry
        updates, state = tx.update(grad(p), state, p)
        return (optax.apply_updates(p, updates), state), None

    (p, _), _ = jax.jit(lambda c: jax.lax.scan(body, c, None, length=steps))((p0, tx.init(p0)))
    return np.asarray(p)


OURS = {"moments": "ours", "bias": "ours", "decay": "ours"}
OPTAX = {"moments": "optax", "bias": "optax", "decay": "optax"}


def adam_in_forms(opt, forms, eps_root=0.0):
    """The Adam/AdamW update with each form of the table above chosen independently: ``forms`` maps moments, bias
    and decay to "ours" or "optax". The bias precision is optax's own: ``1 - beta**count`` in the default float
    (float64 with x64 on, so then it equals our host-computed value; float32 without). Same signature as our
    update, scalars of the "ours" forms from our scalar table, those of the "optax" forms Python floats as in
    optax."""
    if forms["bias"] == "ours" and forms["decay"] == "optax" and opt.name == "adamw":
        raise ValueError("optax's decay (u + wd*p, then times -lr) needs optax's u: use the optax bias form")
    col = {name: i for i, name in enumerate(SCALAR_COLUMNS)}
    b1, b2 = opt.betas

    def update(t, row, p, g, state):
        s = {name: row[i] for name, i in col.items()}
        m, v = state
        if opt.name == "adamw" and forms["decay"] == "ours":
            p = p * s["decay"]
        if forms["moments"] == "ours":
            m = s["beta1"] * m + s["one_minus_beta1"] * g
            v = s["beta2"] * v + s["one_minus_beta2"] * (g * g)
        else:  # optax.tree.update_moment: (1 - decay) * g**order + decay * t
            m = (1 - b1) * g + b1 * m
            v = (1 - b2) * (g * g) + b2 * v
        if forms["bias"] == "ours":
            return p - s["step_size"] * m / (jnp.sqrt(v) / s["sqrt_bc2"] + s["eps"]), [m, v]
        bc1, bc2 = (1 - b1**t).astype(p.dtype), (1 - b2**t).astype(p.dtype)  # optax.tree.bias_correction
        u = (m / bc1) / (jnp.sqrt(v / bc2 + eps_root) + opt.eps)
        if opt.name == "adamw" and forms["decay"] == "optax":
            u = u + opt.weight_decay * p  # optax.add_decayed_weights, on the params before the update
        return p + (-opt.lr) * u, [m, v]  # optax.scale_by_learning_rate, optax.apply_updates

    return update


def run_forms(opt, forms, dtype, eps_root=0.0, steps=STEPS):
    grad, p0 = quadratic(dtype)
    table = jnp.asarray(scalar_table(opt, steps, get_format(FORMAT_OF[dtype])).astype(dtype))
    update = adam_in_forms(opt, forms, eps_root)

    def body(carry, xs):
        p, state = carry
        row, t = xs
        return update(t, row, p, grad(p), state), None

    steps_i = jnp.arange(1, steps + 1, dtype=jnp.int32)
    (p, _), _ = jax.jit(lambda c: jax.lax.scan(body, c, (table, steps_i)))((p0, [jnp.zeros_like(p0)] * 2))
    return np.asarray(p)


def optax_of(opt, eps_root=0.0):
    if opt.name == "adam":
        return optax.adam(opt.lr, *opt.betas, eps=opt.eps, eps_root=eps_root)
    if opt.name == "adamw":
        return optax.adamw(opt.lr, *opt.betas, eps=opt.eps, eps_root=eps_root, weight_decay=opt.weight_decay)
    sgd = optax.sgd(opt.lr, momentum=opt.momentum or None, nesterov=opt.nesterov)
    return optax.chain(optax.add_decayed_weights(opt.weight_decay), sgd) if opt.weight_decay else sgd


def rel_l2(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(np.asarray(b, np.float64)))


CASES = [make_optimizer("adam"), make_optimizer("adamw"), make_optimizer("sgd"),
         make_optimizer("sgd", nesterov=True), make_optimizer("sgd", weight_decay=1e-2)]


@pytest.mark.parametrize("opt", CASES, ids=str)
def test_float64_agrees_with_optax(opt):
    # Both forms are the same real-number update; each step's rounding differs by a few float64 roundings of the
    # update (<= ~8 u64 = 9e-16 of the step, which is lr-sized, well below |p|). The quadratic with these step
    # sizes contracts, so errors add over steps: 100 x 9e-16 = 9e-14 <= 1e-13.
    with jax.enable_x64(True):
        ours, theirs = run_ours(opt, jnp.float64), run_optax(optax_of(opt), jnp.float64)
    assert rel_l2(ours, theirs) <= 1e-13


@pytest.mark.parametrize("opt", [o for o in CASES if o.name == "sgd"], ids=str)
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32], ids=["fp64", "fp32"])
def test_sgd_trace_is_torchs_buffer_bit_for_bit(opt, dtype):
    # optax's trace starts at 0, so its first step is g + mu*0 = g exactly: torch's "buf = g at step 1". Nesterov
    # is g + mu*buf in both, weight decay g + wd*p in both: the same operations, the same bits in any format.
    with jax.enable_x64(True):
        ours, theirs = run_ours(opt, dtype), run_optax(optax_of(opt), dtype)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_forms_reproduce_both_updates_bit_for_bit(name):
    # The table in the docstring is the whole difference: with every form chosen, each side is reproduced exactly
    # (float32, where every rounding shows; XLA compiles both the same way, FMA contractions included).
    opt = make_optimizer(name)
    with jax.enable_x64(True):
        np.testing.assert_array_equal(run_forms(opt, OURS, jnp.float32), run_ours(opt, jnp.float32))
        np.testing.assert_array_equal(run_forms(opt, OPTAX, jnp.float32), run_optax(optax_of(opt), jnp.float32))
    # Without x64, optax computes its bias corrections in float32; the "optax" bias precision form does the same.
    np.testing.assert_array_equal(run_forms(opt, OPTAX, jnp.float32), run_optax(optax_of(opt), jnp.float32))


@pytest.mark.parametrize("form", ["moments", "bias", "decay"])
def test_each_form_changes_float32_bits_and_not_float64_values(form):
    # Flipping one form changes some float32 bits (it is a different sequence of roundings) while in float64 the
    # result stays within the 1e-13 of test_float64_agrees_with_optax (the same real-number update).
    # "moments" differs only because XLA's CPU code contracts the first product of the sum into an FMA.
    # optax's decay form needs optax's u, so "decay" is flipped starting from all-optax, the others from ours.
    opt = make_optimizer("adamw")
    base = OPTAX if form == "decay" else OURS
    flipped = dict(base, **{form: "ours" if base[form] == "optax" else "optax"})
    with jax.enable_x64(True):
        for dtype in (jnp.float32, jnp.float64):
            a, b = run_forms(opt, flipped, dtype), run_forms(opt, base, dtype)
            if dtype == jnp.float32:
                assert (a != b).any()
            else:
                assert rel_l2(a, b) <= 1e-13


def test_eps_root_is_a_different_update_not_a_rounding():
    # eps_root adds to v_hat inside the sqrt: a relative change of about eps_root / (2 v_hat) per step, here
    # ~1e-8 / (2 * O(1)) ~ 5e-9, far above float64 rounding (1e-13 after 100 steps). The "optax" forms with the
    # same eps_root reproduce it exactly, so the difference is that term and nothing else.
    opt = make_optimizer("adam")
    with jax.enable_x64(True):
        with_root = run_optax(optax_of(opt, eps_root=1e-8), jnp.float64)
        assert rel_l2(with_root, run_ours(opt, jnp.float64)) > 1e-10
        np.testing.assert_array_equal(run_forms(opt, OPTAX, jnp.float64, eps_root=1e-8), with_root)


def test_optax_bias_correction_in_float32_without_x64():
    # Step 1 of Adam is u = ((1-b1)/bc1) * g / (|g| * sqrt((1-b2)/bc2) + eps), which is sign(g) exactly when the
    # ratios are 1. optax without x64 computes bc_k = 1 - f32(beta_k) in float32 (exact by Sterbenz), while the
    # numerators are f32(1 - beta_k) rounded from float64: the ratios are off by 2.4e-7 and 1.3e-5, so every
    # element of the first update is off by the predicted factor below. With x64 the bias corrections are
    # computed in float64 and cast: numerator and denominator are the same float32 number, ratio 1.
    b1, b2 = 0.9, 0.999
    f32 = np.float32
    predicted = (np.float64(f32(1 - b1)) / np.float64(f32(1) - f32(b1))) / np.sqrt(
        np.float64(f32(1 - b2)) / np.float64(f32(1) - f32(b2))) - 1.0
    rng = np.random.default_rng(0)
    g = (rng.uniform(1.0, 2.0, N) * rng.choice([-1.0, 1.0], N)).astype(np.float32)  # |g| >= 1: eps is < u32
    tx = optax.scale_by_adam(b1, b2, eps=1e-8)

    def first_update():
        params = jnp.zeros(N, jnp.float32)
        updates, _ = jax.jit(tx.update)(jnp.asarray(g), tx.init(params), params)
        return np.asarray(updates, np.float64) / np.sign(g) - 1.0

    plain = first_update()
    with jax.enable_x64(True):
        wide = first_update()
    # Each side is ~7 float32 roundings (m, g*g, v, two divisions, sqrt, + eps, the final division): <= 8 u32.
    assert np.abs(wide).max() <= 8 * U32
    assert np.abs(plain - predicted).max() <= 8 * U32
    assert abs(predicted) > 100 * U32  # the effect is real, not rounding: -6.6e-6
