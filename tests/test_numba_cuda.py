"""``--backend numba --device gpu`` (precision/backends/numba_cuda, docs/numba_cuda.md) in numba's CUDA simulator.

The simulator runs the kernels' Python: these tests check the GPU loops' logic and op order against the numba CPU
backend, bit for bit (np.array_equal, NaN equal to NaN: no tolerance, because the two are meant to perform the same
IEEE operations in the same order). They cannot check what only a GPU does: NVVM's code generation (FMA
contraction, flush-to-zero), libdevice's operations, timing (benchmarks/gpu_check.py runs on a GPU).

NUMBA_ENABLE_CUDASIM must be set before numba.cuda is first imported, and this process has imported numba for the
other tests, so the whole simulated grid runs in one subprocess (tests/numba_cuda_sim.py) while this process trains
the same grid on the CPU backend. Tiny runs (batch 4, 3 steps, every step recorded) keep the file under 90 s.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from precision.backends import backend_availability, get_backend
from precision.errors import SpecError
from precision.formats import FORMATS, get_format, round_to
from precision.policy import PRESETS

sys.path.insert(0, str(Path(__file__).parent))
from numba_cuda_sim import spec_of, tanh_inputs  # noqa: E402

HAVE_NUMBA = importlib.util.find_spec("numba") is not None
HAVE_NUMBA_CUDA = HAVE_NUMBA and importlib.util.find_spec("numba_cuda") is not None
# Every test but the gpu_check dry run needs numba-cuda; without it they are skipped with this reason.
needs_numba_cuda = pytest.mark.skipif(not HAVE_NUMBA_CUDA, reason="numba-cuda is not installed (pip install "
                                      "'precision[cuda]'): the numba backend's GPU kernels are not tested here")

ROOT = Path(__file__).resolve().parent.parent
BINARY = f"{ROOT}/tests/data/two_classes.csv:label"  # 240 rows x 5 features, 0/1 label
BLOBS = f"{ROOT}/tests/data/three_blobs.npz"  # 8 features, 3 classes
PROBLEMS = (("linreg", BINARY), ("logreg", BINARY), ("softmax", BLOBS), ("mlp", BINARY), ("mlp-4x3-relu", BLOBS))
OPTIMIZERS = (("sgd", {}), ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}), ("adam", {}),
              ("adam", {"weight_decay": 0.01}), ("adamw", {}))
SR_SEED = 2**33 + 7  # above 2^32: sr_key folds the seed's two halves
EXTRA_POLICIES = (
    "p=fp16,c=fp16,a=fp32,s=fp32,m=fp32,ls=dynamic(init=1152921504606846976,interval=2)",  # skips, backs off, grows
    "p=bf16,c=bf16,a=fp64,s=bf16,r=kahan",  # Kahan with U = W, fp64 accumulator
    "p=bf16,c=bf16,a=fp32,s=bf16,u=fp32,r=sr-state",  # stochastic rounding of the weights and the state
    "p=bf16,c=bf16,a=fp32,s=bf16,u=fp32,r=sr(stream=3)",  # another stream, with seed SR_SEED
    "p=fp32,c=tf32,a=fp32,s=fp32",  # an emulated compute format
    "p=fp8_e5m2,c=fp8_e5m2,a=fp32,s=fp32,m=fp32",
    "p=fp32,c=fp(p=8,emax=15,subnormals=no),a=fp32,s=fp32",  # a custom format without subnormals
)
POLICIES = tuple(PRESETS) + EXTRA_POLICIES  # every preset: the GPU kernels cover them all


def _cases() -> list[dict]:
    """Every policy x every problem, the optimizer variant rotating so that each policy meets several and each
    problem all five (the full product would triple the simulator's time)."""
    cases = []
    for i, policy in enumerate(POLICIES):
        for j, (problem, data) in enumerate(PROBLEMS):
            name, overrides = OPTIMIZERS[(i + j) % len(OPTIMIZERS)]
            cases.append(dict(problem=problem, data=data, policy=policy, optimizer=name, overrides=overrides,
                              steps=3, batch=4, seed=SR_SEED if "stream=" in policy else 0))
    # and one that diverges: fp16 weights overflow (lr 1e6) at step 1, so the divergence rule is exercised
    cases.append(dict(problem="logreg", data=BINARY, policy="fp16", optimizer="sgd", overrides={"lr": 1e6}, steps=3,
                      batch=4, seed=0))
    return cases


CASES = _cases()


def _train_cpu(case):
    from precision.data import make_dataset
    spec = spec_of(case, "cpu")
    return get_backend("numba").train(spec, make_dataset(spec.problem, spec.data, spec.seed, spec.steps,
                                                         spec.batch_size))


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """The simulator's trajectories of CASES (one subprocess), and the CPU backend's, computed meanwhile."""
    folder = tmp_path_factory.mktemp("numba_cuda")
    (folder / "cases.json").write_text(json.dumps(CASES))
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "numba_cuda_sim.py"), str(folder / "cases.json"),
                             str(folder / "out.npz")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        cpu = [_train_cpu(case) for case in CASES]
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-4000:]
    return cpu, dict(np.load(folder / "out.npz"))


def _case_id(case):
    return f"{case['problem']}/{case['optimizer']}{'+' if case['overrides'] else ''}/{case['policy']}"


@needs_numba_cuda
@pytest.mark.parametrize("index", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_gpu_trajectory_is_bit_identical_to_cpu(simulated, index):
    """Every recorded step's params, the final params, the divergence step and (dynamic loss scaling) the loss
    scales and skipped steps: equal bit for bit to the numba CPU backend."""
    cpu_runs, gpu = simulated
    cpu = cpu_runs[index]
    assert np.array_equal(cpu.params, gpu[f"{index}/params"], equal_nan=True)
    assert np.array_equal(cpu.final_params.astype(np.float64), gpu[f"{index}/final"], equal_nan=True)
    assert (-1 if cpu.diverged_at is None else cpu.diverged_at) == int(gpu[f"{index}/diverged_at"])
    if cpu.loss_scale is not None:
        assert np.array_equal(np.asarray(cpu.loss_scale, dtype=np.float64), gpu[f"{index}/loss_scale"])
        assert np.array_equal(np.asarray(cpu.skipped_steps, dtype=np.int64), gpu[f"{index}/skipped"])


@needs_numba_cuda
def test_gpu_tanh_is_the_cpu_tanh64(simulated):
    """The GPU's tanh (device.tanh64: the CPU recipe with never-contracted operations) gives the CPU's
    ops.tanh64 bits on both sides of its branch and clamp, at zeros, subnormals, infinities and NaN."""
    from precision.backends.numba_backend.ops import tanh64_array
    x = tanh_inputs()
    want = np.empty_like(x)
    tanh64_array(x, want)
    got = simulated[1]["tanh64"]
    assert np.array_equal(got.view(np.int64)[~np.isnan(want)], want.view(np.int64)[~np.isnan(want)])
    assert np.array_equal(np.isnan(got), np.isnan(want))


@needs_numba_cuda
def test_grid_covers_skips_and_divergence(simulated):
    """The grid is not vacuous: the dynamic policy skips steps and changes its scale somewhere in it, and some runs
    diverge (the last case: fp16 weights overflow)."""
    cpu_runs, _ = simulated
    assert any(r.diverged_at is not None for r in cpu_runs)
    dynamic = [r for c, r in zip(CASES, cpu_runs) if "init=1152921504606846976" in c["policy"]]
    assert any(len(r.skipped_steps) for r in dynamic)
    assert any(len(set(np.asarray(r.loss_scale).tolist())) > 1 for r in dynamic)


def test_every_preset_is_in_the_grid():
    assert set(PRESETS) <= {case["policy"] for case in CASES}
    assert {case["problem"] for case in CASES} == {"linreg", "logreg", "softmax", "mlp", "mlp-4x3-relu"}


@needs_numba_cuda
def test_gradient_accumulation_is_refused_in_one_line():
    from precision.backends.numba_cuda.train import check_supported
    spec = dataclasses.replace(spec_of(CASES[0], "gpu"), accum_steps=2)
    with pytest.raises(SpecError, match=r"accum_steps=2: gradient accumulation .* --device cpu") as err:
        check_supported(spec)
    assert "\n" not in str(err.value)


@needs_numba_cuda
@settings(max_examples=200, deadline=None)
@given(fmt_name=st.sampled_from(["fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2", "tf32",
                                 "fp(p=8,emax=15,subnormals=no)", "fp64"]),
       x=st.one_of(st.integers(0, 2 ** 64 - 1).map(lambda u: float(np.array(u, dtype=np.uint64).view(np.float64))),
                   st.floats(min_value=-1e6, max_value=1e6), st.floats(min_value=-1e-36, max_value=1e-36)),
       key=st.tuples(*[st.integers(0, 2 ** 32 - 1)] * 2, st.integers(0, 20), st.integers(0, 2 ** 32 - 1)))
def test_stochastic_rounding_equals_the_cpu_backend(fmt_name, x, key):
    """The GPU kernels' stochastic rounding (device.random_bits, device.sr_value, run as Python: integer Threefry
    and float arithmetic) gives the numba CPU backend's bits (stochastic.stochastic_round64: bit patterns)."""
    from precision.backends.numba_backend.stochastic import random_bits, sr_code, stochastic_round64
    from precision.backends.numba_cuda.device import _random_bits, gpu_format, sr_value
    seed, step, tensor, index = key
    bits = _random_bits(seed, step, tensor, index)
    assert bits == random_bits(seed, step, tensor, index)
    expected = stochastic_round64(x, sr_code(fmt_name, np.float64), seed, step, tensor, index)
    assert _same_bits(sr_value(x, gpu_format(fmt_name), bits), float(expected))


# -- the rounding: round_value (the GPU's, pure float arithmetic) against formats.round_to ---------------------------

def _same_bits(a: float, b: float) -> bool:  # NaN equals NaN (payloads carry nothing); zeros by sign
    return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1.0, a) == math.copysign(1.0, b))


_CHECKED_FORMATS = sorted(FORMATS) + ["tf32", "fp(p=8,emax=15,subnormals=no)", "fp(p=5,emax=7)"]


def _near_grid(fmt_name):
    """Values on, between and at the midpoints of the format's grid, around its subnormals, tiny, max and beyond."""
    fmt = get_format(fmt_name)
    mant = fmt.mantissa_bits
    exponents = st.integers(fmt.min_exponent - mant - 3, fmt.max_exponent + 2)
    offsets = st.sampled_from([0.0, 0.5, 0.25, 0.75, 0.5 - 2.0 ** -40, 0.5 + 2.0 ** -40])
    return st.builds(lambda m, e, off, neg: (-1.0 if neg else 1.0) * math.ldexp(m + off, e - mant),
                     st.integers(0, 2 ** (mant + 1)), exponents, offsets, st.booleans())


_ANY_FLOAT64 = st.integers(0, 2 ** 64 - 1).map(lambda u: float(np.array(u, dtype=np.uint64).view(np.float64)))


@needs_numba_cuda
@pytest.mark.parametrize("fmt_name", _CHECKED_FORMATS)
@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_round_value_equals_round_to(fmt_name, data):
    """The GPU kernels' rounding (device.round_value, run as Python) is formats.round_to, bit for bit, for every
    format: on every float64 pattern (inf, NaN, subnormals, both zeros) and on the format's own grid, its ties and
    their neighbours."""
    from precision.backends.numba_cuda.device import gpu_format, round_value
    x = data.draw(st.one_of(_ANY_FLOAT64, _near_grid(fmt_name)))
    f = gpu_format(fmt_name)
    assert _same_bits(round_value(x, f), float(round_to(np.array([x]), fmt_name)[0]))


@needs_numba_cuda
def test_round_value_edges():
    """Fixed edge cases of every format: +-0, +-inf, NaN, max, tiny, the smallest subnormal and the values just
    above max and halfway below the smallest subnormal."""
    from precision.backends.numba_cuda.device import gpu_format, round_value
    for name in _CHECKED_FORMATS:
        fmt = get_format(name)
        sub = fmt.smallest_subnormal
        edges = [0.0, -0.0, math.inf, -math.inf, math.nan, fmt.max, -fmt.max, fmt.tiny, sub, sub / 2, sub * 0.75,
                 fmt.max * (1 + 2.0 ** -(fmt.mantissa_bits + 1)), fmt.max * 2, 1e308, -1e308, 5e-324]
        f = gpu_format(name)
        for x in edges:
            assert _same_bits(round_value(x, f), float(round_to(np.array([x]), name)[0])), (name, x)


# -- availability: one line, never a traceback ---------------------------------------------------------------------

@needs_numba_cuda
def test_gpu_unavailable_reason_is_one_line():
    avail = backend_availability("numba", "gpu")
    if avail.available:
        pytest.skip("a CUDA GPU (or the simulator) is available in this process")
    assert "\n" not in avail.reason and "GPU" in avail.reason


@needs_numba_cuda
def test_cli_without_gpu_says_why_in_one_line():
    if backend_availability("numba", "gpu").available:
        pytest.skip("a CUDA GPU is available here")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run([sys.executable, "-m", "precision", "run", "--backend", "numba", "--device", "gpu",
                           "--problem", "logreg", "--steps", "2"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "gpu" in lines[0].lower(), proc.stderr


def _gpu_present() -> bool:
    return any(backend_availability(b, "gpu").available for b in ("jax", "numba") if b != "numba" or HAVE_NUMBA_CUDA)


def test_gpu_check_dry_run_without_gpu(tmp_path):
    """benchmarks/gpu_check.py on a machine without a GPU: one line saying so, exit 0, well within 60 s."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    if "NUMBA_ENABLE_CUDASIM" not in os.environ and _gpu_present():
        pytest.skip("a GPU is present: gpu_check would run the whole check")
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: no gpu here"), proc.stdout
    assert not (tmp_path / "gpu_check.json").exists()
