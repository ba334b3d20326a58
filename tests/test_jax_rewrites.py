"""The JAX optimizer update for identical gradients against the numpy reference: an exact model of XLA's rewrites.

* fp16 / fp32: XLA rewrites the reference's op order in two ways, and nothing else differs: ``x*y + z`` contracted
  into one FMA (LLVM, FMA-capable CPUs), and division by a broadcast scalar turned into multiplication by its
  rounded reciprocal (XLA's algebraic simplifier). A numpy model of the reference with exactly these rewrites
  reproduces the JAX update bit for bit; with ``--xla_cpu_max_isa=AVX`` (no FMA) the contraction disappears and SGD
  is bit-identical to the reference.
* bf16: bit-identical except where XLA's CPU flushes a subnormal to zero (bf16 tiny values are float32
  subnormals); a numpy model that flushes reproduces it bit for bit, and every difference is at an element where
  something was flushed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
import ml_dtypes  # noqa: E402

from precision.backends.jax_backend import BACKEND, lower, needs_x64  # noqa: E402
from precision.backends.jax_backend import loop as jax_loop  # noqa: E402
from precision.backends.jax_backend.models import gradient as jax_gradient  # noqa: E402
from precision.backends.jax_backend.ops import JaxOps, convert, transcendental_table  # noqa: E402
from precision.backends.jax_backend.update import update as jax_update  # noqa: E402
from precision.backends.numpy_backend import targets_for  # noqa: E402
from precision.backends.numpy_backend.update import update as numpy_update  # noqa: E402
from precision.data import make_dataset  # noqa: E402
from precision.drift import fingerprint  # noqa: E402
from precision.errors import UnavailableError  # noqa: E402
from precision.formats import get_format, round_to, to_format  # noqa: E402
from precision.optim import SCALAR_COLUMNS, make_optimizer, scalar_table, state_size  # noqa: E402
from precision.policy import PRESETS, get_policy  # noqa: E402
from precision.problems import unflatten  # noqa: E402
from precision.runner import dataset_for, run_one, train  # noqa: E402
from precision.spec import RunSpec  # noqa: E402
from precision.machine import xla_cpu_rewrites  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FP64 = get_format("fp64")
U64 = FP64.unit_roundoff


from test_jax_backend import bits  # noqa: E402  (bit patterns with NaNs canonicalized)




# ---------------------------------------------------------------------------------------------------------------
# The optimizer update for identical gradients: an exact model of XLA's rewrites
# ---------------------------------------------------------------------------------------------------------------

def fma_round_once(a, b, c, fmt) -> np.ndarray:
    """a*b + c with one rounding to ``fmt`` (an exact FMA), for fmt of at most 24 significand bits.

    a*b is exact in float64 (at most 2*24 bits). The sum is computed in float64 rounded to odd (TwoSum gives the
    exact error; an inexact result with an even last bit moves one ulp toward the error), and rounding to odd at
    53 bits followed by round-to-nearest-even at p <= 51 bits equals one correct rounding (Boldo & Melquiond).
    """
    a, b, c = (np.asarray(x, np.float64) for x in np.broadcast_arrays(a, b, c))
    product = a * b
    total = product + c
    z = total - product
    error = (product - (total - z)) + (c - z)
    even = (total.view(np.int64) & 1) == 0
    total = np.where((error != 0) & even, np.nextafter(total, np.where(error > 0, np.inf, -np.inf)), total)
    return to_format(total, fmt)


CONTRACTION_SITES = frozenset({"wd", "m", "v", "denom", "decay", "buf", "nesterov", "step"})


def xla_model_update(opt, step, row, w, g, state, fmt, contract=frozenset(), reciprocal=False):
    """The reference update (precision.optim's op order) in numpy, with XLA's two rewrites switchable:

    * ``contract``: the sites whose ``x*y + z`` is one FMA (one rounding) instead of two roundings;
      wd: g + wd*w; m: b1*m + (1-b1)*g (the first product is fused); v: b2*v + (1-b2)*g*g; denom:
      sqrt(v)*(1/sqrt_bc2) + eps (only with ``reciprocal``); decay (AdamW): w*decay - step; buf: mu*buf + g;
      nesterov: g + mu*buf; step (SGD): w - lr*d.
    * ``reciprocal``: ``sqrt(v) / sqrt_bc2`` computed as ``sqrt(v) * round(1 / sqrt_bc2)``.
    With neither it is the reference; ``row`` holds typed scalars of ``fmt``.
    """
    s = {name: row[i] for i, name in enumerate(SCALAR_COLUMNS)}

    def mul_add(site, x, y, z):
        return fma_round_once(x, y, z, fmt).astype(fmt.dtype) if site in contract else x * y + z

    if opt.name != "adamw" and opt.weight_decay:
        g = mul_add("wd", s["weight_decay"], w, g)
    if opt.is_adam:
        m, v = state
        m = mul_add("m", s["beta1"], m, s["one_minus_beta1"] * g)
        v = mul_add("v", s["beta2"], v, s["one_minus_beta2"] * (g * g))
        root = np.sqrt(v)
        if reciprocal:
            denom = mul_add("denom", root, fmt.dtype.type(1) / s["sqrt_bc2"], s["eps"])
        else:
            denom = root / s["sqrt_bc2"] + s["eps"]
        step_term = s["step_size"] * m / denom
        if opt.name == "adamw":  # w*decay - step_term; subtracting equals adding the (exact) negation
            return mul_add("decay", w, s["decay"], -step_term), [m, v]
        return w - step_term, [m, v]
    if opt.momentum:
        buf = g.copy() if step == 1 else mul_add("buf", s["momentum"], state[0], g)
        direction = mul_add("nesterov", s["momentum"], buf, g) if opt.nesterov else buf
        return mul_add("step", -s["lr"], direction, w), [buf]
    return mul_add("step", -s["lr"], g, w), []


# Adam's eps is 1e-4 here: the default 1e-8 is 0 in fp16, so wherever v underflows the update is inf and the
# comparison would be about NaN (a known fp16 failure mode, docs/numerics.md), not about arithmetic. AdamW uses
# lr = 1e-2, wd = 0.1: with the defaults the decay factor 1 - 1e-5 rounds to exactly 1 in fp16 and bf16 (the
# decoupled decay vanishes), which would leave the "decay" site unobservable.
UPDATE_CASES = [make_optimizer("adam", eps=1e-4), make_optimizer("adamw", lr=1e-2, weight_decay=0.1, eps=1e-4),
                make_optimizer("adam", eps=1e-4, weight_decay=1e-2), make_optimizer("sgd"),
                make_optimizer("sgd", nesterov=True), make_optimizer("sgd", weight_decay=1e-2),
                make_optimizer("sgd", momentum=0.0)]
UPDATE_IDS = [str(o) for o in UPDATE_CASES]


def expected_contraction(fmt_name: str, features=None, xla_flags=None) -> frozenset:
    """The sites XLA's CPU backend fuses into an FMA, derived from the CPU features and XLA_FLAGS
    (precision.machine.xla_cpu_rewrites; measured with jax 0.10.2, docs/numerics.md):

    * fp32: every site, where the CPU has FMA and --xla_cpu_max_isa does not cap it away (AVX does);
    * fp16: every site only where XLA computes float16 natively (AVX512-FP16, e.g. Sapphire/Emerald Rapids);
      elsewhere (an AMD EPYC with or without AVX-512, any CPU without AVX512-FP16) each fp16 op is computed in
      float32 and rounded, exactly numpy's per-op rounding, and nothing is contracted;
    * bf16 never: XLA rounds to bf16 after each float32 op, which blocks contraction.
    """
    rewrites = xla_cpu_rewrites(features, xla_flags)
    fused = {"fp32": rewrites.fp32_fma, "fp16": rewrites.fp16_fma}.get(fmt_name, False)
    return CONTRACTION_SITES if fused else frozenset()


def hostile_gradients(rng, n, steps, fmt, low_exponent):
    """Per-element magnitudes log-uniform from 2^low_exponent to 1 (fixed per element across steps, so tiny
    elements stay tiny and their subnormal arithmetic reaches the weights), random signs."""
    scale = np.exp2(rng.uniform(low_exponent, 0, n))
    return [to_format(rng.standard_normal(n) * scale, fmt) for _ in range(steps)]


def compare_updates(opt, fmt_name, steps=25, n=40_000, seed=0, low_exponent=-20, reference=None):
    """Run ``steps`` updates with the same gradients through JAX (jitted, the backend's own update), the numpy
    reference and ``reference`` (a function with numpy_update's signature, default: the reference itself); count
    per-step bit mismatches of weights and state (summed over steps)."""
    fmt = get_format(fmt_name)
    rng = np.random.default_rng(seed)
    table = scalar_table(opt, steps, fmt).astype(fmt.dtype)
    grads = hostile_gradients(rng, n, steps, fmt, low_exponent)
    w0 = to_format(rng.standard_normal(n) * np.exp2(rng.uniform(low_exponent, 2, n)), fmt)
    zeros = [np.zeros(n, fmt.dtype) for _ in range(state_size(opt))]
    step_fn = jax.jit(lambda t, row, w, g, st: jax_update(opt, t, row, w, g, st))
    w_j, st_j = jnp.asarray(w0), [jnp.asarray(z) for z in zeros]
    w_n, st_n = w0.copy(), [z.copy() for z in zeros]
    w_m, st_m = w0.copy(), [z.copy() for z in zeros]
    model = reference or numpy_update
    counts = {"jax_vs_numpy": 0, "jax_vs_model": 0, "steps": steps, "elements": n}
    mismatch_mask = np.zeros(n, bool)
    with np.errstate(all="ignore"):
        for t in range(1, steps + 1):
            row = table[t - 1]
            w_j, st_j = step_fn(np.int32(t), row, w_j, jnp.asarray(grads[t - 1]), st_j)
            w_n, st_n = numpy_update(opt, t, list(row), w_n, grads[t - 1], st_n)
            w_m, st_m = model(opt, t, list(row), w_m, grads[t - 1], st_m)
            got = [np.asarray(w_j)] + [np.asarray(x) for x in st_j]
            for key, other in (("jax_vs_numpy", [w_n] + st_n), ("jax_vs_model", [w_m] + st_m)):
                for a, b in zip(got, other):
                    differ = bits(a) != bits(np.asarray(b).view(np.ndarray))
                    counts[key] += int(differ.sum())
                    if key == "jax_vs_numpy":
                        mismatch_mask |= differ
    counts["mismatch_mask"] = mismatch_mask
    counts["finite_share"] = float(np.isfinite(np.asarray(w_j, np.float64)).mean())
    return counts


def contraction_model(fmt_name, contract, reciprocal):
    fmt = get_format(fmt_name)
    return lambda opt, t, row, w, g, st: xla_model_update(opt, t, row, w, g, st, fmt, contract, reciprocal)


@pytest.mark.parametrize("fmt_name", ["fp16", "fp32"])
def test_rewrite_model_without_rewrites_is_the_reference(fmt_name):
    # The model must be the reference op order when both rewrites are off, or it would explain nothing.
    for opt in UPDATE_CASES:
        fmt = get_format(fmt_name)
        rng = np.random.default_rng(1)
        w, g = to_format(rng.standard_normal(1000), fmt), to_format(rng.standard_normal(1000) * 1e-2, fmt)
        state = [to_format(np.abs(rng.standard_normal(1000)) * 1e-4, fmt) for _ in range(state_size(opt))]
        row = list(scalar_table(opt, 3, fmt).astype(fmt.dtype)[2])
        with np.errstate(all="ignore"):
            ref_w, ref_st = numpy_update(opt, 3, row, w, g, state)
            mod_w, mod_st = xla_model_update(opt, 3, row, w, g, state, fmt)
        for a, b in zip([ref_w, *ref_st], [mod_w, *mod_st]):
            np.testing.assert_array_equal(bits(a), bits(b))


@pytest.mark.parametrize("fmt_name", ["fp16", "fp32"])
@pytest.mark.parametrize("opt", UPDATE_CASES, ids=UPDATE_IDS)
def test_update_is_reference_plus_xla_rewrites(fmt_name, opt):
    # fp16 values are normal float32 numbers and fp32 inputs here stay above 2^-20 * 2^-20, so no subnormal
    # (and no flush-to-zero) occurs: the model's two rewrites are the whole difference, bit for bit.
    contract = expected_contraction(fmt_name)
    counts = compare_updates(opt, fmt_name, reference=contraction_model(fmt_name, contract, reciprocal=True))
    assert counts["finite_share"] == 1.0, counts  # every element compared is a number
    assert counts["jax_vs_model"] == 0, counts
    # And the rewrites are not vacuous: the reference itself differs wherever one of them applies.
    if contract or opt.is_adam:
        assert counts["jax_vs_numpy"] > 0, counts


AVX_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import test_jax_rewrites as t
out = {{}}
for fmt_name in ("fp16", "fp32"):
    for opt in t.UPDATE_CASES:
        counts = t.compare_updates(opt, fmt_name, steps=15, n=20_000,
                                   reference=t.contraction_model(fmt_name, t.expected_contraction(fmt_name), True))
        out[f"{{fmt_name}} {{opt}}"] = {{k: counts[k] for k in ("jax_vs_numpy", "jax_vs_model")}}
        out[f"{{fmt_name}} {{opt}}"]["expected_sites"] = len(t.expected_contraction(fmt_name))
print(json.dumps(out))
"""


def test_no_fma_isa_removes_every_contraction():
    # XLA_FLAGS must be set before jax is imported, hence a subprocess. Without FMA instructions LLVM cannot
    # contract; what remains is the reciprocal rewrite, which only Adam's bias-correction division meets. So SGD
    # (every form) is bit-identical to the reference, and Adam equals the reference with the reciprocal only.
    # The subprocess derives its expectation from its own XLA_FLAGS (expected_contraction reads them): this is
    # the emulation of a CPU without FMA, and it must take the no-contraction expectation.
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_max_isa=AVX", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", AVX_SCRIPT.format(tests=str(Path(__file__).parent))],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for case, counts in results.items():
        assert counts["expected_sites"] == 0, (case, counts)
        assert counts["jax_vs_model"] == 0, (case, counts)
        if case.split(" ", 1)[1].startswith("sgd"):
            assert counts["jax_vs_numpy"] == 0, (case, counts)


BF16 = np.dtype(ml_dtypes.bfloat16)
F32_TINY = np.float32(get_format("fp32").tiny)


class FlushedBF16(np.ndarray):
    """A bf16 array whose ufuncs do what XLA's CPU code does with bf16: convert to float32, compute with
    denormals-are-zero on the inputs and flush-to-zero on the float32 result, round to bf16. Elements where a
    flush happened are recorded in ``FlushedBF16.flushed`` (elementwise code only: shapes broadcast)."""

    flushed: np.ndarray | None = None

    @staticmethod
    def _flush(a: np.ndarray) -> np.ndarray:
        sub = (a != 0) & (np.abs(a) < F32_TINY)
        if sub.any():
            FlushedBF16.flushed |= np.broadcast_to(sub, FlushedBF16.flushed.shape)
        return np.where(sub, np.copysign(np.float32(0), a), a)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if method != "__call__" or kwargs:
            return NotImplemented
        args = [self._flush(np.asarray(x.view(np.ndarray) if isinstance(x, np.ndarray) else x, np.float32))
                for x in inputs]
        with np.errstate(all="ignore"):
            result = ufunc(*args)
        return self._flush(result).astype(BF16).view(FlushedBF16)

    def copy(self, order="C"):
        return np.ndarray.copy(self, order).view(FlushedBF16)


def flushed_reference(opt, t, row, w, g, state):
    """The numpy reference update itself, run on FlushedBF16 arrays."""
    w, st = numpy_update(opt, t, row, w.view(FlushedBF16), g.view(FlushedBF16),
                         [x.view(FlushedBF16) for x in state])
    return w.view(np.ndarray), [x.view(np.ndarray) for x in st]


@pytest.mark.parametrize("opt", UPDATE_CASES, ids=UPDATE_IDS)
def test_bf16_update_differs_only_where_subnormals_are_flushed(opt):
    # Magnitudes down to 2^-135: tiny gradients make subnormal products (g*g, (1-b1)*g, lr*g), which XLA's CPU
    # flushes to zero and numpy keeps. bf16 elementwise ops run in float32 with a rounding to bf16 after each
    # one, so no FMA can form; the reciprocal rewrite keeps 1/sqrt_bc2 in float32, too close to exact to move a
    # bf16 rounding (docs/jax.md). Hence the flushing model must match JAX bit for bit.
    n = 40_000
    FlushedBF16.flushed = np.zeros(n, bool)
    counts = compare_updates(opt, "bf16", n=n, low_exponent=-135, reference=flushed_reference)
    assert counts["finite_share"] == 1.0, counts
    assert counts["jax_vs_model"] == 0, counts
    # Those and only those: every element where JAX and numpy differ is one where a subnormal was flushed.
    mismatched = counts["mismatch_mask"]
    assert counts["jax_vs_numpy"] > 0, "the hostile inputs should produce flushed subnormals"
    assert not (mismatched & ~FlushedBF16.flushed).any(), int((mismatched & ~FlushedBF16.flushed).sum())


def test_fp16_update_has_no_flush_to_zero():
    # fp16 subnormals (down to 2^-24) are normal float32 numbers: XLA's flush never touches fp16 arithmetic. The
    # fp16 update with magnitudes through the whole fp16 subnormal range is still exactly the rewrite model.
    opt = make_optimizer("adam", eps=1e-4)
    model = contraction_model("fp16", expected_contraction("fp16"), reciprocal=True)
    counts = compare_updates(opt, "fp16", low_exponent=-26, reference=model)
    assert counts["finite_share"] == 1.0, counts
    assert counts["jax_vs_model"] == 0, counts


