"""The remedies (step_rules.REMEDY_RULES: r=sr / r=sr-state, r=kahan, ls=dynamic) in the JAX backend against the
numpy reference.

What can be equal and what cannot (docs/jax.md, "The remedies"):
* Stochastic rounding is bit-identical to the reference wherever the round-to-nearest runs already are: the random
  bits are the same Threefry words (the run's seed word, the stream's tensor ids, the loop's 1-based step, the
  element's index), and the decision reads only the bits of the U value. Where XLA rewrites the update (FMA
  contraction in float32) the U value differs now and then and so may the decision; with
  ``--xla_cpu_max_isa=AVX`` (no FMA, as tests/test_jax_rewrites.py) plain and momentum SGD are bit-identical, with
  and without SR.
* Kahan and dynamic loss scaling: the same chain, so the runs agree within the usual bound of the params format
  (lambda sqrt(T) u, tests/test_numba_backend.py); the dynamic scaler's decisions (which steps overflow) are
  properties of the formats, and the skipped steps and the loss scale at each record equal numpy's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402

from precision.backends.jax_backend import BACKEND  # noqa: E402
from precision.backends.jax_backend import loop as jax_loop  # noqa: E402
from precision.backends.jax_backend.ops import convert  # noqa: E402
from precision.backends.numpy_backend.ops import convert as host_convert  # noqa: E402
from precision.backends.step_rules import ScalerState, dynamic_unscale, scaler_update  # noqa: E402
from precision.drift import fingerprint  # noqa: E402
from precision.optim import make_optimizer  # noqa: E402
from precision.policy import DynamicScale, get_policy  # noqa: E402
from precision.runner import dataset_for, train  # noqa: E402
from precision.spec import RunSpec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Higham & Mary's probabilistic bound for independent rounding errors (tests/test_numba_backend.py): the gap after
# T steps is at most lambda sqrt(T) u of the params format, with probability >= 1 - 2 exp(-lambda^2 / 2) per term.
LAMBDA = 5.0


def pair(problem, opt, policy, steps=60, record_every=20, **kw):
    spec = RunSpec(problem, opt, get_policy(policy), steps=steps, record_every=record_every, **kw)
    dataset = dataset_for(spec)
    return train(spec, dataset), train(dataclasses.replace(spec, backend="jax"), dataset)


def within_sqrt_steps_u(ref, got, policy):
    assert ref.diverged_at == got.diverged_at is None
    np.testing.assert_array_equal(got.record_steps, ref.record_steps)
    np.testing.assert_array_equal(got.params[0], ref.params[0])  # the same rounding of the same init
    u = get_policy(policy).params.unit_roundoff
    tol = LAMBDA * math.sqrt(ref.record_steps[-1]) * u
    rel = np.linalg.norm(got.params - ref.params, axis=1) / np.linalg.norm(ref.params, axis=1)
    assert rel.max() <= tol, f"rel {rel.max():.3g} > {tol:.3g}"


# -- stochastic rounding: bit-identical where round-to-nearest is --------------------------------------------------

SR_BASE = "p=bf16,c=bf16,a=fp64,s=bf16,u=fp32"
SR_CASES = [  # (problem, optimizer, momentum, rounding)
    ("logreg", "sgd", 0.0, "sr"),
    ("softmax", "sgd", 0.9, "sr"),
    ("softmax", "sgd", 0.9, "sr-state"),
]

SR_SCRIPT = """
import dataclasses, json, sys
from precision.drift import fingerprint
from precision.optim import make_optimizer
from precision.policy import get_policy
from precision.runner import dataset_for, train
from precision.spec import RunSpec
out = []
for problem, opt, momentum, rounding in {cases!r}:
    prints = {{}}
    for r in ("nearest", rounding, rounding + "(stream=1)"):
        policy = {base!r} + ("" if r == "nearest" else ",r=" + r)
        spec = RunSpec(problem, make_optimizer(opt, momentum=momentum), get_policy(policy), steps=60,
                       record_every=25)  # 25, 25, 10: a padded last chunk
        dataset = dataset_for(spec)
        ref, got = train(spec, dataset), train(dataclasses.replace(spec, backend="jax"), dataset)
        assert ref.diverged_at is None and got.diverged_at is None, policy
        prints[r] = [fingerprint(ref.final_params), fingerprint(got.final_params),
                     bool((ref.params.astype("f8").view("u8") == got.params.astype("f8").view("u8")).all())]
    out.append([problem, opt, momentum, rounding, prints])
print(json.dumps(out))
"""


def test_stochastic_rounding_is_bit_identical_where_nearest_is():
    # XLA_FLAGS must be set before jax is imported: a subprocess. Without FMA instructions XLA's update is the
    # reference's op order for SGD (test_no_fma_isa_removes_every_contraction), so the nearest runs coincide and the
    # SR runs must too: the same random words and the same U values give the same decisions.
    env = dict(os.environ, XLA_FLAGS="--xla_cpu_max_isa=AVX", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SR_SCRIPT.format(cases=SR_CASES, base=SR_BASE)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for problem, opt, momentum, rounding, prints in json.loads(proc.stdout.strip().splitlines()[-1]):
        case = f"{problem} {opt} momentum={momentum} r={rounding}"
        nearest, sr, stream1 = prints["nearest"], prints[rounding], prints[rounding + "(stream=1)"]
        assert nearest[0] == nearest[1] and nearest[2], f"{case}: the nearest runs are not bit-identical here"
        assert sr[0] == sr[1] and sr[2], f"{case}: SR differs from numpy at some record"
        assert stream1[0] == stream1[1] and stream1[2], f"{case}: SR stream 1 differs from numpy"
        # and SR is not a no-op: it changes the run, and another stream is another run
        assert len({nearest[0], sr[0], stream1[0]}) == 3, case


def test_sr_seed_is_traced_and_stream_is_compiled():
    """The seed word is an argument of the program (two seeds on the same data: one compile, two runs); the
    stream, part of the policy, is part of the cache key."""
    opt = make_optimizer("sgd", momentum=0.9)
    spec = RunSpec("logreg", opt, get_policy("bf16-sr"), backend="jax", steps=30, record_every=10)
    dataset = dataset_for(spec)
    jax_loop.clear_compile_cache()
    a = BACKEND.train(spec, dataset)
    b = BACKEND.train(dataclasses.replace(spec, seed=2 ** 32 + 5), dataset)  # the backend itself: same data
    assert jax_loop.compiled_programs() == 1 and b.compile_s == 0.0
    c = BACKEND.train(dataclasses.replace(spec, policy=get_policy("p=bf16,s=bf16,u=fp32,r=sr(stream=3)")), dataset)
    assert jax_loop.compiled_programs() == 2
    assert len({fingerprint(t.final_params) for t in (a, b, c)}) == 3
    assert a.final_params.dtype == get_policy("bf16-sr").params.dtype
    assert all(t.audit is not None and len(t.audit) == len(t.record_steps) for t in (a, b, c))


def test_sr_with_gradient_accumulation_matches_numpy():
    ref, got = pair("softmax", make_optimizer("adam"), "bf16-sr", steps=40, accum_steps=3)
    within_sqrt_steps_u(ref, got, "bf16-sr")


# -- Kahan --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("problem,opt", [("logreg", "adam"), ("softmax", "sgd-momentum"), ("mlp", "adamw")])
def test_kahan_matches_numpy_within_sqrt_steps_u(problem, opt):
    optimizer = make_optimizer("sgd", momentum=0.9) if opt == "sgd-momentum" else make_optimizer(opt)
    ref, got = pair(problem, optimizer, "bf16-kahan")
    within_sqrt_steps_u(ref, got, "bf16-kahan")
    assert got.audit is not None and len(got.audit) == len(got.record_steps)


def test_kahan_carries_the_compensation():
    """The compensation is the carry's last state vector, in S, and it is not all zero after training (bf16 weights
    with a small lr: most updates are below half an ulp); without it the run is plain torch-bf16, another run."""
    spec = RunSpec("logreg", make_optimizer("adam", lr=1e-3), get_policy("bf16-kahan"), backend="jax", steps=30)
    dataset = dataset_for(spec)
    from precision.backends.jax_backend import _prepare, jax_device
    with jax.enable_x64(False):
        prepared = _prepare(spec, dataset, jax_device("cpu"))
    assert len(prepared.carry.state) == 3  # m, v, compensation
    assert prepared.carry.state[-1].dtype == jnp.bfloat16
    kahan = train(spec, dataset)
    plain = train(dataclasses.replace(spec, policy=get_policy("torch-bf16")), dataset)
    assert fingerprint(kahan.final_params) != fingerprint(plain.final_params)


# -- dynamic loss scaling -----------------------------------------------------------------------------------------

SKIPPING = "p=fp16,c=fp16,a=fp32,s=fp32,m=fp32,ls=dynamic(init=1073741824,interval=5)"


@pytest.mark.parametrize("problem,opt,accum", [("logreg", "adam", 1), ("softmax", "sgd-momentum", 1),
                                               ("mlp", "adam", 2)])
def test_dynamic_scaling_skips_the_steps_numpy_skips(problem, opt, accum):
    # 47 steps recorded every 20: a padded last chunk (its 13 masked steps must not move the scaler)
    optimizer = make_optimizer("sgd", momentum=0.9) if opt == "sgd-momentum" else make_optimizer(opt)
    ref, got = pair(problem, optimizer, SKIPPING, steps=47, accum_steps=accum)
    assert len(ref.skipped_steps) > 0  # the initial 2^30 overflows fp16: the case does skip
    np.testing.assert_array_equal(got.skipped_steps, ref.skipped_steps)
    assert got.loss_scale.dtype == ref.loss_scale.dtype
    np.testing.assert_array_equal(got.loss_scale, ref.loss_scale)
    within_sqrt_steps_u(ref, got, SKIPPING)
    assert got.audit is not None and len(got.audit) == len(got.record_steps)


def test_dynamic_scaling_without_skip_diverges_where_numpy_does():
    # skip=no: the first step's overflowed gradient is applied, the weights become inf: the divergence rule fires
    ref, got = pair("logreg", make_optimizer("adam"),
                    "p=fp16,c=fp16,a=fp32,s=fp32,m=fp32,ls=dynamic(init=1073741824,skip=no)", steps=20)
    assert ref.diverged_at == got.diverged_at is not None
    assert len(got.skipped_steps) == len(ref.skipped_steps) == 0
    np.testing.assert_array_equal(got.loss_scale, ref.loss_scale)


@pytest.mark.parametrize("problem", ["logreg", "softmax", "mlp"])
def test_torch_amp_fp16_trains(problem):
    ref, got = pair(problem, make_optimizer("adam"), "torch-amp-fp16")
    assert got.diverged_at is None
    np.testing.assert_array_equal(got.skipped_steps, ref.skipped_steps)
    np.testing.assert_array_equal(got.loss_scale, ref.loss_scale)
    within_sqrt_steps_u(ref, got, "torch-amp-fp16")


def jitted_scaler(ds):
    """scaler_update over a sequence of found_inf flags under jit and lax.scan, as the loop runs it: the states
    after each step (scale float32, tracker int32)."""
    @jax.jit
    def run(flags):
        def body(state, found_inf):
            state = scaler_update(jnp, state, found_inf, ds)
            return state, state
        return jax.lax.scan(body, ScalerState(jnp.float32(ds.init), jnp.int32(0)), flags)[1]
    return lambda flags: tuple(np.asarray(x) for x in run(jnp.asarray(flags)))


def numpy_scaler(ds, flags):
    state, scales, trackers = ScalerState(np.float32(ds.init), np.int32(0)), [], []
    with np.errstate(over="ignore"):  # the growth that would overflow float32 is computed, then not taken
        for found_inf in flags:
            state = scaler_update(np, state, np.bool_(found_inf), ds)
            scales.append(state.scale)
            trackers.append(state.tracker)
    return np.array(scales, np.float32), np.array(trackers, np.int32)


@pytest.mark.parametrize("ds", [DynamicScale(init=2.0 ** 126, growth=4.0, interval=3),
                                DynamicScale(init=2.0 ** 126, growth=2.0, backoff=0.25, interval=2),
                                DynamicScale(init=2.0 ** -100, growth=2.0, backoff=0.5, interval=1)])
def test_scaler_state_machine_under_jit_equals_numpy(ds):
    rng = np.random.default_rng(0)
    flags = np.concatenate([np.zeros(12, bool), rng.random(200) < 0.3, np.ones(5, bool), np.zeros(12, bool)])
    scales, trackers = jitted_scaler(ds)(flags)
    want_scales, want_trackers = numpy_scaler(ds, flags)
    assert scales.dtype == np.float32 and trackers.dtype == np.int32
    np.testing.assert_array_equal(scales.view(np.uint32), want_scales.view(np.uint32))
    np.testing.assert_array_equal(trackers, want_trackers)
    assert np.isfinite(scales).all()  # growth that would overflow float32 is not taken
    if ds.growth == 4.0:  # step 3 reaches the interval at 2^126: 2^126 * 4 overflows, the scale stays, tracker 0
        assert scales[2] == 2.0 ** 126 and trackers[2] == 0 and trackers[1] == 2
    if ds.init == 2.0 ** -100:
        assert want_scales.min() >= 2.0 ** -126  # this case stays normal (the next test is the subnormal one)


def test_scale_below_the_float32_normal_range_is_flushed_on_the_cpu():
    """A difference from numpy, pinned: XLA's CPU code flushes float32 subnormals to zero (docs/jax.md), so a
    scale backed off below 2^-126 (only after ~143 skipped steps in a row from 65536, e.g. NaN data) is 0 in the
    JAX loop where numpy keeps 2^-127 ... 2^-149. The states agree up to that step."""
    from precision.machine import xla_cpu_rewrites
    if not xla_cpu_rewrites().flushes_subnormals:
        pytest.skip("XLA does not flush float32 subnormals here")
    ds = DynamicScale(init=2.0 ** -125, interval=1)
    flags = np.array([True] * 4 + [False] * 3)
    scales, _ = jitted_scaler(ds)(flags)
    want, _ = numpy_scaler(ds, flags)
    np.testing.assert_array_equal(want[:2], [2.0 ** -126, 2.0 ** -127])
    np.testing.assert_array_equal(scales[:2], [2.0 ** -126, 0.0])
    assert (scales[1:] == 0).all()  # 0 * growth stays 0
    # the unscale round(1/scale, U) of a scale of 2^127 is the float32 subnormal 2^-127: 0 under jit
    pol = get_policy("p=fp16,c=fp16,a=fp32,s=fp32,m=fp32,ls=dynamic")
    unscale = jax.jit(lambda s: dynamic_unscale(jnp, convert, pol, s))
    assert dynamic_unscale(np, host_convert, pol, np.float32(2.0 ** 127)) == 2.0 ** -127
    assert float(unscale(jnp.float32(2.0 ** 127))) == 0.0
    assert float(unscale(jnp.float32(2.0 ** 126))) == 2.0 ** -126
