"""The JAX backend against the numpy reference: where they agree, where they differ, and the cause of each
difference pinned by an exact model; x64 scoping, devices, determinism and the compile-once chunk loop.

Expected differences (docs/jax.md explains each):
* fp64 whole training loop: dot and reduction order, FMA contraction: within 1e-12 relative after 200 steps.
* fp16 / fp32 / bf16 optimizer update for identical gradients: tests/test_jax_rewrites.py (FMA contraction,
  reciprocal rewrite, flush-to-zero, each reproduced exactly).
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

REPO = Path(__file__).resolve().parents[1]
FP64 = get_format("fp64")
BF16 = np.dtype(ml_dtypes.bfloat16)
U64 = FP64.unit_roundoff


def bits(x: np.ndarray) -> np.ndarray:
    """Bit patterns, so that -0 != +0 and NaN == NaN in comparisons. Every NaN is mapped to one pattern: IEEE 754
    leaves the sign and payload of a NaN produced by arithmetic unspecified (XLA's x86 code gives the "default
    NaN" with the sign bit set, numpy keeps an operand's)."""
    x = np.array(x, copy=True)
    x[np.isnan(x.astype(np.float32))] = np.nan
    return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def jax_twin(spec: RunSpec) -> RunSpec:
    return dataclasses.replace(spec, backend="jax")


# ---------------------------------------------------------------------------------------------------------------
# Whole training loop in float64
# ---------------------------------------------------------------------------------------------------------------

FP64_CASES = [  # every problem, every optimizer form, minibatch and full batch, a ragged last chunk
    ("linreg", make_optimizer("sgd", nesterov=True, weight_decay=1e-3), 128, 200),
    ("logreg", make_optimizer("adam"), 128, 200),
    ("logreg", make_optimizer("sgd"), None, 200),
    ("softmax", make_optimizer("adamw"), 128, 200),
    ("mlp", make_optimizer("sgd"), 128, 200),
    ("mlp", make_optimizer("adam"), 128, 190),
]


@pytest.mark.parametrize("problem,opt,batch,steps", FP64_CASES,
                         ids=[f"{c[0]}-{c[1]}-bs{c[2]}-{c[3]}" for c in FP64_CASES])
def test_fp64_training_matches_numpy(problem, opt, batch, steps):
    # Cause of any difference: XLA sums dot products and reductions in its own order and contracts a*b+c into FMA.
    # Each step's gradient is a sum over <= 1024 rows; two summation orders differ by at most about
    # 2 * 1024 * u64 = 2.3e-13 relative to the sum of |terms| (typically sqrt(1024) * u64 = 3.6e-15). Training with
    # these step sizes is contracting, so per-step errors add rather than multiply: 200 steps x ~4e-15 ~ 1e-12.
    spec = RunSpec(problem, opt, PRESETS["fp64"], steps=steps, batch_size=batch)
    dataset = dataset_for(spec)
    ref, got = train(spec, dataset), train(jax_twin(spec), dataset)
    assert got.diverged_at is None and ref.diverged_at is None
    np.testing.assert_array_equal(got.record_steps, ref.record_steps)
    assert got.final_params.dtype == np.float64
    for step, p, r in zip(ref.record_steps, got.params, ref.params):
        rel = np.linalg.norm(p - r) / np.linalg.norm(r)
        assert rel <= 1e-12, f"step {step}: relative L2 {rel:.3e}"


# ---------------------------------------------------------------------------------------------------------------
# Kernels: transcendentals, conversions, gradients, dtypes in the program
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt_name", ["fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2"])
def test_narrow_transcendentals_equal_the_reference_on_every_input(fmt_name):
    fmt = get_format(fmt_name)
    inputs = np.arange(2**fmt.bits, dtype=np.uint64).astype(np.dtype(f"u{fmt.bits // 8}")).view(fmt.dtype)
    ops = JaxOps(fmt, get_format("fp32"))
    for name in ("exp", "tanh", "sigmoid"):
        got = np.asarray(jax.jit(getattr(ops, name))(jnp.asarray(inputs)))
        ref = transcendental_table(name, fmt)
        np.testing.assert_array_equal(bits(got), bits(ref), err_msg=f"{fmt_name} {name}")


def test_xla_native_narrow_exp_is_not_correctly_rounded():
    # Why the tables exist: XLA computes fp16/bf16 exp in float32 (a few float32 ulp off) and rounds again, so
    # some inputs land on the other side of a rounding boundary than the correctly rounded float64 value.
    for fmt_name in ("fp16", "bf16"):
        fmt = get_format(fmt_name)
        inputs = np.arange(2**16, dtype=np.uint16).view(fmt.dtype)
        native = np.asarray(jax.jit(jnp.exp)(jnp.asarray(inputs)))
        ref = transcendental_table("exp", fmt)
        assert (bits(native) != bits(ref)).sum() > 0, fmt_name


def test_float64_narrowing_rounds_once():
    # XLA converts f64 -> bf16 through f32: a value just above a bf16 midpoint that f32 rounds onto the midpoint
    # then ties to even, the wrong way. ops.convert rounds in float64 first.
    rng = np.random.default_rng(0)
    b = round_to(rng.standard_normal(20_000), "bf16")
    half_ulp = np.ldexp(1.0, np.frexp(b)[1] - 1 - 8)
    traps = (b + half_ulp) + np.sign(b) * np.ldexp(half_ulp, -30)  # above the midpoint by far less than f32 ulp
    with jax.enable_x64(True):
        plain = np.asarray(jnp.asarray(traps).astype(jnp.bfloat16))
        ours = {f: np.asarray(jax.jit(lambda x, f=f: convert(x, FP64, get_format(f)))(jnp.asarray(traps)))
                for f in ("bf16", "fp16", "fp8_e4m3fn", "fp8_e5m2")}
    expected = to_format(traps, "bf16")
    assert (bits(plain) != bits(expected)).mean() > 0.4  # XLA's double rounding hits about half of these traps
    for fmt_name, got in ours.items():
        np.testing.assert_array_equal(bits(got), bits(to_format(traps, fmt_name)), err_msg=fmt_name)


def _float64_loss(problem, params, X, y, layout):
    p = unflatten(params, layout)
    if problem in ("linreg", "logreg"):
        z = X @ p["w"] + p["b"][0]
        if problem == "linreg":
            return jnp.mean((z - y) ** 2) / 2
        return jnp.mean(jnp.logaddexp(0.0, z) - y * z)
    z = X @ p["W"] + p["b"] if problem == "softmax" else jnp.tanh(X @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]
    return -jnp.mean(jax.nn.log_softmax(z)[jnp.arange(len(y)), y])


@pytest.mark.parametrize("problem", ["linreg", "logreg", "softmax", "mlp"])
def test_hand_written_gradients_equal_jax_grad(problem):
    # A wrong formula shows as an O(1) relative error. Rounding alone: both are float64 evaluations with at most
    # two chained sums over n = 1024 rows, each within about n * u64 = 1.1e-13 of exact relative to the sum of
    # |terms|; standardized inputs and O(1) params keep that ratio to |sum| small, so 1e-12 separates the two.
    dataset = make_dataset(problem, seed=1)
    params = dataset.init_params + 0.3 * np.random.default_rng(0).standard_normal(dataset.n_params)
    with jax.enable_x64(True):
        X, T = jnp.asarray(dataset.X_train), jnp.asarray(targets_for(dataset, dataset.y_train))
        ops = JaxOps(FP64, FP64)
        scale = jnp.asarray(1.0 / len(dataset.X_train))
        hand = jax.jit(lambda p: jax_gradient(problem, ops, p, X, T, scale, dataset.layout))(jnp.asarray(params))
        auto = jax.jit(jax.grad(lambda p: _float64_loss(problem, p, X, jnp.asarray(dataset.y_train),
                                                        dataset.layout)))(jnp.asarray(params))
    hand, auto = np.asarray(hand), np.asarray(auto)
    assert np.linalg.norm(hand - auto) / np.linalg.norm(auto) <= 1e-12


def test_policy_dtypes_are_native_in_the_program():
    # bf16-mixed: params bf16, master weights and both Adam moments fp32, dots take bf16 and return fp32.
    spec = RunSpec("mlp", make_optimizer("adam"), PRESETS["bf16-mixed"], backend="jax", data="digits")
    text = lower(spec, dataset_for(spec)).as_text()
    main = next(line for line in text.splitlines() if "func.func public @main" in line)
    carry = [piece.split(">")[0] for piece in main.split("tensor<")[1:6]]
    n = dataset_for(spec).n_params
    assert carry == [f"{n}xf32", f"{n}xbf16", f"{n}xf32", f"{n}xf32", "i32"]  # weights, params, m, v, diverged
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert dots and all("xbf16>, tensor<" in d and d.rstrip().endswith("xf32>") for d in dots), dots


# ---------------------------------------------------------------------------------------------------------------
# The loop: chunking, divergence, determinism, every policy
# ---------------------------------------------------------------------------------------------------------------

def test_one_compile_per_run_and_chunking_does_not_change_numbers():
    # 45 steps recorded every 20: chunks 20, 20, 5; the 5 reuses the 20-step program with 15 masked steps.
    spec = RunSpec("mlp", make_optimizer("adam"), PRESETS["fp32"], backend="jax", steps=45, record_every=20)
    dataset = dataset_for(spec)
    jax_loop.clear_compile_cache()
    first = train(spec, dataset)
    assert jax_loop.compiled_programs() == 1 and first.compile_s > 0
    np.testing.assert_array_equal(first.record_steps, [0, 20, 40, 45])
    again = train(spec, dataset)  # cached program: no compile, same bits
    assert again.compile_s == 0.0
    other = train(dataclasses.replace(spec, record_every=9), dataset)  # 9-step chunks, no padding
    for traj in (again, other):
        np.testing.assert_array_equal(bits(traj.final_params), bits(first.final_params))


def test_divergence_mid_chunk_stops_where_numpy_stops():
    # fp16 SGD with lr = 3 overflows fp16's 65504 at step 18 in both backends; the steps after it in the chunk
    # are masked, so the params the host reads are those right after the diverging step.
    spec = RunSpec("linreg", make_optimizer("sgd", lr=3.0), PRESETS["fp16"], steps=60, record_every=20)
    dataset = dataset_for(spec)
    ref, got = train(spec, dataset), train(jax_twin(spec), dataset)
    assert ref.diverged_at == got.diverged_at == 18
    np.testing.assert_array_equal(got.record_steps, ref.record_steps)
    np.testing.assert_array_equal(np.isfinite(got.params[-1]), np.isfinite(ref.params[-1]))
    assert not np.isfinite(got.params[-1]).all()


@pytest.mark.parametrize("policy", ["fp32", "bf16-mixed", "fp16-mixed-ls"])
def test_same_spec_twice_same_fingerprint(policy):
    spec = RunSpec("mlp", make_optimizer("adam"), PRESETS[policy], backend="jax", data="digits", steps=60)
    dataset = dataset_for(spec)
    first = train(spec, dataset)
    jax_loop.clear_compile_cache()  # the second run compiles afresh
    second = train(spec, dataset)
    assert first.diverged_at is None and second.diverged_at is None
    assert fingerprint(first.final_params) == fingerprint(second.final_params)


# Every preset, problem and optimizer at least once (a covering set; the full product below is marked slow:
# deselect it with -m 'not slow' for a quick loop). What must hold for any policy: params stored in the policy's
# params dtype, and the same
# divergence step as the reference (the overflow of a format is a property of the format, not of the backend).
COVER = [("linreg", "sgd", "fp16-mixed-ls"), ("logreg", "adam", "bf16"), ("softmax", "adamw", "fp8-mixed"),
         ("mlp", "sgd", "fp16"), ("mlp", "adam", "bf16-mixed"), ("logreg", "adamw", "fp16-mixed"),
         ("softmax", "sgd", "p=fp32,a=fp64"), ("linreg", "adam", "p=bf16,m=fp64,s=fp32")]


def _check_policy_run(problem, optimizer, policy, steps=40):
    spec = RunSpec(problem, make_optimizer(optimizer), get_policy(policy), steps=steps, record_every=20)
    dataset = dataset_for(spec)
    ref, got = train(spec, dataset), train(jax_twin(spec), dataset)
    assert got.final_params.dtype == spec.policy.params.dtype
    assert got.diverged_at == ref.diverged_at
    # Step 0 is the same rounding of the same float64 init on the host: identical bits.
    np.testing.assert_array_equal(got.params[0], ref.params[0])


@pytest.mark.parametrize("problem,optimizer,policy", COVER, ids=["-".join(c) for c in COVER])
def test_every_policy_runs(problem, optimizer, policy):
    _check_policy_run(problem, optimizer, policy)


@pytest.mark.slow
@pytest.mark.parametrize("policy", list(PRESETS))
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
@pytest.mark.parametrize("problem", ["linreg", "logreg", "softmax", "mlp"])
def test_every_policy_runs_full_product(problem, optimizer, policy):
    # In the default run too (~1-3 minutes on 2 cores): CI has the time, and a covering set is not the product.
    _check_policy_run(problem, optimizer, policy)


# ---------------------------------------------------------------------------------------------------------------
# x64 scoping and devices
# ---------------------------------------------------------------------------------------------------------------

X64_SCRIPT = """
import jax, json
import precision
from precision.backends.jax_backend import BACKEND
before = bool(jax.config.jax_enable_x64)
spec = precision.build_specs(["logreg"], ["adam"], ["fp64"], backends=["jax"], steps=20)[0]
traj = precision.train(spec)
import jax.numpy as jnp
print(json.dumps({"before": before, "after": bool(jax.config.jax_enable_x64),
                  "dtype": str(traj.final_params.dtype), "default_float": str(jnp.zeros(1).dtype)}))
"""


def test_fp64_run_leaves_global_x64_unchanged():
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    proc = subprocess.run([sys.executable, "-c", X64_SCRIPT], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"before": False, "after": False, "dtype": "float64", "default_float": "float32"}


def test_users_global_x64_does_not_change_a_narrow_run():
    spec = RunSpec("logreg", make_optimizer("adam"), PRESETS["bf16-mixed"], backend="jax", steps=20)
    dataset = dataset_for(spec)
    plain = train(spec, dataset)
    with jax.enable_x64(True):
        jax_loop.clear_compile_cache()
        inside = train(spec, dataset)
        assert jax.config.jax_enable_x64  # the backend's scope restored the user's setting
    np.testing.assert_array_equal(bits(inside.final_params), bits(plain.final_params))
    assert needs_x64(PRESETS["fp64"]) and needs_x64(get_policy("p=fp32,a=fp64"))
    assert not needs_x64(PRESETS["bf16-mixed"])


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def test_gpu_availability_is_reported_not_raised():
    avail = BACKEND.availability("gpu")
    assert avail.available == _has_gpu()
    spec = RunSpec("logreg", make_optimizer("adam"), PRESETS["fp32"], backend="jax", device="gpu", steps=20)
    if avail.available:
        assert "gpu" in BACKEND.devices()
        assert run_one(spec).status == "ok"
    else:
        assert "gpu" in avail.reason and BACKEND.devices() == ("cpu",)
        with pytest.raises(UnavailableError, match="gpu"):
            BACKEND.train(spec, dataset_for(spec))
        result = run_one(spec)
        assert result.status == "unavailable" and "gpu" in result.message
    assert not BACKEND.availability("tpu").available



def test_benchmark_update_kernel_is_the_backend_update():
    # kernels.update_kernel (for the kernel micro-benchmarks) times the backend's update on fixed inputs; in bf16
    # with normal-range inputs (no flush, no FMA) it must be the reference update bit for bit, and a repeat must
    # not change its inputs (out of place).
    from precision.backends.jax_backend.kernels import update_kernel
    opt = make_optimizer("adam")
    kernel = update_kernel(opt, "bf16", 1000, seed=3, step=2)
    first, second = np.asarray(kernel.run()), np.asarray(kernel.run())
    rng = np.random.default_rng(3)  # the kernel's documented inputs, drawn in the same order
    w, g = to_format(rng.standard_normal(1000), "bf16"), to_format(rng.standard_normal(1000) * 1e-2, "bf16")
    state = [to_format(np.abs(rng.standard_normal(1000)) * 1e-4, "bf16") for _ in range(2)]
    row = list(scalar_table(opt, 2, get_format("bf16")).astype(BF16)[1])
    expected, _ = numpy_update(opt, 2, row, w, g, state)
    np.testing.assert_array_equal(bits(first), bits(expected))
    np.testing.assert_array_equal(bits(second), bits(first))
